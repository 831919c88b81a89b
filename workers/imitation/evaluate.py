"""Evaluating an imitation policy: roll it out on songs and score key presses (RP1M table II).

Each song is cut into chunks exactly as for the specialists (``workers.piano.music.plan_chunks``);
every chunk with notes is played ``episodes`` times in the RP1M environment. Per-step precision,
recall and F1 come from the environment; a song's numbers are their means over all steps it was
played. Songs whose content hash is among the policy's training songs (recorded in its
checkpoint) are ``seen``, the others ``held-out``.

Execution: the policy predicts a chunk of ``il.action_chunk`` actions and the first
``replan_every`` of them are executed open-loop before it plans again from the new observation
(receding horizon). ``il.replan_every = 0`` executes the whole chunk, the cheapest choice on CPU;
1 replans every control step.
"""

from __future__ import annotations

import csv
import dataclasses
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

import configs
from workers.imitation.policies import Policy, load_policy
from configs.files import atomic_write

GROUPS = ("seen", "held-out")
MEAN = "mean"  # the ``song`` of a summary row


@dataclass
class EvalRow:
    """One song (or, with ``song == "mean"``, the mean over a group's songs) for one policy."""

    policy: str
    group: str  # seen | held-out
    song: str
    song_hash: str
    chunks: int
    episodes: int
    steps: int
    precision: float
    recall: float
    f1: float


def rollout(policy: Policy, env: Any, replan_every: int, max_steps: int | None = None,
            seed: int | None = None) -> tuple[dict[str, float], int, int]:
    """Play one episode (``env.reset(seed=seed)`` first); returns (the environment's episode
    metrics, steps taken, plans made)."""
    (obs, _), done, steps, plans = env.reset(seed=seed), False, 0, 0
    plan, k = None, 0
    while not done and (max_steps is None or steps < max_steps):
        if plan is None or k >= replan_every:
            plan, k = policy.act(obs), 0
            plans += 1
        action = np.clip(plan[k], env.action_low, env.action_high)
        obs, _, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
        k += 1
        steps += 1
    return env.episode_metrics(), steps, plans


