"""A small real lake for the imitation-learning tests and benchmark, written through the lake's API."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import configs
from workers.lake import Episode, Lake, ShardMeta

# An imitation job of a few seconds: a tiny model, 6 steps, checkpoints at 3 and 6.
TINY_IL = ["il.d_model=32", "il.n_layers=1", "il.n_heads=2", "il.action_chunk=4", "il.batch_size=8",
           "il.shuffle_buffer=32", "il.steps=6", "il.log_interval=2", "il.checkpoint_interval=3",
           "il.warmup_steps=2", "il.max_failures=0"]


def make_episode(rng: np.random.Generator, steps: int, seed: int = 0) -> Episode:
    """An episode whose actions follow the observed proprio state (so there is something to learn)."""
    obs = rng.normal(size=(steps, 1144)).astype(np.float32)
    obs[:, :979] = rng.random((steps, 979)) < 0.05
    action = np.tanh(obs[:, 979 : 979 + 39]).astype(np.float32)
    target = obs[:, :88].astype(bool)
    return Episode(seed=seed, obs=obs, action=action, reward=rng.random(steps).astype(np.float32),
                   pressed=target.copy(), target=target, episode_return=float(steps),
                   precision=1.0, recall=1.0, f1=1.0)


def write_lake(root: Path, f1s: list[float], episodes: int = 2, steps: int = 40, split: str = "train",
               seed: int = 0, song_prefix: str = "song") -> Lake:
    """One shard per entry of ``f1s`` (specialist F1), each from its own song; returns the lake."""
    lake = Lake(root, configs.load().lake)
    rng = np.random.default_rng(seed)
    for i, f1 in enumerate(f1s):
        song_hash = f"{song_prefix}{i:02d}".ljust(64, "0")
        meta = ShardMeta(unit_id=f"{song_hash[:12]}-c000-cfg", song_hash=song_hash, song_name=f"{song_prefix}{i:02d}",
                         chunk_index=0, split=split, config_hash="cfg", specialist_f1=f1)
        lake.commit_shard(meta, [make_episode(rng, steps, seed=k) for k in range(episodes)])
    return lake
