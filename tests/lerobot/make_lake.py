"""A small lake for the LeRobot check: synthetic music-like episodes of two songs (train and eval
shards), committed through the lake's own writer. Usage: ``python make_lake.py LAKE_DIR``."""

import sys

import configs
from workers.lake import Lake, ShardMeta, synthetic_episode


def main(root: str) -> None:
    lake = Lake(root, configs.load().lake)
    for k, (song, split) in enumerate([("Twinkle", "train"), ("Fur Elise", "train"), ("Nocturne", "eval")]):
        meta = ShardMeta(unit_id=f"u-{k}", song_hash=song.encode().hex().ljust(64, "0"), song_name=song,
                         chunk_index=0, split=split, config_hash="check", specialist_f1=0.9)
        lake.commit_shard(meta, [synthetic_episode(60 + 10 * i, seed=10 * k + i) for i in range(4)])
    print(f"{root}: {len(lake.shards())} shards")


if __name__ == "__main__":
    main(sys.argv[1])
