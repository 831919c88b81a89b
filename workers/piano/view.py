"""What a rollout looks like: frames of the piano environment that show the music.

:class:`PianoView` renders one frame after a step with the keys coloured by what should and what
does sound (:data:`KEY_COLOURS`: a target key pressed is right, a key pressed that should not
sound is wrong, a target key not pressed is still to play), from a camera that follows the hands
and the keys in play (it keeps them all in the picture, filling its width, and eases between
poses so it does not shake), with an optional strip of the upcoming notes along the top. One
camera and scene are made once and reused for every frame.

:class:`Rendering` gives a :class:`~workers.piano.task.PianoEnv` gymnasium's rendering API:
``render_mode="rgb_array"`` in ``metadata["render_modes"]``, ``metadata["render_fps"]`` from the
control timestep, ``render()`` returning the frame after the last step; and it sets
``spec.max_episode_steps`` to the chunk's length when gymnasium gives the environment its spec.
MuJoCo's OpenGL backend (``MUJOCO_GL``: egl, or osmesa without a GPU) must work in the process.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from workers.piano.layout import N_KEYS

# RGBA of a key by its state after a step; keys in no state keep the model's colour.
KEY_COLOURS: dict[str, tuple[float, float, float, float]] = {
    "right": (0.15, 0.80, 0.25, 1.0),  # pressed and should sound: green
    "wrong": (0.90, 0.15, 0.15, 1.0),  # pressed, should not sound: red
    "missed": (0.20, 0.45, 1.00, 1.0),  # should sound, not pressed: blue
}
RENDER_SIZE = (640, 480)  # width, height of gymnasium's render()
_ELEVATION, _AZIMUTH = -65.0, 180.0  # from above and in front of the player, looking at the keys
_EASE = 0.25  # how far the camera moves towards its new pose each frame
_MARGIN = 0.06  # m of keyboard either side of what is in play
_STRIP_ROWS = 0.12  # height of the upcoming-notes strip as a fraction of the frame


def key_states(pressed: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """bool [88] per state of :data:`KEY_COLOURS` from the keys sounding and the keys that should."""
    pressed, target = np.asarray(pressed, bool), np.asarray(target, bool)
    return {"right": pressed & target, "wrong": pressed & ~target, "missed": target & ~pressed}


class PianoView:
    """Frames of ``env`` (a :class:`~workers.piano.task.PianoEnv`) at ``width`` x ``height``.
    ``quality`` fast leaves out shadows, reflections and anti-aliasing (software OpenGL draws
    them many times slower); ``follow`` False keeps one view of the whole scene; ``strip`` draws
    the upcoming notes."""

    def __init__(self, env, width: int, height: int, *, quality: str = "fast", follow: bool = True,
                 strip: bool = True) -> None:
        from dm_control.mujoco import MovableCamera

        self.env, self.width, self.height, self.follow, self.strip = env, width, height, follow, strip
        physics = env.environment.physics
        self.physics = physics
        if quality == "fast":  # visual only: the physics does not read these
            physics.model.light_castshadow[:] = 0
            physics.model.mat_reflectance[:] = 0
            physics.model.vis.quality.offsamples = 0  # no multisampling (read when the context is made): ~2x faster
        self.key_geoms = physics.bind([key.geom[0] for key in env.task.piano.keys]).element_id
        self.key_rgba = physics.model.geom_rgba[self.key_geoms].copy()
        self.key_matid = physics.model.geom_matid[self.key_geoms].copy()
        self.tip_sites = physics.bind([s for hand in env.task.hands for s in hand.fingertip_sites]).element_id
        self.camera = MovableCamera(physics, height=height, width=width)
        fovy = math.radians(float(physics.model.vis.global_.fovy))
        self._tan_half_width = math.tan(fovy / 2) * width / height
        self._tan_half_height = math.tan(fovy / 2)
        self._pose: np.ndarray | None = None  # lookat x, y, z, distance

    def frame(self, pressed: np.ndarray | None = None, target: np.ndarray | None = None,
              upcoming: np.ndarray | None = None) -> np.ndarray:
        """uint8 [height, width, 3]: the scene now, keys coloured by ``pressed``/``target`` (bool [88],
        none when None), the upcoming notes ``upcoming`` (bool [steps, 88], now first) along the top."""
        model = self.physics.model
        states = key_states(pressed, target) if pressed is not None and target is not None else {}
        coloured = np.zeros(N_KEYS, bool)
        for name, keys in states.items():
            model.geom_rgba[self.key_geoms[keys]] = KEY_COLOURS[name]
            coloured |= keys
        model.geom_matid[self.key_geoms[coloured]] = -1  # a material's colour would win over the geom's
        try:
            if self.follow:
                in_play = coloured if upcoming is None else coloured | np.asarray(upcoming, bool).any(0)
                self._move_camera(in_play)
            else:
                self.camera.set_pose(model.stat.center, 1.5 * model.stat.extent, 90.0, -45.0)
            image = self.camera.render().copy()  # MuJoCo's camera reuses its buffer for the next frame
        finally:
            model.geom_rgba[self.key_geoms] = self.key_rgba
            model.geom_matid[self.key_geoms] = self.key_matid
        if self.strip and upcoming is not None:
            image = self._draw_strip(image, np.asarray(upcoming, bool))
        return image

    def _move_camera(self, in_play: np.ndarray) -> None:
        data = self.physics.data
        points = np.concatenate([data.site_xpos[self.tip_sites], data.geom_xpos[self.key_geoms[in_play]]])
        low, high = points.min(0), points.max(0)
        centre = (low + high) / 2
        half_width = (high[1] - low[1]) / 2 + _MARGIN  # the keyboard runs along y
        half_depth = (high[0] - low[0]) / 2 + _MARGIN
        distance = max(half_width / self._tan_half_width, half_depth / self._tan_half_height) * 1.1
        pose = np.r_[centre, distance]
        self._pose = pose if self._pose is None else self._pose + _EASE * (pose - self._pose)
        self.camera.set_pose(self._pose[:3], float(self._pose[3]), _AZIMUTH, _ELEVATION)

    def _draw_strip(self, image: np.ndarray, upcoming: np.ndarray) -> np.ndarray:
        """The upcoming notes as a piano roll along the top, each key's notes above the key as the
        camera sees it; the nearest step at the bottom of the strip."""
        steps = upcoming.shape[0]
        rows = max(steps, int(self.height * _STRIP_ROWS))
        image[:rows] = (image[:rows] * 0.3).astype(np.uint8)
        centres = np.c_[self.physics.data.geom_xpos[self.key_geoms], np.ones(N_KEYS)] @ self.camera.matrix.T
        x = centres[:, 0] / centres[:, 2]
        half = max(1, int(abs(np.median(np.diff(x))) / 2))
        colour = (np.asarray(KEY_COLOURS["missed"][:3]) * 255).astype(np.uint8)
        edges = np.linspace(rows, 0, steps + 1).astype(int)  # step 0 (now) at the bottom
        for step, key in zip(*np.nonzero(upcoming)):
            left, right = int(x[key]) - half + 1, int(x[key]) + half
            if right > 0 and left < self.width:
                image[edges[step + 1]:edges[step] - 1, max(0, left):min(self.width, right)] = colour
        return image


class Rendering:
    """gymnasium's rendering API and episode length for :class:`~workers.piano.task.PianoEnv` (see
    the module docstring). ``render_mode`` is set by :func:`workers.piano.env.make_gym_env`."""

    render_mode: str | None = None
    _spec = None
    _view: PianoView | None = None
    _last_keys: tuple[np.ndarray, np.ndarray] | None = None
    upcoming: np.ndarray | None = None  # bool [steps, 88]: the observation's goal window (what should sound next)

    @property
    def metadata(self) -> dict[str, Any]:
        return {"render_modes": ["rgb_array"], "render_fps": int(round(1.0 / self.environment.control_timestep()))}

    @property
    def spec(self):
        return self._spec

    @spec.setter
    def spec(self, spec) -> None:
        # gymnasium.make gives a spec without max_episode_steps: a chunk always ends at its length.
        self._spec = None if spec is None else dataclasses.replace(spec, max_episode_steps=self.n_steps)

    def keep_frame(self, obs: np.ndarray, pressed: np.ndarray | None = None, target: np.ndarray | None = None) -> None:
        """Remember what :meth:`render` shows: the observation's goal window and the last step's keys."""
        goal = obs[self.obs_slices["piano_goal"]]
        self.upcoming = goal.reshape(-1, N_KEYS) > 0.5
        self._last_keys = None if pressed is None else (pressed, target)

    def render(self) -> np.ndarray | None:
        """The frame after the last step (uint8 [480, 640, 3]) in ``rgb_array`` mode, else None."""
        if self.render_mode != "rgb_array":
            return None
        if self._view is None:
            self._view = PianoView(self, *RENDER_SIZE)
        pressed, target = self._last_keys or (None, None)
        return self._view.frame(pressed, target, upcoming=self.upcoming)
