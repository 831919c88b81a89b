"""A whole campaign with --profile slurm on the single-node SLURM cluster: the driver's Ray head
has no CPUs, so every unit runs inside a pool job that the driver submitted; when the campaign
ends no pool job is left. A pool job cancelled (``scancel``) mid-unit is replaced, and the unit
it ran is retried from its checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import configs
from orchestrator.store import SUCCEEDED, CampaignStore
from workers.lake import Lake
from workers.synthetic import read_checkpoint_step
from workers.units import read_attempts

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

DRIVER = """
import sys
import configs
from orchestrator import campaign
from workers.synthetic import make_units

cfg = configs.load("slurm", overrides=[
    "campaign.workload=synthetic", "campaign.synthetic.sleep_s=0.5", "campaign.synthetic.steps=2",
    "campaign.synthetic.episodes=1", "campaign.synthetic.steps_per_episode=4", "gate.f1_threshold=0.0",
    "mlflow.system_metrics=false", "mlflow.flush_interval_s=0.5", "slurm.poll_interval_s=1",
    "slurm.pools.cpu.max_jobs=2", "slurm.pools.cpu.mem_gb=1", "slurm.pools.cpu.time_min=10",
])
units = make_units(2, 2, cfg.hash("env", "droq", "specialist"))
summary = campaign.submit(units, cfg, "on-slurm", root=sys.argv[1], num_cpus=0)
print("COUNTS", summary.counts)
"""


def test_campaign_with_slurm_profile_runs_units_in_pool_jobs(slurm_cluster, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the driver starts its own head
    out = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    with CampaignStore(tmp_path / "on-slurm" / "campaign.db", readonly=True) as store:
        rows = list(store.units())
    assert len(rows) == 4 and all(r.state == SUCCEEDED for r in rows)
    job_ids = {r.slurm_job_id for r in rows}
    assert None not in job_ids and len(job_ids) <= 2  # at most max_jobs pool jobs ran them
    submitted = {p.name for p in (tmp_path / "on-slurm" / "logs" / "slurm" / "cpu").iterdir() if p.name.isdigit()}
    assert job_ids <= submitted
    events = (tmp_path / "on-slurm" / "logs" / "slurm" / "pools.log").read_text()
    assert all(f"submitted job {j}" in events for j in submitted)
    queue = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()
    assert not set(queue) & submitted  # the driver cancelled its pool jobs on the way out


KILL_DRIVER = """
import sys
import configs
from orchestrator import campaign
from workers.synthetic import make_units

cfg = configs.load("slurm", overrides=sys.argv[2:])
units = make_units(1, 3, cfg.hash("env", "droq", "specialist"))
summary = campaign.submit(units, cfg, "scancelled", root=sys.argv[1], num_cpus=0)
print("COUNTS", summary.counts)
"""

# Three units of ~8 s (one checkpoint a second) on at most two 1-CPU pool jobs: while the first
# two run, the third waits, so the pool stays at two jobs and a cancelled one must be replaced.
# One attempt per unit: the cancelled job's attempt must not use it up.
KILL_OVERRIDES = [
    "campaign.workload=synthetic", "campaign.synthetic.sleep_s=8", "campaign.synthetic.steps=8",
    "campaign.synthetic.checkpoint_every=1", "campaign.synthetic.episodes=1",
    "campaign.synthetic.steps_per_episode=4", "campaign.max_attempts=1", "gate.f1_threshold=0.0",
    "mlflow.system_metrics=false", "mlflow.flush_interval_s=0.5", "slurm.poll_interval_s=1",
    "slurm.pools.cpu.max_jobs=2", "slurm.pools.cpu.mem_gb=1", "slurm.pools.cpu.time_min=10",
]


def _running_unit_with_checkpoint(camp_dir, submitted: set[str]):
    """(unit_id, slurm job id, checkpoint step) of a unit running in one of ``submitted``'s
    pool jobs with a checkpoint past step 0, else None."""
    db = camp_dir / "campaign.db"
    if not db.exists():
        return None
    try:
        with CampaignStore(db, readonly=True) as store:
            rows = list(store.units(["running"]))
    except Exception:  # the driver is still creating the store
        return None
    for r in rows:
        if r.slurm_job_id in submitted:
            step = read_checkpoint_step(camp_dir / "units" / r.unit_id)
            if 1 <= step <= 5:  # well before its end, so the cancel lands mid-unit
                return r.unit_id, r.slurm_job_id, step
    return None


def _submitted_jobs(camp_dir) -> set[str]:
    folder = camp_dir / "logs" / "slurm" / "cpu"
    return {p.name for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()


def test_scancel_of_a_pool_job_mid_unit_resumes_the_unit_from_its_checkpoint(slurm_cluster, tmp_path):
    camp_dir = tmp_path / "scancelled"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Output to a file, not a pipe: nothing reads a pipe while the test watches the campaign.
    output = tmp_path / "driver.out"
    with open(output, "w") as out_file:
        driver = subprocess.Popen([sys.executable, "-c", KILL_DRIVER, str(tmp_path), *KILL_OVERRIDES], env=env,
                                  stdout=out_file, stderr=subprocess.STDOUT)
    try:
        victim = None
        deadline = time.monotonic() + 180
        while victim is None and driver.poll() is None and time.monotonic() < deadline:
            victim = _running_unit_with_checkpoint(camp_dir, _submitted_jobs(camp_dir))
            time.sleep(0.2)
        assert victim is not None, "no unit ran inside a pool job:\n" + output.read_text()[-5000:]
        unit_id, cancelled_job, step_at_cancel = victim
        subprocess.run(["scancel", cancelled_job], check=True)

        driver.wait(timeout=240)
    finally:
        if driver.poll() is None:  # a failed assertion above: stop the driver, which cancels its jobs
            driver.send_signal(signal.SIGINT)
            try:
                driver.wait(timeout=90)
            except subprocess.TimeoutExpired:
                driver.kill()
            leftover = _submitted_jobs(camp_dir)
            if leftover:
                subprocess.run(["scancel", *leftover], check=False)
    assert driver.returncode == 0, output.read_text()[-8000:]

    with CampaignStore(camp_dir / "campaign.db", readonly=True) as store:
        rows = {r.unit_id: r for r in store.units()}
    assert len(rows) == 3 and all(r.state == SUCCEEDED for r in rows.values()), {u: r.state for u, r in rows.items()}
    victim_row = rows[unit_id]
    # A lost pool job is the node's fault: with max_attempts = 1 the unit is still retried, and
    # the lost attempt is not counted; the store says how many steps past its checkpoint it lost.
    assert victim_row.attempts == 1
    assert victim_row.steps_lost is not None and victim_row.steps_lost >= 0
    with CampaignStore(camp_dir / "campaign.db", readonly=True) as store:
        assert any("node lost, attempt not counted" in (e.detail or "") for e in store.events(unit_id=unit_id))
    assert victim_row.slurm_job_id is not None and victim_row.slurm_job_id != cancelled_job

    # The retry resumed from the checkpoint the cancelled attempt left behind, not from step 0.
    attempts = read_attempts(camp_dir / "units" / unit_id)
    assert len(attempts) >= 2 and attempts[0]["start_step"] == 0
    assert attempts[-1]["start_step"] >= step_at_cancel > 0

    # The manager saw the job end and submitted a replacement after that.
    submitted = _submitted_jobs(camp_dir)
    events = (camp_dir / "logs" / "slurm" / "pools.log").read_text().splitlines()
    ended_at = next(i for i, line in enumerate(events) if f"job {cancelled_job} ended" in line)
    replacements = [line for line in events[ended_at + 1:] if "submitted job" in line]
    assert replacements, "\n".join(events)
    assert victim_row.slurm_job_id in submitted

    # Exactly one lake shard per unit: the cancelled attempt committed nothing, the retry once.
    cfg = configs.load("slurm", overrides=KILL_OVERRIDES)
    shards = Lake(camp_dir / "lake", cfg.lake).shards()
    assert sorted(s.unit_id for s in shards) == sorted(rows)
    data_files = sorted(str(f.resolve()) for f in (camp_dir / "lake").rglob("*.parquet"))
    assert data_files == sorted(str(Path(s.path).resolve()) for s in shards)  # no stray or duplicate shard files

    queue = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()
    assert not set(queue) & submitted  # no pool job outlives the driver


IL_DRIVER = """
import sys
import configs
from orchestrator import campaign
from workers.synthetic import make_units

