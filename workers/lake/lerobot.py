"""The lake as a LeRobot dataset (codebase v3.0): ``export_lerobot(lake_root, out, ...)``.

LeRobot's v3 layout, as its ``lerobot.datasets.utils`` writes it::

    meta/info.json                                  codebase_version, fps, features (dtype, shape, names), path templates
    meta/stats.json                                 {feature: {mean, std, min, max, count}}
    meta/tasks.parquet                              task (the index) -> task_index
    meta/episodes/chunk-000/file-000.parquet        one row per episode: length, tasks, where its frames are
    data/chunk-000/file-000.parquet                 one row per frame (control step), episodes never split across files

One frame is one control step of a committed shard (``fps`` from the observation layout), its
observation split the way LeRobot's policies read one: ``observation.state`` is the robot's
proprioception (fingertip positions, then hand joints; 76 entries), ``observation.environment_state``
the piano and the music (goal piano roll, sustain goal, key joints, pedal; 1068 entries), each
entry named in ``info.json`` from :data:`workers.piano.layout.OBS_NAMES`, their concatenation in
the order of :data:`STATE_PARTS` + :data:`ENVIRONMENT_PARTS` being RP1M's order again.
``action`` holds the 39 actions (:data:`~workers.piano.layout.ACTION_NAMES`), ``next.reward`` the
reward received after the action, ``next.done`` True on an episode's last frame and
``next.ot_fingering`` the key (0-87) the environment's OT fingering matched to each finger after
the action (-1: none, or not recorded in the shard). The fingering is not an observation: it
matches the step's goal to where the fingertips are after the action, which the policy does not
see before acting; it is there as a label. Plus
LeRobot's ``timestamp``, ``frame_index``, ``episode_index``, ``index`` and ``task_index``. The
task of an episode is its song and chunk (``"<song name> / chunk <k>"``). Episodes are ordered
by split (train, eval, held-out), then unit, then episode, and ``info.json``'s ``splits`` gives
each split's episode range. The episodes table also carries each episode's unit, song hash,
chunk, seed, return and F1, and LeRobot's per-episode ``stats/<feature>/<stat>`` columns (min,
max, mean, std, count and the quantiles q01, q10, q50, q90, q99 of every numeric feature).

``stats.json`` aggregates the episodes' statistics as LeRobot does (quantiles: the
count-weighted mean of the episodes'), with one change that keeps normalisation finite: where a
dimension does not vary in the data (a key that is never a goal, a joint that never moves) LeRobot
would divide by its 1e-8 epsilon and send an unseen value to ~1e8, so there a zero ``std``
becomes 1 and an empty range (min/max, q01/q99, q10/q90) is widened by 1 either side: every
normalisation mode then maps the data to where it would be and an unseen value to a bounded one.
The exact statistics remain in the episodes table and in the lake's own ``meta/stats.json``.

The export is written into a hidden folder next to ``out`` and renamed at the end: ``out``
appears complete or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from configs.files import tmp_path, write_json_atomic
from workers.lake.schema import SPLITS, LakeError, ShardInfo, fixed_list_to_numpy, read_fingering, rebuild_obs
from workers.lake.stats import Moments
from workers.lake.store import Lake
from workers.piano.layout import ACTION_DIM, ACTION_NAMES, FINGER_NAMES, FPS, OBS_NAMES, OBS_SLICES

CODEBASE_VERSION = "v3.0"  # LeRobot's dataset format version (lerobot >= 0.4)
ROBOT_TYPE = "robopianist_two_shadow_hands"
CHUNKS_SIZE = 1000  # files per chunk folder (LeRobot's DEFAULT_CHUNK_SIZE)
DATA_FILE_MB = 100  # a data file is closed once it reaches this size (LeRobot's DEFAULT_DATA_FILE_SIZE_IN_MB)
VIDEO_FILE_MB = 200
EPISODES_PER_META_FILE = 1000  # rows per episodes-metadata file (~90 kB each with their statistics)
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
EPISODES_PATH = "meta/episodes/" + CHUNK_FILE + ".parquet"
TASKS_PATH = "meta/tasks.parquet"

# The observation's parts (workers.piano.layout.OBS_SLICES) in LeRobot's two observation features.
STATE_PARTS = ("fingertips", "hand_joints")  # the robot's proprioception
ENVIRONMENT_PARTS = ("piano_goal", "sustain_goal", "key_joints", "sustain_state")  # the music and the piano
STATE_INDEX, ENVIRONMENT_INDEX = (
    np.concatenate([np.arange(OBS_SLICES[p].start, OBS_SLICES[p].stop) for p in parts])
    for parts in (STATE_PARTS, ENVIRONMENT_PARTS))
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)  # LeRobot's DEFAULT_QUANTILES
QUANTILE_KEYS = tuple(f"q{round(q * 100):02d}" for q in QUANTILES)
# Spreads (std, max - min, q99 - q01, q90 - q10) at most this are "constant" (float32 data near 1).
FLAT = 1e-6


def _vector(names: Sequence[str]) -> dict:
    return {"dtype": "float32", "shape": [len(names)], "names": list(names)}


def _scalar(dtype: str) -> dict:
    return {"dtype": dtype, "shape": [1], "names": None}


FEATURES = {
    "observation.state": _vector([OBS_NAMES[i] for i in STATE_INDEX]),
    "observation.environment_state": _vector([OBS_NAMES[i] for i in ENVIRONMENT_INDEX]),
    "action": _vector(ACTION_NAMES),
    "next.reward": _scalar("float32"),
    "next.done": _scalar("bool"),
    "next.ot_fingering": {"dtype": "int8", "shape": [len(FINGER_NAMES)], "names": list(FINGER_NAMES)},
    "timestamp": _scalar("float32"),
    "frame_index": _scalar("int64"),
    "episode_index": _scalar("int64"),
    "index": _scalar("int64"),
    "task_index": _scalar("int64"),
}
_ARROW = {"float32": pa.float32(), "int64": pa.int64(), "int8": pa.int8(), "bool": pa.bool_()}
DATA_SCHEMA = pa.schema([
    pa.field(name, _ARROW[ft["dtype"]] if ft["shape"] == [1] else pa.list_(_ARROW[ft["dtype"]], ft["shape"][0]))
    for name, ft in FEATURES.items()])


def feature_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """LeRobot's statistics of one feature over frames ``values`` [n] or [n, d] (float64 [d] each):
    min, max, mean, std (population), count [1] and the quantiles :data:`QUANTILE_KEYS`."""
    x = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    stats = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0),
             "count": np.array([len(x)], dtype=np.int64)}
    stats.update(zip(QUANTILE_KEYS, np.quantile(x, QUANTILES, axis=0)))
    return stats


class _StatsTotal:
    """Episode statistics aggregated as LeRobot's ``aggregate_stats`` does (exact moments, min,
    max; quantiles as the count-weighted mean of the episodes'), one episode at a time."""

    def __init__(self):
        self.moments: dict[str, Moments] = {}
        self.quantile_sums: dict[str, dict[str, np.ndarray]] = {}

    def add(self, episode: dict[str, dict[str, np.ndarray]]) -> None:
        for name, st in episode.items():
            n = int(st["count"][0])
            m = Moments(n, st["mean"], st["std"] ** 2 * n, st["min"], st["max"])
            self.moments[name] = self.moments[name].merge(m) if name in self.moments else m
            sums = self.quantile_sums.setdefault(name, {k: 0.0 for k in QUANTILE_KEYS})
            for k in QUANTILE_KEYS:
                sums[k] = sums[k] + st[k] * n

    def stats_json(self) -> dict[str, dict[str, list]]:
        """``{feature: {stat: list}}``, with constant dimensions made safe to normalise by (module doc)."""
        out = {}
        for name, m in self.moments.items():
            st = {"min": m.min.copy(), "max": m.max.copy(), "mean": m.mean, "std": m.std,
                  **{k: v / m.count for k, v in self.quantile_sums[name].items()}}
            st["std"] = np.where(st["std"] > FLAT, st["std"], 1.0)
            for lo, hi in (("min", "max"), ("q01", "q99"), ("q10", "q90")):
                flat = st[hi] - st[lo] <= FLAT
                st[lo], st[hi] = np.where(flat, st[lo] - 1, st[lo]), np.where(flat, st[hi] + 1, st[hi])
            out[name] = {k: np.asarray(v, dtype=np.float64).tolist() for k, v in st.items()}
            out[name]["count"] = [int(m.count)]
        return out


