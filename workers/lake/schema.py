"""What a lake shard holds: the episode and shard records, the Parquet schema (one row per
control step) and the codec between episodes and Arrow tables.

The observation layout and goal encoding come from :mod:`workers.piano.layout`; this module
only says how they become columns: the 979 goal bits packed into ``goal_bits``, the other 165
floats split into named float32 columns, and :func:`rebuild_obs` for the way back.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers.piano.layout import (ACTION_DIM, FPS, GOAL_BITS, GOAL_BYTES, N_FINGERS, N_KEYS, NO_KEY,  # noqa: F401
                                  OBS_DIM, OBS_SLICES, pack_goal, unpack_goal)

# Shard schema versions: 1 the first; 2 adds the ``ot_fingering`` column. This pianoforge reads
# and writes both (``lake.schema_version`` says which it writes); a shard's own version is in its
# key-value metadata and catalog entry.
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
LATEST_SCHEMA_VERSION = SUPPORTED_SCHEMA_VERSIONS[-1]
SPLITS = ("train", "eval", "held-out")

# Observation parts as (column, start, stop), RP1M order; the first two are the goal bits.
OBS_LAYOUT: tuple[tuple[str, int, int], ...] = tuple(
    ("fingertip_pos" if name == "fingertips" else name, s.start, s.stop) for name, s in OBS_SLICES.items())
# The continuous observation parts, stored as float32 columns in this order after the goal bits.
CONTINUOUS_COLUMNS: tuple[tuple[str, int, int], ...] = OBS_LAYOUT[2:]

_SAFE_NAMES = {  # they name files and the hive partition directory
    "unit_id": re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$"),
    "song_hash": re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$"),
}


class LakeError(RuntimeError):
    """The lake or a shard is not what it should be; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------
# What goes in and what comes out
# --------------------------------------------------------------------------------------------


@dataclass
class Episode:
    """One rollout episode, step by step (T steps)."""

    seed: int
    obs: np.ndarray  # float32 [T, 1144]
    action: np.ndarray  # float32 [T, 39]
    reward: np.ndarray  # float32 [T]
    pressed: np.ndarray  # bool [T, 88]: keys sounding
    target: np.ndarray  # bool [T, 88]: keys that should sound
    episode_return: float
    precision: float
    recall: float
    f1: float
    # int8 [T, 10]: per finger (right thumb..little, left thumb..little) the key (0..87) the
    # environment's OT fingering matched to it after this step's action, -1: none. None: not
    # recorded (synthetic episodes, shards of schema version 1).
    ot_fingering: np.ndarray | None = None

    @property
    def n_steps(self) -> int:
        return int(self.obs.shape[0])


@dataclass(frozen=True)
class ShardMeta:
    """Who a shard belongs to: one unit of work (one chunk of one song under one config)."""

    unit_id: str
    song_hash: str
    song_name: str
    chunk_index: int
    split: str  # 'train' | 'eval' | 'held-out'
    config_hash: str
    specialist_f1: float | None = None  # None: the mean F1 of the shard's episodes


@dataclass(frozen=True)
class ShardInfo:
    """A committed shard as the catalog knows it (ShardMeta's fields plus where and how big)."""

    unit_id: str
    song_hash: str
    song_name: str
    chunk_index: int
    split: str
    config_hash: str
    specialist_f1: float
    path: Path  # absolute path of the Parquet file
    n_episodes: int
    n_steps: int
    bytes: int
    n_row_groups: int = 0
    schema_version: int = 1
    commit_id: str = ""  # also in the file's key-value metadata: tells which write this is
    committed_at: str = ""  # ISO-8601 UTC
    mean_episode_f1: float = float("nan")
    mean_episode_return: float = float("nan")
    # sha256 of the file as committed ("" in entries catalogued before checksums were kept;
    # ``Lake.verify`` adds it to those whose file checks whole)
    sha256: str = ""
    # sha256 of each row group's bytes and of the footer (the file's last footer length + 8
    # bytes), so that a reader checks what it reads, row group by row group (workers.lake.store.shard_digests)
    row_group_sha256: tuple[str, ...] = ()
    footer_sha256: str = ""

    @property
    def meta(self) -> ShardMeta:
        return ShardMeta(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ShardMeta)})


