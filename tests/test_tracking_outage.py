"""Campaigns and a real ``mlflow server`` that goes away: down when a campaign starts, killed
and restarted in the middle of another. Training never waits on it; every run ends up on the
server with its metrics and its real status, delivered by the running driver, by ``status``
or by ``pianoforge mlflow sync``; and the two campaigns sharing the server each see only their
own runs on their dashboard.

The server takes tens of seconds to start on a busy machine, so it is started twice in all.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import configs
from orchestrator import campaign
from orchestrator.cli import app
from orchestrator.store import SUCCEEDED, CampaignStore
from workers.synthetic import make_units
from workers.tracking import CAMPAIGN_KEY, PARENT_TAG, Outbox, outbox_path

pytestmark = pytest.mark.slow

STEPS = 8


class Server:
    """``mlflow server`` on a fixed port with a SQLite backend: start, kill (SIGKILL), start again."""

    def __init__(self, folder: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.folder, self.proc = folder, None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            stdout=open(self.folder / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server did not answer on {self.uri} within {timeout} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path)
    yield srv
    srv.kill()


def _cfg(uri: str, *extra: str) -> configs.Config:
    return configs.load(overrides=[
        "campaign.workload=synthetic", f"campaign.synthetic.steps={STEPS}", "campaign.synthetic.episodes=1",
        "campaign.synthetic.steps_per_episode=4", "campaign.max_concurrent_units=2", "gate.f1_threshold=0.0",
        "gate.launch=never", "mlflow.system_metrics=false", "mlflow.flush_interval_s=0.5", "mlflow.retry_max_s=2",
        f"mlflow.tracking_uri={uri}", *extra])


def _assert_all_delivered(camp_dir: Path, uri: str, n_units: int) -> None:
    """Every unit's run on the server, FINISHED, with every checkpoint's metric; the parent too."""
    client = MlflowClient(uri)
    with CampaignStore(camp_dir / "campaign.db", readonly=True) as store:
        rows = list(store.units())
        experiment_id, parent_id = store.get_meta("mlflow_experiment_id"), store.get_meta("mlflow_parent_run_id")
    assert len(rows) == n_units and all(r.state == SUCCEEDED and r.mlflow_run_id for r in rows)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.experiment_id == experiment_id
    assert parent.data.metrics[f"units_{SUCCEEDED}"] == n_units
    for row in rows:
        run = client.get_run(row.mlflow_run_id)
        assert run.info.status == "FINISHED" and run.data.tags[PARENT_TAG] == parent_id, row.unit_id
        assert {"f1", "return"} <= set(run.data.metrics) and run.data.tags["state"] == SUCCEEDED
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/return")}
        assert steps == set(range(1, STEPS + 1)), (row.unit_id, steps)
    box = Outbox(outbox_path(camp_dir), uri)
    assert box.backlog().empty
    box.close()


def test_campaigns_go_on_through_a_tracking_server_outage(ray_cluster, server, tmp_path):
    from dashboards.data import Campaign

    root = tmp_path / "campaigns"
    # 1. The server is down when the campaign starts: it runs to the end all the same, says
    #    once that tracking is behind, and keeps everything for later.
    cfg = _cfg(server.uri, "campaign.synthetic.sleep_s=0.4", "mlflow.close_timeout_s=1")
    early = make_units(1, 2, "cfgdown0")
    t0 = time.time()
    summary = campaign.submit(early, cfg, "down-at-start", root=root)
    assert summary.counts[SUCCEEDED] == 2 and time.time() - t0 < 120
    assert summary.tracking_behind and summary.tracking_behind.startswith("tracking is behind: ")
    assert "pianoforge mlflow sync down-at-start" in summary.tracking_behind
    down_dir = root / "down-at-start"
    box = Outbox(outbox_path(down_dir), server.uri)
    assert box.backlog().records >= 2 * 3 + 2  # per unit: opened, metrics, ended; the parent: opened, ended
    box.close()

    # 2. The server comes up; `status` delivers the backlog and records the run ids in the store.
    server.start()
    out = CliRunner().invoke(app, ["status", "down-at-start", "--root", str(root)])
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(app, ["mlflow", "sync", "down-at-start", "--root", str(root)])
    assert out.exit_code == 0 and "every MLflow record delivered" in out.output, out.output
    _assert_all_delivered(down_dir, server.uri, 2)

    # 3. Killed in the middle of a campaign and restarted: the running driver delivers the rest.
    cfg = _cfg(server.uri, "campaign.synthetic.sleep_s=4", "mlflow.close_timeout_s=300")
    units = make_units(2, 2, "cfgkill0")
    mid_dir = root / "killed-mid-way"
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(s=campaign.submit(units, cfg, "killed-mid-way", root=root)))
    driver.start()
    deadline = time.time() + 180
    while time.time() < deadline and not _some_unit_run_delivered(mid_dir):
        time.sleep(0.2)
    assert _some_unit_run_delivered(mid_dir), "no unit run reached the server"
    server.kill()
    killed_at = time.time()
    time.sleep(3.0)  # units go on reporting while it is down
    server.start()
    driver.join(timeout=600)
    summary = result["s"]
    assert summary.counts[SUCCEEDED] == 4 and summary.tracking_behind is None
    with CampaignStore(mid_dir / "campaign.db", readonly=True) as store:
        ended = [r.finished_at for r in store.units()]
    assert sum(t > killed_at for t in ended) >= 2  # units trained on (and ended) through the outage
    _assert_all_delivered(mid_dir, server.uri, 4)

    # 4. Two campaigns on one tracking server: each page shows its own runs only.
    for directory in (down_dir, mid_dir):
        snap = Campaign(directory).snapshot()
        with CampaignStore(directory / "campaign.db", readonly=True) as store:
            experiment_id = str(store.get_meta("mlflow_experiment_id"))
        own = {r.info.run_id for r in MlflowClient(server.uri).search_runs([experiment_id])}
        assert snap.curves and {u.mlflow_run_id for u in snap.units if u.unit_id in snap.curves} <= own
        assert not snap.gate.launched and snap.gate.il_run_id is None and not snap.problems


def _some_unit_run_delivered(camp_dir: Path) -> bool:
    path = outbox_path(camp_dir)
    if not path.exists():
        return False
    box = Outbox(path, "")
    try:
        return any(key != CAMPAIGN_KEY for key, *_ in box._db.execute("SELECT key FROM runs"))
    finally:
        box.close()
