"""Synthetic episodes for tests, benchmarks and the synthetic workload: music-like goal bits,
random everything else, no physics."""

from __future__ import annotations

import numpy as np

from workers.lake.schema import ACTION_DIM, N_KEYS, OBS_DIM, OBS_LAYOUT, Episode


# --------------------------------------------------------------------------------------------
# Synthetic episodes (tests, benchmarks, the synthetic workload)
# --------------------------------------------------------------------------------------------


def synthetic_episode(n_steps: int, seed: int, f1: float | None = None, lookahead: int = 10) -> Episode:
    """A random but music-like episode: sparse goal bits from a random piano roll (a few notes
    at a time, held for several steps, seen through an 11-step lookahead window), random
    continuous observation parts, actions and rewards. No physics."""
    if (lookahead + 1) * N_KEYS != OBS_LAYOUT[0][2]:
        raise ValueError(f"lookahead {lookahead}: the lake's observation layout holds an 11-step goal (lookahead 10)")
    rng = np.random.default_rng(seed)
    horizon = n_steps + lookahead
    roll = np.zeros((horizon, N_KEYS), dtype=bool)
    sustain = np.zeros(horizon, dtype=bool)
    t = 0
    while t < horizon:  # chords of 1-4 notes in the middle of the keyboard, held 2-12 steps
        keys = rng.integers(20, 70, size=rng.integers(1, 5))
        roll[t:t + rng.integers(2, 13), keys] = True
        t += int(rng.integers(1, 6))
    for start in range(0, horizon, 40):
        sustain[start:start + int(rng.integers(0, 30))] = True
    window = np.lib.stride_tricks.sliding_window_view(roll, (lookahead + 1, N_KEYS))[:n_steps, 0]
    obs = rng.standard_normal((n_steps, OBS_DIM)).astype(np.float32)
    obs[:, :968] = window.reshape(n_steps, -1)
    obs[:, 968:979] = np.lib.stride_tricks.sliding_window_view(sustain, lookahead + 1)[:n_steps]
    target = roll[:n_steps]
    pressed = target & (rng.random(target.shape) < (0.9 if f1 is None else f1))
    reward = rng.random(n_steps, dtype=np.float32)
    f1_value = float(rng.uniform(0.5, 1.0)) if f1 is None else float(f1)
    return Episode(seed=seed, obs=obs, action=rng.uniform(-1, 1, (n_steps, ACTION_DIM)).astype(np.float32),
                   reward=reward, pressed=pressed, target=target, episode_return=float(reward.sum()),
                   precision=min(1.0, f1_value + 0.05), recall=f1_value, f1=f1_value)

