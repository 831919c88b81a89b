"""The campaign store: one SQLite file (WAL mode) holding every unit's state and history.

The driver is the store's only writer; ``pianoforge status`` and dashboards open it read-only
while the driver runs (WAL lets readers see committed data without blocking the writer).
Times are Unix seconds (UTC, float). The schema is ``SCHEMA`` below; ``schema_version`` is
kept in the ``meta`` table. Opening an older store for writing migrates it (``MIGRATIONS``: new
columns, NULL for units finished before); read-only readers of a store not yet migrated see
NULL in the columns it lacks.

Unit states::

    pending -> running -> succeeded   (finished, F1 >= gate.f1_threshold)
                       -> gated       (finished, F1 below the gate: its shard is not used for IL)
                       -> pending     (an attempt failed, attempts left: retried from its checkpoint;
                                       or its node was lost: retried, the attempt not counted)
                       -> failed      (max_attempts used up; ``error`` keeps the last traceback)
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

from workers.units import UnitResult, UnitSpec

SCHEMA_VERSION = 5

PENDING, RUNNING, SUCCEEDED, FAILED, GATED = "pending", "running", "succeeded", "failed", "gated"
STATES = (PENDING, RUNNING, SUCCEEDED, FAILED, GATED)
FINISHED = (SUCCEEDED, GATED)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (          -- campaign-level facts: name, MLflow ids, schema_version
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS configs (       -- every resolved config units were submitted with
    config_key  TEXT PRIMARY KEY,          -- Config.hash() of the whole config
    config_json TEXT NOT NULL,             -- Config.to_dict() as JSON
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS units (
    unit_id         TEXT PRIMARY KEY,      -- song hash prefix, chunk, config hash (workers.units.unit_id_for)
    song_hash       TEXT NOT NULL,
    song_name       TEXT NOT NULL,
    song_path       TEXT NOT NULL,
    chunk_index     INTEGER NOT NULL,
    config_hash     TEXT NOT NULL,         -- the unit's identity hash (from the manifest)
    split           TEXT NOT NULL,         -- train | eval | held-out
    spec_json       TEXT NOT NULL,         -- UnitSpec as JSON (what the worker receives)
    config_key      TEXT NOT NULL REFERENCES configs(config_key),
    state           TEXT NOT NULL CHECK (state IN {STATES}),
    attempts        INTEGER NOT NULL DEFAULT 0,   -- attempts started (reset by `resume` for failed units)
    step            INTEGER,               -- last training step a worker reported
    checkpoint_step INTEGER,               -- step of the last checkpoint a worker reported (final step once finished)
    f1              REAL,
    precision       REAL,
    recall          REAL,
    episode_return  REAL,
    steps           INTEGER,               -- training steps of the finished unit
    env_steps_per_s REAL,                  -- while running: reported steps per second, as the driver sees them
    updates_per_s   REAL,
    shard_path      TEXT,                  -- the unit's lake shard
    created_at      REAL NOT NULL,
    started_at      REAL,                  -- start of the latest attempt
    finished_at     REAL,                  -- end of the latest attempt (success or failure)
    seconds         REAL,                  -- wall time of the latest attempt, as the worker measured it
    report_seconds  REAL,                  -- time the worker spent in its metrics callback (same attempt)
    hostname        TEXT,
    node_id         TEXT,                  -- Ray node id
    pid             INTEGER,               -- worker process id
    slurm_job_id    TEXT,
    error           TEXT,                  -- last failure: exception type, message, traceback tail
    mlflow_run_id   TEXT,                  -- the unit's child run
    updated_at      REAL NOT NULL,
    stop_reason     TEXT,                  -- why training ended: target | plateau | budget | cap (workers.rl.budget)
    stop_step       INTEGER,               -- the step it ended at
    budget_steps    INTEGER,               -- its nominal budget (specialist.total_steps)
    eval_seconds    REAL,                  -- time in evaluations during training (latest attempt)
    pack_id         TEXT,                  -- the pack of the latest attempt (campaign.pack_size > 1), else NULL
    steps_lost      INTEGER,               -- training steps past the last checkpoint lost with lost nodes (all attempts)
    attempt_token   INTEGER                -- fencing token of the latest attempt (workers.fencing); only it may commit
);
CREATE INDEX IF NOT EXISTS units_by_state ON units(state);
CREATE TABLE IF NOT EXISTS events (        -- state transitions (units by state over time) and driver events
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    ts         REAL NOT NULL,
    unit_id    TEXT,                       -- NULL for campaign events (kind != 'state')
    kind       TEXT NOT NULL,              -- state | submit | resume | driver_start | driver_stop | pool_jobs_cancelled | ...
    from_state TEXT,                       -- NULL when a unit is first added
    to_state   TEXT,
    attempt    INTEGER,
    detail     TEXT                        -- error summary, counts, ... (free text)
);
CREATE INDEX IF NOT EXISTS events_by_ts ON events(ts);
"""

