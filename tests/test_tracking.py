"""MLflow tracking through the campaign's outbox, against a real local MLflow store: records kept
in order on disk while the store is unreachable, delivered in batches when it is back, runs
ended with their real status, the bound, one sender per outbox, and the metrics sink."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import configs
from orchestrator.tracking import MetricsSink, artifact_location_for, flatten, tracking_uri_for
from workers.tracking import CAMPAIGN_KEY, PARENT_TAG, Outbox, sync_hint, unit_key


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One MLflow SQLite store for the module (creating one takes seconds)."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{path}"
    MlflowClient(uri).search_experiments()  # creates the tables
    return uri


def _client(uri: str) -> MlflowClient:
    return MlflowClient(uri)


def mlflow_settings(**changes) -> configs.MlflowConfig:
    """``configs/default.yaml``'s ``mlflow`` section with ``changes``."""
    return configs.load(profile=None, overrides=[f"mlflow.{k}={v}" for k, v in changes.items()]).mlflow


def test_the_outbox_takes_its_settings_from_the_config(tmp_path):
    """No number of the outbox is written in Python: default.yaml's, or the config it is given."""
    default = configs.load(profile=None).mlflow
    box = Outbox(tmp_path / "camp" / "mlflow-outbox.db", "")
    assert (box.max_batch, box.flush_interval_s, box.max_metrics, box.retry_max_s) == (
        default.max_batch, default.flush_interval_s, default.outbox_max_metrics, default.retry_max_s)
    assert box.sync_hint == f"`pianoforge mlflow sync {tmp_path / 'camp'}` delivers them."
    box.close()
    box = Outbox(tmp_path / "camp" / "mlflow-outbox.db", "", mlflow_settings(max_batch=7, retry_max_s=3.5),
                 sync_hint=sync_hint("camp"))
    assert (box.max_batch, box.retry_max_s, box.sync_hint) == (7, 3.5, "`pianoforge mlflow sync camp` delivers them.")
    box.close()


def test_tracking_uri_defaults_to_sqlite_in_the_campaign_directory(tmp_path):
    cfg = configs.load()
    assert tracking_uri_for(cfg.mlflow, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    cfg = configs.load(overrides=["mlflow.tracking_uri=http://head:5000"])
    assert tracking_uri_for(cfg.mlflow, tmp_path) == "http://head:5000"
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "None"}


def test_a_config_saved_before_a_setting_existed_still_loads(tmp_path):
    """A campaign's config.yaml from before mlflow.retry_max_s & co: resume must load it."""
    from orchestrator.campaign import CampaignPaths, load_saved_config

    saved = configs.load(overrides=["mlflow.max_batch=7", "campaign.max_attempts=5"]).to_dict()
    for key in ("outbox_max_metrics", "retry_max_s", "close_timeout_s"):
        del saved["mlflow"][key]
    del saved["dashboard"]
    paths = CampaignPaths(tmp_path)
    paths.config.write_text(yaml.safe_dump(saved))
    cfg = load_saved_config(paths, ["mlflow.close_timeout_s=3"])
    default = configs.load(profile=None).mlflow
    assert cfg.mlflow.max_batch == 7 and cfg.campaign.max_attempts == 5  # what was saved stays
    assert cfg.mlflow.retry_max_s == default.retry_max_s and cfg.mlflow.close_timeout_s == 3
    with pytest.raises(configs.ConfigError, match="unknown config key 'mlflow.no_such'"):
        configs.from_dict({**saved, "mlflow": {**saved["mlflow"], "no_such": 1}})


