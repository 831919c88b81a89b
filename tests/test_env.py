"""The RP1M piano environment: layout of the observation, reward terms, four-finger hands,
episode ends, the gymnasium API, and the lean backend against RoboPianist's own stepping."""

from __future__ import annotations

import subprocess
import sys
import warnings

import gymnasium
import numpy as np
import pytest
from mujoco_utils import collision_utils
from robopianist.models.piano.piano import _KEY_THRESHOLD

from env_fixtures import TWINKLE, KeyPresser, chord_song, env_config, oracle_ish_keys, random_song, twinkle
from workers.piano import env as piano_env
from workers.piano.env import BACKENDS, ENV_ID, OBS_SLICES, make_env
from unit_fixtures import ffprobe
from workers.rl.replay import ReplayBuffer

TERMS = {"key_press_reward", "sustain_reward", "energy_reward", "ot_fingering_reward", "collision_reward"}


@pytest.fixture(scope="module", params=BACKENDS)
def env(request):
    return make_env(chord_song(), env_config(), seed=0, backend=request.param)


@pytest.fixture(scope="module")
def four_finger_env():
    return make_env(chord_song(), env_config("env.four_fingers=true"), seed=0)


def expected_pressed(env) -> np.ndarray:
    """Keys sounding in the physics now: RoboPianist's rule on the key joints."""
    joints = env.environment.physics.bind(env.task.piano.joints)
    low, high = joints.range.T
    return np.abs(np.clip(joints.qpos, low, high) - high) <= _KEY_THRESHOLD


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
    assert env.observation_space.shape == (1144,) and env.action_space.shape == (39,)
    np.testing.assert_array_equal(env.action_space.low, env.action_low)
    obs, info = env.reset()
    assert obs.dtype == np.float32 and obs.shape == (1144,) and info == {}
    # The human fingering is neither observed nor rewarded.
    assert "fingering" not in env.environment.observation_spec()
    reward_cfg = env_config().reward
    assert env.reward.weights == {**dict.fromkeys(TERMS, 1.0), "energy_reward": reward_cfg.energy_coef,
                                  "collision_reward": reward_cfg.collision_coef}


def test_observation_slices_hold_what_they_say(env):
    task, physics = env.task, env.environment.physics
    notes, sustains = task._notes, task._sustains
    presser, rng = KeyPresser(env.environment), np.random.default_rng(1)
    (obs, _), done, t, deepest, sustain = env.reset(), False, 0, 0.0, 0.0
    while not done:
        goal = obs[OBS_SLICES["piano_goal"]].reshape(11, 88)
        sustain_goal = obs[OBS_SLICES["sustain_goal"]]
        # The goal is the song from this step on, 10 steps ahead, zero past its end.
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
        assert obs[OBS_SLICES["sustain_state"]][0] == np.float32(sustain)  # the last action's pedal value
        tips = np.concatenate([physics.bind(h.fingertip_sites).xpos.ravel() for h in task.hands])
        np.testing.assert_array_equal(obs[OBS_SLICES["fingertips"]], tips.astype(np.float32))
        joints = np.concatenate([physics.bind(h.joints).qpos for h in task.hands])
        np.testing.assert_array_equal(obs[OBS_SLICES["hand_joints"]], joints.astype(np.float32))

        deepest = max(deepest, float(obs[OBS_SLICES["key_joints"]].max()))
        presser.press(oracle_ish_keys(goal[0], rng))  # move some keys so key joints are not all 0
        action = rng.uniform(env.action_low, env.action_high)
        sustain = action[-1]
        obs, _, _, done, _ = env.step(action)
        t += 1
    presser.press([])
    assert t == env.n_steps == len(notes)
    assert deepest > 0.9  # pressed keys showed up in the key-joint slice


def test_info_describes_the_step(env):
    task = env.task
    presser, rng = KeyPresser(env.environment), np.random.default_rng(2)
    (obs, _), done, t = env.reset(), False, 0
    while not done:
        presser.press(oracle_ish_keys(obs[:88], rng))
        action = rng.uniform(env.action_low, env.action_high)
        obs, reward, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        expected_target = np.zeros(88, dtype=bool)
        expected_target[[n.key for n in task._notes[t]]] = True
        np.testing.assert_array_equal(info["target"], expected_target)
        np.testing.assert_array_equal(info["pressed"], expected_pressed(env))
        assert info["sustain_target"] == bool(task._sustains[t])
        assert info["sustain_pressed"] == (action[-1] >= 0.5)
        assert set(info["reward_terms"]) == TERMS
        assert reward == pytest.approx(sum(info["reward_terms"].values()), abs=1e-12)
        # The end of the chunk is a time limit, never a termination.
        assert not terminated and truncated == (t == env.n_steps - 1)
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
    _, _, _, _, info = env.step(rng.uniform(env.action_low, env.action_high))
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
        _, _, _, _, info = env.step(action)
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
            obs, _, _, done, info = env.step(action)
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
        _, reward, _, done, info = env.step(rng.uniform(env.action_low, env.action_high))
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
    with pytest.raises(ValueError, match="backend 'mujoco'"):
        make_env(chord_song(), env_config(), backend="mujoco")


