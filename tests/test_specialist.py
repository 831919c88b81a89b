"""A specialist unit end to end on a real song chunk: train, checkpoint, resume, commit a shard."""

from __future__ import annotations

import gc
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
from workers.rl.droq import DroQ
from workers.rl import envpool, pack as pack_module
from workers.rl.pack import train_unit
from workers.piano.env import make_env
from workers.lake import Episode, Lake, ShardMeta
from workers.piano.music import load_chunk, load_song
from workers.rl.specialist import (
    CHECKPOINT,
    load_agent,
    load_checkpoint,
    play,
    read_attempts,
    read_result,
    record_rollouts,
    summarise,
)
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
def test_tiny_run_trains_reports_and_commits_a_readable_shard(tmp_path, monkeypatch):
    cfg = configs.load(overrides={**TINY, "specialist.seed": 3})
    unit = tiny_unit(cfg)
    reports: list[dict] = []
    envpool._chunk.cache_clear()
    chunks_read = []
    monkeypatch.setattr(envpool, "load_chunk", lambda *a, **k: chunks_read.append(a) or load_chunk(*a, **k))
    result = train_unit(unit, cfg, tmp_path / "unit", tmp_path / "lake", report=reports.append, progress=False)
    monkeypatch.undo()
    assert len(chunks_read) == 1  # its environments to train and to play in: one reading of the chunk

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
    assert [e.seed for e in episodes] == [3000, 3001]  # specialist.seed * 1000 + i
    assert shard.specialist_f1 == pytest.approx(np.mean([e.f1 for e in episodes])) == pytest.approx(result.f1)
    for e in episodes:
        assert e.obs.shape == (e.n_steps, 1144) and e.action.shape == (e.n_steps, 39)
        assert abs(e.n_steps - 60) <= 1  # one 60-step chunk (RoboPianist may add a final step)
    # Stochastic rollouts (the default) differ, and each replays from its seed with the final policy.
    assert cfg.specialist.rollout_policy == "stochastic"
    assert not np.array_equal(episodes[0].action, episodes[1].action)
    state = torch.load(tmp_path / "unit" / CHECKPOINT, weights_only=True)
    env = make_env(load_chunk(TWINKLE, 1, cfg.env), cfg.env)
    agent = DroQ(env.obs_dim, env.action_dim, env.action_low, env.action_high, cfg.droq)
    load_agent(agent, 0, state["agent"])  # a finished unit keeps its policy only
    threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.campaign.cpus_per_unit))  # as the unit ran: same float summation order
    try:
        replay = play(agent, env, seed=episodes[1].seed, deterministic=False)
    finally:
        torch.set_num_threads(threads)
        env.close()
    np.testing.assert_allclose(replay.action, episodes[1].action, atol=1e-5)

    # The final checkpoint loads with weights_only=True and keeps only the policy: the unit is done.
    state = torch.load(tmp_path / "unit" / CHECKPOINT, weights_only=True)
    assert state["step"] == 200 and "replay" not in state and "rng" not in state
    assert set(state["agent"]) == {"actor", "critic", "log_alpha", "updates"}
    saved = read_result(tmp_path / "unit")
    assert saved["done"] and saved["resumed_from"] == [] and saved["steps_this_run"] == 200
    # Budgets are off by default: the unit trained its whole budget.
    assert (saved["stop_reason"], saved["stop_step"], saved["budget_steps"]) == ("budget", 200, 200)

    # Running a finished unit again returns its result without training or recording again.
    again = train_unit(unit, cfg, tmp_path / "unit", tmp_path / "lake", progress=False)
    assert again.model_dump(exclude={"seconds"}) == result.model_dump(exclude={"seconds"})
    assert len(read_attempts(tmp_path / "unit")) == 1
    assert lake.shards()[0].commit_id == shard.commit_id


class Crash(RuntimeError):
    pass


