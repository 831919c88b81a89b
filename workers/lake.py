"""The trajectory lake: specialists' rollouts as plain Parquet files anyone can open.

Layout under the lake root (``<song_hash>`` is the song's content hash, ``<unit_id>`` the unit's
identity; see ``meta/info.json`` in any lake for the same description in machine-readable form)::

    meta/info.json                         schema, observation layout, fps, path templates
    meta/catalog/<unit_id>.json            one entry per committed shard (the source of truth)
    meta/locks/<unit_id>.lock              serialises concurrent commits of the same unit
    data/song=<song_hash>/<unit_id>.parquet  one shard: all rollout episodes of one unit

One Parquet row is one control step (20 per second). The observation is stored compactly: its
first 979 entries are 0/1 goal bits (``goal_bits``, bit-packed), the other 165 floats are split
into named float32 columns; :func:`rebuild_obs` (or the recipe in ``info.json``) gives back the
exact 1144-vector. Row groups hold whole episodes, so a row group can be read on its own.

A shard is committed atomically: it is written under a hidden temporary name in its final
directory, fsynced and renamed, and only then catalogued. Readers of this module list shards from
the catalog only; plain Parquet readers skip the hidden temporary names (pyarrow ignores names
starting with ``.``; ``*.parquet`` globs do not match ``.tmp``). Committing a unit again replaces
its shard and its catalog entry.

Writers stream: ``Lake.shard_writer(unit_id, song_hash)`` encodes each episode as it is added and
writes row groups as they fill, so a worker holds one row group of compact rows, not its whole
shard; ``Lake.commit_shard(meta, episodes)`` is the same writer fed a list. The shard-level facts
(``SHARD_KV_KEYS``) are the file's Parquet key-value metadata, written at commit: read them with
``pyarrow.parquet.read_metadata(path).metadata`` (or :func:`read_shard_kv`, DuckDB's
``parquet_kv_metadata``), not from the Arrow schema stored in the file.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

import configs

if TYPE_CHECKING:  # the torch dataset lives in lake_dataset.py so that the lake imports fast
    from workers.lake_dataset import TrajectoryDataset  # noqa: F401

SUPPORTED_SCHEMA_VERSIONS = (1,)
FPS = 20  # control steps per second (env.control_timestep = 0.05 s)
SPLITS = ("train", "eval", "held-out")

# Observation layout (RP1M order): (column, start, stop). The goal parts are binary.
OBS_DIM = 1144
ACTION_DIM = 39
N_KEYS = 88
GOAL_BITS = 979  # piano goal 11 x 88 + sustain goal 11
GOAL_BYTES = (GOAL_BITS + 7) // 8  # 123
OBS_LAYOUT: tuple[tuple[str, int, int], ...] = (
    ("piano_goal", 0, 968),
    ("sustain_goal", 968, 979),
    ("key_joints", 979, 1067),
    ("sustain_state", 1067, 1068),
    ("fingertip_pos", 1068, 1098),
    ("hand_joints", 1098, 1144),
)
# The continuous observation parts, stored as float32 columns in this order after the goal bits.
CONTINUOUS_COLUMNS: tuple[tuple[str, int, int], ...] = OBS_LAYOUT[2:]

DATA_DIR = "data"
META_DIR = "meta"
CATALOG_DIR = f"{META_DIR}/catalog"
LOCK_DIR = f"{META_DIR}/locks"
SHARD_TEMPLATE = "data/song={song_hash}/{unit_id}.parquet"
CATALOG_TEMPLATE = "meta/catalog/{unit_id}.json"
TMP_MARK = ".tmp-"  # temporary names: ".<final name>.tmp-<random>"
LEVELLED_CODECS = ("zstd", "gzip", "lz4")  # the codecs that take lake.compression_level

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

    @property
    def meta(self) -> ShardMeta:
        return ShardMeta(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ShardMeta)})


# --------------------------------------------------------------------------------------------
# Schema: one row per step
# --------------------------------------------------------------------------------------------

def _fixed_list_type(width: int) -> pa.DataType:
    return pa.list_(pa.field("element", pa.float32(), nullable=False), width)  # as Parquet names it


KEY_LIST_TYPE = pa.list_(pa.field("element", pa.uint8(), nullable=False))

SHARD_SCHEMA = pa.schema(
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
        pa.field("episode_return", pa.float64(), nullable=False),
        pa.field("episode_precision", pa.float64(), nullable=False),
        pa.field("episode_recall", pa.float64(), nullable=False),
        pa.field("episode_f1", pa.float64(), nullable=False),
    ]
)

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
    for name, shape in expected.items():
        got = np.shape(getattr(ep, name))
        if T <= 0 or got != shape:
            raise LakeError(f"{where}: field '{name}' has shape {got}, expected {shape} (T = steps > 0)")
    goal = np.asarray(ep.obs)[:, :GOAL_BITS]
    bad = ~((goal == 0) | (goal == 1))
    if bad.any():
        step, col = map(int, np.argwhere(bad)[0])
        raise LakeError(f"{where}: obs[{step}, {col}] = {float(goal[step, col])}; obs[:, :{GOAL_BITS}] must be 0/1 goal bits")


def episodes_to_table(unit_id: str, episodes: Sequence[Episode], first_episode: int = 0) -> pa.Table:
    """The rows of a shard (one per step, episodes in order) as an Arrow table with SHARD_SCHEMA;
    the episodes are numbered from ``first_episode`` on."""
    for i, ep in enumerate(episodes):
        _check_episode(ep, first_episode + i)
    obs = np.concatenate([np.asarray(ep.obs, np.float32) for ep in episodes])
    lengths = np.array([ep.n_steps for ep in episodes])
    n = int(lengths.sum())
    episode_index = np.repeat(np.arange(first_episode, first_episode + len(episodes), dtype=np.int32), lengths)
    step = np.concatenate([np.arange(t, dtype=np.int32) for t in lengths])

    def per_episode(values: Iterable[float], dtype) -> pa.Array:
        return pa.array(np.repeat(np.asarray(list(values), dtype=dtype), lengths))

    goal = np.packbits(obs[:, :GOAL_BITS] != 0, axis=1, bitorder="big")  # [n, 123]
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
    columns["episode_return"] = per_episode((ep.episode_return for ep in episodes), np.float64)
    columns["episode_precision"] = per_episode((ep.precision for ep in episodes), np.float64)
    columns["episode_recall"] = per_episode((ep.recall for ep in episodes), np.float64)
    columns["episode_f1"] = per_episode((ep.f1 for ep in episodes), np.float64)
    return pa.Table.from_arrays([columns[f.name] for f in SHARD_SCHEMA], schema=SHARD_SCHEMA)


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
    obs[:, :GOAL_BITS] = np.unpackbits(packed, axis=1, count=GOAL_BITS, bitorder="big")
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
    cols = {name: table.column(name).to_numpy() for name in
            ("seed", "episode_return", "episode_precision", "episode_recall", "episode_f1")}
    return [
        Episode(seed=int(cols["seed"][a]), obs=obs[a:b], action=action[a:b], reward=reward[a:b],
                pressed=pressed[a:b], target=target[a:b], episode_return=float(cols["episode_return"][a]),
                precision=float(cols["episode_precision"][a]), recall=float(cols["episode_recall"][a]),
                f1=float(cols["episode_f1"][a]))
        for a, b in zip(starts, stops)
    ]


def read_shard_kv(path: str | Path) -> dict[str, str]:
    """A shard file's pianoforge key-value metadata (strings), without reading its data."""
    kv = pq.read_metadata(path).metadata or {}
    return {k.decode(): v.decode() for k, v in kv.items() if k.decode() in SHARD_KV_KEYS}


