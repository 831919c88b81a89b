"""How fast pool jobs follow the queue on the single-node SLURM cluster (slurm/cluster.sh).

    .venv/bin/python tests/benchmarks/bench_slurm.py [--rounds 3]

Prints, per round: submit -> RUNNING in squeue, submit -> a task ran on the new Ray node,
scancel -> replacement RUNNING, and the cost of one reconcile() call (one squeue).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import configs  # noqa: E402
from slurm import pools, raynode  # noqa: E402
from slurm.head import ensure_token_file  # noqa: E402

TASK = """
import os, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print(ray.get(ray.remote(num_cpus=1, resources={"pool:cpu": 1})(lambda: os.environ["SLURM_JOB_ID"]).remote()))
"""


def wait_running(manager, old=None):
    while True:
        manager.reconcile({"cpu": 1}, {})
        running = [j for j in manager.jobs() if j.state == "RUNNING" and j.job_id != old]
        if running:
            return running[0]
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    subprocess.run([str(Path(__file__).resolve().parents[2] / "slurm" / "cluster.sh"), "start"], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="pf-bench-"))
    token = ensure_token_file(tmp / "token")
    port = raynode._free_ports(1)[0]
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    ray = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(raynode.head_start_command(port, "/tmp/pf-hbench", raynode.pick_ports(str(port)), ray=ray),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    from ray.util import get_node_ip_address

    address = f"{get_node_ip_address()}:{port}"
    base = configs.load("slurm").slurm.model_dump()
    cfg = configs.SlurmConfig(**{**base, "quick_end_s": 0, "pools": {"cpu": dict(
        partition="debug", cpus_per_job=1, gpus_per_job=0, mem_gb=1, time_min=10, min_jobs=0, max_jobs=1)}})
    rows = []
    try:
        for _ in range(args.rounds):
            manager = pools.PoolManager(cfg, address, tmp / "logs", auth_token_file=str(token), idle_jobs=lambda: None)
            t0 = time.perf_counter()
            job = wait_running(manager)
            t_running = time.perf_counter() - t0
            subprocess.run([sys.executable, "-c", TASK, address], env=env, check=True, capture_output=True)
            t_task = time.perf_counter() - t0
            t1 = time.perf_counter()
            subprocess.run(["scancel", job.job_id], check=True)
            wait_running(manager, old=job.job_id)
            t_replace = time.perf_counter() - t1
            t2 = time.perf_counter()
            for _ in range(10):
                manager.reconcile({"cpu": 1}, {})
            t_reconcile = (time.perf_counter() - t2) / 10
            manager.shutdown()
            rows.append((t_running, t_task, t_replace, t_reconcile))
    finally:
        raynode.stop_process(head, timeout=60)
        shutil.rmtree("/tmp/pf-hbench", ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'round':>5} {'submit->RUNNING s':>18} {'submit->task done s':>20} {'scancel->replaced s':>20} {'reconcile ms':>13}")
    for i, (a, b, c, d) in enumerate(rows):
        print(f"{i:>5} {a:>18.2f} {b:>20.2f} {c:>20.2f} {d * 1000:>13.1f}")
    med = [statistics.median(col) for col in zip(*rows)]
    print(f"{'med':>5} {med[0]:>18.2f} {med[1]:>20.2f} {med[2]:>20.2f} {med[3] * 1000:>13.1f}")


if __name__ == "__main__":
    main()
