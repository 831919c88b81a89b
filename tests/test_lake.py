"""The Parquet trajectory lake: exact round trips, atomic and concurrent commits, plain-tool
readability, and the streaming TrajectoryDataset's split of work across ranks and workers."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import re
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

import configs
from workers.piano.layout import GOAL_BITS, OBS_DIM
from workers.lake import (
    Episode,
    Lake,
    LakeError,
    ShardMeta,
    TrajectoryDataset,
    read_shard_kv,
    synthetic_episode,
)

LAKE_CFG = configs.load().lake.model_copy(update={"row_group_rows": 64})  # several row groups per shard


def make_meta(unit: str, song: str = "a1" * 32, split: str = "train", f1: float = 0.9, chunk: int = 0) -> ShardMeta:
    return ShardMeta(unit_id=unit, song_hash=song, song_name=f"Song {song[:4]} ünicode", chunk_index=chunk,
                     split=split, config_hash="cfg0123", specialist_f1=f1)


def tagged_episodes(tag: int, lengths: list[int]) -> list[Episode]:
    """Episodes whose last observation entry and first action entry carry a unique step id
    (tag * 10000 + episode * 1000 + step), so a sample can be traced to its step."""
    episodes = []
    for e, n in enumerate(lengths):
        ep = synthetic_episode(n, seed=tag * 100 + e)
        ids = tag * 10000 + e * 1000 + np.arange(n)
        ep.obs[:, -1] = ids
        ep.action[:, 0] = ids
        episodes.append(ep)
    return episodes


def assert_same_episodes(written: list[Episode], read: list[Episode]) -> None:
    assert len(written) == len(read)
    for a, b in zip(written, read):
        for field in ("obs", "action", "reward", "pressed", "target"):
            x, y = getattr(a, field), getattr(b, field)
            assert x.dtype == y.dtype and x.shape == y.shape, field
            assert x.tobytes() == y.tobytes(), f"{field} differs after the round trip"
        assert (a.seed, a.episode_return, a.precision, a.recall, a.f1) == (
            b.seed, b.episode_return, b.precision, b.recall, b.f1)
        if a.ot_fingering is None:
            assert b.ot_fingering is None
        else:
            assert b.ot_fingering.dtype == np.int8 and b.ot_fingering.tobytes() == a.ot_fingering.tobytes()


def with_fingering(episode: Episode) -> Episode:
    """``episode`` with an OT fingering: each finger on a random key or none (-1)."""
    rng = np.random.default_rng(episode.seed)
    episode.ot_fingering = rng.integers(-1, 88, size=(episode.n_steps, 10)).astype(np.int8)
    return episode


# --------------------------------------------------------------------------------------------
# Round trip, metadata, catalog
# --------------------------------------------------------------------------------------------


def test_round_trip_is_bit_exact(tmp_path):
    episodes = [synthetic_episode(n, seed=s) for s, n in enumerate([150, 1, 37, 90])]
    episodes[1].obs[:, :GOAL_BITS] = 1.0  # every goal bit on, including the last partial byte
    episodes[2].obs[:, :GOAL_BITS] = 0.0
    episodes[3].obs[5, 979:] = [np.nan, np.inf, -0.0, 1e-40] * 41 + [np.float32(-3.5)]  # odd floats survive
    lake = Lake(tmp_path, LAKE_CFG)
    info = lake.commit_shard(make_meta("u1"), episodes)
    assert (info.n_episodes, info.n_steps) == (4, 278)
    assert info.n_row_groups == 2  # whole episodes, >= 64 rows each: [150], [1, 37, 90]
    assert info.bytes == info.path.stat().st_size
    assert_same_episodes(episodes, lake.read_episodes(info))
    assert_same_episodes(episodes, list(lake.iter_episodes(info)))


def test_ot_fingering_is_stored_per_step_and_null_where_not_recorded(tmp_path):
    played = [with_fingering(synthetic_episode(n, seed=s)) for s, n in enumerate([70, 3])]
    episodes = [played[0], synthetic_episode(20, seed=7), played[1]]  # the middle one without physics
    lake = Lake(tmp_path, LAKE_CFG)
    info = lake.commit_shard(make_meta("u1"), episodes)
    assert info.schema_version == 2 and read_shard_kv(info.path)["schema_version"] == "2"
    assert_same_episodes(episodes, lake.read_episodes(info))
    assert_same_episodes(episodes, list(lake.iter_episodes(info)))
    column = pq.read_table(info.path, columns=["ot_fingering"]).column("ot_fingering").to_pylist()
    assert column[:70] == played[0].ot_fingering.tolist() and column[70:90] == [None] * 20
    assert column[90:] == played[1].ot_fingering.tolist()
    doc = json.loads((tmp_path / "meta" / "info.json").read_text())
    assert "ot_fingering" in [c["name"] for c in doc["columns"]]


def test_shards_of_schema_version_1_still_read_and_share_a_lake_with_newer_ones(tmp_path):
    """A lake written before ``ot_fingering`` existed: its shards read (no fingering), its
    statistics rebuild, and a writer of the newer version adds shards beside them."""
    old_cfg = LAKE_CFG.model_copy(update={"schema_version": 1})
    lake = Lake(tmp_path, old_cfg)
    old_episodes = [with_fingering(synthetic_episode(30, seed=1))]
    old = lake.commit_shard(make_meta("old"), old_episodes)
    assert "ot_fingering" not in pq.read_schema(old.path).names
    assert read_shard_kv(old.path)["schema_version"] == "1" and old.schema_version == 1
    assert json.loads((tmp_path / "meta" / "info.json").read_text())["schema_version"] == 1
    old_episodes[0].ot_fingering = None  # what a version 1 shard gives back
    new_episodes = [with_fingering(synthetic_episode(30, seed=2))]
    new = Lake(tmp_path, LAKE_CFG).commit_shard(make_meta("new"), new_episodes)
    doc = json.loads((tmp_path / "meta" / "info.json").read_text())
    assert doc["schema_version"] == 2 and "ot_fingering" in [c["name"] for c in doc["columns"]]
    reader = Lake(tmp_path)
    assert [s.schema_version for s in reader.shards()] == [2, 1]  # new, old
    assert_same_episodes(old_episodes, reader.read_episodes(old))
    assert_same_episodes(new_episodes, reader.read_episodes(new))
    (tmp_path / "meta" / "stats.json").unlink()
    for path in (tmp_path / "meta" / "stats").glob("*.npz"):
        path.unlink()
    assert reader.stats()["action"].count == 60  # recomputed from both shards
    assert [problem for _, problem in reader.verify()] == [None, None]


def test_row_groups_hold_whole_episodes(tmp_path):
    lake = Lake(tmp_path, LAKE_CFG)
    info = lake.commit_shard(make_meta("u1"), [synthetic_episode(n, seed=n) for n in [30, 30, 30, 100, 5]])
    pf = pq.ParquetFile(info.path)
    groups = [pf.read_row_group(g, columns=["episode", "step"]) for g in range(pf.num_row_groups)]
    assert [g.num_rows for g in groups] == [90, 100, 5]
    for g in groups:
        steps = g.column("step").to_numpy()
        episode = g.column("episode").to_numpy()
        starts = np.r_[True, episode[1:] != episode[:-1]]
        assert (steps[starts] == 0).all()  # no episode continues from the previous group


def test_shard_metadata_in_file_and_catalog(tmp_path):
    lake = Lake(tmp_path, LAKE_CFG)
    meta = make_meta("u-meta", split="eval", f1=0.8125, chunk=7)
    info = lake.commit_shard(meta, [synthetic_episode(20, seed=1)])
    assert info.path == tmp_path / "data" / f"song={meta.song_hash}" / "u-meta.parquet"
    kv = read_shard_kv(info.path)
    assert kv["song_hash"] == meta.song_hash and kv["song_name"] == meta.song_name
    assert kv["chunk_index"] == "7" and kv["unit_id"] == "u-meta" and kv["split"] == "eval"
    assert float(kv["specialist_f1"]) == 0.8125 and kv["config_hash"] == "cfg0123"
    assert kv["schema_version"] == str(LAKE_CFG.schema_version) and kv["commit_id"] == info.commit_id
    entry = json.loads((tmp_path / "meta" / "catalog" / "u-meta.json").read_text())
    assert entry["path"] == f"data/song={meta.song_hash}/u-meta.parquet"
    assert (entry["song_name"], entry["chunk_index"], entry["specialist_f1"]) == (meta.song_name, 7, 0.8125)
    assert lake.shards() == [info] and info.meta == meta
    assert lake.catalog().column("unit_id").to_pylist() == ["u-meta"]


def test_info_json_describes_the_files(tmp_path, monkeypatch):
    lake = Lake(tmp_path, LAKE_CFG)
    info = lake.commit_shard(make_meta("u1"), [synthetic_episode(10, seed=0)])
    doc = json.loads((tmp_path / "meta" / "info.json").read_text())
    schema = pq.read_schema(info.path)
    assert [c["name"] for c in doc["columns"]] == schema.names
    assert [c["type"] for c in doc["columns"]] == [str(t) for t in schema.types]
    assert doc["fps"] == 20 and doc["schema_version"] == LAKE_CFG.schema_version
    layout = doc["observation_layout"]
    assert layout[0]["slice"][0] == 0 and layout[-1]["slice"][1] == OBS_DIM
    assert all(a["slice"][1] == b["slice"][0] for a, b in zip(layout, layout[1:]))  # contiguous
    assert doc["path_templates"]["shard"].format(song_hash="s", unit_id="u") == "data/song=s/u.parquet"
    assert [c["shape"] for c in doc["columns"] if c["name"] in ("goal_bits", "action", "reward", "pressed")] == [
        [123], [39], [], ["variable"]]
    monkeypatch.chdir(tmp_path)  # the documented queries work from the lake root
    assert len(duckdb.sql(doc["examples"]["duckdb"]).fetchall()) == 10
    assert duckdb.sql(doc["examples"]["duckdb_catalog"]).to_arrow_table().column("unit_id").to_pylist() == ["u1"]


@pytest.mark.parametrize("codec, level", [("snappy", None), ("none", None), ("gzip", 5), ("zstd", 9)])
def test_every_configured_codec_writes_readable_shards(tmp_path, codec, level):
    lake_cfg = LAKE_CFG.model_copy(update={"compression": codec, "compression_level": level})
    episodes = [synthetic_episode(30, seed=2)]
    info = Lake(tmp_path, lake_cfg).commit_shard(make_meta("u1"), episodes)
    column = pq.read_metadata(info.path).row_group(0).column(4)
    assert column.compression == {"none": "UNCOMPRESSED"}.get(codec, codec.upper())
    assert_same_episodes(episodes, Lake(tmp_path, lake_cfg).read_episodes(info))


def test_shards_filter_by_f1_and_split(tmp_path):
    lake = Lake(tmp_path, LAKE_CFG)
    for unit, split, f1 in [("a", "train", 0.9), ("b", "train", 0.5), ("c", "eval", 0.95), ("d", "held-out", 0.75)]:
        lake.commit_shard(make_meta(unit, split=split, f1=f1), [synthetic_episode(5, seed=0)])
    ids = lambda shards: [s.unit_id for s in shards]  # noqa: E731
    assert ids(lake.shards()) == ["a", "b", "c", "d"]
    assert ids(lake.shards(min_f1=0.75)) == ["a", "c", "d"]
    assert ids(lake.shards(split="train")) == ["a", "b"]
    assert ids(lake.shards(min_f1=0.75, split=("train", "held-out"))) == ["a", "d"]


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda ep: ep.obs.__setitem__((3, 100), 0.5), "obs[3, 100]"),
        (lambda ep: setattr(ep, "action", ep.action[:, :38]), "'action'"),
        (lambda ep: setattr(ep, "pressed", ep.pressed[:-1]), "'pressed'"),
        (lambda ep: setattr(ep, "ot_fingering", np.full((10, 9), -1, np.int8)), "'ot_fingering'"),
        (lambda ep: setattr(ep, "ot_fingering", np.full((10, 10), 88, np.int8)), "ot_fingering[0, 0] = 88"),
    ],
)
def test_bad_episode_is_refused_with_a_clear_message(tmp_path, spoil, message):
    ep = synthetic_episode(10, seed=0)
    spoil(ep)
    lake = Lake(tmp_path, LAKE_CFG)
    with pytest.raises(LakeError, match=re.escape(message)):
        lake.commit_shard(make_meta("u1"), [synthetic_episode(10, seed=1), ep])
    assert lake.shards() == [] and not list(tmp_path.glob("data/*/*"))


def test_numpy_scalars_in_meta_are_stored_as_plain_numbers(tmp_path):
    meta = dataclasses.replace(make_meta("u1"), chunk_index=np.int64(3), specialist_f1=np.float32(0.5))
    info = Lake(tmp_path, LAKE_CFG).commit_shard(meta, [synthetic_episode(5, seed=np.int64(2))])
    assert Lake(tmp_path).shards() == [info] and (info.chunk_index, info.specialist_f1) == (3, 0.5)


def test_bad_meta_is_refused(tmp_path):
    lake = Lake(tmp_path, LAKE_CFG)
    with pytest.raises(LakeError, match="unit_id"):
        lake.commit_shard(make_meta("../escape"), [synthetic_episode(5, seed=0)])
    with pytest.raises(LakeError, match="split"):
        lake.commit_shard(make_meta("u1", split="test"), [synthetic_episode(5, seed=0)])


def test_retried_unit_replaces_its_shard(tmp_path):
    lake = Lake(tmp_path, LAKE_CFG)
    lake.commit_shard(make_meta("u1", f1=0.5), tagged_episodes(1, [40, 40]))
    lake.commit_shard(make_meta("u2", f1=0.3), tagged_episodes(2, [10]))
    second = tagged_episodes(3, [25])
    info = lake.commit_shard(make_meta("u1", f1=0.7), second)
    assert sorted(p.name for p in tmp_path.glob("data/*/*")) == ["u1.parquet", "u2.parquet"]
    assert sorted(p.name for p in tmp_path.glob("meta/catalog/*")) == ["u1.json", "u2.json"]
    [listed] = lake.shards(min_f1=0.6)
    assert listed == info and listed.n_steps == 25
    assert_same_episodes(second, lake.read_episodes(listed))


def test_reading_a_replaced_shard_through_a_stale_listing_fails_clearly(tmp_path):
    lake = Lake(tmp_path, LAKE_CFG)
    old = lake.commit_shard(make_meta("u1"), [synthetic_episode(5, seed=0)])
    lake.commit_shard(make_meta("u1"), [synthetic_episode(6, seed=1)])
    with pytest.raises(LakeError, match="replaced since it was listed"):
        lake.read_episodes(old)


# --------------------------------------------------------------------------------------------
# Readable without pianoforge
# --------------------------------------------------------------------------------------------


def unpack_goal(blobs: list[bytes]) -> np.ndarray:
    packed = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), -1)
    return np.unpackbits(packed, axis=1, count=GOAL_BITS).astype(np.float32)


def plain_obs(table: pa.Table) -> np.ndarray:
    """The observation as a reader who only has info.json's recipe would rebuild it."""
    parts = [unpack_goal(table.column("goal_bits").to_pylist())]
    for name in ("key_joints", "sustain_state", "fingertip_pos", "hand_joints"):
        col = np.asarray(table.column(name).to_pylist(), dtype=np.float32)
        parts.append(col.reshape(table.num_rows, -1))
    return np.concatenate(parts, axis=1)


