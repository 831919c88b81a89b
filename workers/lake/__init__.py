"""The trajectory lake: specialists' rollouts as plain Parquet files anyone can open.

- :mod:`workers.lake.schema`: the records (``Episode``, ``ShardMeta``, ``ShardInfo``), the
  Parquet schema (one row per control step) and the episode <-> table codec;
- :mod:`workers.lake.store`: ``Lake`` (the catalog: list, commit, vacuum) and ``ShardWriter``
  (streaming, atomic commits), and ``meta/info.json``;
- :mod:`workers.lake.dataset`: ``TrajectoryDataset``, the torch ``IterableDataset`` the
  imitation trainer streams (imported lazily: it needs torch);
- :mod:`workers.lake.stats`: per-feature statistics kept at commit (``meta/stats.json``);
- :mod:`workers.lake.episodes`: one episode of a shard read back (the best, or by seed);
- :mod:`workers.lake.lerobot`: the lake exported as a LeRobot v3.0 dataset;
- :mod:`workers.lake.testdata`: synthetic episodes for tests and benchmarks.

``from workers.lake import Lake, ShardMeta, Episode`` is the usual way in.
"""

from workers.lake.schema import (ACTION_DIM, OBS_DIM, SHARD_KV_KEYS, SHARD_SCHEMA, SPLITS, Episode, LakeError,  # noqa: F401
                                 ShardInfo, ShardMeta, episodes_to_table, fixed_list_to_numpy, read_shard_kv,
                                 rebuild_obs, table_to_episodes)
from workers.lake.store import Lake, ShardWriter, info_document  # noqa: F401
from workers.lake.testdata import synthetic_episode  # noqa: F401


def __getattr__(name: str):  # TrajectoryDataset needs torch; import it only when asked for
    if name == "TrajectoryDataset":
        from workers.lake.dataset import TrajectoryDataset

        return TrajectoryDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
