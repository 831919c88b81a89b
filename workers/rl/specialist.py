"""One unit of work: train a DroQ specialist on one chunk of one song, then record its rollouts.

``train_unit(unit, cfg, unit_dir, lake_root, report)``:

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
   ``specialist_f1`` is the mean rollout F1. Rollout ``i`` has the seed
   ``specialist.seed * 1000 + i`` (the lake's ``seed`` column): it seeds the environment's
   random state and, with ``specialist.rollout_policy: stochastic`` (the default), a torch
   generator from which the rollout samples its actions. RP1M's environment starts every
   episode in the same state, so sampling is what makes the rollouts differ, and the seed
   replays a rollout exactly (the final checkpoint holds the policy that played them).
   ``deterministic`` plays the policy mean instead. Evaluations during training always play
   the mean, with the first ``eval_episodes`` of those seeds.
5. writes ``unit_dir/result.json``: the ``UnitResult`` (``seconds``, ``eval_seconds`` and the
   speeds are this run's; ``stop_reason``, ``stop_step`` and ``budget_steps`` say why training
   ended) plus ``done``, ``resumed_from`` (the step of each resume) and ``steps_this_run``.

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
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import configs
from workers.rl import checkpoints
from workers.rl.budget import StopRule
from workers.rl.droq import DroQ
from workers.piano.env import PianoEnv, make_env
from workers.lake import Episode, Lake, ShardMeta, ShardWriter
from workers.piano.music import load_chunk, song_limits
from workers.rl.replay import ReplayBuffer
from workers.units import (ATTEMPTS_LOG, PID_FILE, UnitResult, UnitSpec, clear_pid_file,  # noqa: F401 (re-exported)
                           read_attempts, write_pid_file)
from configs.files import write_text_atomic

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
CHECKPOINT_FORMAT = 1

Report = Callable[[dict], None]


def read_result(unit_dir: Path) -> dict | None:
    """The unit's ``result.json`` as a dict, or None when there is none."""
    path = Path(unit_dir) / RESULT
    return json.loads(path.read_text()) if path.exists() else None


def load_checkpoint(unit_dir: Path, map_location: str | torch.device = "cpu") -> dict | None:
    """The unit's checkpoint (loaded with ``weights_only=True``), or None when there is none.

    A damaged checkpoint is skipped for the previous one (``workers.rl.checkpoints``).
    """
    return checkpoints.load(Path(unit_dir) / CHECKPOINT, map_location=map_location).state


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
def play(agent: DroQ, env: PianoEnv, seed: int, deterministic: bool = True) -> Episode:
    """One episode, the environment's random state seeded with ``seed`` first. Deterministic:
    the policy mean; otherwise actions sampled with a torch generator seeded with ``seed``, so
    the same agent, chunk and seed replay the same episode whatever the global RNG state."""
    generator = None if deterministic else torch.Generator(device=agent.device).manual_seed(seed)
    obs, _ = env.reset(seed=seed)
    observations, actions, rewards, pressed, target = [], [], [], [], []
    done = False
    while not done:
        action = agent.act(obs, deterministic=deterministic, generator=generator)
        observations.append(obs)
        actions.append(action)
        obs, reward, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        rewards.append(reward)
        pressed.append(info["pressed"])
        target.append(info["target"])
    metrics = env.episode_metrics()
    return Episode(seed=seed, obs=np.stack(observations), action=np.stack(actions).astype(np.float32),
                   reward=np.asarray(rewards, np.float32), pressed=np.stack(pressed).astype(bool),
                   target=np.stack(target).astype(bool), episode_return=float(np.sum(rewards)),
                   precision=metrics["precision"], recall=metrics["recall"], f1=metrics["f1"])


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
def _finished(unit: UnitSpec, unit_dir: Path) -> UnitResult | None:
    saved = read_result(unit_dir)
    if not saved or not saved.get("done") or saved.get("unit_id") != unit.unit_id:
        return None
    if saved["shard_path"] is not None and not Path(saved["shard_path"]).exists():
        return None  # the lake lost the shard: record the rollouts again
    return UnitResult(**{k: saved[k] for k in UnitResult.model_fields if k in saved})  # older files lack newer fields