cfg = configs.load("slurm", overrides=sys.argv[2:])
units = make_units(2, 1, cfg.hash("env", "droq", "specialist"))
summary = campaign.submit(units, cfg, "il-on-slurm", root=sys.argv[1], num_cpus=0)
print("COUNTS", summary.counts)
"""


def test_gate_opened_on_slurm_gets_pool_jobs_for_its_imitation_workers(slurm_cluster, tmp_path):
    """The head has no CPUs and, once the units are done, the queue asks for no job: the pools
    must still provision the imitation job's DDP worker, or it waits forever."""
    from il_fixtures import TINY_IL

    overrides = [
        "campaign.workload=synthetic", "campaign.synthetic.sleep_s=0.2", "campaign.synthetic.steps=2",
        "campaign.synthetic.episodes=2", "campaign.synthetic.steps_per_episode=12", "gate.f1_threshold=0.0",
        "gate.min_shards=2", "gate.launch=after_campaign", "il.num_workers=1", *TINY_IL,
        "mlflow.system_metrics=false", "mlflow.flush_interval_s=0.5", "slurm.poll_interval_s=1",
        "slurm.pools.cpu.max_jobs=2", "slurm.pools.cpu.time_min=10",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    camp_dir, output = tmp_path / "il-on-slurm", tmp_path / "driver.out"
    with open(output, "w") as out_file:
        driver = subprocess.Popen([sys.executable, "-c", IL_DRIVER, str(tmp_path), *overrides], env=env,
                                  stdout=out_file, stderr=subprocess.STDOUT)
    try:
        driver.wait(timeout=400)
    except subprocess.TimeoutExpired:  # the imitation job never got a worker: stop the driver cleanly
        driver.send_signal(signal.SIGINT)
        try:
            driver.wait(timeout=90)
        except subprocess.TimeoutExpired:
            driver.kill()
        if leftover := _submitted_jobs(camp_dir):
            subprocess.run(["scancel", *leftover], check=False)
    assert driver.returncode == 0, output.read_text()[-8000:]
    with CampaignStore(camp_dir / "campaign.db", readonly=True) as store:
        launches = store.get_meta("il_launches")
        rows = list(store.units())
    assert [r.state for r in rows] == [SUCCEEDED] * 2
    assert len(launches) == 1 and launches[0]["state"] == "succeeded" and launches[0]["steps"] == 6, launches
    assert (camp_dir / "il" / "flow" / "launch-1" / "policy.pt").exists()
    queue = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()
    assert not set(queue) & _submitted_jobs(camp_dir)