def test_plain_pyarrow_and_duckdb_read_the_same_rows(tmp_path):
    lake = Lake(tmp_path, LAKE_CFG)
    songs = {"u1": "aa" * 32, "u2": "bb" * 32, "u3": "aa" * 32}
    for i, (unit, song) in enumerate(songs.items()):
        lake.commit_shard(make_meta(unit, song=song), tagged_episodes(i, [30, 12]))
    ours = {s.unit_id: lake.read_episodes(s) for s in lake.shards()}

    song_partition = ds.partitioning(pa.schema([("song", pa.string())]), flavor="hive")
    table = ds.dataset(tmp_path / "data", format="parquet", partitioning=song_partition).to_table()
    table = table.sort_by([("unit_id", "ascending"), ("episode", "ascending"), ("step", "ascending")])
    hive = ds.dataset(tmp_path / "data", format="parquet", partitioning="hive").to_table(columns=["song"])
    assert set(hive.column("song").to_pylist()) == {"aa" * 32, "bb" * 32}

    rows = duckdb.sql(
        f"SELECT * FROM read_parquet('{tmp_path}/data/*/*.parquet', hive_partitioning = true, "
        f"hive_types = {{'song': VARCHAR}}) ORDER BY unit_id, episode, step").to_arrow_table()

    for plain in (table, rows):
        assert plain.num_rows == 3 * 42
        assert plain.column("unit_id").to_pylist() == [u for u in sorted(songs) for _ in range(42)]
        assert plain.column("song").to_pylist() == [songs[u] for u in sorted(songs) for _ in range(42)]
        episodes = [ep for u in sorted(ours) for ep in ours[u]]
        expect_obs = np.concatenate([ep.obs for ep in episodes])
        assert plain_obs(plain).tobytes() == expect_obs.tobytes()
        action = np.asarray(plain.column("action").to_pylist(), dtype=np.float32)
        assert action.tobytes() == np.concatenate([ep.action for ep in episodes]).tobytes()
        pressed = plain.column("pressed").to_pylist()
        assert pressed == [list(np.flatnonzero(row)) for ep in episodes for row in ep.pressed]
        assert plain.column("episode_f1").to_pylist() == [ep.f1 for ep in episodes for _ in range(ep.n_steps)]

    catalog = duckdb.sql(f"SELECT unit_id, n_steps FROM read_json_auto('{tmp_path}/meta/catalog/*.json') "
                         "ORDER BY unit_id").fetchall()
    assert catalog == [("u1", 42), ("u2", 42), ("u3", 42)]
    kv = duckdb.sql(f"SELECT decode(value) FROM parquet_kv_metadata('{lake.shards()[1].path}') "
                    "WHERE decode(key) = 'song_hash'").fetchall()
    assert kv == [("bb" * 32,)]


