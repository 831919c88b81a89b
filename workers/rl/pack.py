"""A pack: K specialist units trained together in one process, one learner for all of them.

``train_pack(units, cfg, unit_dirs, lake_root, reports)`` trains every unit as ``train_unit``
trains one (``workers.rl.specialist`` says how; ``train_unit`` is a pack of one whose
environment runs in this process), and returns one ``MemberOutcome`` per unit: its
``UnitResult`` or the error that stopped it.

The loop, per environment step of the pack (CleanRL-style, top to bottom in ``Pack._loop``):

1. act: members warming up draw uniform random actions from their own generator; the learner
   acts for all K at once (one batched forward pass);
2. step the environments of the members that train, together (``workers.rl.envpool``: worker
   processes with shared memory, or this process for a pack of one);
3. store each member's transition in its own replay buffer;
4. update: one call updates the agents of every member in ``TRAINING``
   (``DroQ(num_agents=K).update`` on their buffers; the others' buffers are None: they sit it out);
5. per member, the handler of "a training step done" (``Pack._stepped``): report metrics,
   evaluate, checkpoint, and when its budget ends its training, record its rollouts.

Each member is in one ``State`` at a time, and one handler per event moves it:

=============  ==============================================================================
state          what the member does
=============  ==============================================================================
WARMING_UP     acts at random (``droq.warmup_steps``), sits out the update
TRAINING       acts with its policy, updated every step
EVALUATING     its evaluation episodes are being played; sits out acting, stepping, updating
RECORDING      its last episodes are being played: rollouts into its lake shard (or, with
               ``specialist.rollouts: 0`` and no evaluation yet, a last evaluation)
DONE           ``result.json`` written (or found at the start), the outcome holds its result
FAILED         the outcome holds the error; its slot's environment is closed
=============  ==============================================================================

::

    start ----------> WARMING_UP -> TRAINING        (warm-up over, at the end of a step)
    a step done:      WARMING_UP | TRAINING -> EVALUATING      (an evaluation is due)
                                            -> RECORDING       (its training is over)
                                            -> DONE            (no episodes left to play)
    a play finished:  EVALUATING -> WARMING_UP | TRAINING | RECORDING | DONE
                      RECORDING  -> DONE
    its worker died:  any state  -> the same state (``Pack._worker_lost``: the pool has started a
                      new worker; the episode under way is lost, episodes being played are played
                      again); a third death under the same member -> FAILED
    anything raised:  any state  -> FAILED  (its environment, an episode, a checkpoint: it alone)

A unit trained before whose rollouts were not committed starts in RECORDING; a finished unit
starts (and stays) DONE. A member's agent, replay buffer and progress live in this process, so
an environment worker that dies costs its members only the episode under way: nothing goes back
to a checkpoint, and the members of the other workers do not notice. The environments' sizes are
RP1M's (``workers.piano.layout``); the pool builds each member's environments from one reading
of its chunk (``workers.rl.envpool``). Evaluations and rollouts are episodes played with the member's policy
as it is at that step. With environment workers the slot's worker plays them (``EnvPool.play``:
a CPU copy of the policy, a second environment of the chunk) between the pack's training steps,
and ``collect`` hands the result to ``Pack._played`` while the other members train on. Without
workers (a pack of one as a lone unit), this process plays them at once, on the learner's
device, and hands the result to the same ``Pack._played``: both paths make the same transitions.

Each member keeps its own identity, unit directory, checkpoint (its slice of the learner, the
same format as a single unit's, so it resumes alone or in any other pack), attempts log,
metrics callback (its MLflow run) and shard.

A freed slot (its member DONE or FAILED) is refilled when the pack has a ``Refill``
(``workers.units``; the scheduler gives one when ``campaign.pack_refill`` is on): the member's
outcome goes back at once, the pack asks for the next pending unit of the same config, and
trains it in that slot, its agent re-initialised as a fresh agent with its own seed (optimiser
state and temperature reset), its replay buffer new, its environment rebuilt in the slot's
worker, or resumed from its own checkpoint when it has one. Without a refill, or when no
pending unit is left, the slot stays idle and costs nothing but its row of the stacked update.
The pack ends when no slot trains or plays and no request is unanswered. Members of one pack
must share the network and update settings (``droq.*``) and the environment's dimensions; the
scheduler only packs units of one config.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import configs
from workers.lake import Lake, ShardMeta
from workers.piano.env import PianoEnv
from workers.piano.layout import ACTION_DIM, OBS_DIM
from workers.piano.music import song_limits
from workers.rl import checkpoints
from workers.rl.budget import StopRule
from workers.rl.droq import DroQ, resolve_device
from workers.rl.envpool import EnvPool, EnvSpec, PlayJob, PlayResult, agent_bytes, make_pool
from workers.rl.replay import ReplayBuffer
from workers.rl.specialist import (
    CHECKPOINT,
    FINAL_AGENT_KEYS,
    EpisodeStats,
    Report,
    episode_seeds,
    finished_result,
    load_agent,
    play,
    record_rollouts,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    shed_checkpoint,
    summarise,
    write_result,
)
from workers.units import (
    ATTEMPTS_LOG,
    Arrival,
    MemberOutcome,
    Refill,
    UnitResult,
    UnitSpec,
    clear_pid_file,
    read_attempts,
    write_pid_file,
)


class MemberFailed(RuntimeError):
    """A member's environment, evaluation or rollouts failed; the text carries the cause."""


