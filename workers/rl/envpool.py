"""The training environments of a pack: K environments stepped together, in this process or in
worker processes, with observations and actions in arrays the learner reads and writes in place.

Both implementations have one API (``EnvPool``): the caller writes ``action[i]`` for the slots
it steps, calls ``step(slots)``, and reads ``next_obs``, ``reward``, ``ended``, ``terminated``,
``episode_f1`` and ``obs`` (the observation to act on next: ``next_obs``, or the first
observation of a new episode when the step ended one). A slot whose environment raises
(while being made, reset or stepped) is reported in the returned ``{slot: traceback}`` and
closed; the other slots go on.

``WorkerEnvPool`` spreads the slots over ``n_workers`` processes (one per CPU the pack owns).
Its arrays live in shared memory, so a step sends each worker only the list of its slots to
step and gets back only the errors: no observation or action is pickled. Workers are spawned
(never forked from a process holding Ray's or torch's threads) and exit when the pack process
dies (their pipe closes), so a killed pack leaves no environment behind. A worker that dies is
replaced by a new process that rebuilds its slots' environments; the pool reports those slots
as lost (``take_lost``), not as failed, and the other workers go on.

A slot's two environments (training, and playing with ``seed + 1``) come from one reading of
its chunk's MIDI per process (``EnvSpec.make``).

Workers also *play* episodes for their slots while the pack trains (``WorkerEnvPool.play``):
a member's evaluations and its rollouts into its lake shard run in the slot's worker, on a
second environment of the slot's chunk and a CPU copy of the member's policy, a step at a
time between the pack's training steps; ``collect`` hands back the finished ones. The pack's
learner and the other members go on meanwhile, instead of waiting for every episode a member
plays (500 rollouts of a 550-step chunk are 275k environment steps).

This module is the one place where the training loop calls ``reset`` and ``step`` of an
environment.
"""

from __future__ import annotations

import functools
import io
import json
import multiprocessing as mp
import time
import traceback
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any, Sequence

import numpy as np
import torch
from robopianist.music.midi_file import MidiFile

import configs
from workers import fencing
from workers.fencing import Fence
from workers.lake import Lake, ShardMeta, ShardWriter
from workers.piano.env import PianoEnv, make_env
from workers.piano.music import SongLimits, load_chunk
from workers.rl.droq import DroQ
from workers.rl.specialist import EpisodePlayer, EpisodeStats, load_agent


@dataclass(frozen=True)
class EnvSpec:
    """How to build one slot's environments; plain values, so it crosses to a worker process."""

    song_path: str
    chunk_index: int
    song_hash: str
    env: dict[str, Any]  # configs.EnvConfig as a dict
    seed: int
    limits: SongLimits | None = None  # manifest.* limits on the song (song_limits)

    def make(self, play: bool = False) -> PianoEnv:
        """The slot's training environment, or (``play``) the one its evaluations and rollouts
        are played in, seeded ``seed + 1``. Both are built from one reading of the chunk: a
        process reads each chunk's MIDI once (``_chunk``)."""
        midi = _chunk(self.song_path, self.chunk_index, self.song_hash, json.dumps(self.env, sort_keys=True),
                      self.limits)
        return make_env(midi, configs.EnvConfig.model_validate(self.env), seed=self.seed + int(play))


@functools.lru_cache(maxsize=16)
def _chunk(song_path: str, chunk_index: int, song_hash: str, env: str, limits: SongLimits | None) -> MidiFile:
    """The chunk's MIDI, read once per process and reused (``make_env`` does not change it)."""
    return load_chunk(song_path, chunk_index, configs.EnvConfig.model_validate_json(env), expected_hash=song_hash,
                      limits=limits)


_FIELDS = {  # name -> (dtype, per-slot shape as a function of (obs_dim, action_dim))
    "obs": (np.float32, lambda o, a: (o,)),
    "next_obs": (np.float32, lambda o, a: (o,)),
    "action": (np.float32, lambda o, a: (a,)),
    "reward": (np.float64, lambda o, a: ()),
    "ended": (np.bool_, lambda o, a: ()),
    "terminated": (np.bool_, lambda o, a: ()),
    "episode_f1": (np.float64, lambda o, a: ()),
}