# Schema version -> the statements that bring a store of the version before it up to it.
MIGRATIONS = {
    2: ["ALTER TABLE units ADD COLUMN stop_reason TEXT", "ALTER TABLE units ADD COLUMN stop_step INTEGER",
        "ALTER TABLE units ADD COLUMN budget_steps INTEGER", "ALTER TABLE units ADD COLUMN eval_seconds REAL"],
    3: ["ALTER TABLE units ADD COLUMN pack_id TEXT"],
    4: ["ALTER TABLE units ADD COLUMN steps_lost INTEGER"],
    5: ["ALTER TABLE units ADD COLUMN attempt_token INTEGER"],
}


@dataclass(frozen=True)
class UnitRow:
    """One row of the ``units`` table."""

    unit_id: str
    song_hash: str
    song_name: str
    song_path: str
    chunk_index: int
    config_hash: str
    split: str
    spec_json: str
    config_key: str
    state: str
    attempts: int
    step: int | None
    checkpoint_step: int | None
    f1: float | None
    precision: float | None
    recall: float | None
    episode_return: float | None
    steps: int | None
    env_steps_per_s: float | None
    updates_per_s: float | None
    shard_path: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    seconds: float | None
    report_seconds: float | None
    hostname: str | None
    node_id: str | None
    pid: int | None
    slurm_job_id: str | None
    error: str | None
    mlflow_run_id: str | None
    updated_at: float
    stop_reason: str | None = None
    stop_step: int | None = None
    budget_steps: int | None = None
    eval_seconds: float | None = None
    pack_id: str | None = None
    steps_lost: int | None = None
    attempt_token: int | None = None

    @property
    def spec(self) -> UnitSpec:
        return UnitSpec.model_validate_json(self.spec_json)


_UNIT_FIELDS = [f.name for f in fields(UnitRow)]


@dataclass(frozen=True)
class BudgetSummary:
    """F1-driven budgets over a campaign's finished units (``CampaignStore.budgets``)."""

    reasons: dict[str, int]  # stop reason -> finished units
    units: int               # finished units that recorded a budget
    budget_steps: int        # the sum of their nominal budgets
    steps: int               # the steps they trained
    eval_share: float | None = None  # their time in evaluations during training / their worker time

    @property
    def saved_steps(self) -> int:
        """Budgeted steps not trained (negative when extensions used more than stops saved)."""
        return self.budget_steps - self.steps

    @property
    def saved_fraction(self) -> float | None:
        return self.saved_steps / self.budget_steps if self.budget_steps else None


@dataclass(frozen=True)
class Event:
    id: int
    ts: float
    unit_id: str | None
    kind: str
    from_state: str | None
    to_state: str | None
    attempt: int | None
    detail: str | None


class StoreError(RuntimeError):
    """The store is missing, from a newer pianoforge, or a transition is impossible."""


