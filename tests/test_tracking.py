"""MLflow through the head: the MetricsSink batches worker metrics into parent/child runs."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.tracking import PARENT_TAG, MetricsSink, artifact_location_for, flatten, tracking_uri_for

import configs


@pytest.fixture(scope="module")
def sink_setup(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mlflow")  # one MLflow database for the module: creating one is slow
    cfg = configs.load(overrides=["mlflow.flush_interval_s=3600", "mlflow.max_batch=7"])  # flush only when asked
    uri = tracking_uri_for(cfg.mlflow, tmp_path)
    sink = MetricsSink(uri, "camp", artifact_location_for(uri, tmp_path), cfg.mlflow.flush_interval_s, cfg.mlflow.max_batch)
    config_path = tmp_path / "config.yaml"
    config_path.write_text("campaign: {}\n")
    parent = sink.open_campaign("camp", None, cfg.to_dict(), str(config_path), system_metrics=False)
    yield sink, MlflowClient(uri), parent, cfg
    sink.close("FINISHED")


def test_tracking_uri_defaults_to_sqlite_in_the_campaign_directory(tmp_path):
    cfg = configs.load()
    assert tracking_uri_for(cfg.mlflow, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    cfg = configs.load(overrides=["mlflow.tracking_uri=http://head:5000"])
    assert tracking_uri_for(cfg.mlflow, tmp_path) == "http://head:5000"
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "None"}


def test_parent_run_has_the_resolved_config_as_params_and_artifact(sink_setup):
    sink, client, parent, cfg = sink_setup
    run = client.get_run(parent["run_id"])
    assert run.data.params["droq.batch_size"] == str(cfg.droq.batch_size)
    assert run.data.params["mlflow.max_batch"] == "7"
    assert [a.path for a in client.list_artifacts(parent["run_id"])] == ["config.yaml"]


def test_worker_metrics_are_batched_into_the_unit_child_run(sink_setup):
    sink, client, parent, _ = sink_setup
    sink.log("u1", {"step": 0, "train/return": 0.0})  # before the run exists: kept until it does
    sink.open_unit("u1", None, {"song": "twinkle", "chunk": 0}, {"state": "running", "attempt": 1})
    before = sink.flush()
    run_id = sink.drain()["runs"]["u1"]
    for step in range(1, 20):
        sink.log("u1", {"step": step, "train/return": float(step), "eval/f1": step / 20, "note": "not a number"})
    assert len(client.get_metric_history(run_id, "train/return")) == 1  # the rest is buffered, not written yet
    stats = sink.flush()
    history = client.get_metric_history(run_id, "train/return")
    assert sorted(m.step for m in history) == list(range(20))
    # 38 more metrics, at most 7 per log_batch
    assert stats["metrics_written"] - before["metrics_written"] == 38 and stats["batches"] - before["batches"] == 6
    sink.finish_unit("u1", "FINISHED", {"f1": 0.9, "precision": 0.95, "recall": 0.85}, {"state": "succeeded", "attempt": 1})
    sink.flush()
    run = client.get_run(run_id)
    assert run.data.tags[PARENT_TAG] == parent["run_id"]
    assert run.data.tags["state"] == "succeeded" and run.data.params["song"] == "twinkle"
    assert run.data.metrics["f1"] == 0.9 and run.info.status == "FINISHED"


def test_reopened_unit_run_is_the_same_run(sink_setup):
    sink, client, _, _ = sink_setup
    sink.open_unit("u2", None, {"song": "s"}, {"attempt": 1})
    sink.finish_unit("u2", "FAILED", {}, {"state": "failed"})
    sink.open_unit("u2", None, {"song": "s"}, {"attempt": 2})  # the sink remembers the unit's run
    sink.flush()
    run_id = sink.run_id("u2")
    assert sink.drain()["runs"] == {"u2": run_id}
    assert len(client.search_runs([sink.experiment_id], filter_string="attributes.run_name = 'u2'")) == 1
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["attempt"] == "2"


def test_drain_hands_worker_notes_to_the_driver_once(sink_setup):
    sink, _, _, _ = sink_setup
    sink.started("u3", {"hostname": "h", "pid": 1, "node_id": "n", "slurm_job_id": None})
    sink.log("u3", {"step": 5, "checkpoint_step": 4})
    sink.log("u3", {"step": 6})
    notes = sink.drain()
    assert notes["started"][0]["hostname"] == "h"
    assert notes["progress"] == {"u3": (6, 4)}
    assert sink.drain() == {"started": [], "progress": {}, "runs": {}}


@pytest.mark.slow
def test_sink_actor_flushes_on_its_own(tmp_path):
    import ray

    from orchestrator.tracking import start_sink

    cfg = configs.load(overrides=["mlflow.flush_interval_s=0.2"])
    uri = tracking_uri_for(cfg.mlflow, tmp_path)
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        sink = start_sink(uri, "camp", artifact_location_for(uri, tmp_path), cfg.mlflow)
        ray.get(sink.open_campaign.remote("camp", None, {"a": 1}, None, False))
        sink.open_unit.remote("u", None, {"song": "s"}, {})
        run_id = None
        while run_id is None:
            time.sleep(0.05)
            run_id = ray.get(sink.run_id.remote("u"))
        for step in range(5):
            sink.log.remote("u", {"step": step, "loss": 1.0 / (step + 1)})
        client = MlflowClient(uri)
        deadline = time.time() + 60
        while len(client.get_metric_history(run_id, "loss")) < 5 and time.time() < deadline:
            time.sleep(0.2)
        assert len(client.get_metric_history(run_id, "loss")) == 5  # written without an explicit flush
        ray.get(sink.close.remote("FINISHED"))
    finally:
        ray.shutdown()