def test_episode_length_equals_planned_chunk_length():
    """Chunks come trimmed from the song loader; the env must not trim them again."""
    from workers.piano.music import load_song, plan_chunks

    cfg = env_config()
    song = load_song(TWINKLE.parent / "nocturne-trimmed.mid")
    plan = plan_chunks(song, cfg)
    chunk = plan.chunks[0]
    env = make_env(chunk.midi, cfg, seed=0)
    assert env.n_steps == chunk.n_steps == cfg.chunk_steps


# --- the reward: each term defined once (workers.piano.reward) -----------------------------------
def test_reward_terms_are_robopianists_own(env):
    """RoboPianist's own key press, sustain and energy terms, called on the task after each step,
    give the values of the terms both backends share (``workers.piano.reward``)."""
    if env.backend != "robopianist":
        pytest.skip("RoboPianist's piano state follows dm_control's stepping only")
    from robopianist.suite.tasks.piano_with_shadow_hands import PianoWithShadowHands as Upstream

    task, physics = env.task, env.environment.physics
    presser, rng = KeyPresser(env.environment), np.random.default_rng(8)
    (obs, _), done, pressing = env.reset(), False, 0
    while not done:
        presser.press(oracle_ish_keys(obs[:88], rng))
        obs, _, _, done, info = env.step(rng.uniform(env.action_low, env.action_high))
        terms = info["reward_terms"]
        assert terms["key_press_reward"] == pytest.approx(Upstream._compute_key_press_reward(task, physics), abs=1e-12)
        assert terms["sustain_reward"] == pytest.approx(Upstream._compute_sustain_reward(task, physics), abs=1e-12)
        assert terms["energy_reward"] == pytest.approx(Upstream._compute_energy_reward(task, physics), rel=1e-12)
        pressing += info["pressed"].any()
    presser.press([])
    assert pressing > 0


def _bonus_rewards(backend: str) -> list[tuple[float, dict]]:
    env = make_env(chord_song(), env_config(), seed=0, backend=backend)
    presser, rng = KeyPresser(env.environment), np.random.default_rng(9)
    obs, _ = env.reset()
    steps = []
    for _ in range(12):
        presser.press(oracle_ish_keys(obs[:88], rng))
        obs, reward, _, _, info = env.step(rng.uniform(env.action_low, env.action_high))
        steps.append((reward, info))
    presser.press([])
    env.close()
    return steps


def test_a_term_added_once_reaches_both_backends(monkeypatch):
    """A term added to ``workers.piano.reward.TERMS`` alone is summed by both backends."""
    from workers.piano import reward

    bonus = reward.Term("pressed_keys_bonus", lambda s, cfg: float(s.pressed.sum()), 0.25)
    monkeypatch.setattr(reward, "TERMS", reward.TERMS + (bonus,))
    runs = {b: _bonus_rewards(b) for b in BACKENDS}
    for (reward_a, info_a), (reward_b, info_b) in zip(runs["lean"], runs["robopianist"]):
        for reward_value, info in ((reward_a, info_a), (reward_b, info_b)):
            assert list(info["reward_terms"]) == [t.name for t in reward.TERMS]
            assert info["reward_terms"]["pressed_keys_bonus"] == 0.25 * info["pressed"].sum()
            assert reward_value == pytest.approx(sum(info["reward_terms"].values()), abs=1e-12)
        assert reward_a == pytest.approx(reward_b, abs=1e-12)
    assert any(info["pressed"].any() for _, info in runs["lean"])


def test_backends_whose_terms_differ_are_refused(monkeypatch):
    from workers.piano import lean, reward

    heavier = tuple(reward.Term(t.name, t.fn, 2.0) if t.name == "sustain_reward" else t for t in reward.TERMS)
    monkeypatch.setattr(lean, "Reward", lambda cfg: reward.Reward(cfg, heavier))
    with pytest.raises(ValueError, match=r"'lean' backend's reward terms .*'sustain_reward': 2\.0.* differ from the task's"):
        make_env(chord_song(), env_config(), backend="lean")


