"""The piano environment stepped with MuJoCo directly: the RP1M task at close to MuJoCo's own speed.

``LeanPianoEnv`` takes the model, the episode start and every number that defines the task
from RoboPianist's ``RP1MPianoTask`` (``workers.piano.env``), but runs a control step itself:

- the physics substeps as one call sequence on the raw ``MjModel``/``MjData``
  (``mj_step2``, ``mj_step`` x (substeps - 1), ``mj_step1``: what dm_control's legacy step
  does substep by substep, so that positions, contacts and sensors are those of the final
  state), instead of dm_control's Python loop with RoboPianist's per-substep hook (key
  states, key colours, MIDI events: ten times per control step) and the extra ``mj_forward``
  that writing through ``physics.bind`` forces;
- once per control step, from MjData arrays with numpy: key states and activations, the
  sustain pedal, the observation, the state the reward reads (``workers.piano.reward``: the
  same terms as the task's, from the same definitions) and the goal window (precomputed for
  the whole chunk).

Same trajectories as the ``robopianist`` backend (``tests/test_env.py``), with one documented
difference: after the last step of a chunk RoboPianist leaves the previous goal window in the
observation (its goal update skips the step past the end); here it is the true window, all
zeros. No MIDI events are produced (nothing reads them: audio is rebuilt from ``pressed``).
"""

from __future__ import annotations

from typing import Any

import mujoco
import numpy as np
from dm_control.rl.control import PhysicsError
from mujoco_utils.composer_utils import Environment
from robopianist.models.piano.piano import _KEY_THRESHOLD, _SUSTAIN_THRESHOLD

from workers.piano.fingering import KEY_SURFACE_OFFSET, ot_match
from workers.piano.layout import N_KEYS
from workers.piano.reward import Reward, StepState
from workers.piano.task import PianoEnv, hands_touch