# --------------------------------------------------------------------------------------------
# Atomic commits, concurrent writers, crashes
# --------------------------------------------------------------------------------------------


def _commit_several(root: str, worker: int, units: list[str], start) -> None:
    lake = Lake(root, LAKE_CFG)
    start.wait()  # all writers begin together
    for k, unit in enumerate(units):
        lake.commit_shard(make_meta(unit, f1=worker / 10), tagged_episodes(worker * 10 + k, [40 + worker, 7]))


def test_concurrent_writers_lose_nothing_and_never_duplicate(tmp_path):
    # 4 processes x 5 shards; "shared-*" units are committed by every process at about the same time.
    plan = {w: [f"shared-{k}" if k % 2 == 0 else f"own-{w}-{k}" for k in range(5)] for w in range(4)}
    ctx = mp.get_context("fork")
    start = ctx.Barrier(len(plan))
    procs = [ctx.Process(target=_commit_several, args=(str(tmp_path), w, units, start)) for w, units in plan.items()]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]

    lake = Lake(tmp_path, LAKE_CFG)
    expected_units = sorted({u for units in plan.values() for u in units})
    shards = lake.shards()
    assert [s.unit_id for s in shards] == expected_units == sorted(
        p.stem for p in tmp_path.glob("meta/catalog/*.json"))
    files = sorted(tmp_path.glob("data/**/*"))
    assert sorted(p for p in files if p.is_file()) == sorted(s.path for s in shards)  # no temp files either
    for shard in shards:
        kv = read_shard_kv(shard.path)
        assert kv["commit_id"] == shard.commit_id  # the entry describes the file on disk
        worker = round(shard.specialist_f1 * 10)
        episodes = lake.read_episodes(shard)
        assert [ep.n_steps for ep in episodes] == [40 + worker, 7] and shard.n_steps == 47 + worker
        assert shard.bytes == shard.path.stat().st_size


