"""What the researcher-facing tools cost: normalisation from the lake's statistics vs a pass over
the data, the LeRobot export's speed and size next to the lake, rendering a rollout video, and
Ray's dashboard at cluster start.

    .venv/bin/python tests/benchmarks/bench_researchers.py [--shards 8] [--episodes 4] [--steps 550] [--skip-render] [--skip-ray]

Shards are synthetic (``workers.lake.synthetic_episode``). The render row plays 40 steps of
Twinkle Twinkle with random actions through ``workers.piano.render.render_in_process`` at 320x240.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def bench_lake(args) -> None:
    import configs
    from workers.imitation.policies import normalization_stats
    from workers.imitation.trainer import dataset_stats
    from workers.lake import Lake, ShardMeta, synthetic_episode
    from workers.lake.lerobot import export_lerobot

    with tempfile.TemporaryDirectory() as tmp:
        lake = Lake(Path(tmp) / "lake", configs.load().lake)
        t = time.perf_counter()
        for i in range(args.shards):
            meta = ShardMeta(unit_id=f"u{i:03d}", song_hash=f"s{i:03d}".ljust(64, "0"), song_name=f"song {i}",
                             chunk_index=0, split="train", config_hash="c", specialist_f1=0.9)
            lake.commit_shard(meta, [synthetic_episode(args.steps, seed=i * 100 + e) for e in range(args.episodes)])
        commit_s = time.perf_counter() - t
        shards = lake.shards()
        steps = sum(s.n_steps for s in shards)

        t = time.perf_counter()
        dataset_stats(lake.root, shards)
        from_stats = time.perf_counter() - t
        t = time.perf_counter()
        episodes = [e for s in shards for e in lake.read_episodes(s)]
        normalization_stats(np.concatenate([e.obs for e in episodes]), np.concatenate([e.action for e in episodes]))
        full_pass = time.perf_counter() - t
        del episodes

        t = time.perf_counter()
        summary = export_lerobot(lake.root, Path(tmp) / "lerobot")
        export_s = time.perf_counter() - t
        lake_mb, export_mb = du(lake.root / "data") / 1e6, du(Path(tmp) / "lerobot") / 1e6
        print(f"lake: {args.shards} shards, {steps} steps; committed in {commit_s:.1f} s (statistics included)")
        print(f"normalisation from meta/stats: {from_stats * 1e3:.1f} ms   from a pass over the data: "
              f"{full_pass * 1e3:.0f} ms   ({full_pass / from_stats:.0f}x)")
        print(f"LeRobot export: {summary.frames / export_s:.0f} frames/s; {export_mb:.1f} MB vs lake {lake_mb:.1f} MB "
              f"({export_mb / lake_mb:.1f}x: observation.state is float32[1144], the lake packs the goal bits)")


def bench_render() -> None:
    import configs
    from workers.piano.render import gl_backend

    os.environ["MUJOCO_GL"] = os.environ["PYOPENGL_PLATFORM"] = gl_backend()
    from robopianist.music.midi_file import MidiFile
    import robopianist

    from workers.piano.render import render_in_process

    env_cfg = configs.load(overrides=["env.chunk_steps=40"]).env
    midi = MidiFile.from_file(Path(robopianist.__file__).parent / "music/data/rousseau/twinkle-twinkle-trimmed.mid")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        result = render_in_process(midi.stretch(1.25), env_cfg, Path(tmp) / "clip.mp4", act=lambda obs: rng.uniform(-1, 1, (1, 39)),
                                   width=320, height=240, max_steps=40)
        seconds = time.perf_counter() - t
    print(f"render: {result.steps} steps at 320x240 with sound in {seconds:.1f} s ({result.frames / seconds:.1f} frames/s, "
          f"OpenGL {result.gl}, environment build included)")


def bench_ray() -> None:
    import subprocess
    import sys

    code = ("import time, ray, psutil; t = time.perf_counter(); ray.init(num_cpus=1, include_dashboard={on}, "
            "dashboard_port=0, log_to_driver=False); s = time.perf_counter() - t; "
            "rss = sum(p.memory_info().rss for p in psutil.Process().children(recursive=True)); "
            "print(f'{{s:.1f}} {{rss / 2**20:.0f}}'); ray.shutdown()")
    rows = {}
    for on in (False, True):
        out = subprocess.run([sys.executable, "-c", code.format(on=on)], capture_output=True, text=True).stdout.split()
        rows[on] = (float(out[0]), float(out[1]))
    print(f"ray.init without dashboard: {rows[False][0]:.1f} s, {rows[False][1]:.0f} MiB in Ray's processes; with: "
          f"{rows[True][0]:.1f} s, {rows[True][1]:.0f} MiB (+{rows[True][1] - rows[False][1]:.0f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=550)
    parser.add_argument("--skip-render", action="store_true")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    bench_lake(args)
    if not args.skip_render:
        bench_render()
    if not args.skip_ray:
        bench_ray()


if __name__ == "__main__":
    main()
