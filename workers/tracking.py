"""MLflow tracking that training never waits on: a durable outbox and one sender.

Everything a campaign tells MLflow (runs opened and ended, metrics, params, tags, the config
artifact) goes through an :class:`Outbox`: a SQLite file in the campaign directory
(``mlflow-outbox.db``) holding the records in the order they were written. Writers append and
return at once; a sender thread delivers the records to the tracking server in that order,
coalescing metrics into ``log_batch`` calls of at most ``mlflow.max_batch``, and deletes what
was delivered. When the server cannot be reached the records stay on disk and the sender
retries with a doubling back-off (up to ``mlflow.retry_max_s``); a driver that stops before
they are delivered leaves them for the next driver, ``pianoforge status`` or
``pianoforge mlflow sync``. The outbox is bounded (``mlflow.outbox_max_metrics`` metric
values): past that the oldest metric records are dropped and counted, never run openings or
endings, so every run still ends with its real status.

Runs are named by keys the writer chooses (``campaign``, ``unit:<id>``, ``il:<dir>``, ...);
their MLflow ids exist only once delivered, and the outbox keeps the mapping (``run_id(key)``,
``runs_since``). Opening a key that already has a run reopens that run. Experiments are
looked up or created here and nowhere else.

Several processes may write one outbox (the campaign driver's metrics sink, an imitation job);
one of them at a time delivers (a file lock, ``<outbox>.send.lock``). MLflow's own
asynchronous logging (``log_batch(synchronous=False)``) keeps its queue in memory and gives up
on a long outage, which is why it is not used here.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from filelock import FileLock, Timeout

import configs

log = logging.getLogger(__name__)

OUTBOX_FILE = "mlflow-outbox.db"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAMS, MAX_TAGS = 100, 100  # MLflow's limits per log_batch call
SLOW_CALL_S = 120.0  # a finishing writer waits this long for one MLflow call that has not returned
# Errors that say the request itself is wrong: retrying cannot help, the record is dropped.
_BAD_REQUEST = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ops (         -- records not yet delivered, in order
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    uri     TEXT NOT NULL,
    kind    TEXT NOT NULL,               -- start | log | end | artifact
    key     TEXT NOT NULL,               -- the run's key
    n       INTEGER NOT NULL DEFAULT 0,  -- metric values in a 'log' record
    ts      REAL NOT NULL,
    body    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (        -- run key -> MLflow ids, once delivered
    uri TEXT NOT NULL, key TEXT NOT NULL, run_id TEXT NOT NULL, experiment_id TEXT NOT NULL,
    PRIMARY KEY (uri, key)
);
CREATE TABLE IF NOT EXISTS experiments (uri TEXT NOT NULL, name TEXT NOT NULL, experiment_id TEXT NOT NULL,
                                         PRIMARY KEY (uri, name));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


CAMPAIGN_KEY = "campaign"  # the key of a campaign's parent run


def unit_key(unit_id: str) -> str:
    return f"unit:{unit_id}"


def il_key(out_dir: str | Path) -> str:
    """The key of an imitation job's run: its folder, so a resumed job logs to the same run."""
    return f"il:{Path(out_dir).resolve()}"


def sync_hint(where: str | Path) -> str:
    """How a person delivers the records an outbox in ``where`` (a campaign name or a folder) still holds."""
    return f"`pianoforge mlflow sync {where}` delivers them."


_sync_hint = sync_hint  # Outbox's argument of the same name hides it


def outbox_path(campaign_dir: str | Path) -> Path:
    return Path(campaign_dir) / OUTBOX_FILE


