"""Environment speed: the RP1M env next to RoboPianist's default env, one core.

Run: .venv/bin/python tests/benchmarks/bench_env.py [--steps 2000]
Prints random-action steps per second of three environments on the same song in the same
process, in alternating rounds: pianoforge's RP1M env, RoboPianist's own task with the same
RP1M settings (what the OT/collision terms and the flat observation cost on top), and
RoboPianist's default env (``robopianist.suite.load``). Rates are per CPU second of this
process (``time.process_time``), so that other work on a shared machine skews them less.
Then the cost per step of the OT assignment and of precision/recall/F1 in microseconds.
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
from workers.piano.env import make_env, robopianist_task_kwargs  # noqa: E402
from workers.piano.fingering import assign_fingers  # noqa: E402
from workers.piano.metrics import step_metrics  # noqa: E402

SONG = "TwinkleTwinkleRousseau"


def steps_per_second(step, reset, low, high, n_steps: int, rng) -> float:
    reset()
    actions = rng.uniform(low, high, size=(n_steps, len(low)))
    start = time.process_time()
    for action in actions:
        if step(action):
            reset()
    return n_steps / (time.process_time() - start)


def per_call_us(fn, args_list) -> float:
    start = time.process_time()
    for args in args_list:
        fn(*args)
    return (time.process_time() - start) / len(args_list) * 1e6


def rp1m_settings_robopianist_env(midi, env_cfg):
    """RoboPianist's own task and environment with the RP1M settings, no pianoforge terms."""
    from mujoco_utils.composer_utils import Environment
    from robopianist.suite.tasks.piano_with_shadow_hands import PianoWithShadowHands

    task = PianoWithShadowHands(midi=midi, **robopianist_task_kwargs(env_cfg))
    return Environment(task=task, random_state=0, strip_singleton_obs_buffer_dim=True, recompile_physics=False)


def dm_sizes(env) -> tuple[int, int]:
    obs = sum(int(np.prod(v.shape)) for v in env.observation_spec().values())
    return obs, int(env.action_spec().shape[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000, help="steps per environment per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    cfg = configs.load(profile="local")

    midi = music.load(SONG, stretch=cfg.env.stretch_factor)
    t0 = time.perf_counter()
    ours = make_env(midi, cfg.env, seed=0)
    builds = {"pianoforge RP1M env": time.perf_counter() - t0}
    t0 = time.perf_counter()
    same = rp1m_settings_robopianist_env(midi, cfg.env)
    same.reset()
    builds["robopianist task, RP1M settings"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = suite.load(f"RoboPianist-debug-{SONG}-v0", seed=0)
    plain.reset()
    builds["robopianist default env"] = time.perf_counter() - t0

    def dm_env_runner(env):
        spec = env.action_spec()
        return lambda: steps_per_second(
            lambda a: env.step(a).last(), env.reset, spec.minimum, spec.maximum, args.steps, rng
        )

    runners = {
        "pianoforge RP1M env": lambda: steps_per_second(
            lambda a: ours.step(a)[2], ours.reset, ours.action_low, ours.action_high, args.steps, rng
        ),
        "robopianist task, RP1M settings": dm_env_runner(same),
        "robopianist default env": dm_env_runner(plain),
    }
    sizes = {
        "pianoforge RP1M env": (ours.obs_dim, ours.action_dim),
        "robopianist task, RP1M settings": dm_sizes(same),
        "robopianist default env": dm_sizes(plain),
    }
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            rates[name].append(run())

    table = Table(title=f"random actions, 1 thread, {args.rounds} x {args.steps} steps, song {SONG}")
    for col in ("environment", "obs", "actions", "build s", "steps/CPU-s (median)", "all rounds"):
        table.add_column(col)
    for name in runners:
        table.add_row(name, str(sizes[name][0]), str(sizes[name][1]), f"{builds[name]:.2f}",
                      f"{np.median(rates[name]):.0f}", " ".join(f"{r:.0f}" for r in rates[name]))
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
    costs.add_row("precision/recall/F1 (workers.piano.metrics)", f"{f1_us:.1f}")
    costs.add_row("precision/recall/F1 (sklearn, for reference)", f"{sk_us:.1f}")
    Console(width=140).print(costs)


if __name__ == "__main__":
    main()
