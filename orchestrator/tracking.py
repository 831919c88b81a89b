"""MLflow tracking of a campaign: one experiment per campaign, a parent run for the campaign,
a child run per unit, written through the campaign's outbox (``workers.tracking``).

Workers never talk to MLflow. They call ``sink.log_many.remote(unit_id, items)``
fire-and-forget on a ``MetricsSink`` actor pinned to the driver's node; the sink puts
everything into the outbox (``<campaign>/mlflow-outbox.db``), whose sender delivers it to the
tracking server in order and keeps it on disk while the server is unreachable, so neither the
workers nor the driver ever wait on MLflow and a campaign starts with the server down. The
sink also remembers what workers said about where they run and how far they got, and the run
ids delivered so far; the driver collects that with ``drain()`` and writes it to the store
(:func:`record_runs`).

What a driver could not deliver before it stopped is delivered by the next driver, by
``pianoforge status``, or by ``pianoforge mlflow sync`` (:func:`sync`).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import ray

from workers.tracking import CAMPAIGN_KEY, PARENT_TAG, Backlog, Outbox, outbox_path, sync_hint, unit_key  # noqa: F401

log = logging.getLogger(__name__)

SYSTEM_METRICS_INTERVAL_S = 10.0


def tracking_uri_for(mlflow_cfg: Any, campaign_dir: Path) -> str:
    """``mlflow.tracking_uri`` when set, else a SQLite file in the campaign directory."""
    if mlflow_cfg.tracking_uri:
        return mlflow_cfg.tracking_uri
    return f"sqlite:///{(Path(campaign_dir) / 'mlflow.db').resolve()}"


def artifact_location_for(tracking_uri: str, campaign_dir: Path) -> str | None:
    """Artifacts next to a SQLite store (``mlartifacts/``); a tracking server chooses its own."""
    if tracking_uri.startswith("sqlite:"):
        return (Path(campaign_dir) / "mlartifacts").resolve().as_uri()
    return None


def open_outbox(campaign_dir: Path, tracking_uri: str, mlflow_cfg: Any) -> Outbox:
    """The campaign's outbox with the ``mlflow.*`` settings."""
    return Outbox(outbox_path(campaign_dir), tracking_uri, mlflow_cfg, sync_hint=sync_hint(Path(campaign_dir).name))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)
    return out


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local tracking store by default


def mlflow_ui(tracking_uri: str) -> str:
    """Where the MLflow UI of ``tracking_uri`` is: an http(s) tracking server serves its own UI;
    a local store (sqlite, a folder) is seen through `mlflow ui` at :data:`LOCAL_UI`."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return LOCAL_UI


def mlflow_ui_hint(tracking_uri: str) -> str:
    """How to look at a campaign's runs: the server's URL, or the `mlflow ui` command for a local
    store (MLflow 3 refuses `mlflow ui --backend-store-uri http://...`)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {mlflow_ui(tracking_uri)}"
    return f"mlflow ui --backend-store-uri {tracking_uri}  (then open {LOCAL_UI})"


