"""Campaigns on a real local Ray cluster with the synthetic workload and a real MLflow SQLite store:
submit, resubmit, retries, a killed worker, a killed driver and resume, status."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import configs
from orchestrator import campaign
from orchestrator.cli import app
from orchestrator.status import read_status
from orchestrator.store import FAILED, PENDING, SUCCEEDED, CampaignStore
from orchestrator.tracking import PARENT_TAG
from workers.lake import Lake
from workers.synthetic import make_units, read_attempts, read_checkpoint_step
from workers.units import UnitSpec, live_worker_pid

FAST = [
    "campaign.workload=synthetic",
    "campaign.synthetic.sleep_s=0.2",
    "campaign.synthetic.steps=4",
    "campaign.synthetic.episodes=1",
    "campaign.synthetic.steps_per_episode=4",
    "gate.f1_threshold=0.0",          # every finished unit counts as succeeded
    "mlflow.system_metrics=false",
    "mlflow.flush_interval_s=0.5",
]

pytestmark = pytest.mark.slow


def _with(unit: UnitSpec, **overrides) -> UnitSpec:
    return unit.model_copy(update={"overrides": {f"campaign.synthetic.{k}": v for k, v in overrides.items()}})


def test_submit_runs_every_unit_once_and_logs_to_mlflow(ray_cluster, tmp_path):
    cfg = configs.load(overrides=FAST)
    units = make_units(2, 2, cfg.hash("env", "droq", "specialist"))
    summary = campaign.submit(units, cfg, "small", root=tmp_path)
    assert summary.counts[SUCCEEDED] == 4 and summary.attempts_run == 4 and summary.done

    camp_dir = tmp_path / "small"
    assert (camp_dir / "config.yaml").exists() and (camp_dir / "campaign.db").exists()
    shards = Lake(camp_dir / "lake", cfg.lake).shards()
    assert sorted(s.unit_id for s in shards) == sorted(u.unit_id for u in units)
    with CampaignStore(camp_dir / "campaign.db", readonly=True) as store:
        rows = list(store.units())
        assert all(r.attempts == 1 and r.mlflow_run_id and r.checkpoint_step == 4 and r.hostname for r in rows)
        assert summary.logging_overhead > 0  # measured (its size is a benchmark matter)

    client = MlflowClient(summary.tracking_uri)
    runs = client.search_runs([summary.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == summary.parent_run_id]
    assert [p.info.run_id for p in parents] == [summary.parent_run_id]
    assert parents[0].data.params["campaign.workload"] == "synthetic"
    assert len(children) == 4
    for child in children:
        assert {"f1", "precision", "recall", "return", "env_steps_per_s"} <= set(child.data.metrics)
        assert child.data.tags["state"] == SUCCEEDED and child.data.params["unit_id"] in {u.unit_id for u in units}
        assert len(client.get_metric_history(child.info.run_id, "train/return")) == 4  # one per checkpoint step

    again = campaign.submit(units, cfg, "small", root=tmp_path)  # same manifest: nothing runs again
    assert again.attempts_run == 0 and again.counts[SUCCEEDED] == 4
    assert all(len(read_attempts(camp_dir / "units" / u.unit_id)) == 1 for u in units)
    assert len(client.search_runs([summary.experiment_id])) == 5


def test_failed_attempts_are_retried_and_a_hopeless_unit_fails_alone(ray_cluster, tmp_path):
    cfg = configs.load(overrides=FAST + ["campaign.max_attempts=3"])
    flaky, hopeless, *fine = make_units(1, 4, "cfg00000")
    flaky = _with(flaky, fail_pattern="*", fail_first_attempts=1)
    hopeless = _with(hopeless, fail_pattern="*", fail_first_attempts=99)
    summary = campaign.submit([flaky, hopeless, *fine], cfg, "flaky", root=tmp_path)
    assert summary.counts[SUCCEEDED] == 3 and summary.counts[FAILED] == 1

    with CampaignStore(tmp_path / "flaky" / "campaign.db", readonly=True) as store:
        assert (store.unit(flaky.unit_id).state, store.unit(flaky.unit_id).attempts) == (SUCCEEDED, 2)
        row = store.unit(hopeless.unit_id)
        assert (row.state, row.attempts) == (FAILED, 3)
        assert row.error.startswith("SyntheticFailure") and "planned failure on attempt 3" in row.error
        assert all(store.unit(u.unit_id).attempts == 1 for u in fine)

    status = read_status(tmp_path / "flaky")
    assert status.counts[SUCCEEDED] == 3 and status.counts[FAILED] == 1
    assert status.last_errors[0]["unit_id"] in {flaky.unit_id, hopeless.unit_id}
    out = CliRunner().invoke(app, ["status", "flaky", "--root", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "SyntheticFailure" in out.output  # the last errors are shown
    out = CliRunner().invoke(app, ["status", "flaky", "--root", str(tmp_path), "--json"])
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert {k: v for k, v in shown["counts"].items() if v} == {SUCCEEDED: 3, FAILED: 1}
    assert shown["last_errors"][0]["error"].startswith("SyntheticFailure")

    client = MlflowClient(summary.tracking_uri)
    failed_run = client.get_run(row.mlflow_run_id)
    assert failed_run.info.status == "FAILED" and failed_run.data.tags["state"] == FAILED

    # resume gives the failed unit a fresh set of attempts (it fails again: the drill says 99)
    resumed = campaign.resume("flaky", root=tmp_path)
    assert resumed.attempts_run == 3 and resumed.counts[FAILED] == 1


def test_a_killed_worker_resumes_from_its_checkpoint(ray_cluster, tmp_path):
    cfg = configs.load(overrides=FAST)
    slow, quick = make_units(1, 2, "cfg00000")
    slow = _with(slow, sleep_s=8.0, steps=40)  # 0.2 s per step, a checkpoint every step
    unit_dir = tmp_path / "killed" / "units" / slow.unit_id
    result = {}
    driver = threading.Thread(target=lambda: result.update(s=campaign.submit([slow, quick], cfg, "killed", root=tmp_path)))
    driver.start()
    deadline = time.time() + 120
    while time.time() < deadline and not (unit_dir / "checkpoint.json").exists() or read_checkpoint_step(unit_dir) < 5:
        time.sleep(0.1)
    killed_at = read_checkpoint_step(unit_dir)
    assert killed_at >= 5
    os.kill(live_worker_pid(unit_dir), signal.SIGKILL)
    driver.join(timeout=180)
    assert result["s"].counts[SUCCEEDED] == 2

    first, second = read_attempts(unit_dir)
    assert first["start_step"] == 0 and second["start_step"] >= killed_at  # not from scratch
    with CampaignStore(tmp_path / "killed" / "campaign.db", readonly=True) as store:
        row = store.unit(slow.unit_id)
        assert row.attempts == 2 and row.checkpoint_step == 40
        crash = [e for e in store.events(unit_id=slow.unit_id) if e.from_state == "running" and e.to_state == "pending"]
        assert len(crash) == 1 and "Worker" in crash[0].detail  # WorkerCrashedError / ActorDiedError text


def test_status_shows_where_units_run_and_their_step_rate(ray_cluster, tmp_path):
    import ray
    from rich.console import Console

    from orchestrator.status import render

    cfg = configs.load(overrides=FAST)
    [unit] = make_units(1, 1, "cfg00000")
    unit = _with(unit, sleep_s=6.0, steps=30)  # 5 steps/s
    driver = threading.Thread(target=campaign.submit, args=([unit], cfg, "where"), kwargs={"root": tmp_path})
    driver.start()
    status, deadline = None, time.time() + 120
    while time.time() < deadline and driver.is_alive():
        if (tmp_path / "where" / "campaign.db").exists():
            try:
                status = read_status(tmp_path / "where")
            except sqlite3.OperationalError:  # the driver is still creating the store's tables
                time.sleep(0.2)
                continue
            if status.running and (status.running[0]["step"] or 0) >= 15 and status.running[0]["steps_per_s"]:
                break
        time.sleep(0.2)
    driver.join(timeout=120)
    assert status is not None and status.running, "the unit was never seen running with a step rate"
    node, host = ray.get_runtime_context().get_node_id(), socket.gethostname()
    [row] = status.running
    assert (row["hostname"], row["node_id"]) == (host, node)
    assert 1.0 < row["steps_per_s"] < 15.0  # 5 steps/s, measured as the steps reach the driver
    assert status.where == [{"hostname": host, "slurm_job_id": None, "node_id": node, "units": 1,
                             "steps_per_s": row["steps_per_s"]}]
    console = Console(width=200, record=True)
    console.print(render(status))
    text = console.export_text()
    assert "where units run" in text and "Ray node" in text and node[:8] in text
    assert f"{row['steps_per_s']:.1f}" in text


def test_orchestrator_benchmark_measures_units_only(ray_cluster, tmp_path):
    """bench_orchestrator at a tiny size, with a gate that would open after one shard: no imitation
    job may start (it would take the units' CPUs and the benchmark would measure that instead)."""
    import importlib.util

    path = Path(__file__).resolve().parent / "benchmarks" / "bench_orchestrator.py"
    spec = importlib.util.spec_from_file_location("bench_orchestrator", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.bench_size(3, bench.bench_config(0.0, ["gate.min_shards=1"]), tmp_path, repeat=1)
    assert row["units"] == 3 and row["rss_peak_mib"] > 0 and row["status_ms"] > 0 and row["summary_http_ms"] > 0
    with CampaignStore(tmp_path / "bench-3" / "campaign.db", readonly=True) as store:
        assert store.counts()[SUCCEEDED] == 3 and not store.get_meta("il_launches")
    assert not (tmp_path / "bench-3" / "il").exists()


def _write_midi(path: Path, seconds: float) -> None:
    import pretty_midi

    pm = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    t = 0.0
    while t < seconds:
        piano.notes.append(pretty_midi.Note(velocity=80, pitch=60 + int(t) % 12, start=t, end=t + 0.4))
        t += 0.5
    pm.instruments.append(piano)
    pm.write(str(path))


def test_killed_driver_then_resume_finishes_without_redoing_work(tmp_path):
    songs = tmp_path / "songs"
    songs.mkdir()
    for i, seconds in enumerate((50.0, 30.0)):  # 50 s stretched x1.25 -> 3 chunks of 27.5 s; 30 s -> 2
        _write_midi(songs / f"song{i}.mid", seconds + i * 0.25)
    manifest = tmp_path / "drill.yaml"
    manifest.write_text("songs:\n  - songs/song0.mid\n  - songs/song1.mid\n")
    root = tmp_path / "campaigns"
    cli = [sys.executable, "-m", "orchestrator.cli"]
    sets = [f"--set={s}" for s in FAST + ["campaign.synthetic.sleep_s=4", "campaign.synthetic.steps=20"]]
    driver = subprocess.Popen(cli + ["submit", str(manifest), "--root", str(root), *sets],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    camp_dir = root / "drill"
    try:
        deadline = time.time() + 180
        ckpts: dict[str, int] = {}
        while time.time() < deadline and driver.poll() is None:
            ckpts = {d.name: read_checkpoint_step(d) for d in (camp_dir / "units").glob("*") if (d / "checkpoint.json").exists()}
            if len(ckpts) >= 3 and any(0 < s < 20 for s in ckpts.values()):  # one unit done or nearly, one mid-way
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the driver finished before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    with CampaignStore(camp_dir / "campaign.db", readonly=True) as store:
        n_units = sum(store.counts().values())
        assert n_units >= 4 and store.counts()["running"] > 0  # the dead driver left units 'running'
    assert read_status(camp_dir).driver.startswith("gone")

    resumed = subprocess.run(cli + ["resume", "drill", "--root", str(root)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    with CampaignStore(camp_dir / "campaign.db", readonly=True) as store:
        assert store.counts()[SUCCEEDED] == n_units
        unit_ids = [r.unit_id for r in store.units()]
    for unit_id, step in ckpts.items():  # every unit that had a checkpoint went on from there
        starts = read_attempts(camp_dir / "units" / unit_id)
        assert all(a["start_step"] >= step for a in starts[1:]), (unit_id, step, starts)
    cfg = configs.load(overrides=FAST)
    shards = Lake(camp_dir / "lake", cfg.lake).shards()
    assert sorted(s.unit_id for s in shards) == sorted(unit_ids)  # one shard per unit
    parquet_files = [p for p in (camp_dir / "lake").rglob("*.parquet") if not p.name.startswith(".")]
    assert len(parquet_files) == n_units
    saved = yaml.safe_load((camp_dir / "config.yaml").read_text())  # the resolved config, --set values included
    assert saved["campaign"]["synthetic"]["sleep_s"] == 4


def test_a_specialist_unit_runs_through_the_campaign(ray_cluster, tmp_path):
    from orchestrator.manifest import demo_manifest, load_manifest

    cfg = configs.load(overrides=[
        "campaign.workload=specialist", "specialist.total_steps=40", "droq.warmup_steps=20", "droq.batch_size=16",
        "droq.replay_capacity=1000", "specialist.eval_interval=20", "specialist.checkpoint_interval=20",
        "specialist.log_interval=10", "specialist.rollouts=1", "mlflow.system_metrics=false",
        # A target any policy meets, judged over both evaluations: it wins over the budget at step 40.
        "specialist.budget.enabled=true", "specialist.budget.stop_at_f1=0.0", "specialist.budget.judge_evals=2",
        "specialist.video=true", "env.chunk_steps=20",  # the finished unit's clip goes to its MLflow run
    ])
    unit = load_manifest(demo_manifest(tmp_path / "manifest"), cfg).units()[0]
    summary = campaign.submit([unit], cfg, "one-specialist", root=tmp_path)
    assert summary.counts[SUCCEEDED] + summary.counts["gated"] == 1, summary.counts
    with CampaignStore(tmp_path / "one-specialist" / "campaign.db", readonly=True) as store:
        row = store.unit(unit.unit_id)
    assert row.steps == 40 and row.shard_path and Path(row.shard_path).exists()
    assert (row.stop_reason, row.stop_step, row.budget_steps) == ("target", 40, 40) and row.eval_seconds > 0
    assert (tmp_path / "one-specialist" / "units" / unit.unit_id / "checkpoint.pt").exists()
    run = MlflowClient(summary.tracking_uri).get_run(row.mlflow_run_id)
    assert {"eval/f1", "rollout/f1", "train/episodes", "f1", "eval_share"} <= set(run.data.metrics)
    assert (run.data.tags["stop_reason"], run.data.metrics["stop_step"], run.data.metrics["budget_steps"]) == (
        "target", 40.0, 40.0)
    # The unit reports each checkpoint as it saves it: that is what the store shows while it runs.
    saved = MlflowClient(summary.tracking_uri).get_metric_history(row.mlflow_run_id, "checkpoint_step")
    assert sorted((m.step, m.value) for m in saved) == [(20, 20.0), (40, 40.0)]
    clip = tmp_path / "one-specialist" / "units" / unit.unit_id / "rollout.mp4"
    assert clip.stat().st_size > 0
    assert [a.path for a in MlflowClient(summary.tracking_uri).list_artifacts(row.mlflow_run_id)] == ["rollout.mp4"]


def test_submit_with_rejected_entries_exits_3_unless_errors_are_allowed(ray_cluster, tmp_path):
    _write_midi(tmp_path / "good.mid", 10.0)
    manifest = tmp_path / "mixed.yaml"
    manifest.write_text("songs:\n  - good.mid\n  - path: gone.mid\n")
    args = ["submit", str(manifest), "--root", str(tmp_path / "c"), *[f"--set={s}" for s in FAST]]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 3, out.output
    assert "1 songs, 1 units, workload synthetic, 1 manifest entries dropped (errors above)" in out.output
    assert "gone.mid: no such file" in out.output and "1 manifest entries were rejected" in out.output
    with CampaignStore(tmp_path / "c" / "mixed" / "campaign.db", readonly=True) as store:
        assert store.counts()[SUCCEEDED] == 1  # the valid song trained
    allowed = CliRunner().invoke(app, args + ["--allow-errors"])
    assert allowed.exit_code == 0, allowed.output
    assert "1 manifest entries dropped" in allowed.output


def test_resume_records_the_rollouts_of_a_unit_whose_shard_is_damaged(ray_cluster, tmp_path):
    cfg = configs.load(overrides=FAST)
    units = make_units(1, 3, cfg.hash("env", "droq", "specialist"))
    campaign.submit(units, cfg, "rot", root=tmp_path)
    lake = Lake(tmp_path / "rot" / "lake", cfg.lake)
    truncated, flipped = (next(s for s in lake.shards() if s.unit_id == u.unit_id) for u in units[1:])
    truncated.path.write_bytes(truncated.path.read_bytes()[:200])
    data = bytearray(flipped.path.read_bytes())  # 16 bytes changed, the size kept
    data[len(data) // 2:len(data) // 2 + 16] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 16])
    flipped.path.write_bytes(bytes(data))
    listed = CliRunner().invoke(app, ["lake", "list", str(lake.root)])
    assert listed.exit_code == 1 and "2 damaged" in listed.output

    resumed = campaign.resume("rot", root=tmp_path)
    assert resumed.attempts_run == 2 and resumed.counts[SUCCEEDED] == 3
    for damaged, unit in zip((truncated, flipped), units[1:]):
        unit_dir = tmp_path / "rot" / "units" / unit.unit_id
        assert [a["start_step"] for a in read_attempts(unit_dir)] == [0, 4]  # from its final checkpoint: rollouts only
        assert len(list(damaged.path.parent.glob(f".{damaged.path.name}.damaged-*"))) == 1  # kept for inspection
        with CampaignStore(tmp_path / "rot" / "campaign.db", readonly=True) as store:
            requeue = [e for e in store.events(unit_id=unit.unit_id) if e.to_state == "pending" and e.from_state]
            assert len(requeue) == 1 and "damaged" in requeue[0].detail and str(damaged.path) in requeue[0].detail
    assert all(p is None for _, p in Lake(lake.root).verify()) and len(lake.shards()) == 3



def test_a_units_overrides_are_applied_once_on_its_way_to_the_workload(tmp_path, monkeypatch):
    """The worker hands the workload the campaign's config; the workload applies the unit's
    overrides (``UnitSpec.config``), once."""
    from orchestrator.scheduler import execute_unit

    cfg = configs.load(overrides=["campaign.synthetic.sleep_s=0"])
    unit = make_units(1, 1, "cfg")[0].model_copy(update={"overrides": {"campaign.synthetic.episodes": 3}})
    applied, apply = [], configs.Config.with_overrides
    monkeypatch.setattr(configs.Config, "with_overrides", lambda self, o: applied.append(o) or apply(self, o))
    result = execute_unit("synthetic", unit.model_dump_json(), cfg.to_dict(), str(tmp_path / "unit"),
                          str(tmp_path / "lake"), None)
    assert applied == [{"campaign.synthetic.episodes": 3}]
    [shard] = Lake(tmp_path / "lake", cfg.lake).shards()
    assert shard.n_episodes == 3 and result["unit_id"] == unit.unit_id


# --------------------------------------------------------------------------------------------
# Launches Ray could never place are refused at submit, naming the settings that ask for them;
# launches that wait for busy resources keep waiting, and status says what for.
# --------------------------------------------------------------------------------------------


def _one_song(cfg: configs.Config, n: int):
    return make_units(1, n, cfg.hash("env", "droq", "specialist"))


@pytest.mark.timeout(120)  # before the check, such a campaign waited forever
def test_a_pack_no_node_can_hold_is_refused_at_submit_and_its_units_stay_pending(ray_cluster, tmp_path):
    cfg = configs.load(overrides=FAST + ["campaign.pack_size=3"])
    with pytest.raises(campaign.CampaignError, match=r"a pack of 3 asks Ray for 3 CPUs \(campaign.pack_size = 3 x "
                                                     r"campaign.cpus_per_unit = 1\); no node .* \(largest node: 2 CPUs"):
        campaign.submit(_one_song(cfg, 3), cfg, "big", root=tmp_path)
    with CampaignStore(tmp_path / "big" / "campaign.db", readonly=True) as store:
        assert store.counts()[PENDING] == 3
        assert [e.detail for e in store.events() if e.kind == "unschedulable"][0].startswith("a pack of 3")


@pytest.mark.timeout(120)  # before the check, it waited forever, with the pool's jobs running
def test_a_pack_no_job_of_its_slurm_pool_can_hold_is_refused_before_any_job_starts(ray_cluster, tmp_path):
    cfg = configs.load(profile="slurm", overrides=FAST + ["campaign.pack_size=2"])
    with pytest.raises(campaign.CampaignError, match=r"a pack of 2 asks for 2 CPUs \(campaign.pack_size = 2 x campaign."
                                                     r"cpus_per_unit = 1\), more than one job of slurm.pools.cpu holds "
                                                     r"\(1 CPUs\): lower campaign.pack_size or campaign.cpus_per_unit, or raise slurm.pools.cpu.cpus_per_job"):
        campaign.submit(_one_song(cfg, 2), cfg, "pooled", root=tmp_path)
    assert not (tmp_path / "pooled" / "logs" / "slurm").exists()  # no pool job was submitted


def test_status_says_what_queued_units_wait_for(ray_cluster, tmp_path):
    # Each unit takes both CPUs for ~4 s: the second one waits in Ray's queue meanwhile.
    cfg = configs.load(overrides=FAST + ["campaign.cpus_per_unit=2", "campaign.synthetic.sleep_s=4"])
    ended: list = []
    driver = threading.Thread(target=lambda: ended.append(campaign.submit(_one_song(cfg, 2), cfg, "queue", root=tmp_path)))
    driver.start()
    seen = set()
    while driver.is_alive():
        if (tmp_path / "queue" / "campaign.db").exists():
            seen.add(read_status(tmp_path / "queue").waiting)
        time.sleep(0.25)
    driver.join()
    assert ended and ended[0].counts[SUCCEEDED] == 2
    assert "1 unit(s) wait in Ray's queue: each launch needs 2 CPUs; free now 0 CPUs; largest node has 2 CPUs" in seen
