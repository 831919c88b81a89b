"""Orchestration overhead at scale: a synthetic campaign next to bare Ray tasks doing the same work.

    .venv/bin/python tests/benchmarks/bench_orchestrator.py --units 2000 --sleep 0.05

Both sides run ``workers.synthetic.run_unit`` (sleep, checkpoint counter, one small lake shard)
on the same local Ray cluster (``--cpus`` CPUs, one per unit). The bare side submits every
task at once and waits; the campaign side is ``orchestrator.campaign.submit`` with its store,
retries bookkeeping, MLflow child runs through the MetricsSink, and bounded concurrency.
Printed: wall time and per-unit overhead, the driver's peak RSS, the workers' logging share,
and how long ``status`` takes on the finished campaign. Units are generated
(``workers.synthetic.make_units``), not read from MIDI files.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray

import configs
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


def bare_ray(units, cfg, root: Path) -> float:
    """The same work as plain Ray tasks: no store, no tracking, no retries."""
    task = ray.remote(num_cpus=cfg.campaign.cpus_per_unit)(
        lambda u, c, d, lake: run_unit(u, c, Path(d), Path(lake)).f1)
    cfg_ref = ray.put(cfg)
    t0 = time.perf_counter()
    ray.get([task.remote(u, cfg_ref, str(root / "units" / u.unit_id), str(root / "lake")) for u in units])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=2000)
    ap.add_argument("--sleep", type=float, default=0.05, help="synthetic work per unit (s)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--root", type=Path, default=None, help="where campaigns go (default: a temp dir)")
    args = ap.parse_args()

    overrides = [
        "campaign.workload=synthetic", f"campaign.synthetic.sleep_s={args.sleep}", "campaign.synthetic.steps=5",
        "campaign.synthetic.episodes=1", "campaign.synthetic.steps_per_episode=2", "gate.f1_threshold=0.0",
        "mlflow.system_metrics=false",
    ]
    cfg = configs.load(overrides=overrides)
    chunks = 5
    units = make_units(max(1, args.units // chunks), chunks, cfg.hash("env", "droq", "specialist"))[: args.units]
    root = args.root or Path(tempfile.mkdtemp(prefix="pf-bench-"))
    print(f"{len(units)} units, {args.sleep} s of work each, {args.cpus} CPUs, root {root}")

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    bare_s = bare_ray(units, cfg, root / "bare")
    print(f"bare Ray tasks        : {bare_s:8.1f} s   {bare_s / len(units) * 1000:7.1f} ms/unit")

    rss_samples: list[tuple[int, float]] = []  # (finished units, RSS MiB): is the driver's memory flat?

    def on_progress(counts: dict[str, int]) -> None:
        done = counts["succeeded"]
        if done % max(1, len(units) // 8) == 0:
            rss_samples.append((done, round(psutil.Process().memory_info().rss / 2**20, 1)))

    rss_before = psutil.Process().memory_info().rss / 2**20
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        summary = campaign.submit(units, cfg, "bench", root=root, on_progress=on_progress)
        camp_s = time.perf_counter() - t0
    assert summary.counts["succeeded"] == len(units), summary.counts
    t0 = time.perf_counter()
    again = campaign.submit(units, cfg, "bench", root=root)  # same units again: only the fixed costs
    fixed_s = time.perf_counter() - t0
    assert again.attempts_run == 0
    n = len(units)
    print(f"campaign (submit)     : {camp_s:8.1f} s   {camp_s / n * 1000:7.1f} ms/unit")
    print(f"  fixed costs         : {fixed_s:8.1f} s   (sink actor, MLflow store, parent run: a resubmit that runs nothing)")
    print(f"orchestration overhead: {(camp_s - bare_s) / n * 1000:8.1f} ms/unit over bare Ray, "
          f"{(camp_s - fixed_s - bare_s) / n * 1000:.1f} ms/unit without the fixed costs")
    print(f"driver RSS            : {rss_before:8.1f} MiB before, {rss.peak:.1f} MiB peak during the campaign; "
          f"(finished, MiB): {rss_samples}")
    print(f"worker logging share  : {summary.logging_overhead:8.3%} of worker time (report callback / unit time)")
    print(f"sink                  : {summary.sink_stats}")

    t0 = time.perf_counter()
    st = read_status(root / "bench")
    status_lib = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", "bench", "--root", str(root)],
                   check=True, capture_output=True, env={**os.environ, "COLUMNS": "120"})
    status_cli = time.perf_counter() - t0
    print(f"status                : {status_lib * 1000:8.1f} ms read_status(), {status_cli:.2f} s `pianoforge status` "
          f"(process start included); {st.total} units, {st.throughput_per_hour:.0f} units/h")

    ray.shutdown()


if __name__ == "__main__":
    main()
