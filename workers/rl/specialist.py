"""One unit of work: train a DroQ specialist on one chunk of one song, then record its rollouts.

This module holds the unit's pieces (playing, rollouts into the lake, checkpoints, results);
the training loop is ``workers.rl.pack``'s, shared by a unit alone and a pack of units.
``workers.rl.pack.train_unit(unit, cfg, unit_dir, lake_root, report)``:

1. applies ``unit.overrides`` to ``cfg``; returns the saved result at once when
   ``unit_dir/result.json`` says the unit is done and its shard exists (a finished unit is
   never trained again);
2. rebuilds the chunk (``workers.piano.music.load_chunk``) and two environments on it, one to
   train in and one to evaluate and record in;
3. trains DroQ for ``specialist.total_steps`` environment steps: ``droq.warmup_steps``
   uniformly random actions first, then the stochastic policy with ``droq.utd_ratio``
   critic updates per step; every ``log_interval`` / ``eval_interval`` steps it calls
   ``report`` with a metrics dict (always with ``step``); every ``checkpoint_interval``
   steps, and at the end, it writes ``unit_dir/checkpoint.pt`` atomically. With
   ``specialist.budget.enabled`` a ``workers.rl.budget.StopRule`` judges every evaluation's
   F1 and may end training early (target, plateau) or extend it past ``total_steps`` up to
   ``budget.max_steps`` for a unit still improving; its state is in the checkpoint;
4. plays the chunk ``specialist.rollouts`` times and streams each rollout into one lake
   shard as soon as it ends (only per-episode summaries stay in memory); the shard's
   ``specialist_f1`` is the mean rollout F1. Rollout ``i`` has the seed ``episode_seeds(...)[i]``
   (the lake's ``seed`` column): it seeds the environment's
   random state and, with ``specialist.rollout_policy: stochastic`` (the default), a torch
   generator from which the rollout samples its actions. RP1M's environment starts every
   episode in the same state, so sampling is what makes the rollouts differ, and the seed
   replays a rollout exactly (the final checkpoint holds the policy that played them).
   ``deterministic`` plays the policy mean instead. Evaluations during training always play
   the mean, with the first ``eval_episodes`` of those seeds.
5. writes ``unit_dir/result.json``: the ``UnitResult`` (``seconds``, ``eval_seconds`` and the
   speeds are this run's; ``stop_reason``, ``stop_step`` and ``budget_steps`` say why training
   ended) plus ``done``, ``resumed_from`` (the step of each resume) and ``steps_this_run``;
6. sheds the replay buffer: the final checkpoint keeps only ``FINAL_AGENT_KEYS`` of the agent
   (actor, critic, temperature) and the metadata, a few MB instead of ~0.9 GB per unit.

Torch uses ``campaign.cpus_per_unit`` intra-op threads while the unit runs.

Resuming: the checkpoint holds the networks, optimisers, temperature, replay buffer, the RNG
states (Python, NumPy, Torch, the warm-up action generator) and the step counter, as tensors
and plain containers only (``torch.load(weights_only=True)``). A restarted unit continues at
the checkpoint's step; the episode that was under way is not restored: the environment starts
a fresh episode and the replay buffer keeps the steps it had stored of the old one. A crash
after training but before the shard is committed only repeats the rollouts.

A damaged checkpoint (truncated, unreadable) is moved aside as ``checkpoint.pt.damaged-<time>``
and the unit continues from ``checkpoint.prev.pt`` (the last two are kept) or from scratch
(``workers.rl.checkpoints``); the start's line in ``attempts.jsonl`` says so, naming the files.

Other files in ``unit_dir``: ``attempts.jsonl`` (one line per start: attempt, start_step,
pid, time) and, while an attempt runs, ``worker.pid`` (``workers.units.live_worker_pid``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import configs
from workers.rl import checkpoints
from workers.rl.droq import DroQ
from workers.piano.env import PianoEnv
from workers.piano.layout import fingering_row
from workers.lake import Episode, ShardWriter
from workers.units import (ATTEMPTS_LOG, PID_FILE, UnitResult, UnitSpec, clear_pid_file,  # noqa: F401 (re-exported)
                           read_attempts, write_pid_file)
from configs.files import atomic_write, fsync_dir, write_text_atomic
from workers import fencing

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
CHECKPOINT_FORMAT = 1
FINAL_AGENT_KEYS = ("actor", "critic", "log_alpha", "updates")  # what a finished unit keeps

Report = Callable[[dict], None]


def read_result(unit_dir: Path) -> dict | None:
    """The unit's ``result.json`` as a dict, or None when there is none."""
    path = Path(unit_dir) / RESULT
    return json.loads(path.read_text()) if path.exists() else None


