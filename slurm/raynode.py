"""What a pool job runs on its SLURM node: a Ray worker node that joins the campaign's head.

``run_worker_node(spec)`` is the plain function a pool submits with submitit. It turns the
SLURM allocation into explicit ``ray start`` flags and blocks until the node stops
(scancel, time limit, preemption, or the head going away). The pitfalls it handles:

- Resources come from the allocation, never from what Ray sees on the machine: ``--num-cpus``
  from SLURM_CPUS_PER_TASK / SLURM_CPUS_ON_NODE, ``--num-gpus`` from the gres allocation
  (SLURM's CUDA_VISIBLE_DEVICES is kept, so Ray hands out exactly the GPUs SLURM gave the job;
  a job without GPUs hides the node's GPUs from its workers).
- Ray's Unix socket paths must stay under ~107 bytes: the temp dir is short,
  ``<slurm.ray_tmp_root>/pf-<jobid>``, and is removed when the node stops.
- Several jobs can share a node: every port Ray opens is chosen free per job, and each job
  gets its own block of worker ports.
- The node joins only the campaign's head: the head address is explicit and token auth stays
  on (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH names the head's token file).
- The node announces the address it reaches the head from (``--node-ip-address``): the
  source address of the route to the head, not whatever Ray's guess through a default route
  gives (on a cluster network, or a node with several interfaces, that guess is unreachable).
- Units find their SLURM job id in ``SLURM_JOB_ID`` (Ray workers inherit the node's
  environment) and in the node labels ``slurm-job-id`` / ``pianoforge-pool``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from configs.files import write_text_atomic

# Each pool node offers this much of its pool resource; a unit asks for 1, so CPUs and GPUs,
# not the pool resource, limit how many units a node runs.
POOL_RESOURCE_AMOUNT = 1000
POOL_LABEL = "pianoforge-pool"
JOB_LABEL = "slurm-job-id"

# Linux caps a Unix socket path at 107 bytes; Ray appends this much to its temp dir.
_SOCKET_SUFFIX = "/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store"
MAX_TEMP_DIR_LEN = 107 - len(_SOCKET_SUFFIX)

# Worker ports: disjoint blocks below the kernel's ephemeral range (32768+), one per job.
_WORKER_PORT_LOW, _WORKER_PORT_HIGH, _WORKER_PORT_BLOCK = 10002, 32767, 512


def pool_resource(pool: str) -> str:
    """Name of the custom Ray resource every node of ``pool`` offers (e.g. ``pool:cpu``)."""
    return f"pool:{pool}"


def node_temp_dir(ray_tmp_root: str, job_id: str) -> str:
    return os.path.join(ray_tmp_root, f"pf-{job_id}")


def check_temp_root(ray_tmp_root: str) -> None:
    """Raise if Ray's socket paths under this root could pass the 107-byte limit."""
    longest = node_temp_dir(ray_tmp_root, "4294967295_4294967295")
    if len(longest) > MAX_TEMP_DIR_LEN:
        raise ValueError(
            f"slurm.ray_tmp_root '{ray_tmp_root}' is too long: Ray's socket paths under "
            f"'{longest}' would pass the 107-byte Unix socket limit; use a short path such as /tmp"
        )


@dataclass(frozen=True)
class RayNodeSpec:
    """Everything a pool job needs to join the head; pickled by submitit."""

    pool: str
    head_address: str  # host:port of the head's GCS
    ray_tmp_root: str
    auth_token_file: str | None  # None: the head runs without token auth
    object_store_fraction: float = 0.3  # of the job's memory, like Ray's default of the machine's
    mem_gb: float | None = None


@dataclass(frozen=True)
class NodePorts:
    node_manager: int
    object_manager: int
    metrics_export: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    runtime_env_agent: int
    min_worker: int
    max_worker: int


def allocated_cpus(env: Mapping[str, str]) -> int:
    """CPUs SLURM gave this task (not the machine's count: jobs share nodes)."""
    for key in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        value = env.get(key, "").split("(")[0]  # e.g. "2(x3)" in some SLURM variables
        if value.strip().isdigit():
            return int(value)
    raise RuntimeError("neither SLURM_CPUS_PER_TASK nor SLURM_CPUS_ON_NODE is set: not inside a SLURM job?")


