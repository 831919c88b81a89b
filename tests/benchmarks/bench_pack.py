"""How much a DroQ update costs per agent when K agents are packed into one learner.

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_pack.py [--reps 3] [--iters 2]

Prints, side by side in one run (RP1M networks: 3 x 256, 2 Qs, batch 256, obs 1144, action 39):
- the DroQ update as it was before packing (the file at ``--baseline``, a git revision), one
  thread: the reference every ratio is taken against;
- a pack of K = 1, 4, 8, 16 agents, one thread: ms per update of the whole pack and per agent,
  with a dense goal input, with ``droq.sparse_goal`` (the CPU default), and with that and
  ``droq.matmul_precision: medium`` (bf16 matmuls where the CPU has them);
- threads: a pack of 1 with 1 thread, 2 threads and OMP_WAIT_POLICY=PASSIVE, and 2 threads with
  OpenMP's default spinning, each in its own process (the policy is read when torch loads);
- on CUDA when present: the same packs on the GPU, K up to 64, and a table per device and
  variant of what packing buys: each member's update rate relative to a solo agent's
  (ms of K=1 / ms of K: the step rate of a member when the update is what bounds it) and the
  device-hours of updates per 8M-step specialist (8M x ms/agent); the issue's GPU target is
  >= 16 agents at >= 0.8 of the solo rate, <= 0.5 GPU-hours per specialist.

``--devices cuda`` runs the GPU rows alone (no CPU rows, no thread rows: a GPU node's short
lease is for the GPU); ``tests/benchmarks/device_checks.sh`` runs it that way.

Single-thread rows are the process's CPU time (on a shared machine wall time also counts the
wait for a core); measurements are interleaved (every configuration once per repetition) and
the median is reported, so a neighbour's load hits all rows alike. Thread rows are wall time
(what more threads should cut) with CPU time beside it; CUDA rows are wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import configs
from workers.piano.layout import GOAL_BITS
from workers.rl.droq import DroQ
from workers.rl.replay import ReplayBuffer

ROOT = Path(__file__).resolve().parents[2]
OBS, ACT = 1144, 39
BEFORE_PACKING = "75e1967"  # the last revision of workers/rl/droq.py with one agent per learner
# "dense goal" is the learner with droq.sparse_goal off; its default ("auto") turns it on for a CPU learner.
VARIANTS = {"dense goal": {"sparse_goal": False}, "sparse goal": {"sparse_goal": True},
            "sparse goal, bf16": {"sparse_goal": True, "matmul_precision": "medium"}}


def filled_buffer(seed: int, transitions: int = 3000) -> ReplayBuffer:
    """Random transitions shaped like the piano's: a sparse binary goal, then floats."""
    rng = np.random.default_rng(seed)
    buffer = ReplayBuffer(OBS, ACT, transitions + 100, discount=0.88, seed=seed)
    def observation() -> np.ndarray:
        return np.concatenate([rng.random(GOAL_BITS) < 0.02, rng.normal(size=OBS - GOAL_BITS)]).astype(np.float32)

    obs = observation()
    for t in range(transitions):
        nxt = observation()
        buffer.add(obs, rng.uniform(-1, 1, ACT).astype(np.float32), float(rng.normal()), nxt, False, t % 500 == 499)
        obs = nxt
    return buffer