def write_result(unit_dir: Path, result: dict) -> None:
    """Write ``unit_dir/result.json`` atomically; refused for a stale attempt (``workers.fencing``)."""
    path = Path(unit_dir) / RESULT
    write_text_atomic(path, json.dumps(result, indent=2), before_rename=fencing.guard(result["unit_id"], f"result {path}"))


def load_checkpoint(unit_dir: Path, map_location: str | torch.device = "cpu") -> dict | None:
    """The unit's checkpoint (loaded with ``weights_only=True``), or None when there is none.

    A damaged checkpoint is skipped for the previous one (``workers.rl.checkpoints``).
    """
    return checkpoints.load(Path(unit_dir) / CHECKPOINT, map_location=map_location).state


def save_checkpoint(unit_dir: Path, *, unit_id: str, step: int, episodes: int, resumed_from: list[int],
                    last_eval: dict, agent: dict, replay: dict, rng: np.random.Generator, budget: dict) -> None:
    """Write ``unit_dir/checkpoint.pt`` (``workers.rl.checkpoints.save``: atomic, the one before
    kept): everything a unit resumes from (the module docstring), tensors and plain containers only."""
    state = {"format": CHECKPOINT_FORMAT, "unit_id": unit_id, "step": step, "episodes": episodes,
             "resumed_from": resumed_from, "last_eval": last_eval, "agent": agent, "replay": replay,
             "rng": rng_state(rng), "budget": budget}
    checkpoints.save(state, Path(unit_dir) / CHECKPOINT, unit_id=unit_id)


def shed_checkpoint(unit_dir: Path) -> None:
    """Rewrite a finished unit's checkpoint with only its policy and metadata: the actor, the
    critic and temperature (for fine-tuning), step and evaluation; no replay buffer, optimiser
    state, target network or previous checkpoint (about 0.9 GB -> a few MB with the default
    networks). Idempotent."""
    path = Path(unit_dir) / CHECKPOINT
    checkpoint = load_checkpoint(unit_dir)
    if checkpoint is not None and "replay" in checkpoint:
        agent = checkpoint["agent"]
        kept = {k: checkpoint[k] for k in ("format", "unit_id", "step", "episodes", "resumed_from", "last_eval", "budget")
                if k in checkpoint}
        kept["agent"] = {k: agent[k] for k in FINAL_AGENT_KEYS if k in agent}
        with atomic_write(path, "wb", before_rename=fencing.guard(checkpoint["unit_id"], f"checkpoint {path}")) as f:
            torch.save(kept, f)
    previous = checkpoints.previous_path(path)
    if previous.exists():
        previous.unlink()
        fsync_dir(previous.parent)


def load_agent(agent: DroQ, i: int, state: dict) -> None:
    """Put a checkpoint's ``agent`` state into slot ``i`` of ``agent``; a finished unit's
    (``FINAL_AGENT_KEYS`` only) too: its target network starts as its critic and its optimiser
    state fresh, enough to play it or to record its rollouts again."""
    if "critic_target" not in state:
        state = {**agent.agent_state_dict(i), **state, "critic_target": state["critic"]}
    agent.load_agent_state_dict(i, state)


# --- RNG state as tensors and plain values ---------------------------------------------
def rng_state(generator: np.random.Generator) -> dict:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy_global": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "numpy": generator.bit_generator.state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict, generator: np.random.Generator) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy_global"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    generator.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


# --- playing ---------------------------------------------------------------------------
SEEDS_PER_UNIT = 1000  # episode seeds per unit seed


def episode_seeds(spec: configs.SpecialistConfig, n: int) -> list[int]:
    """The seeds of a unit's first ``n`` episodes: ``spec.seed * 1000 + i``. Rollout ``i`` plays
    with the ``i``-th (the lake's ``seed`` column); evaluations play the first ``eval_episodes``."""
    return [spec.seed * SEEDS_PER_UNIT + i for i in range(n)]


