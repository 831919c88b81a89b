"""A pack: K specialist units trained together in one process, one learner for all of them.

``train_pack(units, cfg, unit_dirs, lake_root, reports)`` trains every unit as ``train_unit``
trains one (``workers.rl.specialist`` says how; ``train_unit`` is a pack of one whose
environment runs in this process), and returns one ``MemberOutcome`` per unit: its
``UnitResult`` or the error that stopped it.

The loop, per environment step of the pack (CleanRL-style, top to bottom in ``Pack.run``):

1. act: members in their warm-up draw uniform random actions from their own generator; the
   learner acts for all K at once (one batched forward pass);
2. step the K environments together (``workers.rl.envpool``: worker processes with shared
   memory, or this process for a pack of one);
3. store each member's transition in its own replay buffer;
4. update: one call updates the agents of every member past its warm-up
   (``DroQ(num_agents=K).update`` on their buffers);
5. per member: report metrics, evaluate (its own ``workers.rl.budget.StopRule`` judges each
   evaluation), checkpoint, and when its budget ends its training, record its rollouts into
   its own lake shard, write its ``result.json`` and shed its replay buffer.

Evaluations and rollouts are episodes played with one member's policy as it is at that step.
With environment workers, the slot's worker plays them (``EnvPool.play``: a CPU copy of the
policy, a second environment of the chunk) between the pack's training steps, and the loop
picks up where the member left off when they are in (``Pack._played``): the member sits out
acting, stepping and updating meanwhile; the other members train on. Without workers (a pack
of one as a lone unit), this process plays them at once, on the learner's device.

Each member keeps its own identity, unit directory, checkpoint (its slice of the learner, the
same format as a single unit's, so it resumes alone or in any other pack), attempts log,
metrics callback (its MLflow run) and shard. A member whose environment, evaluation or
rollouts raise fails alone: its slot frees and the others go on.

A freed slot (its member finished, stopped early by its budget, or failed) is refilled when the
pack has a ``Refill`` (``workers.units``; the scheduler gives one when ``campaign.pack_refill``
is on): the member's outcome goes back at once, the pack asks for the next pending unit of the
same config, and trains it in that slot, its agent re-initialised as a fresh agent with its own
seed (optimiser state and temperature reset), its replay buffer new, its environment rebuilt
in the slot's worker, or resumed from its own checkpoint when it has one. Without a refill, or
when no pending unit is left, the slot stays idle and costs nothing but its row of the stacked
update. The pack ends when no slot trains and no request is unanswered.

Agents of members still in their warm-up, finished or failed sit the update out (their
buffer is passed as None: nothing of them changes). Members of one pack must share the network and update settings
(``droq.*``) and the environment's dimensions; the scheduler only packs units of one config.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import configs
from workers.lake import Lake, ShardMeta
from workers.piano.env import PianoEnv
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


@dataclass
class Member:
    """One unit's state inside a pack."""

    slot: int
    unit: UnitSpec
    cfg: configs.Config
    unit_dir: Path
    report: Report
    rng: np.random.Generator
    buffer: ReplayBuffer | None = None
    player: PianoEnv | None = None  # evaluation and rollouts in this process (a pool without workers)
    step: int = 0
    episodes: int = 0
    updates: int = 0
    resumed_from: list[int] = field(default_factory=list)
    last_eval: dict = field(default_factory=dict)
    start_step: int = 0
    start_updates: int = 0
    episode_return: float = 0.0
    returns: list[float] = field(default_factory=list)
    f1s: list[float] = field(default_factory=list)
    update_metrics: dict = field(default_factory=dict)
    rule: StopRule | None = None  # when it stops training (specialist.budget)
    eval_seconds: float = 0.0  # this run's time in evaluations
    t_start: float = 0.0  # when its attempt started in this pack (perf_counter)
    t_train: float = 0.0  # when it started training here
    t_log: float = 0.0
    step_log: int = 0
    updates_log: int = 0
    train_seconds: float = 0.0  # this run's time from its start here to the end of its training
    outcome: MemberOutcome | None = None
    released: bool = False  # its slot was freed (outcome handed back, refill asked for)
    pending: Callable[[PlayResult], None] | None = None  # what follows the episodes its worker plays

    @property
    def running(self) -> bool:
        return self.outcome is None

    @property
    def total_steps(self) -> int:
        return self.cfg.specialist.total_steps

    @property
    def trained(self) -> bool:
        """Its training is over: stopped by its budget, or at its last step."""
        return self.rule.stopped or self.step >= self.rule.end_step

    @property
    def training(self) -> bool:
        """Running, not yet stopped by its budget, and not waiting for episodes it plays."""
        return self.running and self.pending is None and not self.trained


