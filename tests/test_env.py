"""The RP1M piano environment: layout of the observation, reward terms, four-finger hands."""

from __future__ import annotations

import numpy as np
import pytest
from mujoco_utils import collision_utils

from env_fixtures import TWINKLE, KeyPresser, chord_song, env_config, oracle_ish_keys, twinkle
from workers.piano import env as piano_env
from workers.piano.env import OBS_SLICES, make_env

TERMS = {"key_press_reward", "sustain_reward", "energy_reward", "ot_fingering_reward", "collision_reward"}


@pytest.fixture(scope="module")
def env():
    return make_env(chord_song(), env_config(), seed=0)


@pytest.fixture(scope="module")
def four_finger_env():
    return make_env(chord_song(), env_config("env.four_fingers=true"), seed=0)


def test_rp1m_sizes_and_layout(env):
    assert env.obs_dim == piano_env.OBS_DIM == 1144
    assert env.action_dim == piano_env.ACTION_DIM == 39
    assert env.obs_slices == OBS_SLICES
    starts = sorted((s.start, s.stop) for s in OBS_SLICES.values())
    assert starts[0][0] == 0 and starts[-1][1] == 1144
    assert all(a[1] == b[0] for a, b in zip(starts, starts[1:]))  # contiguous, no gaps
    assert env.action_low.shape == env.action_high.shape == (39,)
    assert np.all(env.action_low < env.action_high)
    assert "sustain" in env.action_names[-1]
    obs = env.reset()
    assert obs.dtype == np.float32 and obs.shape == (1144,)
    # The human fingering is neither observed nor rewarded.
    assert "fingering" not in env.environment.observation_spec()
    assert env.task.reward_fn.reward_fns.keys() == TERMS


def test_observation_slices_hold_what_they_say(env):
    task, physics = env.task, env.environment.physics
    notes, sustains = task._notes, task._sustains
    presser, rng = KeyPresser(env.environment), np.random.default_rng(1)
    obs, done, t, deepest = env.reset(), False, 0, 0.0
    while not done:
        goal = obs[OBS_SLICES["piano_goal"]].reshape(11, 88)
        sustain_goal = obs[OBS_SLICES["sustain_goal"]]
        # The goal is the task's own goal observable with the sustain column split off ...
        np.testing.assert_array_equal(goal, task._goal_state[:, :88])
        np.testing.assert_array_equal(sustain_goal, task._goal_state[:, 88])
        # ... which is the song from this step on, 10 steps ahead, zero past its end.
        for i in range(11):
            expected = np.zeros(88)
            if t + i < len(notes):
                expected[[n.key for n in notes[t + i]]] = 1.0
            np.testing.assert_array_equal(goal[i], expected)
            assert sustain_goal[i] == (sustains[t + i] if t + i < len(notes) else 0.0)
        assert set(np.unique(obs[:979])) <= {0.0, 1.0}

        key_qpos = physics.bind(task.piano.joints).qpos
        key_range = physics.bind(task.piano.joints).range
        np.testing.assert_allclose(
            obs[OBS_SLICES["key_joints"]], np.clip(key_qpos, *key_range.T) / key_range[:, 1], rtol=1e-6, atol=1e-7
        )
        np.testing.assert_array_equal(obs[OBS_SLICES["sustain_state"]], task.piano.sustain_state.astype(np.float32))
        tips = np.concatenate([physics.bind(h.fingertip_sites).xpos.ravel() for h in task.hands])
        np.testing.assert_array_equal(obs[OBS_SLICES["fingertips"]], tips.astype(np.float32))
        joints = np.concatenate([physics.bind(h.joints).qpos for h in task.hands])
        np.testing.assert_array_equal(obs[OBS_SLICES["hand_joints"]], joints.astype(np.float32))

        deepest = max(deepest, float(obs[OBS_SLICES["key_joints"]].max()))
        presser.press(oracle_ish_keys(goal[0], rng))  # move some keys so key joints are not all 0
        obs, _, done, _ = env.step(rng.uniform(env.action_low, env.action_high))
        t += 1
    presser.press([])
    assert t == env.n_steps == len(notes)
    assert deepest > 0.9  # pressed keys showed up in the key-joint slice


def test_info_describes_the_step(env):
    task = env.task
    presser, rng = KeyPresser(env.environment), np.random.default_rng(2)
    obs, done, t = env.reset(), False, 0
    while not done:
        presser.press(oracle_ish_keys(obs[:88], rng))
        obs, reward, done, info = env.step(rng.uniform(env.action_low, env.action_high))
        expected_target = np.zeros(88, dtype=bool)
        expected_target[[n.key for n in task._notes[t]]] = True
        np.testing.assert_array_equal(info["target"], expected_target)
        np.testing.assert_array_equal(info["pressed"], task.piano.activation)
        assert info["sustain_target"] == bool(task._sustains[t])
        assert info["sustain_pressed"] == bool(task.piano.sustain_activation[0])
        assert set(info["reward_terms"]) == TERMS
        assert reward == pytest.approx(sum(info["reward_terms"].values()), abs=1e-12)
        assert info["discount"] == 1.0
        t += 1
    presser.press([])
    assert done and t == env.n_steps
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(39))


