"""Evaluations and rollouts of a pack: played in the environment workers while the pack trains
the other members, versus played in the pack process while every member waits.

Run: OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_pack_play.py [--k 4] [--steps 600]
     [--rollouts 10] [--hidden 64,64] [--batch 64] [--rounds 1] [--workers N]

A pack of K members on K chunks of one song (``--chunk-steps`` steps each), with staggered
budgets (member i trains ``--steps`` x (i + 1) / K steps, so the others still train while one
records its rollouts), evaluating every ``--eval-interval`` steps and recording ``--rollouts``
episodes at its end, is trained twice per round with ``train_pack``: ``play_in_workers`` on and
off. Prints per mode: wall seconds; seconds after setup (from the pack's first report, training
under way, to its last, the last rollouts in: the part where playing elsewhere can help),
aggregate training env steps per second over them, and the speed-up of playing in the workers. ``--hidden``/``--batch`` set the networks: small ones make an update
as cheap as it is on a GPU (where an update is ~2 ms), the RP1M ones (256,256,256 / 256) as on
one CPU core. Workers: ``min(K, --workers)`` (default: the CPUs this process may use).
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import robopianist  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import configs  # noqa: E402
from workers.piano.music import load_song, plan_chunks  # noqa: E402
from workers.rl.pack import train_pack  # noqa: E402
from workers.units import UnitSpec  # noqa: E402

SONG = Path(robopianist.__file__).parent / "music" / "data" / "rousseau" / "twinkle-twinkle-trimmed.mid"


def run(cfg: configs.Config, units: list[UnitSpec], root: Path, workers: int, in_workers: bool
        ) -> tuple[float, float, int]:
    """Wall seconds of one pack, the seconds from its first report (setup done, training under
    way) to its last (the last rollouts in), and the training steps its members took."""
    times: list[float] = []
    start = time.perf_counter()
    outcomes = train_pack(units, cfg, [root / u.unit_id for u in units], root / "lake",
                          [lambda metrics: times.append(time.perf_counter())] * len(units),
                          env_workers=workers, play_in_workers=in_workers)
    wall = time.perf_counter() - start
    for o in outcomes:
        if o.error is not None:
            raise RuntimeError(o.error_text)
    return wall, max(times) - min(times), sum(o.result.steps for o in outcomes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600, help="training steps of the longest member")
    parser.add_argument("--chunk-steps", type=int, default=100)
    parser.add_argument("--eval-interval", type=int, default=150)
    parser.add_argument("--rollouts", type=int, default=10)
    parser.add_argument("--hidden", default="64,64")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    torch.set_num_threads(1)

    hidden = [int(h) for h in args.hidden.split(",")]
    cfg = configs.load(overrides={
        "env.chunk_steps": args.chunk_steps, "droq.hidden_dims": hidden, "droq.batch_size": args.batch,
        "droq.replay_capacity": args.steps + 1000, "droq.warmup_steps": min(100, args.steps // 4),
        "specialist.eval_interval": args.eval_interval, "specialist.eval_episodes": 1,
        "specialist.checkpoint_interval": 10 * args.steps, "specialist.log_interval": 50,
        "specialist.rollouts": args.rollouts, "droq.device": "cpu"})
    song = load_song(SONG)
    chunks = [c.index for c in plan_chunks(song, cfg.env).chunks]
    units = []
    for i in range(args.k):
        unit = UnitSpec.create(song_path=str(SONG), song_hash=song.content_hash, song_name=song.name,
                               chunk_index=chunks[i % len(chunks)], config_hash=cfg.hash("env", "droq", "specialist"))
        steps = max(args.eval_interval, args.steps * (i + 1) // args.k)
        units.append(unit.model_copy(update={"unit_id": f"{unit.unit_id}-m{i}",
                                             "overrides": {"specialist.total_steps": steps}}))
    workers = min(args.k, args.workers)
    walls: dict[bool, list[float]] = {True: [], False: []}
    spans: dict[bool, list[float]] = {True: [], False: []}
    steps = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for in_workers in (False, True):  # alternating, so that other load hits both alike
                wall, span, steps = run(cfg, units, Path(tmp) / f"{r}-{in_workers}", workers, in_workers)
                walls[in_workers].append(wall)
                spans[in_workers].append(span)
    plays = sum(u.overrides["specialist.total_steps"] // args.eval_interval + args.rollouts for u in units)
    table = Table(title=f"pack of {args.k}: evaluations and rollouts ({len(os.sched_getaffinity(0))} CPUs, "
                        f"{workers} workers, networks {args.hidden} batch {args.batch}, {steps} training steps, "
                        f"~{plays} episodes of {args.chunk_steps} steps played, median of {args.rounds})")
    for col in ("evaluations and rollouts played", "wall s", "after setup s", "training env steps/s after setup",
                "speed-up after setup"):
        table.add_column(col, justify="right")
    base = float(np.median(spans[False]))
    for in_workers, name in ((False, "in the pack process"), (True, "in the environment workers")):
        wall, span = float(np.median(walls[in_workers])), float(np.median(spans[in_workers]))
        table.add_row(name, f"{wall:.1f}", f"{span:.1f}", f"{steps / span:.0f}", f"{base / span:.2f}x")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
