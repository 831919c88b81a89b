"""Learning curves: does the learner learn, and which settings learn the piano fastest?

    .venv/bin/python tests/benchmarks/bench_learning.py [--parts cartpole,easy,twinkle]
        [--grid defaults,temp0.1,temp0.1-tau0.005,temp0.1-utd2-n3] [--seeds 0,1]
        [--cartpole-steps 20000] [--piano-steps 20000] [--eval-every 1000] [--out bench_learning]
    .venv/bin/python tests/benchmarks/bench_learning.py --merge run1/learning.json run2/learning.json --out merged

Prints one table per part (evaluation return or F1 at each evaluation step, per setting and
seed) and the steps to reach F1 0.5 and 0.75, and writes ``OUT/learning.png`` (mean over seeds
per setting) and ``OUT/learning.json`` (every point).

- ``cartpole``: the DroQ learner alone on dm_control's cartpole swingup (state observations,
  discount 0.99, action repeat 8, 1000-step episodes so a return of 1000 is the maximum);
  steps are environment steps. A learner that works reaches ~850.
- ``easy``: the specialist (``train_unit``, the real loop) on a generated easy piece: C4 D4 E4
  D4 twice, each held 1 s with 0.25 s between (about 250 control steps). Pressing nothing
  scores F1 ~0.16 here, random actions 0.11-0.13.
- ``twinkle``: the specialist on the first chunk of RoboPianist's bundled Twinkle Twinkle.
- ``evalshare``: seconds per evaluation step and per training step of a specialist with
  today's defaults (``--piano-steps`` steps, evaluations every ``--eval-every``), and the share
  of a unit's training time evaluations take at several ``eval_interval`` / ``eval_episodes``.

``--grid`` picks settings by name (``GRID`` below: today's defaults, ``init_temperature`` 0.1,
``tau`` 0.005 against the default 0.05, ``utd_ratio`` 2 or 4 with ``n_step`` 3); ``--batch``
sets the piano runs' batch size (128 by default, as in the earlier measurements of the easy piece). Every run
is seeded; times are this machine's (``OMP_NUM_THREADS=1``, one torch thread per run).

The piano runs of one setting train as one pack (``train_pack``: every piece x seed a member,
each with its own seed, buffer and evaluations, exactly as it would train alone), so a setting
costs one process and one batched update per step; ``--solo`` trains them one after another
with ``train_unit`` instead. ``OUT/learning.json`` is rewritten after each setting, so a long
grid keeps what it has measured; settings run separately join with ``--merge``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import robopianist
import torch

import configs
from workers.piano.music import load_song
from workers.rl.droq import DroQ
from workers.rl.replay import ReplayBuffer
from workers.rl.pack import train_pack, train_unit
from workers.rl.specialist import seed_everything
from workers.units import UnitSpec

TWINKLE = Path(robopianist.__file__).parent / "music" / "data" / "rousseau" / "twinkle-twinkle-trimmed.mid"
GRID: dict[str, dict] = {
    "defaults": {},
    "temp0.1": {"droq.init_temperature": 0.1},
    "temp0.1-tau0.005": {"droq.init_temperature": 0.1, "droq.tau": 0.005},
    "temp0.1-utd2-n3": {"droq.init_temperature": 0.1, "droq.utd_ratio": 2, "droq.n_step": 3},
    "temp0.1-utd4-n3": {"droq.init_temperature": 0.1, "droq.utd_ratio": 4, "droq.n_step": 3},
    "temp0.1-tau0.005-utd2-n3": {"droq.init_temperature": 0.1, "droq.tau": 0.005, "droq.utd_ratio": 2,
                                 "droq.n_step": 3},
}
THRESHOLDS = (0.5, 0.75)
ACTION_REPEAT = 8


# --- cartpole ----------------------------------------------------------------------------
def cartpole_curve(overrides: dict, seed: int, steps: int, eval_every: int) -> list[tuple[int, float]]:
    """(environment step, evaluation return) of DroQ on cartpole swingup."""
    from dm_control import suite

    cfg = configs.load(overrides={"droq.discount": 0.99, "droq.warmup_steps": 1000, **overrides}).droq
    env = suite.load("cartpole", "swingup", task_kwargs={"random": seed})
    test = suite.load("cartpole", "swingup", task_kwargs={"random": seed + 1})
    spec = env.action_spec()
    flat = lambda ts: np.concatenate([np.ravel(v) for v in ts.observation.values()]).astype(np.float32)  # noqa: E731
    obs_dim = flat(env.reset()).shape[0]
    rng = seed_everything(seed)
    agent = DroQ(obs_dim, spec.shape[0], spec.minimum, spec.maximum, cfg)
    buffer = ReplayBuffer(obs_dim, spec.shape[0], steps // ACTION_REPEAT + 10, cfg.discount, cfg.n_step,
                          binary_dims=0, seed=seed)

    def act_repeat(environment, action) -> tuple[float, object]:
        reward = 0.0
        for _ in range(ACTION_REPEAT):
            ts = environment.step(action)
            reward += ts.reward or 0.0
            if ts.last():
                break
        return reward, ts

    def evaluate() -> float:
        ts, total = test.reset(), 0.0
        while not ts.last():
            reward, ts = act_repeat(test, agent.act(flat(ts)[None], deterministic=True)[0])
            total += reward
        return total

    curve, ts = [], env.reset()
    obs = flat(ts)
    for agent_step in range(1, steps // ACTION_REPEAT + 1):
        if agent_step * ACTION_REPEAT <= cfg.warmup_steps:
            action = rng.uniform(spec.minimum, spec.maximum).astype(np.float32)
        else:
            action = agent.act(obs[None])[0]
        reward, ts = act_repeat(env, action)
        next_obs = flat(ts)
        buffer.add(obs, action, reward, next_obs, terminated=False, truncated=ts.last())  # time limit only
        obs = next_obs
        if ts.last():
            ts = env.reset()
            obs = flat(ts)
        if agent_step * ACTION_REPEAT > cfg.warmup_steps:
            agent.update([buffer])
        if (agent_step * ACTION_REPEAT) % eval_every == 0:
            curve.append((agent_step * ACTION_REPEAT, evaluate()))
    return curve


# --- the specialist on a piece -------------------------------------------------------------
def easy_piece(path: Path) -> Path:
    """C4 D4 E4 D4 twice, each held 1 s with 0.25 s between, as a MIDI file."""
    from note_seq import midi_io
    from note_seq.protobuf import music_pb2

    seq = music_pb2.NoteSequence()
    seq.ticks_per_quarter = 220
    seq.tempos.add(qpm=120)
    for i, pitch in enumerate([60, 62, 64, 62] * 2):
        seq.notes.add(pitch=pitch, velocity=80, start_time=1.25 * i, end_time=1.25 * i + 1.0)
    seq.total_time = max(n.end_time for n in seq.notes)
    midi_io.sequence_proto_to_midi_file(seq, str(path))
    return path


def f1_curve(reports: list[dict]) -> list[tuple[int, float]]:
    """(step, evaluation F1) of a unit's reports."""
    return [(r["step"], r["eval/f1"]) for r in reports if "eval/f1" in r]