def _error() -> str:
    return traceback.format_exc(limit=20)


# --- episodes played in a worker ---------------------------------------------------------
@dataclass(frozen=True)
class PlayJob:
    """Episodes for a slot's worker to play: one per seed, with the member's policy
    (``agent``: ``torch.save`` bytes of an agent state, ``FINAL_AGENT_KEYS`` enough) on the
    CPU under ``droq`` (``configs.DroQConfig`` as a dict). With ``shard`` (lake root, lake
    config as a dict, the shard's ``ShardMeta``) every episode streams into the unit's shard
    as it ends, committed after the last; without, only the episodes' summaries come back.
    ``fence``: the unit's attempt (``workers.fencing``), checked at the commit in the worker."""

    agent: bytes
    droq: dict[str, Any]
    seeds: tuple[int, ...]
    deterministic: bool
    shard: tuple[str, dict[str, Any], ShardMeta] | None = None
    fence: Fence | None = None


@dataclass
class PlayResult:
    """A finished ``PlayJob``: every episode's summary, the committed shard's path (rollouts),
    the seconds it took; or ``error`` (a traceback) and nothing committed."""

    stats: list[EpisodeStats] = field(default_factory=list)
    shard_path: str | None = None
    seconds: float = 0.0
    error: str | None = None
    cause: OSError | None = None  # the error when it was an OSError (a full disk is the node's fault)

    @classmethod
    def failed(cls, e: BaseException) -> PlayResult:
        """The job failed with ``e`` (being handled): its traceback, and ``e`` again if an OSError."""
        return cls(error=_error(), cause=OSError(e.errno, e.strerror, e.filename) if isinstance(e, OSError) else None)