# --------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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


# --------------------------------------------------------------------------------------------
# The lake
# --------------------------------------------------------------------------------------------


def _column_shape(dtype: pa.DataType) -> list[int | str]:
    """Per-row shape of a column: [] scalar, [n] fixed width, ["variable"] a list."""
    if isinstance(dtype, pa.FixedSizeListType):
        return [dtype.list_size]
    if isinstance(dtype, pa.FixedSizeBinaryType):
        return [dtype.byte_width]
    return ["variable"] if isinstance(dtype, pa.ListType) else []


def info_document(lake_cfg: configs.LakeConfig) -> dict[str, Any]:
    """The self-description written to ``meta/info.json``."""
    return {
        "format": "pianoforge trajectory lake",
        "schema_version": lake_cfg.schema_version,
        "fps": FPS,
        "obs_dim": OBS_DIM,
        "action_dim": ACTION_DIM,
        "row": "one control step; rows ordered by episode then step; each row group holds whole episodes",
        "path_templates": {"shard": SHARD_TEMPLATE, "catalog_entry": CATALOG_TEMPLATE},
        "partitioning": "hive: directory 'song=<song content hash>' (read 'song' as a string)",
        "visibility": "only shards with a catalog entry are committed; hidden '.*.tmp-*' files are "
                      "unfinished writes and must be ignored",
        "compression": {"codec": lake_cfg.compression, "level": lake_cfg.compression_level},
        "row_group_rows": lake_cfg.row_group_rows,
        "observation_layout": [
            {"name": name, "slice": [start, stop], "binary": stop <= GOAL_BITS} for name, start, stop in OBS_LAYOUT
        ],
        "columns": [
            {"name": f.name, "type": str(f.type), "shape": _column_shape(f.type), "meaning": COLUMN_DOCS[f.name]}
            for f in SHARD_SCHEMA
        ],
        "shard_metadata": {
            "where": "Parquet key-value metadata of each shard and its catalog entry",
            "keys": list(SHARD_KV_KEYS),
        },
        "catalog_entry_fields": [f.name for f in dataclasses.fields(ShardInfo)],
        "rebuild_observation": (
            "obs = float32[n, 1144]; obs[:, 0:979] = numpy.unpackbits(goal_bits as uint8[n, 123], axis=1, "
            "count=979, bitorder='big'); obs[:, 979:1067] = key_joints; obs[:, 1067] = sustain_state; "
            "obs[:, 1068:1098] = fingertip_pos; obs[:, 1098:1144] = hand_joints"
        ),
        "examples": {
            "duckdb": "SELECT song, unit_id, episode, step, action, reward FROM "
                      "read_parquet('data/*/*.parquet', hive_partitioning = true, hive_types = {'song': VARCHAR})",
            "duckdb_catalog": "SELECT * FROM read_json_auto('meta/catalog/*.json')",
            "pyarrow": "pyarrow.dataset.dataset('data', format='parquet', partitioning="
                       "pyarrow.dataset.partitioning(pyarrow.schema([('song', pyarrow.string())]), flavor='hive'))",
        },
    }


