"""Environment speed: the lean env next to raw MuJoCo, RoboPianist's task and the reference env, one core.

Run: OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_env.py [--steps 1000] [--rounds 3]
Prints random-action steps per CPU second (``time.process_time``, so that other work on a
shared machine skews them less) of four variants on the same song, in alternating rounds in
one process, each also as a fraction of raw MuJoCo:

- raw ``mujoco.mj_step`` x substeps on the same compiled model with the same controls (the
  ceiling: no observation, no reward);
- pianoforge's env, lean backend (the default);
- RoboPianist's own task with the RP1M settings through dm_control (no OT/collision terms,
  no flat observation);
- pianoforge's env, robopianist backend (the reference the lean one is tested against).

Then where a lean step goes (µs per step, from a profile of the lean env) and the cost per step
of the OT assignment and of precision/recall/F1 on their own.
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"

import argparse  # noqa: E402
import cProfile  # noqa: E402
import pstats  # noqa: E402
import time  # noqa: E402

import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from robopianist import music  # noqa: E402

import configs  # noqa: E402
from workers.piano.env import make_env, robopianist_task_kwargs  # noqa: E402
from workers.piano.fingering import assign_fingers  # noqa: E402
from workers.piano.metrics import step_metrics  # noqa: E402

SONG = "TwinkleTwinkleRousseau"
RAW, LEAN, TASK, REFERENCE = ("raw mj_step x substeps", "pianoforge env, lean backend",
                              "robopianist task, RP1M settings", "pianoforge env, robopianist backend")


def steps_per_second(step, reset, actions: np.ndarray) -> float:
    """Steps per CPU second over ``actions``; ``step`` returns True when the episode ended."""
    reset()
    start = time.process_time()
    for action in actions:
        if step(action):
            reset()
    return len(actions) / (time.process_time() - start)


def rp1m_settings_robopianist_env(midi, env_cfg):
    """RoboPianist's own task and environment with the RP1M settings, no pianoforge terms."""
    from mujoco_utils.composer_utils import Environment
    from robopianist.suite.tasks.piano_with_shadow_hands import PianoWithShadowHands

    task = PianoWithShadowHands(midi=midi, **robopianist_task_kwargs(env_cfg))
    return Environment(task=task, random_state=0, strip_singleton_obs_buffer_dim=True, recompile_physics=False,
                       legacy_step=True)


def raw_runner(lean, actions: np.ndarray):
    """mj_step x substeps on the lean env's own model and data, episodes as long as the song's."""
    physics = lean.environment.physics
    model, data = physics.model.ptr, physics.data.ptr
    ctrl_ids, substeps, n_steps = lean._ctrl_ids, lean._substeps, lean.n_steps
    count = [0]

    def step(action) -> bool:
        data.ctrl[ctrl_ids] = action[:-1]
        mujoco.mj_step(model, data, substeps)
        count[0] += 1
        return count[0] % n_steps == 0

    return lambda: steps_per_second(step, lean.environment.reset, actions)


def gym_runner(env, actions: np.ndarray):
    def step(action) -> bool:
        _, _, terminated, truncated, _ = env.step(action)
        return terminated or truncated

    return lambda: steps_per_second(step, env.reset, actions)