def _crash_before_rename(root: str) -> None:
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith(".parquet"):
            os._exit(17)  # the process dies after the shard is written, before it is renamed
        real_replace(src, dst)

    os.replace = crash
    Lake(root, LAKE_CFG).commit_shard(make_meta("crashed", song="cc" * 32), tagged_episodes(5, [30]))


def test_crashed_writer_leaves_nothing_visible(tmp_path):
    lake = Lake(tmp_path, LAKE_CFG)
    lake.commit_shard(make_meta("good"), tagged_episodes(1, [20]))
    proc = mp.get_context("fork").Process(target=_crash_before_rename, args=(str(tmp_path),))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 17
    [leftover] = list((tmp_path / "data" / f"song={'cc' * 32}").iterdir())
    assert leftover.name.startswith(".crashed.parquet.tmp-") and pq.read_metadata(leftover).num_rows == 30

    assert [s.unit_id for s in lake.shards()] == ["good"]
    assert ds.dataset(tmp_path / "data", format="parquet", partitioning="hive").count_rows() == 20
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{tmp_path}/data/*/*.parquet')").fetchall() == [(20,)]
    assert [s.unit_id for s in TrajectoryDataset(tmp_path).shards] == ["good"]

    assert lake.vacuum(min_age_s=3600) == []  # might still be a commit in progress
    assert lake.vacuum(min_age_s=0) == [leftover] and not leftover.exists()
    lake.commit_shard(make_meta("crashed", song="cc" * 32), tagged_episodes(5, [30]))  # the retry succeeds
    assert [s.unit_id for s in lake.shards()] == ["crashed", "good"]


def _crash_before_catalog_entry(root: str) -> None:
    import workers.lake.store

    def crash(path, data):
        os._exit(18)  # the shard file is in place, its catalog entry is not written yet

    workers.lake.store.write_json_atomic = crash
    lake = Lake(root, LAKE_CFG)
    lake.info_path.parent.mkdir(parents=True, exist_ok=True)
    lake._ready = True  # info.json exists already
    lake.commit_shard(make_meta("uncatalogued", song="dd" * 32), tagged_episodes(6, [30]))


def test_shard_without_catalog_entry_is_not_committed(tmp_path):
    lake = Lake(tmp_path, LAKE_CFG)
    lake.commit_shard(make_meta("good"), tagged_episodes(1, [20]))
    proc = mp.get_context("fork").Process(target=_crash_before_catalog_entry, args=(str(tmp_path),))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 18
    orphan = tmp_path / "data" / f"song={'dd' * 32}" / "uncatalogued.parquet"
    assert orphan.exists()
    assert [s.unit_id for s in lake.shards()] == ["good"]
    assert TrajectoryDataset(tmp_path, shuffle_buffer=0).num_samples == 20
    assert lake.vacuum(min_age_s=0) == [orphan] and not orphan.exists()


# --------------------------------------------------------------------------------------------
# TrajectoryDataset
# --------------------------------------------------------------------------------------------


@pytest.fixture
def small_lake(tmp_path) -> Path:
    lake = Lake(tmp_path, LAKE_CFG)
    lengths = {0: [50, 3, 70], 1: [64, 64], 2: [1, 20], 3: [90], 4: [33, 33, 33], 5: [10]}
    for tag, lens in lengths.items():
        split = "eval" if tag == 5 else "train"
        lake.commit_shard(make_meta(f"unit-{tag}", song=f"{tag:02d}" * 32, split=split, f1=0.5 if tag == 4 else 0.9),
                          tagged_episodes(tag, lens))
    return tmp_path


def step_ids(lengths: dict[int, list[int]]) -> list[int]:
    return sorted(t * 10000 + e * 1000 + s for t, lens in lengths.items() for e, n in enumerate(lens) for s in range(n))


TRAIN_HIGH_F1 = {0: [50, 3, 70], 1: [64, 64], 2: [1, 20], 3: [90]}


def test_dataset_ranks_and_workers_cover_every_step_once(small_lake):
    seen: Counter = Counter()
    per_reader = []
    for rank in range(2):
        data = TrajectoryDataset(small_lake, min_f1=0.75, shuffle_buffer=50, seed=3, action_chunk=2,
                                 rank=rank, world_size=2)
        loader = DataLoader(data, batch_size=None, num_workers=2)
        ids = [int(sample["obs"][-1]) for sample in loader]
        per_reader.append(set(ids))
        seen.update(ids)
    assert all(per_reader)  # both ranks got work
    assert per_reader[0].isdisjoint(per_reader[1])
    assert sorted(seen.elements()) == step_ids(TRAIN_HIGH_F1)  # every step, exactly once


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_dataset_workers_within_a_rank_do_not_overlap(small_lake):
    data = TrajectoryDataset(small_lake, min_f1=0.75, shuffle_buffer=0, rank=0, world_size=1)
    loader = DataLoader(data, batch_size=None, num_workers=3)
    ids = [int(s["obs"][-1]) for s in loader]
    assert sorted(ids) == step_ids(TRAIN_HIGH_F1)


def _iterate_as_ddp_rank(root: str, rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        data = TrajectoryDataset(root, min_f1=0.75, shuffle_buffer=16)  # rank and world size from torch
        Path(out).write_text(json.dumps([int(s["obs"][-1]) for s in data]))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_dataset_takes_rank_and_world_size_from_torch_distributed(small_lake, tmp_path_factory):
    work = tmp_path_factory.mktemp("ddp")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_iterate_as_ddp_rank, args=(str(small_lake), r, str(work / "store"), str(work / f"{r}.json")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    ids = [json.loads((work / f"{r}.json").read_text()) for r in range(2)]
    assert ids[0] and ids[1] and set(ids[0]).isdisjoint(ids[1])
    assert sorted(ids[0] + ids[1]) == step_ids(TRAIN_HIGH_F1)


def test_dataset_filters_by_f1_and_split(small_lake):
    def ids(**kw):
        return sorted(int(s["obs"][-1]) for s in TrajectoryDataset(small_lake, shuffle_buffer=0, **kw))

    assert ids(min_f1=0.75) == step_ids(TRAIN_HIGH_F1)
    assert ids(min_f1=0.0) == step_ids({**TRAIN_HIGH_F1, 4: [33, 33, 33]})
    assert ids(min_f1=0.0, splits=("eval",)) == step_ids({5: [10]})
    assert ids(min_f1=0.95) == []
    assert TrajectoryDataset(small_lake, min_f1=0.75).num_samples == len(step_ids(TRAIN_HIGH_F1))


def test_dataset_action_chunks_stop_at_episode_ends(small_lake):
    data = TrajectoryDataset(small_lake, min_f1=0.75, shuffle_buffer=100, action_chunk=4)
    samples = {int(s["obs"][-1]): s for s in data}
    lengths = {t * 10000 + e * 1000: n for t, lens in TRAIN_HIGH_F1.items() for e, n in enumerate(lens)}
    for sid, s in samples.items():
        assert s["obs"].dtype == torch.float32 and s["obs"].shape == (OBS_DIM,)
        assert s["action"].shape == (4, 39) and s["action_mask"].shape == (4,)
        start, step = sid - sid % 1000, sid % 1000
        last = lengths[start] - 1
        expected = [start + min(step + k, last) for k in range(4)]
        assert s["action"][:, 0].tolist() == expected  # future actions of the same episode, last repeated
        assert s["action_mask"].tolist() == [step + k <= last for k in range(4)]
    one_step = samples[20000]  # the 1-step episode: only its own action is real
    assert one_step["action_mask"].tolist() == [True, False, False, False]


def test_dataset_obs_and_actions_match_the_lake(small_lake):
    lake = Lake(small_lake, LAKE_CFG)
    [shard] = [s for s in lake.shards() if s.unit_id == "unit-1"]
    episodes = lake.read_episodes(shard)
    data = TrajectoryDataset(small_lake, shuffle_buffer=0, shards=[shard])
    samples = list(data)
    assert np.stack([s["obs"].numpy() for s in samples]).tobytes() == np.concatenate([e.obs for e in episodes]).tobytes()
    assert np.stack([s["action"][0].numpy() for s in samples]).tobytes() == np.concatenate(
        [e.action for e in episodes]).tobytes()


def test_dataset_shuffles_reproducibly_and_differently_per_epoch(small_lake):
    def order(epoch, seed=0):
        data = TrajectoryDataset(small_lake, min_f1=0.75, shuffle_buffer=64, seed=seed)
        data.set_epoch(epoch)
        return [int(s["obs"][-1]) for s in data]

    first = order(0)
    assert first == order(0)  # same seed and epoch, same order
    assert first != order(1) and first != order(0, seed=1)
    assert sorted(first) == sorted(order(1)) == step_ids(TRAIN_HIGH_F1)
    assert first != sorted(first)


def test_dataset_repeat_goes_on_past_one_epoch(small_lake):
    data = TrajectoryDataset(small_lake, min_f1=0.0, splits=("eval",), shuffle_buffer=4, repeat=True)
    it = iter(data)
    ids = [int(next(it)["obs"][-1]) for _ in range(25)]
    assert Counter(ids[:10]) == Counter(step_ids({5: [10]}))
    assert Counter(ids[10:20]) == Counter(step_ids({5: [10]}))


def test_cli_lists_shards_and_vacuums(tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    lake = Lake(tmp_path, LAKE_CFG)
    lake.commit_shard(make_meta("unit-good", f1=0.9), tagged_episodes(1, [20, 5]))
    lake.commit_shard(make_meta("unit-poor", f1=0.3), tagged_episodes(2, [7]))
    leftover = tmp_path / "data" / f"song={'a1' * 32}" / ".unit-x.parquet.tmp-0123"
    leftover.write_bytes(b"partial")

    result = CliRunner().invoke(app, ["lake", "list", str(tmp_path), "--min-f1", "0.5"])
    assert result.exit_code == 0, result.output
    assert "unit-good" in result.output and "unit-poor" not in result.output and "1 shards" in result.output

    result = CliRunner().invoke(app, ["lake", "vacuum", str(tmp_path), "--min-age-s", "0"])
    assert result.exit_code == 0 and "1 file(s)" in result.output
    assert not leftover.exists() and len(lake.shards()) == 2


def test_dataset_batches_hold_the_same_steps_as_samples(small_lake):
    def make(**kw):
        return TrajectoryDataset(small_lake, min_f1=0.75, action_chunk=3, **kw)

    samples = list(make(shuffle_buffer=0))
    batches = list(make(shuffle_buffer=0, batch_size=100))
    n = len(step_ids(TRAIN_HIGH_F1))
    assert [len(b["obs"]) for b in batches] == [100] * (n // 100) + [n % 100]
    for key in ("obs", "action", "action_mask"):
        assert torch.equal(torch.cat([b[key] for b in batches]), torch.stack([s[key] for s in samples]))
    shuffled = torch.cat([b["obs"][:, -1] for b in make(shuffle_buffer=64, batch_size=50)]).int().tolist()
    assert sorted(shuffled) == step_ids(TRAIN_HIGH_F1) and shuffled != sorted(shuffled)


# --------------------------------------------------------------------------------------------
# Streaming a shard
# --------------------------------------------------------------------------------------------


def test_streamed_shard_equals_a_commit_shard_one_row_for_row(tmp_path):
    lengths = [30, 30, 30, 100, 5, 70]
    meta = make_meta("u1", f1=0.75)
    committed = Lake(tmp_path / "a", LAKE_CFG).commit_shard(meta, tagged_episodes(1, lengths))

    lake = Lake(tmp_path / "b", LAKE_CFG)
    with lake.shard_writer("u1", meta.song_hash) as writer:
        groups_on_disk = []
        for ep in tagged_episodes(1, lengths):
            writer.add(ep)
            groups_on_disk.append(writer.n_row_groups)
        # Row groups are written as they fill (>= 64 rows of whole episodes), not at commit.
        assert groups_on_disk == [0, 0, 1, 2, 2, 3] and writer.tmp_path.exists() and not writer.path.exists()
        assert lake.shards() == []  # nothing visible before the commit
        streamed = writer.commit(meta)
    assert not writer.tmp_path.exists()

    a, b = pq.read_table(committed.path), pq.read_table(streamed.path)
    assert a.schema == b.schema and a.num_rows == b.num_rows == sum(lengths)
    assert a.equals(b)
    pa_, pb = pq.ParquetFile(committed.path), pq.ParquetFile(streamed.path)
    assert [pa_.metadata.row_group(g).num_rows for g in range(pa_.num_row_groups)] == \
           [pb.metadata.row_group(g).num_rows for g in range(pb.num_row_groups)] == [90, 100, 75]
    kv_a, kv_b = read_shard_kv(committed.path), read_shard_kv(streamed.path)
    assert kv_a.pop("commit_id") != kv_b.pop("commit_id") and kv_a == kv_b
    different = {"path", "commit_id", "committed_at", "bytes", "sha256", "footer_sha256"}  # the footers differ in commit_id
    same = lambda info: {k: v for k, v in dataclasses.asdict(info).items() if k not in different}  # noqa: E731
    assert same(committed) == same(streamed) and lake.shards() == [streamed]
    assert_same_episodes(tagged_episodes(1, lengths), lake.read_episodes(streamed))
    # Plain readers see the streamed shard and its key-value metadata too.
    rows = duckdb.sql(f"SELECT count(*), max(episode) FROM read_parquet('{tmp_path}/b/data/*/*.parquet')").fetchall()
    assert rows == [(sum(lengths), len(lengths) - 1)]
    kv = duckdb.sql(f"SELECT decode(value) FROM parquet_kv_metadata('{streamed.path}') "
                    "WHERE decode(key) = 'commit_id'").fetchall()
    assert kv == [(streamed.commit_id,)]