def test_records_wait_on_disk_while_the_store_is_unreachable_then_arrive_in_order(tmp_path):
    blocker = tmp_path / "server"
    blocker.write_text("a file where the store's folder should be: the store cannot open")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"
    box = Outbox(tmp_path / "outbox.db", uri, mlflow_settings(max_batch=5))
    box.start_run(CAMPAIGN_KEY, "camp", "camp", params={"campaign.workload": "synthetic"})
    box.start_run(unit_key("u1"), "camp", "u1", parent=CAMPAIGN_KEY, params={"song": "twinkle"}, tags={"attempt": 1})
    for step in range(12):
        box.log(unit_key("u1"), {"train/return": float(step), "note": "not a number"}, step)
    box.end_run(unit_key("u1"), "FAILED", {"f1": 0.25}, {"state": "failed"})
    box.end_run(CAMPAIGN_KEY, "FAILED")

    assert box.deliver() is False  # unreachable: nothing lost, nothing half-done
    left = box.backlog()
    assert left.records == 8 and left.metrics == 13 and "server" in left.last_error
    line = left.describe(uri, sync_hint("camp"))
    assert line.startswith("tracking is behind: 8 records (13 metric values") and "mlflow sync camp" in line
    box.close()

    blocker.unlink()  # the store is back; a later process (a new driver, `mlflow sync`) delivers
    box = Outbox(tmp_path / "outbox.db", uri, mlflow_settings(max_batch=5))
    assert box.deliver() is True and box.backlog().empty
    # 2 openings, 13 metric values in 3 calls of <= 5 (the unit's end tags riding on the last), 2 endings
    assert box.stats["delivered_metrics"] == 13 and box.stats["mlflow_calls"] == 7
    client = _client(uri)
    unit, parent = client.get_run(box.run_id(unit_key("u1"))), client.get_run(box.run_id(CAMPAIGN_KEY))
    assert unit.info.status == "FAILED" and parent.info.status == "FAILED"  # their real status
    assert unit.data.tags[PARENT_TAG] == parent.info.run_id and unit.data.tags["state"] == "failed"
    assert unit.data.params["song"] == "twinkle" and parent.data.params["campaign.workload"] == "synthetic"
    history = client.get_metric_history(unit.info.run_id, "train/return")
    assert sorted(m.step for m in history) == list(range(12)) and unit.data.metrics["f1"] == 0.25
    assert client.get_experiment(unit.info.experiment_id).name == "camp"
    box.close()


def test_reopening_a_key_reopens_its_run(tmp_path, store_uri):
    box = Outbox(tmp_path / "outbox.db", store_uri)
    box.start_run(unit_key("u2"), "reopen", "u2", params={"song": "s"}, tags={"attempt": 1})
    box.end_run(unit_key("u2"), "FAILED")
    box.start_run(unit_key("u2"), "reopen", "u2", params={"song": "s"}, tags={"attempt": 2})
    assert box.deliver()
    client = _client(store_uri)
    runs = client.search_runs([box.runs_since(0)[1][unit_key("u2")][1]], "attributes.run_name = 'u2'")
    assert len(runs) == 1 and runs[0].info.status == "RUNNING" and runs[0].data.tags["attempt"] == "2"
    # A run made before the outbox existed (an older campaign's) is adopted, not made again.
    box.adopt(unit_key("old"), runs[0].info.run_id, runs[0].info.experiment_id)
    box.start_run(unit_key("old"), "reopen", "old")
    assert box.deliver() and box.run_id(unit_key("old")) == runs[0].info.run_id
    box.close()


def test_a_record_the_store_rejects_is_dropped_and_the_rest_goes_on(tmp_path, store_uri):
    box = Outbox(tmp_path / "outbox.db", store_uri)
    box.start_run("r", "rejects", "r", params={"lr": "0.1"})
    box.set_tags("r", {}, params={"lr": "0.2"})  # MLflow refuses to change a param
    box.log("r", {"loss": 1.0}, 3)
    box.end_run("r", "FINISHED")
    assert box.deliver() and box.stats["dropped_records"] == 1
    run = _client(store_uri).get_run(box.run_id("r"))
    assert run.data.params["lr"] == "0.1" and run.data.metrics["loss"] == 1.0 and run.info.status == "FINISHED"
    box.close()


def test_the_outbox_is_bounded_by_dropping_the_oldest_metrics(tmp_path):
    box = Outbox(tmp_path / "outbox.db", "http://127.0.0.1:9", mlflow_settings(max_batch=10, outbox_max_metrics=25))
    box.start_run("r", "e", "r")
    for step in range(40):
        box.log("r", {"loss": float(step)}, step)
        if step % 10 == 9:
            box.flush()
    box.end_run("r", "FINISHED")
    left = box.backlog()
    assert left.metrics <= 25 and left.dropped == 20  # the two oldest records of 10
    kinds = [k for (k,) in box._db.execute("SELECT kind FROM ops ORDER BY seq")]
    assert kinds[0] == "start" and kinds[-1] == "end"  # openings and endings are never dropped
    steps = [row for (body,) in box._db.execute("SELECT body FROM ops WHERE kind = 'log'")
             for row in json.loads(body)["metrics"]]
    assert [s[3] for s in steps] == list(range(20, 40))  # the newest, in order
    box.close()