def allocated_gpus(env: Mapping[str, str]) -> tuple[int, str]:
    """(number of GPUs SLURM gave this job, the CUDA_VISIBLE_DEVICES the node must keep).

    Only SLURM's own variables count: a CUDA_VISIBLE_DEVICES exported from the submitting
    shell says nothing about this allocation.
    """
    slurm_ids = env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS") or ""
    on_node = env.get("SLURM_GPUS_ON_NODE", "")
    count = int(on_node) if on_node.isdigit() else len([x for x in slurm_ids.split(",") if x.strip()])
    if count == 0:
        return 0, ""
    # SLURM sets CUDA_VISIBLE_DEVICES for a gres allocation (renumbered when a device cgroup
    # hides the other GPUs); keep it as is so Ray hands out exactly these devices.
    visible = env.get("CUDA_VISIBLE_DEVICES") or slurm_ids
    ids = [x.strip() for x in visible.split(",") if x.strip()]
    return min(count, len(ids)), ",".join(ids[:count])


def _free_ports(n: int) -> list[int]:
    # Hold all sockets until every port is chosen, so the n ports differ.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def pick_ports(job_id: str) -> NodePorts:
    """Free ports for one Ray node, so jobs sharing a SLURM node never collide."""
    n_blocks = (_WORKER_PORT_HIGH - _WORKER_PORT_LOW + 1) // _WORKER_PORT_BLOCK
    first = int("".join(c for c in job_id if c.isdigit()) or 0) % n_blocks
    for i in range(n_blocks):
        low = _WORKER_PORT_LOW + ((first + i) % n_blocks) * _WORKER_PORT_BLOCK
        block = range(low, low + _WORKER_PORT_BLOCK)
        if _port_free(block[0]) and _port_free(block[-1]) and all(_port_free(p) for p in block[1:-1]):
            break
    else:
        raise RuntimeError(f"no free block of {_WORKER_PORT_BLOCK} worker ports in {_WORKER_PORT_LOW}-{_WORKER_PORT_HIGH}")
    return NodePorts(*_free_ports(6), min_worker=block[0], max_worker=block[-1])


def port_flags(ports: NodePorts) -> list[str]:
    """``ray start`` flags that pin every port the node opens."""
    return [
        f"--node-manager-port={ports.node_manager}",
        f"--object-manager-port={ports.object_manager}",
        f"--metrics-export-port={ports.metrics_export}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent_listen}",
        f"--dashboard-agent-grpc-port={ports.dashboard_agent_grpc}",
        f"--runtime-env-agent-port={ports.runtime_env_agent}",
        f"--min-worker-port={ports.min_worker}",
        f"--max-worker-port={ports.max_worker}",
    ]


def address_towards(head_address: str) -> str:
    """This host's IP address on the route to ``head_address`` (host:port): what the head and the
    other nodes can reach it at. No packet is sent (a UDP socket's connect only picks a route)."""
    host, _, port = head_address.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, int(port or 1)))
        except OSError as e:
            raise RuntimeError(f"no route from {socket.gethostname()} to the Ray head at {head_address}: {e}") from e
        return s.getsockname()[0]


def ray_start_command(spec: RayNodeSpec, env: Mapping[str, str], ports: NodePorts, ray: str = "ray",
                      node_ip: str | None = None) -> list[str]:
    """The ``ray start`` command line for this allocation (pure: easy to check)."""
    job_id = env.get("SLURM_JOB_ID", "")
    num_gpus, _ = allocated_gpus(env)
    cmd = [
        ray, "start", "--block",
        f"--address={spec.head_address}",
        *([f"--node-ip-address={node_ip}"] if node_ip else []),
        f"--num-cpus={allocated_cpus(env)}",
        f"--num-gpus={num_gpus}",
        f'--resources={{"{pool_resource(spec.pool)}": {POOL_RESOURCE_AMOUNT}}}',
        f"--labels={JOB_LABEL}={job_id},{POOL_LABEL}={spec.pool}",
        f"--temp-dir={node_temp_dir(spec.ray_tmp_root, job_id)}",
        *port_flags(ports),
        "--disable-usage-stats",
    ]
    if spec.mem_gb:
        # Ray would otherwise offer the whole machine's memory to this job's tasks.
        mem = int(spec.mem_gb * 1e9)
        cmd += [f"--memory={int(mem * (1 - spec.object_store_fraction))}",
                f"--object-store-memory={int(mem * spec.object_store_fraction)}"]
    return cmd


