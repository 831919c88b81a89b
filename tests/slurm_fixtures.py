"""The single-node SLURM cluster for tests: ``slurm/cluster.sh`` started when not running.

CI starts it before pytest (``slurm/cluster.sh start``); with plain ``pytest`` this fixture
starts it and stops it again at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CLUSTER_SH = Path(__file__).resolve().parents[1] / "slurm" / "cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    """The single-node SLURM cluster; started here (and stopped afterwards) when not running."""
    if shutil.which("slurmctld") is None and not Path("/usr/sbin/slurmctld").exists():
        pytest.skip("SLURM is not installed (apt-get install munge slurmctld slurmd slurm-client)")
    if os.geteuid() != 0:
        pytest.skip("slurm/cluster.sh needs root to start munged/slurmctld/slurmd")
    conf_line = subprocess.run([str(CLUSTER_SH), "env"], capture_output=True, text=True, check=True).stdout
    os.environ.setdefault("SLURM_CONF", conf_line.strip().split("=", 1)[1])
    running = subprocess.run([str(CLUSTER_SH), "status"], capture_output=True).returncode == 0
    if not running:
        subprocess.run([str(CLUSTER_SH), "start"], check=True, timeout=120)
    yield
    if not running:
        subprocess.run([str(CLUSTER_SH), "stop"], check=False, timeout=120)
