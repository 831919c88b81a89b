"""Streaming the lake into training: a torch IterableDataset over committed shards.

Work is cut into (shard, row group) pieces; a row group holds whole episodes, so each piece can
be read, decoded and turned into action chunks on its own. Every DataLoader worker of every DDP
rank takes its own share of the pieces (``pieces[g::G]`` for global worker ``g`` of ``G``), so
together they see every step exactly once per epoch. A shuffle buffer mixes steps across pieces;
memory stays at one row group plus the buffer, whatever the size of the lake.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from workers.lake.schema import ACTION_DIM, LakeError, ShardInfo, fixed_list_to_numpy, rebuild_obs
from workers.lake.store import Lake


def action_chunks(episode: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row i: the rows of actions i..i+chunk-1 of the same episode, repeating the
    episode's last row past its end, and the mask of those that are real.

    ``episode`` int [n]: each row's episode (rows ordered by episode, then step).
    Returns (index int64 [n, chunk], mask bool [n, chunk]).
    """
    n = len(episode)
    rows = np.arange(n)
    new_episode = np.r_[episode[1:] != episode[:-1], True]  # True on each episode's last row
    last = np.flatnonzero(new_episode)
    last_of_row = last[np.searchsorted(last, rows)]
    wanted = rows[:, None] + np.arange(chunk)[None, :]
    return np.minimum(wanted, last_of_row[:, None]), wanted <= last_of_row[:, None]