class Lake:
    """A trajectory lake rooted at a folder (created on first commit). Reading needs no config;
    writing uses ``lake_cfg`` (codec, level, row group size, schema version)."""

    def __init__(self, root: str | Path, lake_cfg: configs.LakeConfig | None = None):
        self.root = Path(root).absolute()
        self._cfg = lake_cfg
        if lake_cfg is not None:
            self._check_cfg()
        self._ready = False

    @property
    def cfg(self) -> configs.LakeConfig:
        """The lake settings; only writing needs them (default: ``configs.load().lake``)."""
        if self._cfg is None:
            self._cfg = configs.load().lake
            self._check_cfg()
        return self._cfg

    def _check_cfg(self) -> None:
        if self._cfg.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
            raise LakeError(f"lake.schema_version = {self._cfg.schema_version} is not supported "
                            f"(this pianoforge writes {SUPPORTED_SCHEMA_VERSIONS})")

    # -- layout --------------------------------------------------------------------------------

    @property
    def info_path(self) -> Path:
        return self.root / META_DIR / "info.json"

    def shard_path(self, song_hash: str, unit_id: str) -> Path:
        return self.root / SHARD_TEMPLATE.format(song_hash=song_hash, unit_id=unit_id)

    def catalog_entry_path(self, unit_id: str) -> Path:
        return self.root / CATALOG_TEMPLATE.format(unit_id=unit_id)

    def _prepare(self) -> None:
        """Create the folders and write ``meta/info.json`` (checking an existing one agrees)."""
        if self._ready:
            return
        for d in (DATA_DIR, CATALOG_DIR, LOCK_DIR):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        if self.info_path.exists():
            try:
                existing = json.loads(self.info_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise LakeError(f"{self.info_path}: unreadable lake description: {e}") from e
            if existing.get("schema_version") != self.cfg.schema_version:
                raise LakeError(f"{self.info_path}: lake has schema_version {existing.get('schema_version')}, "
                                f"this config writes {self.cfg.schema_version}")
        else:
            _write_json_atomic(self.info_path, info_document(self.cfg))
        self._ready = True

    # -- writing -------------------------------------------------------------------------------

    def shard_writer(self, unit_id: str, song_hash: str) -> ShardWriter:
        """A writer that streams the unit's episodes into a hidden temporary file, one episode
        at a time; ``writer.commit(meta)`` then makes them the unit's shard exactly as
        :meth:`commit_shard` does. Memory: the compact rows of one row group (about
        ``lake.row_group_rows`` steps), not the whole shard.

        Use it as a context manager: leaving the block without a commit (an exception, say)
        removes the temporary file, so nothing becomes visible::

            with lake.shard_writer(unit_id, song_hash) as writer:
                for seed in seeds:
                    writer.add(play(seed))
                info = writer.commit(meta)
        """
        return ShardWriter(self, unit_id, song_hash)

    def commit_shard(self, meta: ShardMeta, episodes: Sequence[Episode]) -> ShardInfo:
        """Write ``episodes`` as the unit's shard and catalogue it; visible only when complete.

        Replaces an earlier shard of the same ``unit_id`` (file and catalog entry), so a retried
        unit never leaves two shards. Safe with concurrent writers in several processes: the
        last one to commit a unit wins, and the catalog always describes the file on disk.
        ``meta.specialist_f1`` None stands for the episodes' mean F1.
        """
        meta = _plain_meta(meta)  # refuse a bad meta before anything is written
        if not episodes:
            raise LakeError(f"unit {meta.unit_id}: a shard needs at least one episode")
        with self.shard_writer(meta.unit_id, meta.song_hash) as writer:
            for episode in episodes:
                writer.add(episode)
            return writer.commit(meta)

    def _commit_file(self, meta: ShardMeta, tmp: Path, **stats: Any) -> ShardInfo:
        """Rename the finished, fsynced ``tmp`` to the unit's shard path and write its catalog
        entry (``stats``: the ShardInfo fields that describe the file)."""
        final = self.shard_path(meta.song_hash, meta.unit_id)
        # One writer at a time per unit between rename and catalog entry, so that the entry
        # always describes the file that is on disk.
        with FileLock(str(self.root / LOCK_DIR / f"{meta.unit_id}.lock")):
            previous = self._read_entry(self.catalog_entry_path(meta.unit_id), missing_ok=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            info = ShardInfo(**dataclasses.asdict(meta), path=final, schema_version=self.cfg.schema_version,
                             committed_at=_dt.datetime.now(_dt.timezone.utc).isoformat(), **stats)
            _write_json_atomic(self.catalog_entry_path(meta.unit_id), self._entry(info))
            if previous is not None and previous.path != final:  # the unit moved (e.g. song re-hashed)
                previous.path.unlink(missing_ok=True)
        return info

    # -- the catalog -----------------------------------------------------------------------------

    def _entry(self, info: ShardInfo) -> dict[str, Any]:
        data = dataclasses.asdict(info)
        data["path"] = info.path.relative_to(self.root).as_posix()
        return data

    def _read_entry(self, path: Path, missing_ok: bool = False) -> ShardInfo | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            if missing_ok:
                return None
            raise
        except (OSError, json.JSONDecodeError) as e:
            raise LakeError(f"{path}: unreadable catalog entry: {e}") from e
        names = {f.name for f in dataclasses.fields(ShardInfo)}
        missing = {f.name for f in dataclasses.fields(ShardInfo) if f.default is dataclasses.MISSING} - set(data)
        if missing:
            raise LakeError(f"{path}: catalog entry lacks field(s) {sorted(missing)}")
        data = {k: v for k, v in data.items() if k in names}  # entries from newer writers may add fields
        data["path"] = self.root / data["path"]
        return ShardInfo(**data)

    def shards(self, min_f1: float | None = None, split: str | Sequence[str] | None = None) -> list[ShardInfo]:
        """Committed shards (those with a catalog entry), sorted by unit_id, optionally filtered
        to ``specialist_f1 >= min_f1`` and to a split (or several)."""
        folder = self.root / CATALOG_DIR
        if not folder.is_dir():
            return []
        splits = None if split is None else ({split} if isinstance(split, str) else set(split))
        out = []
        for path in sorted(folder.glob("*.json")):
            if path.name.startswith("."):
                continue
            info = self._read_entry(path, missing_ok=True)  # may vanish if a unit moves meanwhile
            if info is None:
                continue
            if min_f1 is not None and not info.specialist_f1 >= min_f1:
                continue
            if splits is not None and info.split not in splits:
                continue
            out.append(info)
        return sorted(out, key=lambda s: s.unit_id)

    def catalog(self) -> pa.Table:
        """All catalog entries merged into one Arrow table (one row per committed shard)."""
        rows = [self._entry(s) for s in self.shards()]
        fields = [f.name for f in dataclasses.fields(ShardInfo)]
        return pa.Table.from_pylist(rows) if rows else pa.table({f: pa.array([], pa.null()) for f in fields})

    # -- reading ---------------------------------------------------------------------------------

    def open_shard(self, shard: ShardInfo) -> pq.ParquetFile:
        """The shard's Parquet file, checked to be the write the catalog entry describes."""
        try:
            pf = pq.ParquetFile(shard.path)
        except (OSError, pa.ArrowException) as e:
            raise LakeError(f"{shard.path}: cannot open shard of unit {shard.unit_id}: {e}") from e
        kv = {k.decode(): v.decode() for k, v in (pf.metadata.metadata or {}).items()}
        version = int(kv.get("schema_version", -1))
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise LakeError(f"{shard.path}: schema_version {version} is not readable by this pianoforge "
                            f"(reads {SUPPORTED_SCHEMA_VERSIONS})")
        if shard.commit_id and kv.get("commit_id") != shard.commit_id:
            raise LakeError(f"{shard.path}: the shard was replaced since it was listed "
                            f"(commit {kv.get('commit_id')} on disk, {shard.commit_id} listed); list shards again")
        return pf

    def read_table(self, shard: ShardInfo, columns: list[str] | None = None) -> pa.Table:
        """The shard's rows as an Arrow table (all columns unless named)."""
        return self.open_shard(shard).read(columns=columns)

    def read_episodes(self, shard: ShardInfo) -> list[Episode]:
        """The shard's episodes, observations rebuilt bit-exactly."""
        return table_to_episodes(self.read_table(shard))

    def iter_episodes(self, shard: ShardInfo) -> Iterator[Episode]:
        """The shard's episodes one row group at a time (memory: one row group, not the shard)."""
        pf = self.open_shard(shard)
        for group in range(pf.num_row_groups):
            yield from table_to_episodes(pf.read_row_group(group))

    # -- housekeeping ----------------------------------------------------------------------------

    def vacuum(self, min_age_s: float = 3600.0, dry_run: bool = False) -> list[Path]:
        """Delete what crashed writers left behind: temporary files and uncatalogued shard files
        older than ``min_age_s`` (younger ones may belong to a commit in progress). Returns them."""
        catalogued = {s.path for s in self.shards()}
        now = time.time()
        doomed = []
        for path in (self.root / DATA_DIR).glob("song=*/*"):
            stale = now - path.stat().st_mtime >= min_age_s
            if stale and (TMP_MARK in path.name or (path.suffix == ".parquet" and path not in catalogued)):
                doomed.append(path)
        for path in (self.root / CATALOG_DIR).glob(f".*{TMP_MARK}*"):
            if now - path.stat().st_mtime >= min_age_s:
                doomed.append(path)
        if not dry_run:
            for path in doomed:
                path.unlink(missing_ok=True)
        return doomed


class ShardWriter:
    """Streams one unit's episodes into a hidden temporary Parquet file; :meth:`commit` makes
    it the unit's shard. Made by :meth:`Lake.shard_writer`, which tells how to use it.

    ``add`` encodes an episode into the compact rows at once, so the caller can drop the
    episode; the rows wait until they fill a row group (whole episodes, at least
    ``lake.row_group_rows`` rows, like :meth:`Lake.commit_shard`'s), which is then written.
    """

    def __init__(self, lake: Lake, unit_id: str, song_hash: str):
        self.lake = lake
        self.unit_id = _check_name("unit_id", unit_id)
        self.song_hash = _check_name("song_hash", song_hash)
        self.n_episodes = self.n_steps = self.n_row_groups = 0
        self.info: ShardInfo | None = None  # set by a successful commit
        self._f1s: list[float] = []  # per-episode summaries, for the catalog entry
        self._returns: list[float] = []
        self._pending: list[pa.Table] = []  # encoded episodes of the row group being filled
        self._pending_rows = 0
        self._open = True
        lake._prepare()
        self.path = lake.shard_path(song_hash, unit_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = _tmp_name(self.path)
        codec = lake.cfg.compression
        try:
            self._writer = pq.ParquetWriter(
                self.tmp_path, SHARD_SCHEMA,
                compression=codec,
                compression_level=lake.cfg.compression_level if codec in LEVELLED_CODECS else None,
                use_dictionary=["unit_id"],  # everything else compresses better without dictionaries
                write_statistics=["unit_id", "episode", "step", "seed", "reward", "episode_f1"],
            )
        except BaseException:
            self.tmp_path.unlink(missing_ok=True)
            raise

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.info is None:
            self.abort()

    def _check_open(self) -> None:
        if not self._open:
            state = "committed" if self.info is not None else "aborted"
            raise LakeError(f"unit {self.unit_id}: the shard writer is {state}; make a new one")

    def add(self, episode: Episode) -> None:
        """Append ``episode`` (numbered ``n_episodes``) to the shard being written."""
        self._check_open()
        table = episodes_to_table(self.unit_id, [episode], first_episode=self.n_episodes)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.n_episodes += 1
        self.n_steps += table.num_rows
        self._f1s.append(float(episode.f1))
        self._returns.append(float(episode.episode_return))
        if self._pending_rows >= self.lake.cfg.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        group = pa.concat_tables(self._pending).combine_chunks()
        self._writer.write_table(group, row_group_size=group.num_rows)  # one row group
        self.n_row_groups += 1
        self._pending, self._pending_rows = [], 0

    def commit(self, meta: ShardMeta) -> ShardInfo:
        """Finish the file, fsync it, rename it to the unit's shard path and catalogue it
        (replacing an earlier shard of the unit, as :meth:`Lake.commit_shard`). ``meta`` must
        name this writer's unit and song; ``meta.specialist_f1`` None stands for the episodes'
        mean F1. On any failure the temporary file is removed and nothing becomes visible."""
        self._check_open()
        try:
            meta = _plain_meta(meta)
            if (meta.unit_id, meta.song_hash) != (self.unit_id, self.song_hash):
                raise LakeError(f"unit {self.unit_id}: commit got the ShardMeta of unit {meta.unit_id} "
                                f"(song {meta.song_hash}); this writer writes unit {self.unit_id} (song {self.song_hash})")
            if self.n_episodes == 0:
                raise LakeError(f"unit {self.unit_id}: a shard needs at least one episode")
            if meta.specialist_f1 is None:
                meta = dataclasses.replace(meta, specialist_f1=float(np.mean(self._f1s)))
            self._flush()
            commit_id = uuid.uuid4().hex
            # Written into the footer now that the numbers are known (the Arrow schema stored at
            # open cannot carry them: read them with pq.read_metadata / read_shard_kv).
            self._writer.add_key_value_metadata({
                **{k: str(getattr(meta, k)) for k in ("unit_id", "song_hash", "song_name", "chunk_index",
                                                       "split", "config_hash")},
                "specialist_f1": repr(meta.specialist_f1),
                "schema_version": str(self.lake.cfg.schema_version),
                "commit_id": commit_id,
                "n_episodes": str(self.n_episodes),
                "n_steps": str(self.n_steps),
            })
            self._open = False
            self._writer.close()
            with open(self.tmp_path, "rb") as f:  # the data must be on disk before the rename makes it visible
                os.fsync(f.fileno())
            self.info = self.lake._commit_file(
                meta, self.tmp_path, n_episodes=self.n_episodes, n_steps=self.n_steps,
                bytes=self.tmp_path.stat().st_size, n_row_groups=self.n_row_groups, commit_id=commit_id,
                mean_episode_f1=float(np.mean(self._f1s)), mean_episode_return=float(np.mean(self._returns)))
            return self.info
        finally:
            if self.info is None:
                self.abort()

    def abort(self) -> None:
        """Drop everything written: close and remove the temporary file. Idempotent."""
        if self._open:
            self._open = False
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away anyway
                pass
        self._pending, self._pending_rows = [], 0
        self.tmp_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Synthetic episodes (tests, benchmarks, the synthetic workload)
# --------------------------------------------------------------------------------------------


def synthetic_episode(n_steps: int, seed: int, f1: float | None = None, lookahead: int = 10) -> Episode:
    """A random but music-like episode: sparse goal bits from a random piano roll (a few notes
    at a time, held for several steps, seen through an 11-step lookahead window), random
    continuous observation parts, actions and rewards. No physics."""
    if (lookahead + 1) * N_KEYS != OBS_LAYOUT[0][2]:
        raise ValueError(f"lookahead {lookahead}: the lake's observation layout holds an 11-step goal (lookahead 10)")
    rng = np.random.default_rng(seed)
    horizon = n_steps + lookahead
    roll = np.zeros((horizon, N_KEYS), dtype=bool)
    sustain = np.zeros(horizon, dtype=bool)
    t = 0
    while t < horizon:  # chords of 1-4 notes in the middle of the keyboard, held 2-12 steps
        keys = rng.integers(20, 70, size=rng.integers(1, 5))
        roll[t:t + rng.integers(2, 13), keys] = True
        t += int(rng.integers(1, 6))
    for start in range(0, horizon, 40):
        sustain[start:start + int(rng.integers(0, 30))] = True
    window = np.lib.stride_tricks.sliding_window_view(roll, (lookahead + 1, N_KEYS))[:n_steps, 0]
    obs = rng.standard_normal((n_steps, OBS_DIM)).astype(np.float32)
    obs[:, :968] = window.reshape(n_steps, -1)
    obs[:, 968:979] = np.lib.stride_tricks.sliding_window_view(sustain, lookahead + 1)[:n_steps]
    target = roll[:n_steps]
    pressed = target & (rng.random(target.shape) < (0.9 if f1 is None else f1))
    reward = rng.random(n_steps, dtype=np.float32)
    f1_value = float(rng.uniform(0.5, 1.0)) if f1 is None else float(f1)
    return Episode(seed=seed, obs=obs, action=rng.uniform(-1, 1, (n_steps, ACTION_DIM)).astype(np.float32),
                   reward=reward, pressed=pressed, target=target, episode_return=float(reward.sum()),
                   precision=min(1.0, f1_value + 0.05), recall=f1_value, f1=f1_value)


def __getattr__(name: str):  # TrajectoryDataset needs torch; import it only when asked for
    if name == "TrajectoryDataset":
        from workers.lake_dataset import TrajectoryDataset

        return TrajectoryDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
