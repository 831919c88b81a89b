"""One episode of a shard, read back on its own: the best one (highest F1) or the one with a given seed."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from workers.lake.schema import Episode, LakeError, ShardInfo, table_to_episodes


def read_episode(lake, shard: ShardInfo, seed: int | None = None) -> Episode:
    """The shard's episode with ``seed``, or (``seed`` None) the one with the highest F1 (ties:
    the higher return), reading only the row groups that hold it (each holds whole episodes)."""
    pf = lake.open_shard(shard)
    head = lake.read_table(shard, columns=["episode", "seed", "episode_f1", "episode_return"])
    episode = np.asarray(head.column("episode"))
    if seed is None:
        order = np.lexsort((np.asarray(head.column("episode_return")), np.asarray(head.column("episode_f1"))))
        wanted = int(episode[order[-1]])
    else:
        rows = np.flatnonzero(np.asarray(head.column("seed")) == seed)
        if len(rows) == 0:
            seeds = sorted(set(np.asarray(head.column("seed")).tolist()))
            raise LakeError(f"{shard.path}: unit {shard.unit_id} has no episode with seed {seed} (seeds: {seeds})")
        wanted = int(episode[rows[0]])
    groups, start = [], 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if np.any(episode[start:start + n] == wanted):
            groups.append(g)
        start += n
    table = pa.concat_tables([lake.read_row_group(pf, shard, g) for g in groups])
    return table_to_episodes(table.filter(pc.equal(table.column("episode"), wanted)))[0]