WORKERS_LOST_ALLOWED = 2  # a member whose environment workers die a third time fails (a crash that repeats)


class State(Enum):
    """Where a member of a pack is (the module docstring's table)."""

    WARMING_UP = "warming up"
    TRAINING = "training"
    EVALUATING = "evaluating"
    RECORDING = "recording"
    DONE = "done"
    FAILED = "failed"


TRAINS = (State.WARMING_UP, State.TRAINING)  # acts, steps its environment, stores transitions
PLAYS = (State.EVALUATING, State.RECORDING)  # waits for the episodes it plays
ENDED = (State.DONE, State.FAILED)  # has its outcome; its slot is free


@dataclass(frozen=True)
class Identity:
    """Which unit a member is, and where its results go."""

    unit: UnitSpec
    cfg: configs.Config  # the pack's config with the unit's overrides
    unit_dir: Path
    report: Report  # its metrics callback (its MLflow run)


@dataclass
class Slot:
    """A member's row of the learner and of the environment pool, and what it trains with."""

    index: int
    rng: np.random.Generator  # its warm-up actions
    buffer: ReplayBuffer | None = None
    player: PianoEnv | None = None  # evaluations and rollouts in this process (a pool without workers)
    job: PlayJob | None = None  # the episodes its worker plays now
    workers_lost: int = 0  # environment workers that died under it
    released: bool = False  # freed: outcome handed back, refill asked for


@dataclass
class Progress:
    """How far its training is: what its checkpoint keeps, and where this run started."""

    rule: StopRule  # when it stops training (specialist.budget)
    step: int = 0
    episodes: int = 0
    updates: int = 0
    resumed_from: list[int] = field(default_factory=list)
    last_eval: dict = field(default_factory=dict)
    start_step: int = 0  # at this run's start
    start_updates: int = 0

    @property
    def trained(self) -> bool:
        """Its training is over: stopped by its budget, or at its last step."""
        return self.rule.stopped or self.step >= self.rule.end_step


@dataclass
class Clock:
    """This run's times (``time.perf_counter``)."""

    started: float  # its attempt started in this pack
    training: float = 0.0  # it started training here
    eval_seconds: float = 0.0  # in evaluations
    train_seconds: float = 0.0  # from its start here to the end of its training


@dataclass
class LogWindow:
    """What its next ``log_interval`` report sums up, since the last one."""

    since: float = 0.0
    step: int = 0
    updates: int = 0
    episode_return: float = 0.0  # of the episode under way
    returns: list[float] = field(default_factory=list)  # of episodes ended since
    f1s: list[float] = field(default_factory=list)
    update_metrics: dict = field(default_factory=dict)  # of its last update


@dataclass
class Member:
    """One unit inside a pack, in one ``State``."""

    id: Identity
    slot: Slot
    progress: Progress
    clock: Clock
    log: LogWindow = field(default_factory=LogWindow)
    state: State = State.WARMING_UP
    outcome: MemberOutcome | None = None

    @property
    def spec(self) -> configs.SpecialistConfig:
        return self.id.cfg.specialist


