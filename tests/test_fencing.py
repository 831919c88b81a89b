"""Fencing: of two attempts of a unit, only the one the driver trusts now commits. A stale
attempt in another process has its checkpoint, shard and result refused with a clear message
while the newer attempt's files stay; in a real pack each member is fenced alone (the shard
committed in an environment worker process too); a campaign records each attempt's token and
its driver ignores a stale attempt's outcome."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch

import configs
from orchestrator import campaign
from orchestrator.scheduler import Outcome
from orchestrator.store import SUCCEEDED, CampaignStore
from workers import fencing
from workers.fencing import Fence, StaleAttempt
from workers.lake import Lake, ShardMeta, synthetic_episode
from workers.rl import checkpoints
from workers.rl.specialist import CHECKPOINT, read_result, write_result
from workers.synthetic import make_units

UNIT = make_units(1, 1, "cfg00000")[0]


@pytest.fixture(autouse=True)
def no_fences_left():
    yield
    fencing._held.clear()  # fences this process held for a test's units


def _attempt(fence: Fence, lake_root: str, go, out) -> None:
    """One attempt of ``UNIT`` in its own process: once ``go`` is set, try each commit the unit
    makes (checkpoint, lake shard, result.json) and report what became of each."""
    fencing.hold(fence)
    go.wait(60)
    unit_dir, tag = Path(fence.unit_dir), f"token {fence.token}"
    meta = ShardMeta(unit_id=UNIT.unit_id, song_hash=UNIT.song_hash, song_name=UNIT.song_name, chunk_index=0,
                     split="train", config_hash=UNIT.config_hash, specialist_f1=fence.token / 10)
    writes = {
        "checkpoint": lambda: checkpoints.save({"by": tag}, unit_dir / CHECKPOINT, unit_id=UNIT.unit_id),
        "shard": lambda: Lake(lake_root).commit_shard(meta, [synthetic_episode(4, seed=fence.token)]).commit_id,
        "result": lambda: write_result(unit_dir, {"unit_id": UNIT.unit_id, "by": tag}),
    }
    done = {}
    for what, write in writes.items():
        try:
            done[what] = ("written", write())
        except StaleAttempt as e:
            done[what] = ("refused", str(e))
    out.put(done)


def test_a_stale_attempts_commits_are_refused_and_the_newer_attempts_kept(tmp_path):
    ctx = mp.get_context("fork")  # the attempts start at once (no torch import)
    unit_dir, lake_root = tmp_path / "units" / UNIT.unit_id, tmp_path / "lake"
    out = ctx.Queue()
    old_go, new_go = ctx.Event(), ctx.Event()
    old = ctx.Process(target=_attempt, args=(fencing.issue(unit_dir, UNIT.unit_id), str(lake_root), old_go, out))
    old.start()  # launched, then cut off: the driver declares it dead and launches a newer attempt
    newer_fence = fencing.issue(unit_dir, UNIT.unit_id, after=1)
    assert newer_fence.token == 2 and fencing.read_token(unit_dir) == 2
    newer = ctx.Process(target=_attempt, args=(newer_fence, str(lake_root), new_go, out))
    newer.start()
    new_go.set()
    newer_done = out.get(timeout=120)
    old_go.set()  # the old attempt goes on and tries to commit after the newer one did
    old_done = out.get(timeout=120)
    for p in (old, newer):
        p.join(60)
        assert p.exitcode == 0  # a refused write is an exception the attempt handles, not a crash

    assert {what: status for what, (status, _) in newer_done.items()} == dict.fromkeys(newer_done, "written")
    assert {what: status for what, (status, _) in old_done.items()} == dict.fromkeys(old_done, "refused")
    for what, (_, message) in old_done.items():
        assert f"unit {UNIT.unit_id}: " in message and "refused" in message
        assert "(token 1," in message and "trusts attempt token 2" in message
    # What the trusted attempt wrote is what is on disk, whole.
    assert torch.load(unit_dir / CHECKPOINT, weights_only=True) == {"by": "token 2"}
    assert not checkpoints.previous_path(unit_dir / CHECKPOINT).exists()  # the stale save moved nothing aside
    assert read_result(unit_dir) == {"unit_id": UNIT.unit_id, "by": "token 2"}
    [shard] = Lake(lake_root).shards()
    assert shard.commit_id == newer_done["shard"][1] and shard.specialist_f1 == pytest.approx(0.2)
    assert Lake(lake_root).shard_problem(shard, full=True) is None
    leftovers = [p.name for p in [*unit_dir.iterdir(), *lake_root.rglob("*")] if ".tmp-" in p.name]
    assert leftovers == []
    refusals = (unit_dir / fencing.REFUSALS_LOG).read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in refusals] == [message for _, message in old_done.values()]


def test_a_unit_without_a_fence_is_not_checked_and_a_missing_token_refuses_a_fenced_one(tmp_path):
    checkpoints.save({"step": 1}, tmp_path / CHECKPOINT, unit_id=UNIT.unit_id)  # run by hand: no fence held
    fencing.hold(Fence(UNIT.unit_id, str(tmp_path), 1))  # fenced, but no token file: no attempt is trusted
    with pytest.raises(StaleAttempt, match="the driver now trusts no attempt"):
        checkpoints.save({"step": 2}, tmp_path / CHECKPOINT, unit_id=UNIT.unit_id)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True) == {"step": 1}


@pytest.mark.slow
def test_each_member_of_a_real_pack_is_fenced_alone(tmp_path):
    from test_specialist import TINY, tiny_unit

    from workers.rl.pack import train_pack

    cfg = configs.load(overrides={**TINY, "droq.warmup_steps": 20, "specialist.total_steps": 40,
                                  "specialist.eval_interval": 40, "specialist.checkpoint_interval": 20,
                                  "specialist.log_interval": 20, "specialist.rollouts": 2})
    stale = tiny_unit(cfg, 1)  # goes stale after its last checkpoint: the shard of its rollouts is refused
    trusted = tiny_unit(cfg, 2)
    units = [stale, trusted]
    dirs = [tmp_path / u.unit_id for u in units]
    for unit, unit_dir in zip(units, dirs):
        fencing.hold(fencing.issue(unit_dir, unit.unit_id))

    def driver_moves_on(unit, unit_dir):
        def report(metrics):
            if metrics.get("checkpoint_step") == 40:  # the driver launched a newer attempt meanwhile
                fencing.issue(unit_dir, unit.unit_id, after=1)
        return report

    # The rollouts are played (and their shard committed) in the environment worker process.
    stale_outcome, trusted_outcome = train_pack(units, cfg, dirs, tmp_path / "lake",
                                                [driver_moves_on(stale, dirs[0]), None], env_workers=1)
    assert "StaleAttempt" in stale_outcome.error_text
    assert f"unit {stale.unit_id}: shard commit to {tmp_path / 'lake'} refused" in stale_outcome.error_text
    assert "trusts attempt token 2" in stale_outcome.error_text
    assert trusted_outcome.error is None and trusted_outcome.result.shard_path

    lake = Lake(tmp_path / "lake", cfg.lake)
    assert [s.unit_id for s in lake.shards()] == [trusted.unit_id]
    assert not [p for p in (tmp_path / "lake").rglob("*") if ".tmp-" in p.name]
    assert read_result(dirs[0]) is None and read_result(dirs[1])["done"]
    # The checkpoint written while the attempt was trusted stays (with its replay: not the finished unit's).
    assert "replay" in checkpoints.load(dirs[0] / CHECKPOINT).state


FAST = ["campaign.workload=synthetic", "campaign.synthetic.sleep_s=0.2", "campaign.synthetic.steps=4",
        "campaign.synthetic.episodes=1", "campaign.synthetic.steps_per_episode=4", "gate.f1_threshold=0.0",
        "mlflow.system_metrics=false", "mlflow.flush_interval_s=0.5"]


@pytest.mark.slow
def test_a_campaign_records_each_attempts_token_and_ignores_a_stale_outcome(ray_cluster, tmp_path, caplog):
    cfg = configs.load(overrides=FAST + ["campaign.pack_size=2", "campaign.cpus_per_unit=0.5",
                                         "campaign.synthetic.fail_pattern='*c001*'",
                                         "campaign.synthetic.fail_first_attempts=1"])
    units = make_units(2, 2, cfg.hash("env", "droq", "specialist"))
    summary = campaign.submit(units, cfg, "fenced", root=tmp_path)
    assert summary.counts[SUCCEEDED] == 4
    paths = campaign.CampaignPaths.of(tmp_path, "fenced")
    with CampaignStore(paths.db) as store:
        tokens = {r.unit_id: r.attempt_token for r in store.units()}
        # One token per attempt, in the store and in the unit directory alike; the retried units took a second.
        assert tokens == {u.unit_id: fencing.read_token(paths.unit_dir(u.unit_id)) for u in units}
        assert sorted(tokens.values()) == [1, 1, 2, 2]
        assert sorted(s.unit_id for s in Lake(paths.lake).shards()) == sorted(tokens)

        # The first attempt of a retried unit reports again, late (e.g. from behind a partition): nothing changes.
        retried = next(u for u, t in tokens.items() if t == 2)
        before = store.unit(retried)
        driver = campaign._Driver(paths, store, cfg, None)
        with caplog.at_level(logging.WARNING, logger="orchestrator.campaign"):
            driver._finish(Outcome(retried, None, "lost node", "system", token=1))
            driver._finish(Outcome(retried, {"unit_id": retried, "f1": 0.0}, None, None, token=1))
        assert store.unit(retried) == before
        assert caplog.text.count(f"unit {retried}: outcome of a stale attempt (token 1; the driver trusts token 2)") == 2
    events = [json.loads(line) for line in (paths.unit_dir(retried) / "attempts.jsonl").read_text().splitlines()]
    assert len(events) == 2


def test_an_attempt_ending_removes_only_its_own_pid_file(tmp_path):
    from workers.units import PID_FILE, clear_pid_file, live_worker_pid, write_pid_file

    write_pid_file(tmp_path, UNIT.unit_id)
    assert live_worker_pid(tmp_path, UNIT.unit_id) == os.getpid()
    newer = {"pid": 1, "unit_id": UNIT.unit_id, "started": 1, "host": "node2"}  # a newer attempt on another host
    (tmp_path / PID_FILE).write_text(json.dumps(newer))
    clear_pid_file(tmp_path)  # the stale attempt here ends
    assert json.loads((tmp_path / PID_FILE).read_text()) == newer
    assert live_worker_pid(tmp_path, UNIT.unit_id) is None  # not a process of this host
