"""The lake as a LeRobot dataset (codebase v3.0): ``export_lerobot(lake_root, out, ...)``.

LeRobot's v3 layout, as its ``lerobot.datasets.utils`` writes it::

    meta/info.json                                  codebase_version, fps, features (dtype, shape, names), path templates
    meta/stats.json                                 {feature: {mean, std, min, max, count}}
    meta/tasks.parquet                              task (the index) -> task_index
    meta/episodes/chunk-000/file-000.parquet        one row per episode: length, tasks, where its frames are
    data/chunk-000/file-000.parquet                 one row per frame (control step), episodes never split across files

One frame is one control step (20 per second) of a committed shard: ``observation.state`` is the
1144-vector in RP1M's order (names from :data:`workers.piano.layout.OBS_NAMES`), ``action`` the 39
actions (:data:`~workers.piano.layout.ACTION_NAMES`), ``next.reward`` the reward received after
the action and ``next.done`` True on an episode's last frame (LeRobot's names for them), plus
LeRobot's ``timestamp``, ``frame_index``, ``episode_index``, ``index`` and ``task_index``. The
task of an episode is its song and chunk (``"<song name> / chunk <k>"``). Episodes are ordered
by split (train, eval, held-out), then unit, then episode, and ``info.json``'s ``splits`` gives
each split's episode range. The episodes table also carries each episode's unit, song hash,
chunk, seed, return and F1. Per-episode ``stats/*`` columns are left out (LeRobot does not need
them to load a dataset, and at a million episodes they would outweigh the data); ``stats.json``
is the lake's own statistics of the exported shards (no pass over the data).

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
from workers.lake.schema import SPLITS, LakeError, ShardInfo, fixed_list_to_numpy, rebuild_obs
from workers.lake.stats import lerobot_stats
from workers.lake.store import Lake
from workers.piano.layout import ACTION_DIM, ACTION_NAMES, FPS, OBS_DIM, OBS_NAMES

CODEBASE_VERSION = "v3.0"  # LeRobot's dataset format version (lerobot >= 0.4)
ROBOT_TYPE = "robopianist_two_shadow_hands"
CHUNKS_SIZE = 1000  # files per chunk folder (LeRobot's DEFAULT_CHUNK_SIZE)
DATA_FILE_MB = 100  # a data file is closed once it reaches this size (LeRobot's DEFAULT_DATA_FILE_SIZE_IN_MB)
VIDEO_FILE_MB = 200
EPISODES_PER_META_FILE = 100_000  # rows per episodes-metadata file (~100 bytes each)
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
EPISODES_PATH = "meta/episodes/" + CHUNK_FILE + ".parquet"
TASKS_PATH = "meta/tasks.parquet"

FEATURES = {
    "observation.state": {"dtype": "float32", "shape": [OBS_DIM], "names": list(OBS_NAMES)},
    "action": {"dtype": "float32", "shape": [ACTION_DIM], "names": list(ACTION_NAMES)},
    "next.reward": {"dtype": "float32", "shape": [1], "names": None},
    "next.done": {"dtype": "bool", "shape": [1], "names": None},
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
DATA_SCHEMA = pa.schema([
    pa.field("observation.state", pa.list_(pa.float32(), OBS_DIM)),
    pa.field("action", pa.list_(pa.float32(), ACTION_DIM)),
    pa.field("next.reward", pa.float32()),
    pa.field("next.done", pa.bool_()),
    pa.field("timestamp", pa.float32()),
    pa.field("frame_index", pa.int64()),
    pa.field("episode_index", pa.int64()),
    pa.field("index", pa.int64()),
    pa.field("task_index", pa.int64()),
])


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
    one file's rows), each row naming its own metadata chunk and file as LeRobot's do."""

    def __init__(self, root: Path):
        self.root, self.count, self.pending = root, 0, []

    def add(self, row: dict) -> None:
        row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = divmod(
            self.count // EPISODES_PER_META_FILE, CHUNKS_SIZE)
        self.pending.append(row)
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
        pq.write_table(pa.Table.from_pylist(self.pending), path)
        self.pending = []


def _frames(table: pa.Table, first_episode: int, first_index: int, task_index: int) -> tuple[pa.Table, np.ndarray]:
    """A lake row group as LeRobot frames, and the local episode number of each row."""
    n = table.num_rows
    episode = np.asarray(table.column("episode"), dtype=np.int64)
    step = np.asarray(table.column("step"), dtype=np.int64)
    last = np.r_[episode[1:] != episode[:-1], True]  # row groups hold whole episodes
    obs = rebuild_obs(table)
    action = fixed_list_to_numpy(table.column("action"), ACTION_DIM)
    columns = [
        pa.FixedSizeListArray.from_arrays(pa.array(obs.reshape(-1)), OBS_DIM),
        pa.FixedSizeListArray.from_arrays(pa.array(action.reshape(-1)), ACTION_DIM),
        pa.array(np.asarray(table.column("reward"), dtype=np.float32)),
        pa.array(last),
        pa.array((step / FPS).astype(np.float32)),
        pa.array(step),
        pa.array(first_episode + episode),
        pa.array(first_index + np.arange(n, dtype=np.int64)),
        pa.array(np.full(n, task_index, dtype=np.int64)),
    ]
    return pa.Table.from_arrays(columns, schema=DATA_SCHEMA), episode


def export_lerobot(lake_root: str | Path, out: str | Path, *, min_f1: float | None = None,
                   splits: Sequence[str] | None = None, songs: Sequence[str] | None = None,
                   data_file_mb: float = DATA_FILE_MB) -> ExportSummary:
    """Write the selected committed shards (see :func:`select_shards`) as a LeRobot v3 dataset in
    ``out``, which must not exist yet (or be an empty folder). Memory: one lake row group and
    one episodes-metadata file's rows."""
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
                data.write(frames)
                starts = np.flatnonzero(np.r_[True, local[1:] != local[:-1]])
                stops = np.r_[starts[1:], len(local)]
                per_episode = {c: table.column(c).to_numpy() for c in ("seed", "episode_return", "episode_f1")}
                for a, b in zip(starts, stops):
                    episodes.add({
                        "episode_index": first_episode + int(local[a]), "tasks": [task_of(shard)],
                        "length": int(b - a), "data/chunk_index": chunk, "data/file_index": file,
                        "dataset_from_index": n_frames + int(a), "dataset_to_index": n_frames + int(b),
                        **kv, "seed": int(per_episode["seed"][a]), "return": float(per_episode["episode_return"][a]),
                        "f1": float(per_episode["episode_f1"][a]),
                    })
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

        stats = lerobot_stats(lake.stats(shards))
        stats["next.reward"] = stats.pop("reward")
        write_json_atomic(work / "meta" / "stats.json", stats)
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
