"""Videos of rollouts with sound: MuJoCo's offscreen renderer for the picture (frames that show
the music, :mod:`workers.piano.view`: target and pressed keys coloured, right and wrong apart, a
camera on the hands and the keys in play, the upcoming notes along the top), RoboPianist's
synthesizer for the keys pressed (:mod:`workers.piano.audio`), muxed by ffmpeg into the container
``out``'s extension names (:data:`CONTAINERS`: MP4, MOV and MKV hold H.264 + AAC, WebM VP9 + Opus,
AVI MPEG-4 + MP3; a ``.png`` is one still, the poster frame: the step with the most keys in play).

A rollout is either replayed from recorded actions (a lake episode: its seed seeds the
environment, its actions are applied step by step, so no policy is needed) or played by a
policy (any ``act(obs) -> [H, 39]`` action chunk, executed open-loop ``H`` steps at a time).
One video frame per control step (``1 / env.control_timestep`` per second), then the last frame
held for the synthesizer's one-second release tail, so the video and its sound last equally long.

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
_H264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "veryfast"]
# Extension -> (ffmpeg's video encoder arguments, audio encoder arguments).
CONTAINERS: dict[str, tuple[list[str], list[str]]] = {
    ".mp4": (_H264, ["-c:a", "aac", "-b:a", "128k"]),
    ".mov": (_H264, ["-c:a", "aac", "-b:a", "128k"]),
    ".mkv": (_H264, ["-c:a", "aac", "-b:a", "128k"]),
    ".webm": (["-c:v", "libvpx-vp9", "-pix_fmt", "yuv420p", "-b:v", "0", "-crf", "34", "-deadline", "realtime",
               "-cpu-used", "8"], ["-c:a", "libopus", "-b:a", "128k"]),
    ".avi": (["-c:v", "mpeg4", "-q:v", "3"], ["-c:a", "libmp3lame", "-b:a", "128k"]),
}
STILLS = (".png",)  # one frame, no sound
QUALITIES = ("fast", "full")  # fast: no shadows, reflections or anti-aliasing (software OpenGL draws much faster)
_PROBE = "import mujoco; c = mujoco.GLContext(8, 8); c.make_current(); c.free()"
_backend_cache: dict[str, str] = {}


class RenderError(RuntimeError):
    """A video could not be made; the message says which step failed and why."""


@dataclass
class RenderResult:
    """What :func:`render_rollout` wrote."""

    path: str
    steps: int  # control steps played
    frames: int  # video frames (steps + the held tail; 1 for a still)
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


def container(out: str | Path) -> str:
    """The extension of ``out`` (lower case) if a clip or still can be written there, else RenderError."""
    ext = Path(out).suffix.lower()
    if ext not in CONTAINERS and ext not in STILLS:
        raise RenderError(f"{out}: cannot write a {ext or 'file without an extension'}; a video is one of "
                          f"{', '.join(CONTAINERS)}, a still {', '.join(STILLS)}")
    return ext


class _Encoder:
    """Frames piped into ffmpeg (raw RGB in, ``args`` out to ``path``)."""

    def __init__(self, path: Path, width: int, height: int, fps: int, args: list[str]):
        cmd = [_ffmpeg(), "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
               "-r", str(fps), "-i", "-", *args, str(path)]
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)

    def write(self, frame: np.ndarray) -> None:
        self.process.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())

    def close(self) -> None:
        self.process.stdin.close()
        if self.process.wait() != 0:
            raise RenderError(f"ffmpeg could not encode the frames: {self.process.stderr.read().decode()[-2000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()


def _play(env, obs, actions, act, limit: int):
    """The rollout step by step: (obs, info, done) after each action (recorded, or ``act``'s chunks)."""
    done, step, plan, k = False, 0, None, 0
    while not done and step < limit and (actions is None or step < len(actions)):
        if actions is not None:
            action = actions[step]
        else:
            if plan is None or k >= len(plan):
                plan, k = np.atleast_2d(act(obs)), 0
            action = plan[k]
            k += 1
        obs, _, terminated, truncated, info = env.step(np.clip(action, env.action_low, env.action_high))
        done = terminated or truncated
        step += 1
        yield obs, info


def _in_play(info) -> int:
    return int(np.count_nonzero(info["pressed"] | info["target"]))


def render_in_process(midi, env_cfg, out: str | Path, *, actions: np.ndarray | None = None,
                      act: Callable[[np.ndarray], np.ndarray] | None = None, seed: int = 0,
                      width: int = DEFAULT_SIZE[0], height: int = DEFAULT_SIZE[1], max_steps: int | None = None,
                      soundfont: str | None = None, quality: str = "fast", poster: str | Path | None = None,
                      progress: bool = False) -> RenderResult:
    """Play the chunk ``midi`` in the environment (``actions`` replayed, or ``act`` asked for
    action chunks), render every step and write ``out`` atomically: a clip in the container its
    extension names, or (``.png``) the poster frame alone. ``poster``: also write the poster frame
    there. MuJoCo's OpenGL backend in this process must work (see :func:`render_rollout`).
    ``quality`` fast leaves out shadows, reflections and anti-aliasing (software OpenGL draws
    them many times slower, ``tests/benchmarks/bench_render.py``), full keeps RoboPianist's look. ``progress``: a progress bar on stderr."""
    from tqdm import tqdm

    from workers.piano.audio import TAIL_S, write_wav, synthesize
    from workers.piano.env import make_env
    from workers.piano.view import PianoView

    if (actions is None) == (act is None):
        raise ValueError("give either recorded actions or a policy's act function")
    if quality not in QUALITIES:
        raise ValueError(f"quality {quality!r}: expected one of {QUALITIES}")
    out = Path(out)
    ext = container(out)
    width, height = _even(width), _even(height)
    env = make_env(midi, env_cfg, seed=seed)
    fps = int(round(1.0 / env_cfg.control_timestep))
    limit = env.n_steps if max_steps is None else min(max_steps, env.n_steps)
    step = tail = 0
    try:
        obs, _ = env.reset(seed=seed)
        with tempfile.TemporaryDirectory(prefix="pianoforge-render-") as tmp:
            if ext in STILLS:  # the step with the most keys in play, found without rendering, then replayed to
                busiest = max(enumerate(_play(env, obs, actions, act, limit)), key=lambda e: _in_play(e[1][1]),
                              default=(-1, None))[0]
                if busiest < 0:
                    raise RenderError("the rollout has no steps to render")
                for step, (obs, info) in enumerate(_play(env, env.reset(seed=seed)[0], actions, act, busiest + 1), 1):
                    pass
                view = PianoView(env, width, height, quality=quality)
                _write_still(view.frame(info["pressed"], info["target"], env.upcoming), Path(tmp) / "still.png", out)
                metrics = env.episode_metrics()
            else:
                video_args, audio_args = CONTAINERS[ext]
                video = Path(tmp) / f"video{ext}"
                encoder = _Encoder(video, width, height, fps, video_args)
                pressed, sustain = [], []
                best = (-1, None)
                try:
                    view = PianoView(env, width, height, quality=quality)
                    frame = view.frame(upcoming=env.upcoming)
                    bar = tqdm(total=limit, unit="step", desc=f"rendering {out.name}", disable=not progress,
                               file=sys.stderr)
                    for obs, info in _play(env, obs, actions, act, limit):
                        pressed.append(info["pressed"])
                        sustain.append(info["sustain_pressed"])
                        frame = view.frame(info["pressed"], info["target"], env.upcoming)
                        encoder.write(frame)
                        if poster is not None and _in_play(info) > best[0]:
                            best = (_in_play(info), frame)
                        step += 1
                        bar.update()
                    bar.close()
                    tail = int(round(TAIL_S * fps))
                    for _ in range(tail):  # hold the last picture while the last notes ring out
                        encoder.write(frame)
                    encoder.close()
                finally:
                    encoder.kill()
                if step == 0:
                    raise RenderError("the rollout has no steps to render")
                metrics = env.episode_metrics()
                wav = write_wav(Path(tmp) / "audio.wav",
                                synthesize(np.stack(pressed), env_cfg.control_timestep, np.asarray(sustain), soundfont))
                muxed = Path(tmp) / f"clip{ext}"
                mux = subprocess.run([_ffmpeg(), "-loglevel", "error", "-y", "-i", str(video), "-i", str(wav),
                                      "-c:v", "copy", *audio_args, str(muxed)], capture_output=True)
                if mux.returncode != 0:
                    raise RenderError(f"ffmpeg could not add the sound: {mux.stderr.decode()[-2000:]}")
                _publish(muxed, out)
                if poster is not None:
                    _write_still(best[1] if best[1] is not None else frame, Path(tmp) / "poster.png", Path(poster))
    finally:
        env.close()
    return RenderResult(path=str(out), steps=step, frames=1 if ext in STILLS else step + tail, width=width, height=height, fps=fps,
                        f1=metrics["f1"], precision=metrics["precision"], recall=metrics["recall"], seed=seed,
                        gl=os.environ.get("MUJOCO_GL", ""))


def _publish(path: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f, open(path, "rb") as src:
        shutil.copyfileobj(src, f)


def _write_still(frame: np.ndarray, tmp: Path, out: Path) -> None:
    """``frame`` as a PNG at ``out`` (atomically; encoded by ffmpeg)."""
    encoder = _Encoder(tmp, frame.shape[1], frame.shape[0], 1, ["-frames:v", "1"])
    try:
        encoder.write(frame)
        encoder.close()
    finally:
        encoder.kill()
    _publish(tmp, out)


# -- the child process ---------------------------------------------------------------------------


def render_rollout(song_path: str | Path, chunk_index: int, env_cfg, out: str | Path, *,
                   actions: np.ndarray | None = None, policy: str | Path | None = None, seed: int = 0,
                   width: int = DEFAULT_SIZE[0], height: int = DEFAULT_SIZE[1], max_steps: int | None = None,
                   soundfont: str | None = None, song_hash: str | None = None, quality: str = "fast",
                   poster: str | Path | None = None, progress: bool = False, timeout_s: float = 3600) -> RenderResult:
    """Render chunk ``chunk_index`` of the song at ``song_path`` to ``out`` in a child process
    (with an OpenGL backend that works here): ``actions`` float[T, 39] replayed from ``seed``,
    or the policy file ``policy`` (an exported specialist or an imitation policy) played.
    ``poster``, ``progress``: see :func:`render_in_process` (the child's progress bar and messages
    go to this process's stderr). Raises :class:`RenderError` (with the child's last words) when it
    fails, before any work when ``out``'s extension names no container it can write."""
    if (actions is None) == (policy is None):
        raise ValueError("give either recorded actions or a policy file")
    container(out)
    backend = gl_backend()
    with tempfile.TemporaryDirectory(prefix="pianoforge-render-") as tmp:
        request: dict[str, Any] = {
            "song_path": str(song_path), "chunk_index": int(chunk_index), "song_hash": song_hash,
            "env": env_cfg.model_dump(mode="json"), "out": str(Path(out).absolute()), "seed": int(seed),
            "width": int(width), "height": int(height), "max_steps": max_steps, "soundfont": soundfont, "quality": quality,
            "policy": None if policy is None else str(Path(policy).absolute()), "actions": None,
            "poster": None if poster is None else str(Path(poster).absolute()), "progress": progress,
        }
        if actions is not None:
            request["actions"] = str(Path(tmp) / "actions.npy")
            np.save(request["actions"], np.asarray(actions, dtype=np.float32))
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        env = dict(os.environ, MUJOCO_GL=backend, PYOPENGL_PLATFORM=backend)
        child = subprocess.run([sys.executable, "-m", "workers.piano.render", str(Path(tmp) / "request.json")],
                               env=env, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE,
                               text=True, timeout=timeout_s)
    if child.returncode != 0:
        words = "see its messages above" if progress else child.stderr.strip()[-3000:]
        raise RenderError(f"rendering {out} failed (MUJOCO_GL={backend}): {words}")
    return RenderResult(**json.loads(child.stdout.strip().splitlines()[-1]))


def _main(argv: Sequence[str]) -> None:
    import configs
    from workers.piano.music import load_chunk

    request = json.loads(Path(argv[0]).read_text())
    env_cfg = configs.EnvConfig(**request["env"])
    midi = load_chunk(request["song_path"], request["chunk_index"], env_cfg, expected_hash=request["song_hash"])
    kwargs = dict(seed=request["seed"], width=request["width"], height=request["height"],
                  max_steps=request["max_steps"], soundfont=request["soundfont"], quality=request["quality"],
                  poster=request["poster"], progress=request["progress"])
    if request["actions"] is not None:
        result = render_in_process(midi, env_cfg, request["out"], actions=np.load(request["actions"]), **kwargs)
    else:
        from workers.imitation.export import load_any_policy

        policy = load_any_policy(request["policy"])
        result = render_in_process(midi, env_cfg, request["out"], act=policy.act, **kwargs)
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    _main(sys.argv[1:])
