"""Packs of specialist units on real song chunks: environments in worker processes, a pack of
one equal to a lone unit, members that fail alone, a killed pack whose members all resume,
finished units that keep only their policy, and episodes played in the workers while the
others train."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import configs
from test_specialist import REPO, TINY, TWINKLE, tiny_unit
from workers.lake import Lake
from workers.lake import ShardMeta
from workers.rl.droq import DroQ
from workers.rl.envpool import EnvSpec, InProcessEnvPool, PlayJob, WorkerEnvPool, agent_bytes
from workers.rl.pack import train_pack, train_unit
from workers.rl.specialist import CHECKPOINT, FINAL_AGENT_KEYS, load_agent, load_checkpoint, play, read_result
from workers.units import PID_FILE, Arrival, Refill, UnitSpec, read_attempts

MB = 1 << 20


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as ``train_unit`` runs with ``campaign.cpus_per_unit: 1``: the same
    float summation order whichever way a unit is trained."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def env_specs(cfg: configs.Config, chunks: list[int]) -> list[EnvSpec]:
    unit = tiny_unit(cfg)
    return [EnvSpec(str(TWINKLE), c, unit.song_hash, cfg.env.model_dump(), seed=c) for c in chunks]


@pytest.mark.slow
def test_worker_processes_step_like_this_process_and_a_raising_slot_fails_alone():
    cfg = configs.load(overrides={"env.chunk_steps": 12})
    specs = env_specs(cfg, [1, 2])
    probe = specs[0].make()
    dims = (probe.obs_dim, probe.action_dim)
    low, high = probe.action_low, probe.action_high
    probe.close()
    rng = np.random.default_rng(0)
    actions = rng.uniform(low, high, size=(30, 2, dims[1])).astype(np.float32)
    actions[20, 1, 3] = np.nan  # slot 1's environment raises at step 21
    seen = []
    for pool in (InProcessEnvPool(specs, *dims), WorkerEnvPool(specs, *dims, n_workers=2)):
        with pool:
            assert pool.reset([0, 1]) == {}
            trace, errors = [pool.obs.copy()], {}
            for t in range(30):
                slots = [0] if 1 in errors else [0, 1]
                pool.action[slots] = actions[t, slots]
                errors.update(pool.step(slots))
                trace.append((pool.obs.copy(), pool.next_obs.copy(), pool.reward.copy(), pool.ended.copy(),
                              pool.episode_f1.copy()))
            seen.append((trace, errors))
    (local, local_errors), (workers, worker_errors) = seen
    assert set(local_errors) == set(worker_errors) == {1}
    assert "non-finite" in worker_errors[1]
    assert sum(bool(step[3][0]) for step in workers[1:]) >= 2  # slot 0 went through episode ends
    for a, b in zip(local[1:], workers[1:]):  # bit for bit: the same physics in another process
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x[0], y[0])  # slot 0 throughout
    np.testing.assert_array_equal(local[20][0], workers[20][0])  # slot 1 until it failed


@pytest.mark.slow
def test_a_worker_plays_a_slots_episodes_between_the_steps_of_another_and_they_replay_here(tmp_path):
    cfg = configs.load(overrides=TINY)
    specs = env_specs(cfg, [1, 2])
    probe = specs[0].make()
    dims, low, high = (probe.obs_dim, probe.action_dim), probe.action_low, probe.action_high
    agent = DroQ(*dims, low, high, cfg.droq.model_copy(update={"device": "cpu"}), seed=3)
    state = agent.agent_state_dict(0)
    job = PlayJob(agent_bytes({k: state[k] for k in FINAL_AGENT_KEYS}), cfg.droq.model_dump(), (11, 12),
                  deterministic=False, shard=(str(tmp_path / "lake"), cfg.lake.model_dump(),
                                              ShardMeta("u-1", specs[0].song_hash, "twinkle", 1, "train", "c")))
    broken = PlayJob(b"not a checkpoint", cfg.droq.model_dump(), (5,), deterministic=True)
    with WorkerEnvPool(specs, *dims, n_workers=1) as pool:  # both slots in one worker
        assert pool.plays and pool.reset([1]) == {}
        pool.play(0, job)
        pool.play(1, broken)
        results, steps_meanwhile = {}, 0
        while 0 not in results:
            pool.action[1] = np.random.default_rng(steps_meanwhile).uniform(low, high)
            assert pool.step([1]) == {}  # slot 1 trains on while slot 0's episodes are played
            steps_meanwhile += 1
            results.update(pool.collect([0, 1]))
    assert "torch.load" in results[1].error  # its job fails alone, with the traceback of its policy's loading
    played = results[0]
    assert played.error is None and [e.seed for e in played.stats] == [11, 12]
    assert steps_meanwhile > 10  # ~120 episode steps were played between the training steps
    [shard] = Lake(tmp_path / "lake", cfg.lake).shards()
    assert str(shard.path) == played.shard_path and shard.n_episodes == 2
    assert shard.specialist_f1 == pytest.approx(np.mean([e.f1 for e in played.stats]))
    # The worker played with a CPU copy of the policy: here, the same seeds replay them exactly.
    here = specs[0].make()
    for episode, stats in zip(Lake(tmp_path / "lake", cfg.lake).read_episodes(shard), played.stats):
        again = play(agent, here, seed=stats.seed, deterministic=False)
        np.testing.assert_array_equal(episode.action, again.action)
        assert again.f1 == stats.f1 and again.episode_return == pytest.approx(stats.episode_return)
    here.close()
    probe.close()


@pytest.mark.slow
def test_a_slot_of_other_sizes_fails_alone_and_a_worker_killed_while_playing_is_replaced():
    cfg = configs.load(overrides=TINY)
    specs = env_specs(cfg, [1, 2])
    probe = specs[0].make()
    dims = (probe.obs_dim, probe.action_dim)
    probe.close()
    with WorkerEnvPool(specs, dims[0] + 1, dims[1], n_workers=1) as pool:  # not these chunks' sizes
        errors = pool.reset([0, 1])
        assert set(errors) == {0, 1} and all("differ from the pack's" in e for e in errors.values())
    agent = DroQ(*dims, np.full(dims[1], -1.0), np.full(dims[1], 1.0), cfg.droq.model_copy(update={"device": "cpu"}),
                 seed=0)
    state = agent.agent_state_dict(0)
    job = PlayJob(agent_bytes({k: state[k] for k in FINAL_AGENT_KEYS}), cfg.droq.model_dump(), tuple(range(50)),
                  deterministic=True)
    with WorkerEnvPool(specs, *dims, n_workers=2) as pool:
        assert pool.reset([0, 1]) == {}
        pool.play(0, job)  # 50 episodes: still playing when its worker is killed
        killed, other = pool._procs[0].pid, pool._procs[1].pid
        os.kill(killed, signal.SIGKILL)
        pool._procs[0].join(timeout=10)
        assert pool.collect([0]) == {}  # no result: the job went with its worker...
        assert pool.take_lost() == [0] and pool.take_lost() == []  # ...and the slot is rebuilt in a new one
        assert pool._procs[0].pid != killed and pool._procs[1].pid == other
        pool.action[:] = 0.0
        assert pool.step([1]) == {}  # the other worker's slot goes on
        assert pool.reset([0]) == {} and pool.step([0, 1]) == {}
        pool.play(0, replace(job, seeds=(0,)))  # the replacement plays too
        played = {}
        while not played:
            time.sleep(0.02)
            played = pool.collect([0])
        assert played[0].error is None and len(played[0].stats) == 1


@pytest.mark.slow
def test_the_others_train_while_a_members_rollouts_are_played_in_its_worker(tmp_path):
    cfg = configs.load(overrides={**TINY, "droq.warmup_steps": 20, "specialist.total_steps": 60,
                                  "specialist.eval_interval": 60, "specialist.checkpoint_interval": 60,
                                  "specialist.log_interval": 10, "specialist.rollouts": 6})
    short = tiny_unit(cfg, 1)
    long_ = tiny_unit(cfg, 2).model_copy(update={"overrides": {"specialist.total_steps": 600,
                                                               "specialist.rollouts": 1}})
    spans = {}
    for in_workers in (True, False):
        reports: dict[str, list] = {short.unit_id: [], long_.unit_id: []}

        def timed(unit_id):
            return lambda metrics: reports[unit_id].append((time.perf_counter(), metrics))

        out = tmp_path / str(in_workers)
        outcomes = train_pack([short, long_], cfg, [out / short.unit_id, out / long_.unit_id], out / "lake",
                              [timed(short.unit_id), timed(long_.unit_id)], env_workers=2,
                              play_in_workers=in_workers)
        assert [o.error_text for o in outcomes] == [None, None]
        assert [o.result.steps for o in outcomes] == [60, 600]
        # The short member's rollouts: from its last checkpoint to its rollout summary.
        start = next(t for t, m in reports[short.unit_id] if m.get("checkpoint_step") == 60)
        end = next(t for t, m in reports[short.unit_id] if "rollout/f1" in m)
        spans[in_workers] = [m["step"] for t, m in reports[long_.unit_id] if start < t < end]
        lake = Lake(out / "lake", cfg.lake)
        assert sorted(s.unit_id for s in lake.shards()) == sorted([short.unit_id, long_.unit_id])
        [mine] = [s for s in lake.shards() if s.unit_id == short.unit_id]
        assert mine.n_episodes == 6
        # Its rollouts replay here from the policy its finished unit kept, wherever they were played.
        final = load_checkpoint(out / short.unit_id)
        env = env_specs(cfg, [1])[0].make()
        agent = DroQ(env.obs_dim, env.action_dim, env.action_low, env.action_high, cfg.droq)
        load_agent(agent, 0, final["agent"])
        episode = list(lake.read_episodes(mine))[4]
        np.testing.assert_array_equal(play(agent, env, seed=episode.seed, deterministic=False).action, episode.action)
        env.close()
    assert len(spans[True]) >= 2  # the long member went on training (and reporting) meanwhile
    assert spans[False] == []  # played here, the pack waited for 6 x 60 rollout steps


@pytest.mark.slow
def test_a_killed_environment_worker_is_replaced_and_its_neighbour_trains_on_untouched(tmp_path):
    cfg = configs.load(overrides={**TINY, "droq.warmup_steps": 20, "specialist.total_steps": 120,
                                  "specialist.eval_interval": 60, "specialist.checkpoint_interval": 60,
                                  "specialist.log_interval": 10, "specialist.rollouts": 1})
    units = [tiny_unit(cfg, chunk) for chunk in (1, 2)]
    dirs = [tmp_path / u.unit_id for u in units]
    reports: list[list[dict]] = [[], []]
    killed = []

    def kill_member_0s_worker(metrics: dict) -> None:  # at member 1's step 30
        reports[1].append(metrics)
        if metrics["step"] == 30 and not killed:
            [worker] = [p for p in mp.active_children() if p.name == "env-worker-0"]
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(timeout=10)
            killed.append(worker.pid)

    outcomes = train_pack(units, cfg, dirs, tmp_path / "lake", [reports[0].append, kill_member_0s_worker],
                          env_workers=2)
    assert killed and [o.error_text for o in outcomes] == [None, None]
    assert [o.result.steps for o in outcomes] == [120, 120]
    for d in dirs:  # nothing charged to either: one attempt each, no step trained again
        assert [a["start_step"] for a in read_attempts(d)] == [0]
        assert read_result(d)["resumed_from"] == [] and read_result(d)["steps_this_run"] == 120
    # Member 0 lost the episode under way and went on in a new worker; member 1 never noticed.
    assert [r["env/workers_lost"] for r in reports[0] if "env/workers_lost" in r] == [1]
    assert not any("env/workers_lost" in r or "resume/step" in r for r in reports[1])
    assert [r["step"] for r in reports[1] if "perf/env_steps_per_s" in r] == list(range(10, 121, 10))
    assert sorted(s.unit_id for s in Lake(tmp_path / "lake", cfg.lake).shards()) == sorted(u.unit_id for u in units)


@pytest.mark.slow
def test_a_pack_of_one_trains_bit_identically_to_a_lone_unit(tmp_path):
    cfg = configs.load(overrides={**TINY, "specialist.total_steps": 120, "specialist.checkpoint_interval": 60,
                                  "specialist.eval_interval": 60})
    unit = tiny_unit(cfg)
    alone, packed = [], []
    result = train_unit(unit, cfg, tmp_path / "alone", tmp_path / "lake-a", report=alone.append, progress=False)
    [outcome] = train_pack([unit], cfg, [tmp_path / "packed"], tmp_path / "lake-p", [packed.append], env_workers=1)
    assert outcome.error is None, outcome.error_text
    assert [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in packed] == \
        [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in alone]
    a, b = load_checkpoint(tmp_path / "alone"), load_checkpoint(tmp_path / "packed")
    for part in ("actor", "critic"):
        for name, tensor in a["agent"][part].items():
            assert torch.equal(tensor, b["agent"][part][name]), f"{part}.{name}"
    assert outcome.result.f1 == result.f1 and outcome.result.episode_return == result.episode_return
    [sa], [sb] = Lake(tmp_path / "lake-a").shards(), Lake(tmp_path / "lake-p").shards()
    for x, y in zip(Lake(tmp_path / "lake-a").read_episodes(sa), Lake(tmp_path / "lake-p").read_episodes(sb)):
        np.testing.assert_array_equal(x.action, y.action)


@pytest.mark.slow
def test_a_member_whose_environment_raises_fails_alone_and_resumes_in_a_pack_of_one(tmp_path, monkeypatch):
    # The default networks, so that the checkpoint of a unit under way (networks, optimiser
    # state, replay) is well over the 10 MB a finished unit may keep.
    cfg = configs.load(overrides={**{k: v for k, v in TINY.items() if k != "droq.hidden_dims"},
                                  "droq.warmup_steps": 40, "specialist.total_steps": 150,
                                  "specialist.checkpoint_interval": 50, "specialist.eval_interval": 150,
                                  "specialist.log_interval": 50})
    units = [tiny_unit(cfg, chunk) for chunk in (1, 2, 3)]
    dirs = [tmp_path / u.unit_id for u in units]
    act, calls = DroQ.act, []

    def act_breaking_member_1(self, obs, *args, **kwargs):  # after step 100 member 1 sends its environment NaNs
        actions = act(self, obs, *args, **kwargs)
        calls.append(1)
        if len(calls) > 100 - cfg.droq.warmup_steps:
            actions[1] = np.nan
        return actions

    monkeypatch.setattr(DroQ, "act", act_breaking_member_1)
    reports = [[], [], []]
    outcomes = train_pack(units, cfg, dirs, tmp_path / "lake", [r.append for r in reports], env_workers=2)
    monkeypatch.undo()

    assert [o.unit_id for o in outcomes] == [u.unit_id for u in units]
    assert outcomes[1].result is None and "non-finite" in outcomes[1].error_text
    assert all(outcomes[i].error is None and outcomes[i].result.steps == 150 for i in (0, 2))
    lake = Lake(tmp_path / "lake", cfg.lake)
    assert sorted(s.unit_id for s in lake.shards()) == sorted([units[0].unit_id, units[2].unit_id])
    for i in (0, 2):  # every member reports to its own callback, with its own evaluations
        assert [r["step"] for r in reports[i] if "eval/f1" in r] == [150]
        saved = read_result(dirs[i])
        assert saved["done"] and saved["steps_this_run"] == 150
        # A finished unit keeps its policy and metadata only.
        final = load_checkpoint(dirs[i])
        assert "replay" not in final and set(final["agent"]) == set(FINAL_AGENT_KEYS) and final["step"] == 150
        assert dir_bytes(dirs[i]) <= 10 * MB
    # The failed member keeps its last checkpoint, replay included, and no result.
    assert read_result(dirs[1]) is None
    kept = load_checkpoint(dirs[1])
    assert kept["step"] == 100 and kept["replay"]["transitions_added"] == 100
    assert dir_bytes(dirs[1]) > 10 * MB

    # Its checkpoint continues in a pack of one (a lone unit) from its step.
    result = train_unit(units[1], cfg, dirs[1], tmp_path / "lake", progress=False)
    assert result.steps == 150 and read_result(dirs[1])["resumed_from"] == [100]
    assert [a["start_step"] for a in read_attempts(dirs[1])] == [0, 100]
    assert len(lake.shards()) == 3 and dir_bytes(dirs[1]) <= 10 * MB

    # A finished unit whose shard was lost records its rollouts again from the policy it kept.
    lost = Path(read_result(dirs[0])["shard_path"])
    lost.unlink()
    again = train_unit(units[0], cfg, dirs[0], tmp_path / "lake", progress=False)
    assert again.steps == 150 and read_result(dirs[0])["steps_this_run"] == 0 and lost.exists()
    assert again.f1 == outcomes[0].result.f1  # the same policy, seeds and chunk: the same rollouts


@pytest.mark.slow
def test_freed_slots_are_refilled_with_fresh_agents_and_a_broken_arrival_fails_alone(tmp_path):
    cfg = configs.load(overrides={**TINY, "droq.warmup_steps": 20, "specialist.total_steps": 60,
                                  "specialist.eval_interval": 60, "specialist.checkpoint_interval": 60,
                                  "specialist.log_interval": 20, "specialist.rollouts": 1})
    short, long_ = tiny_unit(cfg, 1), tiny_unit(cfg, 2)
    long_ = long_.model_copy(update={"overrides": {"specialist.total_steps": 100}})  # same droq: same pack
    late = [tiny_unit(cfg, 3), tiny_unit(cfg, 0)]
    broken = UnitSpec.create(song_path=short.song_path, song_hash=short.song_hash, song_name=short.song_name,
                             chunk_index=9999, config_hash=short.config_hash)  # no such chunk
    reports: dict[str, list] = {u.unit_id: [] for u in [short, long_, broken, *late]}
    refill = Refill([Arrival(u, tmp_path / u.unit_id, reports[u.unit_id].append) for u in [broken, *late]])
    outcomes = train_pack([short, long_], cfg, [tmp_path / short.unit_id, tmp_path / long_.unit_id],
                          tmp_path / "lake", [reports[short.unit_id].append, reports[long_.unit_id].append],
                          env_workers=2, refill=refill)

    # Launched members first, then arrivals in the order they came; each outcome handed back once.
    assert [o.unit_id for o in outcomes] == [short.unit_id, long_.unit_id, broken.unit_id, *(u.unit_id for u in late)]
    assert sorted(o.unit_id for o in refill.outcomes) == sorted(o.unit_id for o in outcomes)
    assert outcomes[2].result is None and "9999" in outcomes[2].error_text  # the broken one alone
    assert [o.error_text for o in outcomes if o.error is not None and o.unit_id != broken.unit_id] == []
    steps = {o.unit_id: o.result.steps for o in outcomes if o.error is None}
    assert steps == {short.unit_id: 60, long_.unit_id: 100, late[0].unit_id: 60, late[1].unit_id: 60}
    lake = Lake(tmp_path / "lake", cfg.lake)
    assert sorted(s.unit_id for s in lake.shards()) == sorted(steps)
    for unit in late:
        # A fresh agent in the slot: its update count and optimiser steps are its own (60 steps,
        # 20 of warm-up), not the previous occupant's carried on; its own evaluations and result.
        final = load_checkpoint(tmp_path / unit.unit_id)
        assert final["agent"]["updates"] == 40
        assert [r["step"] for r in reports[unit.unit_id] if "eval/f1" in r] == [60]
        assert read_result(tmp_path / unit.unit_id)["steps_this_run"] == 60
        assert [a["start_step"] for a in read_attempts(tmp_path / unit.unit_id)] == [0]


@pytest.mark.slow
def test_a_member_stopped_by_its_budget_frees_its_slot_for_the_next_unit(tmp_path):
    # The plateau rule of test_specialist: F1 never rises by 1.0, so a unit with budgets on stops
    # at step 150 of 400; units without (their override) train all 400 steps.
    cfg = configs.load(overrides={**TINY, "droq.warmup_steps": 20, "specialist.total_steps": 400,
                                  "specialist.eval_interval": 50, "specialist.checkpoint_interval": 50,
                                  "specialist.rollouts": 0, "specialist.budget.enabled": True,
                                  "specialist.budget.stop_at_f1": None, "specialist.budget.judge_evals": 1,
                                  "specialist.budget.plateau_window": 2, "specialist.budget.plateau_margin": 1.0})
    off = {"specialist.budget.enabled": False}
    stops = tiny_unit(cfg, 1)
    full, late = (tiny_unit(cfg, c).model_copy(update={"overrides": off}) for c in (2, 3))
    dirs = {u.unit_id: tmp_path / u.unit_id for u in (stops, full, late)}
    pid_files: list[bool] = []  # at each report of the late unit: is the stopped unit's worker.pid there?
    refill = Refill([Arrival(late, dirs[late.unit_id], lambda m: pid_files.append((dirs[stops.unit_id] / PID_FILE).exists()))])
    outcomes = train_pack([stops, full], cfg, [dirs[stops.unit_id], dirs[full.unit_id]], tmp_path / "lake",
                          env_workers=1, refill=refill)
    assert pid_files and not any(pid_files)  # its attempt ended when it stopped, not when the pack did
    got = {o.unit_id: (o.result.stop_reason, o.result.steps) for o in outcomes}
    assert got == {stops.unit_id: ("plateau", 150), full.unit_id: ("budget", 400), late.unit_id: ("budget", 400)}
    # The late unit started in the stopped member's slot while the other member was still training.
    started = read_attempts(dirs[late.unit_id])[0]["time"]
    assert started < (dirs[full.unit_id] / "result.json").stat().st_mtime
    assert [o.unit_id for o in refill.outcomes][:1] == [stops.unit_id]  # handed back first, at its stop


PACK_SCRIPT = """
import json, sys
from pathlib import Path
import configs
from workers.rl.pack import train_pack
from workers.units import UnitSpec
cfg = configs.load(overrides=json.loads(sys.argv[1]))
units = [UnitSpec.model_validate_json(s) for s in json.loads(sys.argv[2])]
out = Path(sys.argv[3])
outcomes = train_pack(units, cfg, [out / u.unit_id for u in units], out / "lake", env_workers=2)
print(json.dumps([o.result.steps if o.error is None else o.error_text for o in outcomes]))
"""


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
def test_a_killed_pack_resumes_every_member_from_its_checkpoint_without_duplicate_shards(tmp_path):
    overrides = {**TINY, "specialist.total_steps": 200, "specialist.checkpoint_interval": 100,
                 "specialist.eval_interval": 200, "specialist.rollouts": 1}
    cfg = configs.load(overrides=overrides)
    units = [tiny_unit(cfg, chunk) for chunk in (1, 2)]
    dirs = [tmp_path / u.unit_id for u in units]
    command = [sys.executable, "-c", PACK_SCRIPT, json.dumps(overrides),
               json.dumps([u.model_dump_json() for u in units]), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not all((d / CHECKPOINT).exists() for d in dirs):
        assert first.poll() is None, first.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoints within 300 s"
        time.sleep(0.05)
    workers = _children(first.pid)
    assert len(workers) >= 2  # the environment workers
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stderr.close()
    killed_at = [load_checkpoint(d)["step"] for d in dirs]
    assert all(s == 100 for s in killed_at)
    assert all(read_result(d) is None for d in dirs)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
              for pid in workers):  # workers notice the pack is gone and exit
        assert time.monotonic() < deadline, "environment workers outlived their pack"
        time.sleep(0.1)

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(second.stdout.strip().splitlines()[-1]) == [200, 200]
    for d, step in zip(dirs, killed_at):
        saved = read_result(d)
        assert saved["resumed_from"] == [step] and saved["steps_this_run"] == 200 - step
        assert [a["start_step"] for a in read_attempts(d)] == [0, step]
    shards = Lake(tmp_path / "lake", cfg.lake).shards()
    assert sorted(s.unit_id for s in shards) == sorted(u.unit_id for u in units)  # one each, no duplicates
    data = list((tmp_path / "lake").rglob("*.parquet"))
    assert len([p for p in data if not p.name.startswith(".")]) == 2