@pytest.mark.slow
def test_budget_stops_a_unit_on_a_plateau_and_a_resumed_unit_keeps_judging(tmp_path):
    # F1 can never rise by a margin of 1.0: with a window of 2 evaluations (every 50 steps) the
    # unit plateaus at its third evaluation, step 150, long before its budget of 400.
    cfg = configs.load(overrides={**TINY, "specialist.total_steps": 400, "specialist.eval_interval": 50,
                                  "specialist.checkpoint_interval": 50, "specialist.rollouts": 0,
                                  "specialist.budget.enabled": True, "specialist.budget.stop_at_f1": None,
                                  "specialist.budget.judge_evals": 1, "specialist.budget.plateau_window": 2,
                                  "specialist.budget.plateau_margin": 1.0})
    unit = tiny_unit(cfg)

    def crash_after_checkpoint_100(metrics: dict) -> None:
        if metrics.get("checkpoint_step") == 100:
            raise Crash("killed after the checkpoint at step 100")

    with pytest.raises(Crash):
        train_unit(unit, cfg, tmp_path / "unit", tmp_path / "lake", report=crash_after_checkpoint_100, progress=False)
    assert [s for s, _ in load_checkpoint(tmp_path / "unit")["budget"]["history"]] == [50, 100]

    reports: list[dict] = []
    result = train_unit(unit, cfg, tmp_path / "unit", tmp_path / "lake", report=reports.append, progress=False)
    # Judged with the two evaluations before the crash: a rule starting afresh would stop at 250.
    assert (result.stop_reason, result.stop_step, result.steps, result.budget_steps) == ("plateau", 150, 150, 400)
    assert [r["step"] for r in reports if "eval/f1" in r] == [150]
    assert {"step": 150, "checkpoint_step": 150} in reports and any(r.get("budget/stop_step") == 150 for r in reports)
    assert 0 < result.eval_seconds < result.seconds
    saved = read_result(tmp_path / "unit")
    assert (saved["stop_reason"], saved["stop_step"], saved["budget_steps"]) == ("plateau", 150, 400)
    state = load_checkpoint(tmp_path / "unit")
    assert state["step"] == 150 and state["budget"]["reason"] == "plateau"


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


# --- the rollout stage on its own: an untrained policy on a short chunk -------------------------
ROLLOUT_CFG = configs.load(overrides={"env.chunk_steps": 30, "droq.hidden_dims": [32, 32],
                                      "lake.row_group_rows": 40})


@pytest.fixture(scope="module")
def player():
    env = make_env(load_chunk(TWINKLE, 1, ROLLOUT_CFG.env), ROLLOUT_CFG.env, seed=1)
    torch.manual_seed(0)
    agent = DroQ(env.obs_dim, env.action_dim, env.action_low, env.action_high, ROLLOUT_CFG.droq)
    yield agent, env
    env.close()


def test_act_with_a_generator_ignores_the_global_rng():
    torch.manual_seed(0)
    agent = DroQ(8, 3, -np.ones(3), np.ones(3), ROLLOUT_CFG.droq)
    obs = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    draw = lambda seed: agent.act(obs[None], generator=torch.Generator().manual_seed(seed))  # noqa: E731
    first = draw(7)
    torch.manual_seed(123)  # the global RNG moves on; the generator alone decides
    assert np.array_equal(draw(7), first)
    assert not np.allclose(draw(8), first)
    mean = agent.act(obs[None], deterministic=True)
    assert np.array_equal(agent.act(obs[None], deterministic=True, generator=torch.Generator().manual_seed(9)), mean)
    assert not np.allclose(first, mean) and np.all(np.abs(first) <= 1)


def test_stochastic_rollouts_differ_by_seed_and_replay_from_it(player):
    agent, env = player
    torch.manual_seed(1)
    a = play(agent, env, seed=5, deterministic=False)
    torch.manual_seed(2)  # global RNG state differs between the two plays of seed 5
    again = play(agent, env, seed=5, deterministic=False)
    other = play(agent, env, seed=6, deterministic=False)
    assert a.seed == again.seed == 5 and other.seed == 6
    assert np.array_equal(a.action, again.action) and np.array_equal(a.obs, again.obs)
    assert a.action.shape == other.action.shape and not np.allclose(a.action, other.action)
    mean = play(agent, env, seed=5, deterministic=True)
    assert not np.allclose(mean.action, a.action)


def test_rollouts_stream_into_the_lake_one_episode_at_a_time(player, tmp_path):
    agent, env = player
    lake = Lake(tmp_path, ROLLOUT_CFG.lake)
    alive: list[int] = []
    song = load_song(TWINKLE)
    with lake.shard_writer("unit-r", song.content_hash) as writer:
        add = writer.add

        def counting_add(episode: Episode) -> None:  # how many episodes exist while one is stored
            alive.append(sum(type(o) is Episode for o in gc.get_objects()))  # type(): proxies raise on isinstance
            add(episode)

        writer.add = counting_add
        stats = record_rollouts(agent, env, writer, seeds=[10, 11, 12, 13], deterministic=False)
        assert writer.n_row_groups >= 2  # rows reached disk during the rollouts, not at the end
        info = writer.commit(ShardMeta("unit-r", song.content_hash, song.name, 1, "train", "cfg",
                                       specialist_f1=summarise(stats, "rollout")["rollout/f1"]))
    assert alive == [1, 1, 1, 1]  # memory does not grow with the number of rollouts
    episodes = lake.read_episodes(info)
    assert [e.seed for e in episodes] == [s.seed for s in stats] == [10, 11, 12, 13]
    assert [e.f1 for e in episodes] == [s.f1 for s in stats]
    assert info.specialist_f1 == pytest.approx(np.mean([e.f1 for e in episodes]))
    assert np.array_equal(episodes[2].action, play(agent, env, seed=12, deterministic=False).action)