def test_specialist_f1_defaults_to_the_mean_episode_f1(tmp_path):
    lake = Lake(tmp_path, LAKE_CFG)
    episodes = [synthetic_episode(10, seed=s, f1=f1) for s, f1 in enumerate([0.5, 0.75, 1.0])]
    info = lake.commit_shard(dataclasses.replace(make_meta("u1"), specialist_f1=None), episodes)
    assert info.specialist_f1 == 0.75 and float(read_shard_kv(info.path)["specialist_f1"]) == 0.75
    with lake.shard_writer("u2", "a1" * 32) as writer:
        for ep in episodes[:2]:
            writer.add(ep)
        info = writer.commit(ShardMeta("u2", "a1" * 32, "Song", 0, "train", "cfg0123"))
    assert info.specialist_f1 == 0.625 and lake.shards(min_f1=0.7) == [lake.shards()[0]]


def test_exception_mid_stream_leaves_no_shard_and_no_temp_file(tmp_path):
    lake = Lake(tmp_path, LAKE_CFG)
    before = lake.commit_shard(make_meta("u1", f1=0.5), tagged_episodes(1, [40]))
    with pytest.raises(RuntimeError, match="rollout failed"):
        with lake.shard_writer("u1", make_meta("u1").song_hash) as writer:
            for ep in tagged_episodes(2, [50, 50, 50]):
                writer.add(ep)
            assert writer.n_row_groups == 1 and writer.tmp_path.exists()
            raise RuntimeError("rollout failed")
    assert not writer.tmp_path.exists()
    # The unit's earlier shard is untouched: an unfinished retry replaces nothing.
    assert lake.shards() == [before] and sorted(p for p in tmp_path.glob("data/**/*") if p.is_file()) == [before.path]
    assert_same_episodes(tagged_episodes(1, [40]), lake.read_episodes(before))
    with pytest.raises(LakeError, match="aborted"):
        writer.add(tagged_episodes(3, [5])[0])


