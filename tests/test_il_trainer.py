"""Imitation learning on a real (small) lake with Ray Train DDP: checkpoints, restarts, MLflow."""

from __future__ import annotations

import re
import socket

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import configs
from orchestrator.cli import app
from il_fixtures import write_lake
from workers.imitation.trainer import dataset_stats, lr_at, train_il
from workers.lake import Lake
from workers.imitation.policies import FlowPolicy, load_policy

TINY = ["il.d_model=32", "il.n_layers=1", "il.n_heads=2", "il.bc_hidden=64", "il.action_chunk=4",
        "il.batch_size=16", "il.shuffle_buffer=64", "il.log_interval=5", "il.checkpoint_interval=5",
        "il.warmup_steps=2", "il.max_failures=1"]


@pytest.fixture(scope="module")
def lake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("il") / "lake"
    write_lake(root, [0.9, 0.8, 0.95, 0.1], episodes=2, steps=30)  # the 0.1 shard fails the gate
    return root


def test_lr_warms_up_then_decays_to_a_tenth():
    il = configs.load(overrides=["il.lr=1.0", "il.warmup_steps=10", "il.steps=110"]).il
    assert lr_at(0, il) == pytest.approx(0.1) and lr_at(9, il) == pytest.approx(1.0)
    assert lr_at(60, il) == pytest.approx(0.55) and lr_at(110, il) == pytest.approx(0.1)


def test_normalisation_stats_come_from_the_selected_shards(lake_root):
    lake = Lake(lake_root)
    shards = lake.shards(min_f1=0.5)
    episodes = [e for s in shards for e in lake.read_episodes(s)]
    actions = np.concatenate([e.action for e in episodes])
    stats = dataset_stats(lake_root, shards)
    np.testing.assert_allclose(stats["action_mean"], actions.mean(0), atol=1e-5)
    np.testing.assert_allclose(stats["obs_std"][979:], np.concatenate([e.obs for e in episodes]).std(0)[979:], rtol=1e-4)
    assert (stats["obs_mean"][:979] == 0).all() and (stats["obs_std"][:979] == 1).all()  # goal bits unscaled


def test_normalisation_stats_read_no_shard_data(lake_root, monkeypatch):
    lake = Lake(lake_root)
    shards = lake.shards(min_f1=0.5)
    expected = dataset_stats(lake_root, shards)

    def no_reading(*args, **kwargs):
        raise AssertionError("dataset_stats read a shard instead of the lake's statistics")

    monkeypatch.setattr(Lake, "open_shard", no_reading)
    stats = dataset_stats(lake_root, shards)
    for name, value in expected.items():
        np.testing.assert_array_equal(stats[name], value)


def test_refuses_a_lake_without_passing_shards(tmp_path, lake_root):
    cfg = configs.load(overrides=TINY)
    with pytest.raises(ValueError, match="no committed train shards with specialist F1 >= 0.99"):
        train_il(lake_root, cfg, tmp_path / "out", min_f1=0.99)


@pytest.mark.slow
def test_two_workers_train_and_a_rerun_continues_from_the_checkpoint(tmp_path, lake_root, ray_cluster):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "il"
    cfg = configs.load(overrides=TINY + ["il.num_workers=2", "il.steps=10"])

    # by hand, as a user would (Ray is already running here, so the command joins it)
    result = CliRunner().invoke(app, ["train-il", "--lake", str(lake_root), "--out", str(out), "--workers", "2",
                                      "--mlflow-uri", uri, "--experiment", "campaign-x"]
                                + [arg for kv in TINY + ["il.steps=10"] for arg in ("--set", kv)])
    assert result.exit_code == 0, result.output
    assert "trained on 3 shards of 3 songs: steps 0->10" in result.output
    first_run_id = re.search(r"MLflow run (\w+) at", result.output).group(1)
    passing_songs = sorted(s.song_hash for s in Lake(lake_root).shards(min_f1=0.75))

    # the same job with more steps continues at step 10, in the same MLflow run
    second = train_il(lake_root, cfg.with_overrides(["il.steps=15"]), out, tracking_uri=uri, experiment="campaign-x")
    assert (second.steps, second.start_step) == (15, 10)
    assert second.n_shards == 3 and second.song_hashes == passing_songs
    assert second.mlflow_run_id == first_run_id
    assert second.worker_hosts == [socket.gethostname()] * 2  # one rank per worker, each says where it ran

    policy, meta = load_policy(out / "policy.pt")
    assert isinstance(policy, FlowPolicy) and meta["step"] == 15
    assert meta["song_hashes"] == passing_songs  # what evaluation will call "seen"
    assert policy.obs_std[1000].item() != 1.0  # dataset normalisation travelled with the weights
    optimizer = torch.load(f"{second.checkpoint_path}/optimizer.pt", weights_only=True)
    assert optimizer["state"], "optimizer moments are checkpointed"

    client = MlflowClient(uri)
    run = client.get_run(first_run_id)
    assert client.get_experiment(run.info.experiment_id).name == "campaign-x"
    assert run.data.params["il.policy"] == "flow" and run.data.params["n_shards"] == "3"
    loss_steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")})
    assert loss_steps == [5, 10, 15]
    for key in ("train/samples_per_s", "train/lr"):
        assert client.get_metric_history(run.info.run_id, key)


@pytest.mark.slow
def test_a_crashed_worker_restarts_from_the_last_checkpoint_bc(tmp_path, lake_root, ray_cluster):
    """The BC baseline through the same trainer; its worker dies at step 7 and resumes from step 5."""
    cfg = configs.load(overrides=TINY + ["il.steps=10"])
    out = tmp_path / "bc"
    result = train_il(lake_root, cfg, out, policy="bc", num_workers=1, min_f1=0.0, _fail_at_step=7)
    assert (out / ".failure-drill-done").exists()
    assert result.n_shards == 4 and (result.steps, result.start_step) == (10, 5)
    policy, meta = load_policy(result.policy_path)
    assert policy.kind == "bc" and meta["step"] == 10
    assert policy.act(torch.zeros(1144).numpy()).shape == (4, 39)



@pytest.mark.slow
def test_a_job_whose_worker_dies_with_no_restarts_left_publishes_nothing_and_a_relaunch_continues(
        tmp_path, lake_root, ray_cluster):
    """One of two DDP workers dies mid-training (the drill: its process exits at step 7). With no
    restarts left the job fails with the reason and publishes no policy; launched again (as the
    gate does on resume) it continues from the last checkpoint and publishes the finished policy."""
    out = tmp_path / "il"
    cfg = configs.load(overrides=TINY + ["il.steps=10", "il.max_failures=0", "il.num_workers=2"])
    with pytest.raises(Exception) as failed:
        train_il(lake_root, cfg, out, policy="bc", min_f1=0.0, _fail_at_step=7)
    assert (out / ".failure-drill-done").exists()
    assert "RayTrainWorker" in str(failed.value) and "died unexpectedly" in str(failed.value)  # the reason
    assert not (out / "policy.pt").exists() and not list(out.glob(".policy.pt*"))

    result = train_il(lake_root, cfg, out, policy="bc", min_f1=0.0)  # the drill fires once: no death now
    assert (result.steps, result.start_step) == (10, 5)  # from the checkpoint of step 5
    policy, meta = load_policy(result.policy_path)
    assert meta["step"] == 10 and policy.kind == "bc"
