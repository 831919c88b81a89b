"""OT fingering: the assignment is optimal, the reward follows RP1M eq. 1-2, the env uses it."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from env_fixtures import chord_song, env_config

from workers.piano.env import OBS_SLICES, make_env
from workers.piano.fingering import assign_fingers, ot_distance, ot_reward


def brute_force(fingertips: np.ndarray, keys: np.ndarray) -> float:
    """Smallest total distance over all ways to give min(K, F) keys distinct fingers."""
    cost = np.linalg.norm(keys[:, None] - fingertips[None], axis=-1)
    k, f = cost.shape
    best = math.inf
    if k <= f:
        for fingers in itertools.permutations(range(f), k):
            best = min(best, cost[np.arange(k), list(fingers)].sum())
    else:
        for chosen in itertools.permutations(range(k), f):
            best = min(best, cost[list(chosen), np.arange(f)].sum())
    return best


@pytest.mark.parametrize("n_fingers,n_keys", [(10, 1), (10, 2), (10, 4), (6, 5), (8, 8), (4, 6), (3, 7)])
def test_assignment_is_optimal_against_brute_force(n_fingers, n_keys):
    rng = np.random.default_rng(n_fingers * 100 + n_keys)
    for _ in range(5):
        tips = rng.uniform(-0.2, 0.2, size=(n_fingers, 3))
        keys = rng.uniform(-0.2, 0.2, size=(n_keys, 3))
        fingers, key_rows, distances = assign_fingers(tips, keys)
        assert len(fingers) == min(n_fingers, n_keys)
        assert len(set(fingers.tolist())) == len(fingers)  # distinct fingers
        assert len(set(key_rows.tolist())) == len(key_rows)  # distinct keys
        np.testing.assert_allclose(distances, np.linalg.norm(tips[fingers] - keys[key_rows], axis=-1))
        assert distances.sum() == pytest.approx(brute_force(tips, keys), abs=1e-12)


def test_each_key_goes_to_the_finger_above_it():
    # Ten fingertips spread along the keyboard, each 1 mm above one of ten keys, shuffled.
    keys = np.stack([np.linspace(-0.3, 0.3, 10), np.zeros(10), np.zeros(10)], axis=1)
    order = np.random.default_rng(0).permutation(10)
    tips = keys[order] + [0.0, 0.0, 0.001]
    fingers, key_rows, distances = assign_fingers(tips, keys[[2, 7, 5]])
    assert dict(zip(key_rows.tolist(), fingers.tolist())) == {
        0: int(np.flatnonzero(order == 2)[0]),
        1: int(np.flatnonzero(order == 7)[0]),
        2: int(np.flatnonzero(order == 5)[0]),
    }
    np.testing.assert_allclose(distances, 0.001)


def test_more_keys_than_fingers_picks_the_closest_keys():
    tips = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    keys = np.array([[5.0, 0, 0], [0.01, 0, 0], [0.98, 0, 0], [-3.0, 0, 0]])
    fingers, key_rows, distances = assign_fingers(tips, keys)
    assert sorted(zip(fingers.tolist(), key_rows.tolist())) == [(0, 1), (1, 2)]
    np.testing.assert_allclose(sorted(distances), [0.01, 0.02])


def test_no_keys_no_assignment():
    fingers, key_rows, distances = assign_fingers(np.zeros((10, 3)), np.zeros((0, 3)))
    assert fingers.size == key_rows.size == distances.size == 0
    assert ot_distance(distances) == 0.0


def test_ot_distance_is_total_or_mean():
    d = np.array([0.01, 0.02, 0.06])
    assert ot_distance(d, "sum") == pytest.approx(0.09)
    assert ot_distance(d, "mean") == pytest.approx(0.03)
    with pytest.raises(ValueError, match="reduction"):
        ot_distance(d, "max")


def test_ot_reward_follows_rp1m():
    threshold = 0.01
    margin = 10 * threshold
    assert ot_reward(0.0, threshold) == 1.0
    assert ot_reward(0.0099, threshold) == 1.0
    assert ot_reward(threshold + margin, threshold) == pytest.approx(0.1)  # dm_control's value_at_margin
    c = math.log(0.1) / margin**2  # exp(c * (d - 0.01)^2)
    for d in (0.011, 0.02, 0.05, 0.3):
        assert ot_reward(d, threshold) == pytest.approx(math.exp(c * (d - threshold) ** 2), rel=1e-12)
    values = [ot_reward(d, threshold) for d in np.linspace(0.01, 0.5, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.fixture(scope="module")
def env():
    return make_env(chord_song(), env_config(), seed=0)


def landing_points(env, keys: np.ndarray) -> np.ndarray:
    """Where a fingertip should land on each key, as RoboPianist's fingering reward has it."""
    key_geoms = env.task.piano.keys
    bound = env.environment.physics.bind([key_geoms[k].geom[0] for k in keys])
    pos = bound.xpos.copy()
    pos[:, 0] += 0.35 * bound.size[:, 0]
    pos[:, 2] += 0.5 * bound.size[:, 2]
    return pos


def matched_distances(env, obs, info) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(observed fingertips, landing points of the target keys, distances of info's pairs)."""
    target = np.flatnonzero(info["target"])
    tips = obs[OBS_SLICES["fingertips"]].reshape(10, 3).astype(np.float64)
    points = landing_points(env, target)
    rows = {k: i for i, k in enumerate(target.tolist())}
    pairs = np.array([np.linalg.norm(points[rows[k]] - tips[f]) for f, k in info["ot_assignment"]])
    return tips, points, pairs


def test_env_reward_term_is_ot_on_fingertips_and_keys(env):
    """Recompute d_OT and r_OT from the observation's fingertips and the key geometry."""
    threshold = env_config().reward.ot_distance_threshold
    rng = np.random.default_rng(5)
    env.reset()
    done, saw_cluster, saw_rest, checked_optimal = False, False, False, 0
    while not done:
        obs, _, _, done, info = env.step(rng.uniform(env.action_low, env.action_high))
        target = np.flatnonzero(info["target"])
        assignment = info["ot_assignment"]
        if target.size == 0:
            saw_rest = True
            assert assignment == [] and info["reward_terms"]["ot_fingering_reward"] == 0.0
            continue
        fingers = [f for f, _ in assignment]
        assert len(set(fingers)) == len(fingers) == min(target.size, 10)
        assert {k for _, k in assignment} <= set(target.tolist())
        saw_cluster |= target.size > 10
        tips, points, pairs = matched_distances(env, obs, info)
        assert info["ot_distance"] == pytest.approx(pairs.sum(), abs=1e-5)  # RP1M: total distance
        if target.size <= 4:
            assert pairs.sum() == pytest.approx(brute_force(tips, points), abs=1e-5)
            checked_optimal += 1
        assert info["reward_terms"]["ot_fingering_reward"] == pytest.approx(
            ot_reward(info["ot_distance"], threshold), abs=1e-9
        )
    assert saw_cluster and saw_rest and checked_optimal > 10


def test_env_mean_reduction_averages_over_keys():
    env = make_env(chord_song(), env_config("env.reward.ot_reduction=mean"), seed=0)
    rng = np.random.default_rng(6)
    env.reset()
    done, chords = False, 0
    while not done:
        obs, _, _, done, info = env.step(rng.uniform(env.action_low, env.action_high))
        if info["ot_assignment"]:
            _, _, pairs = matched_distances(env, obs, info)
            assert info["ot_distance"] == pytest.approx(pairs.mean(), abs=1e-6)
            chords += len(pairs) > 1
    assert chords > 0
