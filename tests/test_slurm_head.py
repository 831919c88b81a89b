"""The campaign head as a SLURM job: head.sbatch starts a Ray head, the driver next to it
starts pool jobs (start_for_campaign), and a unit-like task runs inside a pool job."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm.head import render_head_sbatch


pytestmark = [pytest.mark.slurm, pytest.mark.slow]

DRIVER = """
import os, time, ray, configs
from slurm import pools
ray.init()  # RAY_ADDRESS from slurm.head
cfg = configs.load("slurm", overrides={"slurm.pools.cpu.cpus_per_job": 1, "slurm.pools.cpu.mem_gb": 1,
                                       "slurm.pools.cpu.max_jobs": 1, "slurm.pools.cpu.time_min": 10})
cfg = cfg.with_overrides({"slurm.pools": {"cpu": cfg.slurm.pools["cpu"].model_dump()}})  # no GPU pool here
manager = pools.start_for_campaign(cfg, ray.get_runtime_context().gcs_address, os.environ["LOG_DIR"])

@ray.remote(num_cpus=1, resources=pools.unit_resources("cpu"))
def unit():
    return os.environ["SLURM_JOB_ID"]

ref = unit.remote()
while not ray.wait([ref], timeout=1.0)[0]:
    manager.reconcile({"cpu": 1}, {})
print("HEAD_JOB", os.environ["SLURM_JOB_ID"], "UNIT_JOB", ray.get(ref), "POOL_JOBS", [j.job_id for j in manager.jobs()])
for _ in range(60):  # drained: the pool node goes once Ray sees it idle
    manager.reconcile({}, {"cpu": 0})
    if not manager.jobs():
        break
    time.sleep(0.5)
print("AFTER_DRAIN", [j.job_id for j in manager.jobs()])
manager.shutdown()
"""


def test_head_sbatch_runs_driver_whose_pool_job_runs_units(slurm_cluster, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    script = tmp_path / "head.sbatch"
    script.write_text(render_head_sbatch([sys.executable, str(driver)], token_file=str(tmp_path / "token"),
                                         log_dir=str(tmp_path), cpus=1, mem_gb=2, time_min=10))
    head_job = subprocess.run(["sbatch", "--parsable", f"--export=ALL,LOG_DIR={tmp_path / 'pools'}", str(script)],
                              capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]).stdout.strip()
    out = tmp_path / f"head-{head_job}.out"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if head_job not in subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split():
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", head_job])
        pytest.fail(f"head job still running:\n{out.read_text() if out.exists() else ''}")
    text = out.read_text()
    line = next((x for x in text.splitlines() if x.startswith("HEAD_JOB")), None)
    assert line, text[-4000:]
    _, head_id, _, unit_job, _, pool_jobs = line.split(" ", 5)
    assert head_id == head_job
    assert unit_job != head_job and unit_job in pool_jobs
    assert "AFTER_DRAIN []" in text
    assert oct((tmp_path / "token").stat().st_mode & 0o777) == "0o600"