def test_shard_writer_refuses_misuse_and_cleans_up(tmp_path):
    lake = Lake(tmp_path, LAKE_CFG)
    with pytest.raises(LakeError, match="unit_id"):
        lake.shard_writer("../escape", "a1" * 32)
    writer = lake.shard_writer("u1", "a1" * 32)
    with pytest.raises(LakeError, match="at least one episode"):
        writer.commit(make_meta("u1"))
    assert not writer.tmp_path.exists()  # a failed commit removes the temporary file

    with lake.shard_writer("u1", "a1" * 32) as writer:
        writer.add(synthetic_episode(5, seed=0))
        with pytest.raises(LakeError, match="ShardMeta of unit u2"):
            writer.commit(make_meta("u2"))
    with lake.shard_writer("u1", "a1" * 32) as writer:
        with pytest.raises(LakeError, match="episode 1 .*'action'"):
            writer.add(synthetic_episode(5, seed=0))
            bad = synthetic_episode(5, seed=1)
            bad.action = bad.action[:, :10]
            writer.add(bad)
    assert lake.shards() == [] and not [p for p in tmp_path.glob("data/**/*") if p.is_file()]

    with lake.shard_writer("u1", "a1" * 32) as writer:
        writer.add(synthetic_episode(5, seed=0))
        info = writer.commit(make_meta("u1"))
    with pytest.raises(LakeError, match="committed"):
        writer.add(synthetic_episode(5, seed=0))
    assert lake.shards() == [info] and info.path.exists()