def agent_bytes(state: dict) -> bytes:
    """An agent state (tensors and plain containers) as bytes for a ``PlayJob``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class _Playing:
    """A ``PlayJob`` under way in a worker: ``step()`` plays one environment step; it returns
    the ``PlayResult`` once the last episode has ended (and the shard is committed)."""

    def __init__(self, job: PlayJob, env: PianoEnv, agent: DroQ):
        self.t0 = time.perf_counter()
        self.job, self.env, self.agent = job, env, agent
        load_agent(agent, 0, torch.load(io.BytesIO(job.agent), weights_only=True))
        self.writer: ShardWriter | None = None
        if job.shard is not None:
            root, lake_cfg, meta = job.shard
            self.writer = Lake(root, configs.LakeConfig.model_validate(lake_cfg)).shard_writer(
                meta.unit_id, meta.song_hash, job.fence)
        self.next_seed, self.stats = 0, []
        self.episode: EpisodePlayer | None = None

    def step(self) -> PlayResult | None:
        if self.episode is None:
            self.episode = EpisodePlayer(self.agent, self.env, self.job.seeds[self.next_seed], self.job.deterministic)
            self.next_seed += 1
        episode = self.episode.step()
        if episode is None:
            return None
        self.episode = None
        if self.writer is not None:
            self.writer.add(episode)
        self.stats.append(EpisodeStats.of(episode))
        if self.next_seed < len(self.job.seeds):
            return None
        shard_path = None
        if self.writer is not None:  # the shard's specialist_f1: its episodes' mean F1
            shard_path = str(self.writer.commit(self.job.shard[2]).path)
        return PlayResult(self.stats, shard_path, time.perf_counter() - self.t0)

    def abort(self) -> None:
        if self.writer is not None and self.writer.info is None:
            self.writer.abort()


# --- the environment calls of the training loop ------------------------------------------
def _reset(env: PianoEnv, i: int, arrays: dict[str, np.ndarray]) -> None:
    arrays["obs"][i] = env.reset()[0]


def _step(env: PianoEnv, i: int, arrays: dict[str, np.ndarray]) -> None:
    next_obs, reward, terminated, truncated, _ = env.step(arrays["action"][i])
    ended = terminated or truncated  # the end of the chunk is a time limit: truncated, bootstrapped
    arrays["next_obs"][i] = next_obs
    arrays["reward"][i] = reward
    arrays["ended"][i] = ended
    arrays["terminated"][i] = terminated
    if ended:
        arrays["episode_f1"][i] = env.episode_metrics()["f1"]
        arrays["obs"][i] = env.reset()[0]
    else:
        arrays["obs"][i] = next_obs


class _Envs:
    """Slots -> environments of one process, each failure caught per slot. Every environment
    must have the pool's ``(obs_dim, action_dim)`` and the action bounds of the first one made
    (``bounds``); with ``plays``, each slot also gets an environment to play episodes in
    (``EnvSpec.make(play=True)``), made with it."""

    def __init__(self, specs: dict[int, EnvSpec], arrays: dict[str, np.ndarray], plays: bool = False):
        self.arrays, self.plays = arrays, plays
        self.dims = (arrays["obs"].shape[1], arrays["action"].shape[1])
        self.specs = dict(specs)
        self.bounds: tuple[np.ndarray, np.ndarray] | None = None  # (action_low, action_high)
        self.envs: dict[int, PianoEnv] = {}
        self.errors: dict[int, str] = {}
        self.players: dict[int, PianoEnv] = {}  # each slot's environment to play episodes in
        self.agents: dict[int, DroQ] = {}  # each slot's CPU policy to play them with
        self.playing: dict[int, _Playing] = {}  # the jobs under way
        self.played: dict[int, PlayResult] = {}  # finished jobs not collected yet
        for i, spec in specs.items():
            try:
                self._make(i, spec)
            except Exception:  # noqa: BLE001 - this slot fails alone
                self.errors[i] = _error()
                self.drop(i)

    def _make(self, i: int, spec: EnvSpec) -> None:
        env = spec.make()
        self.envs[i] = env
        where = f"chunk {spec.chunk_index} of {spec.song_path}"
        if (env.obs_dim, env.action_dim) != self.dims:
            raise ValueError(f"{where}: observation/action sizes {(env.obs_dim, env.action_dim)} differ from the "
                             f"pack's {self.dims}")
        if self.bounds is None:
            self.bounds = (env.action_low.copy(), env.action_high.copy())
        elif not (np.array_equal(env.action_low, self.bounds[0]) and np.array_equal(env.action_high, self.bounds[1])):
            raise ValueError(f"{where}: action bounds differ from the pack's")
        if self.plays:
            self.players[i] = spec.make(play=True)

    def run(self, op, slots: Sequence[int]) -> dict[int, str]:
        errors = {i: self.errors.pop(i) for i in slots if i in self.errors}
        for i in slots:
            env = self.envs.get(i)
            if env is None:
                errors.setdefault(i, f"slot {i}: its environment failed earlier")
                continue
            try:
                op(env, i, self.arrays)
            except Exception:  # noqa: BLE001 - this slot fails alone
                errors[i] = _error()
                self.drop(i)
        return errors

    def put(self, i: int, spec: EnvSpec) -> str | None:
        """Build slot ``i``'s environment anew from ``spec`` (a refilled slot); the error, if any."""
        self.drop(i)
        self.errors.pop(i, None)
        self.specs[i] = spec
        try:
            self._make(i, spec)
        except Exception:  # noqa: BLE001 - this slot fails alone
            self.drop(i)
            return _error()
        return None

    def drop(self, i: int) -> None:
        """Close slot ``i``'s environments; a job it was playing is abandoned (its shard too)."""
        job = self.playing.pop(i, None)
        if job is not None:
            job.abort()
        self.played.pop(i, None)
        for env in (self.envs.pop(i, None), self.players.pop(i, None)):
            if env is not None:
                try:
                    env.close()
                except Exception:  # noqa: BLE001 - closing a broken environment may raise too
                    pass

    def close(self) -> None:
        for i in set(self.envs) | set(self.players) | set(self.playing):
            self.drop(i)

    def play(self, i: int, job: PlayJob) -> None:
        """Start playing ``job`` on slot ``i`` (its player environment and policy are made on
        the first job); a failure to start is a finished job with its error."""
        try:
            if i not in self.players:  # the slot's last job broke it
                self.players[i] = self.specs[i].make(play=True)
            env = self.players[i]
            droq = configs.DroQConfig.model_validate({**job.droq, "device": "cpu"})
            agent = self.agents.get(i)
            if agent is None or agent.cfg != droq:
                agent = self.agents[i] = DroQ(env.obs_dim, env.action_dim, env.action_low, env.action_high, droq,
                                              seed=0)
            self.playing[i] = _Playing(job, env, agent)
        except Exception as e:  # noqa: BLE001 - this slot's job fails alone
            self.played[i] = PlayResult.failed(e)

    def play_step(self) -> None:
        """One environment step of the job whose turn it is (round robin over the slots)."""
        i, job = next(iter(self.playing.items()))
        del self.playing[i]
        try:
            result = job.step()
        except Exception as e:  # noqa: BLE001 - this slot's job fails alone
            job.abort()
            result = PlayResult.failed(e)
            env = self.players.pop(i, None)  # it may be broken: the next job makes a new one
            if env is not None:
                env.close()
        if result is None:
            self.playing[i] = job  # to the back of the queue
        else:
            self.played[i] = result

    def collect(self) -> dict[int, PlayResult]:
        played, self.played = self.played, {}
        return played