class Learner:
    """The K agents behind one interface: ``DroQ(num_agents=K)`` for a pack, the single ``DroQ``
    of today's specialist for a pack of one (initialised from the process's seeded RNG, whose
    calls take one observation and one buffer). Agent i of a pack starts as a lone agent with
    its member's ``specialist.seed`` would."""

    def __init__(self, obs_dim: int, action_dim: int, low: np.ndarray, high: np.ndarray,
                 cfg: configs.DroQConfig, seeds: list[int]):
        self.k, self.cfg = len(seeds), cfg
        self.dims = (obs_dim, action_dim, low, high)
        if self.k == 1:
            self.agent = DroQ(obs_dim, action_dim, low, high, cfg)
        else:
            self.agent = DroQ(obs_dim, action_dim, low, high, cfg, seed=seeds, num_agents=self.k)
        self._policy: DroQ | None = None

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Stochastic actions for all K slots: (K, obs_dim) -> (K, action_dim)."""
        return self.agent.act(obs[0])[None] if self.k == 1 else self.agent.act(obs)

    def update(self, buffers: Sequence[ReplayBuffer | None]) -> list[dict]:
        """One update; agents whose buffer is None sit it out."""
        return [self.agent.update(buffers[0])] if self.k == 1 else self.agent.update(list(buffers))

    def state_dict(self, i: int) -> dict:
        return self.agent.agent_state_dict(i)

    def load_state_dict(self, i: int, state: dict) -> None:
        load_agent(self.agent, i, state)

    def reset(self, i: int, seed: int) -> None:
        """Slot ``i`` starts over as a fresh agent with ``seed`` (a refilled slot)."""
        self.agent.reset_agent(i, seed)

    def policy(self, i: int) -> DroQ:
        """Agent ``i`` as a single agent, to evaluate and record rollouts with (``play``)."""
        if self.k == 1:
            return self.agent
        if self._policy is None:
            self._policy = DroQ(*self.dims, self.cfg, device=self.agent.device, seed=0)
        self._policy.load_agent_state_dict(0, self.agent.agent_state_dict(i))
        return self._policy


class Pack:
    """K units trained in one process (module docstring)."""

    def __init__(self, units: Sequence[UnitSpec], cfg: configs.Config, unit_dirs: Sequence[Path], lake_root: Path,
                 reports: Sequence[Report | None], env_workers: int = 0, progress: bool = False,
                 refill: Refill | None = None, play_in_workers: bool = True):
        if not units or not len(units) == len(unit_dirs) == len(reports):
            raise ValueError("a pack needs one unit directory and one report callback per unit")
        self.lake_root, self.env_workers, self.progress = Path(lake_root), env_workers, progress
        self.play_in_workers = play_in_workers
        self.cfgs = [cfg.with_overrides(u.overrides) if u.overrides else cfg for u in units]
        droqs = {json.dumps(c.droq.model_dump(), sort_keys=True) for c in self.cfgs}
        if len(droqs) > 1:
            raise ValueError("units of one pack must share droq.* settings; pack units of one config")
        self.cfg, self.base_cfg, self.refill = self.cfgs[0], cfg, refill
        self.everyone: list[Member] = []  # every member in the order it joined: the outcomes' order
        self.units, self.unit_dirs = list(units), [Path(d) for d in unit_dirs]
        self.reports = [r or (lambda metrics: None) for r in reports]

    # --- setup -----------------------------------------------------------------------
    def _members(self) -> list[Member]:
        members = []
        for i, (unit, cfg, unit_dir, report) in enumerate(zip(self.units, self.cfgs, self.unit_dirs, self.reports)):
            unit_dir.mkdir(parents=True, exist_ok=True)
            member = Member(i, unit, cfg, unit_dir, report, np.random.default_rng(cfg.specialist.seed),
                            rule=StopRule(cfg.specialist.budget, cfg.specialist.total_steps), t_start=self._t_start)
            done = finished_result(unit, unit_dir)
            if done is not None:  # a finished unit is never trained again
                member.outcome = MemberOutcome(unit.unit_id, done)
            members.append(member)
        return members

    def _fail(self, member: Member, error: BaseException, pool: EnvPool | None = None) -> None:
        member.outcome = MemberOutcome(member.unit.unit_id, None, error)
        member.pending = None
        if pool is not None:
            pool.drop(member.slot)
        if member.player is not None:
            member.player.close()
            member.player = None

    def run(self) -> list[MemberOutcome]:
        self._t_start = time.perf_counter()
        members = self._members()
        self.everyone = list(members)
        if all(not m.running for m in members):
            for m in members:
                self._release(m, None)
            return self._outcomes()
        # In this process: every member's environment to play in when its evaluations and
        # rollouts are played here, else one to learn the sizes from (the workers check the rest).
        inline = self._inline
        dims = None
        for m in members:
            if not m.running or (dims is not None and not inline):
                continue
            try:
                env = self._env_spec(m, m.cfg.specialist.seed + 1).make()
            except Exception as e:  # noqa: BLE001 - a broken chunk fails its unit alone
                self._fail(m, e)
                continue
            if dims is None:
                dims = (env.obs_dim, env.action_dim, env.action_low, env.action_high)
            if inline:
                m.player = env
            else:
                env.close()
        if dims is None:
            for m in members:
                self._release(m, None)
            return self._outcomes()
        obs_dim, action_dim, low, high = dims
        for m in members:
            if m.player is not None and (m.player.obs_dim, m.player.action_dim) != (obs_dim, action_dim):
                self._fail(m, ValueError(f"unit {m.unit.unit_id}: observation/action sizes differ from the pack's"))
        specs = [self._env_spec(m, m.cfg.specialist.seed) for m in members]
        try:
            with make_pool(specs, obs_dim, action_dim, self.env_workers, self.play_in_workers) as pool:
                for m in members:
                    if not m.running:
                        pool.drop(m.slot)
                # The first member's seed seeds the process (a pack of one: exactly as a single unit).
                seed_everything(members[0].cfg.specialist.seed)
                droq = self.cfg.droq
                learner = Learner(obs_dim, action_dim, low, high, droq, [m.cfg.specialist.seed for m in members])
                for m in members:
                    m.buffer = ReplayBuffer(obs_dim, action_dim, droq.replay_capacity, droq.discount, droq.n_step,
                                            seed=m.cfg.specialist.seed)
                    if m.running:
                        try:
                            self._resume(m, learner, restore_process_rng=len(members) == 1)
                        except Exception as e:  # noqa: BLE001 - e.g. a checkpoint of another unit
                            self._fail(m, e, pool)
                self._loop(members, learner, pool)
        finally:
            for m in self.everyone:
                if m.player is not None:
                    m.player.close()
                clear_pid_file(m.unit_dir)  # the attempt ended (the process may run other units next)
        return self._outcomes()

    def _outcomes(self) -> list[MemberOutcome]:
        return [m.outcome for m in self.everyone]

    @property
    def _inline(self) -> bool:
        """Evaluations and rollouts are played in this process (no workers, or told so)."""
        return self.env_workers < 1 or not self.play_in_workers

    @staticmethod
    def _env_spec(m: Member, seed: int) -> EnvSpec:
        return EnvSpec(m.unit.song_path, m.unit.chunk_index, m.unit.song_hash, m.cfg.env.model_dump(), seed,
                       song_limits(m.cfg.manifest))

    def _resume(self, m: Member, learner: Learner, restore_process_rng: bool) -> None:
        # On the CPU: RNG states and the replay live there. A damaged checkpoint is moved aside.
        loaded = checkpoints.load(m.unit_dir / CHECKPOINT, repair=True)
        checkpoint = loaded.state
        if checkpoint is not None:
            if checkpoint["unit_id"] != m.unit.unit_id:
                raise ValueError(f"{m.unit_dir}: its checkpoint belongs to unit {checkpoint['unit_id']}, "
                                 f"not {m.unit.unit_id}; use another unit directory")
            learner.load_state_dict(m.slot, checkpoint["agent"])
            if "replay" in checkpoint:  # else a finished unit whose shard was lost: rollouts only
                m.buffer.load_state_dict(checkpoint["replay"])
                if restore_process_rng:
                    set_rng_state(checkpoint["rng"], m.rng)
                else:  # the process-wide RNGs are the pack's; the member's own generator is its
                    m.rng.bit_generator.state = checkpoint["rng"]["numpy"]
            m.step, m.episodes = int(checkpoint["step"]), int(checkpoint["episodes"])
            m.updates = int(checkpoint["agent"]["updates"])
            m.resumed_from = list(checkpoint["resumed_from"]) + [m.step]
            m.last_eval = dict(checkpoint["last_eval"])
            if "budget" in checkpoint:  # checkpoints written before budgets existed start judging afresh
                m.rule.load_state_dict(checkpoint["budget"])
            m.report({"step": m.step, "resume/step": m.step})
        with open(m.unit_dir / ATTEMPTS_LOG, "a") as f:  # append-only: a torn last line is harmless
            f.write(json.dumps({"attempt": len(read_attempts(m.unit_dir)) + 1, "start_step": m.step,
                                "pid": os.getpid(), "time": time.time(),
                                **({"checkpoint": loaded.messages} if loaded.messages else {})}) + "\n")
        if loaded.messages:
            m.report({"step": m.step, "checkpoint/damaged": len(loaded.damaged)})
        write_pid_file(m.unit_dir, m.unit.unit_id)
        m.start_step, m.start_updates = m.step, m.updates
        m.buffer.end_episode()  # the episode under way at the checkpoint is not restored

    # --- training --------------------------------------------------------------------
    def _loop(self, members: list[Member], learner: Learner, pool: EnvPool) -> None:
        droq = self.cfg.droq
        low, high = learner.dims[2], learner.dims[3]
        for slot, error in pool.reset([m.slot for m in members if m.running]).items():
            self._fail(members[slot], MemberFailed(error), pool)
        t0 = time.perf_counter()
        bar = tqdm(total=sum(m.rule.end_step for m in members), initial=sum(m.step for m in members),
                   disable=not self.progress, unit="step", dynamic_ncols=True, mininterval=1.0,
                   desc=members[0].unit.unit_id if len(members) == 1 else f"pack of {len(members)}")
        for m in members:
            self._start(m, learner, pool, t0)
        collected = 0.0
        while True:
            # 0. episodes the workers have played: what follows them (the rest of an evaluation,
            # the end of a unit); freed slots: hand back their outcomes, take in the units sent
            # to refill them
            busy = [m for m in members if m.pending is not None]
            if busy and time.perf_counter() - collected >= 0.02:
                collected = time.perf_counter()
                for slot, played in pool.collect([m.slot for m in busy]).items():
                    self._played(members[slot], played, pool)
            for m in members:
                if not m.running and not m.released:
                    self._release(m, pool)
            if self.refill is not None:
                for slot, arrival in self.refill.poll():
                    if arrival is not None:
                        members[slot] = self._arrive(slot, arrival, learner, pool, bar)
            running = [m for m in members if m.training]
            if not running:
                if busy or (self.refill is not None and (self.refill.waiting or any(not m.released for m in members))):
                    time.sleep(0.02)  # no slot trains: wait for the episodes played, or the answers
                    continue
                break
            # 1. act
            obs = pool.obs.copy()
            if any(m.step >= droq.warmup_steps for m in running):
                pool.action[:] = learner.act(obs)
            for m in running:
                if m.step < droq.warmup_steps:
                    pool.action[m.slot] = m.rng.uniform(low, high).astype(np.float32)
            # 2. step the environments together
            errors = pool.step([m.slot for m in running])
            # 3. store the transitions
            for m in running:
                if m.slot in errors:
                    self._fail(m, MemberFailed(f"unit {m.unit.unit_id}: its environment raised\n{errors[m.slot]}"), pool)
                    continue
                s = m.slot
                m.step += 1
                ended, terminated = bool(pool.ended[s]), bool(pool.terminated[s])
                reward = float(pool.reward[s])
                m.buffer.add(obs[s], pool.action[s], reward, pool.next_obs[s], terminated,
                             truncated=ended and not terminated)
                m.episode_return += reward
                if ended:
                    m.returns.append(m.episode_return)
                    m.f1s.append(float(pool.episode_f1[s]))
                    m.episodes += 1
                    m.episode_return = 0.0
            bar.update(len(running) - len(errors))
            # 4. update the agents of members past their warm-up, in one call
            stepped = [m for m in running if m.running]
            learning = [m for m in stepped if m.step > droq.warmup_steps]
            if learning:
                buffers = [None] * len(members)  # the others sit the update out, unchanged
                for m in learning:
                    buffers[m.slot] = m.buffer
                metrics = learner.update(buffers)
                for m in learning:
                    m.update_metrics = metrics[m.slot]
                    m.updates += droq.utd_ratio
            # 5. per member: report, evaluate, checkpoint, finish
            for m in stepped:
                try:
                    self._after_step(m, learner, pool, bar)
                except Exception as e:  # noqa: BLE001 - its evaluation or rollouts failed: it alone
                    self._fail(m, e, pool)
            if busy:
                bar.set_postfix({"playing": len(busy)}, refresh=False)
        bar.close()

    def _played(self, m: Member, played: PlayResult, pool: EnvPool) -> None:
        """Episodes a worker played for ``m`` are in: go on where its evaluation or its end left off."""
        then, m.pending = m.pending, None
        if then is None or not m.running:
            return
        if played.error is not None:
            error = MemberFailed(f"unit {m.unit.unit_id}: an episode it played raised\n{played.error}")
            error.__cause__ = played.cause  # an OSError: a full disk is recognised as the node's fault
            self._fail(m, error, pool)
            return
        try:
            then(played)
        except Exception as e:  # noqa: BLE001 - it alone
            self._fail(m, e, pool)

    def _start(self, m: Member, learner: Learner, pool: EnvPool, now: float) -> None:
        """A member joins the loop: a unit trained before whose rollouts were not committed
        only records them."""
        m.t_train = m.t_log = now
        m.step_log, m.updates_log = m.step, m.updates
        if m.running and m.trained:
            try:
                self._finish(m, learner, pool)
            except Exception as e:  # noqa: BLE001 - it alone
                self._fail(m, e, pool)

    def _release(self, m: Member, pool: EnvPool | None) -> None:
        """Free a member's slot: close its environment, hand its outcome back and ask for a unit
        to refill the slot with."""
        m.released = True
        clear_pid_file(m.unit_dir)  # its attempt ended; the pack process goes on with others
        if pool is not None:
            pool.drop(m.slot)
        if m.buffer is not None:
            m.buffer = None  # its replay is in no checkpoint it needs any more (or in the last one)
        if self.refill is not None:
            self.refill.done(m.outcome)
            if pool is not None:  # a pack that never started has no slot to refill
                self.refill.request(m.slot)

    def _arrive(self, slot: int, arrival: Arrival, learner: Learner, pool: EnvPool, bar: tqdm) -> Member:
        """A unit sent to refill ``slot``: a fresh agent and replay in the slot (or its own
        checkpoint), its environment in the slot's worker. Fails alone, like a launched member."""
        unit = arrival.unit
        cfg = self.base_cfg.with_overrides(unit.overrides) if unit.overrides else self.base_cfg
        unit_dir = Path(arrival.unit_dir)
        unit_dir.mkdir(parents=True, exist_ok=True)
        m = Member(slot, unit, cfg, unit_dir, arrival.report or (lambda metrics: None),
                   np.random.default_rng(cfg.specialist.seed),
                   rule=StopRule(cfg.specialist.budget, cfg.specialist.total_steps), t_start=time.perf_counter())
        self.everyone.append(m)
        done = finished_result(unit, unit_dir)
        if done is not None:  # finished in an earlier attempt
            m.outcome = MemberOutcome(unit.unit_id, done)
            return m
        try:
            if cfg.droq != self.cfg.droq:
                raise ValueError(f"unit {unit.unit_id}: its droq.* settings differ from the pack's")
            obs_dim, action_dim = learner.dims[0], learner.dims[1]
            if self._inline:
                m.player = self._env_spec(m, cfg.specialist.seed + 1).make()
                if (m.player.obs_dim, m.player.action_dim) != (obs_dim, action_dim):
                    raise ValueError(f"unit {unit.unit_id}: observation/action sizes differ from the pack's")
            error = pool.put(slot, self._env_spec(m, cfg.specialist.seed))  # workers check the sizes
            if error is not None:
                raise MemberFailed(f"unit {unit.unit_id}: its environment raised\n{error}")
            learner.reset(slot, cfg.specialist.seed)
            m.buffer = ReplayBuffer(obs_dim, action_dim, cfg.droq.replay_capacity, cfg.droq.discount,
                                    cfg.droq.n_step, seed=cfg.specialist.seed)
            self._resume(m, learner, restore_process_rng=False)
            errors = pool.reset([slot])
            if errors:
                raise MemberFailed(f"unit {unit.unit_id}: its environment raised\n{errors[slot]}")
        except Exception as e:  # noqa: BLE001 - a broken unit fails alone
            self._fail(m, e)
            return m
        bar.total += m.rule.end_step
        bar.update(m.step)
        self._start(m, learner, pool, time.perf_counter())
        return m

    def _after_step(self, m: Member, learner: Learner, pool: EnvPool, bar: tqdm) -> None:
        spec = m.cfg.specialist
        if m.step % spec.log_interval == 0:
            now = time.perf_counter()
            metrics = {"step": m.step, **m.update_metrics, "train/episodes": m.episodes,
                       "perf/env_steps_per_s": (m.step - m.step_log) / (now - m.t_log),
                       "perf/updates_per_s": (m.updates - m.updates_log) / (now - m.t_log)}
            if m.returns:
                metrics.update({"train/return": float(np.mean(m.returns)), "train/f1": float(np.mean(m.f1s))})
            m.report(metrics)
            m.t_log, m.step_log, m.updates_log, m.returns, m.f1s = now, m.step, m.updates, [], []
        if m.step % spec.eval_interval == 0 or m.step in (spec.total_steps, m.rule.end_step):
            # Its training waits for the evaluation (the policy of this step), the others' not.
            self._play(m, learner, pool, self._eval_seeds(m), deterministic=True,
                       then=lambda played: self._evaluated(m, learner, pool, bar, played))
        else:
            self._checkpoint(m, learner, pool)

    @staticmethod
    def _eval_seeds(m: Member) -> list[int]:
        spec = m.cfg.specialist
        return [spec.seed * 1000 + i for i in range(spec.eval_episodes)]

    def _evaluated(self, m: Member, learner: Learner, pool: EnvPool, bar: tqdm, played: PlayResult) -> None:
        m.eval_seconds += played.seconds
        m.last_eval = summarise(played.stats, "eval")
        # The budget judges every evaluation; a stop ends training at this step (see workers.rl.budget).
        stop, _ = m.rule.observe(m.step, m.last_eval["eval/f1"])
        m.report({"step": m.step, **m.last_eval, "perf/eval_share": m.eval_seconds / (time.perf_counter() - m.t_train),
                  **({"budget/stop_step": m.step} if stop else {})})
        if len(self.units) == 1:
            bar.set_postfix({"eval_f1": f"{m.last_eval['eval/f1']:.3f}"})
        self._checkpoint(m, learner, pool)

    def _checkpoint(self, m: Member, learner: Learner, pool: EnvPool) -> None:
        spec = m.cfg.specialist
        if m.step % spec.checkpoint_interval == 0 or m.rule.stopped:
            save_checkpoint(m.unit_dir, unit_id=m.unit.unit_id, step=m.step, episodes=m.episodes,
                            resumed_from=m.resumed_from, last_eval=m.last_eval, agent=learner.state_dict(m.slot),
                            replay=m.buffer.state_dict(), rng=m.rng, budget=m.rule.state_dict())
            m.report({"step": m.step, "checkpoint_step": m.step})  # the campaign store shows it while the unit runs
        if m.trained:
            self._finish(m, learner, pool)

    def _play(self, m: Member, learner: Learner, pool: EnvPool, seeds: list[int], deterministic: bool,
              then: Callable[[PlayResult], None], shard: ShardMeta | None = None) -> None:
        """Play one episode per seed with agent ``m``'s policy as it is now (into a new lake
        shard described by ``shard``, committed after the last), then call ``then`` with the
        ``PlayResult``. With environment workers the slot's worker plays them while the pack
        trains the other members (``workers.rl.envpool``); ``m`` sits out until they are in.
        Without (a pack of one as a lone unit), here and at once, on the learner's device."""
        if not self._inline:
            state = learner.state_dict(m.slot)
            job = PlayJob(agent_bytes({k: state[k] for k in FINAL_AGENT_KEYS}), self.cfg.droq.model_dump(),
                          tuple(seeds), deterministic,
                          None if shard is None else (str(self.lake_root), m.cfg.lake.model_dump(), shard))
            m.pending = then
            pool.play(m.slot, job)
            return
        agent, t = learner.policy(m.slot), time.perf_counter()
        if shard is None:
            stats = [EpisodeStats.of(play(agent, m.player, seed=seed, deterministic=deterministic)) for seed in seeds]
            then(PlayResult(stats, None, time.perf_counter() - t))
            return
        with Lake(self.lake_root, m.cfg.lake).shard_writer(shard.unit_id, shard.song_hash) as writer:
            stats = record_rollouts(agent, m.player, writer, seeds, progress=self.progress, deterministic=deterministic)
            shard_path = str(writer.commit(shard).path)  # specialist_f1: the episodes' mean F1
        then(PlayResult(stats, shard_path, time.perf_counter() - t))

    # --- the end of a member -----------------------------------------------------------
    def _finish(self, m: Member, learner: Learner, pool: EnvPool) -> None:
        """Rollouts into the member's own lake shard, then ``_conclude``."""
        spec, unit = m.cfg.specialist, m.unit
        m.train_seconds = time.perf_counter() - m.t_train
        if spec.rollouts > 0:
            meta = ShardMeta(unit_id=unit.unit_id, song_hash=unit.song_hash, song_name=unit.song_name,
                             chunk_index=unit.chunk_index, split=unit.split, config_hash=unit.config_hash)

            def recorded(played: PlayResult) -> None:
                summary = summarise(played.stats, "rollout")
                m.report({"step": m.step, **summary})
                self._conclude(m, summary, played.shard_path)

            self._play(m, learner, pool, [spec.seed * 1000 + i for i in range(spec.rollouts)],
                       deterministic=spec.rollout_policy == "deterministic", then=recorded, shard=meta)
        elif m.last_eval:
            self._conclude(m, {k.replace("eval/", "rollout/"): v for k, v in m.last_eval.items()}, None)
        else:
            def evaluated(played: PlayResult) -> None:
                m.eval_seconds += played.seconds
                self._conclude(m, summarise(played.stats, "rollout"), None)

            self._play(m, learner, pool, self._eval_seeds(m), deterministic=True, then=evaluated)

    def _conclude(self, m: Member, summary: dict[str, float], shard_path: str | None) -> None:
        """``result.json``, then the final checkpoint sheds its replay buffer (the unit is done;
        only the policy is kept)."""
        unit = m.unit
        steps_run, train_seconds = m.step - m.start_step, m.train_seconds
        if m.player is not None:
            m.player.close()
            m.player = None
        result = UnitResult(unit_id=unit.unit_id, f1=summary["rollout/f1"], precision=summary["rollout/precision"],
                            recall=summary["rollout/recall"], episode_return=summary["rollout/return"], steps=m.step,
                            shard_path=shard_path, seconds=time.perf_counter() - m.t_start,
                            env_steps_per_s=steps_run / train_seconds if steps_run else 0.0,
                            updates_per_s=(m.updates - m.start_updates) / train_seconds if steps_run else 0.0,
                            stop_reason=m.rule.reason, stop_step=m.rule.stop_step, budget_steps=m.cfg.specialist.total_steps,
                            eval_seconds=m.eval_seconds)
        saved = {**result.model_dump(), "done": True, "resumed_from": m.resumed_from, "steps_this_run": steps_run,
                 "config_hash": unit.config_hash}
        write_result(m.unit_dir, saved)
        shed_checkpoint(m.unit_dir)
        m.outcome = MemberOutcome(unit.unit_id, result)


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
    cpus = (cfg.with_overrides(unit.overrides) if unit.overrides else cfg).campaign.cpus_per_unit
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
