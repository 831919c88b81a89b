"""Run in LeRobot's own environment: load an export with LeRobot's LeRobotDataset and check what
its policies and tools read. Usage: ``python check_dataset.py DATASET_DIR WORK_DIR``; exit 1 on a problem."""

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from lerobot.configs.types import FeatureType
from lerobot.datasets.dataset_tools import split_dataset
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.utils.feature_utils import dataset_to_policy_features

QUANTILES = ("q01", "q10", "q50", "q90", "q99")


def check_stats(stats: dict, features: dict, where: str) -> None:
    """Every numeric feature has LeRobot's statistics, quantiles included, and a float feature's
    std and quantile range are positive (normalisation stays finite)."""
    for name, ft in features.items():
        if ft["dtype"] in ("string", "language"):
            continue
        missing = {"mean", "std", "min", "max", "count", *QUANTILES} - set(stats.get(name, {}))
        assert not missing, f"{where}: {name} lacks {sorted(missing)}"
        if ft["dtype"] == "float32" and where == "stats.json":
            assert (np.asarray(stats[name]["std"]) > 0).all(), f"{where}: {name} has a zero std"
            assert (np.asarray(stats[name]["q99"]) > np.asarray(stats[name]["q01"])).all(), f"{where}: {name} q99 == q01"


def main(root: str, work: str) -> None:
    root = Path(root)
    info = json.loads((root / "meta" / "info.json").read_text())
    fps = info["fps"]
    dataset = LeRobotDataset("pianoforge/check", root=root,
                             delta_timestamps={"action": [i / fps for i in range(10)]})
    meta = dataset.meta
    features = dataset_to_policy_features(meta.features)
    kinds = {name: f.type for name, f in features.items()}
    assert kinds["observation.state"] == FeatureType.STATE, kinds
    assert kinds["observation.environment_state"] == FeatureType.ENV, kinds
    assert kinds["action"] == FeatureType.ACTION, kinds
    frame = dataset[len(dataset) // 2]
    assert frame["observation.state"].shape == (76,) and frame["observation.environment_state"].shape == (1068,)
    assert frame["action"].shape == (10, 39) and frame["action_is_pad"].dtype == torch.bool
    check_stats(meta.stats, meta.features, "stats.json")

    # LeRobot's own split tool rebuilds each part's stats.json from the per-episode stats columns.
    ranges = {name: list(range(*map(int, span.split(":")))) for name, span in info["splits"].items()}
    parts = split_dataset(LeRobotDataset("pianoforge/check", root=root), ranges, output_dir=Path(work) / "split")
    for name, part in parts.items():
        check_stats(part.meta.stats, part.meta.features, f"split {name}")
        actions = np.stack([np.asarray(a) for a in part.hf_dataset["action"]])
        np.testing.assert_allclose(part.meta.stats["action"]["mean"], actions.mean(0), rtol=1e-4, atol=1e-5)
        assert part.meta.total_episodes == len(ranges[name])
    stat_columns = [c for c in pq.read_schema(next((root / "meta" / "episodes").glob("*/*.parquet"))).names
                    if c.startswith("stats/")]
    print(f"LeRobotDataset: {meta.total_episodes} episodes, {meta.total_frames} frames at {fps} fps, "
          f"{len(stat_columns)} per-episode stats columns; policy features: "
          + ", ".join(f"{n} {f.type.name} {tuple(f.shape)}" for n, f in features.items())
          + "; split by LeRobot into " + ", ".join(f"{n} ({p.meta.total_episodes} episodes)" for n, p in parts.items())
          + " with complete stats")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
