"""Campaigns with ``campaign.pack_size > 1`` on a real local Ray cluster (and the single-node
SLURM cluster): pending units go out in packs, one Ray task each; every member keeps its own
attempts, MLflow run and shard; a member that fails is retried alone. Also the logic around
them: which units share a pack, the pack's resources, pool sizing, status and dashboard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import configs
from dashboards.data import Unit, running_packs
from orchestrator import campaign
from orchestrator.campaign import _next_pack
from orchestrator.status import read_status, render
from orchestrator.store import RUNNING, SUCCEEDED, CampaignStore
from slurm.pools import units_per_job
from workers.lake import Lake
from workers.synthetic import make_units, read_attempts, read_checkpoint_step
from workers.units import live_worker_pid

SYNTHETIC = ["campaign.workload=synthetic", "campaign.synthetic.sleep_s=0.2", "campaign.synthetic.steps=2",
             "campaign.synthetic.episodes=1", "campaign.synthetic.steps_per_episode=4", "gate.f1_threshold=0.0",
             "mlflow.system_metrics=false", "mlflow.flush_interval_s=0.5"]


# --- logic -------------------------------------------------------------------------------
def test_pack_size_one_keeps_a_units_resources_and_packs_get_theirs():
    cfg = configs.load(overrides={"campaign.cpus_per_unit": 2, "campaign.gpus_per_unit": 0.25})
    assert cfg.campaign.pack_size == 1 and cfg.campaign.pack_resources() == (2, 0.25)
    packed = cfg.with_overrides({"campaign.pack_size": 8})
    assert packed.campaign.pack_resources() == (16, 1.0)  # one whole GPU; K x cpus_per_unit
    gpu_pool = configs.PoolConfig(partition="gpu", cpus_per_job=32, gpus_per_job=4, mem_gb=64, time_min=60,
                                  min_jobs=0, max_jobs=1)
    assert packed.campaign.pack_resources(gpu_pool) == (8, 1.0)  # one pack per GPU, the cores split
    half = packed.with_overrides({"campaign.gpus_per_pack": 0.5, "campaign.cpus_per_pack": 3})
    assert half.campaign.pack_resources(gpu_pool) == (3, 0.5)
    cpu_only = configs.load(overrides={"campaign.pack_size": 4})
    assert cpu_only.campaign.pack_resources() == (4, 0.0)


def test_a_slurm_gpu_job_runs_one_pack_per_gpu():
    cfg = configs.load(overrides={"campaign.gpus_per_unit": 0.25, "campaign.pack_size": 16,
                                  "slurm.pools": {"gpu": {"partition": "gpu", "cpus_per_job": 32, "gpus_per_job": 4,
                                                          "mem_gb": 64, "time_min": 60, "min_jobs": 0, "max_jobs": 2}}})
    assert units_per_job(cfg, "gpu") == 4 * 16
    alone = cfg.with_overrides({"campaign.pack_size": 1})
    assert units_per_job(alone, "gpu") == 16  # as before packs: 4 GPUs / 0.25


def test_units_of_one_config_and_overrides_share_a_pack_and_keep_their_places(tmp_path):
    units = make_units(1, 6, "cfg")
    odd = units[2].model_copy(update={"overrides": {"specialist.total_steps": 5}})
    with CampaignStore(tmp_path / "campaign.db") as store:
        store.put_config({"a": 1}, "k1")
        store.put_config({"a": 2}, "k2")
        store.add_units([units[0], units[1], odd, units[3]], "k1")
        store.add_units([units[4]], "k2")
        store.add_units([units[5]], "k1")
        store.mark_running(units[1].unit_id)  # no longer pending: skipped
        queue = deque(u.unit_id for u in (units[0], units[1], odd, units[3], units[4], units[5]))
        first = _next_pack(queue, store, 3)
        assert [r.unit_id for r in first] == [units[0].unit_id, units[3].unit_id, units[5].unit_id]
        assert list(queue) == [odd.unit_id, units[4].unit_id]  # the others keep their order
        assert [r.unit_id for r in _next_pack(queue, store, 3)] == [odd.unit_id]
        assert [r.unit_id for r in _next_pack(queue, store, 3)] == [units[4].unit_id]
        assert _next_pack(queue, store, 3) == [] and not queue


def test_status_and_dashboard_show_which_units_share_a_pack_and_its_steps_per_s(tmp_path):
    units = make_units(1, 3, "cfg")
    with CampaignStore(tmp_path / "campaign.db") as store:
        store.put_config({}, "k")
        store.add_units(units, "k")
        for u in units[:2]:
            store.mark_running(u.unit_id, "pack-7")
        store.mark_running(units[2].unit_id)
        store.note_worker(units[0].unit_id, "node-a", None, 1, None)
        store.note_progress(units[0].unit_id, 100, 50, 40.0)
        store.note_progress(units[1].unit_id, 90, 50, 35.5)
    status = read_status(tmp_path)
    assert status.packs == [{"pack_id": "pack-7", "units": sorted(u.unit_id for u in units[:2]), "hostname": "node-a",
                             "steps_per_s": 75.5, "started_at": status.packs[0]["started_at"]}]
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render(status))
    text = console.export_text()
    assert "pack-7" in text and "75.5" in text
    shown = [Unit(unit_id=u.unit_id, song_name="s", chunk_index=0, split="train", state=RUNNING, attempts=1, f1=None,
                  started_at=None, finished_at=None, seconds=None, node="n", error=None, mlflow_run_id=None,
                  shard_path=None, pack_id=p, steps_per_s=r) for u, p, r in zip(units, ["pack-1", "pack-1", None],
                                                                             [10.0, 12.0, 9.0])]
    assert running_packs(shown) == [{"pack_id": "pack-1", "units": [units[0].unit_id, units[1].unit_id],
                                     "node": "n", "steps_per_s": 22.0}]


def test_a_store_from_before_packs_gains_the_columns(tmp_path):
    import sqlite3

    with CampaignStore(tmp_path / "campaign.db") as store:
        store.put_config({}, "k")
        store.add_units(make_units(1, 1, "cfg"), "k")
    db = sqlite3.connect(tmp_path / "campaign.db")  # as schema 2 left it
    for column in ("pack_id", "steps_lost", "attempt_token"):  # the columns of schema 3 and later
        db.execute(f"ALTER TABLE units DROP COLUMN {column}")
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with CampaignStore(tmp_path / "campaign.db", readonly=True) as reader:  # a reader sees NULLs
        assert [r.pack_id for r in reader.units()] == [None]
    assert read_status(tmp_path).packs == []
    with CampaignStore(tmp_path / "campaign.db") as store:  # the driver adds them
        [row] = store.units()
        store.mark_running(row.unit_id, "pack-1")
        assert store.unit(row.unit_id).pack_id == "pack-1"


# --- on Ray ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_synthetic_campaign_in_packs_retries_a_failing_member_alone(ray_cluster, tmp_path):
    units = make_units(1, 4, "cfg")
    bad = units[1].unit_id
    cfg = configs.load(overrides=SYNTHETIC + ["campaign.pack_size=2", "campaign.cpus_per_unit=0.5",
                                              "campaign.pack_refill=false",  # packs as launched
                                              f"campaign.synthetic.fail_pattern={bad}",
                                              "campaign.synthetic.fail_first_attempts=1"])
    summary = campaign.submit(units, cfg, "packed", root=tmp_path)
    assert summary.counts[SUCCEEDED] == 4, summary.counts
    with CampaignStore(tmp_path / "packed" / "campaign.db", readonly=True) as store:
        rows = {r.unit_id: r for r in store.units()}
        events = [e for e in store.events() if e.kind == "state" and e.to_state == RUNNING]
    first = {e.unit_id: e.detail for e in events if e.attempt == 1}
    assert first[units[0].unit_id] == first[bad] == "pack pack-1"  # launched together
    assert first[units[2].unit_id] == first[units[3].unit_id] == "pack pack-2"
    assert rows[bad].attempts == 2 and all(rows[u.unit_id].attempts == 1 for u in units if u.unit_id != bad)
    assert rows[bad].pack_id == "pack-3"  # its retry went out in a pack of its own
    assert len(read_attempts(tmp_path / "packed" / "units" / units[0].unit_id)) == 1
    assert sorted(s.unit_id for s in Lake(tmp_path / "packed" / "lake").shards()) == sorted(u.unit_id for u in units)


@pytest.mark.slow
def test_a_packs_freed_slots_take_the_next_pending_units_of_its_config(ray_cluster, tmp_path):
    units = make_units(1, 5, "cfg")
    other = units[3].model_copy(update={"overrides": {"campaign.synthetic.steps": 3}})  # another pack's
    units = units[:3] + [other] + units[4:]
    # Room for one pack at a time: only refills can start units while pack-1 runs.
    cfg = configs.load(overrides=SYNTHETIC + ["campaign.pack_size=2", "campaign.cpus_per_unit=0.5",
                                              "campaign.max_concurrent_units=2"])
    summary = campaign.submit(units, cfg, "refilled", root=tmp_path)
    assert summary.counts[SUCCEEDED] == 5, summary.counts
    with CampaignStore(tmp_path / "refilled" / "campaign.db", readonly=True) as store:
        rows = {r.unit_id: r for r in store.units()}
        starts = [e.unit_id for e in store.events() if e.kind == "state" and e.to_state == RUNNING]
    packs = [rows[u.unit_id].pack_id for u in units]
    # Units 2 and 4 went into pack-1's freed slots; unit 3 (other overrides) waited for a pack of its own.
    assert packs == ["pack-1", "pack-1", "pack-1", "pack-2", "pack-1"], packs
    assert all(r.attempts == 1 for r in rows.values()) and len(starts) == 5
    assert starts.index(other.unit_id) == 4  # after pack-1 ended
    assert sorted(s.unit_id for s in Lake(tmp_path / "refilled" / "lake").shards()) == sorted(u.unit_id for u in units)
    # Each member's outcome was counted as it came, not when its pack ended: the first unit was
    # finished in the store before the last one to join pack-1 had started.
    assert rows[units[0].unit_id].finished_at < rows[units[4].unit_id].started_at


@pytest.mark.slow
def test_a_killed_refilled_pack_retries_only_the_units_it_held(ray_cluster, tmp_path):
    a, b, c = make_units(1, 3, "cfg")
    cfg = configs.load(overrides=SYNTHETIC + ["campaign.pack_size=2", "campaign.cpus_per_unit=0.5",
                                              "campaign.max_concurrent_units=2", "campaign.synthetic.sleep_s=3",
                                              "campaign.synthetic.steps=30"])  # 0.1 s a step, a checkpoint each
    c_dir = tmp_path / "killed" / "units" / c.unit_id
    result = {}
    driver = threading.Thread(target=lambda: result.update(s=campaign.submit([a, b, c], cfg, "killed", root=tmp_path)))
    driver.start()
    deadline = time.time() + 120
    while time.time() < deadline and (not (c_dir / "checkpoint.json").exists() or read_checkpoint_step(c_dir) < 5):
        time.sleep(0.05)
    killed_at = read_checkpoint_step(c_dir)
    assert killed_at >= 5
    os.kill(live_worker_pid(c_dir), signal.SIGKILL)  # the pack's process: c came in to refill a slot
    driver.join(timeout=180)
    assert result["s"].counts[SUCCEEDED] == 3, result["s"].counts
    with CampaignStore(tmp_path / "killed" / "campaign.db", readonly=True) as store:
        rows = {u.unit_id: store.unit(u.unit_id) for u in (a, b, c)}
        first = [e for e in store.events(unit_id=c.unit_id) if e.kind == "state" and e.to_state == RUNNING][0]
    assert first.detail == "pack pack-1"  # c joined pack-1 in a freed slot
    # a and b had finished (and were counted) before the kill: only c, which the pack held, is retried.
    assert rows[a.unit_id].attempts == rows[b.unit_id].attempts == 1 and rows[c.unit_id].attempts == 2
    starts = [x["start_step"] for x in read_attempts(c_dir)]
    assert starts[0] == 0 and starts[1] >= killed_at  # from its checkpoint, not from scratch
    assert sorted(s.unit_id for s in Lake(tmp_path / "killed" / "lake").shards()) == sorted(u.unit_id for u in (a, b, c))


@pytest.mark.slow
def test_a_specialist_campaign_in_packs_runs_end_to_end(ray_cluster, tmp_path):
    from orchestrator.manifest import demo_manifest, load_manifest

    cfg = configs.load(overrides=[
        "campaign.workload=specialist", "campaign.pack_size=2", "specialist.total_steps=40", "droq.warmup_steps=20",
        "droq.batch_size=16", "droq.hidden_dims=[32, 32]", "droq.replay_capacity=1000", "specialist.eval_interval=40",
        "specialist.checkpoint_interval=20", "specialist.log_interval=10", "specialist.rollouts=1",
        "env.chunk_steps=40", "mlflow.system_metrics=false",
    ])
    units = load_manifest(demo_manifest(tmp_path / "manifest"), cfg).units()[:3]
    summary = campaign.submit(units, cfg, "packed-specialists", root=tmp_path)
    assert summary.counts[SUCCEEDED] + summary.counts["gated"] == 3, summary.counts
    camp = tmp_path / "packed-specialists"
    with CampaignStore(camp / "campaign.db", readonly=True) as store:
        rows = [store.unit(u.unit_id) for u in units]
    assert [r.pack_id for r in rows] == ["pack-1", "pack-1", "pack-2"]
    assert all(r.steps == 40 and r.attempts == 1 and r.env_steps_per_s > 0 for r in rows)
    client = MlflowClient(summary.tracking_uri)
    assert len({r.mlflow_run_id for r in rows}) == 3  # each member its own run
    for r in rows:
        assert {"eval/f1", "rollout/f1", "train/critic_loss", "f1"} <= set(client.get_run(r.mlflow_run_id).data.metrics)
        assert Path(r.shard_path).exists()
    assert sorted(s.unit_id for s in Lake(camp / "lake").shards()) == sorted(u.unit_id for u in units)


SLURM_DRIVER = """
import sys
import configs
from orchestrator import campaign
from workers.synthetic import make_units