class EpisodePlayer:
    """One episode played a step at a time (``play`` plays it whole): the environment's random
    state seeded with ``seed`` first. Deterministic: the policy mean; otherwise actions sampled
    with a torch generator seeded with ``seed``, so the same agent, chunk and seed replay the
    same episode whatever the global RNG state. ``step()`` returns the ``Episode`` once it has
    ended, else None; the environment worker of a pack plays its slot's episodes this way
    between training steps (``workers.rl.envpool``)."""

    def __init__(self, agent: DroQ, env: PianoEnv, seed: int, deterministic: bool = True):
        self.agent, self.env, self.seed, self.deterministic = agent, env, seed, deterministic
        self.generator = None if deterministic else torch.Generator(device=agent.device).manual_seed(seed)
        self.obs, _ = env.reset(seed=seed)
        self.observations, self.actions, self.rewards = [], [], []
        self.pressed, self.target, self.fingering = [], [], []

    def step(self) -> Episode | None:
        action = self.agent.act(self.obs[None], deterministic=self.deterministic, generator=self.generator)[0]
        self.observations.append(self.obs)
        self.actions.append(action)
        self.obs, reward, terminated, truncated, info = self.env.step(action)
        self.rewards.append(reward)
        self.pressed.append(info["pressed"])
        self.target.append(info["target"])
        self.fingering.append(fingering_row(info["ot_assignment"]))
        return self._episode() if terminated or truncated else None

    def _episode(self) -> Episode:
        metrics = self.env.episode_metrics()
        return Episode(seed=self.seed, obs=np.stack(self.observations),
                       action=np.stack(self.actions).astype(np.float32), reward=np.asarray(self.rewards, np.float32),
                       pressed=np.stack(self.pressed).astype(bool), target=np.stack(self.target).astype(bool),
                       episode_return=float(np.sum(self.rewards)), precision=metrics["precision"],
                       recall=metrics["recall"], f1=metrics["f1"], ot_fingering=np.stack(self.fingering))


def play(agent: DroQ, env: PianoEnv, seed: int, deterministic: bool = True) -> Episode:
    """One whole episode (``EpisodePlayer`` says how it is seeded)."""
    player = EpisodePlayer(agent, env, seed, deterministic)
    while (episode := player.step()) is None:
        pass
    return episode


@dataclass(frozen=True)
class EpisodeStats:
    """What the rollout stage keeps of an episode once it is in the lake."""

    seed: int
    n_steps: int
    episode_return: float
    precision: float
    recall: float
    f1: float

    @classmethod
    def of(cls, episode: Episode) -> EpisodeStats:
        return cls(seed=episode.seed, n_steps=episode.n_steps, episode_return=episode.episode_return,
                   precision=episode.precision, recall=episode.recall, f1=episode.f1)


def summarise(episodes: Sequence[Episode | EpisodeStats], prefix: str) -> dict[str, float]:
    """Mean F1, precision, recall and return over ``episodes``, keys ``{prefix}/f1`` etc."""
    return {f"{prefix}/f1": float(np.mean([e.f1 for e in episodes])),
            f"{prefix}/precision": float(np.mean([e.precision for e in episodes])),
            f"{prefix}/recall": float(np.mean([e.recall for e in episodes])),
            f"{prefix}/return": float(np.mean([e.episode_return for e in episodes]))}


def record_rollouts(agent: DroQ, env: PianoEnv, writer: ShardWriter, seeds: Sequence[int],
                    deterministic: bool = False, progress: bool = False) -> list[EpisodeStats]:
    """Play one episode per seed and add each to ``writer`` as soon as it ends; only the
    episodes' summaries are kept, so memory does not grow with the number of rollouts."""
    stats = []
    bar = tqdm(seeds, disable=not progress, desc="rollouts", unit="episode", dynamic_ncols=True, mininterval=1.0)
    for seed in bar:
        episode = play(agent, env, seed=seed, deterministic=deterministic)
        writer.add(episode)
        stats.append(EpisodeStats.of(episode))
        del episode  # so that only one episode's observations exist while the next one is played
        bar.set_postfix({"f1": f"{np.mean([s.f1 for s in stats]):.3f}"}, refresh=False)
    bar.close()
    return stats


# --- the unit --------------------------------------------------------------------------
def finished_result(unit: UnitSpec, unit_dir: Path) -> UnitResult | None:
    """The saved result of a finished unit (whose shard still exists), else None. A finished
    unit's checkpoint that still holds its replay buffer (the run stopped right after writing
    ``result.json``) sheds it here."""
    saved = read_result(unit_dir)
    if not saved or not saved.get("done") or saved.get("unit_id") != unit.unit_id:
        return None
    if saved["shard_path"] is not None and not Path(saved["shard_path"]).exists():
        return None  # the lake lost the shard: record the rollouts again
    shed_checkpoint(unit_dir)
    return UnitResult(**{k: saved[k] for k in UnitResult.model_fields if k in saved})  # older files lack newer fields
