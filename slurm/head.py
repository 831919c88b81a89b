"""The campaign's Ray head, on a login node or inside a SLURM job (templates/head.sbatch).

``python -m slurm.head [--token-file F] -- COMMAND...`` starts ``ray start --head`` with a short
temp dir, free ports and token auth, runs COMMAND with ``RAY_ADDRESS``, ``RAY_AUTH_MODE`` and
``RAY_AUTH_TOKEN_PATH`` set (so ``ray.init()`` in it connects to this head, and pool jobs get
the same token file), and stops the head when COMMAND ends. The exit status is COMMAND's.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import configs
from slurm.raynode import _free_ports, _port_free, check_temp_root, head_start_command, pick_ports, stop_process, write_private

TEMPLATES = Path(__file__).resolve().parent / "templates"


def ensure_token_file(path: str | Path) -> Path:
    """The head's auth token file, created (mode 0600, 256 random bits) when absent."""
    path = Path(path).expanduser()
    if not path.exists():
        write_private(path, secrets.token_hex(32))
    return path


def _wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start --head exited with status {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the Ray head did not listen on {host}:{port} within {timeout:.0f} s")


def run_with_head(command: list[str], token_file: str | Path, slurm_cfg: configs.SlurmConfig,
                  ray_cfg: configs.RayConfig | None = None) -> int:
    """Start a Ray head, run ``command`` against it, stop the head; returns the command's status."""
    check_temp_root(slurm_cfg.ray_tmp_root)
    token_file = ensure_token_file(token_file)
    port = slurm_cfg.head_port or _free_ports(1)[0]
    tag = os.environ.get("SLURM_JOB_ID") or str(os.getpid())
    temp_dir = os.path.join(slurm_cfg.ray_tmp_root, f"pf-h{tag}")
    from ray.util import get_node_ip_address

    ray_cfg = ray_cfg or configs.load().ray
    # The address other nodes reach, not a loopback alias of the hostname.
    host = ray_cfg.node_ip_address or get_node_ip_address()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    env.pop("RAY_AUTH_TOKEN", None)
    ray = str(Path(sys.executable).with_name("ray"))
    dashboard = None
    if ray_cfg.dashboard:  # a taken port (another head on this node) would stop `ray start`: take a free one
        dashboard_port = ray_cfg.dashboard_port if ray_cfg.dashboard_port and _port_free(ray_cfg.dashboard_port) \
            else _free_ports(1)[0]
        dashboard = (ray_cfg.dashboard_host, dashboard_port)
    head = subprocess.Popen(head_start_command(port, temp_dir, pick_ports(tag), ray=ray if Path(ray).exists() else "ray",
                                               dashboard=dashboard, node_ip=host), env=env, start_new_session=True)
    try:
        _wait_for_port(host, port, head)
        address = f"{host}:{port}"
        print(f"[pianoforge] Ray head at {address} (token {token_file}, temp dir {temp_dir})", flush=True)
        if dashboard:
            print(f"[pianoforge] Ray dashboard on {socket.gethostname()} at http://{dashboard[0]}:{dashboard[1]}; from "
                  f"your machine: ssh -L {dashboard[1]}:{dashboard[0]}:{dashboard[1]} -J <login node> "
                  f"{socket.gethostname()}, then open http://localhost:{dashboard[1]}", flush=True)
        return subprocess.call(command, env=dict(env, RAY_ADDRESS=address))
    finally:
        stop_process(head, timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def render_head_sbatch(command: list[str], *, token_file: str, log_dir: str, job_name: str = "pianoforge-head",
                       partition: str | None = None, cpus: int = 2, mem_gb: float = 8, time_min: int = 1440,
                       profile: str = "slurm") -> str:
    """The sbatch script (from templates/head.sbatch) that runs ``command`` next to a Ray head."""
    import shlex

    text = (TEMPLATES / "head.sbatch").read_text()
    values = {
        "job_name": job_name,
        "partition_line": f"#SBATCH --partition={partition}" if partition else "# default partition",
        "cpus": str(cpus),
        "mem_mb": str(int(mem_gb * 1024)),
        "time_min": str(time_min),
        "log_dir": log_dir,
        "python": shlex.quote(sys.executable),
        "workdir": shlex.quote(str(Path.cwd())),
        "profile": shlex.quote(profile),
        "token_file": shlex.quote(token_file),
        "command": shlex.join(command),
    }
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.head", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--token-file", default=str(Path.home() / ".ray" / "auth_token"))
    parser.add_argument("--profile", default="slurm")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run next to the head after --")
    cfg = configs.load(profile=args.profile, overrides=args.overrides)
    return run_with_head(command, args.token_file, cfg.slurm, cfg.ray)


if __name__ == "__main__":
    sys.exit(main())
