"""What Adam over stacked agents costs: ``packing.StackedAdam`` (torch.optim.Adam over per-agent
rows) beside the optimiser it replaced (``PackedAdam`` of ``--baseline``, a git revision, which
called torch's internal functional Adam), on the RP1M critic's parameters.

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_stacked_adam.py [--baseline main] [--reps 5]

Per K: ms of process CPU time per step of every agent, and of half the agents (the others sit
it out), for both, and the ratio new / old; interleaved, median of ``--reps``. Both give the
same parameters (checked before timing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))

from bench_pack import droq_at  # noqa: E402

import configs  # noqa: E402
from workers.rl.droq import DroQ  # noqa: E402
from workers.rl.packing import StackedAdam  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="main")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    old_cls = droq_at(args.baseline).PackedAdam
    cfg = configs.load(overrides={"droq.device": "cpu"}).droq
    print(f"{'K':>3} {'agents':>7} {'old ms':>8} {'new ms':>8} {'new/old':>8}")
    for k in args.ks:
        critic = DroQ(1144, 39, -np.ones(39), np.ones(39), cfg, device="cpu", seed=0, num_agents=k).critic
        params = [[p.detach().clone() for p in critic.parameters()] for _ in range(2)]
        opts = {"old": old_cls(params[0], k, lr=3e-4, betas=(0.9, 0.999), eps=1e-8),
                "new": StackedAdam(params[1], k, lr=3e-4, betas=(0.9, 0.999), eps=1e-8)}
        grads = [torch.randn_like(p) for p in params[0]]
        for which, ps in zip(opts, params):
            for p, g in zip(ps, grads):
                p.grad = g
        for agents in (None, list(range(0, k, 2))):
            def step(name: str) -> float:
                t = time.process_time()
                for _ in range(args.iters):
                    opts[name].step(agents)
                return (time.process_time() - t) * 1e3 / args.iters

            times = {"old": [], "new": []}
            for _ in range(args.reps):
                for name in times:
                    times[name].append(step(name))
            same = all(torch.equal(a, b) for a, b in zip(*params))
            old, new = statistics.median(times["old"]), statistics.median(times["new"])
            label = "all" if agents is None else f"{len(agents)}"
            print(f"{k:>3} {label:>7} {old:8.2f} {new:8.2f} {new / old:8.2f}" + ("" if same else "  (parameters differ!)"))


if __name__ == "__main__":
    main()