def train_unit(unit: UnitSpec, cfg: configs.Config, unit_dir: Path, lake_root: Path,
               report: Report | None = None, progress: bool | None = None) -> UnitResult:
    """Train one specialist, commit its rollouts as one lake shard, and return the result.

    Resumes from ``unit_dir/checkpoint.pt`` when present; returns the saved result without
    training when the unit is already done. ``progress``: show a progress bar (default: when
    stderr is a terminal).
    """
    t_start = time.perf_counter()
    unit_dir = Path(unit_dir)
    unit_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.with_overrides(unit.overrides) if unit.overrides else cfg
    done = _finished(unit, unit_dir)
    if done is not None:
        return done
    report = report or (lambda metrics: None)
    progress = os.isatty(2) if progress is None else progress
    threads = torch.get_num_threads()
    # As many intra-op threads as CPUs reserved for the unit: units sharing a node must not
    # oversubscribe it (spinning OpenMP threads make a contended CPU update ~10x slower).
    torch.set_num_threads(max(1, int(cfg.campaign.cpus_per_unit)))
    try:
        return _train(unit, cfg, unit_dir, Path(lake_root), report, progress, t_start)
    finally:
        torch.set_num_threads(threads)
        clear_pid_file(unit_dir)


def _train(unit: UnitSpec, cfg: configs.Config, unit_dir: Path, lake_root: Path, report: Report,
           progress: bool, t_start: float) -> UnitResult:
    spec, droq = cfg.specialist, cfg.droq

    midi = load_chunk(unit.song_path, unit.chunk_index, cfg.env, expected_hash=unit.song_hash,
                      limits=song_limits(cfg.manifest))
    env = make_env(midi, cfg.env, seed=spec.seed)
    player = make_env(midi, cfg.env, seed=spec.seed + 1)  # evaluation and rollouts
    rng = seed_everything(spec.seed)
    agent = DroQ(env.obs_dim, env.action_dim, env.action_low, env.action_high, droq)
    buffer = ReplayBuffer(env.obs_dim, env.action_dim, droq.replay_capacity, droq.discount, droq.n_step,
                          seed=spec.seed)

    step, episodes_done, resumed_from, last_eval = 0, 0, [], {}
    rule = StopRule(spec.budget, spec.total_steps)
    # On the CPU: RNG states and the replay live there. A damaged checkpoint is moved aside.
    loaded = checkpoints.load(unit_dir / CHECKPOINT, repair=True)
    checkpoint = loaded.state
    if checkpoint is not None:
        if checkpoint["unit_id"] != unit.unit_id:
            raise ValueError(f"{unit_dir / CHECKPOINT}: belongs to unit {checkpoint['unit_id']}, "
                             f"not {unit.unit_id}; use another unit directory")
        agent.load_state_dict(checkpoint["agent"])
        buffer.load_state_dict(checkpoint["replay"])
        set_rng_state(checkpoint["rng"], rng)
        step, episodes_done = int(checkpoint["step"]), int(checkpoint["episodes"])
        resumed_from = list(checkpoint["resumed_from"]) + [step]
        last_eval = dict(checkpoint["last_eval"])
        if "budget" in checkpoint:  # checkpoints written before budgets existed start judging afresh
            rule.load_state_dict(checkpoint["budget"])
        report({"step": step, "resume/step": step})
    attempts = read_attempts(unit_dir)
    with open(unit_dir / ATTEMPTS_LOG, "a") as f:  # append-only: a torn last line is harmless
        f.write(json.dumps({"attempt": len(attempts) + 1, "start_step": step, "pid": os.getpid(),
                            "time": time.time(), **({"checkpoint": loaded.messages} if loaded.messages else {})}) + "\n")
    if loaded.messages:
        report({"step": step, "checkpoint/damaged": len(loaded.damaged)})
    write_pid_file(unit_dir, unit.unit_id)

    def save_checkpoint() -> None:
        state = {"format": CHECKPOINT_FORMAT, "unit_id": unit.unit_id, "step": step, "episodes": episodes_done,
                 "resumed_from": resumed_from, "last_eval": last_eval, "agent": agent.state_dict(),
                 "replay": buffer.state_dict(), "rng": rng_state(rng),
                 "budget": rule.state_dict()}
        checkpoints.save(state, unit_dir / CHECKPOINT)

    eval_seconds = 0.0

    def evaluate() -> dict[str, float]:
        nonlocal eval_seconds
        t = time.perf_counter()
        played = [play(agent, player, seed=spec.seed * 1000 + i) for i in range(spec.eval_episodes)]
        eval_seconds += time.perf_counter() - t
        return summarise(played, "eval")

    # --- training --------------------------------------------------------------------
    start_step, start_updates = step, agent.updates
    t_train = time.perf_counter()
    t_log, step_log, updates_log = t_train, step, agent.updates
    returns, f1s, update_metrics = [], [], {}
    buffer.end_episode()  # the episode under way at the checkpoint is not restored
    obs, episode_return = env.reset()[0], 0.0
    bar = tqdm(total=rule.end_step, initial=step, disable=not progress, desc=unit.unit_id, unit="step",
               dynamic_ncols=True, mininterval=1.0)
    while step < rule.end_step and not rule.stopped:
        step += 1
        if step <= droq.warmup_steps:
            action = rng.uniform(env.action_low, env.action_high).astype(np.float32)
        else:
            action = agent.act(obs)
        next_obs, reward, terminated, truncated, info = env.step(action)
        ended = terminated or truncated  # the end of the chunk is a time limit: truncated, bootstrapped
        buffer.add(obs, action, reward, next_obs, terminated, truncated)
        episode_return += reward
        obs = next_obs
        if ended:
            returns.append(episode_return)
            f1s.append(env.episode_metrics()["f1"])
            episodes_done += 1
            obs, episode_return = env.reset()[0], 0.0
        if step > droq.warmup_steps:
            update_metrics = agent.update(buffer)
        bar.update(1)

        if step % spec.log_interval == 0:
            now = time.perf_counter()
            metrics = {"step": step, **update_metrics, "train/episodes": episodes_done,
                       "perf/env_steps_per_s": (step - step_log) / (now - t_log),
                       "perf/updates_per_s": (agent.updates - updates_log) / (now - t_log)}
            if returns:
                metrics.update({"train/return": float(np.mean(returns)), "train/f1": float(np.mean(f1s))})
            report(metrics)
            t_log, step_log, updates_log, returns, f1s = now, step, agent.updates, [], []
        if step % spec.eval_interval == 0 or step in (spec.total_steps, rule.end_step):
            last_eval = evaluate()
            # The budget judges every evaluation; a stop ends training at this step (see workers.rl.budget).
            stop, reason = rule.observe(step, last_eval["eval/f1"])
            report({"step": step, **last_eval, "perf/eval_share": eval_seconds / (time.perf_counter() - t_train),
                    **({"budget/stop_step": step} if stop else {})})
            bar.set_postfix({"eval_f1": f"{last_eval['eval/f1']:.3f}"})
        if step % spec.checkpoint_interval == 0 or rule.stopped:
            save_checkpoint()
            report({"step": step, "checkpoint_step": step})  # the campaign store shows it while the unit runs
    bar.close()
    train_seconds = time.perf_counter() - t_train
    env_steps_per_s = (step - start_step) / train_seconds if step > start_step else 0.0
    updates_per_s = (agent.updates - start_updates) / train_seconds if step > start_step else 0.0

    # --- rollouts into the lake ------------------------------------------------------
    shard_path = None
    if spec.rollouts > 0:
        seeds = [spec.seed * 1000 + i for i in range(spec.rollouts)]
        with Lake(lake_root, cfg.lake).shard_writer(unit.unit_id, unit.song_hash) as writer:
            rollouts = record_rollouts(agent, player, writer, seeds, progress=progress,
                                       deterministic=spec.rollout_policy == "deterministic")
            summary = summarise(rollouts, "rollout")
            meta = ShardMeta(unit_id=unit.unit_id, song_hash=unit.song_hash, song_name=unit.song_name,
                             chunk_index=unit.chunk_index, split=unit.split, config_hash=unit.config_hash,
                             specialist_f1=summary["rollout/f1"])
            shard_path = str(writer.commit(meta).path)
        report({"step": step, **summary})
    else:
        summary = {k.replace("eval/", "rollout/"): v for k, v in (last_eval or evaluate()).items()}
    env.close()
    player.close()

    result = UnitResult(unit_id=unit.unit_id, f1=summary["rollout/f1"], precision=summary["rollout/precision"],
                        recall=summary["rollout/recall"], episode_return=summary["rollout/return"], steps=step,
                        shard_path=shard_path, seconds=time.perf_counter() - t_start,
                        env_steps_per_s=env_steps_per_s, updates_per_s=updates_per_s,
                        stop_reason=rule.reason, stop_step=rule.stop_step, budget_steps=spec.total_steps,
                        eval_seconds=eval_seconds)
    saved = {**result.model_dump(), "done": True, "resumed_from": resumed_from,
             "steps_this_run": step - start_step, "config_hash": unit.config_hash}
    write_text_atomic(unit_dir / RESULT, json.dumps(saved, indent=2))
    return result