class Pack:
    """K units trained in one process (module docstring)."""

    def __init__(self, units: Sequence[UnitSpec], cfg: configs.Config, unit_dirs: Sequence[Path], lake_root: Path,
                 reports: Sequence[Report | None], env_workers: int = 0, progress: bool = False,
                 refill: Refill | None = None, play_in_workers: bool = True):
        if not units or not len(units) == len(unit_dirs) == len(reports):
            raise ValueError("a pack needs one unit directory and one report callback per unit")
        self.lake_root, self.env_workers, self.progress = Path(lake_root), env_workers, progress
        self.play_in_workers, self.base_cfg, self.refill = play_in_workers, cfg, refill
        self.units, self.unit_dirs, self.reports = list(units), [Path(d) for d in unit_dirs], list(reports)
        cfgs = [self._cfg(u) for u in units]
        if len({json.dumps(c.droq.model_dump(), sort_keys=True) for c in cfgs}) > 1:
            raise ValueError("units of one pack must share droq.* settings; pack units of one config")
        self.cfg = cfgs[0]
        self.everyone: list[Member] = []  # every member in the order it joined: the outcomes' order
        self.pool: EnvPool | None = None
        self.learner: DroQ | None = None  # agent i is slot i's
        self.bounds: tuple[np.ndarray, np.ndarray] | None = None  # every member's (action_low, action_high)
        self._lone: DroQ | None = None  # one agent of the learner, to play episodes in this process
        self.bar: tqdm | None = None

    def _cfg(self, unit: UnitSpec) -> configs.Config:
        return unit.config(self.base_cfg)

    def _member(self, index: int, unit: UnitSpec, unit_dir: Path, report: Report | None) -> Member:
        """A member for ``unit`` in slot ``index``; DONE at once when the unit finished before
        (a finished unit is never trained again)."""
        cfg = self._cfg(unit)
        unit_dir = Path(unit_dir)
        unit_dir.mkdir(parents=True, exist_ok=True)
        m = Member(Identity(unit, cfg, unit_dir, report or (lambda metrics: None)),
                   Slot(index, np.random.default_rng(cfg.specialist.seed)),
                   Progress(StopRule(cfg.specialist.budget, cfg.specialist.total_steps)), Clock(time.perf_counter()))
        self.everyone.append(m)
        done = finished_result(unit, unit_dir)
        if done is not None:
            m.state, m.outcome = State.DONE, MemberOutcome(unit.unit_id, done)
        return m

    # --- setup -----------------------------------------------------------------------
    def run(self) -> list[MemberOutcome]:
        members = [self._member(i, *args) for i, args in enumerate(zip(self.units, self.unit_dirs, self.reports))]
        try:
            if any(m.state not in ENDED for m in members):
                self._train(members)
        finally:
            for m in self.everyone:
                if m.slot.player is not None:
                    m.slot.player.close()
                clear_pid_file(m.id.unit_dir)  # the attempt ended (the process may run other units next)
        for m in members:
            if not m.slot.released:  # a pack that never started: no slot to refill
                self._release(m)
        return [m.outcome for m in self.everyone]

    def _train(self, members: list[Member]) -> None:
        specs = [self._env_spec(m) for m in members]
        with make_pool(specs, OBS_DIM, ACTION_DIM, self.env_workers, self.play_in_workers) as pool:
            self.pool = pool
            try:
                self._train_in(members, pool)
            finally:
                self.pool = None

    def _train_in(self, members: list[Member], pool: EnvPool) -> None:
        for m in members:
            if m.state in ENDED:
                pool.drop(m.slot.index)
            elif self._inline:  # first: a broken chunk raises its own error here (SongError, ...)
                self._guarded(m, self._make_player, m)
        for slot, error in pool.reset([m.slot.index for m in members if m.state not in ENDED]).items():
            self._fail(members[slot], MemberFailed(error))
        self.bounds = pool.action_bounds
        if self.bounds is None:  # no environment could be made: every member has failed
            return
        # The first member's seed seeds the process (a pack of one: exactly as a single unit).
        seed_everything(members[0].spec.seed)
        # Agent i starts as a lone agent with member i's specialist.seed would.
        self.learner = DroQ(OBS_DIM, ACTION_DIM, *self.bounds, self.cfg.droq, seed=[m.spec.seed for m in members],
                            num_agents=len(members))
        for m in members:
            if m.state not in ENDED:
                self._guarded(m, self._resume, m, len(members) == 1)
        self.bar = tqdm(total=sum(m.progress.rule.end_step for m in members),
                        initial=sum(m.progress.step for m in members), disable=not self.progress, unit="step",
                        dynamic_ncols=True, mininterval=1.0,
                        desc=members[0].id.unit.unit_id if len(members) == 1 else f"pack of {len(members)}")
        t0 = time.perf_counter()
        for m in members:
            if m.state not in ENDED:
                self._guarded(m, self._start, m, t0)
        self._loop(members)
        self.bar.close()

    @property
    def _inline(self) -> bool:
        """Evaluations and rollouts are played in this process (no workers, or told so)."""
        return self.env_workers < 1 or not self.play_in_workers

    @staticmethod
    def _env_spec(m: Member) -> EnvSpec:
        cfg = m.id.cfg
        return EnvSpec(m.id.unit.song_path, m.id.unit.chunk_index, m.id.unit.song_hash, cfg.env.model_dump(),
                       cfg.specialist.seed, song_limits(cfg.manifest))

    def _make_player(self, m: Member) -> None:
        """The environment ``m`` plays its episodes in, in this process (``_inline``)."""
        m.slot.player = self._env_spec(m).make(play=True)

    def _resume(self, m: Member, restore_process_rng: bool) -> None:
        """A fresh replay buffer, then the member's checkpoint when it has one (a damaged one is
        moved aside), its attempt logged. On the CPU: RNG states and the replay live there."""
        droq, p = m.id.cfg.droq, m.progress
        m.slot.buffer = ReplayBuffer(OBS_DIM, ACTION_DIM, droq.replay_capacity, droq.discount, droq.n_step,
                                     seed=m.spec.seed)
        loaded = checkpoints.load(m.id.unit_dir / CHECKPOINT, repair=True)
        checkpoint = loaded.state
        if checkpoint is not None:
            if checkpoint["unit_id"] != m.id.unit.unit_id:
                raise ValueError(f"{m.id.unit_dir}: its checkpoint belongs to unit {checkpoint['unit_id']}, "
                                 f"not {m.id.unit.unit_id}; use another unit directory")
            load_agent(self.learner, m.slot.index, checkpoint["agent"])
            if "replay" in checkpoint:  # else a finished unit whose shard was lost: rollouts only
                m.slot.buffer.load_state_dict(checkpoint["replay"])
                if restore_process_rng:
                    set_rng_state(checkpoint["rng"], m.slot.rng)
                else:  # the process-wide RNGs are the pack's; the member's own generator is its
                    m.slot.rng.bit_generator.state = checkpoint["rng"]["numpy"]
            p.step, p.episodes = int(checkpoint["step"]), int(checkpoint["episodes"])
            p.updates = int(checkpoint["agent"]["updates"])
            p.resumed_from = list(checkpoint["resumed_from"]) + [p.step]
            p.last_eval = dict(checkpoint["last_eval"])
            if "budget" in checkpoint:  # checkpoints written before budgets existed start judging afresh
                p.rule.load_state_dict(checkpoint["budget"])
            m.id.report({"step": p.step, "resume/step": p.step})
        with open(m.id.unit_dir / ATTEMPTS_LOG, "a") as f:  # append-only: a torn last line is harmless
            f.write(json.dumps({"attempt": len(read_attempts(m.id.unit_dir)) + 1, "start_step": p.step,
                                "pid": os.getpid(), "time": time.time(),
                                **({"checkpoint": loaded.messages} if loaded.messages else {})}) + "\n")
        if loaded.messages:
            m.id.report({"step": p.step, "checkpoint/damaged": len(loaded.damaged)})
        write_pid_file(m.id.unit_dir, m.id.unit.unit_id)
        p.start_step, p.start_updates = p.step, p.updates
        m.slot.buffer.end_episode()  # the episode under way at the checkpoint is not restored

    def _arrive(self, index: int, arrival: Arrival) -> Member:
        """A unit sent to refill slot ``index``: a fresh agent and replay in the slot (or its own
        checkpoint), its environment in the slot's worker. Fails alone, like a launched member."""
        m = self._member(index, arrival.unit, arrival.unit_dir, arrival.report)
        if m.state is State.DONE:
            return m
        unit = m.id.unit
        try:
            if m.id.cfg.droq != self.cfg.droq:
                raise ValueError(f"unit {unit.unit_id}: its droq.* settings differ from the pack's")
            error = self.pool.put(index, self._env_spec(m))  # the pool checks its sizes and bounds
            if error is not None:
                raise MemberFailed(f"unit {unit.unit_id}: its environment raised\n{error}")
            if self._inline:
                self._make_player(m)
            self.learner.reset_agent(index, m.spec.seed)
            self._resume(m, restore_process_rng=False)
            errors = self.pool.reset([index])
            if errors:
                raise MemberFailed(f"unit {unit.unit_id}: its environment raised\n{errors[index]}")
        except Exception as e:  # noqa: BLE001 - a broken unit fails alone
            self._fail(m, e)
            return m
        self.bar.total += m.progress.rule.end_step
        self.bar.update(m.progress.step)
        self._guarded(m, self._start, m, time.perf_counter())
        return m

    # --- training --------------------------------------------------------------------
    def _loop(self, members: list[Member]) -> None:
        pool, learner, droq = self.pool, self.learner, self.cfg.droq
        low, high = self.bounds
        collected = 0.0
        while True:
            # 0. episodes the workers have played; freed slots: hand back their outcomes, take in
            # the units sent to refill them
            busy = [m for m in members if m.state in PLAYS]
            if busy and time.perf_counter() - collected >= 0.02:
                collected = time.perf_counter()
                for slot, played in pool.collect([m.slot.index for m in busy]).items():
                    self._collected(members[slot], played)
            for slot in pool.take_lost():
                self._guarded(members[slot], self._worker_lost, members[slot])
            for m in members:
                if m.state in ENDED and not m.slot.released:
                    self._release(m)
            if self.refill is not None:
                for slot, arrival in self.refill.poll():
                    if arrival is not None:
                        members[slot] = self._arrive(slot, arrival)
            running = [m for m in members if m.state in TRAINS]
            if not running:
                if busy or (self.refill is not None and (self.refill.waiting or
                                                         any(not m.slot.released for m in members))):
                    time.sleep(0.02)  # no slot trains: wait for the episodes played, or the answers
                    continue
                break
            # 1. act
            obs = pool.obs.copy()
            if any(m.state is State.TRAINING for m in running):
                pool.action[:] = learner.act(obs)
            for m in running:
                if m.state is State.WARMING_UP:
                    pool.action[m.slot.index] = m.slot.rng.uniform(low, high).astype(np.float32)
            # 2. step the environments together
            errors = pool.step([m.slot.index for m in running])
            lost = pool.take_lost()  # their worker died: no step was taken
            # 3. store the transitions
            for m in running:
                s = m.slot.index
                if s in errors:
                    self._fail(m, MemberFailed(f"unit {m.id.unit.unit_id}: its environment raised\n{errors[s]}"))
                    continue
                if s in lost:
                    continue
                m.progress.step += 1
                ended, terminated, reward = bool(pool.ended[s]), bool(pool.terminated[s]), float(pool.reward[s])
                m.slot.buffer.add(obs[s], pool.action[s], reward, pool.next_obs[s], terminated,
                                  truncated=ended and not terminated)
                m.log.episode_return += reward
                if ended:
                    m.log.returns.append(m.log.episode_return)
                    m.log.f1s.append(float(pool.episode_f1[s]))
                    m.progress.episodes += 1
                    m.log.episode_return = 0.0
            stepped = [m for m in running if m.state in TRAINS and m.slot.index not in lost]
            self.bar.update(len(stepped))
            for slot in lost:
                self._guarded(members[slot], self._worker_lost, members[slot])
            # 4. update the agents of members in training, in one call (the others sit it out, unchanged)
            learning = [m for m in stepped if m.state is State.TRAINING]
            if learning:
                buffers = [None] * len(members)
                for m in learning:
                    buffers[m.slot.index] = m.slot.buffer
                metrics = learner.update(buffers)
                for m in learning:
                    m.log.update_metrics = metrics[m.slot.index]
                    m.progress.updates += droq.utd_ratio
            # 5. per member: report, evaluate, checkpoint, finish
            for m in stepped:
                self._guarded(m, self._stepped, m)
            if busy:
                self.bar.set_postfix({"playing": len(busy)}, refresh=False)

    def _guarded(self, m: Member, handler, *args) -> None:
        """Run one of ``m``'s handlers; whatever it raises fails ``m`` alone."""
        try:
            handler(*args)
        except Exception as e:  # noqa: BLE001 - its environment, episodes or files: it alone
            self._fail(m, e)

    def _start(self, m: Member, now: float) -> None:
        """A member joins the loop: warming up or training from its step, or, trained before
        but its rollouts not committed, recording them."""
        m.clock.training = m.log.since = now
        m.log.step, m.log.updates = m.progress.step, m.progress.updates
        self._trained_or_on(m)

    def _trained_or_on(self, m: Member) -> None:
        """Record when its training is over, else go on acting (at random until its warm-up ends)."""
        if m.progress.trained:
            self._record(m)
        else:
            m.state = State.WARMING_UP if m.progress.step < m.id.cfg.droq.warmup_steps else State.TRAINING

    # --- the handlers ----------------------------------------------------------------
    def _stepped(self, m: Member) -> None:
        """A training step done: report, then evaluate (when due), checkpoint, go on or record."""
        spec, p = m.spec, m.progress
        if p.step % spec.log_interval == 0:
            self._log(m)
        if p.step % spec.eval_interval == 0 or p.step in (spec.total_steps, p.rule.end_step):
            # Its training waits for the evaluation (the policy of this step), the others' not.
            self._play(m, State.EVALUATING, episode_seeds(spec, spec.eval_episodes), deterministic=True)
        else:
            self._checkpoint(m)
            self._trained_or_on(m)

    def _collected(self, m: Member, played: PlayResult) -> None:
        """Episodes a worker played for ``m`` are in (or they raised)."""
        if m.state not in PLAYS:  # it failed meanwhile: nothing waits for them
            return
        m.slot.job = None
        if played.error is not None:
            error = MemberFailed(f"unit {m.id.unit.unit_id}: an episode it played raised\n{played.error}")
            error.__cause__ = played.cause  # an OSError: a full disk is recognised as the node's fault
            self._fail(m, error)
            return
        self._guarded(m, self._played, m, played)

    def _played(self, m: Member, played: PlayResult) -> None:
        """A play finished: an evaluation (judged by the budget, then checkpoint and go on or
        record), or the last episodes (the result)."""
        p = m.progress
        if m.state is State.EVALUATING:
            m.clock.eval_seconds += played.seconds
            p.last_eval = summarise(played.stats, "eval")
            # The budget judges every evaluation; a stop ends training at this step (see workers.rl.budget).
            stop, _ = p.rule.observe(p.step, p.last_eval["eval/f1"])
            m.id.report({"step": p.step, **p.last_eval,
                         "perf/eval_share": m.clock.eval_seconds / (time.perf_counter() - m.clock.training),
                         **({"budget/stop_step": p.step} if stop else {})})
            if len(self.units) == 1:
                self.bar.set_postfix({"eval_f1": f"{p.last_eval['eval/f1']:.3f}"})
            self._checkpoint(m)
            self._trained_or_on(m)
        elif m.state is State.RECORDING:
            if m.spec.rollouts > 0:
                summary = summarise(played.stats, "rollout")
                m.id.report({"step": p.step, **summary})
                self._conclude(m, summary, played.shard_path)
            else:  # a last evaluation stands for the rollouts
                m.clock.eval_seconds += played.seconds
                self._conclude(m, summarise(played.stats, "rollout"), None)
        else:
            raise RuntimeError(f"unit {m.id.unit.unit_id}: episodes came back while {m.state.value}")

    def _worker_lost(self, m: Member) -> None:
        """The environment worker of ``m``'s slot died and the pool has started another: ``m``
        goes on from where it was (its agent, replay and progress live in this process); only
        the episode under way is lost. A training episode ends there, episodes it was playing
        are played again from the start."""
        if m.state in ENDED:
            return
        p, unit = m.progress, m.id.unit
        m.slot.workers_lost += 1
        if m.slot.workers_lost > WORKERS_LOST_ALLOWED:
            raise MemberFailed(f"unit {unit.unit_id}: its environment worker died {m.slot.workers_lost} times")
        m.id.report({"step": p.step, "env/workers_lost": m.slot.workers_lost})
        errors = self.pool.reset([m.slot.index])
        if errors:
            raise MemberFailed(f"unit {unit.unit_id}: its environment raised\n{errors[m.slot.index]}")
        m.slot.buffer.end_episode()
        m.log.episode_return = 0.0
        if m.slot.job is not None:
            self.pool.play(m.slot.index, m.slot.job)

    # --- what the handlers do ---------------------------------------------------------
    def _log(self, m: Member) -> None:
        p, log, now = m.progress, m.log, time.perf_counter()
        metrics = {"step": p.step, **log.update_metrics, "train/episodes": p.episodes,
                   "perf/env_steps_per_s": (p.step - log.step) / (now - log.since),
                   "perf/updates_per_s": (p.updates - log.updates) / (now - log.since)}
        if log.returns:
            metrics.update({"train/return": float(np.mean(log.returns)), "train/f1": float(np.mean(log.f1s))})
        m.id.report(metrics)
        log.since, log.step, log.updates, log.returns, log.f1s = now, p.step, p.updates, [], []

    def _checkpoint(self, m: Member) -> None:
        p = m.progress
        if p.step % m.spec.checkpoint_interval == 0 or p.rule.stopped:
            save_checkpoint(m.id.unit_dir, unit_id=m.id.unit.unit_id, step=p.step, episodes=p.episodes,
                            resumed_from=p.resumed_from, last_eval=p.last_eval,
                            agent=self.learner.agent_state_dict(m.slot.index), replay=m.slot.buffer.state_dict(),
                            rng=m.slot.rng, budget=p.rule.state_dict())
            m.id.report({"step": p.step, "checkpoint_step": p.step})  # the campaign store shows it while the unit runs

    def _record(self, m: Member) -> None:
        """Its training is over: rollouts into its own lake shard, or without rollouts its last
        evaluation (played now if it has none) as its result."""
        spec, unit = m.spec, m.id.unit
        m.clock.train_seconds = time.perf_counter() - m.clock.training
        if spec.rollouts > 0:
            shard = ShardMeta(unit_id=unit.unit_id, song_hash=unit.song_hash, song_name=unit.song_name,
                              chunk_index=unit.chunk_index, split=unit.split, config_hash=unit.config_hash)
            self._play(m, State.RECORDING, episode_seeds(spec, spec.rollouts),
                       deterministic=spec.rollout_policy == "deterministic", shard=shard)
        elif m.progress.last_eval:
            self._conclude(m, {k.replace("eval/", "rollout/"): v for k, v in m.progress.last_eval.items()}, None)
        else:
            self._play(m, State.RECORDING, episode_seeds(spec, spec.eval_episodes), deterministic=True)

    def _play(self, m: Member, state: State, seeds: list[int], deterministic: bool,
              shard: ShardMeta | None = None) -> None:
        """``m`` moves to ``state`` and plays one episode per seed with its policy as it is now
        (into a new lake shard described by ``shard``, committed after the last); the
        ``PlayResult`` goes to ``_played``. With environment workers the slot's worker plays
        them while the pack trains the other members (``workers.rl.envpool``). Without (a pack
        of one as a lone unit), here and at once, on the learner's device."""
        m.state = state
        if not self._inline:
            state_dict = self.learner.agent_state_dict(m.slot.index)
            m.slot.job = PlayJob(
                agent_bytes({k: state_dict[k] for k in FINAL_AGENT_KEYS}), self.cfg.droq.model_dump(), tuple(seeds),
                deterministic, None if shard is None else (str(self.lake_root), m.id.cfg.lake.model_dump(), shard))
            self.pool.play(m.slot.index, m.slot.job)
            return
        agent, env, t = self._agent(m.slot.index), m.slot.player, time.perf_counter()
        if shard is None:
            stats = [EpisodeStats.of(play(agent, env, seed=seed, deterministic=deterministic)) for seed in seeds]
            shard_path = None
        else:
            with Lake(self.lake_root, m.id.cfg.lake).shard_writer(shard.unit_id, shard.song_hash) as writer:
                stats = record_rollouts(agent, env, writer, seeds, progress=self.progress, deterministic=deterministic)
                shard_path = str(writer.commit(shard).path)  # specialist_f1: the episodes' mean F1
        self._played(m, PlayResult(stats, shard_path, time.perf_counter() - t))

    def _agent(self, i: int) -> DroQ:
        """Agent ``i`` of the learner as a lone agent on its device, to play episodes with here."""
        if self._lone is None:
            self._lone = DroQ(OBS_DIM, ACTION_DIM, *self.bounds, self.cfg.droq, device=self.learner.device, seed=0)
        self._lone.load_agent_state_dict(0, self.learner.agent_state_dict(i))
        return self._lone

    # --- the end of a member -----------------------------------------------------------
    def _conclude(self, m: Member, summary: dict[str, float], shard_path: str | None) -> None:
        """DONE: ``result.json``, then the final checkpoint sheds its replay buffer (the unit is
        done; only the policy is kept)."""
        unit, p, clock = m.id.unit, m.progress, m.clock
        steps_run = p.step - p.start_step
        self._close_player(m)
        result = UnitResult(unit_id=unit.unit_id, f1=summary["rollout/f1"], precision=summary["rollout/precision"],
                            recall=summary["rollout/recall"], episode_return=summary["rollout/return"], steps=p.step,
                            shard_path=shard_path, seconds=time.perf_counter() - clock.started,
                            env_steps_per_s=steps_run / clock.train_seconds if steps_run else 0.0,
                            updates_per_s=(p.updates - p.start_updates) / clock.train_seconds if steps_run else 0.0,
                            stop_reason=p.rule.reason, stop_step=p.rule.stop_step, budget_steps=m.spec.total_steps,
                            eval_seconds=clock.eval_seconds)
        saved = {**result.model_dump(), "done": True, "resumed_from": p.resumed_from, "steps_this_run": steps_run,
                 "config_hash": unit.config_hash}
        write_result(m.id.unit_dir, saved)
        shed_checkpoint(m.id.unit_dir)
        m.state, m.outcome = State.DONE, MemberOutcome(unit.unit_id, result)

    def _fail(self, m: Member, error: BaseException) -> None:
        """FAILED with ``error``: its slot's environments close; the others go on."""
        m.state, m.outcome = State.FAILED, MemberOutcome(m.id.unit.unit_id, None, error)
        m.slot.job = None
        if self.pool is not None:
            self.pool.drop(m.slot.index)
        self._close_player(m)

    @staticmethod
    def _close_player(m: Member) -> None:
        if m.slot.player is not None:
            m.slot.player.close()
            m.slot.player = None

    def _release(self, m: Member) -> None:
        """Free an ended member's slot: close its environment, hand its outcome back and ask for
        a unit to refill the slot with."""
        m.slot.released = True
        clear_pid_file(m.id.unit_dir)  # its attempt ended; the pack process goes on with others
        m.slot.buffer = None  # its replay is in no checkpoint it needs any more (or in the last one)
        if self.pool is not None:
            self.pool.drop(m.slot.index)
        if self.refill is not None:
            self.refill.done(m.outcome)
            if self.pool is not None:  # a pack that never started has no slot to refill
                self.refill.request(m.slot.index)