# --------------------------------------------------------------------------------------------
# Schema: one row per step
# --------------------------------------------------------------------------------------------

def _fixed_list_type(width: int) -> pa.DataType:
    return pa.list_(pa.field("element", pa.float32(), nullable=False), width)  # as Parquet names it


KEY_LIST_TYPE = pa.list_(pa.field("element", pa.uint8(), nullable=False))
# N_FINGERS entries per row. A variable-size list because a row may be null (not recorded): pyarrow
# (25) cannot read back a null row of a fixed-size list from Parquet.
FINGERING_TYPE = pa.list_(pa.field("element", pa.int8(), nullable=False))

SHARD_SCHEMA = pa.schema(  # the latest version's
    [
        pa.field("unit_id", pa.string(), nullable=False),
        pa.field("episode", pa.int32(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("goal_bits", pa.binary(GOAL_BYTES), nullable=False),
        pa.field("key_joints", _fixed_list_type(88), nullable=False),
        pa.field("sustain_state", pa.float32(), nullable=False),
        pa.field("fingertip_pos", _fixed_list_type(30), nullable=False),
        pa.field("hand_joints", _fixed_list_type(46), nullable=False),
        pa.field("action", _fixed_list_type(ACTION_DIM), nullable=False),
        pa.field("reward", pa.float32(), nullable=False),
        pa.field("pressed", KEY_LIST_TYPE, nullable=False),
        pa.field("target", KEY_LIST_TYPE, nullable=False),
        pa.field("ot_fingering", FINGERING_TYPE, nullable=True),  # since version 2
        pa.field("episode_return", pa.float64(), nullable=False),
        pa.field("episode_precision", pa.float64(), nullable=False),
        pa.field("episode_recall", pa.float64(), nullable=False),
        pa.field("episode_f1", pa.float64(), nullable=False),
    ]
)
SHARD_SCHEMAS: dict[int, pa.Schema] = {
    1: SHARD_SCHEMA.remove(SHARD_SCHEMA.get_field_index("ot_fingering")),
    2: SHARD_SCHEMA,
}


def shard_schema(version: int) -> pa.Schema:
    """The Parquet schema of shards of ``version``."""
    try:
        return SHARD_SCHEMAS[version]
    except KeyError:
        raise LakeError(f"shard schema_version {version} is not known to this pianoforge "
                        f"(it knows {SUPPORTED_SCHEMA_VERSIONS})") from None


COLUMN_DOCS: dict[str, str] = {
    "unit_id": "the unit that produced the shard (same for every row of a file; join key with the catalog)",
    "episode": "episode index within the shard, 0..n_episodes-1",
    "step": "control step within the episode, 0..T-1 (time = step / fps seconds)",
    "seed": "the episode's environment/policy seed",
    "goal_bits": "observation[0:979] (piano goal 11x88, lookahead step-major, then sustain goal 11), 0/1 bits packed MSB-first "
    "(numpy.packbits, bitorder='big') into 123 bytes; the last 5 bits are 0",
    "key_joints": "observation[979:1067]: piano key joint positions",
    "sustain_state": "observation[1067]: sustain pedal state",
    "fingertip_pos": "observation[1068:1098]: fingertip positions, 10 fingers x (x, y, z)",
    "hand_joints": "observation[1098:1144]: hand joint positions",
    "action": "the 39 actions applied at this step (joint positions of both hands, forearms, sustain)",
    "reward": "reward received after this step's action",
    "pressed": "indices (0..87) of the piano keys sounding after this step, ascending",
    "target": "indices (0..87) of the piano keys that should sound at this step, ascending",
    "ot_fingering": "per finger (0-4 right thumb..little, 5-9 left thumb..little) the key (0..87) the environment's "
    "OT fingering matched to it after this step's action (the matching of this row's target keys to the fingertips "
    "that the OT reward term measured), -1: no key; null: not recorded (an episode played without physics). "
    "Absent from shards of schema_version 1",
    "episode_return": "the episode's return (same on every row of the episode)",
    "episode_precision": "the episode's mean per-step key precision",
    "episode_recall": "the episode's mean per-step key recall",
    "episode_f1": "the episode's mean per-step key F1",
}

# Shard-level facts stored as Parquet key-value metadata (strings) and in the catalog entry.
SHARD_KV_KEYS = ("unit_id", "song_hash", "song_name", "chunk_index", "split", "config_hash",
                 "specialist_f1", "schema_version", "commit_id", "n_episodes", "n_steps")


def _fixed_list(flat: np.ndarray, width: int) -> pa.FixedSizeListArray:
    values = pa.array(np.ascontiguousarray(flat, np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, type=_fixed_list_type(width))


def _index_lists(keys: np.ndarray) -> pa.ListArray:
    """bool [T, 88] -> list<uint8> of the true indices per row."""
    rows, cols = np.nonzero(keys)
    offsets = np.zeros(keys.shape[0] + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=keys.shape[0]), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(cols.astype(np.uint8)), type=KEY_LIST_TYPE)


def _index_lists_to_bool(arr: pa.ListArray | pa.ChunkedArray, n_keys: int = N_KEYS) -> np.ndarray:
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    offsets = np.asarray(arr.offsets)
    values = np.asarray(arr.flatten(), dtype=np.int64)
    out = np.zeros((len(arr), n_keys), dtype=bool)
    rows = np.repeat(np.arange(len(arr)), np.diff(offsets))
    out[rows, values] = True
    return out


def fixed_list_to_numpy(arr: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """A fixed-size list<float32>[width] column as float32 [n, width]."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    return np.asarray(arr.flatten(), dtype=np.float32).reshape(len(arr), width)


def _check_episode(ep: Episode, index: int) -> None:
    where = f"episode {index} (seed {ep.seed})"
    T = ep.obs.shape[0] if getattr(ep.obs, "ndim", 0) == 2 else -1
    expected = {"obs": (T, OBS_DIM), "action": (T, ACTION_DIM), "reward": (T,),
                "pressed": (T, N_KEYS), "target": (T, N_KEYS)}
    if ep.ot_fingering is not None:
        expected["ot_fingering"] = (T, N_FINGERS)
    for name, shape in expected.items():
        got = np.shape(getattr(ep, name))
        if T <= 0 or got != shape:
            raise LakeError(f"{where}: field '{name}' has shape {got}, expected {shape} (T = steps > 0)")
    goal = np.asarray(ep.obs)[:, :GOAL_BITS]
    bad = ~((goal == 0) | (goal == 1))
    if bad.any():
        step, col = map(int, np.argwhere(bad)[0])
        raise LakeError(f"{where}: obs[{step}, {col}] = {float(goal[step, col])}; obs[:, :{GOAL_BITS}] must be 0/1 goal bits")
    if ep.ot_fingering is not None:
        fingering = np.asarray(ep.ot_fingering)
        bad = (fingering < NO_KEY) | (fingering >= N_KEYS)
        if bad.any():
            step, finger = map(int, np.argwhere(bad)[0])
            raise LakeError(f"{where}: ot_fingering[{step}, {finger}] = {int(fingering[step, finger])}; "
                            f"expected a key 0..{N_KEYS - 1} or {NO_KEY}")


def _fingering_column(episodes: Sequence[Episode]) -> pa.ListArray:
    """The episodes' ``ot_fingering`` rows (N_FINGERS entries each); null rows for an episode without them."""
    recorded = [ep for ep in episodes if ep.ot_fingering is not None]
    values = np.concatenate([np.asarray(ep.ot_fingering, np.int8).reshape(-1) for ep in recorded]) \
        if recorded else np.zeros(0, np.int8)
    missing = np.concatenate([np.full(ep.n_steps, ep.ot_fingering is None) for ep in episodes])
    offsets = np.zeros(len(missing) + 1, dtype=np.int32)
    np.cumsum(np.where(missing, 0, N_FINGERS), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), type=FINGERING_TYPE,
                                    mask=pa.array(missing) if missing.any() else None)


def episodes_to_table(unit_id: str, episodes: Sequence[Episode], first_episode: int = 0,
                      schema_version: int = LATEST_SCHEMA_VERSION) -> pa.Table:
    """The rows of a shard (one per step, episodes in order) as an Arrow table with the schema
    of ``schema_version``; the episodes are numbered from ``first_episode`` on."""
    schema = shard_schema(schema_version)
    for i, ep in enumerate(episodes):
        _check_episode(ep, first_episode + i)
    obs = np.concatenate([np.asarray(ep.obs, np.float32) for ep in episodes])
    lengths = np.array([ep.n_steps for ep in episodes])
    n = int(lengths.sum())
    episode_index = np.repeat(np.arange(first_episode, first_episode + len(episodes), dtype=np.int32), lengths)
    step = np.concatenate([np.arange(t, dtype=np.int32) for t in lengths])

    def per_episode(values: Iterable[float], dtype) -> pa.Array:
        return pa.array(np.repeat(np.asarray(list(values), dtype=dtype), lengths))

    goal = pack_goal(obs)  # [n, 123]
    columns: dict[str, pa.Array] = {
        "unit_id": pa.repeat(pa.scalar(unit_id, pa.string()), n),
        "episode": pa.array(episode_index),
        "step": pa.array(step),
        "seed": per_episode((ep.seed for ep in episodes), np.int64),
        "goal_bits": pa.FixedSizeBinaryArray.from_buffers(pa.binary(GOAL_BYTES), n, [None, pa.py_buffer(goal.tobytes())]),
    }
    for name, start, stop in CONTINUOUS_COLUMNS:
        width = stop - start
        columns[name] = pa.array(obs[:, start]) if width == 1 else _fixed_list(obs[:, start:stop], width)
    columns["action"] = _fixed_list(np.concatenate([np.asarray(ep.action, np.float32) for ep in episodes]), ACTION_DIM)
    columns["reward"] = pa.array(np.concatenate([np.asarray(ep.reward, np.float32) for ep in episodes]))
    columns["pressed"] = _index_lists(np.concatenate([np.asarray(ep.pressed, bool) for ep in episodes]))
    columns["target"] = _index_lists(np.concatenate([np.asarray(ep.target, bool) for ep in episodes]))
    if "ot_fingering" in schema.names:
        columns["ot_fingering"] = _fingering_column(episodes)
    columns["episode_return"] = per_episode((ep.episode_return for ep in episodes), np.float64)
    columns["episode_precision"] = per_episode((ep.precision for ep in episodes), np.float64)
    columns["episode_recall"] = per_episode((ep.recall for ep in episodes), np.float64)
    columns["episode_f1"] = per_episode((ep.f1 for ep in episodes), np.float64)
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def rebuild_obs(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The exact float32 [n, 1144] observations of the rows (needs goal_bits and the continuous columns)."""
    n = table.num_rows
    obs = np.empty((n, OBS_DIM), dtype=np.float32)
    if n == 0:
        return obs
    goal = table.column("goal_bits")
    goal = goal.combine_chunks() if isinstance(goal, pa.ChunkedArray) else goal
    packed = np.frombuffer(goal.buffers()[1], dtype=np.uint8, count=(goal.offset + n) * GOAL_BYTES)
    packed = packed[goal.offset * GOAL_BYTES:].reshape(n, GOAL_BYTES)
    obs[:, :GOAL_BITS] = unpack_goal(packed)
    for name, start, stop in CONTINUOUS_COLUMNS:
        col = table.column(name)
        if stop - start == 1:
            obs[:, start] = np.asarray(col, dtype=np.float32)
        else:
            obs[:, start:stop] = fixed_list_to_numpy(col, stop - start)
    return obs


def table_to_episodes(table: pa.Table) -> list[Episode]:
    """Split a shard's rows back into Episodes (rows must be ordered by episode, then step)."""
    if table.num_rows == 0:
        return []
    episode = np.asarray(table.column("episode"), dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, episode[1:] != episode[:-1]])
    stops = np.r_[starts[1:], len(episode)]
    obs = rebuild_obs(table)
    action = fixed_list_to_numpy(table.column("action"), ACTION_DIM)
    reward = np.asarray(table.column("reward"), dtype=np.float32)
    pressed = _index_lists_to_bool(table.column("pressed"))
    target = _index_lists_to_bool(table.column("target"))
    fingering, recorded = read_fingering(table)
    cols = {name: table.column(name).to_numpy() for name in
            ("seed", "episode_return", "episode_precision", "episode_recall", "episode_f1")}
    return [
        Episode(seed=int(cols["seed"][a]), obs=obs[a:b], action=action[a:b], reward=reward[a:b],
                pressed=pressed[a:b], target=target[a:b], episode_return=float(cols["episode_return"][a]),
                precision=float(cols["episode_precision"][a]), recall=float(cols["episode_recall"][a]),
                f1=float(cols["episode_f1"][a]), ot_fingering=fingering[a:b] if recorded[a] else None)
        for a, b in zip(starts, stops)
    ]


def read_fingering(table: pa.Table | pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """(int8 [n, 10] ``ot_fingering`` rows, bool [n] whether each row has them) of a shard's
    rows; a table without the column (schema version 1) has none."""
    n = table.num_rows
    if "ot_fingering" not in table.column_names:
        return np.full((n, N_FINGERS), NO_KEY, np.int8), np.zeros(n, bool)
    col = table.column("ot_fingering")
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    recorded = np.asarray(col.is_valid(), dtype=bool)
    rows = np.full((n, N_FINGERS), NO_KEY, np.int8)
    rows[recorded] = np.asarray(col.flatten(), dtype=np.int8).reshape(-1, N_FINGERS)  # flatten skips null rows
    return rows, recorded


def read_shard_kv(path: str | Path) -> dict[str, str]:
    """A shard file's pianoforge key-value metadata (strings), without reading its data."""
    kv = pq.read_metadata(path).metadata or {}
    return {k.decode(): v.decode() for k, v in kv.items() if k.decode() in SHARD_KV_KEYS}



def _check_name(field: str, value: str) -> str:
    pattern = _SAFE_NAMES[field]
    if not isinstance(value, str) or not pattern.match(value):
        raise LakeError(f"ShardMeta.{field} = {value!r} cannot name a file (expected {pattern.pattern})")
    return value


def _plain_meta(meta: ShardMeta) -> ShardMeta:
    """``meta`` with plain Python types (e.g. not numpy scalars), checked to name safe files."""
    f1 = None if meta.specialist_f1 is None else float(meta.specialist_f1)
    meta = ShardMeta(unit_id=meta.unit_id, song_hash=meta.song_hash, song_name=str(meta.song_name),
                     chunk_index=int(meta.chunk_index), split=meta.split, config_hash=str(meta.config_hash),
                     specialist_f1=f1)
    _check_name("unit_id", meta.unit_id)
    _check_name("song_hash", meta.song_hash)
    if meta.split not in SPLITS:
        raise LakeError(f"ShardMeta.split = {meta.split!r}; expected one of {SPLITS}")
    return meta

