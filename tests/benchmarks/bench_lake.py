"""Lake write/read speed and size next to naive float32 Parquet, plus TrajectoryDataset throughput.

    .venv/bin/python tests/benchmarks/bench_lake.py [--episodes 20] [--steps 550] [--repeats 3]

Episodes are synthetic but music-like: sparse goal bits from a random piano roll seen through the
11-step lookahead, random continuous observation parts and actions (the worst case for
compression). "Naive" is one table of float32 columns (obs[1144], action[39], reward,
pressed[88], target[88] as 0/1 floats) written with ``pyarrow.parquet.write_table`` using the
same codec. Throughput in MB/s counts the naive float32 bytes, so both rows measure the same work.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import DataLoader

import configs
from workers.lake import Lake, ShardMeta, synthetic_episode
from workers.lake.dataset import TrajectoryDataset


def naive_table(episodes) -> pa.Table:
    def fixed(a: np.ndarray) -> pa.Array:
        a = np.ascontiguousarray(a, dtype=np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])

    cat = lambda name: np.concatenate([getattr(ep, name) for ep in episodes])  # noqa: E731
    return pa.table({
        "episode": pa.array(np.repeat(np.arange(len(episodes), dtype=np.int32), [ep.n_steps for ep in episodes])),
        "step": pa.array(np.concatenate([np.arange(ep.n_steps, dtype=np.int32) for ep in episodes])),
        "obs": fixed(cat("obs")),
        "action": fixed(cat("action")),
        "reward": pa.array(cat("reward").astype(np.float32)),
        "pressed": fixed(cat("pressed")),
        "target": fixed(cat("target")),
    })


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds over ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--steps", type=int, default=550)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dataset-shards", type=int, default=4)
    parser.add_argument("--dataset-samples", type=int, default=40000)
    args = parser.parse_args()

    cfg = configs.load()
    lake_cfg = cfg.lake
    episodes = [synthetic_episode(args.steps, seed=s) for s in range(args.episodes)]
    n_steps = args.episodes * args.steps
    table = naive_table(episodes)
    logical_mb = table.nbytes / 1e6  # the naive float32 arrays in memory
    goal_density = float(np.mean([ep.obs[:, :979].mean() for ep in episodes]))
    print(f"workload: {args.episodes} episodes x {args.steps} steps = {n_steps} steps; naive float32 "
          f"{logical_mb:.1f} MB; goal bits on: {goal_density:.1%}; codec {lake_cfg.compression} "
          f"level {lake_cfg.compression_level}; median of {args.repeats}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        codec, level = lake_cfg.compression, lake_cfg.compression_level
        naive_path = tmp / "naive.parquet"
        naive_plain = tmp / "naive_uncompressed.parquet"
        lake = Lake(tmp / "lake", lake_cfg)
        meta = ShardMeta("bench-c000-cfg", "ab" * 32, "bench", 0, "train", "cfg", 0.9)

        w_naive, _ = timed(lambda: pq.write_table(table, naive_path, compression=codec, compression_level=level,
                                                  row_group_size=lake_cfg.row_group_rows), args.repeats)
        pq.write_table(table, naive_plain, compression="none", row_group_size=lake_cfg.row_group_rows)
        w_lake, shard = timed(lambda: lake.commit_shard(meta, episodes), args.repeats)

        def read_naive():
            t = pq.read_table(naive_path)
            obs = t.column("obs").combine_chunks().flatten().to_numpy().reshape(-1, 1144)
            act = t.column("action").combine_chunks().flatten().to_numpy().reshape(-1, 39)
            return obs, act

        r_naive, _ = timed(read_naive, args.repeats)
        r_lake, back = timed(lambda: lake.read_episodes(shard), args.repeats)
        assert all(a.obs.tobytes() == b.obs.tobytes() for a, b in zip(episodes, back))

        sizes = {"lake shard": shard.bytes, f"naive {codec}": naive_path.stat().st_size,
                 "naive uncompressed": naive_plain.stat().st_size}

        print("\n                        write MB/s   read samples/s   bytes/episode   bytes/step   vs naive")
        naive_bytes = sizes[f"naive {codec}"]
        for name, w, r, size in [
            ("lake (commit_shard)", w_lake, r_lake, sizes["lake shard"]),
            (f"naive float32 {codec}", w_naive, r_naive, sizes[f"naive {codec}"]),
        ]:
            print(f"{name:<24}{logical_mb / w:>10.1f}{n_steps / r:>17,.0f}{size / args.episodes:>16,.0f}"
                  f"{size / n_steps:>13,.1f}{size / naive_bytes:>10.2f}x")
        size = sizes["naive uncompressed"]
        print(f"{'naive float32 none':<24}{'':>10}{'':>17}{size / args.episodes:>16,.0f}{size / n_steps:>13,.1f}"
              f"{size / naive_bytes:>10.2f}x")
        raw = table.nbytes
        print(f"{'in-memory float32':<24}{'':>10}{'':>17}{raw / args.episodes:>16,.0f}{raw / n_steps:>13,.1f}"
              f"{raw / naive_bytes:>10.2f}x")

        md = pq.ParquetFile(shard.path).metadata
        per_col: dict[str, int] = {}
        for g in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(g).column(c)
                name = col.path_in_schema.split(".")[0]
                per_col[name] = per_col.get(name, 0) + col.total_compressed_size
        print("\nlake bytes/step by column: " + ", ".join(
            f"{k} {v / n_steps:.1f}" for k, v in sorted(per_col.items(), key=lambda kv: -kv[1])))

        # More shards, so that DataLoader workers have row groups to share.
        for k in range(1, args.dataset_shards):
            lake.commit_shard(dataclasses.replace(meta, unit_id=f"bench-c{k:03d}-cfg", chunk_index=k), episodes)
        print(f"\nTrajectoryDataset over {args.dataset_shards} such shards ({args.dataset_shards * n_steps} steps), "
              f"shuffle_buffer={cfg.il.shuffle_buffer}, action_chunk={cfg.il.action_chunk}; samples/s over "
              f"{args.dataset_samples} samples, start-up included:")
        runs = [(0, None, None), (0, cfg.il.batch_size, None), (0, None, cfg.il.batch_size),
                (2, cfg.il.batch_size, None), (2, None, cfg.il.batch_size)]
        for workers, loader_batch, dataset_batch in runs:
            data = TrajectoryDataset(tmp / "lake", shuffle_buffer=cfg.il.shuffle_buffer,
                                     action_chunk=cfg.il.action_chunk, repeat=True, batch_size=dataset_batch)
            loader = DataLoader(data, batch_size=loader_batch, num_workers=workers)
            count, t0 = 0, time.perf_counter()
            for item in loader:
                count += item["obs"].shape[0] if item["obs"].ndim == 2 else 1
                if count >= args.dataset_samples:
                    break
            rate = count / (time.perf_counter() - t0)
            label = f"num_workers={workers}, " + (
                f"TrajectoryDataset(batch_size={dataset_batch})" if dataset_batch else
                f"DataLoader(batch_size={loader_batch})" if loader_batch else "per sample")
            print(f"  {label:<52}{rate:>10,.0f}")


if __name__ == "__main__":
    main()