class EnvPool:
    """K environment slots with shared arrays (see the module docstring). ``action_bounds``:
    the environments' (action_low, action_high), None when none could be made."""

    arrays: dict[str, np.ndarray]
    action_bounds: tuple[np.ndarray, np.ndarray] | None = None

    def __init__(self, k: int):
        self.k = k

    def __getattr__(self, name: str) -> np.ndarray:
        if name in _FIELDS:
            return self.arrays[name]
        raise AttributeError(name)

    def reset(self, slots: Sequence[int]) -> dict[int, str]:
        raise NotImplementedError

    def step(self, slots: Sequence[int]) -> dict[int, str]:
        raise NotImplementedError

    def drop(self, slot: int) -> None:
        """Close a slot's environment (its unit has finished or failed)."""
        raise NotImplementedError

    def put(self, slot: int, spec: EnvSpec) -> str | None:
        """Give a freed slot a new environment (the unit refilling it); its traceback if that
        raised, else None. ``reset([slot])`` starts its first episode."""
        raise NotImplementedError

    plays = False  # whether ``play`` runs episodes beside the training steps

    def play(self, slot: int, job: PlayJob) -> None:
        """Start playing ``job`` for ``slot`` while the pack goes on (the module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} does not play episodes")

    def collect(self, slots: Sequence[int]) -> dict[int, PlayResult]:
        """The finished jobs of ``slots``' workers, by slot."""
        raise NotImplementedError(f"{type(self).__name__} does not play episodes")

    def take_lost(self) -> list[int]:
        """The slots whose environments were lost with their worker process and rebuilt in a
        new one since the last call: each needs ``reset`` (its episode under way is gone) and
        its job played again. Empty for a pool without workers."""
        return []

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcessEnvPool(EnvPool):
    """The K environments in this process, stepped one after another."""

    def __init__(self, specs: Sequence[EnvSpec], obs_dim: int, action_dim: int):
        super().__init__(len(specs))
        self.arrays = {name: np.zeros((self.k, *shape(obs_dim, action_dim)), dtype)
                       for name, (dtype, shape) in _FIELDS.items()}
        self._envs = _Envs(dict(enumerate(specs)), self.arrays)
        self.action_bounds = self._envs.bounds

    def reset(self, slots: Sequence[int]) -> dict[int, str]:
        return self._envs.run(_reset, slots)

    def step(self, slots: Sequence[int]) -> dict[int, str]:
        return self._envs.run(_step, slots)

    def drop(self, slot: int) -> None:
        self._envs.drop(slot)

    def put(self, slot: int, spec: EnvSpec) -> str | None:
        return self._envs.put(slot, spec)

    def close(self) -> None:
        self._envs.close()