def piano_cfg(overrides: dict, seed: int, steps: int, eval_every: int, batch: int) -> configs.Config:
    return configs.load(overrides={"droq.batch_size": batch, "droq.replay_capacity": steps + 1000,
                                   "specialist.total_steps": steps, "specialist.eval_interval": eval_every,
                                   "specialist.checkpoint_interval": 10 ** 9, "specialist.log_interval": eval_every,
                                   "specialist.rollouts": 0, "specialist.seed": seed, **overrides})


def piano_unit(song: Path, cfg: configs.Config, overrides: dict | None = None) -> UnitSpec:
    parsed = load_song(song)
    hashed = cfg.with_overrides(overrides) if overrides else cfg
    return UnitSpec.create(song_path=str(song), song_hash=parsed.content_hash, song_name=parsed.name, chunk_index=0,
                           config_hash=hashed.hash("env", "droq", "specialist"), overrides=overrides)


def piano_curve(song: Path, overrides: dict, seed: int, steps: int, eval_every: int, batch: int,
                work: Path) -> tuple[list[tuple[int, float]], float]:
    """(step, evaluation F1) of one specialist on chunk 0 of ``song``, and the share of its
    training time spent in evaluations."""
    cfg = piano_cfg(overrides, seed, steps, eval_every, batch)
    reports: list[dict] = []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        t = time.perf_counter()
        result = train_unit(piano_unit(song, cfg), cfg, Path(tmp) / "unit", Path(tmp) / "lake",
                            report=reports.append, progress=False)
        seconds = time.perf_counter() - t
    return f1_curve(reports), result.eval_seconds / seconds


