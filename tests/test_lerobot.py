"""The lake's statistics (meta/stats.json, kept up to date at commit) and its export as a LeRobot
v3.0 dataset.

LeRobot itself cannot be installed beside this project's torch (every lerobot release with the
v3.0 format pins torch < 2.12), so here the export is checked against LeRobot's published v3.0
layout: the reads below are the ones ``lerobot.datasets`` makes: ``meta/info.json`` and its path
templates, ``meta/tasks.parquet`` through pandas, ``meta/episodes/*/*.parquet`` and the data files
found as ``data/*/*.parquet``, an episode's frames located by ``dataset_from_index`` and
``dataset_to_index``, its task by ``tasks.iloc[task_index].name``. ``tests/lerobot/check.sh``
trains LeRobot's own policies on an export, in an environment of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import configs
from workers.lake import Lake, LakeError, ShardMeta, synthetic_episode
from workers.lake.lerobot import ENVIRONMENT_INDEX, STATE_INDEX, export_lerobot
from workers.lake.stats import TOTALS_FILE
from workers.piano.layout import ACTION_DIM, ACTION_NAMES, FINGERTIPS, HAND_JOINTS, KEY_JOINTS, OBS_DIM, OBS_NAMES

LAKE_CFG = configs.load().lake.model_copy(update={"row_group_rows": 50})  # several row groups per shard


def commit(lake: Lake, unit: str, song: str, split: str = "train", f1: float = 0.9, chunk: int = 0,
           lengths=(30, 25), seed: int = 0, fingering: bool = False):
    meta = ShardMeta(unit_id=unit, song_hash=song.encode().hex().ljust(64, "0"), song_name=song, chunk_index=chunk,
                     split=split, config_hash="cfg", specialist_f1=f1)
    episodes = [synthetic_episode(n, seed=seed * 100 + i) for i, n in enumerate(lengths)]
    for ep in episodes if fingering else ():  # as the environment records it: a key per finger, -1 for none
        ep.ot_fingering = np.random.default_rng(seed).integers(-1, 88, (ep.n_steps, 10)).astype(np.int8)
    return lake.commit_shard(meta, episodes), episodes


@pytest.fixture
def lake(tmp_path) -> Lake:
    lake = Lake(tmp_path / "lake", LAKE_CFG)
    commit(lake, "u-held", "Nocturne", split="held-out", f1=0.8, seed=1)
    commit(lake, "u-twinkle-0", "Twinkle", chunk=0, f1=0.95, seed=2, lengths=(40, 40, 12), fingering=True)
    commit(lake, "u-twinkle-1", "Twinkle", chunk=1, f1=0.5, seed=3)
    commit(lake, "u-fur", "Fur Elise", split="eval", f1=0.9, seed=4)
    return lake


def all_steps(lake: Lake, shards=None):
    episodes = [e for s in (shards or lake.shards()) for e in lake.read_episodes(s)]
    return (np.concatenate([e.obs for e in episodes]), np.concatenate([e.action for e in episodes]),
            np.concatenate([e.reward for e in episodes]))


# -- the lake's statistics -------------------------------------------------------------------------


def check_stats_json(lake: Lake) -> None:
    obs, action, reward = all_steps(lake)
    stats = json.loads((lake.root / "meta" / "stats.json").read_text())
    for name, values in [("observation.state", obs), ("action", action), ("reward", reward[:, None])]:
        assert stats[name]["count"] == [len(values)]
        np.testing.assert_allclose(stats[name]["mean"], values.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(stats[name]["std"], values.std(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(stats[name]["min"], values.min(0))
        np.testing.assert_array_equal(stats[name]["max"], values.max(0))


def test_commits_keep_meta_stats_json_equal_to_the_data(lake):
    check_stats_json(lake)
    assert len(json.loads((lake.root / "meta" / "stats.json").read_text())["observation.state"]["mean"]) == OBS_DIM


def test_a_replaced_shard_leaves_the_statistics_of_the_new_one(lake):
    commit(lake, "u-fur", "Fur Elise", split="eval", f1=0.9, seed=9, lengths=(7,))  # a retried unit
    check_stats_json(lake)
    assert json.loads((lake.root / "meta" / "stats.json").read_text())["action"]["count"] == [30 + 25 + 92 + 55 + 7]


def test_statistics_are_rebuilt_when_the_totals_are_lost(lake):
    (lake.root / TOTALS_FILE).unlink()  # as if a writer died between its catalog entry and the totals
    commit(lake, "u-new", "New song", seed=5)
    check_stats_json(lake)


def test_statistics_of_a_selection_match_its_steps(lake):
    shards = lake.shards(split="train")
    obs, action, _ = all_steps(lake, shards)
    moments = lake.stats(shards)
    np.testing.assert_allclose(moments["observation.state"].mean, obs.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(moments["action"].std, action.std(0), rtol=1e-5)


def test_a_lake_written_before_statistics_gets_them_from_its_shards(lake):
    for path in (lake.root / "meta" / "stats").glob("*.npz"):
        path.unlink()
    (lake.root / TOTALS_FILE).unlink()
    assert lake.stats() is not None
    check_stats_json(lake)


def _commit_in_process(root: str, worker: int, start) -> None:
    lake = Lake(root, LAKE_CFG)
    start.wait()
    for k in range(3):  # "shared" units are committed by every process: replacements race with new units
        unit = "shared" if k != 1 else f"own-{worker}"
        commit(lake, unit, "Song", seed=worker * 10 + k, lengths=(10 + worker, 5))


def test_concurrent_commits_leave_statistics_of_what_the_catalog_lists(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    start = ctx.Barrier(3)
    procs = [ctx.Process(target=_commit_in_process, args=(str(tmp_path / "lake"), w, start)) for w in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    check_stats_json(Lake(tmp_path / "lake"))


# -- the LeRobot export ----------------------------------------------------------------------------


def load_like_lerobot(root: Path):
    """What LeRobot 0.4.4's LeRobotDatasetMetadata / LeRobotDataset read, with the same calls."""
    info = json.loads((root / "meta" / "info.json").read_text())
    tasks = pd.read_parquet(root / "meta" / "tasks.parquet")
    episodes = pa.concat_tables([pq.read_table(p) for p in sorted((root / "meta" / "episodes").glob("*/*.parquet"))])
    data = pa.concat_tables([pq.read_table(p) for p in sorted((root / "data").glob("*/*.parquet"))])
    stats = json.loads((root / "meta" / "stats.json").read_text())
    return info, tasks, episodes.to_pylist(), data, stats