def test_one_process_delivers_at_a_time(tmp_path, store_uri):
    first = Outbox(tmp_path / "outbox.db", store_uri)
    second = Outbox(tmp_path / "outbox.db", store_uri)  # e.g. an imitation job writing the campaign's outbox
    first.start_sender()
    deadline = time.time() + 30
    while not first._holding and time.time() < deadline:
        time.sleep(0.05)
    second.start_run("il", "two-writers", "il-flow")
    second.log("il", {"train/loss": 0.5}, 10)
    second.flush()
    assert second.deliver(timeout_s=1) is False and second.delivered_elsewhere  # the first one holds the send lock
    deadline = time.time() + 60
    while first.run_id("il") is None and time.time() < deadline:
        time.sleep(0.1)
    assert first.stop(wait_s=30).empty
    assert _client(store_uri).get_run(first.run_id("il")).data.metrics["train/loss"] == 0.5
    first.close()
    second.close()


def test_sink_writes_runs_and_hands_notes_to_the_driver(tmp_path, store_uri):
    cfg = configs.load(overrides=["mlflow.flush_interval_s=0.2", "mlflow.max_batch=7"])
    sink = MetricsSink(str(tmp_path), store_uri, "sinkcamp", artifact_location_for(store_uri, tmp_path), cfg.mlflow)
    sink.open_campaign("sinkcamp", cfg.to_dict(), "campaign: {}\n", system_metrics=False)
    sink.open_unit("u1", {"song": "twinkle", "chunk": 0}, {"state": "running", "attempt": 1})
    sink.started("u1", {"hostname": "h", "pid": 1, "node_id": "n", "slurm_job_id": None})
    for step in range(1, 20):
        sink.log("u1", {"step": step, "train/return": float(step), "checkpoint_step": step - step % 5})
    notes = sink.drain()
    assert notes["started"][0]["hostname"] == "h" and notes["progress"] == {"u1": (19, 15, None)}  # no fencing token
    sink.finish_unit("u1", "FINISHED", {"f1": 0.9}, {"state": "succeeded"})
    closed = sink.close("FINISHED", {"units_succeeded": 1}, wait_s=60)
    assert closed["behind"] is None and closed["stats"]["metrics_received"] == 19 * 2
    runs = closed["runs"]
    assert set(runs) == {CAMPAIGN_KEY, unit_key("u1")}
    client = _client(store_uri)
    unit, parent = client.get_run(runs[unit_key("u1")][0]), client.get_run(runs[CAMPAIGN_KEY][0])
    assert unit.info.status == parent.info.status == "FINISHED"
    assert unit.data.tags[PARENT_TAG] == parent.info.run_id and unit.data.tags["hostname"] == "h"
    assert sorted(m.step for m in client.get_metric_history(unit.info.run_id, "train/return")) == list(range(1, 20))
    assert parent.data.params["mlflow.max_batch"] == "7" and parent.data.metrics["units_succeeded"] == 1
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["config.yaml"]


