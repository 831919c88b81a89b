"""MLflow tracking through the head: one experiment per campaign, a parent run for the
campaign, a child run per unit.

Workers never talk to MLflow (hundreds of workers writing one SQLite file would lock it).
They call ``sink.log.remote(unit_id, metrics)`` fire-and-forget on a ``MetricsSink`` actor
pinned to the driver's node; the sink buffers metrics and writes them with
``MlflowClient.log_batch`` every ``mlflow.flush_interval_s`` (at most ``mlflow.max_batch``
per call). The sink is also the only process that creates and closes runs, so all MLflow
writes happen in one place. The sink also remembers what workers said about where they run
and how far they got; the driver collects that with ``drain()`` and writes it to the store.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import ray

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"


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


class MetricsSink:
    """Owns every MLflow write of a campaign. Create with ``start_sink`` (a Ray actor)."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_location: str | None,
                 flush_interval_s: float, max_batch: int):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        exp = self.client.get_experiment_by_name(experiment_name)
        if exp is None:
            self.experiment_id = self.client.create_experiment(experiment_name, artifact_location=artifact_location)
        else:
            self.experiment_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(self.experiment_id)
        self.parent_run_id: str | None = None
        self._runs: dict[str, str] = {}                      # unit_id -> MLflow run id
        self._buffer: dict[str, list] = {}                   # unit_id -> [Metric] not yet written
        self._started: list[dict] = []                       # worker start notes since the last drain
        self._progress: dict[str, tuple[int | None, int | None]] = {}  # unit_id -> (step, checkpoint_step)
        self._stats = {"metrics_received": 0, "metrics_written": 0, "batches": 0, "write_seconds": 0.0,
                       "write_errors": 0}
        self._lock = threading.Lock()                        # MLflow client and buffers: flusher vs. calls
        self._monitor = None
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="metrics-sink-flush", daemon=True)
        self._flusher.start()

    # ---- the campaign's parent run ------------------------------------------------------

    def open_campaign(self, name: str, run_id: str | None, config: dict[str, Any], config_path: str | None,
                      system_metrics: bool) -> dict[str, str]:
        """Create (or reopen, given ``run_id``) the parent run; log the resolved config."""
        from mlflow.entities import Param

        with self._lock:
            reopened = run_id is not None
            if reopened:
                self.client.update_run(run_id, status="RUNNING")
            else:
                run_id = self.client.create_run(self.experiment_id, run_name=name,
                                                tags={"pianoforge.campaign": name}).info.run_id
                params = [Param(k, v[:6000]) for k, v in flatten(config).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                    self.client.log_batch(run_id, params=params[i:i + 100])
            if config_path:
                self.client.log_artifact(run_id, config_path)
            self.parent_run_id = run_id
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=reopened,
                                                     tracking_uri=self.tracking_uri)
                self._monitor.start()
            except Exception as e:  # psutil missing etc.: metrics are a nicety, not a requirement
                log.warning("system metrics disabled: %s", e)
        return {"experiment_id": self.experiment_id, "run_id": run_id}

    # ---- unit runs ------------------------------------------------------------------------

    def open_unit(self, unit_id: str, run_id: str | None, params: dict[str, Any], tags: dict[str, Any]) -> str:
        """Create the unit's child run (or reopen ``run_id``) and return its id."""
        from mlflow.entities import Param, RunTag

        with self._lock:
            if run_id is None:
                run = self.client.create_run(self.experiment_id, run_name=unit_id,
                                             tags={PARENT_TAG: self.parent_run_id, **_str_values(tags)})
                run_id = run.info.run_id
                self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
            else:
                self.client.update_run(run_id, status="RUNNING")
                self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _str_values(tags).items()])
            self._runs[unit_id] = run_id
        return run_id

    def log(self, unit_id: str, metrics: dict[str, Any], timestamp_ms: int | None = None) -> None:
        """Queue a worker's metrics (fire-and-forget); ``step`` in the dict is the MLflow step."""
        from mlflow.entities import Metric

        ts = int(timestamp_ms or time.time() * 1000)
        step = int(metrics.get("step", 0) or 0)
        batch = []
        for key, value in metrics.items():
            if key == "step":
                continue
            try:
                batch.append(Metric(key, float(value), ts, step))
            except (TypeError, ValueError):
                continue  # not a number: MLflow metrics are numbers
        with self._lock:
            self._buffer.setdefault(unit_id, []).extend(batch)
            self._stats["metrics_received"] += len(batch)
            old_step, old_ckpt = self._progress.get(unit_id, (None, None))
            ckpt = metrics.get("checkpoint_step")
            self._progress[unit_id] = (step if "step" in metrics else old_step,
                                       int(ckpt) if ckpt is not None else old_ckpt)

    def started(self, unit_id: str, info: dict[str, Any]) -> None:
        """A worker began an attempt: where (hostname, node, pid, SLURM job)."""
        from mlflow.entities import RunTag

        with self._lock:
            self._started.append({"unit_id": unit_id, **info})
            run_id = self._runs.get(unit_id)
            if run_id is not None:
                tags = {k: v for k, v in info.items() if k in ("hostname", "node_id", "slurm_job_id") and v}
                self._safe(self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish_unit(self, unit_id: str, status: str, metrics: dict[str, float], tags: dict[str, Any]) -> None:
        """Write the unit's pending metrics, its final metrics and tags, and close its run."""
        from mlflow.entities import Metric, RunTag

        with self._lock:
            run_id = self._runs.get(unit_id)
            if run_id is None:
                return
            self._write_unit(unit_id, run_id)
            ts = int(time.time() * 1000)
            final = [Metric(k, float(v), ts, 0) for k, v in metrics.items() if v is not None]
            self._safe(self.client.log_batch, run_id, metrics=final,
                       tags=[RunTag(k, v) for k, v in _str_values(tags).items()])
            self._safe(self.client.set_terminated, run_id, status)
            self._progress.pop(unit_id, None)

    def drain(self) -> dict[str, Any]:
        """What workers reported since the last drain: start notes and progress (for the store)."""
        with self._lock:
            out = {"started": self._started, "progress": self._progress}
            self._started = []
            self._progress = {}
            return out

    def flush(self) -> dict[str, Any]:
        """Write everything buffered now; return the sink's counters."""
        with self._lock:
            for unit_id, run_id in list(self._runs.items()):
                self._write_unit(unit_id, run_id)
            return dict(self._stats)

    def close(self, status: str, metrics: dict[str, float] | None = None) -> dict[str, Any]:
        """Flush, log the campaign's summary metrics, end the parent run; returns the counters."""
        from mlflow.entities import Metric

        self._stop.set()
        self._flusher.join(timeout=30)
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as e:
                log.warning("system metrics monitor: %s", e)
        stats = self.flush()
        with self._lock:
            if self.parent_run_id is not None:
                ts = int(time.time() * 1000)
                self._safe(self.client.log_batch, self.parent_run_id,
                           metrics=[Metric(k, float(v), ts, 0) for k, v in (metrics or {}).items() if v is not None])
                self._safe(self.client.set_terminated, self.parent_run_id, status)
        return stats

    # ---- internals ----------------------------------------------------------------------

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self.flush()

    def _write_unit(self, unit_id: str, run_id: str) -> None:
        pending = self._buffer.pop(unit_id, None)
        while pending:
            chunk, pending = pending[:self.max_batch], pending[self.max_batch:]
            t0 = time.perf_counter()
            if self._safe(self.client.log_batch, run_id, metrics=chunk):
                self._stats["metrics_written"] += len(chunk)
                self._stats["batches"] += 1
            self._stats["write_seconds"] += time.perf_counter() - t0

    def _safe(self, fn, *args, **kwargs) -> bool:
        """Tracking must never stop training: log MLflow errors and go on."""
        try:
            fn(*args, **kwargs)
            return True
        except Exception as e:
            self._stats["write_errors"] += 1
            log.warning("MLflow write failed (%s): %s", getattr(fn, "__name__", fn), e)
            return False


def _str_values(d: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in d.items() if v is not None}


def start_sink(tracking_uri: str, experiment_name: str, artifact_location: str | None, mlflow_cfg: Any):
    """Start the ``MetricsSink`` actor on this (the driver's) node; it needs no CPU slot."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(MetricsSink).options(
        num_cpus=0,
        max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
    )
    return actor.remote(tracking_uri, experiment_name, artifact_location, mlflow_cfg.flush_interval_s,
                        mlflow_cfg.max_batch)