class TrajectoryDataset(IterableDataset):
    """Steps of committed lake shards as ``{"obs": float32[1144], "action": float32[action_chunk, 39],
    "action_mask": bool[action_chunk]}``: this step's observation, this step's action followed by the
    next ``action_chunk - 1`` of the same episode (the last one repeated past the episode's end,
    ``action_mask`` False there).

    Shards are those with ``specialist_f1 >= min_f1`` in ``splits``, listed once when the dataset
    is made (pass ``shards`` to share one listing between DDP ranks of a lake that is growing).
    Damaged shards (a file whose size is not the catalogued one) are left out with a warning and
    kept in ``damaged`` as (shard, problem); a row group whose bytes do not have their catalogued
    sha256 (checked as each is read, before decoding) is skipped with a warning naming the file.
    ``rank``/``world_size`` default to torch.distributed's when it is initialised, else 0/1.
    ``repeat=True`` goes on forever, reshuffling each epoch; otherwise call ``set_epoch``.
    ``batch_size=B`` yields ready batches (``obs`` [B, 1144], ...; the last one may be smaller),
    several times faster than per-step samples: use it with ``DataLoader(batch_size=None)``.
    Memory per worker: one row group, plus ``shuffle_buffer`` steps (about 6 KB each).
    """

    def __init__(
        self,
        root: str | Path,
        min_f1: float = 0.0,
        splits: Sequence[str] = ("train",),
        shuffle_buffer: int = 10000,
        seed: int = 0,
        action_chunk: int = 1,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shards: Sequence[ShardInfo] | None = None,
        repeat: bool = False,
        batch_size: int | None = None,
        decode_rows: int = 1024,
    ):
        super().__init__()
        if action_chunk < 1:
            raise ValueError(f"action_chunk must be >= 1, got {action_chunk}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.root = Path(root)
        self.lake = Lake(self.root)
        self.min_f1 = min_f1
        self.splits = (splits,) if isinstance(splits, str) else tuple(splits)
        listed = self.lake.shards() if shards is None else list(shards)
        whole, self.damaged = self.lake.split_damaged(  # sizes: each row group's checksum is checked as it is read
            [s for s in listed if s.specialist_f1 >= min_f1 and s.split in self.splits], full=False)
        if self.damaged:
            warnings.warn(f"{self.root}: leaving out {len(self.damaged)} damaged shard(s): "
                          + "; ".join(f"{s.path}: {problem}" for s, problem in self.damaged[:5]))
        self.shards: list[ShardInfo] = sorted(whole, key=lambda s: s.unit_id)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.action_chunk = action_chunk
        self.repeat = repeat
        self.batch_size = batch_size
        self.decode_rows = decode_rows
        self.epoch = 0
        if rank is None and dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        self.rank, self.world_size = rank, world_size

    @property
    def num_samples(self) -> int:
        """Steps in the selected shards (all ranks and workers together, one epoch)."""
        return sum(s.n_steps for s in self.shards)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for another pass (call on every rank with the same epoch)."""
        self.epoch = epoch

    # -- who reads what ------------------------------------------------------------------------

    def _pieces(self, epoch: int) -> list[tuple[int, int]]:
        """All (shard index, row group) pieces in an order every rank and worker agrees on."""
        pieces = []
        for i, shard in enumerate(self.shards):
            n_groups = shard.n_row_groups or self.lake.open_shard(shard).num_row_groups
            pieces += [(i, g) for g in range(n_groups)]
        random.Random(f"{self.seed}/{epoch}").shuffle(pieces)
        return pieces

    def _global_worker(self) -> tuple[int, int]:
        rank, world_size = self.rank, self.world_size
        if rank is None:
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if (
                dist.is_available() and dist.is_initialized()) else (0, 1)
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * n_workers + worker, world_size * n_workers

    # -- reading -------------------------------------------------------------------------------

    def _blocks(self, pieces: list[tuple[int, int]]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(obs [m, 1144], action [m, chunk, 39], action_mask [m, chunk]) blocks of up to decode_rows steps."""
        open_file, open_index = None, -1
        for shard_index, group in pieces:
            shard = self.shards[shard_index]
            try:
                if shard_index != open_index:
                    open_file, open_index = self.lake.open_shard(shard), shard_index
                table = self.lake.read_row_group(open_file, shard, group)
            except (LakeError, OSError, pa.ArrowException) as e:  # changed bytes: never read as data
                warnings.warn(f"skipping row group {group} of unit {shard.unit_id} ({shard.path}): {e}")
                continue
            episode = np.asarray(table.column("episode"), dtype=np.int64)
            action = fixed_list_to_numpy(table.column("action"), ACTION_DIM)
            index, mask = action_chunks(episode, self.action_chunk)
            for start in range(0, table.num_rows, self.decode_rows):
                stop = min(start + self.decode_rows, table.num_rows)
                yield rebuild_obs(table.slice(start, stop - start)), action[index[start:stop]], mask[start:stop]

    def _shuffled(self, blocks, rng: np.random.Generator):
        """A shuffle buffer of ``shuffle_buffer`` steps: each incoming step takes the place of a
        random buffered one, which goes out; the rest leave in random order at the end."""
        size, fill, buffer = self.shuffle_buffer, 0, None
        for block in blocks:
            if buffer is None:
                buffer = [np.empty((size, *part.shape[1:]), dtype=part.dtype) for part in block]
            take = min(size - fill, len(block[0]))
            for buf, part in zip(buffer, block):
                buf[fill:fill + take] = part[:take]
            fill += take
            for start in range(take, len(block[0]), size):
                incoming = [part[start:start + size] for part in block]
                slots = rng.choice(size, size=len(incoming[0]), replace=False)
                out = [buf[slots] for buf in buffer]
                for buf, part in zip(buffer, incoming):
                    buf[slots] = part
                yield tuple(out)
        if fill:
            order = rng.permutation(fill)
            for start in range(0, fill, self.decode_rows):
                yield tuple(buf[order[start:start + self.decode_rows]] for buf in buffer)

    def _batched(self, blocks, size: int):
        """Blocks regrouped into batches of ``size`` steps (the last one may be smaller)."""
        pending, n = [], 0
        for block in blocks:
            pending.append(block)
            n += len(block[0])
            if n < size:
                continue
            joined = [np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*pending)]
            full = n // size * size
            for start in range(0, full, size):
                yield tuple(part[start:start + size].copy() for part in joined)
            pending, n = ([tuple(part[full:] for part in joined)], n - full) if n > full else ([], 0)
        if pending:
            yield tuple(np.concatenate(parts) for parts in zip(*pending))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, n_workers = self._global_worker()
        epoch = self.epoch
        while True:
            mine = self._pieces(epoch)[worker::n_workers]
            if not mine:  # fewer pieces than workers: this one has nothing to do
                return
            blocks = self._blocks(mine)
            if self.shuffle_buffer > 1:
                blocks = self._shuffled(blocks, np.random.default_rng([self.seed, epoch, worker]))
            if self.batch_size:
                for obs, action, mask in self._batched(blocks, self.batch_size):
                    yield {"obs": torch.from_numpy(obs), "action": torch.from_numpy(action),
                           "action_mask": torch.from_numpy(mask)}
            else:
                for obs, action, mask in blocks:
                    for j in range(len(obs)):  # copies, so that a sample does not pin its whole block
                        yield {"obs": torch.from_numpy(obs[j].copy()), "action": torch.from_numpy(action[j].copy()),
                               "action_mask": torch.from_numpy(mask[j].copy())}
            if not self.repeat:
                return
            epoch += 1
