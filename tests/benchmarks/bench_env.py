"""Environment speed: the RP1M env next to RoboPianist's default env, one core.

Run: .venv/bin/python tests/benchmarks/bench_env.py [--steps 2000]
Prints random-action steps per second of both environments (same song, same process,
alternating rounds so that machine load hits both alike), then the cost per step of the
OT assignment and of the precision/recall/F1 computation in microseconds.
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from robopianist import music, suite  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import configs  # noqa: E402
from workers.env import make_env  # noqa: E402
from workers.fingering import assign_fingers  # noqa: E402
from workers.metrics import step_metrics  # noqa: E402

SONG = "TwinkleTwinkleRousseau"


def steps_per_second(step, reset, low, high, n_steps: int, rng) -> float:
    reset()
    actions = rng.uniform(low, high, size=(n_steps, len(low)))
    start = time.perf_counter()
    for action in actions:
        if step(action):
            reset()
    return n_steps / (time.perf_counter() - start)


def per_call_us(fn, args_list) -> float:
    start = time.perf_counter()
    for args in args_list:
        fn(*args)
    return (time.perf_counter() - start) / len(args_list) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000, help="steps per environment per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    cfg = configs.load(profile="local")

    t0 = time.perf_counter()
    ours = make_env(music.load(SONG, stretch=cfg.env.stretch_factor), cfg.env, seed=0)
    build_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = suite.load(f"RoboPianist-debug-{SONG}-v0", seed=0)
    plain.reset()
    build_plain = time.perf_counter() - t0
    plain_spec = plain.action_spec()

    rates: dict[str, list[float]] = {"pianoforge RP1M env": [], "robopianist default env": []}
    for _ in range(args.rounds):
        rates["pianoforge RP1M env"].append(
            steps_per_second(lambda a: ours.step(a)[2], ours.reset, ours.action_low, ours.action_high, args.steps, rng)
        )
        rates["robopianist default env"].append(
            steps_per_second(lambda a: plain.step(a).last(), plain.reset, plain_spec.minimum, plain_spec.maximum,
                             args.steps, rng)
        )

    table = Table(title=f"random actions, 1 thread, {args.rounds} x {args.steps} steps, song {SONG}")
    for col in ("environment", "obs", "actions", "build s", "steps/s (median)", "steps/s (all rounds)"):
        table.add_column(col)
    table.add_row("pianoforge RP1M env", str(ours.obs_dim), str(ours.action_dim), f"{build_ours:.2f}",
                  f"{np.median(rates['pianoforge RP1M env']):.0f}",
                  " ".join(f"{r:.0f}" for r in rates["pianoforge RP1M env"]))
    plain_obs = sum(int(np.prod(v.shape)) for v in plain.observation_spec().values())
    table.add_row("robopianist default env", str(plain_obs), str(plain_spec.shape[0]), f"{build_plain:.2f}",
                  f"{np.median(rates['robopianist default env']):.0f}",
                  " ".join(f"{r:.0f}" for r in rates["robopianist default env"]))
    Console(width=140).print(table)

    # Per-step costs on inputs of realistic size: 10 fingertips, 1-10 keys; 88-key masks.
    n = 20000
    tips = rng.uniform(-0.5, 0.5, size=(n, 10, 3))
    key_sets = [rng.uniform(-0.5, 0.5, size=(k, 3)) for k in rng.integers(1, 11, size=n)]
    ot_us = per_call_us(assign_fingers, list(zip(tips, key_sets)))
    ot_one_us = per_call_us(assign_fingers, [(t, k[:1]) for t, k in zip(tips, key_sets)])
    pressed = rng.random((n, 88)) < 0.05
    target = rng.random((n, 88)) < 0.05
    f1_us = per_call_us(step_metrics, list(zip(pressed, target)))
    from sklearn.metrics import precision_recall_fscore_support

    m = 2000
    sk_us = per_call_us(
        lambda p, t: precision_recall_fscore_support(t, p, average="binary", zero_division=1),
        list(zip(pressed[:m], target[:m])),
    )
    costs = Table(title="cost per control step")
    costs.add_column("computation")
    costs.add_column("µs / step")
    costs.add_row("OT assignment (1-10 keys, 10 fingers)", f"{ot_us:.1f}")
    costs.add_row("OT assignment (1 key, 10 fingers)", f"{ot_one_us:.1f}")
    costs.add_row("precision/recall/F1 (workers.metrics)", f"{f1_us:.1f}")
    costs.add_row("precision/recall/F1 (sklearn, for reference)", f"{sk_us:.1f}")
    Console(width=140).print(costs)


if __name__ == "__main__":
    main()
