"""Render time per second of video, this tree beside an older revision, in one run.

    .venv/bin/python tests/benchmarks/bench_render.py [--before main] [--steps 100] [--size 640x480] [--repeat 3]

Each side renders the same rollout (the first ``--steps`` control steps of Twinkle Twinkle with
fixed random actions, MP4, fast quality) through its own ``workers.piano.render.render_in_process``
in a child process (``--before``'s tree comes from ``git archive``), with the OpenGL backend
``gl_backend`` picks. Reported: wall seconds per second of video (environment build, rendering,
encoding and sound included; the best of ``--repeat`` runs, the two sides alternating) and frames
per second, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

MEASURE = r"""
import json, sys, tempfile, time
from pathlib import Path
import numpy as np
import robopianist
from robopianist.music.midi_file import MidiFile
import configs
from workers.piano.render import render_in_process

steps, width, height = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
env_cfg = configs.load().env
midi = MidiFile.from_file(Path(robopianist.__file__).parent / "music/data/rousseau/twinkle-twinkle-trimmed.mid")
actions = np.random.default_rng(0).uniform(-1, 1, (steps, 39)).astype(np.float32)
with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    result = render_in_process(midi.stretch(1.25), env_cfg, Path(tmp) / "clip.mp4", actions=actions, width=width,
                               height=height, max_steps=steps)
    seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "frames": result.frames, "fps": result.fps}))
"""


def measure(tree: Path, steps: int, width: int, height: int, backend: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), MUJOCO_GL=backend, PYOPENGL_PLATFORM=backend, OMP_NUM_THREADS="1")
    child = subprocess.run([sys.executable, "-c", MEASURE, str(steps), str(width), str(height)], cwd=tree, env=env,
                           capture_output=True, text=True, timeout=3600)
    if child.returncode != 0:
        raise SystemExit(f"{tree}: {child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main", help="git revision to compare with")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    sys.path.insert(0, str(REPO))
    from workers.piano.render import gl_backend

    backend = gl_backend()
    with tempfile.TemporaryDirectory(prefix="bench-render-") as tmp:
        before = Path(tmp) / "before"
        before.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
        sides = {f"before ({args.before})": before, "after (this tree)": REPO}
        runs: dict[str, list[dict]] = {label: [] for label in sides}
        for _ in range(args.repeat):  # alternating, so that a change in the machine's load hits both sides
            for label, tree in sides.items():
                runs[label].append(measure(tree, args.steps, width, height, backend))
        rows = {}
        for label, measured in runs.items():
            best = min(measured, key=lambda r: r["seconds"])
            rows[label] = (best["seconds"] / (best["frames"] / best["fps"]), best["frames"] / best["seconds"])
    print(f"render {args.steps} steps of Twinkle at {width}x{height}, MP4, OpenGL {backend}, best of {args.repeat}")
    print(f"{'':22s} {'s per video s':>14s} {'frames/s':>9s}")
    for label, (per_second, fps) in rows.items():
        print(f"{label:22s} {per_second:14.2f} {fps:9.1f}")
    (b, _), (a, _) = rows.values()
    print(f"after / before: {a / b:.2f}")


if __name__ == "__main__":
    main()