def _shared_arrays(buffers: dict[str, Any], k: int, obs_dim: int, action_dim: int) -> dict[str, np.ndarray]:
    return {name: np.frombuffer(buffers[name], dtype).reshape(k, *shape(obs_dim, action_dim))
            for name, (dtype, shape) in _FIELDS.items()}


def _worker_main(conn: Connection, buffers: dict[str, Any], k: int, obs_dim: int, action_dim: int,
                 specs: dict[int, EnvSpec], plays: bool) -> None:
    """One worker: build its slots' environments, then serve (op, slots) requests until told to
    stop or until the pack process is gone."""
    torch.set_num_threads(1)  # its policy's forward passes: one core, the worker's
    envs = _Envs(specs, _shared_arrays(buffers, k, obs_dim, action_dim), plays)
    ops = {"reset": _reset, "step": _step}
    try:
        conn.send(("ready", envs.bounds))
        while True:
            # Requests first: the pack waits on them. Between requests, one step of an episode
            # being played; with none, the worker sleeps in recv.
            if envs.playing and not conn.poll(0):
                envs.play_step()
                continue
            try:
                op, slots = conn.recv()
            except (EOFError, OSError):  # the pack process died
                return
            if op == "close":
                return
            if op == "drop":
                for i in slots:
                    envs.drop(i)
                conn.send({})
            elif op == "put":  # slots: [(slot, EnvSpec)]
                conn.send({i: error for i, spec in slots if (error := envs.put(i, spec)) is not None})
            elif op == "play":  # slots: [(slot, PlayJob)]
                for i, job in slots:
                    envs.play(i, job)
                conn.send({})
            elif op == "collect":
                conn.send(envs.collect())
            else:
                conn.send(envs.run(ops[op], slots))
    finally:
        envs.close()