class MetricsSink:
    """The campaign's MLflow writer and the workers' notes. Create with ``start_sink`` (a Ray actor).

    Every method returns at once: metrics are buffered and written to the outbox every
    ``mlflow.flush_interval_s``; run openings, endings and tags go to it directly.
    """

    def __init__(self, campaign_dir: str, tracking_uri: str, experiment_name: str, artifact_location: str | None,
                 mlflow_cfg: Any):
        self.outbox = open_outbox(Path(campaign_dir), tracking_uri, mlflow_cfg)
        self.outbox.start_sender()
        self.experiment, self.artifact_location = experiment_name, artifact_location
        self._lock = threading.Lock()  # guards the notes below
        self._started: list[dict] = []                       # worker start notes since the last drain
        # unit_id -> (step, checkpoint_step, the attempt's fencing token)
        self._progress: dict[str, tuple[int | None, int | None, int | None]] = {}
        self._runs_cursor = 0
        self._metrics_received = 0
        self._system: threading.Thread | None = None
        self._system_stop = threading.Event()

    def open_campaign(self, name: str, config: dict[str, Any], config_text: str | None, system_metrics: bool,
                      known_runs: dict[str, tuple[str, str]] | None = None) -> None:
        """Open (or reopen) the parent run with the resolved config as params and artifact.
        ``known_runs``: ``{key: (run_id, experiment_id)}`` the store already holds (runs made
        before the outbox existed), so they are reopened rather than made again."""
        for key, (run_id, experiment_id) in (known_runs or {}).items():
            self.outbox.adopt(key, run_id, experiment_id)
        self.outbox.start_run(CAMPAIGN_KEY, self.experiment, name, tags={"pianoforge.campaign": name},
                              params=flatten(config), artifact_location=self.artifact_location)
        if config_text is not None:
            self.outbox.log_text(CAMPAIGN_KEY, "config.yaml", config_text)
        if system_metrics:
            self._system = threading.Thread(target=self._sample_system, name="system-metrics", daemon=True)
            self._system.start()

    def open_unit(self, unit_id: str, params: dict[str, Any], tags: dict[str, Any]) -> None:
        """Open the unit's child run (a retried unit reopens its run); its id reaches the driver
        through ``drain()["runs"]`` once delivered."""
        self.outbox.start_run(unit_key(unit_id), self.experiment, unit_id, tags=tags, params=params,
                              parent=CAMPAIGN_KEY, artifact_location=self.artifact_location)

    def finish_unit(self, unit_id: str, status: str, metrics: dict[str, float], tags: dict[str, Any]) -> None:
        """The unit's final metrics and tags, and the end of its run with ``status``."""
        self.outbox.end_run(unit_key(unit_id), status, metrics, tags)

    def log_file(self, unit_id: str, path: str) -> None:
        """A file (the unit's clip) as an artifact of the unit's run."""
        self.outbox.log_file(unit_key(unit_id), path)

    def log(self, unit_id: str, metrics: dict[str, Any], timestamp_ms: int | None = None,
            token: int | None = None) -> None:
        """A worker's metrics; ``step`` in the dict is the MLflow step; ``token`` the sending
        attempt's fencing token (the driver records progress of the current attempt only)."""
        step = int(metrics.get("step", 0) or 0)
        values = {k: v for k, v in metrics.items() if k != "step"}
        self.outbox.log(unit_key(unit_id), values, step, timestamp_ms)
        # A checkpoint's step: ``checkpoint_step`` after each checkpoint, ``resume/step`` when resuming from one.
        ckpt = metrics.get("checkpoint_step", metrics.get("resume/step"))
        with self._lock:
            self._metrics_received += len(values)
            old_step, old_ckpt, old_token = self._progress.get(unit_id, (None, None, None))
            if token != old_token:  # another attempt's progress: not mixed with this one's
                old_step = old_ckpt = None
            self._progress[unit_id] = (step if "step" in metrics else old_step,
                                       int(ckpt) if ckpt is not None else old_ckpt, token)

    def log_many(self, unit_id: str, items: list[tuple[dict[str, Any], int]], token: int | None = None) -> None:
        """``log`` for a batch of (metrics, timestamp_ms) a worker collected."""
        for metrics, ts in items:
            self.log(unit_id, metrics, ts, token)

    def started(self, unit_id: str, info: dict[str, Any]) -> None:
        """A worker began an attempt: where (hostname, node, pid, SLURM job)."""
        with self._lock:
            self._started.append({"unit_id": unit_id, **info})
        self.outbox.set_tags(unit_key(unit_id), {k: v for k, v in info.items()
                                                 if k in ("hostname", "node_id", "slurm_job_id") and v})

    def drain(self) -> dict[str, Any]:
        """What happened since the last drain: worker start notes, progress, runs delivered
        (``{key: (run_id, experiment_id)}``), and the warning line while delivery fails."""
        self._runs_cursor, runs = self.outbox.runs_since(self._runs_cursor)
        with self._lock:
            out = {"started": self._started, "progress": self._progress, "runs": runs, "behind": self.outbox.behind()}
            self._started, self._progress = [], {}
        return out

    def flush(self) -> dict[str, Any]:
        """Move buffered metrics to the outbox; return the counters."""
        self.outbox.flush()
        return self.stats()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            received = self._metrics_received
        return {"metrics_received": received, **self.outbox.stats}

    def run_id(self, unit_id: str) -> str | None:
        return self.outbox.run_id(unit_key(unit_id))

    def close(self, status: str, metrics: dict[str, float] | None = None, wait_s: float = 10.0) -> dict[str, Any]:
        """End the parent run with ``status`` and the campaign's summary metrics; deliver for up
        to ``wait_s`` seconds. Returns the counters, the runs delivered since the last drain, and
        the warning line when records are left for later."""
        self._system_stop.set()
        if self._system is not None:
            self._system.join(timeout=5)
        self.outbox.end_run(CAMPAIGN_KEY, status, metrics)
        backlog = self.outbox.stop(wait_s)
        runs = self.drain()["runs"]
        stats = self.stats()
        self.outbox.close()
        return {"stats": stats, "runs": runs, "behind": None if backlog.empty else backlog.describe(
            self.outbox.uri, self.outbox.sync_hint)}

    def _sample_system(self) -> None:
        """CPU, memory, disk and network of the driver's node, as MLflow's system-metrics monitor
        samples them, logged to the parent run through the outbox (so an outage loses none)."""
        try:
            from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
            from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
            from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

            monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        except Exception as e:  # noqa: BLE001 - psutil missing etc.: system metrics are a nicety
            log.warning("system metrics disabled: %s", e)
            return
        while not self._system_stop.wait(SYSTEM_METRICS_INTERVAL_S):
            values: dict[str, float] = {}
            for monitor in monitors:
                monitor.collect_metrics()
                values.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            self.outbox.log(CAMPAIGN_KEY, {f"system/{k}": v for k, v in values.items()},
                            self.outbox.next_counter("system"))


