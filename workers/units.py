"""A unit of work: one chunk of one song under one configuration, and the files every
workload keeps in its unit directory for failure drills."""

from __future__ import annotations

import json
import os
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

import configs

Split = Literal["train", "eval", "held-out"]

# In every unit directory, whatever the workload:
ATTEMPTS_LOG = "attempts.jsonl"  # one line per start: {"attempt", "start_step", "pid", "time"}
PID_FILE = "worker.pid"  # while an attempt runs: {"pid", "unit_id", "started", "host"} (see live_worker_pid)


def read_attempts(unit_dir: Path) -> list[dict]:
    """Every start of the unit in ``unit_dir``, oldest first: ``{"attempt", "start_step", "pid", "time"}``."""
    path = Path(unit_dir) / ATTEMPTS_LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux ``/proc``); None if it is gone.

    With the pid it names one process for good: a pid the kernel hands out again gets another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name before ")" may hold spaces


def write_pid_file(unit_dir: Path, unit_id: str) -> None:
    """Say that this process runs ``unit_id`` now (removed again by :func:`clear_pid_file`)."""
    from configs.files import write_text_atomic

    pid = os.getpid()
    write_text_atomic(Path(unit_dir) / PID_FILE, json.dumps({"pid": pid, "unit_id": unit_id, "started": process_start_time(pid),
                                                            "host": socket.gethostname()}))


def clear_pid_file(unit_dir: Path) -> None:
    """The attempt ended: its process (a Ray worker that lives on) runs other units next. Only
    this process's own file is removed: a newer attempt of the unit may run elsewhere by now."""
    path = Path(unit_dir, PID_FILE)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(info, dict) or (info.get("pid"), info.get("host")) in ((os.getpid(), socket.gethostname()),
                                                                           (os.getpid(), None)):
        path.unlink(missing_ok=True)


def live_worker_pid(unit_dir: Path, unit_id: str | None = None) -> int | None:
    """The pid of the process running the unit in ``unit_dir`` (``unit_id``, default the folder's
    name) now, or None.

    None when no attempt runs: no ``worker.pid`` (attempts remove it when they end), or one left
    by an attempt whose process died, even if its pid now belongs to another process (the start
    time differs) or was written in the old bare-pid form, or one of a process on another host.
    Check this before signalling a worker.
    """
    path = Path(unit_dir) / PID_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("unit_id") != (unit_id or Path(unit_dir).name):
        return None
    if info.get("host") not in (None, socket.gethostname()):  # a process of another host
        return None
    started = process_start_time(int(info["pid"]))
    return int(info["pid"]) if started is not None and started == info.get("started") else None


def unit_id_for(song_hash: str, chunk_index: int, config_hash: str) -> str:
    """A unit's identity: (song content hash, chunk index, config hash)."""
    return f"{song_hash[:12]}-c{chunk_index:03d}-{config_hash[:8]}"


class UnitSpec(BaseModel):
    """Everything a worker needs to run one unit; JSON-serialisable so it crosses Ray and SLURM."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    unit_id: str
    song_path: str
    song_hash: str
    song_name: str
    split: Split = "train"
    chunk_index: int = Field(ge=0)
    config_hash: str
    overrides: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def create(cls, song_path: str, song_hash: str, song_name: str, chunk_index: int, config_hash: str,
               split: Split = "train", overrides: dict[str, Any] | None = None) -> "UnitSpec":
        return cls(unit_id=unit_id_for(song_hash, chunk_index, config_hash), song_path=str(song_path),
                   song_hash=song_hash, song_name=song_name, split=split, chunk_index=chunk_index,
                   config_hash=config_hash, overrides=dict(overrides or {}))

    def config(self, cfg: configs.Config) -> configs.Config:
        """``cfg`` (the campaign's) with this unit's overrides: the one place a workload applies them."""
        return cfg.with_overrides(self.overrides) if self.overrides else cfg


class UnitResult(BaseModel):
    """What a finished unit reports back to the orchestrator."""

    model_config = ConfigDict(extra="forbid")

    unit_id: str
    f1: float
    precision: float
    recall: float
    episode_return: float
    steps: int
    shard_path: str | None
    seconds: float
    env_steps_per_s: float = 0.0
    updates_per_s: float = 0.0
    # F1-driven budgets (workers.rl.budget): why training stopped (target | plateau | budget | cap;
    # None from workloads without a budget), at which step, and the nominal budget it had.
    stop_reason: str | None = None
    stop_step: int | None = None
    budget_steps: int | None = None
    eval_seconds: float = 0.0  # this run's time in evaluations during training


@dataclass
class MemberOutcome:
    """What became of one unit of a pack: ``result`` on success, else ``error`` (the exception
    that stopped it; the pack's other units went on)."""

    unit_id: str
    result: UnitResult | None
    error: BaseException | None = None

    @property
    def error_text(self) -> str | None:
        if self.error is None:
            return None
        return "".join(traceback.format_exception(type(self.error), self.error, self.error.__traceback__))


# --- refilling a pack's freed slots (campaign.pack_refill) ---------------------------------
@dataclass
class Arrival:
    """A unit handed to a pack for one of its freed slots: what ``train_pack`` needs of it."""

    unit: UnitSpec
    unit_dir: Path
    report: Any  # Callable[[dict], None]: its metrics callback (its own MLflow run)


class Refill:
    """How a pack gets more work when a member ends (``campaign.pack_refill``).

    The pack calls ``done(outcome)`` as soon as a member's outcome is final (so the orchestrator
    can count it while the pack goes on), then ``request(slot)`` for the freed slot, and reads
    the answers with ``poll()``: ``(slot, Arrival)`` to train next in that slot, or
    ``(slot, None)`` when there is no more work for it (the slot stays idle). A pack ends once
    no slot trains and no request is unanswered. This base class is the local form: a fixed
    list of arrivals handed out in order (tests, and a pack run by hand); the scheduler's form
    asks the campaign driver (``orchestrator.scheduler.RayRefill``).
    """

    def __init__(self, arrivals: list[Arrival] | None = None):
        self.arrivals = list(arrivals or [])
        self.outcomes: list[MemberOutcome] = []
        self._asked: list[int] = []

    def done(self, outcome: MemberOutcome) -> None:
        self.outcomes.append(outcome)

    def request(self, slot: int) -> None:
        self._asked.append(slot)

    def poll(self) -> list[tuple[int, Arrival | None]]:
        answers = [(slot, self.arrivals.pop(0) if self.arrivals else None) for slot in self._asked]
        self._asked = []
        return answers

    @property
    def waiting(self) -> bool:
        """Requests not yet answered."""
        return bool(self._asked)
