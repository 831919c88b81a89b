"""Imitation-learning throughput: training samples/s with 1 and 2 Ray Train DDP workers.

Same lake (synthetic episodes written through the lake API), same model, same per-worker batch;
DDP's global batch is workers x il.batch_size. Prints the steady-state rate (the last logging
window) and the whole-run rate (worker start-up excluded, first batches included).

    .venv/bin/python tests/benchmarks/bench_il.py [--policy flow|bc] [--steps 60] [--set il.d_model=128 ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for il_fixtures

import ray  # noqa: E402

import configs  # noqa: E402
from il_fixtures import write_lake  # noqa: E402
from workers.imitation.trainer import train_il  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="flow", choices=["flow", "bc"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--episode-steps", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    window = max(1, args.steps // 3)
    cfg = configs.load(overrides=[f"il.steps={args.steps}", f"il.batch_size={args.batch_size}",
                                  f"il.log_interval={window}", f"il.checkpoint_interval={args.steps}",
                                  "il.shuffle_buffer=2000"] + args.sets)
    il = cfg.il
    with tempfile.TemporaryDirectory(prefix="bench-il-") as tmp:
        tmp = Path(tmp)
        write_lake(tmp / "lake", [0.9] * args.shards, episodes=args.episodes, steps=args.episode_steps)
        print(f"lake: {args.shards} shards x {args.episodes} episodes x {args.episode_steps} steps; policy {args.policy} "
              f"(d_model {il.d_model}, layers {il.n_layers}, chunk {il.action_chunk}, bc_hidden {il.bc_hidden}); "
              f"batch {il.batch_size}/worker; {il.steps} steps", flush=True)
        ray.init(address="local", num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
        results = []
        try:
            for n in args.workers:
                t0 = time.perf_counter()
                r = train_il(tmp / "lake", cfg, tmp / f"out-{n}", policy=args.policy, num_workers=n)
                results.append((n, r.metrics["train/samples_per_s"], r.metrics["train/run_samples_per_s"],
                                time.perf_counter() - t0, r.metrics["train/loss"], r.metrics["worker/torch_threads"]))
        finally:
            ray.shutdown()
    print(f"{'workers':>7} {'steady samples/s':>17} {'run samples/s':>14} {'fit wall s':>11} {'final loss':>11} "
          f"{'threads/worker':>15}")
    for n, steady, run, wall, loss, threads in results:
        print(f"{n:>7} {steady:>17.0f} {run:>14.0f} {wall:>11.1f} {loss:>11.4f} {threads:>15}")
    if len(results) > 1:
        print(f"speed-up {results[-1][0]} vs {results[0][0]} workers (steady): {results[-1][1] / results[0][1]:.2f}x")


if __name__ == "__main__":
    main()
