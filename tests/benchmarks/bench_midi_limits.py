"""What a MIDI file costs to load or to refuse: the scan before mido vs the loader before it.

Four files: a valid 14-minute quartet at 10,080 ticks per quarter note (12.7 million ticks), and
three crafted ones: one note-off 268,435,455 ticks after its note-on (47 bytes), 200,001 notes
(1.6 MB), one note and 1,000,000 sustain-pedal events (4 MB). Each is loaded with ``load_song`` at the default
limits (``configs/default.yaml``) and with the loader of ``--old-rev`` (the last one that counted
ticks after mido had read every message), each in a fresh process: wall time (median of
``--repeat``) and peak Python/numpy memory (tracemalloc, a run of its own).

    .venv/bin/python tests/benchmarks/bench_midi_limits.py [--repeat 3] [--old-rev 460af5d]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]


def _loader(which: str, old_source: Path | None):
    if which == "new":
        from workers.piano.music import SongError, load_song, song_limits

        limits = song_limits()  # configs/default.yaml's, read before the clock starts
        return lambda path: load_song(path, limits=limits), SongError
    spec = importlib.util.spec_from_file_location("old_music", old_source)
    module = sys.modules["old_music"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module.load_song, module.SongError


def measure(which: str, path: Path, old_source: Path | None, memory: bool) -> dict:
    """One load in this process (its imports done first): seconds, or peak MiB with tracemalloc on."""
    load_song, song_error = _loader(which, old_source)
    if memory:
        tracemalloc.start()
    t = time.perf_counter()
    try:
        song = load_song(path)
        result = f"read: {song.n_notes:,} notes, {song.duration:,.0f} s"
    except song_error as e:
        result = "refused: " + str(e).removeprefix(f"{path}: ")
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] / 2**20 if memory else None
    return {"seconds": seconds, "peak_mib": peak, "result": result}


def run(which: str, path: Path, old_source: Path | None, memory: bool) -> dict:
    cmd = [sys.executable, str(HERE), "--measure", which, str(path), str(old_source or ""), str(int(memory))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--old-rev", default="460af5d", help="a commit whose workers/piano/music.py is the old loader")
    parser.add_argument("--no-old", action="store_true", help="measure the new loader only")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from env_fixtures import NOTE_EVENT, PEDAL_EVENT, crafted_midi, write_crafted_midi, write_long_piece

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old_source = None
        if not args.no_old:
            old_source = tmp / "old_music.py"
            old_source.write_text(subprocess.run(["git", "show", f"{args.old_rev}:workers/piano/music.py"], cwd=ROOT,
                                                 capture_output=True, text=True, check=True).stdout)
        files = [("valid quartet, 14 min, 10,080 ticks/beat", write_long_piece(tmp / "quartet.mid")),
                 ("crafted: 268,435,455-tick delta", write_crafted_midi(tmp / "delta.mid")),
                 ("crafted: 200,001 notes", crafted_midi(tmp / "notes.mid", 200_000, NOTE_EVENT)),
                 ("crafted: a note, 1,000,000 pedal events", crafted_midi(tmp / "pedal.mid", 1_000_000, PEDAL_EVENT))]
        print(f"python {sys.version.split()[0]}; default limits from configs/default.yaml; "
              f"old loader: {args.old_rev if old_source else '-'}\n")
        print(f"| file | bytes | loader | result | time (s) | peak memory (MiB) |\n| --- | ---: | --- | --- | ---: | ---: |")
        for label, path in files:
            for which in ["new"] + (["old"] if old_source else []):
                times = [run(which, path, old_source, False) for _ in range(args.repeat if which == "new" else 1)]
                mem = run(which, path, old_source, True)
                result = times[0]["result"]
                print(f"| {label} | {path.stat().st_size:,} | {which} | {result[:90]} | "
                      f"{statistics.median(t['seconds'] for t in times):.3f} | {mem['peak_mib']:.1f} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        sys.path.insert(0, str(ROOT))
        which, path, old, memory = sys.argv[2:6]
        print(json.dumps(measure(which, Path(path), Path(old) if old else None, memory == "1")))
    else:
        main()