@dataclass
class ExportSummary:
    """What an export wrote."""

    out: Path
    shards: int
    episodes: int
    frames: int
    tasks: int
    data_files: int
    splits: dict[str, str]


def task_of(shard: ShardInfo) -> str:
    """An episode's LeRobot task: its song and chunk."""
    return f"{shard.song_name} / chunk {shard.chunk_index}"


def select_shards(lake: Lake, min_f1: float | None = None, splits: Sequence[str] | None = None,
                  songs: Sequence[str] | None = None) -> list[ShardInfo]:
    """Committed shards with ``specialist_f1 >= min_f1``, in ``splits``, of ``songs`` (a song's
    name, or its content hash or a prefix of it), ordered by split, then unit."""
    shards = lake.shards(min_f1=min_f1, split=list(splits) if splits else None)
    if songs:
        wanted = set(songs)
        shards = [s for s in shards if s.song_name in wanted or any(s.song_hash.startswith(w) for w in wanted)]
    order = {split: i for i, split in enumerate(SPLITS)}
    return sorted(shards, key=lambda s: (order.get(s.split, len(order)), s.unit_id))


def _next_file(chunk: int, file: int) -> tuple[int, int]:
    """LeRobot's chunk/file numbering: ``CHUNKS_SIZE`` files per chunk folder."""
    file += 1
    return (chunk + 1, 0) if file >= CHUNKS_SIZE else (chunk, file)


