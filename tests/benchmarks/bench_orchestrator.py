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
"""

from __future__ import annotations

import argparse
import json
import os
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, nargs="+", default=[2000, 10000], help="campaign sizes, run in this order")
    ap.add_argument("--sleep", type=float, default=0.05, help="synthetic work per unit (s)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="calls per latency (the median is printed)")
    ap.add_argument("--root", type=Path, default=None, help="where campaigns go (default: a temp dir)")
    args = ap.parse_args()

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
