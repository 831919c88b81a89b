"""RoboPianist's piano task with RP1M's settings, and the gymnasium interface of its environments.

``RP1MPianoTask`` builds the model (RoboPianist's ``PianoWithShadowHands``) and computes the
reward of ``workers.piano.reward`` from RoboPianist's own state; ``PianoEnv`` is what both
backends (``workers.piano.env``: the reference that steps through dm_control,
``workers.piano.lean``: MuJoCo directly) share: spaces, action checks, the episode's F1 sums
and how an episode ends. ``workers.piano.env`` is where environments are made; it describes
the observation, the reward and the episode end.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces
from mujoco_utils.composer_utils import Environment
from robopianist.music.midi_file import MidiFile
from robopianist.suite.tasks.piano_with_shadow_hands import PianoWithShadowHands

import configs
from workers.piano.fingering import LITTLE_FINGERS, OTFingering
from workers.piano.layout import N_FINGERS, N_KEYS, OBS_SLICES
from workers.piano.metrics import step_metrics
from workers.piano.reward import Reward, StepState
from workers.piano.view import Rendering

# Little-finger actuators held in place on four-finger hands.
_LITTLE_FINGER_ACTUATORS = ("A_LFJ4", "A_LFJ3", "A_LFJ0")


def robopianist_task_kwargs(env_cfg: configs.EnvConfig) -> dict[str, Any]:
    """``PianoWithShadowHands`` arguments for RP1M's settings in ``env_cfg``.

    Human fingering and RoboPianist's forearm term are off (OT fingering and the
    hand-hand collision term replace them in ``RP1MPianoTask``).
    """
    return dict(
        n_steps_lookahead=env_cfg.n_steps_lookahead,
        # Silence is trimmed once, on the whole song, before it is cut into chunks
        # (workers.piano.music.plan_chunks); trimming each chunk again would shift a chunk that
        # starts with a rest and make episodes shorter than their chunk.
        trim_silence=False,
        wrong_press_termination=env_cfg.wrong_press_termination,
        disable_fingering_reward=True,
        disable_forearm_reward=True,
        disable_colorization=env_cfg.disable_colorization,
        disable_hand_collisions=env_cfg.disable_hand_collisions,
        energy_penalty_coef=env_cfg.reward.energy_coef,
        gravity_compensation=env_cfg.gravity_compensation,
        primitive_fingertip_collisions=env_cfg.primitive_fingertip_collisions,
        reduced_action_space=env_cfg.reduced_action_space,
        attachment_yaw=env_cfg.attachment_yaw,
        control_timestep=env_cfg.control_timestep,
    )


class RP1MPianoTask(PianoWithShadowHands):
    """``PianoWithShadowHands`` configured as in RP1M, with the reward of ``workers.piano.reward``.

    The human-fingering reward and observable are switched off; ``get_reward`` reads the
    step's state from RoboPianist's piano and hands and sums the terms of
    ``workers.piano.reward.TERMS`` (RoboPianist's key press, sustain and energy terms, OT
    fingering and the hand-hand collision term).
    """

    def __init__(self, midi: MidiFile, env_cfg: configs.EnvConfig) -> None:
        # Read by _set_rewards, which the base constructor calls last.
        self._reward_cfg = env_cfg.reward
        self._four_fingers = env_cfg.four_fingers
        super().__init__(midi=midi, **robopianist_task_kwargs(env_cfg))
        for hand in (self.right_hand, self.left_hand):
            hand.observables.fingertip_positions.enabled = True
        self._held_actions: tuple[np.ndarray, np.ndarray] | None = None  # four fingers only

    @property
    def hands(self) -> tuple:
        """Right hand (fingers 0-4, first half of the action), then left hand (5-9)."""
        return (self.right_hand, self.left_hand)

    @property
    def goal_current(self) -> np.ndarray:
        """Goal of the step just taken: 88 keys then the sustain pedal (1 = should sound)."""
        return self._goal_current

    @property
    def n_steps(self) -> int:
        return len(self._notes)

    def _set_rewards(self) -> None:
        # In place of RoboPianist's own terms: every term from workers.piano.reward, as the lean backend.
        self.reward = Reward(self._reward_cfg)
        self.reward_terms: dict[str, float] = {}
        fingers = [f for f in range(N_FINGERS) if not (self._four_fingers and f in LITTLE_FINGERS)]
        self.ot_fingering = OTFingering(self.piano, self.hands, reduction=self._reward_cfg.ot_reduction,
                                        fingers=fingers)
        self.ot_assignment: list[tuple[int, int]] = []
        self.ot_distance = 0.0

    def get_reward(self, physics) -> float:
        """The step's reward from RoboPianist's own key, pedal and actuator state; the weighted
        terms in ``reward_terms``, the OT fingering in ``ot_assignment`` and ``ot_distance``."""
        on = np.flatnonzero(self._goal_current[:-1])
        self.ot_assignment, self.ot_distance = self.ot_fingering(physics, on)
        state = StepState(
            goal=self._goal_current,
            target=self._goal_current[:-1] > 0.5,
            keys=self.piano.state / self.piano._qpos_range[:, 1],
            pressed=self.piano.activation,
            sustain_pressed=bool(self.piano.sustain_activation[0]),
            power=tuple(hand.observables.actuators_power(physics) for hand in self.hands),
            ot_distance=self.ot_distance,
            hands_touch=hands_touch(physics.data.contact, self._hand_of_geom),
        )
        reward, self.reward_terms = self.reward(state)
        return reward

    def initialize_episode(self, physics, random_state) -> None:
        super().initialize_episode(physics, random_state)
        self.ot_fingering.bind(physics)
        self._hand_of_geom = self.hand_of_geom(physics)
        if self._four_fingers:
            self._held_actions = self.little_finger_hold(physics)

    def little_finger_hold(self, physics) -> tuple[np.ndarray, np.ndarray]:
        """(action indices, values) that keep both little fingers curled and still."""
        names = [a.name for hand in self.hands for a in hand.actuators]
        index = np.array([i for i, n in enumerate(names) if n[3:] in _LITTLE_FINGER_ACTUATORS])
        actuators = [a for hand in self.hands for a in hand.actuators]
        ctrlrange = physics.bind([actuators[i] for i in index]).ctrlrange
        # Abduction (LFJ4) centred, flexion (LFJ3, LFJ0) at the top of its range.
        values = np.where([names[i].endswith("LFJ4") for i in index], 0.0, ctrlrange[:, 1])
        return index, values

    def before_step(self, physics, action, random_state) -> None:
        if self._held_actions is not None:
            index, values = self._held_actions
            action = np.array(action, dtype=np.float64, copy=True)
            action[index] = values
        super().before_step(physics, action, random_state)

    def hand_of_geom(self, physics) -> np.ndarray:
        """Geom id -> 1 right hand, 2 left hand, 0 anything else."""
        labels = np.zeros(physics.model.ngeom, dtype=np.int8)
        for label, hand in enumerate(self.hands, start=1):
            labels[physics.bind(hand.mjcf_model.find_all("geom")).element_id] = label
        return labels


def hands_touch(contact, hand_of_geom: np.ndarray) -> bool:
    """Whether a geom of one hand touches one of the other (``contact``: MjData's contact list)."""
    touching = contact.dist <= 1e-8  # mujoco_utils.collision_utils' margin
    hand1 = hand_of_geom[contact.geom1[touching]]
    hand2 = hand_of_geom[contact.geom2[touching]]
    return bool(((hand1 * hand2) == 2).any())  # one geom of each hand



def observation_slices(task: RP1MPianoTask) -> dict[str, slice]:
    """Where each part of the observation lies for ``task``'s settings (``OBS_SLICES`` for RP1M's)."""
    steps = task._n_steps_lookahead + 1
    sizes = {"piano_goal": steps * N_KEYS, "sustain_goal": steps, "key_joints": N_KEYS, "sustain_state": 1,
             "fingertips": sum(3 * len(h.fingertip_sites) for h in task.hands),
             "hand_joints": sum(len(h.joints) for h in task.hands)}
    slices, start = {}, 0
    for name in OBS_SLICES:  # RP1M order
        slices[name] = slice(start, start + sizes[name])
        start += sizes[name]
    return slices


class PianoEnv(Rendering, gymnasium.Env):
    """The RP1M task as a gymnasium environment: flat float32 observations, 39-d actions.

    ``reset(seed=..., options=...)`` returns ``(obs, info)``; ``seed`` also seeds the task's
    random state. ``step`` returns ``(obs, reward, terminated, truncated, info)``: ``truncated``
    at the end of the chunk (a time limit), ``terminated`` only when
    ``env.wrong_press_termination`` ends the episode on a wrong key. ``info`` has ``pressed``
    and ``target`` (bool[88]: keys sounding after the step / keys that should sound at it),
    ``sustain_pressed``, ``sustain_target``, this step's ``precision``, ``recall``, ``f1``,
    ``reward_terms`` (weighted, summing to the reward), ``ot_assignment`` (list of (finger,
    key) pairs, fingers numbered as in ``workers.piano.fingering``) and ``ot_distance``.

    Subclasses step the physics (``_advance``); this class checks actions, keeps the episode's
    step count and F1 sums, and decides how an episode ends.
    """

    backend: str

    def __init__(self, environment: Environment) -> None:
        self.environment = environment
        self.task: RP1MPianoTask = environment.task
        spec = environment.action_spec()
        self.action_dim = int(spec.shape[0])
        self.action_low = np.asarray(spec.minimum, dtype=np.float32)
        self.action_high = np.asarray(spec.maximum, dtype=np.float32)
        self.action_names: tuple[str, ...] = tuple(spec.name.split("\t"))
        self.active_actions = np.ones(self.action_dim, dtype=bool)
        if self.task._four_fingers:
            index, _ = self.task.little_finger_hold(environment.physics)
            self.active_actions[index] = False
        self._slices = observation_slices(self.task)
        self.obs_dim = self._slices["hand_joints"].stop
        self.action_space = spaces.Box(self.action_low, self.action_high, dtype=np.float32)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(self.obs_dim,), dtype=np.float32)
        self._wrong_press_termination = bool(self.task._wrong_press_termination)
        self._done, self._closed = True, False  # reset() starts the first episode
        self._t, self._sums = 0, np.zeros(3)

    # Sizes and layout.

    @property
    def n_steps(self) -> int:
        """Episode length in control steps."""
        return self.task.n_steps

    @property
    def obs_slices(self) -> dict[str, slice]:
        """Where each part of the observation lies (``OBS_SLICES`` for RP1M's settings)."""
        return dict(self._slices)

    # Episode.

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self.environment.random_state.seed(seed)
        obs = self._reset()
        self._done = False
        self._t = 0
        self._sums = np.zeros(3)
        self.keep_frame(obs)
        return obs, {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError("the episode is over: call reset() before step()")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (self.action_dim,):
            raise ValueError(f"action has shape {action.shape}, expected ({self.action_dim},)")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action has non-finite entries at {np.flatnonzero(~np.isfinite(action)).tolist()}")
        obs, reward, info = self._advance(action)
        self._t += 1
        pressed, target = info["pressed"], info["target"]
        terminated = self._wrong_press_termination and bool(np.any(pressed & ~target))
        truncated = self._t >= self.n_steps and not terminated
        self._done = terminated or truncated
        precision, recall, f1 = step_metrics(pressed, target)
        self._sums += (precision, recall, f1)
        info.update(precision=precision, recall=recall, f1=f1)
        self.keep_frame(obs, pressed, target)
        return obs, reward, terminated, truncated, info

    def episode_metrics(self) -> dict[str, float]:
        """Mean precision, recall and F1 over the steps of this episode so far."""
        if self._t == 0:
            raise ValueError("no step taken in this episode yet")
        precision, recall, f1 = self._sums / self._t
        return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.environment.close()

    # Backend.

    def _reset(self) -> np.ndarray:
        """Start an episode in the physics; the first observation."""
        raise NotImplementedError

    def _advance(self, action: np.ndarray) -> tuple[np.ndarray, float, dict[str, Any]]:
        """One control step: (observation, reward, info with ``pressed``, ``target``,
        ``sustain_pressed``, ``sustain_target``, ``reward_terms``, ``ot_assignment``, ``ot_distance``)."""
        raise NotImplementedError


