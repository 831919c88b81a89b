"""Evaluating policies: receding-horizon rollouts, seen vs held-out grouping, table, CSV and MLflow."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import robopianist
from typer.testing import CliRunner

import configs
from orchestrator.cli import app
from workers.imitation.evaluate import EvalRow, rollout, summarize, write_csv
from workers.piano.music import load_song
from workers.imitation.policies import build_policy, save_policy

SONGS = Path(robopianist.__file__).parent / "music" / "data" / "rousseau"
TWINKLE, NOCTURNE = SONGS / "twinkle-twinkle-trimmed.mid", SONGS / "nocturne-trimmed.mid"
TINY = ["il.d_model=32", "il.n_layers=1", "il.n_heads=2", "il.bc_hidden=64", "il.action_chunk=4", "il.euler_steps=2"]


class CountingPolicy:
    """Plans chunks whose action k is (plan number, k) so the test can see what was executed."""

    horizon = 4

    def __init__(self):
        self.plans = 0

    def act(self, obs):
        self.plans += 1
        return np.array([[self.plans, k] + [0.0] * 37 for k in range(self.horizon)], np.float32)


class RecordingEnv:
    """Stands in for PianoEnv in the rollout-loop unit test: records actions, ends after n steps."""

    action_low, action_high = np.full(39, -1.0, np.float32), np.full(39, 50.0, np.float32)

    def __init__(self, n_steps: int):
        self.n_steps, self.actions = n_steps, []

    def reset(self, seed=None):
        self.actions = []
        return np.zeros(1144, np.float32), {}

    def step(self, action):
        self.actions.append(action[:2].tolist())
        return np.zeros(1144, np.float32), 0.0, False, len(self.actions) == self.n_steps, {}

    def episode_metrics(self):
        return {"precision": 1.0, "recall": 0.5, "f1": 0.6}


@pytest.mark.parametrize("replan_every, plans", [(4, 3), (1, 10), (3, 4)])
def test_rollout_executes_the_first_actions_of_each_chunk_then_replans(replan_every, plans):
    env, policy = RecordingEnv(10), CountingPolicy()
    metrics, steps, made = rollout(policy, env, replan_every)
    assert steps == 10 and made == plans == policy.plans and metrics["f1"] == 0.6
    expected = [[1 + i // replan_every, i % replan_every] for i in range(10)]
    assert env.actions == expected


def test_rollout_stops_at_max_steps_and_clips_to_the_action_range():
    env, policy = RecordingEnv(100), CountingPolicy()
    policy.act = lambda obs: np.full((4, 39), -7.0, np.float32)
    _, steps, _ = rollout(policy, env, 4, max_steps=6)
    assert steps == 6 and env.actions == [[-1.0, -1.0]] * 6


def _row(policy, group, song, f1):
    return EvalRow(policy=policy, group=group, song=song, song_hash=song, chunks=2, episodes=1, steps=100,
                   precision=f1, recall=f1, f1=f1)


def test_summary_means_are_per_policy_and_group():
    rows = [_row("flow", "seen", "a", 0.9), _row("flow", "seen", "b", 0.5), _row("flow", "held-out", "c", 0.2),
            _row("bc", "seen", "a", 0.4)]
    means = {(r.policy, r.group): r for r in summarize(rows) if r.song == "mean"}
    assert set(means) == {("flow", "seen"), ("flow", "held-out"), ("bc", "seen")}
    assert means[("flow", "seen")].f1 == pytest.approx(0.7) and means[("flow", "seen")].steps == 200
    assert means[("flow", "held-out")].f1 == pytest.approx(0.2)


def test_csv_is_written_atomically_with_a_header(tmp_path):
    path = write_csv([_row("flow", "seen", "a", 0.9)], tmp_path / "t" / "eval.csv")
    assert [p.name for p in path.parent.iterdir()] == ["eval.csv"]
    (row,) = csv.DictReader(path.open())
    assert row["song"] == "a" and float(row["f1"]) == 0.9


@pytest.mark.slow
def test_eval_command_reports_seen_and_held_out_songs_for_policy_and_baseline(tmp_path):
    from mlflow.tracking import MlflowClient

    il = configs.load(overrides=TINY).il
    twinkle_hash = load_song(TWINKLE).content_hash
    flow = save_policy(build_policy(il, kind="flow"), tmp_path / "flow" / "policy.pt", song_hashes=[twinkle_hash], step=1)
    bc = save_policy(build_policy(il, kind="bc"), tmp_path / "bc" / "policy.pt", song_hashes=[twinkle_hash], step=1)
    manifest = tmp_path / "songs.yaml"
    manifest.write_text(f"songs:\n  - path: {NOCTURNE}\n    name: nocturne\n    split: held-out\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    result = CliRunner().invoke(app, [
        "eval", str(flow), "--songs", str(TWINKLE), str(manifest), "--baseline", str(bc), "--max-chunks", "1",
        "--max-steps", "6", "--mlflow-uri", uri, "--experiment", "eval-x", "--set", "il.replan_every=2"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "flow" / "eval.csv").open()))
    per_song = {(r["policy"], r["song"]): r for r in rows if r["song"] != "mean"}
    assert set(per_song) == {(p, s) for p in ("flow", "bc") for s in ("twinkle-twinkle-trimmed", "nocturne")}
    assert per_song[("flow", "twinkle-twinkle-trimmed")]["group"] == "seen"
    assert per_song[("bc", "nocturne")]["group"] == "held-out"
    for r in per_song.values():
        assert r["steps"] == "6" and r["chunks"] == "1"
        assert 0.0 <= float(r["f1"]) <= 1.0 and 0.0 <= float(r["precision"]) <= 1.0
    assert sum(r["song"] == "mean" for r in rows) == 4
    assert "held-out" in result.output and "nocturne" in result.output

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("eval-x").experiment_id])
    assert "eval/flow/seen/mean/f1" in run.data.metrics
    assert run.data.metrics["eval/bc/held-out/nocturne/f1"] == pytest.approx(float(per_song[("bc", "nocturne")]["f1"]))