def piano_pack(songs: dict[str, Path], overrides: dict, seeds: list[int], steps: int, eval_every: int, batch: int,
               work: Path) -> dict[tuple[str, int], tuple[list[tuple[int, float]], float]]:
    """One setting's specialists, every (piece, seed), trained as one pack (``train_pack``: one
    batched learner, the environments in this process): (piece, seed) -> (step, evaluation F1)
    curve and its evaluation share. Members share the droq.* settings and differ in their
    piece and ``specialist.seed``; a packed update equals the members' single updates
    (tests/test_pack.py), so each curve is what that specialist alone would learn."""
    cfg = piano_cfg(overrides, seeds[0], steps, eval_every, batch)
    keys = [(part, seed) for part in songs for seed in seeds]
    units = [piano_unit(songs[part], cfg, {"specialist.seed": seed}) for part, seed in keys]
    reports: dict[tuple[str, int], list[dict]] = {key: [] for key in keys}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        outcomes = train_pack(units, cfg, [Path(tmp) / f"unit{i}" for i in range(len(units))], Path(tmp) / "lake",
                              [reports[key].append for key in keys], env_workers=0, progress=True)
    curves = {}
    for key, outcome in zip(keys, outcomes):
        if outcome.error is not None:
            raise RuntimeError(f"{key}: {outcome.error}") from outcome.error
        curves[key] = (f1_curve(reports[key]), outcome.result.eval_seconds / outcome.result.seconds)
    return curves


def evaluation_cost(steps: int, eval_every: int, work: Path) -> dict[str, float]:
    """Seconds per evaluation step and per training step (after the warm-up) of one specialist on
    the Twinkle chunk with today's defaults (batch 256, utd 1, 3 x 256 networks)."""
    warmup = 100
    cfg = configs.load(overrides={"droq.warmup_steps": warmup, "droq.replay_capacity": steps + 1000,
                                  "specialist.total_steps": steps, "specialist.eval_interval": eval_every,
                                  "specialist.checkpoint_interval": 10 ** 9, "specialist.log_interval": 100,
                                  "specialist.rollouts": 0})
    parsed = load_song(TWINKLE)
    unit = UnitSpec.create(song_path=str(TWINKLE), song_hash=parsed.content_hash, song_name=parsed.name,
                           chunk_index=0, config_hash=cfg.hash("env", "droq", "specialist"))
    reports: list[dict] = []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        result = train_unit(unit, cfg, Path(tmp) / "unit", Path(tmp) / "lake", report=reports.append, progress=False)
    n_evals = sum("eval/f1" in r for r in reports)
    train_rate = np.mean([r["perf/env_steps_per_s"] for r in reports if "perf/env_steps_per_s" in r
                          and r["step"] > warmup + 100])
    # An evaluation plays the whole chunk (cfg.env.chunk_steps control steps) with the policy mean.
    return {"eval_step_s": result.eval_seconds / (n_evals * cfg.env.chunk_steps), "train_step_s": 1.0 / train_rate,
            "chunk_steps": cfg.env.chunk_steps}


def steps_to(curve: list[tuple[int, float]], level: float) -> int | None:
    return next((s for s, v in curve if v >= level), None)