def test_rollouts_record_the_environments_ot_fingering(player, tmp_path, monkeypatch):
    """The lake's ``ot_fingering`` of a rollout is, step by step, the env's ``info["ot_assignment"]``."""
    agent, env = player
    assignments = []
    step = env.step

    def recording_step(action):
        out = step(action)
        assignments.append(out[-1]["ot_assignment"])
        return out

    monkeypatch.setattr(env, "step", recording_step)
    song = load_song(TWINKLE)
    lake = Lake(tmp_path, ROLLOUT_CFG.lake)
    with lake.shard_writer("unit-f", song.content_hash) as writer:
        record_rollouts(agent, env, writer, seeds=[3], deterministic=False)
        info = writer.commit(ShardMeta("unit-f", song.content_hash, song.name, 1, "train", "cfg"))
    (episode,) = lake.read_episodes(info)
    assert info.schema_version == 2 and episode.ot_fingering.shape == (episode.n_steps, 10) == (len(assignments), 10)
    stored = [sorted((f, k) for f, k in enumerate(row) if k >= 0) for row in episode.ot_fingering.tolist()]
    assert stored == [sorted(pairs) for pairs in assignments]
    assert episode.target.any() and sum(map(len, stored)) == int(episode.target.sum())  # a finger per key to press


def test_checkpoints_keep_the_last_two_and_set_a_damaged_one_aside(tmp_path):
    from workers.rl import checkpoints

    path = tmp_path / "checkpoint.pt"
    for step in (1, 2, 3):
        checkpoints.save({"step": step, "w": torch.full((4,), float(step))}, path)
    assert torch.load(path, weights_only=True)["step"] == 3
    assert torch.load(checkpoints.previous_path(path), weights_only=True)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]  # no temporaries

    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert checkpoints.load(path).state["step"] == 2 and path.exists()  # a reader only skips it
    loaded = checkpoints.load(path, repair=True)
    assert loaded.state["step"] == 2 and loaded.path == checkpoints.previous_path(path) and loaded.damaged == [path]
    [aside] = tmp_path.glob("checkpoint.pt.damaged-*")
    assert aside.stat().st_size == 100 and not path.exists()
    assert f"checkpoint {path} is damaged" in loaded.messages[0] and f"moved to {aside}" in loaded.messages[0]
    assert loaded.messages[-1] == f"continuing from {checkpoints.previous_path(path)} (step 2)"

    checkpoints.save({"step": 4}, path)  # the next save: the previous good one stays the fallback
    checkpoints.previous_path(path).write_bytes(b"not a zip")
    path.write_bytes(b"")
    loaded = checkpoints.load(path, repair=True)
    assert loaded.state is None and len(loaded.damaged) == 2
    assert loaded.messages[-1] == f"no good checkpoint left: starting from scratch in {tmp_path}"


@pytest.mark.slow
def test_a_truncated_checkpoint_is_set_aside_and_the_unit_goes_on_from_the_previous_one(tmp_path, monkeypatch):
    cfg = configs.load(overrides={**TINY, "specialist.rollouts": 1})
    unit, unit_dir = tiny_unit(cfg), tmp_path / "unit"

    def die(*args, **kwargs):  # as if the unit had died after its last checkpoint
        raise RuntimeError("died")

    monkeypatch.setattr(pack_module, "record_rollouts", die)
    with pytest.raises(RuntimeError, match="died"):
        train_unit(unit, cfg, unit_dir, tmp_path / "lake", progress=False)  # checkpoints at steps 100 and 200
    monkeypatch.undo()
    ckpt = unit_dir / CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    reports: list[dict] = []
    result = train_unit(unit, cfg, unit_dir, tmp_path / "lake", report=reports.append, progress=False)
    assert result.steps == 200
    second = read_attempts(unit_dir)[-1]
    assert second["start_step"] == 100  # from checkpoint.prev.pt, not from scratch
    [aside] = unit_dir.glob("checkpoint.pt.damaged-*")
    assert f"checkpoint {ckpt} is damaged" in second["checkpoint"][0] and str(aside) in second["checkpoint"][0]
    assert {"step": 100, "checkpoint/damaged": 1} in reports
    assert load_checkpoint(unit_dir)["step"] == 200