def start_sink(campaign_dir: Path, tracking_uri: str, experiment_name: str, artifact_location: str | None,
               mlflow_cfg: Any):
    """Start the ``MetricsSink`` actor on this (the driver's) node; it needs no CPU slot."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(MetricsSink).options(
        num_cpus=0,
        max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
    )
    return actor.remote(str(campaign_dir), tracking_uri, experiment_name, artifact_location, mlflow_cfg)


def known_runs(store: Any, tracking_uri: str) -> dict[str, tuple[str, str]]:
    """Run ids the store holds for ``tracking_uri`` (a campaign tracked before its outbox existed)."""
    if store.get_meta("tracking_uri") != tracking_uri or not store.get_meta("mlflow_experiment_id"):
        return {}
    experiment_id = str(store.get_meta("mlflow_experiment_id"))
    runs = {unit_key(r.unit_id): (r.mlflow_run_id, experiment_id) for r in store.units() if r.mlflow_run_id}
    if store.get_meta("mlflow_parent_run_id"):
        runs[CAMPAIGN_KEY] = (str(store.get_meta("mlflow_parent_run_id")), experiment_id)
    return runs


def record_runs(store: Any, runs: dict[str, tuple[str, str]]) -> None:
    """Write delivered run ids into the campaign store: the parent run and experiment (meta),
    each unit's run, each imitation job's run (its launch record). The dashboard and status
    take run ids from there, never by searching the tracking server."""
    from orchestrator.gate import record_il_run

    for key, (run_id, experiment_id) in runs.items():
        if key == CAMPAIGN_KEY:
            store.set_meta("mlflow_parent_run_id", run_id)
            store.set_meta("mlflow_experiment_id", experiment_id)
        elif key.startswith("unit:"):
            store.set_mlflow_run(key[len("unit:"):], run_id)
        elif key.startswith("il:"):
            record_il_run(store, key[len("il:"):], run_id)


def sync(campaign_dir: Path, timeout_s: float | None = None) -> tuple[Backlog, str] | None:
    """Deliver the waiting records of a campaign (or of a folder holding an outbox, e.g. a
    ``train-il --out`` folder) for up to ``timeout_s`` seconds (``pianoforge mlflow sync``,
    ``status``) and, when no driver runs, write the delivered run ids into the campaign's store.
    Returns what is left and the tracking uri (None: nothing was ever tracked there). A running
    driver delivers on its own: then this only reports."""
    from filelock import FileLock, Timeout

    from orchestrator.store import CampaignStore

    campaign_dir = Path(campaign_dir)
    path = outbox_path(campaign_dir)
    if not path.exists():
        return None
    store_path = campaign_dir / "campaign.db"
    uri = ""  # an imitation job's own outbox (train-il outside a campaign): each record names its server
    if store_path.exists():
        with CampaignStore(store_path, readonly=True) as store:
            uri = store.get_meta("tracking_uri") or ""
    box = Outbox(path, uri, sync_hint=sync_hint(campaign_dir.name))
    try:
        box.deliver(timeout_s)
        _, runs = box.runs_since(0)
        backlog = box.backlog()
        uri = uri or box.uris()
    finally:
        box.close()
    if box.delivered_elsewhere and backlog.last_error is None:  # a running driver delivers, and keeps up
        backlog = Backlog(records=0, metrics=0, oldest=None, dropped=backlog.dropped, last_error=None)
    lock = FileLock(str(campaign_dir / "driver.lock"))
    if not store_path.exists():
        return backlog, uri
    try:
        lock.acquire(timeout=0)
    except Timeout:  # a driver runs: it records the run ids itself
        return backlog, uri
    try:
        with CampaignStore(store_path) as store:
            record_runs(store, runs)
    finally:
        lock.release()
    return backlog, uri
