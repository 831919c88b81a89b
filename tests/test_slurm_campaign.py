"""A whole campaign with --profile slurm on the single-node SLURM cluster: the driver's Ray head
has no CPUs, so every unit runs inside a pool job that the driver submitted; when the campaign
ends no pool job is left."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from orchestrator.store import SUCCEEDED, CampaignStore
from slurm_fixtures import slurm_cluster  # noqa: F401  (session fixture)

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


def test_campaign_with_slurm_profile_runs_units_in_pool_jobs(slurm_cluster, tmp_path):  # noqa: F811
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