class WorkerEnvPool(EnvPool):
    """The K environments spread over ``n_workers`` spawned processes (slot ``i`` lives in worker
    ``i % n_workers``), arrays in shared memory. ``plays``: whether they play a pack's episodes
    (``play``); False leaves them to the pack process, as before workers played.

    A worker that dies (killed, out of memory, a crash in MuJoCo) is replaced as soon as a call
    finds it gone: a new process rebuilds the environments of its live slots from their specs,
    and those slots are reported by ``take_lost`` (the episode under way and any job it was
    playing are lost), not as errors. The other workers' slots are not touched."""

    def __init__(self, specs: Sequence[EnvSpec], obs_dim: int, action_dim: int, n_workers: int,
                 plays: bool = True):
        super().__init__(len(specs))
        self.plays, self.dims = plays, (obs_dim, action_dim)
        self._ctx = mp.get_context("spawn")
        self.n_workers = max(1, min(int(n_workers), self.k))
        self._buffers = {name: self._ctx.RawArray(np.ctypeslib.as_ctypes_type(dtype),
                                                  self.k * int(np.prod(shape(obs_dim, action_dim), dtype=int)))
                         for name, (dtype, shape) in _FIELDS.items()}
        self.arrays = _shared_arrays(self._buffers, self.k, obs_dim, action_dim)
        self._specs = dict(enumerate(specs))  # the live slots': what a replacement worker rebuilds
        self._lost: list[int] = []  # slots whose worker was replaced, not yet taken
        self._errors: dict[int, str] = {}  # slots whose replacement worker did not start
        self._conns: list[Connection | None] = [None] * self.n_workers
        self._procs: list[mp.process.BaseProcess | None] = [None] * self.n_workers
        for w in range(self.n_workers):  # every worker builds its environments before any is waited for
            self._spawn(w)
        for w in range(self.n_workers):
            self._ready(w)

    def _mine(self, w: int) -> dict[int, EnvSpec]:
        return {i: spec for i, spec in self._specs.items() if i % self.n_workers == w}

    def _spawn(self, w: int) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self._buffers, self.k, *self.dims, self._mine(w),
                                                            self.plays), daemon=True, name=f"env-worker-{w}")
        proc.start()
        child.close()
        self._conns[w], self._procs[w] = parent, proc

    def _ready(self, w: int) -> None:
        ready, bounds = self._conns[w].recv()
        if ready != "ready":
            raise RuntimeError(f"environment worker {w} did not start")
        if self.action_bounds is None:
            self.action_bounds = bounds

    def _replace(self, w: int) -> None:
        """Worker ``w`` is gone: start another for its live slots; they are lost (``take_lost``)."""
        dead = self._procs[w]
        if dead.is_alive():  # its pipe broke but it lingers: it must not write into the arrays any more
            dead.kill()
        dead.join()
        self._conns[w].close()
        mine = sorted(self._mine(w))
        self._lost.extend(mine)
        try:
            self._spawn(w)
            self._ready(w)
        except Exception:  # noqa: BLE001 - e.g. out of memory again: its slots fail, the others go on
            for i in mine:
                self._errors[i] = (f"environment worker {w} (pid {dead.pid}) died and its replacement did not "
                                   f"start\n{_error()}")

    def _ask(self, w: int, message: Any) -> Any:
        """Send ``message`` to worker ``w`` and return its answer; None when it was found dead
        (and replaced)."""
        return self._answer(w) if self._send(w, message) else None

    def _send(self, w: int, message: Any) -> bool:
        try:
            self._conns[w].send(message)
            return True
        except OSError:
            self._replace(w)
            return False

    def _answer(self, w: int) -> Any:
        try:
            return self._conns[w].recv()
        except (EOFError, OSError):
            self._replace(w)
            return None

    def take_lost(self) -> list[int]:
        lost, self._lost = sorted(set(self._lost)), []
        return lost

    def _run(self, op: str, slots: Sequence[int]) -> dict[int, str]:
        errors = {i: self._errors.pop(i) for i in slots if i in self._errors}
        by_worker: dict[int, list[int]] = {}
        for i in slots:
            if i not in errors:
                by_worker.setdefault(i % self.n_workers, []).append(i)
        # Every worker starts before any is waited for.
        asked = [w for w, mine in by_worker.items() if self._send(w, (op, mine))]
        for w in asked:
            errors.update(self._answer(w) or {})
        return errors

    def reset(self, slots: Sequence[int]) -> dict[int, str]:
        return self._run("reset", slots)

    def step(self, slots: Sequence[int]) -> dict[int, str]:
        return self._run("step", slots)

    def drop(self, slot: int) -> None:
        self._specs.pop(slot, None)
        self._errors.pop(slot, None)
        self._run("drop", [slot])

    def put(self, slot: int, spec: EnvSpec) -> str | None:
        self._specs[slot] = spec
        self._errors.pop(slot, None)
        return (self._ask(slot % self.n_workers, ("put", [(slot, spec)])) or {}).get(slot)

    def play(self, slot: int, job: PlayJob) -> None:
        if job.shard is not None and job.fence is None:  # the worker process holds no fences: send this one
            job = replace(job, fence=fencing.held(job.shard[2].unit_id))
        self._ask(slot % self.n_workers, ("play", [(slot, job)]))  # a dead worker's slot is lost, job and all

    def collect(self, slots: Sequence[int]) -> dict[int, PlayResult]:
        played: dict[int, PlayResult] = {}
        asked = [w for w in sorted({i % self.n_workers for i in slots}) if self._send(w, ("collect", []))]
        for w in asked:
            played.update(self._answer(w) or {})
        return played

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("close", []))
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []


def make_pool(specs: Sequence[EnvSpec], obs_dim: int, action_dim: int, n_workers: int,
              play_in_workers: bool = True) -> EnvPool:
    """Worker processes when ``n_workers >= 1`` (which play the pack's episodes unless
    ``play_in_workers`` is False), else the environments in this process."""
    if n_workers >= 1:
        return WorkerEnvPool(specs, obs_dim, action_dim, n_workers, plays=play_in_workers)
    return InProcessEnvPool(specs, obs_dim, action_dim)
