"""The compact replay buffer returns exactly what a naive (obs, next_obs) buffer would."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from workers.rl.replay import ReplayBuffer

OBS, BIN, ACT = 1144, 979, 39


def fake_obs(rng: np.random.Generator) -> np.ndarray:
    goal = rng.integers(0, 2, BIN).astype(np.float32)
    return np.concatenate([goal, rng.normal(size=OBS - BIN).astype(np.float32)])


def naive_nstep(transitions: list[tuple], t: int, n: int, gamma: float) -> tuple:
    """Reference N-step transition from a plain list of (obs, action, reward, next_obs, term, trunc)."""
    ret, scale = 0.0, 1.0
    for i in range(t, t + n):
        obs, action, reward, next_obs, term, trunc = transitions[i]
        ret += scale * reward
        scale *= gamma
        if term or trunc or i + 1 == len(transitions) or not np.array_equal(transitions[i + 1][0], next_obs):
            break
    return transitions[t][0], transitions[t][1], ret, next_obs, 0.0 if term else scale


def fill(buffer: ReplayBuffer, rng: np.random.Generator, episode_lengths: list[int]):
    """Play fake episodes into the buffer; returns the naive list and row -> transition index."""
    transitions, row_of = [], {}
    for e, length in enumerate(episode_lengths):
        obs = fake_obs(rng)
        for step in range(length):
            action = rng.normal(size=ACT).astype(np.float32)
            reward = float(rng.normal())
            next_obs = fake_obs(rng)
            last = step == length - 1
            term, trunc = last and e % 3 == 0, last and e % 3 == 1  # e % 3 == 2: abandoned episode
            row = buffer.add(obs, action, reward, next_obs, term, trunc)
            row_of[row] = len(transitions)
            transitions.append((obs, action, reward, next_obs, term, trunc))
            obs = next_obs
        if e % 3 == 2:
            buffer.end_episode()
    return transitions, row_of


@pytest.mark.parametrize("n_step", [1, 3])
@pytest.mark.parametrize("capacity", [5, 29, 1000])  # 5, 29 rows: wrap around many times
def test_samples_match_a_naive_buffer_across_episode_ends_and_wraparound(n_step, capacity):
    gamma = 0.9
    rng = np.random.default_rng(n_step * 100 + capacity)
    buffer = ReplayBuffer(OBS, ACT, capacity, discount=gamma, n_step=n_step, binary_dims=BIN, seed=1)
    transitions, row_of = fill(buffer, rng, [5, 1, 7, 3, 12, 2, 4, 9, 6, 1, 8])

    # Every stored transition's row is one whose data is still the latest written there.
    live = {row: t for row, t in row_of.items() if buffer.has_next[row]}
    if capacity < 1000:
        assert buffer.size == capacity and len(live) < len(transitions)
    assert len(buffer) == len(live)
    rows = np.array(sorted(live))
    batch = buffer.get(rows)
    for i, row in enumerate(rows):
        obs, action, ret, next_obs, discount = naive_nstep(transitions, live[row], n_step, gamma)
        np.testing.assert_array_equal(batch.obs[i], obs)
        np.testing.assert_array_equal(batch.action[i], action)
        np.testing.assert_allclose(batch.reward[i], ret, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(batch.next_obs[i], next_obs)
        np.testing.assert_allclose(batch.discount[i], discount, rtol=1e-6)

    # The newest transitions (the tail of the list) are always among the live ones.
    assert live[max(live, key=live.get)] == len(transitions) - 1
    sampled = buffer.sample_rows(500)
    assert set(sampled.tolist()) <= set(live)


def test_nstep_discount_is_zero_only_for_terminations():
    buffer = ReplayBuffer(OBS, ACT, 100, discount=0.5, n_step=4, binary_dims=BIN)
    rng = np.random.default_rng(0)
    transitions, row_of = fill(buffer, rng, [3, 3])  # episode 0 terminates, episode 1 truncates
    rows = sorted(row_of)
    b = buffer.get(np.array(rows))
    np.testing.assert_allclose(b.discount, [0.0, 0.0, 0.0, 0.125, 0.25, 0.5])


def test_bytes_per_transition_under_1100():
    capacity, length = 5 * 551, 550  # exactly five 550-step chunk episodes
    buffer = ReplayBuffer(OBS, ACT, capacity, discount=0.88, binary_dims=BIN)
    rng = np.random.default_rng(0)
    obs = fake_obs(rng)
    action = np.zeros(ACT, np.float32)
    for e in range(5):
        for step in range(length):
            buffer.add(obs, action, 0.0, obs, False, step == length - 1)
    assert buffer.size == capacity and len(buffer) == 5 * length
    per_transition = buffer.nbytes / len(buffer)
    naive = (2 * OBS + ACT + 2) * 4
    print(f"replay bytes/transition: compact {per_transition:.0f}, naive float32 {naive}")
    assert per_transition < 1100
    assert naive / per_transition > 9


def test_non_binary_goal_is_rejected():
    buffer = ReplayBuffer(OBS, ACT, 10, discount=0.9, binary_dims=BIN)
    obs = np.zeros(OBS, np.float32)
    obs[5] = 0.5
    with pytest.raises(ValueError, match="entry 5"):
        buffer.add(obs, np.zeros(ACT), 0.0, np.zeros(OBS), False, False)


@pytest.mark.parametrize("lengths", [[6, 4, 9], [20, 30, 9]])  # partly filled; full and wrapped
def test_state_round_trip_with_weights_only_load(lengths):
    rng = np.random.default_rng(3)
    buffer = ReplayBuffer(OBS, ACT, 50, discount=0.88, n_step=2, binary_dims=BIN, seed=7)
    fill(buffer, rng, lengths)
    blob = io.BytesIO()
    torch.save(buffer.state_dict(), blob)
    blob.seek(0)
    restored = ReplayBuffer(OBS, ACT, 50, discount=0.88, n_step=2, binary_dims=BIN, seed=99)
    restored.load_state_dict(torch.load(blob, weights_only=True))

    a, b = buffer.sample(64), restored.sample(64)  # same RNG state -> same rows
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # Writing continues where it left off: the next add lands on the same row in both.
    obs = fake_obs(rng)
    assert buffer.add(obs, np.zeros(ACT), 1.0, obs, False, False) == \
        restored.add(obs, np.zeros(ACT), 1.0, obs, False, False)

    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(OBS, ACT, 60, discount=0.88, binary_dims=BIN).load_state_dict(buffer.state_dict())