def head_start_command(port: int, temp_dir: str, ports: NodePorts, num_cpus: int = 0, ray: str = "ray",
                       dashboard: tuple[str, int] | None = None, node_ip: str | None = None) -> list[str]:
    """``ray start --head`` for a campaign head on a login node or in a SLURM job.

    ``num_cpus=0`` by default: units run on pool nodes, not next to the driver. ``dashboard``:
    (host, port) of Ray's dashboard (loopback by default in the config), or None for none.
    """
    dashboard_flags = ["--include-dashboard=false"] if dashboard is None else [
        "--include-dashboard=true", f"--dashboard-host={dashboard[0]}", f"--dashboard-port={dashboard[1]}"]
    return [
        ray, "start", "--head", "--block",
        f"--port={port}",
        *([f"--node-ip-address={node_ip}"] if node_ip else []),
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        *port_flags(ports),
        *dashboard_flags,
        "--disable-usage-stats",
    ]


def interface_of(address: str) -> str | None:
    """The name of the network interface that holds ``address`` (None: none here)."""
    import psutil

    return next((name for name, addrs in psutil.net_if_addrs().items()
                 if any(a.family == socket.AF_INET and a.address == address for a in addrs)), None)


def ray_node_env(spec: RayNodeSpec, env: Mapping[str, str], node_ip: str | None = None) -> dict[str, str]:
    """The environment of ``ray start``: the job's, plus auth and GPU visibility, and (given the
    node's address) the interface DDP's gloo binds to: gloo otherwise takes the address its host
    name resolves to, which may be a loopback one or none."""
    out = dict(env)
    if node_ip and not env.get("GLOO_SOCKET_IFNAME") and (ifname := interface_of(node_ip)):
        out["GLOO_SOCKET_IFNAME"] = ifname
    _, visible = allocated_gpus(env)
    out["CUDA_VISIBLE_DEVICES"] = visible  # "" hides a shared node's GPUs from CPU-only jobs
    out.pop("RAY_ADDRESS", None)  # the head address is explicit
    out.pop("RAY_AUTH_TOKEN", None)  # the token file is the one source of the token
    if spec.auth_token_file:
        out["RAY_AUTH_MODE"] = "token"
        out["RAY_AUTH_TOKEN_PATH"] = spec.auth_token_file
    else:
        out["RAY_AUTH_MODE"] = "disabled"
    return out


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (Ray drains and stops its processes), then SIGKILL to the group after ``timeout``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        # A process that leads its own group (start_new_session) takes its children with it.
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        proc.wait()


def write_private(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, readable by its owner only (mode 0600)."""
    return write_text_atomic(path, text, permissions=0o600)


def run_worker_node(spec: RayNodeSpec) -> int:
    """Join the head as a Ray worker node with this job's resources; block until it stops.

    Returns ``ray start``'s exit status when the node stopped by itself; raises when it failed.
    """
    env = dict(os.environ)
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        raise RuntimeError("SLURM_JOB_ID is not set: run_worker_node runs inside a SLURM job")
    check_temp_root(spec.ray_tmp_root)
    ray = str(Path(sys.executable).with_name("ray"))
    if not Path(ray).exists():
        ray = shutil.which("ray") or "ray"
    node_ip = address_towards(spec.head_address)
    cmd = ray_start_command(spec, env, pick_ports(job_id), ray=ray, node_ip=node_ip)
    print("[pianoforge] " + " ".join(cmd), flush=True)
    temp_dir = node_temp_dir(spec.ray_tmp_root, job_id)
    proc = subprocess.Popen(cmd, env=ray_node_env(spec, env, node_ip))
    stopping = []

    def on_sigterm(signum, frame):  # scancel / node shutdown: a normal end for a pool job
        stopping.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        code = proc.wait()
    finally:
        # Reached also when submitit raises from its timeout handler: stop Ray before the job ends.
        stop_process(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
    if code != 0 and not stopping and code != -signal.SIGTERM:
        raise RuntimeError(f"ray start exited with status {code} (job {job_id}, pool {spec.pool})")
    return code