# --- both backends step the same trajectories --------------------------------------------------
def _play(env, seed: int, policy: str) -> list[tuple]:
    """One episode from ``reset(seed=seed)``: actions drawn from ``seed``; with the ``scripted``
    policy keys pushed down too (most right ones, sometimes a wrong one)."""
    rng = np.random.default_rng(seed)
    presser = KeyPresser(env.environment)
    obs, _ = env.reset(seed=seed)
    out, done = [(obs,)], False
    while not done:
        presser.press(oracle_ish_keys(obs[:88], rng) if policy == "scripted" else [])
        obs, reward, terminated, truncated, info = env.step(rng.uniform(env.action_low, env.action_high))
        done = terminated or truncated
        out.append((obs, reward, terminated, truncated, info))
    presser.press([])
    return out


SONGS = {"chord": chord_song, "generated": lambda: random_song(seed=3), "twinkle": lambda: twinkle(seconds=2.5)}


@pytest.mark.parametrize("song,overrides", [("chord", ()), ("generated", ()), ("twinkle", ()),
                                            ("twinkle", ("env.four_fingers=true",))])
def test_lean_backend_steps_the_same_trajectories_as_robopianist(song, overrides):
    """Observations, key presses, F1 and episode ends equal; reward terms within 1e-12.

    One documented difference: after the last step of a chunk RoboPianist's goal update skips
    the step past the end and leaves the previous window in the observation; the lean backend
    gives the true window (all zeros). The chunks are short (51-81 steps): each case (a song,
    five- or four-finger hands) x two policies x two seeds x two backends builds and steps in
    about 6 s of CPU.
    """
    envs = {b: make_env(SONGS[song](), env_config(*overrides), seed=0, backend=b) for b in BACKENDS}
    goal = slice(0, OBS_SLICES["sustain_goal"].stop)
    compared, stale = 0, 0
    for policy in ("random", "scripted"):
        for seed in (0, 1):
            runs = {b: _play(env, seed, policy) for b, env in envs.items()}
            lean, ref = runs["lean"], runs["robopianist"]
            assert len(lean) == len(ref)
            np.testing.assert_array_equal(lean[0][0], ref[0][0])
            for t, (a, b) in enumerate(zip(lean[1:], ref[1:])):
                obs_a, reward_a, term_a, trunc_a, info_a = a
                obs_b, reward_b, term_b, trunc_b, info_b = b
                assert (term_a, trunc_a) == (term_b, trunc_b)
                if trunc_a:  # the documented difference
                    np.testing.assert_array_equal(obs_a[goal], 0.0)
                    np.testing.assert_array_equal(obs_a[goal.stop:], obs_b[goal.stop:])
                    stale += bool(obs_b[goal].any())
                else:
                    np.testing.assert_array_equal(obs_a, obs_b, err_msg=f"{song} {policy} seed {seed} step {t}")
                assert reward_a == pytest.approx(reward_b, abs=1e-12)
                for name, value in info_b["reward_terms"].items():
                    assert info_a["reward_terms"][name] == pytest.approx(value, abs=1e-12), (name, t)
                for key in ("pressed", "target"):
                    np.testing.assert_array_equal(info_a[key], info_b[key])
                for key in ("sustain_pressed", "sustain_target", "precision", "recall", "f1", "ot_assignment"):
                    assert info_a[key] == info_b[key], (key, t)
                assert info_a["ot_distance"] == pytest.approx(info_b["ot_distance"], abs=1e-12)
                compared += 1
            assert envs["lean"].episode_metrics() == envs["robopianist"].episode_metrics()
            if policy == "scripted":
                assert any(step[4]["pressed"].any() for step in lean[1:])  # keys did sound
    assert compared > 150
    assert stale == (0 if song == "chord" else 4)  # chord_song ends on a rest: no stale goal to see
    for env in envs.values():
        env.close()
        env.close()  # closing twice is allowed (gymnasium)


# --- episode ends ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_press_terminates_and_the_learner_does_not_bootstrap(backend):
    """``env.wrong_press_termination``: a wrong key ends the episode as ``terminated`` at that
    step (RoboPianist's own time step there still carries discount 1.0); the replay buffer, fed
    as the specialist feeds it, gives that transition discount 0 and a chunk end discount g."""
    env = make_env(chord_song(), env_config("env.wrong_press_termination=true"), seed=0, backend=backend)
    presser = KeyPresser(env.environment)
    buffer = ReplayBuffer(env.obs_dim, env.action_dim, 200, discount=0.5)
    obs, _ = env.reset()
    wrong_at, t, ended = 5, 0, False
    while not ended:
        # Silence until step 5, then a key no step of the song asks for (A0).
        presser.press([0] if t >= wrong_at else [])
        next_obs, reward, terminated, truncated, info = env.step(np.zeros(39))
        ended = terminated or truncated
        row = buffer.add(obs, np.zeros(39), reward, next_obs, terminated, truncated)
        obs, t = next_obs, t + 1
    presser.press([])
    # The key needs a step or two to go down; the step it sounds is the last one.
    assert terminated and not truncated and info["pressed"][0] and not info["target"][0]
    assert wrong_at < t <= wrong_at + 3
    assert buffer.get(np.array([row])).discount[0] == 0.0
    assert buffer.get(np.array([row - 1])).discount[0] == 0.5
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(39))

    buffer = ReplayBuffer(env.obs_dim, env.action_dim, 200, discount=0.5)
    obs, _ = env.reset()
    ended = False
    while not ended:  # the hands at rest press nothing: the chunk runs to its end
        next_obs, reward, terminated, truncated, _ = env.step(np.zeros(39))
        ended = terminated or truncated
        row = buffer.add(obs, np.zeros(39), reward, next_obs, terminated, truncated)
        obs = next_obs
    assert truncated and not terminated
    assert buffer.get(np.array([row])).discount[0] == 0.5  # bootstraps through the time limit


