"""A synthetic unit of work: the specialist's contract without the physics.

``run_unit`` has ``workers.rl.pack.train_unit``'s signature and result. It sleeps
``campaign.synthetic.sleep_s`` spread over ``campaign.synthetic.steps`` progress steps,
checkpoints its step counter every ``checkpoint_every`` steps (and resumes from it), reports
metrics, and ends by committing one small lake shard of random episodes. It lets the
orchestrator be tested and benchmarked at scale (thousands of units on one machine).

Drills for failure handling, all recorded in the unit directory:

- ``worker.pid``: the process running the unit while an attempt runs (kill
  ``workers.units.live_worker_pid(unit_dir)`` to simulate a crash);
- ``attempts.jsonl``: one line per start, ``{"attempt", "start_step", "pid", "time"}``: shows
  whether a restarted unit resumed from its checkpoint;
- units whose id matches the glob ``campaign.synthetic.fail_pattern`` raise
  ``SyntheticFailure`` on their first ``fail_first_attempts`` starts.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import configs
from workers.lake import Lake, ShardMeta, synthetic_episode
from workers.units import (ATTEMPTS_LOG, PID_FILE, MemberOutcome, Refill, UnitResult, UnitSpec,  # noqa: F401 (re-exported)
                           clear_pid_file, read_attempts, write_pid_file)
from configs.files import write_text_atomic
from workers import fencing

CHECKPOINT = "checkpoint.json"


class SyntheticFailure(RuntimeError):
    """The failure drill: raised on purpose by units matching ``campaign.synthetic.fail_pattern``."""


def read_checkpoint_step(unit_dir: Path) -> int:
    """The step of the unit's last checkpoint (0 when it has none)."""
    path = Path(unit_dir) / CHECKPOINT
    return int(json.loads(path.read_text())["step"]) if path.exists() else 0


def _unit_seed(unit_id: str) -> int:
    return int.from_bytes(hashlib.sha256(unit_id.encode()).digest()[:4], "little")


def run_unit(unit: UnitSpec, cfg: configs.Config, unit_dir: Path, lake_root: Path,
             report: Callable[[dict], None] | None = None) -> UnitResult:
    """Run one synthetic unit: resume from its checkpoint, sleep, report, commit one shard.
    ``cfg`` is the campaign's; the unit's overrides are applied here."""
    cfg = unit.config(cfg)
    unit_dir = Path(unit_dir)
    unit_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(unit, cfg, unit_dir, lake_root, report)
    finally:
        clear_pid_file(unit_dir)


def _run(unit: UnitSpec, cfg: configs.Config, unit_dir: Path, lake_root: Path,
         report: Callable[[dict], None] | None) -> UnitResult:
    syn = cfg.campaign.synthetic
    t0 = time.perf_counter()

    start_step = read_checkpoint_step(unit_dir)
    attempt = len(read_attempts(unit_dir)) + 1
    with open(unit_dir / ATTEMPTS_LOG, "a") as f:  # append-only log: a torn last line is harmless
        f.write(json.dumps({"attempt": attempt, "start_step": start_step, "pid": os.getpid(), "time": time.time()}) + "\n")
    write_pid_file(unit_dir, unit.unit_id)

    if syn.fail_pattern and fnmatch.fnmatchcase(unit.unit_id, syn.fail_pattern) and attempt <= syn.fail_first_attempts:
        raise SyntheticFailure(f"unit {unit.unit_id}: planned failure on attempt {attempt} of {syn.fail_first_attempts}")

    seed = _unit_seed(unit.unit_id)
    # A deterministic F1 per unit around f1_mean, so repeated runs agree.
    f1 = min(1.0, max(0.0, syn.f1_mean + ((seed % 1000) / 1000.0 - 0.5) * 0.2))
    sleep_per_step = syn.sleep_s / syn.steps
    for step in range(start_step + 1, syn.steps + 1):
        time.sleep(sleep_per_step)
        if step % syn.checkpoint_every == 0 or step == syn.steps:
            write_text_atomic(unit_dir / CHECKPOINT, json.dumps({"step": step}),
                              before_rename=fencing.guard(unit.unit_id, f"checkpoint {unit_dir / CHECKPOINT}"))
            if report is not None:
                report({"step": step, "checkpoint_step": step, "train/return": f1 * step})

    episodes = [synthetic_episode(syn.steps_per_episode, seed=seed + k, f1=f1, lookahead=cfg.env.n_steps_lookahead)
                for k in range(syn.episodes)]
    meta = ShardMeta(unit_id=unit.unit_id, song_hash=unit.song_hash, song_name=unit.song_name,
                     chunk_index=unit.chunk_index, split=unit.split, config_hash=unit.config_hash, specialist_f1=f1)
    shard = Lake(lake_root, cfg.lake).commit_shard(meta, episodes)
    seconds = time.perf_counter() - t0
    return UnitResult(
        unit_id=unit.unit_id, f1=f1, precision=min(1.0, f1 + 0.05), recall=f1,
        episode_return=float(sum(e.episode_return for e in episodes) / len(episodes)),
        steps=syn.steps, shard_path=str(shard.path), seconds=seconds,
        env_steps_per_s=syn.steps_per_episode * syn.episodes / seconds, updates_per_s=0.0,
    )


def run_pack(units: Sequence[UnitSpec], cfg: configs.Config, unit_dirs: Sequence[Path], lake_root: Path,
             reports: Sequence[Callable[[dict], None] | None], cpus: float,
             refill: Refill | None = None) -> list[MemberOutcome]:
    """A synthetic pack: its units one after another in this process, each failure caught for
    its unit alone, each freed slot refilled through ``refill`` as a real pack's is (what the
    orchestrator needs of ``workers.rl.pack.run_pack``, cheaply)."""
    work = [(slot, unit, Path(unit_dir), report) for slot, (unit, unit_dir, report)
            in enumerate(zip(units, unit_dirs, reports))]
    outcomes = []
    while work or (refill is not None and refill.waiting):
        if refill is not None:
            work += [(slot, a.unit, a.unit_dir, a.report) for slot, a in refill.poll() if a is not None]
        if not work:
            time.sleep(0.02)  # every slot free: wait for the driver's answers
            continue
        slot, unit, unit_dir, report = work.pop(0)
        try:
            outcome = MemberOutcome(unit.unit_id, run_unit(unit, cfg, unit_dir, lake_root, report))
        except Exception as e:  # noqa: BLE001 - this unit fails alone
            outcome = MemberOutcome(unit.unit_id, None, e)
        outcomes.append(outcome)
        if refill is not None:
            refill.done(outcome)
            refill.request(slot)
    return outcomes


def make_units(n_songs: int, chunks_per_song: int, config_hash: str, split: str = "train") -> list[UnitSpec]:
    """Generated units for synthetic campaigns at scale (no MIDI files behind them)."""
    units = []
    for s in range(n_songs):
        song_hash = hashlib.sha256(f"synthetic-song-{s}".encode()).hexdigest()
        for c in range(chunks_per_song):
            units.append(UnitSpec.create(song_path=f"synthetic://song-{s}", song_hash=song_hash,
                                         song_name=f"synthetic-{s:05d}", chunk_index=c, config_hash=config_hash,
                                         split=split))
    return units
