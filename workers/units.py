"""A unit of work: one chunk of one song under one configuration, and the files every
workload keeps in its unit directory for failure drills."""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Split = Literal["train", "eval", "held-out"]

# In every unit directory, whatever the workload:
ATTEMPTS_LOG = "attempts.jsonl"  # one line per start: {"attempt", "start_step", "pid", "time"}
PID_FILE = "worker.pid"  # the pid of the process running the unit (kill it to simulate a crash)


def read_attempts(unit_dir: Path) -> list[dict]:
    """Every start of the unit in ``unit_dir``, oldest first: ``{"attempt", "start_step", "pid", "time"}``."""
    path = Path(unit_dir) / ATTEMPTS_LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


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