def lean_breakdown(lean, actions: np.ndarray) -> list[tuple[str, float]]:
    """CPU µs per step of the parts of a lean step (cProfile: the small numpy parts come out inflated)."""
    profile = cProfile.Profile(time.process_time)
    lean.reset()
    profile.enable()
    for action in actions:
        _, _, terminated, truncated, _ = lean.step(action)
        if terminated or truncated:
            lean.reset()
    profile.disable()
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (calls, primitive, tottime, cumtime, callers)
    n = len(actions)

    def cum(name: str) -> float:
        return sum(v[3] for k, v in stats.items() if k[2] == name) / n * 1e6

    physics = sum(v[3] for k, v in stats.items() if k[2].startswith("<built-in method mujoco._functions.mj_step"))
    parts = [
        ("MuJoCo: mj_step2 + mj_step x (substeps - 1) + mj_step1", physics / n * 1e6),
        ("key states and activations (numpy)", cum("_update_keys")),
        ("observation assembly", cum("_observation")),
        ("OT assignment", cum("ot_match")),
        ("hand contacts", cum("hands_touch")),
        ("reward terms (workers.piano.reward)", cum("__call__")),
        ("precision/recall/F1", cum("step_metrics")),
    ]
    total = cum("step")
    parts.append(("rest of the step (reward state, info, checks)", total - sum(v for _, v in parts)))
    parts.append(("total per step", total))
    return parts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cfg = configs.load(profile="local")
    midi = music.load(SONG, stretch=cfg.env.stretch_factor)

    lean = make_env(midi, cfg.env, seed=0, backend="lean")
    reference = make_env(midi, cfg.env, seed=0, backend="robopianist")
    task_env = rp1m_settings_robopianist_env(midi, cfg.env)
    task_env.reset()
    actions = rng.uniform(lean.action_low, lean.action_high, size=(args.steps, lean.action_dim))
    runners = {
        RAW: raw_runner(lean, actions),
        LEAN: gym_runner(lean, actions),
        TASK: lambda: steps_per_second(lambda a: task_env.step(a).last(), task_env.reset, actions),
        REFERENCE: gym_runner(reference, actions),
    }
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            rates[name].append(run())
    raw = np.array(rates[RAW])

    table = Table(title=f"random actions, 1 thread, {args.rounds} rounds x {args.steps} steps, song {SONG} "
                        f"({lean.n_steps} steps), {lean._substeps} substeps per control step")
    for col in ("variant", "steps/CPU-s (median)", "all rounds", "fraction of raw (median)", "per round"):
        table.add_column(col)
    for name in runners:
        ratio = np.array(rates[name]) / raw  # same round, side by side
        table.add_row(name, f"{np.median(rates[name]):.0f}", " ".join(f"{r:.0f}" for r in rates[name]),
                      f"{np.median(ratio):.2f}", " ".join(f"{r:.2f}" for r in ratio))
    Console(width=160).print(table)

    breakdown = Table(title="where a lean step goes (cProfile, µs per control step)")
    breakdown.add_column("part")
    breakdown.add_column("µs / step")
    for name, us in lean_breakdown(lean, actions):
        breakdown.add_row(name, f"{us:.0f}")
    Console(width=160).print(breakdown)

    # Per-step costs on inputs of realistic size: 10 fingertips, 1-10 keys; 88-key masks.
    n = 20000
    tips = rng.uniform(-0.5, 0.5, size=(n, 10, 3))
    key_sets = [rng.uniform(-0.5, 0.5, size=(k, 3)) for k in rng.integers(1, 11, size=n)]
    pressed = rng.random((n, 88)) < 0.05
    target = rng.random((n, 88)) < 0.05

    def per_call_us(fn, args_list) -> float:
        start = time.process_time()
        for fn_args in args_list:
            fn(*fn_args)
        return (time.process_time() - start) / len(args_list) * 1e6

    costs = Table(title="cost per control step")
    costs.add_column("computation")
    costs.add_column("µs / step")
    costs.add_row("OT assignment (1-10 keys, 10 fingers)", f"{per_call_us(assign_fingers, list(zip(tips, key_sets))):.1f}")
    costs.add_row("OT assignment (1 key, 10 fingers)",
                  f"{per_call_us(assign_fingers, [(t, k[:1]) for t, k in zip(tips, key_sets)]):.1f}")
    costs.add_row("precision/recall/F1 (workers.piano.metrics)",
                  f"{per_call_us(step_metrics, list(zip(pressed, target))):.1f}")
    Console(width=160).print(costs)
    for env in (lean, reference):
        env.close()


if __name__ == "__main__":
    main()
