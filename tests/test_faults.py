"""Faults a campaign must survive that are not a unit's own: stale pid files, a full disk."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

import configs
from orchestrator import cli
from orchestrator.cli import app
from orchestrator.store import FAILED, SUCCEEDED, CampaignStore
from workers.lake import Lake
from workers.synthetic import make_units, run_unit
from workers.units import PID_FILE, live_worker_pid

SYNTHETIC = ["campaign.workload=synthetic", "campaign.synthetic.steps=4", "campaign.synthetic.episodes=1",
             "campaign.synthetic.steps_per_episode=4"]


def test_a_finished_units_pid_file_does_not_name_the_process_running_another_unit(tmp_path):
    """One process (as a Ray worker does) runs unit A, then unit B: A's pid file must not name it."""
    first, second = make_units(1, 2, "cfg00000")
    cfg = configs.load(overrides=SYNTHETIC + ["campaign.synthetic.sleep_s=0.0"])
    a_dir, b_dir = tmp_path / first.unit_id, tmp_path / second.unit_id
    run_unit(first, cfg, a_dir, tmp_path / "lake")

    slow = cfg.with_overrides(["campaign.synthetic.sleep_s=3.0"])
    runner = threading.Thread(target=run_unit, args=(second, slow, b_dir, tmp_path / "lake"))
    runner.start()
    deadline = time.time() + 30
    while not (b_dir / PID_FILE).exists() and time.time() < deadline:
        time.sleep(0.02)
    assert live_worker_pid(b_dir) == os.getpid()  # B runs in this process now
    assert live_worker_pid(a_dir) is None and not (a_dir / PID_FILE).exists()  # A is over
    runner.join()
    assert live_worker_pid(b_dir) is None


def test_a_pid_file_left_by_a_dead_worker_names_no_process(tmp_path):
    unit_dir = tmp_path / "u1"
    unit_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (unit_dir / PID_FILE).write_text(json.dumps({"pid": int(dead.stdout), "unit_id": "u1", "started": 1}))
    assert live_worker_pid(unit_dir) is None
    # This process is alive, but it is not the process that wrote the file (another start time).
    (unit_dir / PID_FILE).write_text(json.dumps({"pid": os.getpid(), "unit_id": "u1", "started": 1}))
    assert live_worker_pid(unit_dir) is None
    (unit_dir / PID_FILE).write_text(str(os.getpid()))  # the old bare-pid form carries no proof
    assert live_worker_pid(unit_dir) is None


@pytest.fixture
def small_disk(tmp_path):
    """A 15 MB tmpfs of its own, mounted for the test and unmounted after it."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=15m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip() or done.returncode}); "
                    "the disk-full test needs a small file system of its own")
    yield mnt
    subprocess.run(["umount", "--lazy", str(mnt)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_the_campaign_cleanly_without_burning_attempts_and_resume_continues(ray_cluster, small_disk):
    # 8 units of ~3 MB shards (four random 1000-step episodes each) cannot fit in 15 MB.
    sets = SYNTHETIC + ["campaign.synthetic.sleep_s=0.1", "campaign.synthetic.steps_per_episode=1000",
                        "campaign.synthetic.episodes=4", "campaign.max_attempts=2", "gate.f1_threshold=0.0",
                        "mlflow.system_metrics=false", "mlflow.flush_interval_s=0.5"]
    cfg = configs.load(overrides=sets)
    units = make_units(4, 2, cfg.hash("env", "droq", "specialist"))
    with pytest.MonkeyPatch.context() as mp:  # submit's CLI path, with synthetic units instead of a manifest
        mp.setattr(cli, "_manifest_or_exit", lambda path, cfg: _Loaded(units))
        manifest = small_disk.parent / "full.yaml"
        manifest.write_text("songs: []\n")
        out = CliRunner().invoke(app, ["submit", str(manifest), "--root", str(small_disk), *[f"--set={s}" for s in sets]])
    assert out.exit_code == 4, out.output
    assert f"error: disk full: no space left on device at {small_disk}" in out.output
    assert f"`pianoforge resume full --root {small_disk}` continues" in out.output and "Traceback" not in out.output
    assert "driver: running" not in out.output  # the driver stopped, whether or not the full disk let it record so
    db = small_disk / "full" / "campaign.db"
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"  # never half-written
    with CampaignStore(db, readonly=True) as store:
        counts = store.counts()
        assert counts[FAILED] == 0 and counts[SUCCEEDED] < len(units), counts  # stopped, nobody blamed
        assert all(r.attempts <= 1 for r in store.units())

    subprocess.run(["mount", "-o", "remount,size=300m", str(small_disk)], check=True)  # space freed
    again = CliRunner().invoke(app, ["resume", "full", "--root", str(small_disk)])
    assert again.exit_code == 0, again.output
    with CampaignStore(db, readonly=True) as store:
        assert store.counts()[SUCCEEDED] == len(units)
        assert [r.attempts for r in store.units()] == [1] * len(units)  # the full disk cost no attempt
    lake = Lake(small_disk / "full" / "lake", cfg.lake)
    assert sorted(s.unit_id for s in lake.shards()) == sorted(u.unit_id for u in units)
    for shard in lake.shards():
        assert len(lake.read_episodes(shard)) == 4  # every shard complete


class _Loaded:
    """A stand-in for a loaded manifest holding synthetic units."""

    def __init__(self, units):
        self._units, self.songs, self.errors = units, units, []

    def units(self):
        return self._units


@pytest.mark.slow
def test_rollouts_a_worker_plays_onto_a_full_disk_fail_as_the_nodes_fault_and_record_again_later(tmp_path, small_disk):
    from configs.files import disk_full
    from test_specialist import TINY, tiny_unit
    from workers.rl.pack import train_pack
    from workers.rl.specialist import load_checkpoint, read_result

    cfg = configs.load(overrides={**TINY, "specialist.total_steps": 100, "specialist.rollouts": 6})
    units = [tiny_unit(cfg, chunk) for chunk in (1, 2)]
    dirs = [tmp_path / u.unit_id for u in units]  # unit directories on the roomy disk, the lake on the full one
    lake_root = small_disk / "lake"
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # leave ~64 kB: less than one 60-step episode of the shard
        f.write(b"\0" * (os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize - 64 * 1024))
    outcomes = train_pack(units, cfg, dirs, lake_root, env_workers=2)
    for o in outcomes:
        assert o.result is None and disk_full(o.error) is not None, o.error_text  # recognised without a path hint
        assert "an episode it played raised" in o.error_text
    assert not [p for p in lake_root.rglob("*.parquet")]  # nothing half-written stays, hidden or not
    assert all(read_result(d) is None and "replay" in load_checkpoint(d) for d in dirs)

    filler.unlink()  # space freed: the units record their rollouts, without training again
    outcomes = train_pack(units, cfg, dirs, lake_root, env_workers=2)
    assert [o.error_text for o in outcomes] == [None, None]
    assert [read_result(d)["steps_this_run"] for d in dirs] == [0, 0]
    assert sorted(s.unit_id for s in Lake(lake_root, cfg.lake).shards()) == sorted(u.unit_id for u in units)