def pending_records(path: str | Path) -> int:
    """How many records an outbox file holds, read-only (0 without the file): for readers such
    as the dashboard that must not write to a campaign."""
    if not Path(path).exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, timeout=10)
        try:
            return int(con.execute("SELECT COUNT(*) FROM ops").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:  # being created right now: nothing to say yet
        return 0


def fail_fast_http() -> None:
    """MLflow's HTTP client retries a refused connection for minutes; the outbox retries on its
    own schedule, so each request fails fast (settings the user made are kept)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


@dataclass(frozen=True)
class Backlog:
    """What is waiting for delivery."""

    records: int
    metrics: int
    oldest: float | None  # when the oldest waiting record was written (epoch seconds)
    dropped: int  # metric values dropped over the bound, ever
    last_error: str | None

    @property
    def empty(self) -> bool:
        return self.records == 0

    def describe(self, uri: str, sync_hint: str) -> str:
        """The one line that says tracking is behind, by how much, and what delivers it."""
        age = f", oldest {_ago(self.oldest)}" if self.oldest else ""
        text = (f"tracking is behind: {self.records} records ({self.metrics} metric values{age}) not yet "
                f"delivered to {uri}")
        if self.dropped:
            text += f"; {self.dropped} metric values dropped over mlflow.outbox_max_metrics"
        if self.last_error:
            text += f"; last error: {self.last_error[:200]}"
        return f"{text}. {sync_hint}"


def _ago(t: float) -> str:
    s = max(0, int(time.time() - t))
    return f"{s // 3600} h {s % 3600 // 60} min ago" if s >= 3600 else (f"{s // 60} min ago" if s >= 60 else f"{s} s ago")


class Outbox:
    """A campaign's durable record of what MLflow should hear, and its delivery.

    ``start_sender()`` runs delivery in a background thread (it takes the send lock when no
    other process holds it); ``deliver()`` is one synchronous pass (``pianoforge mlflow sync``).
    """

    def __init__(self, path: str | Path, tracking_uri: str, mlflow: configs.MlflowConfig | None = None, *,
                 sync_hint: str | None = None):
        """``mlflow``: the ``mlflow.*`` settings (``configs/default.yaml``'s when None); ``sync_hint``:
        how a person delivers what is left (default: ``sync_hint`` of the outbox's folder)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.uri = tracking_uri
        mlflow = mlflow if mlflow is not None else configs.load(profile=None).mlflow
        self.max_batch, self.flush_interval_s = mlflow.max_batch, mlflow.flush_interval_s
        self.max_metrics, self.retry_max_s = mlflow.outbox_max_metrics, mlflow.retry_max_s
        self.sync_hint = sync_hint if sync_hint is not None else _sync_hint(self.path.parent)
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()  # the connection and the buffer; never held during an MLflow call
        self._buffer: dict[str, list] = {}  # key -> [[name, value, ts_ms, step]] not yet in the file
        self._clients: dict[str, Any] = {}
        self._send_lock = FileLock(str(self.path) + ".send.lock", thread_local=False)  # taken and given back by different threads
        self._holding = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._retry_now = threading.Event()  # cut a back-off short (stopping: one more try now)
        self._sender: threading.Thread | None = None
        self._behind_since: float | None = None
        self._in_flight_since: float | None = None  # when the MLflow call under way started
        self._last_warning = 0.0
        self.last_error: str | None = None
        self.delivered_elsewhere = False  # deliver() found another process holding the send lock
        self.stats = {"delivered_records": 0, "delivered_metrics": 0, "mlflow_calls": 0, "send_seconds": 0.0,
                      "errors": 0, "dropped_records": 0}

    # ---- writing (any thread; returns at once) ----------------------------------------------

    def start_run(self, key: str, experiment: str, run_name: str, *, tags: dict[str, Any] | None = None,
                  params: dict[str, Any] | None = None, parent: str | None = None,
                  artifact_location: str | None = None) -> None:
        """Open the run ``key`` (create it in ``experiment``, or reopen the one it already has).
        ``params`` are logged when it is created; ``tags`` each time; ``parent``: the key of the
        parent run."""
        self._append("start", key, {"experiment": experiment, "run_name": run_name, "tags": _strs(tags),
                                    "params": _strs(params), "parent": parent, "artifact_location": artifact_location})

    def log(self, key: str, metrics: dict[str, Any], step: int = 0, timestamp_ms: int | None = None) -> None:
        """Queue numeric ``metrics`` at ``step`` (other values are skipped: MLflow metrics are numbers)."""
        ts = int(timestamp_ms or time.time() * 1000)
        rows = []
        for name, value in metrics.items():
            try:
                rows.append([name, float(value), ts, int(step)])
            except (TypeError, ValueError):
                continue
        if rows:
            with self._lock:
                self._buffer.setdefault(key, []).extend(rows)

    def set_tags(self, key: str, tags: dict[str, Any], params: dict[str, Any] | None = None) -> None:
        """Tags (and params) for the run ``key``, after its pending metrics."""
        self._flush_key(key)
        self._append("log", key, {"metrics": [], "tags": _strs(tags), "params": _strs(params)})

    def log_text(self, key: str, name: str, text: str) -> None:
        """A small text artifact (e.g. the resolved config), kept in the outbox until delivered."""
        self._flush_key(key)
        self._append("artifact", key, {"name": name, "text": text})

    def log_file(self, key: str, path: str | Path) -> None:
        """A file (e.g. a unit's clip) as an artifact of the run ``key``; it must stay at ``path``
        until delivered (a file gone by then is skipped with a warning)."""
        self._flush_key(key)
        self._append("artifact", key, {"name": Path(path).name, "path": str(Path(path).absolute())})

    def end_run(self, key: str, status: str, metrics: dict[str, Any] | None = None,
                tags: dict[str, Any] | None = None) -> None:
        """Final ``metrics`` and ``tags``, then end the run with ``status`` (FINISHED, FAILED, KILLED)."""
        if metrics:
            self.log(key, {k: v for k, v in metrics.items() if v is not None})
        self._flush_key(key)
        if tags:
            self._append("log", key, {"metrics": [], "tags": _strs(tags), "params": {}})
        self._append("end", key, {"status": status})

    def flush(self) -> None:
        """Move buffered metrics into the file (durable from here on)."""
        with self._lock:
            buffer, self._buffer = self._buffer, {}
            self._write([r for key, rows in buffer.items() for r in self._metric_records(key, rows)])
        self._wake.set()

    def _flush_key(self, key: str) -> None:
        with self._lock:
            self._write(self._metric_records(key, self._buffer.pop(key, [])))

    def _metric_records(self, key: str, rows: list) -> list[tuple[str, str, dict, int]]:
        """'log' records of at most ``max_batch`` metric values each (one MLflow call's worth)."""
        return [("log", key, {"metrics": rows[i:i + self.max_batch], "tags": {}, "params": {}},
                 len(rows[i:i + self.max_batch])) for i in range(0, len(rows), self.max_batch)]

    def _append(self, kind: str, key: str, body: dict) -> None:
        with self._lock:
            self._write([(kind, key, body, 0)])
        self._wake.set()

    def _write(self, records: list[tuple[str, str, dict, int]]) -> None:
        """Append records in one transaction (caller holds ``_lock``); keep the bound."""
        if not records:
            return
        now = time.time()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("INSERT INTO ops (uri, kind, key, n, ts, body) VALUES (?, ?, ?, ?, ?, ?)",
                                 [(self.uri, kind, key, n, now, json.dumps(body)) for kind, key, body, n in records])
            if any(n for *_, n in records):
                self._enforce_bound()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _enforce_bound(self) -> None:
        total = self._db.execute("SELECT COALESCE(SUM(n), 0) FROM ops").fetchone()[0]
        if total <= self.max_metrics:
            return
        dropped = 0
        for seq, n in self._db.execute("SELECT seq, n FROM ops WHERE kind = 'log' AND n > 0 ORDER BY seq").fetchall():
            if total <= self.max_metrics:
                break
            self._db.execute("DELETE FROM ops WHERE seq = ?", (seq,))
            total -= n
            dropped += n
        self._db.execute("INSERT INTO meta (key, value) VALUES ('dropped', ?) ON CONFLICT(key) DO UPDATE SET "
                         "value = CAST(value AS INTEGER) + excluded.value", (dropped,))

    # ---- reading ----------------------------------------------------------------------------

    def run_id(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT run_id FROM runs WHERE uri = ? AND key = ?", (self.uri, key)).fetchone()
        return row[0] if row else None

    def runs_since(self, rowid: int = 0) -> tuple[int, dict[str, tuple[str, str]]]:
        """Runs delivered (or adopted) after ``rowid``: ``(last rowid, {key: (run_id, experiment_id)})``."""
        with self._lock:
            rows = self._db.execute("SELECT rowid, key, run_id, experiment_id FROM runs WHERE uri = ? AND rowid > ?"
                                    " ORDER BY rowid", (self.uri, rowid)).fetchall()
        return (rows[-1][0] if rows else rowid), {k: (r, e) for _, k, r, e in rows}

    def adopt(self, key: str, run_id: str, experiment_id: str) -> None:
        """Record a run made before this outbox existed (a campaign started by an older version),
        so that opening ``key`` reopens it rather than making a second run."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO runs (uri, key, run_id, experiment_id) VALUES (?, ?, ?, ?)",
                             (self.uri, key, run_id, experiment_id))

    def backlog(self) -> Backlog:
        with self._lock:
            records, metrics, oldest = self._db.execute("SELECT COUNT(*), COALESCE(SUM(n), 0), MIN(ts) FROM ops").fetchone()
            buffered = sum(len(v) for v in self._buffer.values())
            dropped = self._db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
            error = self._db.execute("SELECT value FROM meta WHERE key = 'last_error'").fetchone()
        return Backlog(records=records + (1 if buffered else 0), metrics=metrics + buffered, oldest=oldest,
                       dropped=int(dropped[0]) if dropped else 0, last_error=error[0] if error and records else None)

    def uris(self) -> str:
        """The tracking servers the waiting records are for (comma-separated)."""
        with self._lock:
            return ", ".join(u for (u,) in self._db.execute("SELECT DISTINCT uri FROM ops"))

    def behind(self) -> str | None:
        """The warning line while the sender cannot deliver (None while it keeps up)."""
        if self._behind_since is None:
            return None
        return self.backlog().describe(self.uri, self.sync_hint)

    def next_counter(self, name: str) -> int:
        """A persistent counter (e.g. the step of the next system-metrics sample)."""
        with self._lock:
            self._db.execute("INSERT INTO meta (key, value) VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET "
                             "value = CAST(value AS INTEGER) + 1", (f"counter:{name}",))
            return int(self._db.execute("SELECT value FROM meta WHERE key = ?", (f"counter:{name}",)).fetchone()[0]) - 1

    # ---- delivery ---------------------------------------------------------------------------

    def start_sender(self) -> None:
        """Deliver in a background thread until ``stop``; the thread takes the send lock at once
        unless another process holds it."""
        if self._sender is None:
            fail_fast_http()
            # Import MLflow here, not first in the sender thread: a thread importing mlflow while
            # another thread does can see a partially initialised module and fail its delivery.
            import mlflow.entities  # noqa: F401
            import mlflow.tracking  # noqa: F401

            self._take_send_lock()
            self._sender = threading.Thread(target=self._send_loop, name="mlflow-outbox-sender", daemon=True)
            self._sender.start()

    def deliver(self, timeout_s: float | None = None) -> bool:
        """Deliver what is waiting, in order, for up to ``timeout_s`` seconds (None: until done or
        the server fails). True when nothing is left; False when the server failed, time ran
        out, or another process holds the send lock (it delivers)."""
        fail_fast_http()
        self.flush()
        self.delivered_elsewhere = not self._take_send_lock()
        if self.delivered_elsewhere:
            return False
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                status = self._deliver_some()
                if status == "empty":
                    return True
                if status == "failed" or (deadline is not None and time.monotonic() >= deadline):
                    return False
        finally:
            if self._sender is None:
                self._release_send_lock()

    def stop(self, wait_s: float = 0.0) -> Backlog:
        """Flush, let the sender deliver until nothing is left or ``wait_s`` seconds pass without
        progress, stop it and give up the send lock; returns what is left. Reading and writing
        still work."""
        self.flush()
        if self._sender is not None:
            self._retry_now.set()
            # Wait while delivery makes progress; give up after ``wait_s`` seconds without any (the
            # server is unreachable); not at all when another process delivers (holds the send lock).
            last_progress, delivered = time.monotonic(), self.stats["delivered_records"]
            while self._holding and time.monotonic() - last_progress < wait_s and not self.backlog().empty:
                busy = self._in_flight_since is not None and time.monotonic() - self._in_flight_since < SLOW_CALL_S
                if self.stats["delivered_records"] != delivered or busy:  # a slow call (a new SQLite store) is not a stall
                    last_progress, delivered = time.monotonic(), self.stats["delivered_records"]
                self._wake.set()
                time.sleep(0.05)
            self._stop.set()
            self._wake.set()
            self._retry_now.set()
            self._sender.join(timeout=wait_s + 35.0)  # a request in flight ends by MLFLOW_HTTP_REQUEST_TIMEOUT
            if self._sender.is_alive():
                log.warning("MLflow outbox sender still busy with a request; leaving it")
                return self.backlog()
            self._sender = None
        self._release_send_lock()
        return self.backlog()

    def close(self, wait_s: float = 0.0) -> Backlog:
        """``stop`` and close the file; returns what is left."""
        left = self.stop(wait_s)
        if self._sender is None:
            with self._lock:
                self._db.close()
        return left

    def _take_send_lock(self) -> bool:
        if not self._holding:
            try:
                self._send_lock.acquire(timeout=0)
                self._holding = True
            except Timeout:
                return False
        return True

    def _release_send_lock(self) -> None:
        if self._holding:
            self._send_lock.release()
            self._holding = False

    def _send_loop(self) -> None:
        backoff = 0.0
        next_flush = time.monotonic()
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_flush:
                    next_flush = time.monotonic() + self.flush_interval_s
                    self.flush()
                if not self._take_send_lock():  # another process delivers; keep writing, try again later
                    self._wake.wait(min(5.0, self.flush_interval_s))
                    self._wake.clear()
                    continue
                status = self._deliver_some()
            except Exception as e:  # noqa: BLE001 - the sender never dies (a full disk, ...); records stay on disk
                log.warning("MLflow outbox sender: %s: %s", type(e).__name__, e)
                status = "failed"
            if status == "failed":
                backoff = min(self.retry_max_s, max(1.0, backoff * 2))
                self._warn_behind()
                self._retry_now.wait(backoff)
                self._retry_now.clear()
            elif status == "empty":
                if self._behind_since is not None:
                    log.warning("tracking caught up: every record delivered to %s", self.uri)
                    self._behind_since = None
                backoff = 0.0
                self._wake.wait(max(0.0, next_flush - time.monotonic()))
                self._wake.clear()
            else:
                backoff = 0.0

    def _warn_behind(self) -> None:
        now = time.monotonic()
        if self._behind_since is None:
            self._behind_since = now
        if now - self._last_warning >= 60.0:
            self._last_warning = now
            log.warning(self.backlog().describe(self.uri, self.sync_hint))

    def _deliver_some(self, limit: int = 2000) -> str:
        """Deliver up to ``limit`` records: 'empty' (nothing left), 'more' or 'failed'."""
        with self._lock:
            rows = self._db.execute("SELECT seq, uri, kind, key, body FROM ops ORDER BY seq LIMIT ?", (limit,)).fetchall()
        if not rows:
            with self._lock:  # caught up: an old error no longer describes the backlog
                self._db.execute("DELETE FROM meta WHERE key = 'last_error'")
            return "empty"
        failed: set[str] = set()  # servers that failed in this pass: their later records wait (order per server)
        for group in _groups(rows, self.max_batch):
            if group[0][1] in failed:
                continue
            outcome = self._try(group)
            if outcome == "rejected" and len(group) > 1:  # find the bad record; deliver the others
                outcome = next((o for o in (self._try([row]) for row in group) if o == "failed"), "ok")
            if outcome == "failed":
                failed.add(group[0][1])
        return "failed" if failed else "more"  # the next pass finds what is left, or nothing

    def _try(self, group: list[tuple]) -> str:
        """Send one group of records: 'ok' (delivered, removed), 'rejected' (the server refused it;
        a lone record is dropped) or 'failed' (unreachable: it stays)."""
        seqs = [r[0] for r in group]
        uri, kind, key = group[0][1], group[0][2], group[0][3]
        t0 = time.perf_counter()
        self._in_flight_since = time.monotonic()
        try:
            self._send(uri, kind, key, [json.loads(r[4]) for r in group])
        except Exception as e:  # noqa: BLE001 - MlflowException, connection errors, a locked SQLite store
            self.stats["errors"] += 1
            if _transient(e) or not self._server_ok(uri):
                self._note_error(f"{type(e).__name__}: {_first_line(e)}")
                return "failed"
            if len(group) == 1:
                log.warning("MLflow rejected %s for run %s, dropped: %s", kind, key, _first_line(e))
                self.stats["dropped_records"] += 1
                self._delete(seqs)
            return "rejected"
        finally:
            self._in_flight_since = None
            self.stats["mlflow_calls"] += 1
            self.stats["send_seconds"] += time.perf_counter() - t0
        self.stats["delivered_records"] += len(seqs)
        self._delete(seqs)
        return "ok"

    def _delete(self, seqs: list[int]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM ops WHERE seq = ?", [(s,) for s in seqs])

    def _note_error(self, text: str) -> None:
        self.last_error = text
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_error', ?)", (text,))

    def _client(self, uri: str):
        if uri not in self._clients:
            from mlflow.tracking import MlflowClient

            self._clients[uri] = MlflowClient(uri)
        return self._clients[uri]

    def _server_ok(self, uri: str) -> bool:
        try:
            self._client(uri).search_experiments(max_results=1)
            return True
        except Exception:  # noqa: BLE001 - any failure means: not reachable now
            return False

    def _send(self, uri: str, kind: str, key: str, bodies: list[dict]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = self._client(uri)
        if kind == "start":
            self._open(client, uri, key, bodies[0])
            return
        run_id = self._run(uri, key)
        if run_id is None:
            log.warning("MLflow record for run %s dropped: the run was never created", key)
            return
        if kind == "end":
            client.set_terminated(run_id, bodies[-1]["status"])
        elif kind == "artifact" and "path" in bodies[0]:
            if Path(bodies[0]["path"]).is_file():
                client.log_artifact(run_id, bodies[0]["path"])
            else:
                log.warning("MLflow artifact %s of run %s skipped: the file is gone", bodies[0]["path"], key)
        elif kind == "artifact":
            body = bodies[0]
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / body["name"]).write_text(body["text"])
                client.log_artifact(run_id, str(Path(folder) / body["name"]))
        else:
            metrics = [Metric(n, v, ts, step) for b in bodies for n, v, ts, step in b["metrics"]]
            params = [Param(k, v[:6000]) for b in bodies for k, v in b["params"].items()]
            tags = {k: v for b in bodies for k, v in b["tags"].items()}
            client.log_batch(run_id, metrics=metrics, params=params, tags=[RunTag(k, v) for k, v in tags.items()])
            self.stats["delivered_metrics"] += len(metrics)

    def _run(self, uri: str, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT run_id FROM runs WHERE uri = ? AND key = ?", (uri, key)).fetchone()
        return row[0] if row else None

    def _open(self, client, uri: str, key: str, body: dict) -> None:
        from mlflow.entities import Param, RunTag

        run_id = self._run(uri, key)
        if run_id is not None:  # reopened: a retried unit, a resumed campaign or imitation job
            client.update_run(run_id, status="RUNNING")
            if body["tags"]:
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in body["tags"].items()])
            return
        experiment_id = self._experiment(client, uri, body["experiment"], body.get("artifact_location"))
        tags = dict(body["tags"])
        parent = self._run(uri, body["parent"]) if body.get("parent") else None
        if parent:
            tags[PARENT_TAG] = parent
        run = client.create_run(experiment_id, run_name=body["run_name"], tags=tags)
        with self._lock:  # recorded before anything else can fail: a retry reopens rather than duplicates
            self._db.execute("INSERT OR REPLACE INTO runs (uri, key, run_id, experiment_id) VALUES (?, ?, ?, ?)",
                             (uri, key, run.info.run_id, experiment_id))
        params = [Param(k, v[:6000]) for k, v in body["params"].items()]
        for i in range(0, len(params), MAX_PARAMS):
            client.log_batch(run.info.run_id, params=params[i:i + MAX_PARAMS])

    def _experiment(self, client, uri: str, name: str, artifact_location: str | None) -> str:
        with self._lock:
            row = self._db.execute("SELECT experiment_id FROM experiments WHERE uri = ? AND name = ?",
                                   (uri, name)).fetchone()
        if row:
            return row[0]
        experiment_id = ensure_experiment(client, name, artifact_location)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO experiments (uri, name, experiment_id) VALUES (?, ?, ?)",
                             (uri, name, experiment_id))
        return experiment_id


def _groups(rows: list[tuple], max_batch: int) -> Iterable[list[tuple]]:
    """Consecutive 'log' records of one run, merged up to MLflow's limits per call; others alone."""
    group: list[tuple] = []
    counts = [0, 0, 0]  # metrics, params, tags in the group
    for row in rows:
        _, uri, kind, key, body = row
        if kind != "log":
            if group:
                yield group
            group, counts = [], [0, 0, 0]
            yield [row]
            continue
        b = json.loads(body)
        sizes = [len(b["metrics"]), len(b["params"]), len(b["tags"])]
        fits = (group and group[0][1] == uri and group[0][3] == key and counts[0] + sizes[0] <= max_batch
                and counts[1] + sizes[1] <= MAX_PARAMS and counts[2] + sizes[2] <= MAX_TAGS)
        if group and not fits:
            yield group
            group, counts = [], [0, 0, 0]
        group.append(row)
        counts = [c + s for c, s in zip(counts, sizes)]
    if group:
        yield group


def _transient(e: Exception) -> bool:
    """Worth retrying: anything but MLflow saying the request itself is wrong."""
    code = getattr(e, "error_code", None)
    return code not in _BAD_REQUEST


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _strs(d: dict[str, Any] | None) -> dict[str, str]:
    return {k: str(v) for k, v in (d or {}).items() if v is not None}


def use_wal(path: str) -> None:
    """WAL journal for MLflow's SQLite file: 3-4x faster commits, readers never block the sender."""
    try:
        con = sqlite3.connect(path, timeout=30)
        con.execute("PRAGMA journal_mode=WAL")
        con.close()
    except sqlite3.Error as e:
        log.warning("%s: could not switch to WAL: %s", path, e)


def ensure_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name`` on ``client``'s server: found by name (restored if it was
    deleted) or created. The only place the project gets or creates an experiment."""
    found = client.get_experiment_by_name(name)  # also creates a new SQLite store's tables
    uri = client.tracking_uri
    if isinstance(uri, str) and uri.startswith("sqlite:///"):
        use_wal(uri[len("sqlite:///"):])
    if found is None:
        return client.create_experiment(name, artifact_location=artifact_location)
    if found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    return found.experiment_id
