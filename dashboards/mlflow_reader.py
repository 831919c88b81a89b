"""Metric histories and run links from the campaign's MLflow tracking server, read-only."""

from __future__ import annotations

import fnmatch
from pathlib import Path


class MlflowReader:
    """Metric histories and run links from one tracking server; quiet when it is unavailable."""

    def __init__(self, tracking_uri: str, ui_url: str | None = None):
        from orchestrator.tracking import mlflow_ui

        self.tracking_uri = tracking_uri
        # A run's page in MLflow's UI: the configured template where the UI lives elsewhere, else
        # the UI of the campaign's own tracking server (or of `mlflow ui` on its local store).
        self.ui_url = ui_url or mlflow_ui(tracking_uri) + "/#/experiments/{experiment_id}/runs/{run_id}"
        self._client = None
        self._experiments: dict[str, str] = {}
        self.default_experiment: str | None = None  # the campaign's experiment, from the store
        self.ready = False  # set once the store says the driver's MLflow experiment exists

    def available(self) -> bool:
        """Whether to query MLflow now: only once the driver has opened its tracking store (it
        records the experiment in the campaign store afterwards). Opening a SQLite tracking file
        earlier would race the driver creating its tables, and could create an empty one."""
        if not self.ready:
            return False
        if self.tracking_uri.startswith("sqlite:///"):
            return Path(self.tracking_uri[len("sqlite:///"):]).exists()
        return True

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            from workers.tracking import fail_fast_http

            fail_fast_http()  # a server that is down costs the page one quick error, not minutes of retries
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def link(self, run_id: str | None) -> str | None:
        """The MLflow UI URL of a run (``None`` without a run). Unit runs live in the
        campaign's experiment; other runs (the imitation job) once their curves were read."""
        if not run_id:
            return None
        experiment_id = self._experiments.get(run_id) or self.default_experiment or "0"
        return self.ui_url.format(run_id=run_id, experiment_id=experiment_id, tracking_uri=self.tracking_uri)

    def curves(self, run_id: str, patterns: list[str] | tuple[str, ...]) -> dict[str, tuple[list, list]]:
        """``{metric: (steps, values)}`` for the run's metrics matching any of ``patterns``
        (fnmatch globs, e.g. ``eval/*``), sorted by step."""
        if not self.available():
            return {}
        run = self.client.get_run(run_id)
        self._experiments[run_id] = run.info.experiment_id
        names = [m for m in sorted(run.data.metrics) if any(fnmatch.fnmatchcase(m, p) for p in patterns)]
        out = {}
        for name in names:
            history = sorted(self.client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp))
            out[name] = ([m.step for m in history], [m.value for m in history])
        return out

    def metrics(self, run_id: str) -> dict[str, float]:
        """The run's latest value of each metric (``{}`` while MLflow is not to be queried)."""
        if not self.available():
            return {}
        run = self.client.get_run(run_id)
        self._experiments[run_id] = run.info.experiment_id
        return dict(run.data.metrics)


def evaluation_f1(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{policy: {group: F1}}`` from an evaluation run's metrics, which ``workers.imitation.evaluate``
    names ``eval/<policy>/<group>/<song>/<metric>``; the group means (song ``mean``) only."""
    from workers.imitation.evaluate import MEAN

    out: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        parts = name.split("/")
        if len(parts) == 5 and parts[0] == "eval" and parts[3] == MEAN and parts[4] == "f1":
            out.setdefault(parts[1], {})[parts[2]] = value
    return out