def test_rejects_bad_actions(env):
    env.reset()
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(38))
    bad = np.zeros(39)
    bad[3] = np.nan
    with pytest.raises(ValueError, match=r"non-finite entries at \[3\]"):
        env.step(bad)


def test_energy_term_uses_configured_coefficient(env):
    env.reset()
    rng = np.random.default_rng(3)
    _, _, _, info = env.step(rng.uniform(env.action_low, env.action_high))
    power = sum(np.sum(h.observables.actuators_power(env.environment.physics)) for h in env.task.hands)
    assert power > 0
    coef = env_config().reward.energy_coef
    assert info["reward_terms"]["energy_reward"] == pytest.approx(-coef * power, rel=1e-9)


def test_collision_term_matches_contacts_between_the_hands(env):
    """Drive both forearms towards the middle until the hands touch."""
    task = env.task
    right_geoms = [g.full_identifier for g in task.right_hand.mjcf_model.find_all("geom")]
    left_geoms = [g.full_identifier for g in task.left_hand.mjcf_model.find_all("geom")]
    tx = [i for i, n in enumerate(env.action_names) if n.endswith("forearm_tx")]
    coef = env_config().reward.collision_coef
    env.reset()
    seen = set()
    for gap in np.linspace(0.0, 0.25, 8):
        action = np.zeros(39)
        action[tx] = (-gap, gap)  # right hand moves left, left hand moves right
        _, _, _, info = env.step(action)
        touching = collision_utils.has_collision(env.environment.physics, right_geoms, left_geoms)
        assert info["reward_terms"]["collision_reward"] == (0.0 if touching else coef)
        seen.add(touching)
    assert seen == {False, True}


def test_four_finger_hands_hold_the_little_fingers(four_finger_env):
    env = four_finger_env
    assert env.action_dim == 39 and env.obs_dim == 1144
    held = np.flatnonzero(~env.active_actions)
    assert len(held) == 6
    assert all("LFJ" in env.action_names[i] for i in held)
    assert not any("LFJ" in n for i, n in enumerate(env.action_names) if env.active_actions[i])

    def rollout(little_finger_values: float) -> list[np.ndarray]:
        rng = np.random.default_rng(4)
        env.reset()
        done, seen = False, []
        while not done:
            action = rng.uniform(env.action_low, env.action_high)
            action[held] = little_finger_values
            obs, _, done, info = env.step(action)
            seen.append(obs)
            assert all(finger not in (4, 9) for finger, _ in info["ot_assignment"])
            target = np.flatnonzero(info["target"])
            assert len(info["ot_assignment"]) == min(len(target), 8)
        return seen

    low = rollout(-0.5)
    high = rollout(3.0)
    # What the policy sends to the little fingers changes nothing.
    np.testing.assert_array_equal(np.stack(low), np.stack(high))
    # The little fingers stay curled: their joints end at the hold posture, not at rest (0).
    little_joints = [
        i for i, j in enumerate(j for h in env.task.hands for j in h.joints) if "LFJ1" in j.name or "LFJ3" in j.name
    ]
    assert np.all(low[-1][OBS_SLICES["hand_joints"]][little_joints] > 0.5)


def test_five_finger_env_uses_all_action_entries(env):
    assert env.active_actions.all()


def test_real_song_builds_and_runs():
    """A trimmed real song (Twinkle Twinkle) with trim_silence, as the specialist uses it."""
    env = make_env(twinkle(seconds=2.0), env_config(), seed=7)
    rng = np.random.default_rng(0)
    env.reset()
    done, steps = False, 0
    while not done:
        _, reward, done, info = env.step(rng.uniform(env.action_low, env.action_high))
        assert np.isfinite(reward)
        steps += 1
    assert steps == env.n_steps and 30 <= steps <= 45  # 2 s of music at 20 Hz
    metrics = env.episode_metrics()
    assert set(metrics) == {"precision", "recall", "f1"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    env.reset()
    with pytest.raises(ValueError, match="no step"):
        env.episode_metrics()


def test_song_without_notes_is_refused():
    from note_seq.protobuf import music_pb2
    from robopianist.music.midi_file import MidiFile

    with pytest.raises(ValueError, match="no notes"):
        make_env(MidiFile(seq=music_pb2.NoteSequence()), env_config())


def test_episode_length_equals_planned_chunk_length():
    """Chunks come trimmed from the song loader; the env must not trim them again."""
    from workers.piano.music import load_song, plan_chunks

    cfg = env_config()
    song = load_song(TWINKLE.parent / "nocturne-trimmed.mid")
    plan = plan_chunks(song, cfg)
    chunk = plan.chunks[0]
    env = make_env(chunk.midi, cfg, seed=0)
    assert env.n_steps == chunk.n_steps == cfg.chunk_steps
