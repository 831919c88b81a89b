"""MLflow tracking through the head: one experiment per campaign, a parent run for the
campaign, a child run per unit.

Workers never talk to MLflow (hundreds of workers writing one SQLite file would lock it).
They call ``sink.log.remote(unit_id, metrics)`` fire-and-forget on a ``MetricsSink`` actor
pinned to the driver's node; the sink buffers metrics and writes them with
``MlflowClient.log_batch`` every ``mlflow.flush_interval_s`` (at most ``mlflow.max_batch``
per call). The sink is also the only process that creates and closes runs, so all MLflow
writes happen in one place, off the driver's and the workers' paths. The sink also
remembers what workers said about where they run and how far they got, and the run ids it
made; the driver collects that with ``drain()`` and writes it to the store.
"""

from __future__ import annotations

import logging
import queue
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
    """Owns every MLflow write of a campaign. Create with ``start_sink`` (a Ray actor).

    Its methods only queue work and return at once (the driver and the workers never wait
    on MLflow); one writer thread does the MLflow calls in order: open a unit's run, write
    its metrics in batches, close it. A unit's params and tags ride along with its first
    metric batch, so a short unit costs three MLflow calls (create, one batch, terminate).
    """

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_location: str | None,
                 flush_interval_s: float, max_batch: int):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        exp = self.client.get_experiment_by_name(experiment_name)  # also creates a new SQLite store's tables
        if tracking_uri.startswith("sqlite:///"):
            _use_wal(tracking_uri[len("sqlite:///"):])
        if exp is None:
            self.experiment_id = self.client.create_experiment(experiment_name, artifact_location=artifact_location)
        else:
            self.experiment_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(self.experiment_id)
        self.parent_run_id: str | None = None
        self._lock = threading.Lock()  # guards the fields below; never held during an MLflow call
        self._runs: dict[str, str] = {}                      # unit_id -> MLflow run id
        self._new_runs: dict[str, str] = {}                  # created since the last drain
        self._buffer: dict[str, list] = {}                   # unit_id -> [Metric] not yet written
        self._params: dict[str, list] = {}                   # unit_id -> [Param] not yet written
        self._tags: dict[str, dict[str, str]] = {}           # unit_id -> tags not yet written
        self._started: list[dict] = []                       # worker start notes since the last drain
        self._progress: dict[str, tuple[int | None, int | None]] = {}  # unit_id -> (step, checkpoint_step)
        self._stats = {"metrics_received": 0, "metrics_written": 0, "batches": 0, "mlflow_calls": 0,
                       "write_seconds": 0.0, "write_errors": 0}
        self._ops: queue.Queue = queue.Queue()
        self._monitor = None
        self._writer = threading.Thread(target=self._write_loop, name="metrics-sink-writer", daemon=True)
        self._writer.start()

    # ---- the campaign's parent run (synchronous: the driver needs its id) -----------------

    def open_campaign(self, name: str, run_id: str | None, config: dict[str, Any], config_path: str | None,
                      system_metrics: bool) -> dict[str, str]:
        """Create (or reopen, given ``run_id``) the parent run; log the resolved config."""
        from mlflow.entities import Param

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
            except Exception as e:  # psutil missing etc.: system metrics are a nicety
                log.warning("system metrics disabled: %s", e)
        return {"experiment_id": self.experiment_id, "run_id": run_id}

    # ---- called by the driver and the workers: queue and return ---------------------------

    def open_unit(self, unit_id: str, run_id: str | None, params: dict[str, Any], tags: dict[str, Any]) -> None:
        """Open the unit's child run: ``run_id`` (or the one this sink made before) again, else a new one.
        Its id reaches the driver through ``drain()["runs"]``."""
        self._ops.put(("open", unit_id, run_id, params, tags))

    def finish_unit(self, unit_id: str, status: str, metrics: dict[str, float], tags: dict[str, Any]) -> None:
        """Write the unit's pending metrics, its final metrics and tags, and end its run with ``status``."""
        self._ops.put(("finish", unit_id, status, metrics, tags))

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
        # A checkpoint's step: ``checkpoint_step`` after each checkpoint, ``resume/step`` when resuming from one.
        ckpt = metrics.get("checkpoint_step", metrics.get("resume/step"))
        with self._lock:
            self._buffer.setdefault(unit_id, []).extend(batch)
            self._stats["metrics_received"] += len(batch)
            old_step, old_ckpt = self._progress.get(unit_id, (None, None))
            self._progress[unit_id] = (step if "step" in metrics else old_step,
                                       int(ckpt) if ckpt is not None else old_ckpt)

    def log_many(self, unit_id: str, items: list[tuple[dict[str, Any], int]]) -> None:
        """``log`` for a batch of (metrics, timestamp_ms) a worker collected."""
        for metrics, ts in items:
            self.log(unit_id, metrics, ts)

    def started(self, unit_id: str, info: dict[str, Any]) -> None:
        """A worker began an attempt: where (hostname, node, pid, SLURM job)."""
        with self._lock:
            self._started.append({"unit_id": unit_id, **info})
            self._tags.setdefault(unit_id, {}).update(
                {k: str(v) for k, v in info.items() if k in ("hostname", "node_id", "slurm_job_id") and v})

    def drain(self) -> dict[str, Any]:
        """What happened since the last drain: worker start notes, progress, new run ids."""
        with self._lock:
            out = {"started": self._started, "progress": self._progress, "runs": self._new_runs}
            self._started, self._progress, self._new_runs = [], {}, {}
            return out

    def flush(self) -> dict[str, Any]:
        """Wait until everything queued so far is written; return the sink's counters."""
        done = threading.Event()
        self._ops.put(("flush", done))
        done.wait()
        with self._lock:
            return dict(self._stats)

    def run_id(self, unit_id: str) -> str | None:
        with self._lock:
            return self._runs.get(unit_id)

    def close(self, status: str, metrics: dict[str, float] | None = None) -> dict[str, Any]:
        """Write everything queued, log the campaign's summary metrics, end the parent run."""
        from mlflow.entities import Metric

        self._ops.put(("stop",))
        self._writer.join()
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as e:
                log.warning("system metrics monitor: %s", e)
        if self.parent_run_id is not None:
            ts = int(time.time() * 1000)
            self._call(self.client.log_batch, self.parent_run_id,
                       metrics=[Metric(k, float(v), ts, 0) for k, v in (metrics or {}).items() if v is not None])
            self._call(self.client.set_terminated, self.parent_run_id, status)
        return dict(self._stats)

    # ---- the writer thread ----------------------------------------------------------------

    def _write_loop(self) -> None:
        next_flush = time.monotonic() + self.flush_interval_s
        while True:
            try:
                op = self._ops.get(timeout=max(0.0, next_flush - time.monotonic()))
            except queue.Empty:
                op = None
            if op is not None:
                kind = op[0]
                if kind == "open":
                    self._open(*op[1:])
                elif kind == "finish":
                    self._finish(*op[1:])
                elif kind == "flush":
                    self._write_all()
                    op[1].set()
                elif kind == "stop":
                    self._write_all()
                    return
            if time.monotonic() >= next_flush:
                self._write_all()
                next_flush = time.monotonic() + self.flush_interval_s

    def _open(self, unit_id: str, run_id: str | None, params: dict[str, Any], tags: dict[str, Any]) -> None:
        from mlflow.entities import Param

        run_id = run_id or self.run_id(unit_id)
        if run_id is not None:
            self._call(self.client.update_run, run_id, "RUNNING")
        else:
            run = self._call(self.client.create_run, self.experiment_id, run_name=unit_id,
                             tags={PARENT_TAG: self.parent_run_id, **_str_values(tags)})
            if not run:
                return
            run_id = run.info.run_id
            with self._lock:  # params once, with the run's first batch
                self._params[unit_id] = [Param(k, str(v)) for k, v in params.items()]
            tags = {}
        with self._lock:
            self._runs[unit_id] = self._new_runs[unit_id] = run_id
            self._tags.setdefault(unit_id, {}).update(_str_values(tags))

    def _finish(self, unit_id: str, status: str, metrics: dict[str, float], tags: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        run_id = self.run_id(unit_id)
        if run_id is None:
            log.warning("unit %s finished but has no MLflow run", unit_id)
            return
        ts = int(time.time() * 1000)
        final = [Metric(k, float(v), ts, 0) for k, v in metrics.items() if v is not None]
        self._write_unit(unit_id, run_id, final, _str_values(tags))
        self._call(self.client.set_terminated, run_id, status)

    def _write_all(self) -> None:
        with self._lock:
            todo = [(u, r) for u, r in self._runs.items() if self._buffer.get(u) or self._tags.get(u) or self._params.get(u)]
        for unit_id, run_id in todo:
            self._write_unit(unit_id, run_id)

    def _write_unit(self, unit_id: str, run_id: str, extra: list | None = None, tags: dict[str, str] | None = None) -> None:
        """One log_batch per ``max_batch`` metrics; pending params and tags go with the first."""
        from mlflow.entities import RunTag

        with self._lock:
            metrics = self._buffer.pop(unit_id, []) + list(extra or [])
            params = self._params.pop(unit_id, [])
            all_tags = {**self._tags.pop(unit_id, {}), **(tags or {})}
        tag_list = [RunTag(k, v) for k, v in all_tags.items()]
        first = True
        while first or metrics:
            chunk, metrics = metrics[:self.max_batch], metrics[self.max_batch:]
            if chunk or params or tag_list:
                ok = self._call(self.client.log_batch, run_id, metrics=chunk, params=params, tags=tag_list) is not False
                with self._lock:
                    self._stats["batches"] += 1
                    self._stats["metrics_written"] += len(chunk) if ok else 0
            params, tag_list, first = [], [], False

    def _call(self, fn, *args, **kwargs):
        """Tracking must never stop training: count and log MLflow errors and go on (returns False)."""
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            with self._lock:
                self._stats["write_errors"] += 1
            log.warning("MLflow %s failed: %s", getattr(fn, "__name__", fn), e)
            return False
        finally:
            with self._lock:
                self._stats["mlflow_calls"] += 1
                self._stats["write_seconds"] += time.perf_counter() - t0


def _use_wal(path: str) -> None:
    """WAL journal for MLflow's SQLite file: 3-4x faster commits, readers never block the sink."""
    import sqlite3

    try:
        con = sqlite3.connect(path, timeout=30)
        con.execute("PRAGMA journal_mode=WAL")
        con.close()
    except sqlite3.Error as e:
        log.warning("%s: could not switch to WAL: %s", path, e)


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
