"""Fencing: only the attempt of a unit that the campaign driver trusts now may commit its writes.

Any process can outlive the driver's belief in it: a node cut off from the network is declared
dead by Ray and its units are launched again elsewhere, while its own processes go on running
and writing to the shared file system. So each attempt carries a token, and every write that
matters checks it right before the rename that makes it visible.

- The driver gives each attempt of a unit a token (:func:`issue`): one more than the unit's
  last, written atomically to ``<unit_dir>/attempt.token`` before the attempt is launched and
  recorded in the campaign store (``units.attempt_token``). The driver is the file's only writer.
- The attempt carries its token as a :class:`Fence`. The scheduler hands it to the process
  that runs the unit (:func:`hold`); the writers look it up by unit id (:func:`check`): the lake
  shard and catalog entry (``workers.lake``), checkpoints (``workers.rl.checkpoints``, the
  synthetic workload's), ``result.json``.
- A fence whose token is no longer the one in the file is stale: the write is dropped (its
  temporary file removed), one warning names the unit, both tokens and the write, and
  :class:`StaleAttempt` is raised, so the stale attempt ends (a pack member fails alone)
  while what the trusted attempt wrote stays as it is; the line is also appended to
  ``<unit_dir>/refused-writes.log`` (the stale node's logs may be gone by the time anyone looks).
- The driver revokes a token as soon as it gives up on the attempt (its node declared dead),
  before any retry starts, and ignores notes and outcomes that carry a token other than the
  unit's current one, so store rows are written for the trusted attempt only.
- A unit run without a driver (``pianoforge specialist``, tests) holds no fence and is not checked.

The check reads a small file on the shared file system, not the store: the store is SQLite with
one writer host, which a writer on another host must not open. What remains is a window, not a
guarantee: a writer that passed the check and is then stalled (paused, swapped out, its NFS
client retrying) for longer than it takes the driver to launch a newer attempt and that attempt
to write can still rename over the newer write. The window is the time between the check and the
rename (one file-system call; the lake's commit also holds the unit's lock there); closing it
fully needs the storage itself to check the token.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from configs.files import write_json_atomic

log = logging.getLogger(__name__)

TOKEN_FILE = "attempt.token"
REFUSALS_LOG = "refused-writes.log"  # one line per refused write, beside the token: the stale node's own logs may be gone


class StaleAttempt(RuntimeError):
    """A write by an attempt the driver no longer trusts was refused; the message says which."""


def read_token(unit_dir: str | Path) -> int | None:
    """The token of the attempt the driver trusts now for the unit in ``unit_dir``; None when
    there is none (or the file is unreadable: then no attempt may commit)."""
    try:
        return int(json.loads(Path(unit_dir, TOKEN_FILE).read_text())["token"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Fence:
    """What an attempt carries: its unit, the unit's directory and the token the driver gave it."""

    unit_id: str
    unit_dir: str
    token: int

    def check(self, what: str) -> None:
        """Raise :class:`StaleAttempt` (and log it) unless this attempt is still the trusted one."""
        current = read_token(self.unit_dir)
        if current == self.token:
            return
        now = "no attempt" if current is None else f"attempt token {current}"
        message = (f"unit {self.unit_id}: {what} refused: this attempt (token {self.token}, pid {os.getpid()} on "
                   f"{socket.gethostname()}) is stale; the driver now trusts {now} "
                   f"({Path(self.unit_dir, TOKEN_FILE)})")
        log.warning(message)
        with contextlib.suppress(OSError):  # append-only and not a commit: a torn line is harmless
            with open(Path(self.unit_dir, REFUSALS_LOG), "a") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {message}\n")
        raise StaleAttempt(message)


def issue(unit_dir: str | Path, unit_id: str, after: int | None = None) -> Fence:
    """Driver side: the next attempt's fence, one more than both the unit's token file and
    ``after`` (the store's last token), written atomically before the attempt is launched."""
    token = max(read_token(unit_dir) or 0, after or 0) + 1
    Path(unit_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(unit_dir, TOKEN_FILE), {"unit_id": unit_id, "token": token, "issued_at": time.time(),
                                                    "driver_host": socket.gethostname()})
    return Fence(unit_id, str(unit_dir), token)


# --- the fences this process holds -----------------------------------------------------------
_held: dict[str, Fence] = {}


def hold(fence: Fence | None) -> None:
    """This process runs ``fence``'s attempt from now on (the scheduler's worker side)."""
    if fence is not None:
        _held[fence.unit_id] = fence


def release(unit_id: str) -> None:
    _held.pop(unit_id, None)


def held(unit_id: str) -> Fence | None:
    """The fence of the attempt of ``unit_id`` this process runs, or None (not fenced)."""
    return _held.get(unit_id)


def check(unit_id: str, what: str, fence: Fence | None = None) -> None:
    """Check ``fence`` (default: the one this process holds for ``unit_id``; none: nothing to check)."""
    fence = fence or held(unit_id)
    if fence is not None:
        fence.check(what)


def guard(unit_id: str, what: str, fence: Fence | None = None):
    """:func:`check` as a ``before_rename`` callback for ``configs.files.atomic_write``."""
    return partial(check, unit_id, what, fence)