# --- output --------------------------------------------------------------------------------
def print_table(title: str, runs: dict[tuple[str, int], list[tuple[int, float]]], f1: bool) -> None:
    steps = sorted({s for curve in runs.values() for s, _ in curve})
    print(f"\n## {title}")
    head = ["setting", "seed", *(f"{s // 1000}k" if s % 1000 == 0 else str(s) for s in steps)]
    if f1:
        head += [f"to F1 {t}" for t in THRESHOLDS]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for (name, seed), curve in runs.items():
        values = dict(curve)
        row = [name, str(seed), *(f"{values[s]:.2f}" if f1 and s in values else
                                  (f"{values[s]:.0f}" if s in values else "") for s in steps)]
        if f1:
            row += [str(steps_to(curve, t) or "-") for t in THRESHOLDS]
        print("| " + " | ".join(row) + " |")


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, (part, runs) in zip(axes[0], results.items()):
        by_setting: dict[str, list] = {}
        for (name, _), curve in runs.items():
            by_setting.setdefault(name, []).append(dict(curve))
        for name, curves in by_setting.items():
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(steps, [np.mean([c[s] for c in curves]) for s in steps], marker=".", label=f"{name} (n={len(curves)})")
        ax.set_title(part)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("evaluation return" if part == "cartpole" else "evaluation F1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save(out: Path, args: argparse.Namespace, results: dict[str, dict], meta: dict) -> None:
    (out / "learning.json").write_text(json.dumps(
        {"args": vars(args), "runs": {f"{p}/{n}/{s}": c for p, r in results.items() for (n, s), c in r.items()},
         "meta": meta}, indent=1))


def merge(files: list[Path], out: Path) -> None:
    """One table per part and one plot over the runs of several ``learning.json`` files."""
    results: dict[str, dict] = {}
    for f in files:
        for key, curve in json.loads(f.read_text())["runs"].items():
            part, name, seed = key.split("/")
            results.setdefault(part, {})[(name, int(seed))] = [tuple(point) for point in curve]
    for part, runs in results.items():
        print_table(f"{part}: evaluation {'return' if part == 'cartpole' else 'F1'} vs steps",
                    dict(sorted(runs.items())), f1=part != "cartpole")
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "learning.png")
    print(f"\nwrote {out / 'learning.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="cartpole,easy,twinkle,evalshare")
    parser.add_argument("--grid", default=",".join(GRID), help=f"settings among {', '.join(GRID)}")
    parser.add_argument("--cartpole-grid", default="defaults", help="settings for cartpole")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--cartpole-steps", type=int, default=20_000)
    parser.add_argument("--piano-steps", type=int, default=20_000)
    parser.add_argument("--eval-every", type=int, default=1000, help="piano: steps between evaluations")
    parser.add_argument("--cartpole-eval-every", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128, help="piano runs' batch size")
    parser.add_argument("--solo", action="store_true",
                        help="train the piano specialists one after another, not one pack per setting")
    parser.add_argument("--out", default="bench_learning")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="instead of running: print the tables and draw one plot of these learning.json files "
                             "(runs done separately, e.g. one setting per core)")
    args = parser.parse_args()
    if args.merge:
        merge([Path(f) for f in args.merge], Path(args.out))
        return

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = args.parts.split(",")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; seeds {seeds}")
    results: dict[str, dict] = {}
    meta: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        songs = {"easy": easy_piece(work / "easy.mid"), "twinkle": TWINKLE}
        if "evalshare" in parts:
            cost = evaluation_cost(args.piano_steps, args.eval_every, work)
            meta["evalshare"] = cost
            print(f"\n## evaluation share of a unit's training time (Twinkle chunk, defaults)\n"
                  f"evaluation {1 / cost['eval_step_s']:.0f} steps/s, training {1 / cost['train_step_s']:.0f} steps/s")
            print("| eval_interval | eval_episodes | share |\n|---|---|---|")
            for interval in (10_000, 5_000, 2_000):
                for episodes in (1, 3):
                    e = episodes * cost["chunk_steps"] * cost["eval_step_s"]
                    print(f"| {interval} | {episodes} | {e / (e + interval * cost['train_step_s']):.1%} |")
        if "cartpole" in parts:
            runs: dict[tuple[str, int], list] = {}
            for name in args.cartpole_grid.split(","):
                for seed in seeds:
                    t = time.perf_counter()
                    runs[(name, seed)] = cartpole_curve(GRID[name], seed, args.cartpole_steps, args.cartpole_eval_every)
                    seconds = time.perf_counter() - t
                    meta[f"cartpole/{name}/{seed}"] = {"seconds": seconds}
                    print(f"cartpole {name} seed {seed}: {seconds:.0f} s", flush=True)
            results["cartpole"] = runs
            print_table("cartpole: evaluation return vs steps", runs, f1=False)
        pieces = {p: songs[p] for p in parts if p in songs}
        for name in args.grid.split(",") if pieces else []:
            t = time.perf_counter()
            if args.solo:
                curves = {(part, seed): piano_curve(song, GRID[name], seed, args.piano_steps, args.eval_every,
                                                    args.batch, work) for part, song in pieces.items() for seed in seeds}
            else:
                curves = piano_pack(pieces, GRID[name], seeds, args.piano_steps, args.eval_every, args.batch, work)
            seconds = time.perf_counter() - t
            print(f"{name}: {len(curves)} specialists, {seconds:.0f} s" + (" (one after another)" if args.solo
                                                                           else " (one pack)"), flush=True)
            for (part, seed), (curve, share) in curves.items():
                results.setdefault(part, {})[(name, seed)] = curve
                meta[f"{part}/{name}/{seed}"] = {"seconds": seconds, "eval_share": share, "packed": not args.solo}
                print(f"  {part} seed {seed}: evaluation {share:.1%} of training time")
            save(out, args, results, meta)  # a long grid keeps what it has measured
        for part in pieces:
            if part in results:
                print_table(f"{part}: evaluation F1 vs steps", results[part], f1=True)
    save(out, args, results, meta)
    if results:
        plot(results, out / "learning.png")
    print(f"\nwrote {out / 'learning.json'}" + (f" and {out / 'learning.png'}" if results else ""))


if __name__ == "__main__":
    main()
