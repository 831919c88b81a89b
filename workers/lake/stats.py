"""Per-feature statistics of the lake (count, mean, std, min, max), kept up to date as shards commit.

Each committed shard gets ``meta/stats/<unit_id>.npz``: for every feature (``observation.state``
1144, ``action`` 39, ``reward`` 1) the step count, mean, sum of squared deviations (``m2``), min
and max, in float64, plus the shard's ``commit_id``. Moments of several shards merge exactly
(Chan et al.'s parallel update), so the statistics of any selection of shards (the imitation
trainer's: passing train shards) come from these small files without reading a row of data.

The lake-wide totals live in ``meta/stats.json`` (LeRobot's layout: ``{feature: {"mean": [...],
"std": [...], "min": [...], "max": [...], "count": [n]}}``) and, for the incremental update,
``meta/stats_totals.npz`` (the same moments plus which ``unit_id:commit_id`` they include). A
new shard is merged in at commit; a replaced shard makes the totals be rebuilt from the
per-shard files (retries are rare). Files are plain numpy ``.npz`` (no pickles) and JSON.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from configs.files import atomic_write, write_json_atomic
from workers.piano.layout import ACTION_DIM, OBS_DIM

# Feature name (LeRobot's) -> width.
FEATURES: dict[str, int] = {"observation.state": OBS_DIM, "action": ACTION_DIM, "reward": 1}
STATS_DIR = "meta/stats"
STATS_JSON = "meta/stats.json"
TOTALS_FILE = "meta/stats_totals.npz"
_MOMENTS = ("count", "mean", "m2", "min", "max")


@dataclass
class Moments:
    """Count, mean, sum of squared deviations, min and max of ``count`` vectors (float64 [d])."""

    count: int
    mean: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray) -> Moments:
        """The moments of the rows of ``values`` [n, d] (or [n] for d = 1)."""
        x = np.asarray(values, dtype=np.float64)
        x = x.reshape(len(x), -1)
        if len(x) == 0:
            raise ValueError("no rows to take statistics of")
        mean = x.mean(0)
        return cls(len(x), mean, ((x - mean) ** 2).sum(0), x.min(0), x.max(0))

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets of rows together (exact, in any order)."""
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / n)
        return Moments(n, mean, m2, np.minimum(self.min, other.min), np.maximum(self.max, other.max))

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (as ``numpy.std``)."""
        return np.sqrt(np.maximum(self.m2 / self.count, 0.0))


FeatureMoments = dict[str, Moments]


def moments_of(obs: np.ndarray, action: np.ndarray, reward: np.ndarray) -> FeatureMoments:
    """The moments of one block of steps: observations [n, 1144], actions [n, 39], rewards [n]."""
    return {"observation.state": Moments.of(obs), "action": Moments.of(action), "reward": Moments.of(reward)}


def merge_all(parts: Iterable[FeatureMoments]) -> FeatureMoments | None:
    """All ``parts`` merged feature by feature; None when there are none."""
    total: FeatureMoments | None = None
    for part in parts:
        total = dict(part) if total is None else {k: total[k].merge(part[k]) for k in FEATURES}
    return total


def lerobot_stats(moments: FeatureMoments) -> dict[str, dict[str, list]]:
    """``{feature: {"mean", "std", "min", "max", "count"}}`` as JSON lists (LeRobot's stats.json layout)."""
    return {name: {"mean": m.mean.tolist(), "std": m.std.tolist(), "min": m.min.tolist(), "max": m.max.tolist(),
                   "count": [int(m.count)]} for name, m in moments.items()}


# -- files ---------------------------------------------------------------------------------------


def _arrays(moments: FeatureMoments) -> dict[str, np.ndarray]:
    out = {}
    for name, m in moments.items():
        for field in _MOMENTS:
            out[f"{name}/{field}"] = np.asarray(getattr(m, field), dtype=np.int64 if field == "count" else np.float64)
    return out


def _from_arrays(data: Mapping[str, np.ndarray], path: Path) -> FeatureMoments:
    out = {}
    for name, width in FEATURES.items():
        try:
            fields = {f: data[f"{name}/{f}"] for f in _MOMENTS}
        except KeyError as e:
            raise ValueError(f"{path}: no {e.args[0]} in the statistics file") from None
        if fields["mean"].shape != (width,):
            raise ValueError(f"{path}: {name}/mean has shape {fields['mean'].shape}, expected ({width},)")
        out[name] = Moments(int(fields["count"]), fields["mean"], fields["m2"], fields["min"], fields["max"])
    return out


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        f.write(buffer.getvalue())


def write_shard_stats(path: Path, moments: FeatureMoments, commit_id: str) -> None:
    """Write one shard's moments (and the commit they describe) atomically."""
    _save_npz(path, {**_arrays(moments), "commit_id": np.array(commit_id)})


def read_shard_stats(path: Path) -> tuple[FeatureMoments, str]:
    """(moments, commit_id) of a per-shard statistics file; ValueError names the file when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return _from_arrays(data, path), str(data["commit_id"])
    except (OSError, KeyError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: unreadable shard statistics: {e}") from e


def read_totals(path: Path) -> tuple[FeatureMoments, dict[str, str]] | None:
    """(moments, {unit_id: commit_id} they include) of the lake-wide totals, None if absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            included = dict(entry.split(":", 1) for entry in data["included"].tolist())
            return _from_arrays(data, path), included
    except (OSError, KeyError, ValueError):
        return None


def write_totals(root: Path, moments: FeatureMoments, included: Mapping[str, str]) -> None:
    """Write the totals file and ``meta/stats.json`` (the JSON last: it is what readers use)."""
    entries = np.array(sorted(f"{u}:{c}" for u, c in included.items()), dtype=str)
    _save_npz(root / TOTALS_FILE, {**_arrays(moments), "included": entries})
    write_json_atomic(root / STATS_JSON, lerobot_stats(moments))


def normalization_from(moments: FeatureMoments, goal_bits: int) -> dict[str, np.ndarray]:
    """The imitation policies' normalisation (``obs_mean``/``obs_std``/``action_mean``/``action_std``,
    float32) from lake moments; the binary goal entries are left unscaled (mean 0, std 1)."""
    obs, action = moments["observation.state"], moments["action"]
    obs_mean, obs_std = obs.mean.astype(np.float32), obs.std.astype(np.float32)
    obs_mean[:goal_bits], obs_std[:goal_bits] = 0.0, 1.0
    return {"obs_mean": obs_mean, "obs_std": obs_std, "action_mean": action.mean.astype(np.float32),
            "action_std": action.std.astype(np.float32)}


def stats_json(root: Path) -> dict:
    """The lake's ``meta/stats.json`` as written (lists)."""
    return json.loads((Path(root) / STATS_JSON).read_text())
