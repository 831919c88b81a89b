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
dies (their pipe closes), so a killed pack leaves no environment behind.

This module is the one place where the training loop calls ``reset`` and ``step`` of an
environment.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Sequence

import numpy as np

import configs
from workers.piano.env import PianoEnv, make_env
from workers.piano.music import SongLimits, load_chunk


@dataclass(frozen=True)
class EnvSpec:
    """How to build one slot's environment; plain values, so it crosses to a worker process."""

    song_path: str
    chunk_index: int
    song_hash: str
    env: dict[str, Any]  # configs.EnvConfig as a dict
    seed: int
    limits: SongLimits | None = None  # manifest.* limits on the song (song_limits)

    def make(self) -> PianoEnv:
        env_cfg = configs.EnvConfig.model_validate(self.env)
        midi = load_chunk(self.song_path, self.chunk_index, env_cfg, expected_hash=self.song_hash, limits=self.limits)
        return make_env(midi, env_cfg, seed=self.seed)


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
    """Slots -> environments of one process, each failure caught per slot."""

    def __init__(self, specs: dict[int, EnvSpec], arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.envs: dict[int, PianoEnv] = {}
        self.errors: dict[int, str] = {}
        for i, spec in specs.items():
            try:
                self.envs[i] = spec.make()
            except Exception:  # noqa: BLE001 - this slot fails alone
                self.errors[i] = _error()

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
        try:
            self.envs[i] = spec.make()
        except Exception:  # noqa: BLE001 - this slot fails alone
            return _error()
        return None

    def drop(self, i: int) -> None:
        env = self.envs.pop(i, None)
        if env is not None:
            try:
                env.close()
            except Exception:  # noqa: BLE001 - closing a broken environment may raise too
                pass

    def close(self) -> None:
        for i in list(self.envs):
            self.drop(i)


class EnvPool:
    """K environment slots with shared arrays (see the module docstring)."""

    arrays: dict[str, np.ndarray]

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
                 specs: dict[int, EnvSpec]) -> None:
    """One worker: build its slots' environments, then serve (op, slots) requests until told to
    stop or until the pack process is gone."""
    envs = _Envs(specs, _shared_arrays(buffers, k, obs_dim, action_dim))
    ops = {"reset": _reset, "step": _step}
    try:
        conn.send("ready")
        while True:
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
            else:
                conn.send(envs.run(ops[op], slots))
    finally:
        envs.close()


class WorkerEnvPool(EnvPool):
    """The K environments spread over ``n_workers`` spawned processes (slot ``i`` lives in worker
    ``i % n_workers``), arrays in shared memory."""

    def __init__(self, specs: Sequence[EnvSpec], obs_dim: int, action_dim: int, n_workers: int):
        super().__init__(len(specs))
        ctx = mp.get_context("spawn")
        self.n_workers = max(1, min(int(n_workers), self.k))
        self._buffers = {name: ctx.RawArray(np.ctypeslib.as_ctypes_type(dtype),
                                            self.k * int(np.prod(shape(obs_dim, action_dim), dtype=int)))
                         for name, (dtype, shape) in _FIELDS.items()}
        self.arrays = _shared_arrays(self._buffers, self.k, obs_dim, action_dim)
        self._conns: list[Connection] = []
        self._procs: list[mp.process.BaseProcess] = []
        for w in range(self.n_workers):
            mine = {i: spec for i, spec in enumerate(specs) if i % self.n_workers == w}
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, self._buffers, self.k, obs_dim, action_dim, mine),
                               daemon=True, name=f"env-worker-{w}")
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        for w, conn in enumerate(self._conns):
            if conn.recv() != "ready":
                raise RuntimeError(f"environment worker {w} did not start")

    def _run(self, op: str, slots: Sequence[int]) -> dict[int, str]:
        by_worker: dict[int, list[int]] = {}
        for i in slots:
            by_worker.setdefault(i % self.n_workers, []).append(i)
        for w, mine in by_worker.items():  # every worker starts before any is waited for
            self._conns[w].send((op, mine))
        errors: dict[int, str] = {}
        for w, mine in by_worker.items():
            try:
                errors.update(self._conns[w].recv())
            except (EOFError, OSError):  # the worker process itself died: its slots fail
                errors.update({i: f"environment worker {w} (pid {self._procs[w].pid}) died" for i in mine})
        return errors

    def reset(self, slots: Sequence[int]) -> dict[int, str]:
        return self._run("reset", slots)

    def step(self, slots: Sequence[int]) -> dict[int, str]:
        return self._run("step", slots)

    def drop(self, slot: int) -> None:
        self._run("drop", [slot])

    def put(self, slot: int, spec: EnvSpec) -> str | None:
        w = slot % self.n_workers
        try:
            self._conns[w].send(("put", [(slot, spec)]))
            return self._conns[w].recv().get(slot)
        except (EOFError, OSError):
            return f"environment worker {w} (pid {self._procs[w].pid}) died"

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


def make_pool(specs: Sequence[EnvSpec], obs_dim: int, action_dim: int, n_workers: int) -> EnvPool:
    """Worker processes when ``n_workers >= 1``, else the environments in this process."""
    if n_workers >= 1:
        return WorkerEnvPool(specs, obs_dim, action_dim, n_workers)
    return InProcessEnvPool(specs, obs_dim, action_dim)