def droq_at(revision: str):
    """``workers/rl/droq.py`` as it was at git ``revision`` (None when git cannot show it)."""
    try:
        source = subprocess.run(["git", "show", f"{revision}:workers/rl/droq.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / f"droq_at_{revision.replace('/', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def before_packing(revision: str):
    """The single-agent DroQ class of ``revision`` (None when git cannot show it)."""
    module = droq_at(revision)
    return None if module is None else module.DroQ


def timer(update, iters: int, sync=lambda: None, clock=time.process_time):
    """A function timing ``iters`` calls of ``update``: ms per call."""
    def run() -> float:
        sync()
        t = clock()
        for _ in range(iters):
            update()
        sync()
        return (clock() - t) / iters * 1e3
    update()  # warm-up (allocations, first-call dispatch)
    return run


def packs(cfg: configs.Config, device: str, ks: list[int], buffers: list[ReplayBuffer], iters: int,
          variants: dict[str, dict], groups: dict[str, tuple[str, str]]) -> dict[str, tuple[int, object]]:
    """Timers of packs of each size in ``ks`` with each ``variants`` (name: droq settings); each
    row's (device, variant) goes into ``groups``."""
    sync, clock = (torch.cuda.synchronize, time.perf_counter) if device == "cuda" else (lambda: None, time.process_time)
    runs = {}
    for variant, settings in variants.items():
        droq = cfg.droq.model_copy(update=settings)
        for k in ks:
            learner = DroQ(OBS, ACT, -np.ones(ACT), np.ones(ACT), droq, device=device, seed=0, num_agents=k)
            mine = buffers[:k]
            name = f"K={k:<2d} {device} {variant}"
            runs[name] = (k, timer(lambda l=learner, b=mine: l.update(b), iters, sync, clock))
            groups[name] = (device, variant)
    return runs


def measure(runs: dict[str, tuple[int, object]], reps: int) -> dict[str, tuple[int, float]]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, (_, run) in runs.items():
            times[name].append(run())
    return {name: (runs[name][0], statistics.median(t)) for name, t in times.items()}


def thread_row(threads: int, policy: str | None, iters: int, reps: int) -> dict[str, float]:
    """Wall and CPU ms per update of a pack of 1 in a fresh process with ``threads`` and ``policy``."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, __file__, "--child-threads", str(threads), "--iters", str(iters),
                          "--reps", str(reps)],
                         env=env, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def child(threads: int, iters: int, reps: int) -> None:
    torch.set_num_threads(threads)
    cfg = configs.load(overrides={"droq.device": "cpu"})
    learner = DroQ(OBS, ACT, -np.ones(ACT), np.ones(ACT), cfg.droq, device="cpu", seed=0)
    buffer = filled_buffer(0, 1000)
    wall = timer(lambda: learner.update([buffer]), iters, clock=time.perf_counter)
    cpu = timer(lambda: learner.update([buffer]), iters)
    print(json.dumps({"ms": statistics.median(wall() for _ in range(reps)),
                      "cpu_ms": statistics.median(cpu() for _ in range(reps))}))


SPECIALIST_STEPS = 8_000_000  # RP1M's budget per specialist


def packing_table(results: dict[str, tuple[int, float]], groups: dict[str, tuple[str, str]]) -> list[dict]:
    """Per (device, variant) and K: ms per update, each member's update rate relative to a solo
    agent of the same device and variant (ms of K=1 / ms of K), and device-hours of updates per
    8M-step specialist (one update per environment step). Rows not in ``groups`` (the learner
    from before packing) are left out."""
    rows, solo = [], {}
    for name, (k, ms) in results.items():
        if name not in groups:
            continue
        device, variant = key = groups[name]
        if k == 1:
            solo[key] = ms
        if key in solo:
            rows.append({"device": device, "variant": variant, "k": k, "ms": ms, "rate_vs_solo": solo[key] / ms,
                         "hours_per_specialist": SPECIALIST_STEPS * ms / k / 3.6e6})
    return rows


def print_packing(results: dict[str, tuple[int, float]], groups: dict[str, tuple[str, str]]) -> None:
    rows = packing_table(results, groups)
    if not rows:
        return
    print(f"\n{'packing (per device, variant)':34s}{'K':>4s}{'ms/update':>11s}{'rate/solo':>11s}{'h/8M steps':>12s}"
          "   (rate/solo: a member's update rate over a solo agent's)")
    for r in rows:
        print(f"{r['device'] + ' ' + r['variant']:34s}{r['k']:4d}{r['ms']:11.2f}{r['rate_vs_solo']:11.2f}"
              f"{r['hours_per_specialist']:12.2f}")
    for key in dict.fromkeys((r["device"], r["variant"]) for r in rows):
        ok = [r["k"] for r in rows if (r["device"], r["variant"]) == key and r["rate_vs_solo"] >= 0.8]
        print(f"{' '.join(key)}: largest K at >= 0.8 of the solo rate: {max(ok) if ok else '-'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median reported)")
    parser.add_argument("--iters", type=int, default=2, help="updates per timing")
    parser.add_argument("--ks", default="1,4,8,16", help="pack sizes")
    parser.add_argument("--baseline", default=BEFORE_PACKING, help="git revision of the single-agent learner")
    parser.add_argument("--devices", default="cpu,cuda",
                        help="cpu and/or cuda (cuda rows only when a GPU is present)")
    parser.add_argument("--cuda-ks", default="1,4,8,16,32,64", help="pack sizes on CUDA")
    parser.add_argument("--child-threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_threads:
        return child(args.child_threads, args.iters, args.reps)

    torch.set_num_threads(1)
    ks = [int(k) for k in args.ks.split(",")]
    cfg = configs.load(overrides={"droq.device": "cpu"})
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, CUDA {torch.cuda.is_available()}")
    buffers = [filled_buffer(seed) for seed in range(max(ks))]

    devices = args.devices.split(",")
    cuda = "cuda" in devices and torch.cuda.is_available()
    if "cuda" in devices and not cuda:
        print("no CUDA device: GPU rows skipped")
    runs: dict[str, tuple[int, object]] = {}
    groups: dict[str, tuple[str, str]] = {}
    old = before_packing(args.baseline) if "cpu" in devices else None
    if old is not None:
        torch.manual_seed(0)
        baseline = old(OBS, ACT, -np.ones(ACT), np.ones(ACT), cfg.droq, device="cpu")
        runs["before packing (1 agent)"] = (1, timer(lambda: baseline.update(buffers[0]), args.iters))
    if "cpu" in devices:
        runs.update(packs(cfg, "cpu", ks, buffers, args.iters, VARIANTS, groups))
    if cuda:
        cuda_ks = [int(k) for k in args.cuda_ks.split(",")]
        buffers += [filled_buffer(seed, 1000) for seed in range(len(buffers), max(cuda_ks))]
        runs.update(packs(cfg, "cuda", cuda_ks, buffers, args.iters * 3,
                          {**VARIANTS, "tf32": {"matmul_precision": "high"}}, groups))
    if not runs:
        raise SystemExit("nothing to measure: --devices names no device present here")
    results = measure(runs, args.reps)

    first = next(iter(results))
    reference_name = "before packing (1 agent)" if old is not None else first
    reference = results[reference_name][1]
    print(f"\n{'update (batch 256)':34s}{'ms/update':>11s}{'ms/agent':>10s}{'ratio':>8s}   "
          f"(ratio: per agent / {reference_name.strip()})")
    for name, (k, ms) in results.items():
        print(f"{name:34s}{ms:11.1f}{ms / k:10.1f}{ms / k / reference:8.2f}")
    print_packing(results, groups)
    if "cpu" not in devices:
        return

    print(f"\n{'threads (pack of 1, own process)':34s}{'wall ms':>11s}{'ratio':>8s}{'CPU ms':>10s}"
          "   (ratio: wall / 1 thread's)")
    one = thread_row(1, "PASSIVE", args.iters, args.reps)
    rows = {"1 thread": one, "2 threads, OMP_WAIT_POLICY=PASSIVE": thread_row(2, "PASSIVE", args.iters, args.reps),
            "2 threads, OpenMP default wait": thread_row(2, None, args.iters, args.reps)}
    for name, row in rows.items():
        print(f"{name:34s}{row['ms']:11.1f}{row['ms'] / one['ms']:8.2f}{row['cpu_ms']:10.1f}")


if __name__ == "__main__":
    main()
