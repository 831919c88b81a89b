"""Lake write/read speed and size next to naive float32 Parquet, TrajectoryDataset throughput, and what the integrity checks cost.

    .venv/bin/python tests/benchmarks/bench_lake.py [--episodes 20] [--steps 550] [--repeats 3]

Episodes are synthetic but music-like: sparse goal bits from a random piano roll seen through the
11-step lookahead, random continuous observation parts and actions (the worst case for
compression). "Naive" is one table of float32 columns (obs[1144], action[39], reward,
pressed[88], target[88] as 0/1 floats) written with ``pyarrow.parquet.write_table`` using the
same codec. Throughput in MB/s counts the naive float32 bytes, so both rows measure the same work.
The integrity rows time one shard's checks (warm page cache) next to reading it: the whole-file
sha256 (``Lake.shard_problem``: listing, gate, resume), reading with each row group checked
(``Lake.read_table``) or not (plain pyarrow), the checksums at commit, and the dataset with its
shards' checksums or without them (the same shards, their part checksums left out of the listing).
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
from workers.lake.store import file_sha256, shard_digests


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
            rate = dataset_rate(tmp / "lake", cfg, args.dataset_samples, workers, loader_batch, dataset_batch)
            label = f"num_workers={workers}, " + (
                f"TrajectoryDataset(batch_size={dataset_batch})" if dataset_batch else
                f"DataLoader(batch_size={loader_batch})" if loader_batch else "per sample")
            print(f"  {label:<52}{rate:>10,.0f}")

        integrity(lake, shard, meta, episodes, cfg, args)


def dataset_rate(root: Path, cfg, samples: int, workers: int = 0, loader_batch: int | None = None,
                 dataset_batch: int | None = None, shards=None) -> float:
    """Samples per second of a TrajectoryDataset over ``root`` (start-up included)."""
    data = TrajectoryDataset(root, shuffle_buffer=cfg.il.shuffle_buffer, action_chunk=cfg.il.action_chunk, repeat=True,
                             batch_size=dataset_batch, shards=shards)
    loader = DataLoader(data, batch_size=loader_batch, num_workers=workers)
    count, t0 = 0, time.perf_counter()
    for item in loader:
        count += item["obs"].shape[0] if item["obs"].ndim == 2 else 1
        if count >= samples:
            break
    return count / (time.perf_counter() - t0)


def integrity(lake: Lake, shard, meta: ShardMeta, episodes, cfg, args) -> None:
    """What checking a shard costs next to reading it: one shard, then the dataset over all of them."""
    mb = shard.bytes / 1e6
    scratch = Lake(lake.root.parent / "commits", lake.cfg)  # commits of its own: the shard read stays as listed
    fns = {  # timed in turns, so that the machine's load falls on all of them alike
        "plain": lambda: pq.ParquetFile(shard.path).read(),
        "checked": lambda: lake.read_table(shard),
        "sha": lambda: file_sha256(shard.path),
        "again": lambda: lake.shard_problem(shard),  # after the first: the same Lake, the file unchanged
        "decode": lambda: lake.read_episodes(shard),
        "digests": lambda: shard_digests(shard.path),
        "commit": lambda: scratch.commit_shard(meta, episodes),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, 1)[0])
    t_plain, t_checked, t_sha, t_again, t_decode, t_digests, t_commit = (statistics.median(times[k]) for k in fns)
    print(f"\nintegrity: one shard of {mb:.2f} MB, {shard.n_row_groups} row group(s), {shard.n_steps} steps; "
          f"warm page cache; median of {args.repeats}")
    print(f"  {'':<58}{'ms/shard':>10}{'MB/s':>10}{'vs read':>9}")
    rows = [
        ("read, unchecked (pyarrow ParquetFile.read)", t_plain),
        ("read, each row group's sha256 checked (Lake.read_table)", t_checked),
        ("sha256 of the whole file (Lake.shard_problem)", t_sha),
        ("shard_problem again, file unchanged (a stat)", t_again),
        ("read and decode episodes, checked (Lake.read_episodes)", t_decode),
        ("checksums at commit (shard_digests)", t_digests),
        ("commit_shard, checksums included", t_commit),
    ]
    for label, t in rows:
        print(f"  {label:<58}{t * 1e3:>10.1f}{mb / t:>10.0f}{t / t_plain:>8.2f}x")
    every = lake.shards()
    unchecked = [dataclasses.replace(s, row_group_sha256=(), footer_sha256="", sha256="") for s in every]
    rates: dict[str, list[float]] = {"checked": [], "plain": []}
    for _ in range(args.repeats):
        for name, listing in (("checked", every), ("plain", unchecked)):
            rates[name].append(dataset_rate(lake.root, cfg, args.dataset_samples, dataset_batch=cfg.il.batch_size,
                                            shards=listing))
    checked_rate, plain_rate = statistics.median(rates["checked"]), statistics.median(rates["plain"])
    print(f"  TrajectoryDataset(batch_size={cfg.il.batch_size}), samples/s: row groups checked {checked_rate:,.0f}, "
          f"unchecked {plain_rate:,.0f} ({checked_rate / plain_rate:.2f}x)")


if __name__ == "__main__":
    main()