def train_pack(units: Sequence[UnitSpec], cfg: configs.Config, unit_dirs: Sequence[Path], lake_root: Path,
               reports: Sequence[Report | None] | None = None, env_workers: int = 1,
               progress: bool = False, refill: Refill | None = None, play_in_workers: bool = True
               ) -> list[MemberOutcome]:
    """Train ``units`` as one pack (module docstring); one outcome per unit, in order, then
    one per unit the ``refill`` sent, in the order they arrived. ``play_in_workers=False``
    plays evaluations and rollouts in this process, every other member waiting meanwhile
    (as before the environment workers played them; ``tests/benchmarks/bench_pack_play.py``)."""
    return Pack(units, cfg, unit_dirs, lake_root, reports or [None] * len(units), env_workers, progress,
                refill, play_in_workers).run()


def run_pack(units: Sequence[UnitSpec], cfg: configs.Config, unit_dirs: Sequence[Path], lake_root: Path,
             reports: Sequence[Report | None], cpus: float, refill: Refill | None = None) -> list[MemberOutcome]:
    """A pack as the scheduler runs it, on ``cpus`` CPUs: one environment worker per CPU, and
    as many torch threads for a CPU learner (one for a GPU learner, which waits on kernels)."""
    threads = torch.get_num_threads()
    on_gpu = resolve_device(cfg.droq.device).type == "cuda"
    torch.set_num_threads(1 if on_gpu else max(1, int(cpus)))
    try:
        return train_pack(units, cfg, unit_dirs, lake_root, reports, env_workers=max(1, int(cpus)), refill=refill)
    finally:
        torch.set_num_threads(threads)


def train_unit(unit: UnitSpec, cfg: configs.Config, unit_dir: Path, lake_root: Path,
               report: Report | None = None, progress: bool | None = None) -> UnitResult:
    """Train one specialist, commit its rollouts as one lake shard, and return the result.

    Resumes from ``unit_dir/checkpoint.pt`` when present; returns the saved result without
    training when the unit is already done. ``progress``: show a progress bar (default: when
    stderr is a terminal). It is a pack of one whose environment runs in this process; what
    it does is in ``workers.rl.specialist``'s docstring.
    """
    cpus = unit.config(cfg).campaign.cpus_per_unit
    threads = torch.get_num_threads()
    # As many intra-op threads as CPUs reserved for the unit: units sharing a node must not
    # oversubscribe it (spinning OpenMP threads make a contended CPU update ~10x slower).
    torch.set_num_threads(max(1, int(cpus)))
    try:
        [outcome] = train_pack([unit], cfg, [Path(unit_dir)], Path(lake_root), [report], env_workers=0,
                               progress=os.isatty(2) if progress is None else progress)
    finally:
        torch.set_num_threads(threads)
    if outcome.error is not None:
        raise outcome.error
    return outcome.result
