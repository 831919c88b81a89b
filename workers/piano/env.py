"""The RP1M piano environment: RoboPianist's two Shadow hands with OT fingering.

``make_env(midi, env_cfg, seed)`` builds RoboPianist's ``PianoWithShadowHands`` with RP1M's
settings from ``configs.EnvConfig`` (lookahead 10, gravity compensation, 0.05 s control
step, trimmed silence, reduced 39-d action space, capsule fingertip colliders, no human
fingering in the observation or the reward) and wraps it as a ``PianoEnv``: a
``gymnasium.Env`` with flat float32 observations (``workers.piano.layout``) and 39-d actions,
registered as ``pianoforge/Piano-v0`` by importing :mod:`workers.piano`
(``gymnasium.make(ENV_ID, midi=..., render_mode="rgb_array")``; rendering: :mod:`workers.piano.view`).

Two backends step the same compiled MuJoCo model:

    lean         (default, ``workers.piano.lean``) runs the physics substeps with MuJoCo
                 directly and computes key states, observation, reward terms and F1 once per
                 control step from MjData arrays: ~0.8 of raw ``mj_step`` speed, about twice
                 the steps per second of
    robopianist  dm_control's composer loop with RoboPianist's per-substep hooks (what
                 RP1M ran). Kept as the reference: both give the same trajectories
                 (``tests/test_env.py``; the one difference is the goal in the observation
                 after a chunk's last step, see ``workers.piano.lean``).

Reward (RP1M eq. 3): the terms of ``workers.piano.reward`` (key press, sustain, energy, OT
fingering, hand collision), defined once there for both backends; their weighted values are in
``info["reward_terms"]`` and add up to the reward. ``make_env`` refuses a backend whose terms
differ from its task's by name or weight.

Episode end: the last step of the chunk is a time limit (``truncated``: a learner bootstraps
through it); with ``env.wrong_press_termination`` a step that sounds a key that should not
sound ends the episode as ``terminated`` (no bootstrap).

Four-finger hands (``env_cfg.four_fingers``, RP1M's cross-embodiment experiment): the
action stays 39-d so that policies, the lake and the imitation learner keep one shape,
but the three little-finger actions of each hand (LFJ4, LFJ3, LFJ0; ``PianoEnv.active_actions``
is False there) are overwritten before every step so the little fingers stay curled under
the palm (flexion at the top of its range, no abduction), clear of the keys; the OT
matching never uses them. The observation is unchanged (their joints and tips are still
observed; they just do not move).

Cost: ``make_env`` takes about 1.1 s of CPU (building the MJCF model of piano and hands and
compiling it; importing robopianist/dm_control adds ~1.5 s once per process); ``reset``
reuses the compiled physics (~4 ms). Step rates: ``tests/benchmarks/bench_env.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import gymnasium
import numpy as np
from mujoco_utils.composer_utils import Environment
from robopianist.music.midi_file import MidiFile

import configs
from workers.piano import ENV_ID
from workers.piano.layout import (ACTION_DIM, FINGERTIPS, HAND_JOINTS, KEY_JOINTS, N_KEYS, OBS_DIM,  # noqa: F401
                                  OBS_SLICES, PIANO_GOAL, SUSTAIN_GOAL, SUSTAIN_STATE)
from workers.piano.lean import LeanPianoEnv
from workers.piano.reward import check_same_terms
from workers.piano.task import PianoEnv, RP1MPianoTask, robopianist_task_kwargs  # noqa: F401 (re-exported)

Backend = Literal["lean", "robopianist"]
BACKENDS: tuple[str, ...] = ("lean", "robopianist")


class RoboPianistEnv(PianoEnv):
    """Steps through dm_control's composer loop and RoboPianist's own task code (the reference)."""

    backend = "robopianist"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.reward = self.task.reward
        hands = [hand.name for hand in self.task.hands]
        self._obs_keys = {
            "key_joints": ["piano/state"],
            "sustain_state": ["piano/sustain_state"],
            "fingertips": [f"{h}/fingertip_positions" for h in hands],
            "hand_joints": [f"{h}/joints_pos" for h in hands],
        }
        self._lookahead = self.task._n_steps_lookahead + 1

    def _reset(self) -> np.ndarray:
        return self._flatten(self.environment.reset().observation)

    def _advance(self, action: np.ndarray) -> tuple[np.ndarray, float, dict[str, Any]]:
        timestep = self.environment.step(action)
        task = self.task
        pressed = task.piano.activation.copy()
        target = task.goal_current[:-1] > 0.5
        ended = self._t + 1 >= self.n_steps or (self._wrong_press_termination and bool(np.any(pressed & ~target)))
        if timestep.last() != ended:
            raise RuntimeError(f"step {self._t}: dm_control ends the episode {timestep.last()}, expected {ended}")
        info = {
            "pressed": pressed,
            "target": target,
            "sustain_pressed": bool(task.piano.sustain_activation[0]),
            "sustain_target": bool(task.goal_current[-1] > 0.5),
            "reward_terms": dict(task.reward_terms),
            "ot_assignment": list(task.ot_assignment),
            "ot_distance": task.ot_distance,
        }
        return self._flatten(timestep.observation), float(timestep.reward), info

    def _flatten(self, observation) -> np.ndarray:
        goal = observation["goal"].reshape(self._lookahead, N_KEYS + 1)
        parts = {"piano_goal": goal[:, :N_KEYS].ravel(), "sustain_goal": goal[:, N_KEYS]}
        for name, keys in self._obs_keys.items():
            parts[name] = np.concatenate([np.ravel(observation[k]) for k in keys])
        return np.concatenate([parts[name] for name in OBS_SLICES]).astype(np.float32)


def make_env(midi: MidiFile, env_cfg: configs.EnvConfig, seed: int = 0, backend: Backend = "lean") -> PianoEnv:
    """The RP1M environment for ``midi`` (used as given: already stretched), reset.

    ``seed`` seeds the environment's random state. With RP1M's settings
    ``obs_dim == OBS_DIM`` (1144) and ``action_dim == ACTION_DIM`` (39). ``backend``: see the
    module docstring.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown piano environment backend {backend!r} (expected one of {BACKENDS})")
    if midi.n_notes == 0:
        raise ValueError(f"MIDI '{midi.title or 'untitled'}' has no notes: nothing to play")
    task = RP1MPianoTask(midi=midi, env_cfg=env_cfg)
    # The MJCF model never changes between episodes: compile once (as robopianist.suite.load).
    environment = Environment(
        task=task,
        random_state=seed,
        strip_singleton_obs_buffer_dim=True,
        recompile_physics=False,
        legacy_step=True,
    )
    if backend == "lean":
        env: PianoEnv = LeanPianoEnv(environment)
    else:
        env = RoboPianistEnv(environment)
    check_same_terms(backend, env.reward, task.reward)
    env.reset()
    return env


def make_gym_env(midi: MidiFile | str | Path, env_cfg: configs.EnvConfig | None = None, chunk: int = 0,
                 seed: int = 0, backend: Backend = "lean", render_mode: str | None = None) -> PianoEnv:
    """``gymnasium.make(ENV_ID, midi=...)``'s entry point: ``midi`` a ``MidiFile`` (used as given)
    or a MIDI file whose chunk ``chunk`` is played; ``env_cfg`` defaults to the default config's;
    ``render_mode`` None or ``"rgb_array"`` (gymnasium wraps it for ``"human"``)."""
    if render_mode not in (None, *make_gym_env.metadata["render_modes"]):
        raise ValueError(f"render_mode {render_mode!r}: expected one of {make_gym_env.metadata['render_modes']} or None")
    env_cfg = env_cfg if env_cfg is not None else configs.load().env
    if isinstance(midi, (str, Path)):
        from workers.piano.music import load_chunk

        midi = load_chunk(midi, chunk, env_cfg)
    env = make_env(midi, env_cfg, seed=seed, backend=backend)
    env.render_mode = render_mode
    return env


# What gymnasium.make reads before it builds one (render_fps: the environment's own metadata).
make_gym_env.metadata = {"render_modes": ["rgb_array"]}