class LeanPianoEnv(PianoEnv):
    """``PianoEnv`` whose control step is a few MuJoCo calls and numpy on MjData arrays."""

    backend = "lean"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        environment.reset()  # the first reset compiles the physics that every episode then reuses
        task, physics = self.task, environment.physics
        model = physics.model.ptr
        self._substeps = int(task.physics_steps_per_control_step)
        self._rk4 = model.opt.integrator == mujoco.mjtIntegrator.mjINT_RK4

        def ids(elements) -> np.ndarray:
            return np.asarray(physics.bind(elements).element_id)

        hands = task.hands
        self._ctrl_ids = ids([a for hand in hands for a in hand.actuators])
        piano = task.piano
        self._key_qadr = model.jnt_qposadr[ids(piano.joints)]
        self._key_low, self._key_high = (np.array(c) for c in piano._qpos_range.T)
        self._hand_qadr = model.jnt_qposadr[ids([j for hand in hands for j in hand.joints])]
        self._tip_sites = ids([s for hand in hands for s in hand.fingertip_sites])
        self._force_adr = np.concatenate([model.sensor_adr[ids(h.actuator_force_sensors)] for h in hands])
        self._velocity_adr = np.concatenate([model.sensor_adr[ids(h.actuator_velocity_sensors)] for h in hands])
        self._right_actuators = len(hands[0].actuator_force_sensors)
        self.reward = Reward(task._reward_cfg)
        ot = task.ot_fingering
        self._ot_fingers, self._ot_reduction = ot.fingers, ot.reduction
        self._key_geoms = ids([key.geom[0] for key in piano.keys])
        self._key_offsets = model.geom_size[self._key_geoms] * KEY_SURFACE_OFFSET
        self._hand_of_geom = task.hand_of_geom(physics)
        self._held = task.little_finger_hold(physics) if task._four_fingers else None

        # Goal of every step (88 keys then the pedal), zero past the end so every window is full.
        steps = task._n_steps_lookahead + 1
        self._goal = np.zeros((self.n_steps + steps, N_KEYS + 1))
        for t, notes in enumerate(task._notes):
            self._goal[t, [note.key for note in notes]] = 1.0
            self._goal[t, -1] = task._sustains[t]
        self._window = steps
        self._on = [np.flatnonzero(row[:-1]) for row in self._goal[: self.n_steps]]
        self._target = self._goal[:, :-1] > 0.5
        self._obs = np.zeros(self.obs_dim)  # float64 assembly buffer, cast once to float32

    def _reset(self) -> np.ndarray:
        self.environment.reset()  # RoboPianist's episode start: same initial state as the reference
        physics = self.environment.physics
        self._model, self._data = physics.model.ptr, physics.data.ptr
        self._warnings = self._data.warning.number  # a view: counts of MuJoCo's warnings
        self._sustain = 0.0
        self._update_keys()
        return self._observation(0)

    def _update_keys(self) -> None:
        # np.clip's float operations, without its Python wrapper
        state = np.minimum(np.maximum(self._data.qpos[self._key_qadr], self._key_low), self._key_high)
        self._normalized = state / self._key_high
        self._pressed = np.abs(state - self._key_high) <= _KEY_THRESHOLD

    def _observation(self, t: int) -> np.ndarray:
        """The observation with the goal window starting at step ``t``."""
        s, obs, data = self._slices, self._obs, self._data
        window = self._goal[t: t + self._window]
        obs[s["piano_goal"]] = window[:, :N_KEYS].ravel()
        obs[s["sustain_goal"]] = window[:, N_KEYS]
        obs[s["key_joints"]] = self._normalized
        obs[s["sustain_state"]] = self._sustain
        obs[s["fingertips"]] = data.site_xpos[self._tip_sites].ravel()
        obs[s["hand_joints"]] = data.qpos[self._hand_qadr]
        return obs.astype(np.float32)

    def _advance(self, action: np.ndarray) -> tuple[np.ndarray, float, dict[str, Any]]:
        model, data, t = self._model, self._data, self._t
        if self._held is not None:
            index, values = self._held
            action = action.copy()
            action[index] = values
        data.ctrl[self._ctrl_ids] = action[:-1]
        self._sustain = float(action[-1])
        warnings = self._warnings.copy()
        if self._rk4:
            mujoco.mj_step(model, data, self._substeps)
        else:  # mj_step1 of the current state is up to date (reset's forward or the last step's mj_step1)
            mujoco.mj_step2(model, data)
            if self._substeps > 1:
                mujoco.mj_step(model, data, self._substeps - 1)
        mujoco.mj_step1(model, data)
        if (self._warnings > warnings).any():
            names = np.compress(self._warnings > warnings, list(mujoco.mjtWarning.__members__))
            raise PhysicsError(f"Physics state is invalid. Warning(s) raised: {', '.join(names)}")
        self._update_keys()
        pressed = self._pressed
        sustain_pressed = self._sustain >= _SUSTAIN_THRESHOLD
        goal, target, on = self._goal[t], self._target[t], self._on[t]

        sensors = data.sensordata
        power = abs(sensors[self._force_adr]) * abs(sensors[self._velocity_adr])
        tips = data.site_xpos[self._tip_sites]
        key_points = data.geom_xpos[self._key_geoms[on]] + self._key_offsets[on]
        assignment, distance = ot_match(tips[self._ot_fingers], key_points, on, self._ot_fingers, self._ot_reduction)
        right = self._right_actuators
        reward, terms = self.reward(StepState(
            goal=goal, target=target, keys=self._normalized, pressed=pressed, sustain_pressed=bool(sustain_pressed),
            power=(power[:right], power[right:]), ot_distance=distance,
            hands_touch=hands_touch(data.contact, self._hand_of_geom)))
        info = {
            "pressed": pressed.copy(),
            "target": target.copy(),
            "sustain_pressed": bool(sustain_pressed),
            "sustain_target": bool(goal[-1] > 0.5),
            "reward_terms": terms,
            "ot_assignment": assignment,
            "ot_distance": distance,
        }
        return self._observation(t + 1), float(reward), info