def test_mlflow_sync_delivers_what_a_stopped_driver_left_and_records_the_run_ids(tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.store import CampaignStore
    from workers.units import UnitSpec

    camp = tmp_path / "left"
    camp.mkdir()
    blocker = tmp_path / "server"
    blocker.write_text("the store's folder is a file: unreachable")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"
    unit = UnitSpec.create("/songs/a.mid", "a" * 64, "a", 0, "cfg00000")
    with CampaignStore(camp / "campaign.db") as store:
        store.add_units([unit], store.put_config({}, "cfg00000"))
        store.set_meta("tracking_uri", uri)
    box = Outbox(camp / "mlflow-outbox.db", uri)
    box.start_run(CAMPAIGN_KEY, "left", "left")
    box.start_run(unit_key(unit.unit_id), "left", unit.unit_id, parent=CAMPAIGN_KEY)
    box.log(unit_key(unit.unit_id), {"train/return": 1.0}, 1)
    box.end_run(unit_key(unit.unit_id), "FINISHED")
    box.end_run(CAMPAIGN_KEY, "FINISHED")
    box.close()

    out = CliRunner().invoke(app, ["mlflow", "sync", "left", "--root", str(tmp_path)])
    assert out.exit_code == 1 and "tracking is behind: 5 records (1 metric values" in out.output, out.output
    blocker.unlink()
    out = CliRunner().invoke(app, ["mlflow", "sync", "left", "--root", str(tmp_path)])
    assert out.exit_code == 0 and "every MLflow record delivered" in out.output, out.output
    with CampaignStore(camp / "campaign.db", readonly=True) as store:
        run_id, parent_id = store.unit(unit.unit_id).mlflow_run_id, store.get_meta("mlflow_parent_run_id")
        experiment_id = store.get_meta("mlflow_experiment_id")
    run = _client(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[PARENT_TAG] == parent_id
    assert run.info.experiment_id == experiment_id and run.data.metrics["train/return"] == 1.0


def test_a_file_artifact_is_delivered_from_where_it_lies(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    box = Outbox(tmp_path / "outbox.db", uri)
    artifacts = (tmp_path / "artifacts").as_uri()
    box.start_run(CAMPAIGN_KEY, "camp", "camp", artifact_location=artifacts)
    box.start_run(unit_key("u1"), "camp", "u1", parent=CAMPAIGN_KEY, artifact_location=artifacts)
    box.end_run(unit_key("u1"), "FINISHED")
    clip, gone = tmp_path / "rollout.mp4", tmp_path / "gone.mp4"
    clip.write_bytes(b"\x00\x01 a clip")
    box.log_file(unit_key("u1"), clip)  # after the run's end, as the campaign logs a finished unit's clip
    box.log_file(unit_key("u1"), gone)  # deleted before delivery: skipped, the rest goes on
    assert box.deliver() is True and box.backlog().empty
    client = MlflowClient(uri)
    run_id = box.run_id(unit_key("u1"))
    assert [a.path for a in client.list_artifacts(run_id)] == ["rollout.mp4"]
    assert Path(client.download_artifacts(run_id, "rollout.mp4", str(tmp_path / "dl"))).read_bytes() == clip.read_bytes()
    box.close()


def test_run_links_and_the_ui_hint_follow_the_tracking_uri(tmp_path):
    import subprocess
    import sys

    from dashboards.mlflow_reader import MlflowReader
    from orchestrator.tracking import mlflow_ui_hint

    # A tracking server serves its own UI: links and the hint lead there, not to a local default.
    server = MlflowReader("https://mlflow.lab.example:8443/", None)
    assert server.link("r1") == "https://mlflow.lab.example:8443/#/experiments/0/runs/r1"
    assert mlflow_ui_hint("https://mlflow.lab.example:8443/") == "open https://mlflow.lab.example:8443"
    elsewhere = MlflowReader("http://tracking:5000", "https://ui.example/exp/{experiment_id}/run/{run_id}")
    assert elsewhere.link("r2") == "https://ui.example/exp/0/run/r2"  # the UI URL setting, where the UI lives elsewhere
    local = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert MlflowReader(local, None).link("r3") == "http://127.0.0.1:5000/#/experiments/0/runs/r3"

    # For a local store the hint is a command MLflow (3) runs: `mlflow ui` (an alias of `mlflow server`)
    # starts by opening its stores the way this does.
    command = mlflow_ui_hint(local).split("  (")[0].split()
    assert command[:3] == ["mlflow", "ui", "--backend-store-uri"] and command[3] == local
    check = ("import sys; from mlflow.server.handlers import initialize_backend_stores as init\n"
             "init(sys.argv[1], sys.argv[1], sys.argv[2]); print('stores open')")
    child = subprocess.run([sys.executable, "-c", check, command[3], (tmp_path / "artifacts").as_uri()],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert child.returncode == 0 and "stores open" in child.stdout, child.stderr[-2000:]
