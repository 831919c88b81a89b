"""Environment stepping of a pack: K environments in worker processes (shared memory) versus
the same K stepped one after another in this process.

Run: OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_pack_env.py [--steps 100] [--rounds 3] [--ks 1 2 4] [--workers N]

For each K it builds K environments on K chunks of one song, both ways, and times ``--steps``
pack steps of uniform random actions (episodes restart as they end), alternating the two ways
in rounds so that other load on a shared machine hits both alike. Prints aggregate env steps/s
(K x pack steps per wall second) side by side and their ratio. Workers: ``min(K, --workers)``
(default: the CPUs this process may use), as a pack on that many CPUs runs them.
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import robopianist  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import configs  # noqa: E402
from workers.piano.music import load_song  # noqa: E402
from workers.rl.envpool import EnvPool, EnvSpec, InProcessEnvPool, WorkerEnvPool  # noqa: E402

SONG = Path(robopianist.__file__).parent / "music" / "data" / "rousseau" / "twinkle-twinkle-trimmed.mid"


def rate(pool: EnvPool, steps: int, low: np.ndarray, high: np.ndarray, rng: np.random.Generator) -> float:
    """Aggregate env steps per wall second over ``steps`` pack steps."""
    slots = list(range(pool.k))
    actions = rng.uniform(low, high, size=(steps, pool.k, len(low))).astype(np.float32)
    start = time.perf_counter()
    for t in range(steps):
        pool.action[:] = actions[t]
        errors = pool.step(slots)
        if errors:
            raise RuntimeError(next(iter(errors.values())))
    return steps * pool.k / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="pack steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    cfg = configs.load(overrides={"env.chunk_steps": 60})
    song_hash = load_song(SONG).content_hash
    rng = np.random.default_rng(0)
    table = Table(title=f"pack env stepping: aggregate env steps/s ({args.steps} pack steps x {args.rounds} rounds, "
                        f"{len(os.sched_getaffinity(0))} CPUs)")
    for col in ("K", "workers", "in process", "worker processes", "workers / in process"):
        table.add_column(col, justify="right")
    for k in args.ks:
        specs = [EnvSpec(str(SONG), 1 + i % 3, song_hash, cfg.env.model_dump(), seed=i) for i in range(k)]
        probe = specs[0].make()
        dims, low, high = (probe.obs_dim, probe.action_dim), probe.action_low, probe.action_high
        probe.close()
        n_workers = min(k, args.workers)
        local, remote = InProcessEnvPool(specs, *dims), WorkerEnvPool(specs, *dims, n_workers=n_workers)
        try:
            for pool in (local, remote):
                errors = pool.reset(list(range(k)))
                if errors:
                    raise RuntimeError(next(iter(errors.values())))
                rate(pool, 20, low, high, rng)  # warm up
            rates: dict[str, list[float]] = {"local": [], "remote": []}
            for _ in range(args.rounds):
                rates["local"].append(rate(local, args.steps, low, high, rng))
                rates["remote"].append(rate(remote, args.steps, low, high, rng))
        finally:
            local.close()
            remote.close()
        a, b = float(np.median(rates["local"])), float(np.median(rates["remote"]))
        table.add_row(str(k), str(n_workers), f"{a:.0f}", f"{b:.0f}", f"{b / a:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
