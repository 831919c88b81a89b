"""Which finger pressed which key, and which keys sounded, from the lake (the dashboard's keyboard views).

Fingering: :func:`episode_finger_key_counts` counts, for each finger and key, the steps in which the
environment's OT fingering matched that finger to that key. Shards of schema version 2 record the
matching itself (the ``ot_fingering`` column: each finger's key, the rollout's
``info["ot_assignment"]``): the counts come from it, every step, no physics.

Older shards (schema version 1) and episodes played without physics (the synthetic workload) have
no such column; for them the matching is re-run (:func:`finger_key_counts`). The lake stores,
per step, the observation the action was taken from (with the 10 fingertip positions in world
coordinates, ``obs[1068:1098]``, right thumb..little then left thumb..little as RoboPianist
numbers fingers) and the keys that should sound at that step (``target``). The environment's OT
reward for step t matches ``target[t]`` to the fingertips *after* the step's action, which the
lake holds as ``obs[t + 1]``; the re-run applies the environment's assignment
(``workers.piano.fingering.assign_fingers``) to those pairs against the keys' press points on
RoboPianist's piano at rest (the piano sits at the world origin in the task), for every step but
the last (whose next observation is not stored). It needs MuJoCo for the press points and can
differ from the recorded matching where a pressed key's surface has moved down.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

import workers.lake as _lake
from workers.piano.layout import N_FINGERS, N_KEYS, fingering_pairs

# Observation parts, by name, from the lake's layout (RP1M order).
_OBS = {name: slice(start, stop) for name, start, stop in _lake.schema.OBS_LAYOUT}
FINGERTIP_SLICE = _OBS["fingertip_pos"]  # 10 fingertips x (x, y, z), world frame
SUSTAIN_SLICE = _OBS["sustain_state"]  # the pedal's position over its range (0 up .. 1 down)


class KeyCounter:
    """Pressed-key counts over a lake's committed shards, reading each shard's ``pressed`` column
    once per commit (a replaced shard is read again)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[np.ndarray, int]] = {}
        self._lock = threading.Lock()

    def counts(self, lake, shards) -> tuple[np.ndarray, int]:
        """``(int64[88] steps each key was pressed, total steps)`` over ``shards``."""
        total = np.zeros(88, dtype=np.int64)
        steps = 0
        for shard in shards:
            key = (str(shard.path), shard.commit_id or str(shard.committed_at))
            with self._lock:
                hit = self._cache.get(key)
            if hit is None:
                # `pressed` holds, per step, the indices of the keys sounding: count them directly.
                try:
                    column = lake.read_table(shard, columns=["pressed"]).column("pressed").combine_chunks()
                except _lake.LakeError:
                    continue  # replaced by a retried unit since it was listed: counted next time
                keys = np.asarray(column.flatten(), dtype=np.int64)
                hit = (np.bincount(keys, minlength=88)[:88].astype(np.int64), len(column))
                with self._lock:
                    self._cache[key] = hit
            total += hit[0]
            steps += hit[1]
        return total, steps


def best_episode(lake, shard):
    """The shard's episode with the highest F1 (ties: higher return), reading only the row
    groups that hold it (each row group holds whole episodes)."""
    from workers.lake.episodes import read_episode

    return read_episode(lake, shard)


@functools.lru_cache(maxsize=1)
def key_press_points() -> np.ndarray:
    """(88, 3) world positions where a fingertip presses each key of RoboPianist's piano at rest,
    the points the environment's OT fingering measures distances to."""
    from dm_control import mjcf
    from robopianist.models.piano import piano

    from workers.piano.fingering import KEY_SURFACE_OFFSET

    model = piano.Piano()
    physics = mjcf.Physics.from_mjcf_model(model.mjcf_model)
    geoms = physics.bind([key.geom[0] for key in model.keys])
    return np.asarray(geoms.xpos) + np.asarray(geoms.size) * KEY_SURFACE_OFFSET


def finger_key_counts(fingertips: np.ndarray, target: np.ndarray, key_points: np.ndarray | None = None) -> np.ndarray:
    """int64 (10, 88): in how many steps OT fingering matched finger i to key j, for fingertip
    positions ``(T, 30)`` (or ``(T, 10, 3)``) and keys to press ``bool (T, 88)``."""
    from workers.piano.fingering import assign_fingers

    points = key_press_points() if key_points is None else key_points
    tips = np.asarray(fingertips, dtype=np.float64).reshape(len(target), -1, 3)
    counts = np.zeros((tips.shape[1], 88), dtype=np.int64)
    for t in range(len(target)):
        keys = np.flatnonzero(target[t])
        if keys.size == 0:
            continue
        fingers, key_rows, _ = assign_fingers(tips[t], points[keys])
        np.add.at(counts, (fingers, keys[key_rows]), 1)
    return counts


def pedal_after_each_step(episode) -> np.ndarray:
    """bool (T,): the sustain pedal down after step t (as ``pressed[t]``), i.e. in ``obs[t + 1]``."""
    pedal = episode.obs[:, SUSTAIN_SLICE][:, 0] > 0.5
    return np.r_[pedal[1:], pedal[-1:]]


def recorded_finger_key_counts(ot_fingering: np.ndarray) -> np.ndarray:
    """int64 (10, 88): in how many steps finger i was matched to key j, from the lake's
    ``ot_fingering`` rows ``int8 (T, 10)`` (each finger's key, -1: none)."""
    _, fingers, keys = fingering_pairs(ot_fingering)
    counts = np.zeros((N_FINGERS, N_KEYS), dtype=np.int64)
    np.add.at(counts, (fingers, keys), 1)
    return counts


RECORDED = "Fingering: the OT assignment the environment computed during the rollout (steps per finger and key)."
RE_RUN = ("Fingering: the OT assignment re-run on the stored fingertip positions and target keys "
          "(steps per finger and key; this shard predates the recorded assignment).")


def episode_finger_key_counts(episode) -> tuple[np.ndarray, str]:
    """(int64 (10, 88) OT fingering counts of a lake ``Episode``, how they were obtained): from its
    recorded ``ot_fingering`` when it has one, else re-run (see the module docstring)."""
    if episode.ot_fingering is not None:
        return recorded_finger_key_counts(episode.ot_fingering), RECORDED
    return finger_key_counts(episode.obs[1:, FINGERTIP_SLICE], episode.target[:-1]), RE_RUN
