"""How fast one specialist trains here, and how much memory its replay buffer needs.

    .venv/bin/python tests/benchmarks/bench_specialist.py [--warmup 300] [--steps 300] [--batch 256]

Prints, side by side:
- the real training loop (``train_unit``): env steps/s and updates/s after the random
  warm-up, with utd_ratio 1, batch 256 and RP1M's 3 x 256 networks;
- its parts alone: environment steps/s (random actions), DroQ updates/s, replay samples/s;
- replay bytes per transition (550-step episodes) next to a naive float32 (obs, next_obs) buffer.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import robopianist
import torch

import configs
from workers.rl.droq import DroQ
from workers.piano.env import make_env
from workers.piano.music import load_chunk, load_song
from workers.rl.replay import ReplayBuffer
from workers.rl.pack import train_unit
from workers.units import UnitSpec

SONG = Path(robopianist.__file__).parent / "music" / "data" / "rousseau" / "twinkle-twinkle-trimmed.mid"


def rate(n: int, fn) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=300, help="random warm-up steps before timing")
    parser.add_argument("--steps", type=int, default=300, help="timed training steps")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    cfg = configs.load(overrides={
        "droq.batch_size": args.batch, "droq.utd_ratio": 1, "droq.warmup_steps": args.warmup,
        "droq.replay_capacity": 100_000, "specialist.total_steps": args.warmup + args.steps,
        "specialist.log_interval": 50, "specialist.eval_interval": 10 ** 9,
        "specialist.checkpoint_interval": 10 ** 9, "specialist.rollouts": 0,
    })
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, device {device}, "
          f"torch threads per unit {max(1, int(cfg.campaign.cpus_per_unit))}")

    # 1. The real loop.
    song = load_song(SONG)
    unit = UnitSpec.create(song_path=str(SONG), song_hash=song.content_hash, song_name=song.name, chunk_index=0,
                           config_hash=cfg.hash("env", "droq", "specialist"))
    reports: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        train_unit(unit, cfg, Path(tmp) / "unit", Path(tmp) / "lake", report=reports.append, progress=False)
    timed = [r for r in reports if "perf/env_steps_per_s" in r and r["step"] > args.warmup + 50]
    loop_steps = np.mean([r["perf/env_steps_per_s"] for r in timed])
    loop_updates = np.mean([r["perf/updates_per_s"] for r in timed])

    # 2. The parts alone (with the unit's thread count).
    torch.set_num_threads(max(1, int(cfg.campaign.cpus_per_unit)))
    env = make_env(load_chunk(SONG, 0, cfg.env), cfg.env)
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer(env.obs_dim, env.action_dim, 20_000, cfg.droq.discount, binary_dims=979)
    obs, _ = env.reset()
    t = time.perf_counter()
    for i in range(args.warmup):
        action = rng.uniform(env.action_low, env.action_high).astype(np.float32)
        next_obs, reward, terminated, truncated, info = env.step(action)
        buffer.add(obs, action, reward, next_obs, terminated, truncated)
        obs = env.reset()[0] if terminated or truncated else next_obs
    env_rate = args.warmup / (time.perf_counter() - t)
    agent = DroQ(env.obs_dim, env.action_dim, env.action_low, env.action_high, cfg.droq)
    agent.update([buffer])
    n_updates = max(10, args.steps // 5)
    update_rate = rate(n_updates, lambda: agent.update([buffer]))
    sample_rate = rate(200, lambda: buffer.sample(args.batch))

    # 3. Replay memory: five 550-step episodes of real observations (repeated), full buffer.
    replay = ReplayBuffer(env.obs_dim, env.action_dim, 5 * 551, cfg.droq.discount, binary_dims=979)
    for e in range(5):
        for step in range(550):
            replay.add(obs, np.zeros(env.action_dim, np.float32), 0.0, obs, False, step == 549)
    compact = replay.nbytes / len(replay)
    naive = (2 * env.obs_dim + env.action_dim + 2) * 4  # obs, next_obs, action, reward, discount

    print(f"{'':34s}{'value':>12s}")
    print(f"{'train loop env steps/s':34s}{loop_steps:12.1f}   (after {args.warmup} warm-up steps, "
          f"utd 1, batch {args.batch})")
    print(f"{'train loop updates/s':34s}{loop_updates:12.1f}")
    print(f"{'env alone steps/s':34s}{env_rate:12.1f}   (random actions)")
    print(f"{'DroQ update alone updates/s':34s}{update_rate:12.1f}   (critic + actor + temperature)")
    print(f"{'replay sample alone batches/s':34s}{sample_rate:12.1f}")
    print(f"{'replay bytes/transition':34s}{compact:12.0f}   naive float32: {naive}  "
          f"({naive / compact:.1f}x smaller; {compact * 1e6 / 2**30:.2f} GiB vs {naive * 1e6 / 2**30:.2f} GiB "
          f"per million)")


if __name__ == "__main__":
    main()