cfg = configs.load("slurm", overrides=[
    "campaign.workload=synthetic", "campaign.synthetic.sleep_s=0.5", "campaign.synthetic.steps=2",
    "campaign.synthetic.episodes=1", "campaign.synthetic.steps_per_episode=4", "gate.f1_threshold=0.0",
    "campaign.pack_size=2", "campaign.cpus_per_unit=0.5",
    "mlflow.system_metrics=false", "mlflow.flush_interval_s=0.5", "slurm.poll_interval_s=1",
    "slurm.pools.cpu.max_jobs=1", "slurm.pools.cpu.mem_gb=1", "slurm.pools.cpu.time_min=10",
])
units = make_units(2, 2, cfg.hash("env", "droq", "specialist"))
summary = campaign.submit(units, cfg, "packs-on-slurm", root=sys.argv[1], num_cpus=0)
print("COUNTS", summary.counts)
"""


@pytest.mark.slow
@pytest.mark.slurm
def test_a_campaign_in_packs_runs_in_slurm_pool_jobs(slurm_cluster, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the driver starts its own head
    out = subprocess.run([sys.executable, "-c", SLURM_DRIVER, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    with CampaignStore(tmp_path / "packs-on-slurm" / "campaign.db", readonly=True) as store:
        rows = list(store.units())
    assert len(rows) == 4 and all(r.state == SUCCEEDED for r in rows)
    assert sorted(r.pack_id for r in rows) == ["pack-1", "pack-1", "pack-2", "pack-2"]
    assert None not in {r.slurm_job_id for r in rows}
    by_pack = {}
    for r in rows:
        by_pack.setdefault(r.pack_id, set()).add((r.slurm_job_id, r.pid))
    assert all(len(where) == 1 for where in by_pack.values())  # a pack's members ran in one process