def evaluate_policy(
    policy_path: str | Path | tuple[Policy, dict[str, Any]],
    song_paths: Sequence[str | Path],
    cfg: configs.Config,
    *,
    episodes: int = 1,
    song_names: Sequence[str] | None = None,
    label: str | None = None,
    max_chunks: int | None = None,
    max_steps: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[EvalRow]:
    """Per-song rows (precision, recall, F1 over every step played) for the policy at ``policy_path``.

    ``policy_path`` may also be an already loaded ``(policy, meta)`` pair. ``max_chunks`` and
    ``max_steps`` (per episode) cut evaluation short for quick checks. Songs that cannot be
    read raise ``workers.piano.music.SongError`` naming the file.
    """
    from workers.piano.env import make_env
    from workers.piano.music import load_song, plan_chunks

    if isinstance(policy_path, tuple):
        (policy, meta), label = policy_path, label or policy_path[0].kind
    else:
        policy, meta = load_policy(policy_path)
        stem = Path(policy_path).stem
        label = label or (policy.kind if stem == "policy" else stem)  # out/policy.pt -> "flow"
    policy.eval()
    seen = set(meta.get("song_hashes", []))
    replan_every = cfg.il.replan_every or policy.horizon
    if not 1 <= replan_every <= policy.horizon:
        raise ValueError(f"il.replan_every = {replan_every}: must be 0..{policy.horizon} (the policy's action chunk)")

    rows = []
    names = list(song_names) if song_names is not None else [None] * len(song_paths)
    for path, name in _progress(list(zip(song_paths, names)), progress, "songs"):
        song = load_song(path, name=name)
        chunks = plan_chunks(song, cfg.env).chunks[:max_chunks]
        sums, steps = np.zeros(3), 0
        for chunk in chunks:
            env = make_env(chunk.midi, cfg.env, seed=seed)  # compiled once, reset per episode
            try:
                for _ in range(episodes):
                    metrics, n, _ = rollout(policy, env, replan_every, max_steps)
                    sums += n * np.array([metrics["precision"], metrics["recall"], metrics["f1"]])
                    steps += n
            finally:
                env.close()
        precision, recall, f1 = sums / max(steps, 1)
        rows.append(EvalRow(policy=label, group="seen" if song.content_hash in seen else "held-out", song=song.name,
                            song_hash=song.content_hash, chunks=len(chunks), episodes=episodes, steps=steps,
                            precision=float(precision), recall=float(recall), f1=float(f1)))
    return rows


def summarize(rows: Iterable[EvalRow]) -> list[EvalRow]:
    """The rows followed by one ``mean`` row per (policy, group): unweighted means over songs."""
    rows = list(rows)
    out = list(rows)
    for policy in dict.fromkeys(r.policy for r in rows):
        for group in GROUPS:
            members = [r for r in rows if r.policy == policy and r.group == group and r.song != MEAN]
            if not members:
                continue
            out.append(EvalRow(policy=policy, group=group, song=MEAN, song_hash="", episodes=members[0].episodes,
                               chunks=sum(r.chunks for r in members), steps=sum(r.steps for r in members),
                               **{m: float(np.mean([getattr(r, m) for r in members])) for m in ("precision", "recall", "f1")}))
    return out


def write_csv(rows: Iterable[EvalRow], path: str | Path) -> Path:
    """Write rows as CSV atomically (header = ``EvalRow`` fields)."""
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[x.name for x in dataclasses.fields(EvalRow)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)
    return path


def print_table(rows: Iterable[EvalRow], console: Any = None) -> None:
    """A rich table, songs grouped as seen / held-out, means in bold."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Policy evaluation (per-step key precision / recall / F1)")
    for column in ("policy", "group", "song", "chunks", "steps", "precision", "recall", "F1"):
        table.add_column(column, justify="right" if column in ("chunks", "steps", "precision", "recall", "F1") else "left")
    rows = list(rows)
    policies = list(dict.fromkeys(r.policy for r in rows))  # the evaluated policy first, its baseline after
    ordered = sorted(rows, key=lambda r: (policies.index(r.policy), GROUPS.index(r.group), r.song == MEAN, r.song))
    for r in ordered:
        style = "bold" if r.song == MEAN else None
        table.add_row(r.policy, r.group, r.song, str(r.chunks), str(r.steps),
                      f"{r.precision:.3f}", f"{r.recall:.3f}", f"{r.f1:.3f}", style=style)
    (console or Console(width=max(Console().width, 120))).print(table)  # song names stay readable in logs


def _metric_name(*parts: str) -> str:
    return "/".join(re.sub(r"[^A-Za-z0-9_.\- ]", "_", p) for p in parts)


def log_to_mlflow(rows: Iterable[EvalRow], tracking_uri: str, experiment: str, run_name: str = "eval",
                  params: dict[str, Any] | None = None) -> str:
    """One MLflow run holding every row as ``eval/<policy>/<group>/<song>/<metric>``; returns its id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from workers.tracking import ensure_experiment

    with warnings.catch_warnings():  # MLflow's SQL store, opened here, uses a loader SQLAlchemy 2.1 deprecates
        warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated")
        client = MlflowClient(tracking_uri)
        run = client.create_run(ensure_experiment(client, experiment), run_name=run_name,
                                tags={"pianoforge.kind": "evaluation"})
    now = int(time.time() * 1000)
    metrics = [Metric(_metric_name("eval", r.policy, r.group, r.song, m), getattr(r, m), now, 0)
               for r in rows for m in ("precision", "recall", "f1")]
    batch = configs.load(profile=None).mlflow.max_batch  # MLflow takes at most 1000 metrics per call
    for i in range(0, len(metrics), batch):
        client.log_batch(run.info.run_id, metrics=metrics[i : i + batch])
    if params:
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _progress(items: list, enabled: bool, what: str) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=what, unit=what[:-1])
