"""Compact replay memory for piano observations, with N-step returns computed at sample time.

A naive float32 buffer keeps obs and next_obs: 2 x 1144 x 4 bytes, about 9 GB per million
transitions. This one stores each observation once, as one row of a ring:

- the first ``binary_dims`` entries (the 11 x 89 goal, exactly 0 or 1) bit-packed with
  ``np.packbits``: 979 entries -> 123 bytes;
- the other 165 entries (key joints, sustain state, fingertips, hand joints) in float32,
  exactly as the environment produced them (float16 would save 330 more bytes but rounds
  fingertip positions by up to ~0.2 mm, and the budget is met without it);
- the action (float32), reward (float32) and two flags of the transition that starts there.

The next observation of a transition is the following row. When an episode ends its final
next observation takes one extra row that starts no transition, so an episode of T steps
uses T + 1 rows: about 946 bytes per transition for 550-step chunks (under 1 GB per million).

``sample`` draws transitions uniformly and returns the N-step return
``r_t + g r_{t+1} + ... + g^(K-1) r_{t+K-1}``, the observation after the last step used, and
the discount ``g^K`` to apply to its value (0 when the episode terminated), where
``K = min(n_step, steps left in the episode, steps stored so far)``. Episodes that end by
truncation (the end of a chunk is a time limit) keep bootstrapping from their final
observation; only ``terminated`` stops it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from workers.piano.layout import GOAL_BITS, pack_bits, unpack_bits


class Batch(NamedTuple):
    """A batch of (N-step) transitions; all float32 numpy arrays with the batch first."""

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray  # N-step discounted return
    next_obs: np.ndarray  # observation after the last step summed into ``reward``
    discount: np.ndarray  # multiplies the value of ``next_obs``: discount**K, 0 if terminated


class ReplayBuffer:
    """Ring buffer of ``capacity`` rows (one observation each) with bit-packed binary entries.

    Feed it with ``add(obs, action, reward, next_obs, terminated, truncated)`` one environment
    step at a time. Within an episode, ``obs`` must be the previous call's ``next_obs`` (it is
    not stored again); after a call with ``terminated or truncated`` the next call starts a new
    episode. ``end_episode()`` abandons an unfinished episode (its stored steps stay usable).
    """

    _ARRAYS = ("bits", "floats", "action", "reward", "has_next", "terminated")

    def __init__(self, obs_dim: int, action_dim: int, capacity: int, discount: float,
                 n_step: int = 1, binary_dims: int = GOAL_BITS, seed: int = 0):
        if capacity < 2:
            raise ValueError(f"replay capacity must be at least 2 rows, got {capacity}")
        if not 0 <= binary_dims <= obs_dim:
            raise ValueError(f"binary_dims={binary_dims} must lie in [0, obs_dim={obs_dim}]")
        if n_step < 1:
            raise ValueError(f"n_step must be >= 1, got {n_step}")
        self.obs_dim, self.action_dim, self.capacity = obs_dim, action_dim, capacity
        self.binary_dims, self.discount, self.n_step = binary_dims, float(discount), n_step
        self.rng = np.random.default_rng(seed)
        # np.zeros leaves pages untouched until written, so a 1M-row buffer costs only what it holds.
        self.bits = np.zeros((capacity, (binary_dims + 7) // 8), np.uint8)
        self.floats = np.zeros((capacity, obs_dim - binary_dims), np.float32)
        self.action = np.zeros((capacity, action_dim), np.float32)
        self.reward = np.zeros(capacity, np.float32)
        self.has_next = np.zeros(capacity, bool)  # row starts a transition; its next obs is the next row
        self.terminated = np.zeros(capacity, bool)  # that transition ended the episode without bootstrap
        self.cursor = 0  # next row to write
        self.size = 0  # rows written so far, at most capacity
        self.current = -1  # row holding the current observation of an unfinished episode
        self.open = False  # whether an episode is unfinished
        self.transitions_added = 0

    # --- writing -----------------------------------------------------------------------
    def _write_obs(self, obs: np.ndarray) -> int:
        obs = np.asarray(obs, np.float32).reshape(-1)
        if obs.shape[0] != self.obs_dim:
            raise ValueError(f"observation has {obs.shape[0]} entries, the buffer expects {self.obs_dim}")
        goal = obs[: self.binary_dims]
        if not np.all((goal == 0) | (goal == 1)):
            bad = int(np.flatnonzero((goal != 0) & (goal != 1))[0])
            raise ValueError(f"observation entry {bad} = {goal[bad]} is not binary; entries "
                             f"[0:{self.binary_dims}] are stored as bits")
        row = self.cursor
        self.bits[row] = pack_bits(goal)
        self.floats[row] = obs[self.binary_dims:]
        self.has_next[row] = False
        self.terminated[row] = False
        self.cursor = (row + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        return row

    def add(self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray,
            terminated: bool, truncated: bool) -> int:
        """Store one transition; returns the row it starts at (what ``get`` takes)."""
        if not self.open:
            self.current = self._write_obs(obs)
        row = self.current
        self.action[row] = action
        self.reward[row] = reward
        self.terminated[row] = bool(terminated)
        self.current = self._write_obs(next_obs)
        # Mark the row only once its next observation is in place.
        self.has_next[row] = True
        self.open = not (terminated or truncated)
        self.transitions_added += 1
        return row

    def end_episode(self) -> None:
        """Abandon the unfinished episode: its last observation stays as an end row."""
        self.open = False

    # --- reading -----------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of transitions that can be sampled."""
        return int(self.has_next[: self.size].sum())

    @property
    def nbytes(self) -> int:
        """Bytes held by the storage arrays at full capacity."""
        return sum(getattr(self, name).nbytes for name in self._ARRAYS)

    def _obs(self, rows: np.ndarray) -> np.ndarray:
        goal = unpack_bits(self.bits[rows], self.binary_dims)
        return np.concatenate([goal, self.floats[rows]], axis=1)

    def get(self, rows: np.ndarray) -> Batch:
        """The N-step transitions starting at ``rows`` (rows returned by ``add``/``sample``)."""
        rows = np.asarray(rows, np.int64)
        if not np.all(self.has_next[rows]):
            raise IndexError("some rows do not start a stored transition")
        ret = np.zeros(len(rows), np.float32)
        scale = np.ones(len(rows), np.float32)  # discount**k for the k-th reward
        last = rows.copy()  # last row whose reward is in ``ret``
        active = np.ones(len(rows), bool)
        for k in range(self.n_step):
            ret += np.where(active, scale * self.reward[last], 0.0).astype(np.float32)
            scale = np.where(active, scale * self.discount, scale).astype(np.float32)
            if k == self.n_step - 1:
                break
            nxt = (last + 1) % self.capacity
            # Continue only within the episode and into a transition already stored.
            active &= ~self.terminated[last] & self.has_next[nxt]
            last = np.where(active, nxt, last)
        discount = np.where(self.terminated[last], 0.0, scale).astype(np.float32)
        return Batch(obs=self._obs(rows), action=self.action[rows].copy(), reward=ret,
                     next_obs=self._obs((last + 1) % self.capacity), discount=discount)

    def sample_rows(self, batch_size: int) -> np.ndarray:
        """Rows of ``batch_size`` transitions drawn uniformly (with replacement)."""
        if len(self) == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        rows = self.rng.integers(0, self.size, batch_size)
        # Rows that start no transition (episode ends, the current observation) are ~1/T of
        # the buffer, so redrawing them is cheaper than keeping an index of valid rows.
        bad = ~self.has_next[rows]
        while bad.any():
            rows[bad] = self.rng.integers(0, self.size, int(bad.sum()))
            bad = ~self.has_next[rows]
        return rows

    def sample(self, batch_size: int) -> Batch:
        return self.get(self.sample_rows(batch_size))

    # --- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors and plain values only (loads with ``torch.load(weights_only=True)``)."""
        # torch.save writes a view's whole storage: copy a partly filled buffer's rows, but
        # share a full one's arrays (no second gigabyte in memory).
        rows = (lambda a: a) if self.size == self.capacity else (lambda a: a[: self.size].copy())
        state = {name: torch.from_numpy(rows(getattr(self, name))) for name in self._ARRAYS}
        state.update(cursor=self.cursor, size=self.size, current=self.current, open=self.open,
                     transitions_added=self.transitions_added, rng=self.rng.bit_generator.state,
                     shape=[self.obs_dim, self.action_dim, self.capacity, self.binary_dims])
        return state

    def load_state_dict(self, state: dict) -> None:
        expected = [self.obs_dim, self.action_dim, self.capacity, self.binary_dims]
        if list(state["shape"]) != expected:
            raise ValueError(f"replay state has (obs_dim, action_dim, capacity, binary_dims) = "
                             f"{list(state['shape'])}, this buffer has {expected}")
        size = int(state["size"])
        for name in self._ARRAYS:
            array = getattr(self, name)
            array[:size] = state[name].numpy()
            array[size:] = 0
        self.cursor, self.size, self.current = int(state["cursor"]), size, int(state["current"])
        self.open, self.transitions_added = bool(state["open"]), int(state["transitions_added"])
        self.rng.bit_generator.state = state["rng"]