def test_export_has_lerobots_v3_layout_and_the_lakes_frames(lake, tmp_path, monkeypatch):
    import workers.lake.lerobot as lerobot

    monkeypatch.setattr(lerobot, "EPISODES_PER_META_FILE", 4)  # several episode-metadata files too
    out = tmp_path / "dataset"
    summary = export_lerobot(lake.root, out, data_file_mb=0.05)  # tiny files: episodes spread over several
    assert len(list((out / "meta" / "episodes").glob("chunk-000/file-*.parquet"))) == 3
    info, tasks, episodes, data, stats = load_like_lerobot(out)

    assert info["codebase_version"] == "v3.0" and info["fps"] == 20 and info["video_path"] is None
    assert info["total_episodes"] == len(episodes) == summary.episodes == 2 + 3 + 2 + 2
    assert info["total_frames"] == data.num_rows == sum(s.n_steps for s in lake.shards())
    assert info["total_tasks"] == len(tasks) == 4
    assert summary.data_files > 1
    features = info["features"]
    # LeRobot's policies take the robot's proprioception and the environment's state apart.
    state_names, env_names = features["observation.state"]["names"], features["observation.environment_state"]["names"]
    assert state_names == list(OBS_NAMES[FINGERTIPS]) + list(OBS_NAMES[HAND_JOINTS])
    assert features["observation.state"]["shape"] == [76] and features["observation.environment_state"]["shape"] == [1068]
    assert env_names[0] == "piano_goal.t0.key0" and set(OBS_NAMES[KEY_JOINTS]) <= set(env_names)
    assert sorted(state_names + env_names) == sorted(OBS_NAMES)
    assert features["action"]["names"] == list(ACTION_NAMES) and features["action"]["shape"] == [ACTION_DIM]
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index", "next.reward", "next.done"):
        assert features[name]["shape"] == [1]
    assert set(data.column_names) == set(features)
    for name, ft in features.items():  # the Arrow types LeRobot's hf features map to
        dtype = data.schema.field(name).type
        if ft["shape"] == [1]:
            assert str(dtype) == {"float32": "float", "int64": "int64", "bool": "bool"}[ft["dtype"]]
        else:
            assert isinstance(dtype, pa.FixedSizeListType) and dtype.list_size == ft["shape"][0]
    assert set(stats) == set(features)  # every numeric feature, next.done and the indices too
    for name, feature_stats in stats.items():
        assert {"mean", "std", "min", "max", "count", "q01", "q10", "q50", "q90", "q99"} <= set(feature_stats)
        assert len(feature_stats["mean"]) == len(feature_stats["q99"]) == features[name]["shape"][0]
        assert feature_stats["count"] == [data.num_rows]

    # Splits are episode ranges: train first, then eval, then held-out.
    assert info["splits"] == {"train": "0:5", "eval": "5:7", "held-out": "7:9"}
    np.testing.assert_array_equal(data.column("index").to_numpy(), np.arange(data.num_rows))

    # Every episode: its frames where its row says, in the data file it names, with the lake's values.
    shards = {s.unit_id: s for s in lake.shards()}
    first_of_unit: dict[str, int] = {}
    for row in episodes:
        first_of_unit.setdefault(row["unit_id"], row["episode_index"])
    for row in episodes:
        a, b = row["dataset_from_index"], row["dataset_to_index"]
        frames = data.slice(a, b - a)
        assert b - a == row["length"]
        np.testing.assert_array_equal(frames.column("episode_index").to_numpy(), row["episode_index"])
        np.testing.assert_array_equal(frames.column("frame_index").to_numpy(), np.arange(row["length"]))
        np.testing.assert_allclose(frames.column("timestamp").to_numpy(), np.arange(row["length"]) / 20, rtol=1e-6)
        assert frames.column("next.done").to_pylist() == [False] * (row["length"] - 1) + [True]
        file = out / info["data_path"].format(chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
        assert row["episode_index"] in set(pq.read_table(file, columns=["episode_index"]).column(0).to_pylist())
        meta_file = out / "meta" / "episodes" / f"chunk-{row['meta/episodes/chunk_index']:03d}" / \
            f"file-{row['meta/episodes/file_index']:03d}.parquet"
        assert row["episode_index"] in pq.read_table(meta_file).column("episode_index").to_pylist()
        task_index = frames.column("task_index")[0].as_py()
        assert tasks.iloc[task_index].name == row["tasks"][0] == f"{row['song']} / chunk {row['chunk_index']}"
        shard = shards[row["unit_id"]]
        lake_episode = lake.read_episodes(shard)[row["episode_index"] - first_of_unit[row["unit_id"]]]
        assert lake_episode.seed == row["seed"] and lake_episode.f1 == pytest.approx(row["f1"])
        state = np.stack(frames.column("observation.state").to_numpy(zero_copy_only=False))
        env_state = np.stack(frames.column("observation.environment_state").to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(state, lake_episode.obs[:, STATE_INDEX])
        np.testing.assert_array_equal(env_state, lake_episode.obs[:, ENVIRONMENT_INDEX])
        np.testing.assert_array_equal(np.stack(frames.column("action").to_numpy(zero_copy_only=False)), lake_episode.action)
        np.testing.assert_array_equal(frames.column("next.reward").to_numpy(), lake_episode.reward)
        fingering = np.stack(frames.column("next.ot_fingering").to_numpy(zero_copy_only=False))
        expected = lake_episode.ot_fingering if lake_episode.ot_fingering is not None else np.full((b - a, 10), -1)
        np.testing.assert_array_equal(fingering, expected)
    assert [shards[u].split for u in first_of_unit] == ["train", "train", "eval", "held-out"]


def test_export_statistics_are_lerobots_per_episode_and_aggregated(lake, tmp_path):
    export_lerobot(lake.root, tmp_path / "ds")
    info, _, episodes, data, stats = load_like_lerobot(tmp_path / "ds")
    columns = {name: np.stack(data.column(name).to_numpy(zero_copy_only=False)).astype(np.float64).reshape(
        data.num_rows, -1) for name in info["features"]}
    quantiles = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
    for row in episodes:  # LeRobot's per-episode stats/<feature>/<stat> columns, of the episode's frames
        a, b = row["dataset_from_index"], row["dataset_to_index"]
        for name, values in columns.items():
            x = values[a:b]
            assert row[f"stats/{name}/count"] == [b - a]
            np.testing.assert_allclose(row[f"stats/{name}/mean"], x.mean(0), rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(row[f"stats/{name}/std"], x.std(0), rtol=1e-6, atol=1e-9)
            np.testing.assert_array_equal(row[f"stats/{name}/min"], x.min(0))
            for key, q in quantiles.items():
                np.testing.assert_allclose(row[f"stats/{name}/{key}"], np.quantile(x, q, axis=0), rtol=1e-6, atol=1e-9)

    # stats.json: the whole data's moments; quantiles the count-weighted mean of the episodes' (as LeRobot aggregates).
    counts = np.array([row["length"] for row in episodes], dtype=np.float64)[:, None]
    done = columns["next.done"]
    np.testing.assert_allclose(stats["next.done"]["mean"], done.mean(0))
    assert stats["next.done"]["max"] == [1.0] and stats["next.done"]["count"] == [data.num_rows]
    action = columns["action"]
    np.testing.assert_allclose(stats["action"]["std"], action.std(0), rtol=1e-6)
    np.testing.assert_allclose(stats["action"]["q10"], (np.stack([r["stats/action/q10"] for r in episodes]) * counts).sum(0)
                               / counts.sum(), rtol=1e-6)

    # A dimension constant in the data (a key never in the goal here) normalises to finite values.
    env = columns["observation.environment_state"]
    constant = np.flatnonzero(env.std(0) == 0)
    varying = np.flatnonzero(env.std(0) > 0.1)
    assert len(constant) and len(varying)
    env_stats = {k: np.asarray(v) for k, v in stats["observation.environment_state"].items()}
    np.testing.assert_array_equal(env_stats["std"][constant], 1.0)
    np.testing.assert_allclose(env_stats["std"][varying], env.std(0)[varying], rtol=1e-6)
    np.testing.assert_allclose(env_stats["mean"], env.mean(0), atol=1e-9)
    for lo, hi in (("min", "max"), ("q01", "q99"), ("q10", "q90")):
        assert (env_stats[hi] - env_stats[lo] > 0).all()
        np.testing.assert_array_equal(env_stats[hi][constant] - env_stats[lo][constant], 2.0)
    np.testing.assert_array_equal(env_stats["max"][varying], env.max(0)[varying])
    unseen = 1.0  # a key pressed that never was: bounded under mean/std, min/max and quantile normalisation
    assert abs((unseen - env_stats["mean"][constant]) / (env_stats["std"][constant] + 1e-8)).max() <= 1.0
    assert abs(2 * (unseen - env_stats["q01"][constant]) / (env_stats["q99"][constant] - env_stats["q01"][constant]) - 1).max() <= 2.0


def test_export_filters_shards_like_training(lake, tmp_path):
    summary = export_lerobot(lake.root, tmp_path / "a", min_f1=0.85, splits=["train", "held-out"])
    info, tasks, episodes, data, _ = load_like_lerobot(tmp_path / "a")
    assert {r["unit_id"] for r in episodes} == {"u-twinkle-0"}  # u-held: F1 0.8; u-fur: eval; u-twinkle-1: 0.5
    assert summary.episodes == len(episodes) == 3 and len(tasks) == 1
    export_lerobot(lake.root, tmp_path / "b", songs=["Twinkle"])
    assert {r["unit_id"] for r in load_like_lerobot(tmp_path / "b")[2]} == {"u-twinkle-0", "u-twinkle-1"}
    with pytest.raises(LakeError, match="no committed shards match"):
        export_lerobot(lake.root, tmp_path / "c", songs=["Nope"])
    assert not (tmp_path / "c").exists()
    with pytest.raises(FileExistsError, match="already exists"):
        export_lerobot(lake.root, tmp_path / "a")


def test_cli_lake_export(lake, tmp_path):
    from orchestrator.cli import app

    result = CliRunner().invoke(app, ["lake", "export", str(lake.root), "--format", "lerobot", "--out",
                                      str(tmp_path / "ds"), "--split", "eval"])
    assert result.exit_code == 0, result.output
    assert "LeRobot v3.0 dataset, 2 episodes" in result.output
    assert json.loads((tmp_path / "ds" / "meta" / "info.json").read_text())["total_episodes"] == 2
    bad = CliRunner().invoke(app, ["lake", "export", str(lake.root), "--format", "rlds", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "only lerobot" in bad.output
