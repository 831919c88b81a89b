"""The trajectory lake (catalog and writer): specialists' rollouts as plain Parquet files anyone can open.

Layout under the lake root (``<song_hash>`` is the song's content hash, ``<unit_id>`` the unit's
identity; see ``meta/info.json`` in any lake for the same description in machine-readable form)::

    meta/info.json                         schema, observation layout, fps, path templates
    meta/catalog/<unit_id>.json            one entry per committed shard (the source of truth; its size and sha256)
    meta/locks/<unit_id>.lock              serialises concurrent commits of the same unit
    meta/stats.json                        per-feature count, mean, std, min, max of all shards (LeRobot's layout)
    meta/stats/<unit_id>.npz               one shard's moments, merged into stats.json at commit (workers.lake.stats)
    data/song=<song_hash>/<unit_id>.parquet  one shard: all rollout episodes of one unit

One Parquet row is one control step (20 per second). The observation is stored compactly: its
first 979 entries are 0/1 goal bits (``goal_bits``, bit-packed), the other 165 floats are split
into named float32 columns; :func:`rebuild_obs` (or the recipe in ``info.json``) gives back the
exact 1144-vector. Row groups hold whole episodes, so a row group can be read on its own.
Besides observation, action and reward a row holds the keys sounding (``pressed``), the keys that
should sound (``target``) and, since schema version 2, the environment's OT fingering
(``ot_fingering``: the key matched to each finger); shards of version 1 stay readable (their
episodes' ``ot_fingering`` is None), and a lake may hold both.

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

Damage: each catalog entry records its file's size (``bytes``), its sha256, and the sha256 of each
row group's bytes and of the footer (:func:`shard_digests`, computed at commit). One check serves
every reader: :meth:`Lake.shard_problem` compares the size and the sha256 (what ``lake list``,
``lake verify``, the gate, the imitation trainer and ``resume`` use; a file found whole is not
hashed again by the same ``Lake`` while its size, mtime and inode stay the same), and reading
(:meth:`Lake.open_shard`, :meth:`Lake.read_row_group`, so ``read_table``, ``iter_episodes`` and
``TrajectoryDataset``) checks the footer and each row group it reads before decoding it, so that a
changed byte is never read as data. :meth:`Lake.verify` checks every shard and gives entries
catalogued before checksums were kept theirs once their file reads whole (the catalog's
migration). :meth:`Lake.set_aside` takes a damaged shard out of the lake, keeping its file under a
hidden name, so that its unit records its rollouts again.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import mmap
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

import configs
from configs.files import TMP_MARK, fsync_dir, tmp_path, write_json_atomic
from workers import fencing
from workers.fencing import Fence
from workers.lake import stats as lake_stats
from workers.lake.schema import (ACTION_DIM, COLUMN_DOCS, FPS, GOAL_BITS, OBS_DIM, OBS_LAYOUT, SHARD_KV_KEYS,
                                 SHARD_SCHEMA, SUPPORTED_SCHEMA_VERSIONS, Episode, LakeError, ShardInfo, ShardMeta,
                                 _check_name, _plain_meta, episodes_to_table, fixed_list_to_numpy, rebuild_obs,
                                 shard_schema, table_to_episodes)

DATA_DIR = "data"
META_DIR = "meta"
CATALOG_DIR = f"{META_DIR}/catalog"
LOCK_DIR = f"{META_DIR}/locks"
SHARD_TEMPLATE = "data/song={song_hash}/{unit_id}.parquet"
CATALOG_TEMPLATE = "meta/catalog/{unit_id}.json"
LEVELLED_CODECS = ("zstd", "gzip", "lz4")  # the codecs that take lake.compression_level
DAMAGED_MARK = ".damaged-"  # a damaged shard set aside: ".<unit_id>.parquet.damaged-<UTC time>"
# Columns the statistics do not need (those they need are in every schema version).
_NOT_STATS = {"unit_id", "pressed", "target", "seed", "ot_fingering"}


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
            for f in shard_schema(lake_cfg.schema_version)
        ],
        "schema_versions": {
            "1": "the first shards",
            "2": "adds ot_fingering; a lake may hold shards of both versions, each shard's schema_version "
                 "(its key-value metadata and catalog entry) says which columns it has",
        },
        "shard_metadata": {
            "where": "Parquet key-value metadata of each shard and its catalog entry",
            "keys": list(SHARD_KV_KEYS),
        },
        "catalog_entry_fields": [f.name for f in dataclasses.fields(ShardInfo)],
        "statistics": {
            "lake": lake_stats.STATS_JSON + ": {feature: {mean, std, min, max, count}} over all committed shards, "
                    "features observation.state (1144), action (39), reward (1); population std",
            "shard": lake_stats.STATS_DIR + "/<unit_id>.npz: one shard's count, mean, m2 (sum of squared deviations), "
                     "min, max per feature and its commit_id; numpy.load(path, allow_pickle=False)",
        },
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
        # unit_id -> (commit_id, size, mtime_ns, inode) of a file whose sha256 matched its entry
        self._whole: dict[str, tuple] = {}

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
            version = existing.get("schema_version")
            if version not in SUPPORTED_SCHEMA_VERSIONS:
                raise LakeError(f"{self.info_path}: lake has schema_version {version}, "
                                f"this pianoforge reads and writes {SUPPORTED_SCHEMA_VERSIONS}")
            if version < self.cfg.schema_version:  # its older shards stay readable: describe the newer ones
                write_json_atomic(self.info_path, info_document(self.cfg))
        else:
            write_json_atomic(self.info_path, info_document(self.cfg))
        self._ready = True

    # -- writing -------------------------------------------------------------------------------

    def shard_writer(self, unit_id: str, song_hash: str, fence: Fence | None = None) -> ShardWriter:
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

        ``fence`` (default: the one this process holds for the unit, ``workers.fencing``) is
        checked at commit, before anything becomes visible: a stale attempt's shard is refused.
        """
        return ShardWriter(self, unit_id, song_hash, fence)

    def commit_shard(self, meta: ShardMeta, episodes: Sequence[Episode], fence: Fence | None = None) -> ShardInfo:
        """Write ``episodes`` as the unit's shard and catalogue it; visible only when complete.

        Replaces an earlier shard of the same ``unit_id`` (file and catalog entry), so a retried
        unit never leaves two shards. Safe with concurrent writers in several processes: the
        last one to commit a unit wins, and the catalog always describes the file on disk.
        ``meta.specialist_f1`` None stands for the episodes' mean F1; ``fence`` as in :meth:`shard_writer`.
        """
        meta = _plain_meta(meta)  # refuse a bad meta before anything is written
        if not episodes:
            raise LakeError(f"unit {meta.unit_id}: a shard needs at least one episode")
        with self.shard_writer(meta.unit_id, meta.song_hash, fence) as writer:
            for episode in episodes:
                writer.add(episode)
            return writer.commit(meta)

    def _commit_file(self, meta: ShardMeta, tmp: Path, moments: lake_stats.FeatureMoments | None = None,
                     fence: Fence | None = None, **stats: Any) -> ShardInfo:
        """Rename the finished, fsynced ``tmp`` to the unit's shard path and write its catalog
        entry (``stats``: the ShardInfo fields that describe the file); then merge the shard's
        feature ``moments`` into the lake's ``meta/stats.json``. A stale ``fence`` (or the one
        held for the unit) raises ``StaleAttempt`` before anything is written."""
        final = self.shard_path(meta.song_hash, meta.unit_id)
        # One writer at a time per unit between rename and catalog entry, so that the entry
        # always describes the file that is on disk.
        with FileLock(str(self.root / LOCK_DIR / f"{meta.unit_id}.lock")):
            fencing.check(meta.unit_id, f"shard commit to {self.root}", fence)  # last thing before the writes
            previous = self._read_entry(self.catalog_entry_path(meta.unit_id), missing_ok=True)
            if moments is not None:  # before the catalog entry: a listed shard always has its statistics
                lake_stats.write_shard_stats(self.shard_stats_path(meta.unit_id), moments, stats["commit_id"])
            os.replace(tmp, final)
            fsync_dir(final.parent)
            info = ShardInfo(**dataclasses.asdict(meta), path=final, schema_version=self.cfg.schema_version,
                             committed_at=_dt.datetime.now(_dt.timezone.utc).isoformat(), **stats)
            write_json_atomic(self.catalog_entry_path(meta.unit_id), self._entry(info))
            if previous is not None and previous.path != final:  # the unit moved (e.g. song re-hashed)
                previous.path.unlink(missing_ok=True)
        if moments is not None:
            self._add_to_totals(info, moments)
        return info

    # -- statistics ------------------------------------------------------------------------------

    def shard_stats_path(self, unit_id: str) -> Path:
        return self.root / lake_stats.STATS_DIR / f"{unit_id}.npz"

    def _add_to_totals(self, info: ShardInfo, moments: lake_stats.FeatureMoments) -> None:
        """Merge a newly committed shard into ``meta/stats.json``: O(1) for a new unit; a replaced
        unit (or totals that are missing or unreadable) rebuilds them from the per-shard files."""
        with FileLock(str(self.root / LOCK_DIR / "stats.lock")):
            totals = lake_stats.read_totals(self.root / lake_stats.TOTALS_FILE)
            if totals is None or info.unit_id in totals[1]:
                self._rebuild_totals()
                return
            merged, included = lake_stats.merge_all([totals[0], moments]), dict(totals[1])
            included[info.unit_id] = info.commit_id
            lake_stats.write_totals(self.root, merged, included)

    def _rebuild_totals(self) -> None:
        """Recompute the totals from every committed shard's statistics (caller holds the stats lock).
        Each unit's catalog entry and statistics are read under its commit lock, so that a commit
        running meanwhile is seen whole or not at all (it merges itself in afterwards)."""
        parts, included = [], {}
        for listed in self.shards():
            with FileLock(str(self.root / LOCK_DIR / f"{listed.unit_id}.lock")):
                shard = self._read_entry(self.catalog_entry_path(listed.unit_id), missing_ok=True)
                if shard is None:
                    continue
                parts.append(self.shard_stats(shard))
            included[shard.unit_id] = shard.commit_id
        merged = lake_stats.merge_all(parts)
        if merged is not None:
            lake_stats.write_totals(self.root, merged, included)

    def shard_stats(self, shard: ShardInfo) -> lake_stats.FeatureMoments:
        """The shard's feature moments from ``meta/stats/<unit_id>.npz``; computed from the shard
        (and written) when that file is missing or describes another commit (lakes written before
        statistics existed)."""
        path = self.shard_stats_path(shard.unit_id)
        try:
            moments, commit_id = lake_stats.read_shard_stats(path)
            if not shard.commit_id or commit_id == shard.commit_id:
                return moments
        except (FileNotFoundError, ValueError):
            pass
        pf = self.open_shard(shard)
        parts = []
        for group in range(pf.num_row_groups):
            table = self.read_row_group(pf, shard, group, [c for c in SHARD_SCHEMA.names if c not in _NOT_STATS])
            parts.append(lake_stats.moments_of(rebuild_obs(table), fixed_list_to_numpy(table.column("action"), ACTION_DIM),
                                               np.asarray(table.column("reward"), np.float32)))
        moments = lake_stats.merge_all(parts)
        if moments is None:
            raise LakeError(f"{shard.path}: shard of unit {shard.unit_id} has no rows")
        lake_stats.write_shard_stats(path, moments, shard.commit_id)
        return moments

    def stats(self, shards: Sequence[ShardInfo] | None = None) -> lake_stats.FeatureMoments | None:
        """Feature moments (``observation.state``, ``action``, ``reward``) of ``shards`` (default:
        every committed shard, from ``meta/stats.json``'s totals, rebuilt when they miss a shard).
        Reads only the small statistics files; None when there are no shards."""
        if shards is not None:
            return lake_stats.merge_all(self.shard_stats(s) for s in shards)
        listed = self.shards()
        totals = lake_stats.read_totals(self.root / lake_stats.TOTALS_FILE)
        if totals is not None and totals[1] == {s.unit_id: s.commit_id for s in listed}:
            return totals[0]
        if not listed:
            return None
        with FileLock(str(self.root / LOCK_DIR / "stats.lock")):  # a crash between commit and totals
            self._rebuild_totals()
        return lake_stats.read_totals(self.root / lake_stats.TOTALS_FILE)[0]

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
        data["row_group_sha256"] = tuple(data.get("row_group_sha256", ()))
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
        """The shard's Parquet file, checked to be the write the catalog entry describes: its
        footer's sha256 (an entry without part checksums: the whole file's, once per ``Lake``).
        Read its row groups with :meth:`read_row_group`, which checks each."""
        problem = None
        try:
            if shard.footer_sha256:
                problem = _part_problem(shard.path, _footer_span(shard.path), shard.footer_sha256, "footer")
            elif shard.sha256:
                problem = self.shard_problem(shard)
            pf = pq.ParquetFile(shard.path)
        except (OSError, pa.ArrowException) as e:
            raise LakeError(f"{shard.path}: cannot open shard of unit {shard.unit_id}: {problem or e}") from e
        kv = {k.decode(): v.decode() for k, v in (pf.metadata.metadata or {}).items()}
        if shard.commit_id and kv.get("commit_id") != shard.commit_id:
            raise LakeError(f"{shard.path}: the shard was replaced since it was listed "
                            f"(commit {kv.get('commit_id')} on disk, {shard.commit_id} listed); list shards again")
        if problem is not None:
            raise LakeError(f"{shard.path}: shard of unit {shard.unit_id} is damaged: {problem}")
        version = int(kv.get("schema_version", -1))
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise LakeError(f"{shard.path}: schema_version {version} is not readable by this pianoforge "
                            f"(reads {SUPPORTED_SCHEMA_VERSIONS})")
        return pf

    def read_row_group(self, pf: pq.ParquetFile, shard: ShardInfo, group: int,
                       columns: list[str] | None = None) -> pa.Table:
        """Row group ``group`` of the shard opened as ``pf`` (:meth:`open_shard`), its bytes
        checked against the catalogued sha256 before they are decoded (LakeError naming the file
        and the row group when they differ)."""
        if group < len(shard.row_group_sha256):
            problem = _part_problem(shard.path, _row_group_span(pf.metadata.row_group(group)),
                                    shard.row_group_sha256[group], f"row group {group}")
            if problem is not None:
                raise LakeError(f"{shard.path}: shard of unit {shard.unit_id} is damaged: {problem}")
        return pf.read_row_group(group, columns=columns)

    def read_table(self, shard: ShardInfo, columns: list[str] | None = None) -> pa.Table:
        """The shard's rows as an Arrow table (all columns unless named), every row group checked."""
        pf = self.open_shard(shard)
        return pa.concat_tables([self.read_row_group(pf, shard, g, columns) for g in range(pf.num_row_groups)])

    def read_episodes(self, shard: ShardInfo) -> list[Episode]:
        """The shard's episodes, observations rebuilt bit-exactly."""
        return table_to_episodes(self.read_table(shard))

    def iter_episodes(self, shard: ShardInfo) -> Iterator[Episode]:
        """The shard's episodes one row group at a time (memory: one row group, not the shard)."""
        pf = self.open_shard(shard)
        for group in range(pf.num_row_groups):
            yield from table_to_episodes(self.read_row_group(pf, shard, group))

    # -- damage ------------------------------------------------------------------------------------

    def shard_problem(self, shard: ShardInfo, full: bool = True) -> str | None:
        """What is wrong with a committed shard's file, or None when it is whole: the lake's one
        integrity check.

        The file is there with the size its entry records (a truncated or overwritten file
        shows) and, ``full`` (the default), with its sha256 (any changed byte): hashed once per
        ``Lake`` while the file keeps its size, mtime and inode. An entry catalogued before
        checksums were kept is instead read whole (footer and every row group). ``full=False``
        is the size alone, for a reader that checks each row group as it reads it.
        """
        try:
            st = shard.path.stat()
        except FileNotFoundError:
            return "the file is missing"
        except OSError as e:
            return f"cannot read the file ({e.strerror or e})"
        if st.st_size != shard.bytes:
            return f"{st.st_size:,} bytes on disk, {shard.bytes:,} catalogued (truncated or overwritten)"
        if not full:
            return None
        if shard.sha256:
            seen = (shard.commit_id, st.st_size, st.st_mtime_ns, st.st_ino)
            if self._whole.get(shard.unit_id) == seen:
                return None
            digest = file_sha256(shard.path)
            if digest != shard.sha256:
                return f"sha256 {digest[:12]}... on disk, {shard.sha256[:12]}... catalogued (the content changed)"
            self._whole[shard.unit_id] = seen
            return None
        try:
            pf = self.open_shard(shard)
            for group in range(pf.num_row_groups):
                pf.read_row_group(group)
        except (LakeError, OSError, pa.ArrowException) as e:
            return f"unreadable: {str(e).splitlines()[0][:300]}"
        return None

    def split_damaged(self, shards: Sequence[ShardInfo], full: bool = True
                      ) -> tuple[list[ShardInfo], list[tuple[ShardInfo, str]]]:
        """``shards`` as (whole ones, [(damaged one, what is wrong)]) by :meth:`shard_problem`."""
        whole, damaged = [], []
        for shard in shards:
            problem = self.shard_problem(shard, full)
            if problem is None:
                whole.append(shard)
            else:
                damaged.append((shard, problem))
        return whole, damaged

    def verify(self, shards: Sequence[ShardInfo] | None = None) -> list[tuple[ShardInfo, str | None]]:
        """Check every shard (default: all committed) in full: (shard, problem or None) each.

        An entry without a checksum (catalogued before they were kept) whose file reads whole
        gets one now, so later checks compare bytes.
        """
        out = []
        for shard in self.shards() if shards is None else shards:
            problem = self.shard_problem(shard, full=True)
            if problem is None and not shard.sha256:
                shard = self._add_checksum(shard)
            out.append((shard, problem))
        return out

    def _add_checksum(self, shard: ShardInfo) -> ShardInfo:
        with FileLock(str(self.root / LOCK_DIR / f"{shard.unit_id}.lock")):
            current = self._read_entry(self.catalog_entry_path(shard.unit_id), missing_ok=True)
            if current is None or current.commit_id != shard.commit_id or current.sha256:
                return current or shard  # replaced or removed meanwhile: that writer's entry stands
            updated = dataclasses.replace(current, **shard_digests(current.path))
            write_json_atomic(self.catalog_entry_path(shard.unit_id), self._entry(updated))
        return updated

    def set_aside(self, shard: ShardInfo) -> Path | None:
        """Take a damaged shard out of the lake: its file is renamed ``.<name>.damaged-<UTC time>``
        (hidden from readers, kept for inspection) and its catalog entry and statistics removed,
        so the gate and the readers no longer see it and its unit records it again. Returns the
        new name (None: the file was already gone). A newer commit of the unit is left alone."""
        with FileLock(str(self.root / LOCK_DIR / f"{shard.unit_id}.lock")):
            current = self._read_entry(self.catalog_entry_path(shard.unit_id), missing_ok=True)
            if current is not None and current.commit_id != shard.commit_id:
                return None
            aside = shard.path.with_name(f".{shard.path.name}{DAMAGED_MARK}"
                                         f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            try:
                os.replace(shard.path, aside)
            except FileNotFoundError:
                aside = None
            self.catalog_entry_path(shard.unit_id).unlink(missing_ok=True)
            self.shard_stats_path(shard.unit_id).unlink(missing_ok=True)
            fsync_dir(self.catalog_entry_path(shard.unit_id).parent)
        return aside  # meta/stats.json no longer matches the catalog: the next Lake.stats() rebuilds it

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


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _row_group_span(row_group: pq.RowGroupMetaData) -> tuple[int, int]:
    """[start, stop) of a row group's bytes in its file: from its first column chunk's first page
    (dictionary or data) to the end of its last chunk."""
    starts, stops = [], []
    for c in range(row_group.num_columns):
        chunk = row_group.column(c)
        start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
        starts.append(start)
        stops.append(start + chunk.total_compressed_size)
    return min(starts), max(stops)


def _footer_span(path: Path) -> tuple[int, int]:
    """[start, stop) of a Parquet file's footer: its metadata, their length and the magic, as the
    last 8 bytes say (damaged ones give another span, hence another checksum)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 8))
        length = int.from_bytes(f.read(4), "little")
    return max(0, size - 8 - length), size


def _part_problem(path: Path, span: tuple[int, int], expected: str, what: str) -> str | None:
    """None when the bytes ``span`` of ``path`` have the sha256 ``expected``, else what differs."""
    start, stop = span
    try:
        with open(path, "rb") as f:
            f.seek(start)
            digest = hashlib.sha256(f.read(stop - start)).hexdigest()
    except OSError as e:
        return f"cannot read its {what} ({e.strerror or e})"
    return None if digest == expected else \
        f"the sha256 of its {what} (bytes {start:,}-{stop:,}) is {digest[:12]}..., {expected[:12]}... catalogued"


def shard_digests(path: str | Path) -> dict[str, Any]:
    """The checksums a catalog entry records of a Parquet file: ``sha256`` (the whole file, as
    ``sha256sum`` gives it), ``row_group_sha256`` (each row group's bytes) and ``footer_sha256``."""
    path = Path(path)
    metadata = pq.read_metadata(path)
    spans = [_row_group_span(metadata.row_group(g)) for g in range(metadata.num_row_groups)]
    spans.append(_footer_span(path))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            digests = [hashlib.sha256(view[start:stop]).hexdigest() for start, stop in spans]
            whole = hashlib.sha256(view).hexdigest()
        finally:
            view.release()
    return {"sha256": whole, "row_group_sha256": tuple(digests[:-1]), "footer_sha256": digests[-1]}


class ShardWriter:
    """Streams one unit's episodes into a hidden temporary Parquet file; :meth:`commit` makes
    it the unit's shard. Made by :meth:`Lake.shard_writer`, which tells how to use it.

    ``add`` encodes an episode into the compact rows at once, so the caller can drop the
    episode; the rows wait until they fill a row group (whole episodes, at least
    ``lake.row_group_rows`` rows, like :meth:`Lake.commit_shard`'s), which is then written.
    """

    def __init__(self, lake: Lake, unit_id: str, song_hash: str, fence: Fence | None = None):
        self.lake = lake
        self.fence = fence
        self.unit_id = _check_name("unit_id", unit_id)
        self.song_hash = _check_name("song_hash", song_hash)
        self.n_episodes = self.n_steps = self.n_row_groups = 0
        self.info: ShardInfo | None = None  # set by a successful commit
        self._f1s: list[float] = []  # per-episode summaries, for the catalog entry
        self._returns: list[float] = []
        self._pending: list[pa.Table] = []  # encoded episodes of the row group being filled
        self._moments: lake_stats.FeatureMoments | None = None  # of every step added, for meta/stats.json
        self._pending_rows = 0
        self._open = True
        lake._prepare()
        self.path = lake.shard_path(song_hash, unit_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = tmp_path(self.path)
        codec = lake.cfg.compression
        try:
            self._writer = pq.ParquetWriter(
                self.tmp_path, shard_schema(lake.cfg.schema_version),
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
        table = episodes_to_table(self.unit_id, [episode], first_episode=self.n_episodes,
                                  schema_version=self.lake.cfg.schema_version)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.n_episodes += 1
        self.n_steps += table.num_rows
        self._f1s.append(float(episode.f1))
        self._returns.append(float(episode.episode_return))
        moments = lake_stats.moments_of(episode.obs, episode.action, episode.reward)
        self._moments = moments if self._moments is None else lake_stats.merge_all([self._moments, moments])
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
                meta, self.tmp_path, moments=self._moments, n_episodes=self.n_episodes, n_steps=self.n_steps,
                bytes=self.tmp_path.stat().st_size, **shard_digests(self.tmp_path),
                n_row_groups=self.n_row_groups, commit_id=commit_id, fence=self.fence,
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

