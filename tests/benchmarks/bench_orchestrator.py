"""Orchestration overhead at scale: a synthetic campaign next to bare Ray tasks doing the same work.

    .venv/bin/python tests/benchmarks/bench_orchestrator.py --units 2000 10000 --sleep 0.05

For each size in ``--units``, both sides run ``workers.synthetic.run_unit`` (sleep, checkpoint
counter, one small lake shard) on the same local Ray cluster (``--cpus`` CPUs, one per unit).
The bare side submits every task at once and waits; the campaign side is
``orchestrator.campaign.submit`` with its store, retries bookkeeping, MLflow child runs through
the MetricsSink, and bounded concurrency. The gate never launches imitation learning
(``gate.launch=never``): an imitation job would compete with the units for the CPUs, and the
measurement would be that contention, not orchestration.

Printed per size, then as one table: wall time and overhead per unit over bare Ray (with and
without the fixed costs of a campaign, measured as a resubmit that runs nothing), the driver's
peak RSS, ``status`` latency (``read_status()`` and the ``pianoforge status`` process) and the
dashboard's ``/api/summary`` latency (in process and over HTTP) on the finished campaign.
Latencies are the median of ``--repeat`` calls. Units are generated
(``workers.synthetic.make_units``), not read from MIDI files.

    .venv/bin/python tests/benchmarks/bench_orchestrator.py --nodes 1,3 --units 300 --sleep 0.2   # as root

Across hosts: the Ray head (no CPUs) in this process on the host's side of a ``slurm/cluster.sh
start --nodes 3`` bridge, and Ray worker nodes in 1 or 3 of its network namespaces, holding
``--slots`` CPUs in all (1 node x 3 CPUs, or 3 nodes x 1 CPU). Per node count: bare Ray and the
campaign's units/s and overhead per unit, and the bytes per unit that crossed the bridge (each
node's eth0 counters: node -> head carries results and metrics, head -> node the tasks), and the
lake bytes per unit that the nodes wrote to the shared file system.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import psutil
import ray

import configs
from dashboards.app import DashboardServer
from dashboards.data import Campaign, summary
from orchestrator import campaign
from orchestrator.status import read_status
from slurm.raynode import _free_ports
from workers.synthetic import make_units, run_unit


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak`` in MiB."""

    def __init__(self, interval: float = 0.05):
        self.proc, self.interval, self.peak = psutil.Process(), interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def median_s(fn: Callable[[], object], repeat: int) -> float:
    """Median wall seconds of ``repeat`` calls of ``fn``."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bare_ray(units, cfg, root: Path) -> float:
    """The same work as plain Ray tasks: no store, no tracking, no retries."""
    task = ray.remote(num_cpus=cfg.campaign.cpus_per_unit)(
        lambda u, c, d, lake: run_unit(u, c, Path(d), Path(lake)).f1)
    cfg_ref = ray.put(cfg)
    t0 = time.perf_counter()
    ray.get([task.remote(u, cfg_ref, str(root / "units" / u.unit_id), str(root / "lake")) for u in units])
    return time.perf_counter() - t0


def bench_config(sleep_s: float, extra: list[str] | tuple[str, ...] = ()) -> configs.Config:
    """The benchmark's campaign: synthetic units of ``sleep_s`` each, all succeeding, and a gate
    that never launches imitation learning (it would take the units' CPUs)."""
    return configs.load(overrides=[
        "campaign.workload=synthetic", f"campaign.synthetic.sleep_s={sleep_s}", "campaign.synthetic.steps=5",
        "campaign.synthetic.episodes=1", "campaign.synthetic.steps_per_episode=2", "gate.f1_threshold=0.0",
        "gate.launch=never", "mlflow.system_metrics=false", *extra,
    ])


def bench_size(n_units: int, cfg: configs.Config, root: Path, repeat: int) -> dict[str, float]:
    """Bare Ray, then the campaign, then status and dashboard latencies, for ``n_units`` units."""
    chunks = 5
    units = make_units(max(1, -(-n_units // chunks)), chunks, cfg.hash("env", "droq", "specialist"))[:n_units]
    n, name = len(units), f"bench-{n_units}"
    print(f"\n== {n} units ==")
    bare_s = bare_ray(units, cfg, root / f"bare-{n_units}")
    print(f"bare Ray tasks        : {bare_s:8.1f} s   {bare_s / n * 1000:7.1f} ms/unit")

    rss_samples: list[tuple[int, float]] = []  # (finished units, RSS MiB): is the driver's memory flat?

    def on_progress(counts: dict[str, int]) -> None:
        done = counts["succeeded"]
        if done % max(1, n // 8) == 0:
            rss_samples.append((done, round(psutil.Process().memory_info().rss / 2**20, 1)))

    rss_before = psutil.Process().memory_info().rss / 2**20
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        result = campaign.submit(units, cfg, name, root=root, on_progress=on_progress)
        camp_s = time.perf_counter() - t0
    assert result.counts["succeeded"] == n, result.counts
    assert result.imitation is None  # gate.launch=never: nothing but units ran
    t0 = time.perf_counter()
    again = campaign.submit(units, cfg, name, root=root)  # same units again: only the fixed costs
    fixed_s = time.perf_counter() - t0
    assert again.attempts_run == 0
    print(f"campaign (submit)     : {camp_s:8.1f} s   {camp_s / n * 1000:7.1f} ms/unit")
    print(f"  fixed costs         : {fixed_s:8.1f} s   (sink actor, MLflow store, parent run: a resubmit that runs nothing)")
    print(f"orchestration overhead: {(camp_s - bare_s) / n * 1000:8.1f} ms/unit over bare Ray, "
          f"{(camp_s - fixed_s - bare_s) / n * 1000:.1f} ms/unit without the fixed costs")
    print(f"driver RSS            : {rss_before:8.1f} MiB before, {rss.peak:.1f} MiB peak during the campaign; "
          f"(finished, MiB): {rss_samples}")
    print(f"worker logging share  : {result.logging_overhead:8.3%} of worker time (report callback / unit time)")
    print(f"sink                  : {result.sink_stats}")

    camp_dir = root / name
    status_lib = median_s(lambda: read_status(camp_dir), repeat)
    status_cli = median_s(lambda: subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "status", name, "--root", str(root)],
        check=True, capture_output=True, env={**os.environ, "COLUMNS": "120"}), repeat)
    print(f"status                : {status_lib * 1000:8.1f} ms read_status(), {status_cli:.2f} s `pianoforge status` "
          "(process start included)")

    # The dashboard's first summary reads every lake shard once (per-shard key counts, then cached)
    # and opens MLflow; the page's polls after it are the warm ones.
    dash = Campaign(camp_dir)
    summary_first = median_s(lambda: summary(dash.snapshot(full=False), dash.dash), 1)
    summary_lib = median_s(lambda: summary(dash.snapshot(full=False), dash.dash), repeat)
    with DashboardServer(dash, port=0) as url:
        summary_http = median_s(lambda: json.loads(urllib.request.urlopen(url + "api/summary", timeout=120).read()),
                                repeat)
    print(f"dashboard /api/summary: {summary_first:8.2f} s first, then {summary_lib * 1000:.1f} ms in process, "
          f"{summary_http * 1000:.1f} ms over HTTP")
    return {"units": n, "bare_s": bare_s, "campaign_s": camp_s, "fixed_s": fixed_s,
            "overhead_ms": (camp_s - bare_s) / n * 1000, "overhead_no_fixed_ms": (camp_s - fixed_s - bare_s) / n * 1000,
            "rss_before_mib": rss_before, "rss_peak_mib": rss.peak, "status_ms": status_lib * 1000,
            "status_cli_s": status_cli, "summary_first_s": summary_first, "summary_ms": summary_lib * 1000, "summary_http_ms": summary_http * 1000}


# --- across hosts: Ray worker nodes in the namespaces of slurm/cluster.sh start --nodes 3 ----------

CLUSTER_SH = Path(__file__).resolve().parents[2] / "slurm" / "cluster.sh"


def eth0_bytes(netns: str) -> tuple[int, int]:
    """(bytes sent, bytes received) by a node's eth0, from inside its namespace."""
    stats = json.loads(subprocess.run(["ip", "-n", netns, "-j", "-s", "link", "show", "eth0"], capture_output=True,
                                      text=True, check=True).stdout)[0]["stats64"]
    return stats["tx"]["bytes"], stats["rx"]["bytes"]


def start_ray_nodes(nodes: list[tuple[str, str, str]], cpus: int, head: str, state_dir: Path) -> list[subprocess.Popen]:
    """One Ray worker node per (name, address, netns), joined to ``head``; returns their ``ray start`` processes."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    procs = []
    for name, addr, netns in nodes:
        cmd = ["nsenter", f"--net=/run/netns/{netns}", f"--uts={state_dir}/ns/{name}.uts", ray_bin, "start", "--block",
               f"--address={head}", f"--node-ip-address={addr}", f"--num-cpus={cpus}", "--object-store-memory=200000000",
               f"--temp-dir=/tmp/pf-bn-{name}", "--disable-usage-stats"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 120
    while sum(1 for n in ray.nodes() if n["Alive"]) < len(nodes) + 1:
        if time.monotonic() > deadline:
            raise RuntimeError("the Ray worker nodes did not join the head within 120 s")
        time.sleep(0.5)
    return procs


def bench_nodes(n_nodes: int, nodes: list[tuple[str, str, str]], n_units: int, slots: int, cfg: configs.Config,
                root: Path, state_dir: Path) -> dict[str, float]:
    """Bare Ray and the campaign on ``n_nodes`` namespace nodes of ``slots // n_nodes`` CPUs each."""
    used = nodes[:n_nodes]
    procs = start_ray_nodes(used, slots // n_nodes, ray.get_runtime_context().gcs_address, state_dir)
    try:
        units = make_units(max(1, -(-n_units // 5)), 5, cfg.hash("env", "droq", "specialist"))[:n_units]
        row: dict[str, float] = {"nodes": n_nodes, "units": len(units)}
        # Warm-up: Ray's worker processes start and fetch the task's code once per node; not per unit.
        warm = make_units(1, 2 * slots, cfg.hash("env", "droq", "specialist"), split="eval")
        bare_ray(warm, cfg, root / f"warm-n{n_nodes}")
        for side in ("bare", "campaign"):
            before = [eth0_bytes(ns) for _, _, ns in used]
            t0 = time.perf_counter()
            if side == "bare":
                bare_ray(units, cfg, root / f"bare-n{n_nodes}")
            else:
                result = campaign.submit(units, cfg, f"nodes-{n_nodes}", root=root)
                assert result.counts["succeeded"] == len(units), result.counts
            row[f"{side}_s"] = time.perf_counter() - t0
            after = [eth0_bytes(ns) for _, _, ns in used]
            row[f"{side}_up"] = sum(a[0] - b[0] for a, b in zip(after, before)) / len(units)
            row[f"{side}_down"] = sum(a[1] - b[1] for a, b in zip(after, before)) / len(units)
        lake = root / f"nodes-{n_nodes}" / "lake"
        row["lake_bytes"] = sum(f.stat().st_size for f in lake.rglob("*") if f.is_file()) / len(units)
        print(f"{n_nodes} node(s): bare {len(units) / row['bare_s']:.1f} units/s, campaign "
              f"{len(units) / row['campaign_s']:.1f} units/s; bytes/unit node->head {row['bare_up']:.0f} bare, "
              f"{row['campaign_up']:.0f} campaign; head->node {row['bare_down']:.0f} bare, {row['campaign_down']:.0f} campaign; "
              f"lake {row['lake_bytes']:.0f} B/unit", flush=True)
        return row
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        for name, _, _ in used:
            shutil.rmtree(f"/tmp/pf-bn-{name}", ignore_errors=True)


def main_nodes(args) -> None:
    counts = [int(x) for x in args.nodes.split(",")]
    state_dir = Path(tempfile.mkdtemp(prefix="pf-bn-", dir="/tmp"))
    env = {**os.environ, "PF_SLURM_DIR": str(state_dir), "PF_SLURM_CTLD_PORT": str(_free_ports(1)[0])}

    def script(*a: str) -> str:
        return subprocess.run([str(CLUSTER_SH), *a], env=env, capture_output=True, text=True, check=True).stdout

    script("start", "--nodes", str(max(counts)))
    try:
        host = script("host-addr").strip()
        nodes = [tuple(line.split()) for line in script("nodes").splitlines()]
        cfg = bench_config(args.sleep)
        root = args.root or Path(tempfile.mkdtemp(prefix="pf-bench-"))
        print(f"{args.units[0]} units of {args.sleep} s, {args.slots} CPUs in all, head at {host}, root {root}")
        ray.init(num_cpus=0, include_dashboard=False, log_to_driver=False, _node_ip_address=host)
        rows = [bench_nodes(n, nodes, args.units[0], args.slots, cfg, root, state_dir) for n in counts]
        ray.shutdown()
    finally:
        script("stop")
        shutil.rmtree(state_dir, ignore_errors=True)
    print("\n| nodes | bare Ray units/s | campaign units/s | overhead/unit | node->head B/unit (bare / campaign) | "
          "head->node B/unit (bare / campaign) | lake B/unit (shared FS) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['nodes']} | {r['units'] / r['bare_s']:.1f} | {r['units'] / r['campaign_s']:.1f} | "
              f"{(r['campaign_s'] - r['bare_s']) / r['units'] * 1000:.1f} ms | {r['bare_up']:,.0f} / {r['campaign_up']:,.0f} | "
              f"{r['bare_down']:,.0f} / {r['campaign_down']:,.0f} | {r['lake_bytes']:,.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, nargs="+", default=[2000, 10000], help="campaign sizes, run in this order")
    ap.add_argument("--sleep", type=float, default=0.05, help="synthetic work per unit (s)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="calls per latency (the median is printed)")
    ap.add_argument("--root", type=Path, default=None, help="where campaigns go (default: a temp dir)")
    ap.add_argument("--nodes", default=None, help="e.g. 1,3: across 1 and 3 namespace nodes (first --units size; root)")
    ap.add_argument("--slots", type=int, default=3, help="with --nodes: CPUs of the worker nodes in all")
    args = ap.parse_args()
    if args.nodes:
        main_nodes(args)
        return

    cfg = bench_config(args.sleep)
    root = args.root or Path(tempfile.mkdtemp(prefix="pf-bench-"))
    print(f"sizes {args.units}, {args.sleep} s of work per unit, {args.cpus} CPUs, root {root}")

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    rows = [bench_size(n, cfg, root, args.repeat) for n in args.units]
    ray.shutdown()

    print("\n| units | bare Ray | campaign | overhead/unit | without fixed costs | driver peak RSS | "
          "status (read / CLI) | /api/summary (first / in process / HTTP) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['units']:,} | {r['bare_s']:.1f} s | {r['campaign_s']:.1f} s | {r['overhead_ms']:.1f} ms | "
              f"{r['overhead_no_fixed_ms']:.1f} ms | {r['rss_peak_mib']:.0f} MiB (from {r['rss_before_mib']:.0f}) | "
              f"{r['status_ms']:.0f} ms / {r['status_cli_s']:.2f} s | "
              f"{r['summary_first_s']:.1f} s / {r['summary_ms']:.0f} ms / {r['summary_http_ms']:.0f} ms |")


if __name__ == "__main__":
    main()