class CampaignStore:
    """Read and change a campaign's state. Open with ``readonly=True`` from anything but the driver."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            if not self.path.exists():
                raise StoreError(f"{self.path}: no campaign store here")
            # mode=ro: never writes, never creates; WAL readers still see committed data.
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            version = self._version()
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: schema version {version} is newer than this pianoforge ({SCHEMA_VERSION})")
            if version is not None and version < SCHEMA_VERSION:
                self._migrate(version)
            self.db.executescript(SCHEMA)
            if version is None:
                self.set_meta("schema_version", SCHEMA_VERSION)
        present = self._present = {r[1] for r in self.db.execute("PRAGMA table_info(units)")}
        # A read-only reader of a store the driver has not migrated yet sees NULL for the new columns.
        self._unit_columns = ", ".join(c if c in present or not present else f"NULL AS {c}" for c in _UNIT_FIELDS)
        self.db.row_factory = sqlite3.Row

    @property
    def unit_columns(self) -> str:
        """The ``units`` columns to select (``NULL AS c`` for those an unmigrated store lacks)."""
        return self._unit_columns

    def _version(self) -> int | None:
        """The stored schema version (None: a new store)."""
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
            return None
        version = self.get_meta("schema_version")
        return None if version is None else int(version)

    def _migrate(self, version: int) -> None:
        """Bring a store of ``version`` up to ``SCHEMA_VERSION`` in one transaction."""
        with self.db:
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[v]:
                    self.db.execute(statement)
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                            (json.dumps(SCHEMA_VERSION),))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> CampaignStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- meta and configs -------------------------------------------------------------

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def put_config(self, config_dict: dict[str, Any], config_key: str) -> str:
        """Remember a resolved config (``Config.to_dict()``) under its key; idempotent."""
        with self.db:
            self.db.execute(
                "INSERT OR IGNORE INTO configs (config_key, config_json, created_at) VALUES (?, ?, ?)",
                (config_key, json.dumps(config_dict, sort_keys=True), time.time()),
            )
        return config_key

    def get_config(self, config_key: str) -> dict[str, Any]:
        row = self.db.execute("SELECT config_json FROM configs WHERE config_key = ?", (config_key,)).fetchone()
        if row is None:
            raise StoreError(f"{self.path}: no config with key {config_key}")
        return json.loads(row[0])

    # ---- units ------------------------------------------------------------------------

    def add_units(self, units: Iterable[UnitSpec], config_key: str) -> int:
        """Add units as pending; units already in the store (same unit_id) are left as they are.

        Returns how many units were new.
        """
        now = time.time()
        added = 0
        with self.db:
            for u in units:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO units (unit_id, song_hash, song_name, song_path, chunk_index, config_hash,"
                    " split, spec_json, config_key, state, attempts, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
                    (u.unit_id, u.song_hash, u.song_name, u.song_path, u.chunk_index, u.config_hash, u.split,
                     u.model_dump_json(), config_key, PENDING, now, now),
                )
                if cur.rowcount:
                    added += 1
                    self._event(now, u.unit_id, "state", None, PENDING, 0, None)
        return added

    def unit(self, unit_id: str) -> UnitRow:
        row = self.db.execute(f"SELECT {self._unit_columns} FROM units WHERE unit_id = ?", (unit_id,)).fetchone()
        if row is None:
            raise StoreError(f"{self.path}: no unit {unit_id}")
        return UnitRow(**dict(row))

    def units(self, states: Iterable[str] | None = None) -> Iterator[UnitRow]:
        """Units (optionally only those in ``states``), oldest first."""
        sql, args = f"SELECT {self._unit_columns} FROM units", ()
        if states is not None:
            states = tuple(states)
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args = states
        for row in self.db.execute(sql + " ORDER BY created_at, unit_id", args):
            yield UnitRow(**dict(row))

    def unit_ids(self, state: str) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT unit_id FROM units WHERE state = ? ORDER BY created_at, unit_id", (state,))]

    def counts(self) -> dict[str, int]:
        """Number of units in each state (every state present, zero when none)."""
        out = dict.fromkeys(STATES, 0)
        for state, n in self.db.execute("SELECT state, COUNT(*) FROM units GROUP BY state"):
            out[state] = n
        return out

    def budgets(self) -> BudgetSummary:
        """Finished units' stop reasons and their training steps against their nominal budgets."""
        marks = ",".join("?" * len(FINISHED))
        if "stop_reason" not in self._present:  # a store not migrated yet, opened read-only
            return BudgetSummary({}, 0, 0, 0, None)
        reasons = {r: n for r, n in self.db.execute(
            f"SELECT stop_reason, COUNT(*) FROM units WHERE state IN ({marks}) AND stop_reason IS NOT NULL"
            " GROUP BY stop_reason", FINISHED)}
        n, budget, used, evals, seconds = self.db.execute(
            f"SELECT COUNT(*), COALESCE(SUM(budget_steps), 0), COALESCE(SUM(steps), 0), SUM(eval_seconds),"
            f" SUM(seconds) FROM units WHERE state IN ({marks}) AND budget_steps IS NOT NULL AND steps IS NOT NULL",
            FINISHED).fetchone()
        return BudgetSummary(reasons, n, budget, used, evals / seconds if evals is not None and seconds else None)

    def events(self, since_id: int = 0, unit_id: str | None = None) -> list[Event]:
        sql, args = "SELECT id, ts, unit_id, kind, from_state, to_state, attempt, detail FROM events WHERE id > ?", [since_id]
        if unit_id is not None:
            sql += " AND unit_id = ?"
            args.append(unit_id)
        return [Event(*r) for r in self.db.execute(sql + " ORDER BY id", args)]

    # ---- transitions (driver only) ----------------------------------------------------

    def mark_running(self, unit_id: str, pack_id: str | None = None, token: int | None = None) -> int:
        """pending -> running; counts a new attempt and returns its number (1-based). ``pack_id``
        names the pack the attempt runs in (None: a unit alone), ``token`` its fencing token
        (``workers.fencing.issue``)."""
        now = time.time()
        with self.db:
            row = self._expect(unit_id, PENDING)
            attempt = row["attempts"] + 1
            self.db.execute(
                "UPDATE units SET state = ?, attempts = ?, started_at = ?, finished_at = NULL, seconds = NULL,"
                " hostname = NULL, node_id = NULL, pid = NULL, slurm_job_id = NULL, pack_id = ?, env_steps_per_s = NULL,"
                " attempt_token = ?, updated_at = ? WHERE unit_id = ?",
                (RUNNING, attempt, now, pack_id, token, now, unit_id),
            )
            self._event(now, unit_id, "state", PENDING, RUNNING, attempt, pack_id and f"pack {pack_id}")
        return attempt

    def note_worker(self, unit_id: str, hostname: str | None, node_id: str | None, pid: int | None,
                    slurm_job_id: str | None) -> None:
        """Where the running attempt landed (reported by the worker when it starts)."""
        with self.db:
            self.db.execute(
                "UPDATE units SET hostname = ?, node_id = ?, pid = ?, slurm_job_id = ?, updated_at = ? WHERE unit_id = ?",
                (hostname, node_id, pid, slurm_job_id, time.time(), unit_id),
            )

    def note_progress(self, unit_id: str, step: int | None, checkpoint_step: int | None,
                      steps_per_s: float | None = None) -> None:
        """Latest reported step, checkpoint step and step rate (none of them moves back to NULL)."""
        with self.db:
            self.db.execute(
                "UPDATE units SET step = COALESCE(?, step), checkpoint_step = COALESCE(?, checkpoint_step),"
                " env_steps_per_s = COALESCE(?, env_steps_per_s), updated_at = ? WHERE unit_id = ?",
                (step, checkpoint_step, steps_per_s, time.time(), unit_id),
            )

    def set_mlflow_run(self, unit_id: str, run_id: str) -> None:
        with self.db:
            self.db.execute("UPDATE units SET mlflow_run_id = ?, updated_at = ? WHERE unit_id = ?",
                            (run_id, time.time(), unit_id))

    def mark_finished(self, unit_id: str, result: UnitResult, state: str, report_seconds: float | None = None) -> None:
        """running -> succeeded | gated with the unit's result."""
        if state not in FINISHED:
            raise StoreError(f"mark_finished: state must be one of {FINISHED}, not {state}")
        now = time.time()
        with self.db:
            row = self._expect(unit_id, RUNNING)
            self.db.execute(
                "UPDATE units SET state = ?, f1 = ?, precision = ?, recall = ?, episode_return = ?, steps = ?,"
                " step = COALESCE(step, ?), checkpoint_step = ?, env_steps_per_s = ?, updates_per_s = ?,"
                " shard_path = ?, finished_at = ?,"
                " seconds = ?, report_seconds = ?, error = NULL, updated_at = ?,"
                " stop_reason = ?, stop_step = ?, budget_steps = ?, eval_seconds = ? WHERE unit_id = ?",
                (state, result.f1, result.precision, result.recall, result.episode_return, result.steps, result.steps,
                 result.steps, result.env_steps_per_s, result.updates_per_s, result.shard_path, now, result.seconds,
                 report_seconds, now, result.stop_reason, result.stop_step, result.budget_steps, result.eval_seconds,
                 unit_id),
            )
            stop = f" stop={result.stop_reason}@{result.stop_step}" if result.stop_reason else ""
            self._event(now, unit_id, "state", RUNNING, state, row["attempts"], f"f1={result.f1:.4f}{stop}")

    def mark_attempt_failed(self, unit_id: str, error: str, retry: bool) -> str:
        """running -> pending (``retry``) or failed; keeps ``error``. Returns the new state."""
        now = time.time()
        new_state = PENDING if retry else FAILED
        with self.db:
            row = self._expect(unit_id, RUNNING)
            self.db.execute(
                "UPDATE units SET state = ?, error = ?, finished_at = ?, updated_at = ? WHERE unit_id = ?",
                (new_state, error, now, now, unit_id),
            )
            self._event(now, unit_id, "state", RUNNING, new_state, row["attempts"], _first_line(error))
        return new_state

    def revoke_attempt(self, unit_id: str, token: int) -> None:
        """The unit's latest attempt is no longer trusted: ``token`` (``workers.fencing.issue``)
        is the unit's current one now, before any newer attempt starts."""
        with self.db:
            self.db.execute("UPDATE units SET attempt_token = ?, updated_at = ? WHERE unit_id = ?",
                            (token, time.time(), unit_id))

    def mark_node_lost(self, unit_id: str, error: str) -> int:
        """running -> pending for an attempt that died with its node: not counted (the node's fault,
        not the unit's). Returns the steps it trained past its last checkpoint, as last reported
        (the retry resumes from that checkpoint); they add up in ``steps_lost``."""
        now = time.time()
        with self.db:
            row = self._expect(unit_id, RUNNING)
            lost = self.db.execute("SELECT MAX(COALESCE(step, 0) - COALESCE(checkpoint_step, 0), 0) FROM units"
                                   " WHERE unit_id = ?", (unit_id,)).fetchone()[0]
            self.db.execute(
                "UPDATE units SET state = ?, attempts = MAX(attempts - 1, 0), error = ?, finished_at = ?,"
                " steps_lost = COALESCE(steps_lost, 0) + ?, updated_at = ? WHERE unit_id = ?",
                (PENDING, error, now, lost, now, unit_id),
            )
            self._event(now, unit_id, "state", RUNNING, PENDING, row["attempts"],
                        f"node lost, attempt not counted, {lost} steps lost: {_first_line(error)}")
        return lost

    def requeue_interrupted(self, detail: str) -> int:
        """running -> pending for every unit whose driver went away (the interrupted attempt is not counted)."""
        now = time.time()
        with self.db:
            rows = self.db.execute("SELECT unit_id, attempts FROM units WHERE state = ?", (RUNNING,)).fetchall()
            for r in rows:
                self.db.execute(
                    "UPDATE units SET state = ?, attempts = MAX(attempts - 1, 0), updated_at = ? WHERE unit_id = ?",
                    (PENDING, now, r["unit_id"]),
                )
                self._event(now, r["unit_id"], "state", RUNNING, PENDING, r["attempts"], detail)
        return len(rows)

    def reset_failed(self, detail: str) -> int:
        """failed -> pending with attempts reset to 0 (``pianoforge resume``); the last error is kept until then."""
        now = time.time()
        with self.db:
            rows = self.db.execute("SELECT unit_id, attempts FROM units WHERE state = ?", (FAILED,)).fetchall()
            for r in rows:
                self.db.execute("UPDATE units SET state = ?, attempts = 0, updated_at = ? WHERE unit_id = ?",
                                (PENDING, now, r["unit_id"]))
                self._event(now, r["unit_id"], "state", FAILED, PENDING, r["attempts"], detail)
        return len(rows)

    def set_state(self, unit_id: str, state: str, detail: str | None = None) -> None:
        """Move a unit to any state (e.g. the gate moving a unit between succeeded and gated)."""
        if state not in STATES:
            raise StoreError(f"unknown unit state {state!r} (known: {', '.join(STATES)})")
        now = time.time()
        with self.db:
            row = self.db.execute("SELECT state, attempts FROM units WHERE unit_id = ?", (unit_id,)).fetchone()
            if row is None:
                raise StoreError(f"{self.path}: no unit {unit_id}")
            self.db.execute("UPDATE units SET state = ?, updated_at = ? WHERE unit_id = ?", (state, now, unit_id))
            self._event(now, unit_id, "state", row["state"], state, row["attempts"], detail)

    def log_event(self, kind: str, detail: str | None = None) -> None:
        """A campaign-level event (submit, resume, driver start/stop)."""
        with self.db:
            self._event(time.time(), None, kind, None, None, None, detail)

    # ---- internals --------------------------------------------------------------------

    def _expect(self, unit_id: str, state: str) -> sqlite3.Row:
        row = self.db.execute("SELECT state, attempts FROM units WHERE unit_id = ?", (unit_id,)).fetchone()
        if row is None:
            raise StoreError(f"{self.path}: no unit {unit_id}")
        if row["state"] != state:
            raise StoreError(f"unit {unit_id} is {row['state']}, expected {state}")
        return row

    def _event(self, ts, unit_id, kind, from_state, to_state, attempt, detail) -> None:
        self.db.execute(
            "INSERT INTO events (ts, unit_id, kind, from_state, to_state, attempt, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (ts, unit_id, kind, from_state, to_state, attempt, detail),
        )


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text and text.strip() else ""