# --------------------------------------------------------------------------------------------
# Damaged shards
# --------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_the_catalog_records_size_and_checksum_and_damage_is_found(tmp_path):
    import hashlib

    lake = Lake(tmp_path, LAKE_CFG)
    a = lake.commit_shard(make_meta("unit-a"), tagged_episodes(1, [20, 5]))
    b = lake.commit_shard(make_meta("unit-b"), tagged_episodes(2, [7]))
    entry = json.loads(lake.catalog_entry_path("unit-a").read_text())
    assert entry["bytes"] == a.path.stat().st_size and entry["sha256"] == hashlib.sha256(a.path.read_bytes()).hexdigest()
    assert lake.shard_problem(a, full=True) is None

    _truncate(a.path)
    assert "truncated or overwritten" in lake.shard_problem(a)  # the cheap check sees a truncation
    flipped = bytearray(b.path.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # same size, one byte changed: only the checksum sees it
    b.path.write_bytes(bytes(flipped))
    assert lake.shard_problem(b, full=False) is None and "the content changed" in lake.shard_problem(b)
    assert [(s.unit_id, p is not None) for s, p in lake.verify()] == [("unit-a", True), ("unit-b", True)]


def test_verify_gives_entries_catalogued_without_a_checksum_theirs(tmp_path):
    lake = Lake(tmp_path, LAKE_CFG)
    for unit in ("unit-old", "unit-broken"):
        info = lake.commit_shard(make_meta(unit), tagged_episodes(3, [9]))
        entry = json.loads(lake.catalog_entry_path(unit).read_text())
        del entry["sha256"]  # as catalogued before checksums were kept
        lake.catalog_entry_path(unit).write_text(json.dumps(entry))
    broken = info.path.read_bytes()
    info.path.write_bytes(broken[:100] + b"\0" * (len(broken) - 100))  # same size, unreadable
    old, broken_shard = sorted(lake.shards(), key=lambda s: s.unit_id != "unit-old")
    assert old.sha256 == "" and lake.shard_problem(old) is None
    checked = dict((s.unit_id, p) for s, p in lake.verify())
    assert checked["unit-old"] is None and checked["unit-broken"].startswith("unreadable")
    migrated = {s.unit_id: s for s in lake.shards()}
    assert len(migrated["unit-old"].sha256) == 64 and migrated["unit-broken"].sha256 == ""  # no checksum of damage


def test_readers_and_the_gate_leave_damaged_shards_out_and_count_them(small_lake):
    from orchestrator.gate import Gate

    lake = Lake(small_lake)
    _truncate(next(s for s in lake.shards() if s.unit_id == "unit-1").path)
    with pytest.warns(UserWarning, match=r"leaving out 1 damaged shard\(s\): .*unit-1.parquet"):
        data = TrajectoryDataset(small_lake, min_f1=0.75, shuffle_buffer=1, seed=0)
    assert [s.unit_id for s, _ in data.damaged] == ["unit-1"] and "unit-1" not in {s.unit_id for s in data.shards}
    ids = sorted(int(sample["obs"][-1]) for sample in data)
    assert ids == step_ids({k: v for k, v in TRAIN_HIGH_F1.items() if k != 1})

    decision = Gate(configs.load(overrides={"gate.f1_threshold": 0.75, "gate.min_shards": 4}).gate).check(lake)
    assert (decision.passing, decision.damaged, decision.launch) == (3, 1, False)


def _flip_action_bytes(path: Path, row_group: int = 0) -> None:
    """16 bytes flipped in the middle of a row group's ``action`` column, the size unchanged:
    pyarrow decodes the file without complaint, to other actions."""
    group = pq.read_metadata(path).row_group(row_group)
    column = next(group.column(c) for c in range(group.num_columns) if group.column(c).path_in_schema.startswith("action."))
    middle = column.data_page_offset + column.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


def test_a_shard_changed_without_changing_size_is_neither_counted_nor_read(small_lake):
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.gate import Gate

    lake = Lake(small_lake)
    flipped = next(s for s in lake.shards() if s.unit_id == "unit-1")
    size = flipped.path.stat().st_size
    _flip_action_bytes(flipped.path)
    assert flipped.path.stat().st_size == size and "the content changed" in lake.shard_problem(flipped)

    decision = Gate(configs.load(overrides={"gate.f1_threshold": 0.75, "gate.min_shards": 4}).gate).check(lake)
    assert (decision.passing, decision.damaged, decision.launch) == (3, 1, False)
    assert [s.unit_id for s, _ in decision.damaged_shards] == ["unit-1"]
    listed = CliRunner().invoke(app, ["lake", "list", str(small_lake)])
    assert listed.exit_code == 1 and f"damaged: {flipped.path}: " in listed.output

    with pytest.raises(LakeError, match=r"unit-1.parquet: .*damaged: the sha256 of its row group 0"):
        lake.read_episodes(flipped)
    # The dataset reads every other row group, and no changed value: row group 0 of unit-1 is skipped.
    actions = {int(ep.obs[s, -1]): ep.action[s] for tag, lens in TRAIN_HIGH_F1.items()
               for ep in tagged_episodes(tag, lens) for s in range(ep.n_steps)}
    with pytest.warns(UserWarning, match=r"skipping row group 0 of unit unit-1 \(.*unit-1.parquet\): .*sha256"):
        samples = list(TrajectoryDataset(small_lake, min_f1=0.75, shuffle_buffer=1, seed=0))
    ids = [int(sample["obs"][-1]) for sample in samples]
    assert sorted(ids) == [i for i in step_ids(TRAIN_HIGH_F1) if not 10000 <= i < 10064]
    assert all(np.array_equal(sample["action"][0].numpy(), actions[i]) for i, sample in zip(ids, samples))


def test_cli_list_and_verify_report_damaged_shards(tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    lake = Lake(tmp_path, LAKE_CFG)
    good = lake.commit_shard(make_meta("unit-good"), tagged_episodes(1, [20]))
    bad = lake.commit_shard(make_meta("unit-bad"), tagged_episodes(2, [20]))
    assert CliRunner().invoke(app, ["lake", "verify", str(tmp_path)]).exit_code == 0
    _truncate(bad.path)
    for command in ("list", "verify"):
        result = CliRunner().invoke(app, ["lake", command, str(tmp_path)])
        assert result.exit_code == 1, result.output
        assert "DAMAGED" in result.output and "1 damaged" in result.output
        assert f"damaged: {bad.path}: " in result.output and str(good.path) not in result.output


def test_set_aside_takes_a_damaged_shard_out_and_keeps_its_file(tmp_path):
    lake = Lake(tmp_path, LAKE_CFG)
    lake.commit_shard(make_meta("unit-keep"), tagged_episodes(1, [20]))
    bad = lake.commit_shard(make_meta("unit-bad"), tagged_episodes(2, [30]))
    _truncate(bad.path)
    aside = lake.set_aside(bad)
    assert aside.name.startswith(".unit-bad.parquet.damaged-") and aside.exists() and not bad.path.exists()
    assert [s.unit_id for s in lake.shards()] == ["unit-keep"]
    assert lake.stats()["reward"].count == 20  # the totals no longer hold the damaged shard
    assert ds.dataset(tmp_path / "data", format="parquet").count_rows() == 20  # plain readers skip it too
    assert lake.vacuum(min_age_s=0) == [] and aside.exists()  # kept for inspection