class _DataFiles:
    """Writes frames into ``data/chunk-*/file-*.parquet``, starting a new file (between episodes
    only) once the current one holds ``max_bytes``."""

    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = root, max_bytes
        self.chunk, self.file, self.files = 0, 0, 0
        self.writer: pq.ParquetWriter | None = None
        self.path: Path | None = None

    def where(self) -> tuple[int, int]:
        """(chunk, file) the next episodes go to, opening a file when needed."""
        if self.writer is not None and self.path.stat().st_size >= self.max_bytes:
            self.close()
            self.chunk, self.file = _next_file(self.chunk, self.file)
        if self.writer is None:
            self.path = self.root / DATA_PATH.format(chunk_index=self.chunk, file_index=self.file)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.path, DATA_SCHEMA, compression="zstd")
            self.files += 1
        return self.chunk, self.file

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table, row_group_size=table.num_rows)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _EpisodeRows:
    """Episode metadata rows, written ``EPISODES_PER_META_FILE`` to a file as they come (memory:
    one file's rows), each row naming its own metadata chunk and file as LeRobot's do, with the
    episode's statistics as LeRobot's ``stats/<feature>/<stat>`` list columns."""

    def __init__(self, root: Path):
        self.root, self.count, self.pending, self.pending_stats = root, 0, [], []

    def add(self, row: dict, stats: dict[str, dict[str, np.ndarray]]) -> None:
        row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = divmod(
            self.count // EPISODES_PER_META_FILE, CHUNKS_SIZE)
        self.pending.append(row)
        self.pending_stats.append(stats)
        self.count += 1
        if len(self.pending) == EPISODES_PER_META_FILE:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        first = self.pending[0]
        path = self.root / EPISODES_PATH.format(chunk_index=first["meta/episodes/chunk_index"],
                                                file_index=first["meta/episodes/file_index"])
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(self.pending)
        for name, stats in self.pending_stats[0].items():
            for stat in stats:
                values = [s[name][stat] for s in self.pending_stats]
                offsets = np.r_[0, np.cumsum([len(v) for v in values])].astype(np.int32)
                table = table.append_column(f"stats/{name}/{stat}",
                                            pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(values))))
        pq.write_table(table, path)
        self.pending, self.pending_stats = [], []


