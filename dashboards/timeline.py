"""Campaign progress as plain numbers: units per state over time, finishes per time bin
(throughput and ETA are ``orchestrator.status.throughput_eta``, shared with ``pianoforge status``).

Pure functions of unit rows and state-change events (no files, no clock unless given), so that
they are tested on their own and the page shows the same numbers as ``/api/summary``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

STATES = ("pending", "running", "succeeded", "gated", "failed")
# Units in these states still have work ahead of them; any other state is an end state.
OPEN_STATES = ("pending", "running")


@dataclass(frozen=True)
class StateChange:
    """Unit ``unit_id`` entered ``state`` at ``time`` (seconds since the epoch)."""

    time: float
    unit_id: str
    state: str


def iso(t: float | None) -> str | None:
    """UTC time as ISO text with milliseconds (what plotly reads as a date axis)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def state_counts(states: Iterable[str]) -> dict[str, int]:
    """How many units are in each known state (every state present, zero when none)."""
    counts = dict.fromkeys(STATES, 0)
    for s in states:
        counts[s] = counts.get(s, 0) + 1
    return counts


def states_over_time(changes: Sequence[StateChange], now: float | None = None) -> tuple[list[float], dict[str, list[int]]]:
    """Replay state changes in time order: returns ``(times, counts)`` with ``counts[state][i]``
    the number of units in ``state`` just after ``times[i]``. A unit counts from its first change
    on; ``now`` (when given and later) repeats the last counts so the area reaches the present."""
    current: dict[str, str] = {}
    counts = dict.fromkeys(STATES, 0)
    times: list[float] = []
    series: dict[str, list[int]] = {s: [] for s in STATES}
    for ch in sorted(changes, key=lambda c: c.time):
        before = current.get(ch.unit_id)
        if before is not None:
            counts[before] -= 1
        counts[ch.state] = counts.get(ch.state, 0) + 1
        current[ch.unit_id] = ch.state
        if ch.state not in series:
            series[ch.state] = [0] * len(times)
        if times and times[-1] == ch.time:  # several changes at one instant: one point
            for s in series:
                series[s][-1] = counts.get(s, 0)
            continue
        times.append(ch.time)
        for s in series:
            series[s].append(counts.get(s, 0))
    if times and now is not None and now > times[-1]:
        times.append(now)
        for s in series:
            series[s].append(series[s][-1])
    return times, series


def finish_times(changes: Sequence[StateChange]) -> list[float]:
    """When each unit last entered an end state (a unit retried after failing counts once, at its
    final end)."""
    last: dict[str, StateChange] = {}
    for ch in sorted(changes, key=lambda c: c.time):
        last[ch.unit_id] = ch
    return sorted(ch.time for ch in last.values() if ch.state not in OPEN_STATES)


def throughput_bins(finished_at: Sequence[float], start: float, end: float, n_bins: int = 30) -> tuple[list[float], list[int]]:
    """Units finished per time bin between ``start`` and ``end``: ``(bin_edges, counts)``."""
    if not finished_at:
        return [], []
    end = max(end, max(finished_at), start + 1e-3)
    counts, edges = np.histogram(np.asarray(finished_at, dtype=float), bins=n_bins, range=(start, end))
    return edges.tolist(), counts.tolist()


def human_duration(seconds: float | None) -> str:
    """'1 h 05 min', '3 min 20 s', '12 s', or '–' when unknown."""
    if seconds is None:
        return "–"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"
