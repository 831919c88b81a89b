"""Checkpoints that survive damage: the last two are kept, a damaged one is set aside.

``save(state, path)`` writes ``path`` atomically and keeps the one it replaces as
``<stem>.prev<suffix>`` (``checkpoint.prev.pt``). ``load(path)`` tries ``path``, then the
previous one; a file that does not load (truncated, not a zip, unpicklable, a disk error) is
damaged: with ``repair`` it is renamed ``<name>.damaged-<UTC time>`` (kept for inspection, and
out of the way of the next save) and the next one is tried. Each damaged file and where the
unit continues from (the previous checkpoint, or scratch) is one message naming the paths,
logged and handed back so the caller can report it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from configs.files import atomic_write, fsync_dir
from workers import fencing

log = logging.getLogger(__name__)

DAMAGED_MARK = ".damaged-"


def previous_path(path: str | Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save(state: dict[str, Any], path: str | Path, unit_id: str | None = None) -> None:
    """Write ``state`` to ``path`` atomically; the checkpoint it replaces becomes the previous one.

    ``unit_id``: the unit it belongs to; when this process holds a fence for it
    (``workers.fencing``), a stale attempt's checkpoint is refused (``StaleAttempt``) and both
    files on disk stay as they are."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        torch.save(state, f)
        if unit_id is not None:
            fencing.check(unit_id, f"checkpoint {path}")
        if path.exists():  # the new one is complete on disk before the old one moves
            os.replace(path, previous_path(path))


@dataclass
class Loaded:
    """What :func:`load` found: the state (None: start from scratch), the file it came from, the
    damaged files skipped, and messages naming them and where the unit goes on from."""

    state: dict[str, Any] | None
    path: Path | None
    damaged: list[Path] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def load(path: str | Path, map_location: str | torch.device = "cpu", repair: bool = False) -> Loaded:
    """The newest checkpoint of ``path`` and its previous one that loads (``weights_only=True``).

    ``repair``: move damaged files aside (the process that owns the unit); without it (a reader
    such as the dashboard) they are only skipped.
    """
    path = Path(path)
    messages, damaged = [], []
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            state = torch.load(candidate, map_location=map_location, weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"holds a {type(state).__name__}, not a checkpoint")
        except Exception as e:  # noqa: BLE001 - torch, zipfile and pickle raise many types for a damaged file
            note = f"checkpoint {candidate} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
            if repair:
                aside = candidate.with_name(candidate.name + DAMAGED_MARK + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
                os.replace(candidate, aside)
                fsync_dir(candidate.parent)
                note += f"; moved to {aside}"
            messages.append(note)
            damaged.append(candidate)
            continue
        if messages:
            messages.append(f"continuing from {candidate} (step {state.get('step', '?')})")
            log.warning("; ".join(messages))
        return Loaded(state, candidate, damaged, messages)
    if messages:
        messages.append(f"no good checkpoint left: starting from scratch in {path.parent}" if repair
                        else f"no good checkpoint left in {path.parent}")
        log.warning("; ".join(messages))
    return Loaded(None, None, damaged, messages)
