"""How fast songs load and plan: per bundled song, a long synthetic song, and a manifest of many songs.

    .venv/bin/python tests/benchmarks/bench_music.py [--songs 300]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pretty_midi
import robopianist

import configs
from orchestrator.manifest import load_manifest
from workers.piano.music import load_song, plan_chunks


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def synthetic_song(path: Path, minutes: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    pm = pretty_midi.PrettyMIDI()
    for hand, (low, high) in enumerate([(36, 60), (60, 96)]):
        inst = pretty_midi.Instrument(program=0, name=f"hand{hand}")
        t = 0.0
        while t < minutes * 60:
            d = float(rng.choice([0.125, 0.25, 0.5]))
            inst.notes.append(pretty_midi.Note(int(rng.integers(40, 110)), int(rng.integers(low, high)), t, t + d))
            t += d
        inst.control_changes = [pretty_midi.ControlChange(64, 127 * (i % 2), i * 2.0) for i in range(int(minutes * 30))]
        pm.instruments.append(inst)
    pm.write(str(path))
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--songs", type=int, default=300, help="songs in the manifest benchmark")
    args = parser.parse_args()
    cfg = configs.load()
    env = cfg.env
    songs = sorted((Path(robopianist.__file__).parent / "music" / "data" / "rousseau").glob("*.mid"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        songs.append(synthetic_song(tmp / "ten-minutes.mid", 10, seed=0))
        print(f"{'song':28s} {'notes':>6s} {'chunks':>6s} {'load ms':>8s} {'plan ms':>8s} {'midi ms/chunk':>14s}")
        for path in songs:
            song, t_load = timed(lambda: load_song(path), 20)
            plan, t_plan = timed(lambda: plan_chunks(song, env), 20)
            t0 = time.perf_counter()
            for _ in range(5):
                for chunk in plan_chunks(song, env).chunks:
                    chunk.midi
            t_midi = (time.perf_counter() - t0) / 5 / len(plan.chunks)
            print(f"{path.stem:28s} {song.n_notes:6d} {len(plan.chunks):6d} {t_load * 1e3:8.1f} {t_plan * 1e3:8.2f} "
                  f"{t_midi * 1e3:14.1f}")

        (tmp / "many").mkdir()
        for i in range(args.songs):
            synthetic_song(tmp / "many" / f"s{i}.mid", minutes=2, seed=i + 1)
        (tmp / "many.csv").write_text("path\n" + "".join(f"many/s{i}.mid\n" for i in range(args.songs)))
        t = time.perf_counter()
        manifest = load_manifest(tmp / "many.csv", cfg)
        elapsed = time.perf_counter() - t
        units = manifest.units()
        print(f"manifest: {len(manifest.songs)} two-minute songs, {len(units)} units in {elapsed:.2f} s "
              f"({elapsed / len(manifest.songs) * 1e3:.1f} ms per song; {len(manifest.problems)} problems)")


if __name__ == "__main__":
    main()
