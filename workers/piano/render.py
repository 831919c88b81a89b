"""Videos of rollouts with sound: MuJoCo's offscreen renderer for the picture, RoboPianist's
synthesizer for the keys pressed (:mod:`workers.piano.audio`), muxed into an MP4 (H.264 + AAC)
by ffmpeg.

A rollout is either replayed from recorded actions (a lake episode: its seed seeds the
environment, its actions are applied step by step, so no policy is needed) or played by a
policy (any ``act(obs) -> [H, 39]`` action chunk, executed open-loop ``H`` steps at a time).
One video frame per control step (20 per second), then the last frame held for the synthesizer's
one-second release tail, so the video and its sound last equally long.

Rendering needs an OpenGL backend without a display: EGL (GPU nodes) or OSMesa (software, any
machine). ``MUJOCO_GL`` is read once, when MuJoCo is first imported, so :func:`render_rollout`
runs the work in a child process with a backend that works here (:func:`gl_backend`: the
``MUJOCO_GL`` asked for if it can open a context, else OSMesa). :func:`render_in_process` does
it in the calling process, whose backend must already work.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from configs.files import atomic_write

DEFAULT_SIZE = (640, 480)  # width, height
QUALITIES = ("fast", "full")  # fast: no shadows or reflections (software OpenGL draws ~8x faster)
_PROBE = "import mujoco; c = mujoco.GLContext(8, 8); c.make_current(); c.free()"
_backend_cache: dict[str, str] = {}


class RenderError(RuntimeError):
    """A video could not be made; the message says which step failed and why."""


@dataclass
class RenderResult:
    """What :func:`render_rollout` wrote."""

    path: str
    steps: int  # control steps played
    frames: int  # video frames (steps + the held tail)
    width: int
    height: int
    fps: int
    f1: float  # the rollout's mean per-step key F1
    precision: float
    recall: float
    seed: int
    gl: str  # the OpenGL backend that rendered it


def gl_backend() -> str:
    """An offscreen OpenGL backend that works on this machine: ``MUJOCO_GL`` when it can open a
    context (workers default to egl), else osmesa. Probed once per process in a child process."""
    wanted = os.environ.get("MUJOCO_GL", "egl").lower()
    if wanted not in _backend_cache:
        choice = "osmesa"
        for backend in dict.fromkeys([wanted, "osmesa"]):
            env = dict(os.environ, MUJOCO_GL=backend, PYOPENGL_PLATFORM=backend)
            probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, timeout=120)
            if probe.returncode == 0:
                choice = backend
                break
        _backend_cache[wanted] = choice
    return _backend_cache[wanted]


def _even(n: int) -> int:
    return max(2, int(n) // 2 * 2)  # H.264 in yuv420p needs even sizes


def _ffmpeg() -> str:
    path = shutil.which("ffmpeg")
    if path is None:
        raise RenderError("ffmpeg is not installed (bash .ci/setup.sh installs it; or apt-get install ffmpeg)")
    return path


def render_in_process(midi, env_cfg, out: str | Path, *, actions: np.ndarray | None = None,
                      act: Callable[[np.ndarray], np.ndarray] | None = None, seed: int = 0,
                      width: int = DEFAULT_SIZE[0], height: int = DEFAULT_SIZE[1], max_steps: int | None = None,
                      soundfont: str | None = None, camera: int = -1, quality: str = "fast") -> RenderResult:
    """Play the chunk ``midi`` in the environment (``actions`` replayed, or ``act`` asked for
    action chunks), render every step and write ``out`` (MP4, atomically). MuJoCo's OpenGL
    backend in this process must work (see :func:`render_rollout`). ``quality`` fast leaves out
    shadows and reflections (measured 8x faster on software OpenGL), full keeps RoboPianist's look."""
    from workers.piano.audio import TAIL_S, write_wav, synthesize
    from workers.piano.env import make_env

    if (actions is None) == (act is None):
        raise ValueError("give either recorded actions or a policy's act function")
    if quality not in QUALITIES:
        raise ValueError(f"quality {quality!r}: expected one of {QUALITIES}")
    width, height = _even(width), _even(height)
    env = make_env(midi, env_cfg, seed=seed)
    out = Path(out)
    fps = int(round(1.0 / env_cfg.control_timestep))
    try:
        obs, _ = env.reset(seed=seed)
        pressed, sustain = [], []
        with tempfile.TemporaryDirectory(prefix="pianoforge-render-") as tmp:
            video = Path(tmp) / "video.mp4"
            cmd = [_ffmpeg(), "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
                   "-r", str(fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "veryfast", str(video)]
            encoder = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                physics = env.environment.physics
                if quality == "fast":  # visual only: the physics does not read these
                    physics.model.light_castshadow[:] = 0
                    physics.model.mat_reflectance[:] = 0
                frame = physics.render(height=height, width=width, camera_id=camera)
                done, step, plan, k = False, 0, None, 0
                limit = env.n_steps if max_steps is None else min(max_steps, env.n_steps)
                while not done and step < limit:
                    if actions is not None:
                        if step >= len(actions):
                            break
                        action = actions[step]
                    else:
                        if plan is None or k >= len(plan):
                            plan, k = np.atleast_2d(act(obs)), 0
                        action = plan[k]
                        k += 1
                    obs, _, terminated, truncated, info = env.step(np.clip(action, env.action_low, env.action_high))
                    done = terminated or truncated
                    pressed.append(info["pressed"])
                    sustain.append(info["sustain_pressed"])
                    frame = physics.render(height=height, width=width, camera_id=camera)
                    encoder.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
                    step += 1
                tail = int(round(TAIL_S * fps))
                for _ in range(tail):  # hold the last picture while the last notes ring out
                    encoder.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
                encoder.stdin.close()
                if encoder.wait() != 0:
                    raise RenderError(f"ffmpeg could not encode the frames: {encoder.stderr.read().decode()[-2000:]}")
            finally:
                if encoder.poll() is None:
                    encoder.kill()
            if step == 0:
                raise RenderError("the rollout has no steps to render")
            metrics = env.episode_metrics()
            wav = write_wav(Path(tmp) / "audio.wav",
                            synthesize(np.stack(pressed), env_cfg.control_timestep, np.asarray(sustain), soundfont))
            muxed = Path(tmp) / "clip.mp4"
            mux = subprocess.run([_ffmpeg(), "-loglevel", "error", "-y", "-i", str(video), "-i", str(wav), "-c:v", "copy",
                                  "-c:a", "aac", "-b:a", "128k", str(muxed)], capture_output=True)
            if mux.returncode != 0:
                raise RenderError(f"ffmpeg could not add the sound: {mux.stderr.decode()[-2000:]}")
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(out, "wb") as f, open(muxed, "rb") as src:
                shutil.copyfileobj(src, f)
    finally:
        env.close()
    return RenderResult(path=str(out), steps=step, frames=step + tail, width=width, height=height, fps=fps,
                        f1=metrics["f1"], precision=metrics["precision"], recall=metrics["recall"], seed=seed,
                        gl=os.environ.get("MUJOCO_GL", ""))


# -- the child process ---------------------------------------------------------------------------


def render_rollout(song_path: str | Path, chunk_index: int, env_cfg, out: str | Path, *,
                   actions: np.ndarray | None = None, policy: str | Path | None = None, seed: int = 0,
                   width: int = DEFAULT_SIZE[0], height: int = DEFAULT_SIZE[1], max_steps: int | None = None,
                   soundfont: str | None = None, song_hash: str | None = None, quality: str = "fast",
                   timeout_s: float = 3600) -> RenderResult:
    """Render chunk ``chunk_index`` of the song at ``song_path`` to ``out`` in a child process
    (with an OpenGL backend that works here): ``actions`` float[T, 39] replayed from ``seed``,
    or the policy file ``policy`` (an exported specialist or an imitation policy) played.
    Raises :class:`RenderError` with the child's last words when it fails."""
    if (actions is None) == (policy is None):
        raise ValueError("give either recorded actions or a policy file")
    backend = gl_backend()
    with tempfile.TemporaryDirectory(prefix="pianoforge-render-") as tmp:
        request: dict[str, Any] = {
            "song_path": str(song_path), "chunk_index": int(chunk_index), "song_hash": song_hash,
            "env": env_cfg.model_dump(mode="json"), "out": str(Path(out).absolute()), "seed": int(seed),
            "width": int(width), "height": int(height), "max_steps": max_steps, "soundfont": soundfont, "quality": quality,
            "policy": None if policy is None else str(Path(policy).absolute()), "actions": None,
        }
        if actions is not None:
            request["actions"] = str(Path(tmp) / "actions.npy")
            np.save(request["actions"], np.asarray(actions, dtype=np.float32))
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        env = dict(os.environ, MUJOCO_GL=backend, PYOPENGL_PLATFORM=backend)
        child = subprocess.run([sys.executable, "-m", "workers.piano.render", str(Path(tmp) / "request.json")],
                               env=env, capture_output=True, text=True, timeout=timeout_s)
    if child.returncode != 0:
        raise RenderError(f"rendering {out} failed (MUJOCO_GL={backend}): {child.stderr.strip()[-3000:]}")
    return RenderResult(**json.loads(child.stdout.strip().splitlines()[-1]))


def _main(argv: Sequence[str]) -> None:
    import configs
    from workers.piano.music import load_chunk

    request = json.loads(Path(argv[0]).read_text())
    env_cfg = configs.EnvConfig(**request["env"])
    midi = load_chunk(request["song_path"], request["chunk_index"], env_cfg, expected_hash=request["song_hash"])
    kwargs = dict(seed=request["seed"], width=request["width"], height=request["height"],
                  max_steps=request["max_steps"], soundfont=request["soundfont"], quality=request["quality"])
    if request["actions"] is not None:
        result = render_in_process(midi, env_cfg, request["out"], actions=np.load(request["actions"]), **kwargs)
    else:
        from workers.imitation.export import load_any_policy

        policy = load_any_policy(request["policy"])
        result = render_in_process(midi, env_cfg, request["out"], act=policy.act, **kwargs)
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    _main(sys.argv[1:])