# --- gymnasium ---------------------------------------------------------------------------------
def test_gymnasium_make_and_the_environment_checker():
    from gymnasium.utils.env_checker import check_env

    env = gymnasium.make(ENV_ID, midi=chord_song(), env_cfg=env_config())
    assert isinstance(env.unwrapped, piano_env.PianoEnv) and env.unwrapped.backend == "lean"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped, skip_render_check=True)
    # Two remarks only: RP1M's action ranges are the actuators' own, not normalised to [-1, 1];
    # fingertip and joint positions have no hard bounds (MuJoCo's joint limits are soft).
    remarks = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert all("symmetric and normalized" in m or "value is infinity" in m or "value is -infinity" in m
               for m in remarks), remarks
    obs, _ = env.reset(seed=5)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs) and isinstance(reward, float) and "f1" in info
    env.close()

    from_file = gymnasium.make(ENV_ID, midi=str(TWINKLE), chunk=0, env_cfg=env_config("env.chunk_steps=40"),
                               backend="robopianist")
    assert from_file.unwrapped.backend == "robopianist" and from_file.unwrapped.n_steps == 40
    from_file.close()


def test_importing_workers_piano_registers_the_environment_without_loading_mujoco():
    code = ("import sys, gymnasium, workers.piano; spec = gymnasium.spec('pianoforge/Piano-v0'); "
            "assert spec.entry_point == 'workers.piano.env:make_gym_env', spec; "
            "assert 'mujoco' not in sys.modules and 'robopianist' not in sys.modules")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr


@pytest.fixture(scope="module")
def rgb_env():
    env = gymnasium.make(ENV_ID, midi=chord_song(), env_cfg=env_config(), render_mode="rgb_array")
    yield env
    env.close()


def test_gymnasium_rendering_and_episode_length(rgb_env, tmp_path):
    env = rgb_env
    piano = env.unwrapped
    assert env.metadata["render_modes"] == ["rgb_array"] and env.render_mode == "rgb_array"
    assert env.metadata["render_fps"] == round(1 / env_config().control_timestep)
    assert env.spec.max_episode_steps == piano.n_steps == 81  # the chunk's own length
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (480, 640, 3) and frame.dtype == np.uint8 and frame.std() > 10  # a picture, not a blank
    with pytest.raises(ValueError, match="render_mode .depth_array."):
        gymnasium.make(ENV_ID, midi=chord_song(), env_cfg=env_config(), render_mode="depth_array")

    # gymnasium's RecordVideo records an episode (a short chunk: a clip of every step).
    short = gymnasium.make(ENV_ID, midi=str(TWINKLE), chunk=0, env_cfg=env_config("env.chunk_steps=6"),
                           render_mode="rgb_array")
    assert short.spec.max_episode_steps == 6
    recorder = gymnasium.wrappers.RecordVideo(short, str(tmp_path / "videos"), episode_trigger=lambda e: True,
                                              disable_logger=True)
    recorder.reset(seed=0)
    truncated = False
    while not truncated:
        _, _, _, truncated, _ = recorder.step(np.zeros(39))
    recorder.close()
    # "human": gymnasium's own window around the rgb_array frames (it opens one where a display is).
    human = gymnasium.make(ENV_ID, midi=str(TWINKLE), chunk=0, env_cfg=env_config("env.chunk_steps=6"), render_mode="human")
    assert isinstance(human, gymnasium.wrappers.HumanRendering) and human.render_mode == "human"
    assert human.unwrapped.render_mode == "rgb_array"
    human.unwrapped.close()
    clips = list((tmp_path / "videos").glob("*.mp4"))
    assert len(clips) == 1
    assert int(ffprobe(clips[0])["video"]["nb_read_frames"]) == 6 + 1  # the reset's frame, then one per step