def _frames(table: pa.Table, first_episode: int, first_index: int, task_index: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A lake row group as LeRobot frames (feature -> values [n] or [n, d]), and the local episode
    number of each row."""
    n = table.num_rows
    episode = np.asarray(table.column("episode"), dtype=np.int64)
    step = np.asarray(table.column("step"), dtype=np.int64)
    obs = rebuild_obs(table)
    frames = {
        "observation.state": obs[:, STATE_INDEX],
        "observation.environment_state": obs[:, ENVIRONMENT_INDEX],
        "action": fixed_list_to_numpy(table.column("action"), ACTION_DIM),
        "next.reward": np.asarray(table.column("reward"), dtype=np.float32),
        "next.done": np.r_[episode[1:] != episode[:-1], True],  # row groups hold whole episodes
        "next.ot_fingering": read_fingering(table)[0],
        "timestamp": (step / FPS).astype(np.float32),
        "frame_index": step,
        "episode_index": first_episode + episode,
        "index": first_index + np.arange(n, dtype=np.int64),
        "task_index": np.full(n, task_index, dtype=np.int64),
    }
    return frames, episode


def _arrow(frames: dict[str, np.ndarray]) -> pa.Table:
    columns = [pa.array(v) if v.ndim == 1 else pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
               for v in frames.values()]
    return pa.Table.from_arrays(columns, schema=DATA_SCHEMA)


def export_lerobot(lake_root: str | Path, out: str | Path, *, min_f1: float | None = None,
                   splits: Sequence[str] | None = None, songs: Sequence[str] | None = None,
                   data_file_mb: float = DATA_FILE_MB) -> ExportSummary:
    """Write the selected committed shards (see :func:`select_shards`) as a LeRobot v3 dataset in
    ``out``, which must not exist yet (or be an empty folder). Memory: one lake row group and
    one episodes-metadata file's rows (with their statistics)."""
    import pandas as pd

    lake, out = Lake(lake_root), Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not an empty folder; choose another --out")
    shards = select_shards(lake, min_f1, splits, songs)
    if not shards:
        raise LakeError(f"{lake.root}: no committed shards match (min_f1={min_f1}, splits={splits}, songs={songs})")
    tasks: dict[str, int] = {}
    for shard in shards:
        tasks.setdefault(task_of(shard), len(tasks))

    work = tmp_path(out)
    work.mkdir(parents=True)
    try:
        data = _DataFiles(work, int(data_file_mb * 1e6))
        episodes = _EpisodeRows(work)
        totals = _StatsTotal()
        split_ranges: dict[str, list[int]] = {}
        n_frames = 0
        for shard in shards:
            pf = lake.open_shard(shard)
            first_episode = episodes.count
            kv = {"unit_id": shard.unit_id, "song": shard.song_name, "song_hash": shard.song_hash,
                  "chunk_index": shard.chunk_index, "split": shard.split}
            for group in range(pf.num_row_groups):
                table = lake.read_row_group(pf, shard, group)
                if table.num_rows == 0:
                    continue
                chunk, file = data.where()
                frames, local = _frames(table, first_episode, n_frames, tasks[task_of(shard)])
                data.write(_arrow(frames))
                starts = np.flatnonzero(np.r_[True, local[1:] != local[:-1]])
                stops = np.r_[starts[1:], len(local)]
                per_episode = {c: table.column(c).to_numpy() for c in ("seed", "episode_return", "episode_f1")}
                for a, b in zip(starts, stops):
                    stats = {name: feature_stats(values[a:b]) for name, values in frames.items()}
                    totals.add(stats)
                    episodes.add({
                        "episode_index": first_episode + int(local[a]), "tasks": [task_of(shard)],
                        "length": int(b - a), "data/chunk_index": chunk, "data/file_index": file,
                        "dataset_from_index": n_frames + int(a), "dataset_to_index": n_frames + int(b),
                        **kv, "seed": int(per_episode["seed"][a]), "return": float(per_episode["episode_return"][a]),
                        "f1": float(per_episode["episode_f1"][a]),
                    }, stats)
                n_frames += table.num_rows
            if episodes.count - first_episode != shard.n_episodes:
                raise LakeError(f"{shard.path}: holds {episodes.count - first_episode} episodes, "
                                f"its catalog entry says {shard.n_episodes}")
            span = split_ranges.setdefault(shard.split, [first_episode, first_episode])
            span[1] = episodes.count
        data.close()

        episodes.flush()
        (work / TASKS_PATH).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"task_index": list(tasks.values())}, index=pd.Index(list(tasks), name="task")).to_parquet(
            work / TASKS_PATH)

        write_json_atomic(work / "meta" / "stats.json", totals.stats_json())
        splits_doc = {name: f"{a}:{b}" for name, (a, b) in split_ranges.items()}
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": ROBOT_TYPE,
            "total_episodes": episodes.count,
            "total_frames": n_frames,
            "total_tasks": len(tasks),
            "chunks_size": CHUNKS_SIZE,
            "data_files_size_in_mb": data_file_mb,
            "video_files_size_in_mb": VIDEO_FILE_MB,
            "fps": FPS,
            "splits": splits_doc,
            "data_path": DATA_PATH,
            "video_path": None,
            "features": FEATURES,
        }
        write_json_atomic(work / "meta" / "info.json", info)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportSummary(out=out, shards=len(shards), episodes=episodes.count, frames=n_frames, tasks=len(tasks),
                         data_files=data.files, splits=splits_doc)


def read_info(root: str | Path) -> dict:
    """An exported dataset's ``meta/info.json``."""
    return json.loads((Path(root) / "meta" / "info.json").read_text())
