"""A 3-node SLURM cluster for one test module: ``slurm/cluster.sh start --nodes 3`` in its own
state dir and ports, beside the single-node cluster, removed (namespaces, bridge, daemons) at
the end of the module.

Each node is a network namespace with its own address and hostname (node1..node3) running its
own slurmd; the head (the Ray head inside the campaign driver) runs on the host's side of the
bridge, at ``MultiNodeCluster.host_addr``. A driver started with ``MultiNodeCluster.env`` talks
to this cluster's slurmctld; its config needs ``ray.node_ip_address=<host_addr>`` (see
``MultiNodeCluster.overrides``) so that the nodes reach its Ray head.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from slurm_fixtures import CLUSTER_SH

NODES = 3


@dataclass
class MultiNodeCluster:
    state_dir: Path
    env: dict[str, str]  # os.environ with this cluster's PF_SLURM_* and SLURM_CONF, without RAY_ADDRESS
    host_addr: str  # the host's address on the bridge: where the head listens
    nodes: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (address, network namespace)

    @property
    def overrides(self) -> list[str]:
        """Config overrides every campaign on this cluster needs."""
        return [f"ray.node_ip_address={self.host_addr}", "ray.dashboard=false"]

    def script(self, *args: str, check: bool = True) -> str:
        out = subprocess.run([str(CLUSTER_SH), *args], env=self.env, capture_output=True, text=True, timeout=180)
        if check and out.returncode != 0:
            raise RuntimeError(f"cluster.sh {' '.join(args)}: {out.stderr[-3000:]}")
        return out.stdout

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of the node's namespace: its slurmd, Ray node and units (a crashed host)."""
        self.script("kill-node", name.removeprefix("node"))

    def heal(self) -> None:
        """Start again whatever a test killed (``start`` restarts dead slurmds, resumes DOWN nodes)."""
        self.script("start", "--nodes", str(NODES))

    def squeue(self) -> set[str]:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True, check=True)
        return set(out.stdout.split())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def multinode_cluster():
    """Three SLURM nodes in network namespaces, for one test module; removed afterwards."""
    if not Path("/usr/sbin/slurmctld").exists() or shutil.which("nsenter") is None or shutil.which("ip") is None:
        pytest.skip("needs SLURM (slurmctld, slurmd), iproute2 and util-linux (nsenter, unshare)")
    if os.geteuid() != 0:
        pytest.skip("network namespaces and the SLURM daemons need root")
    state_dir = Path(tempfile.mkdtemp(prefix="pf-mn-", dir="/tmp"))  # short: slurmd's socket paths live here
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PF_SLURM_DIR=str(state_dir), PF_SLURM_CTLD_PORT=str(_free_port()),
               # a crashed node is DOWN after 10 s rather than a minute
               PF_SLURM_SLURMD_TIMEOUT="10", SLURM_CONF=str(state_dir / "slurm.conf"))
    cluster = MultiNodeCluster(state_dir, env, host_addr="")
    try:
        cluster.script("start", "--nodes", str(NODES))
        cluster.host_addr = cluster.script("host-addr").strip()
        for line in cluster.script("nodes").splitlines():
            name, addr, netns = line.split()
            cluster.nodes[name] = (addr, netns)
        yield cluster
    finally:
        cluster.script("stop", check=False)
        shutil.rmtree(state_dir, ignore_errors=True)
