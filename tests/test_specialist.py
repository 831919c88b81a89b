"""A specialist unit end to end on a real song chunk: train, checkpoint, resume, commit a shard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import robopianist
import torch

import configs
from workers.lake import Lake
from workers.music import load_song
from workers.specialist import CHECKPOINT, load_checkpoint, read_attempts, read_result, train_unit
from workers.units import UnitSpec

TWINKLE = Path(robopianist.__file__).parent / "music" / "data" / "rousseau" / "twinkle-twinkle-trimmed.mid"
REPO = Path(__file__).resolve().parents[1]

# Tiny budgets: 60-step chunks, small networks, a few hundred steps.
TINY = {
    "env.chunk_steps": 60,
    "droq.hidden_dims": [32, 32],
    "droq.batch_size": 32,
    "droq.replay_capacity": 2000,
    "droq.warmup_steps": 50,
    "specialist.total_steps": 200,
    "specialist.eval_interval": 100,
    "specialist.checkpoint_interval": 100,
    "specialist.log_interval": 50,
    "specialist.rollouts": 2,
}


def tiny_unit(cfg: configs.Config, chunk: int = 1) -> UnitSpec:
    song = load_song(TWINKLE)
    return UnitSpec.create(song_path=str(TWINKLE), song_hash=song.content_hash, song_name=song.name,
                           chunk_index=chunk, config_hash=cfg.hash("env", "droq", "specialist"))


@pytest.mark.slow
def test_tiny_run_trains_reports_and_commits_a_readable_shard(tmp_path):
    cfg = configs.load(overrides=TINY)
    unit = tiny_unit(cfg)
    reports: list[dict] = []
    result = train_unit(unit, cfg, tmp_path / "unit", tmp_path / "lake", report=reports.append, progress=False)

    assert result.unit_id == unit.unit_id and result.steps == 200
    assert 0.0 <= result.f1 <= 1.0 and result.env_steps_per_s > 0 and result.updates_per_s > 0
    # Every report names its step; training, evaluation and speed metrics all arrive.
    assert all("step" in r for r in reports)
    keys = set().union(*reports)
    assert {"train/critic_loss", "train/actor_loss", "train/temperature", "train/return", "eval/f1",
            "eval/precision", "eval/recall", "eval/return", "perf/env_steps_per_s", "perf/updates_per_s"} <= keys
    assert [r["step"] for r in reports if "eval/f1" in r] == [100, 200]

    lake = Lake(tmp_path / "lake", cfg.lake)
    [shard] = lake.shards()
    assert shard.unit_id == unit.unit_id and str(shard.path) == result.shard_path
    episodes = lake.read_episodes(shard)
    assert [e.seed for e in episodes] == [0, 1]  # seed * 1000 + i
    assert shard.specialist_f1 == pytest.approx(np.mean([e.f1 for e in episodes])) == pytest.approx(result.f1)
    for e in episodes:
        assert e.obs.shape == (e.n_steps, 1144) and e.action.shape == (e.n_steps, 39)
        assert abs(e.n_steps - 60) <= 1  # one 60-step chunk (RoboPianist may add a final step)

    # The final checkpoint loads with weights_only=True and holds the whole training state.
    state = torch.load(tmp_path / "unit" / CHECKPOINT, weights_only=True)
    assert state["step"] == 200 and state["replay"]["transitions_added"] == 200
    assert {"actor", "critic", "critic_target", "log_alpha", "actor_opt", "critic_opt", "alpha_opt"} <= set(state["agent"])
    assert {"python", "numpy_global", "numpy", "torch"} <= set(state["rng"])
    saved = read_result(tmp_path / "unit")
    assert saved["done"] and saved["resumed_from"] == [] and saved["steps_this_run"] == 200

    # Running a finished unit again returns its result without training or recording again.
    again = train_unit(unit, cfg, tmp_path / "unit", tmp_path / "lake", progress=False)
    assert again.model_dump(exclude={"seconds"}) == result.model_dump(exclude={"seconds"})
    assert len(read_attempts(tmp_path / "unit")) == 1
    assert lake.shards()[0].commit_id == shard.commit_id


def specialist_command(out: Path) -> list[str]:
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items() if not k.startswith("specialist.")]
    return [sys.executable, "-m", "orchestrator.cli", "specialist", "--song", str(TWINKLE), "--chunk", "1",
            "--out", str(out), "--steps", "400", "--checkpoint-every", "100", "--eval-every", "400",
            "--rollouts", "1", "--no-progress", "--set=specialist.log_interval=50", *sets]


@pytest.mark.slow
def test_killed_specialist_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "unit"
    command = specialist_command(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out / CHECKPOINT).exists():
        assert first.poll() is None, first.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stderr.close()
    killed_at = load_checkpoint(out)["step"]
    assert 100 <= killed_at < 400 and killed_at % 100 == 0
    assert read_result(out) is None

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    printed = json.loads(second.stdout)
    assert printed["steps"] == 400
    saved = read_result(out)
    assert saved["resumed_from"] == [killed_at] and saved["steps_this_run"] == 400 - killed_at
    assert [a["start_step"] for a in read_attempts(out)] == [0, killed_at]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step": killed_at, "resume/step": killed_at} in metrics
    # The second run logged only steps after the checkpoint.
    resumed = metrics.index({"step": killed_at, "resume/step": killed_at})
    assert min(m["step"] for m in metrics[resumed + 1:]) > killed_at
    assert Path(saved["shard_path"]).exists()
