"""The campaign store: unit identity, state transitions, events, read-only readers."""

from __future__ import annotations

import sqlite3

import pytest

from orchestrator.store import (FAILED, GATED, PENDING, RUNNING, SCHEMA, SCHEMA_VERSION, SUCCEEDED, CampaignStore,
                                StoreError)
from workers.synthetic import make_units
from workers.units import UnitResult


def _result(unit_id: str, f1: float = 0.9) -> UnitResult:
    return UnitResult(unit_id=unit_id, f1=f1, precision=f1, recall=f1, episode_return=1.5, steps=100,
                      shard_path="/lake/x.parquet", seconds=2.0, env_steps_per_s=50.0, updates_per_s=40.0)


@pytest.fixture
def store(tmp_path):
    s = CampaignStore(tmp_path / "campaign.db")
    s.put_config({"a": 1}, "cfgkey")
    yield s
    s.close()


def test_store_uses_wal_and_records_schema_version(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.get_meta("schema_version") == SCHEMA_VERSION == 5


def test_adding_the_same_units_again_keeps_their_state(store):
    units = make_units(2, 3, "cfg00000")
    assert store.add_units(units, "cfgkey") == 6
    store.mark_running(units[0].unit_id)
    store.mark_finished(units[0].unit_id, _result(units[0].unit_id), SUCCEEDED)
    assert store.add_units(units, "cfgkey") == 0
    assert store.unit(units[0].unit_id).state == SUCCEEDED
    assert store.counts() == {PENDING: 5, RUNNING: 0, SUCCEEDED: 1, FAILED: 0, GATED: 0}
    assert store.unit(units[1].unit_id).spec == units[1]


def test_attempts_retries_and_final_failure_keep_the_error(store):
    (unit,) = make_units(1, 1, "cfg00000")
    store.add_units([unit], "cfgkey")
    assert store.mark_running(unit.unit_id) == 1
    assert store.mark_attempt_failed(unit.unit_id, "ValueError: boom\ntrace", retry=True) == PENDING
    assert store.mark_running(unit.unit_id) == 2
    assert store.mark_attempt_failed(unit.unit_id, "ValueError: boom again", retry=False) == FAILED
    row = store.unit(unit.unit_id)
    assert (row.state, row.attempts, row.error) == (FAILED, 2, "ValueError: boom again")
    transitions = [(e.from_state, e.to_state, e.attempt) for e in store.events(unit_id=unit.unit_id)]
    assert transitions == [(None, PENDING, 0), (PENDING, RUNNING, 1), (RUNNING, PENDING, 1),
                           (PENDING, RUNNING, 2), (RUNNING, FAILED, 2)]


def test_an_attempt_lost_with_its_node_is_not_counted_and_its_lost_steps_add_up(store):
    (unit,) = make_units(1, 1, "cfg00000")
    store.add_units([unit], "cfgkey")
    store.mark_running(unit.unit_id)
    store.note_progress(unit.unit_id, 70, 50)
    assert store.mark_node_lost(unit.unit_id, "NodeDiedError: node1 died") == 20
    assert store.mark_running(unit.unit_id) == 1  # the lost attempt was not counted
    store.note_progress(unit.unit_id, 64, 60)
    assert store.mark_node_lost(unit.unit_id, "NodeDiedError: node2 died") == 4
    row = store.unit(unit.unit_id)
    assert (row.state, row.attempts, row.steps_lost, row.error) == (PENDING, 0, 24, "NodeDiedError: node2 died")
    lost = [e.detail for e in store.events(unit_id=unit.unit_id) if e.to_state == PENDING and e.from_state]
    assert lost == ["node lost, attempt not counted, 20 steps lost: NodeDiedError: node1 died",
                    "node lost, attempt not counted, 4 steps lost: NodeDiedError: node2 died"]


def test_impossible_transitions_are_refused(store):
    (unit,) = make_units(1, 1, "cfg00000")
    store.add_units([unit], "cfgkey")
    with pytest.raises(StoreError, match="expected running"):
        store.mark_finished(unit.unit_id, _result(unit.unit_id), SUCCEEDED)
    with pytest.raises(StoreError, match="no unit"):
        store.mark_running("nope")
    with pytest.raises(StoreError, match="unknown unit state"):
        store.set_state(unit.unit_id, "exploded")


def test_finished_unit_keeps_its_result_and_clears_the_error(store):
    (unit,) = make_units(1, 1, "cfg00000")
    store.add_units([unit], "cfgkey")
    store.mark_running(unit.unit_id)
    store.mark_attempt_failed(unit.unit_id, "RuntimeError: first", retry=True)
    store.mark_running(unit.unit_id)
    store.note_worker(unit.unit_id, "node7", "ray-node", 4242, "1234")
    store.note_progress(unit.unit_id, 80, 50)
    store.note_progress(unit.unit_id, 90, None)  # a report without a checkpoint keeps the last one
    assert (store.unit(unit.unit_id).step, store.unit(unit.unit_id).checkpoint_step) == (90, 50)
    store.mark_finished(unit.unit_id, _result(unit.unit_id, f1=0.4), GATED, report_seconds=0.01)
    row = store.unit(unit.unit_id)
    assert (row.state, row.f1, row.error, row.attempts) == (GATED, 0.4, None, 2)
    # once finished, the last checkpoint is the final one
    assert (row.hostname, row.pid, row.slurm_job_id, row.step, row.checkpoint_step) == ("node7", 4242, "1234", 90, 100)
    assert (row.report_seconds, row.seconds, row.shard_path) == (0.01, 2.0, "/lake/x.parquet")


def test_resume_transitions_requeue_interrupted_and_reset_failed(store):
    a, b, c = make_units(1, 3, "cfg00000")
    store.add_units([a, b, c], "cfgkey")
    store.mark_running(a.unit_id)                         # interrupted on its first attempt
    for _ in range(2):
        store.mark_running(b.unit_id)
        store.mark_attempt_failed(b.unit_id, "E", retry=True)
    store.mark_running(b.unit_id)
    store.mark_attempt_failed(b.unit_id, "E: last", retry=False)
    assert store.requeue_interrupted("driver gone") == 1
    assert (store.unit(a.unit_id).state, store.unit(a.unit_id).attempts) == (PENDING, 0)
    assert store.reset_failed("resume") == 1
    row = store.unit(b.unit_id)
    assert (row.state, row.attempts, row.error) == (PENDING, 0, "E: last")
    assert store.unit_ids(PENDING) == [a.unit_id, b.unit_id, c.unit_id]


def test_readonly_reader_sees_committed_state_and_cannot_write(store, tmp_path):
    units = make_units(1, 2, "cfg00000")
    store.add_units(units, "cfgkey")
    reader = CampaignStore(tmp_path / "campaign.db", readonly=True)
    store.mark_running(units[0].unit_id)  # the writer goes on while the reader is open
    assert reader.counts()[RUNNING] == 1
    with pytest.raises(sqlite3.OperationalError):
        reader.add_units(make_units(5, 1, "cfg11111"), "cfgkey")
    reader.close()
    with pytest.raises(StoreError, match="no campaign store"):
        CampaignStore(tmp_path / "elsewhere.db", readonly=True)


def test_stop_reasons_and_saved_steps_over_finished_units(store):
    units = make_units(1, 5, "cfg00000")
    store.add_units(units, "cfgkey")
    stops = [("target", 40, 100), ("plateau", 60, 100), ("cap", 150, 100), (None, None, None)]
    for unit, (reason, step, budget) in zip(units, stops):
        store.mark_running(unit.unit_id)
        result = _result(unit.unit_id).model_copy(update={"stop_reason": reason, "stop_step": step,
                                                          "budget_steps": budget, "steps": step or 10,
                                                          "eval_seconds": 0.5})
        store.mark_finished(unit.unit_id, result, SUCCEEDED)
    store.mark_running(units[4].unit_id)  # running units do not count
    row = store.unit(units[0].unit_id)
    assert (row.stop_reason, row.stop_step, row.budget_steps, row.eval_seconds) == ("target", 40, 100, 0.5)
    assert store.events(unit_id=units[0].unit_id)[-1].detail == "f1=0.9000 stop=target@40"
    b = store.budgets()
    assert b.reasons == {"target": 1, "plateau": 1, "cap": 1}
    # Units without a budget (the synthetic workload) are left out; the extension spends 50 more.
    assert (b.units, b.budget_steps, b.steps, b.saved_steps) == (3, 300, 250, 50)
    assert b.saved_fraction == pytest.approx(50 / 300) and b.eval_share == pytest.approx(0.5 / 2.0)


def _version_1_store(path) -> None:
    """A store as schema version 1 wrote it (no budget, pack, node-loss or fencing columns), with one finished unit."""
    new_columns = ("stop_reason", "stop_step", "budget_steps", "eval_seconds", "pack_id", "steps_lost", "attempt_token")
    lines = [line for line in SCHEMA.splitlines() if not line.strip().startswith(new_columns)]
    v1 = "\n".join(lines).replace("updated_at      REAL NOT NULL,", "updated_at      REAL NOT NULL")
    db = sqlite3.connect(path)
    db.executescript(v1)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    (unit,) = make_units(1, 1, "cfg00000")
    db.execute("INSERT INTO units (unit_id, song_hash, song_name, song_path, chunk_index, config_hash, split,"
               " spec_json, config_key, state, f1, steps, created_at, updated_at)"
               " VALUES (?, ?, ?, ?, 0, ?, 'train', ?, 'cfgkey', 'succeeded', 0.8, 100, 1.0, 1.0)",
               (unit.unit_id, unit.song_hash, unit.song_name, unit.song_path, unit.config_hash, unit.model_dump_json()))
    db.commit()
    db.close()


def test_a_version_1_store_is_read_as_is_and_migrated_when_opened_for_writing(tmp_path):
    path = tmp_path / "campaign.db"
    _version_1_store(path)
    with CampaignStore(path, readonly=True) as reader:  # e.g. status while an older driver runs
        [row] = reader.units()
        assert (row.f1, row.stop_reason, row.budget_steps) == (0.8, None, None)
        assert reader.budgets().units == 0
    with CampaignStore(path) as writer:
        assert writer.get_meta("schema_version") == SCHEMA_VERSION
        [row] = writer.units()
        assert (row.state, row.f1, row.steps, row.stop_reason) == (SUCCEEDED, 0.8, 100, None)
        (unit,) = make_units(1, 2, "cfg00000")[1:]
        writer.add_units([unit], "cfgkey")
        writer.mark_running(unit.unit_id)
        writer.mark_finished(unit.unit_id, _result(unit.unit_id).model_copy(
            update={"stop_reason": "plateau", "stop_step": 100, "budget_steps": 400}), SUCCEEDED)
    with CampaignStore(path) as again:  # migrating is done once
        assert again.unit(unit.unit_id).stop_reason == "plateau"
        assert again.budgets().saved_steps == 300
