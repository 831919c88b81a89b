"""Where a campaign stands, read from its store without writing anything (safe while the driver runs).

``read_status(campaign_dir)`` gathers the numbers; ``render(status)`` turns them into a rich
renderable: units by state, a text histogram of F1, throughput (units/hour), ETA, why finished
units stopped and the steps their budgets saved, where units run (host, SLURM job, Ray node),
running units with their step and steps/s, and the last errors.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.store import FAILED, FINISHED, PENDING, RUNNING, STATES, BudgetSummary, CampaignStore
from workers.rl.budget import REASONS

F1_BINS = 10
OPEN_STATES = (PENDING, RUNNING)  # units with work ahead of them; every other state is an end
RESOURCES_KEY = "launch_resources"  # store meta: what one launch needs and what the cluster offered (the driver's)


@dataclass
class CampaignStatus:
    name: str
    dir: Path
    counts: dict[str, int]
    f1: list[float]                       # F1 of finished units
    throughput_per_hour: float | None     # ended units per hour, recent window (throughput_eta)
    eta_s: float | None                   # time to end pending + running units at that rate
    driver: str                           # 'running (pid N on HOST)', 'stopped', 'gone (...)', 'unknown'
    logging_overhead: float | None        # worker time in the metrics callback / worker time
    running: list[dict] = field(default_factory=list)
    packs: list[dict] = field(default_factory=list)  # running packs: pack_id, units, hostname, steps_per_s
    where: list[dict] = field(default_factory=list)  # running units per host, SLURM job and Ray node
    hosts: list[dict] = field(default_factory=list)  # units per host of their latest attempt (placement)
    steps_lost: int = 0                   # training steps lost with lost nodes, all units
    last_errors: list[dict] = field(default_factory=list)
    mlflow: dict[str, str] = field(default_factory=dict)
    gate: dict | None = None              # the driver's last gate check (orchestrator.gate.GATE_KEY)
    il_launches: list[dict] = field(default_factory=list)  # imitation jobs it launched, oldest first
    ray_dashboard: str | None = None      # Ray dashboard URL of the driver's cluster (recorded at its start)
    budgets: BudgetSummary | None = None  # finished units' stop reasons and steps saved (specialist.budget)
    waiting: str | None = None            # what running units with no host yet wait for (describe_wait)
    read_seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def throughput_eta(finished_at: Sequence[float], start: float | None, now: float, remaining: int,
                   window_s: float) -> tuple[float | None, float | None]:
    """Units ended per hour and seconds until the ``remaining`` (pending or running) units end:
    the one definition ``status`` and the dashboard both show.

    ``finished_at``: when each ended unit (succeeded, gated or failed) ended; ``start``: the
    campaign's first state change. The rate counts the units ended in the last ``window_s``
    seconds (``dashboard.throughput_window_s``; all of them when the campaign is younger) up to
    now, or up to the last end once nothing remains; with none ended in the window it falls back
    to the campaign's average. ``(None, None)`` before anything ended; the ETA is 0 once nothing
    remains.
    """
    eta_done = 0.0 if remaining == 0 else None
    if not finished_at or start is None:
        return None, eta_done
    end = now if remaining else max(finished_at)
    since = max(start, end - window_s)
    recent = sum(1 for t in finished_at if since <= t <= end)
    if recent:
        per_hour = recent / max(end - since, 1e-6) * 3600.0
    else:
        per_hour = len(finished_at) / max(end - start, 1e-6) * 3600.0
    return per_hour, (eta_done if remaining == 0 else remaining / per_hour * 3600.0)


@functools.lru_cache(maxsize=1)
def default_window_s() -> float:
    import configs

    return configs.load(profile=None).dashboard.throughput_window_s


def resolve_campaign(campaign: str | None, root: str | Path) -> Path:
    """A campaign directory from a name under ``root``, a path, or (None) the most recent one."""
    root = Path(root).expanduser()
    if campaign:
        for candidate in (Path(campaign).expanduser(), root / campaign):
            if (candidate / "campaign.db").exists():
                return candidate.resolve()
        raise FileNotFoundError(f"no campaign {campaign!r} (looked for {root / campaign}/campaign.db)")
    found = sorted(root.glob("*/campaign.db"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no campaigns under {root}")
    return found[-1].parent.resolve()


def read_status(campaign_dir: str | Path, n_errors: int = 5, n_running: int = 10,
                window_s: float | None = None) -> CampaignStatus:
    """``window_s``: the throughput window (default ``dashboard.throughput_window_s``)."""
    t0 = time.perf_counter()
    campaign_dir = Path(campaign_dir)
    with CampaignStore(campaign_dir / "campaign.db", readonly=True) as store:
        db = store.db
        counts = store.counts()
        marks = ",".join("?" * len(FINISHED))
        f1 = [r[0] for r in db.execute(f"SELECT f1 FROM units WHERE state IN ({marks}) AND f1 IS NOT NULL", FINISHED)]
        driver = driver_state(store)
        open_marks = ",".join("?" * len(OPEN_STATES))
        ended = [r[0] for r in db.execute(f"SELECT finished_at FROM units WHERE state NOT IN ({open_marks})"
                                          " AND finished_at IS NOT NULL", OPEN_STATES)]
        start = db.execute("SELECT MIN(ts) FROM events WHERE kind = 'state'").fetchone()[0]
        throughput, eta = throughput_eta(ended, start, time.time(), counts[PENDING] + counts[RUNNING],
                                         window_s or default_window_s())
        overhead_row = db.execute(
            f"SELECT SUM(report_seconds), SUM(seconds) FROM units WHERE state IN ({marks}) AND report_seconds IS NOT NULL",
            FINISHED).fetchone()
        pack_col = "NULL AS pack_id" if "NULL AS pack_id" in store.unit_columns else "pack_id"  # an older store
        running = [dict(r) for r in db.execute(
            f"SELECT unit_id, {pack_col}, attempts, hostname, slurm_job_id, node_id, step, env_steps_per_s AS steps_per_s,"
            " checkpoint_step, started_at FROM units WHERE state = ? ORDER BY started_at LIMIT ?", (RUNNING, n_running))]
        packs = group_packs([dict(r) for r in db.execute(
            "SELECT unit_id, pack_id, hostname, env_steps_per_s AS steps_per_s, started_at FROM units"
            " WHERE state = ? AND pack_id IS NOT NULL", (RUNNING,))]) if pack_col == "pack_id" else []
        where = [dict(r) for r in db.execute(
            "SELECT hostname, slurm_job_id, node_id, COUNT(*) AS units, SUM(env_steps_per_s) AS steps_per_s FROM units"
            " WHERE state = ? GROUP BY hostname, slurm_job_id, node_id ORDER BY units DESC, hostname", (RUNNING,))]
        hosts = placement(db.execute("SELECT hostname, state FROM units WHERE hostname IS NOT NULL"))
        lost_col = "NULL" if "NULL AS steps_lost" in store.unit_columns else "steps_lost"  # an older store
        steps_lost = db.execute(f"SELECT COALESCE(SUM({lost_col}), 0) FROM units").fetchone()[0]
        errors = [dict(r) for r in db.execute(
            "SELECT unit_id, state, attempts, finished_at, error FROM units WHERE error IS NOT NULL"
            " ORDER BY finished_at DESC LIMIT ?", (n_errors,))]
        mlflow = {k: str(store.get_meta(k, "")) for k in ("tracking_uri", "mlflow_experiment_id", "mlflow_parent_run_id")}
        name = store.get_meta("name", campaign_dir.name)
        gate, il_launches = store.get_meta("gate"), store.get_meta("il_launches") or []
        ray_dashboard = store.get_meta("ray_dashboard_url")
        budgets = store.budgets()
        queued = db.execute("SELECT COUNT(*) FROM units WHERE state = ? AND hostname IS NULL", (RUNNING,)).fetchone()[0]
        resources = store.get_meta(RESOURCES_KEY)
        waiting = f"{queued} unit(s) wait in Ray's queue: {describe_wait(resources)}" if queued and resources else None
    return CampaignStatus(
        name=name, dir=campaign_dir, counts=counts, f1=f1, throughput_per_hour=throughput, eta_s=eta, driver=driver,
        logging_overhead=overhead_row[0] / overhead_row[1] if overhead_row and overhead_row[1] else None,
        running=running, packs=packs, where=where, hosts=hosts, steps_lost=steps_lost, last_errors=errors, mlflow=mlflow,
        gate=gate, il_launches=il_launches, ray_dashboard=ray_dashboard, budgets=budgets, waiting=waiting,
        read_seconds=time.perf_counter() - t0)


def resource_amount(resource: str, n: float) -> str:
    """``3 CPUs``, ``1 GPUs``, ``1 pool:cpu``: an amount of a Ray resource as messages show it."""
    return f"{n:g} {resource}s" if resource in ("CPU", "GPU") else f"{n:g} {resource}"


def describe_wait(view: dict) -> str:
    """What a queued launch waits for, from the driver's record of ``scheduler.resource_view``:
    e.g. ``each launch needs 3 CPUs; free now 1 CPUs; largest node has 2 CPUs (no node can hold it now)``."""
    needs = view["needs"]
    line = "; ".join(f"{label} {', '.join(resource_amount(r, of.get(r, 0)) for r in needs)}" for label, of in (
        ("each launch needs", needs), ("free now", view["free"]), ("largest node has", view["largest"])))
    if not view["nodes"]:
        return line + " (no node has joined yet)"
    return line if view["fits"] else line + " (no node can hold it now)"


def placement(units: Iterable[tuple[str | None, str]]) -> list[dict]:
    """Units per host from (host, state) pairs, hosts by name: {host, units, running, finished,
    failed, pending}. A unit counts on the host of its latest attempt (None: never placed)."""
    hosts: dict[str, dict] = {}
    for host, state in units:
        if host:
            h = hosts.setdefault(host, {"host": host, "units": 0, RUNNING: 0, "finished": 0, FAILED: 0, PENDING: 0})
            h["units"] += 1
            h["finished" if state in FINISHED else state] += 1
    return [hosts[h] for h in sorted(hosts)]


def group_packs(rows: list[dict], place: str = "hostname") -> list[dict]:
    """Running units grouped by pack: which units share one, where (``place``: the rows' key
    that says it), and its env steps/s (the sum of its units' last reported rates). Each row has
    ``unit_id``, ``pack_id``, ``place`` and ``steps_per_s``; other keys come from a pack's first unit."""
    packs: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["unit_id"]):
        p = packs.setdefault(r["pack_id"], {**{k: v for k, v in r.items() if k not in ("unit_id", "steps_per_s")},
                                            "units": [], "steps_per_s": None})
        p["units"].append(r["unit_id"])
        p[place] = p[place] or r[place]
        if r["steps_per_s"] is not None:
            p["steps_per_s"] = (p["steps_per_s"] or 0.0) + r["steps_per_s"]
    return sorted(packs.values(), key=lambda p: int(p["pack_id"].rsplit("-", 1)[-1]) if p["pack_id"][-1:].isdigit() else 0)


def driver_ended(state: str) -> bool:
    """Whether a :func:`driver_state` says the driver (and the Ray cluster it ran) is gone."""
    return state.startswith(("stopped", "gone"))


def driver_state(store: CampaignStore) -> str:
    """From the last driver_start/driver_stop events (a pid check when the driver ran on this host)."""
    row = store.db.execute("SELECT kind, detail FROM events WHERE kind IN ('driver_start', 'driver_stop')"
                           " ORDER BY id DESC LIMIT 1").fetchone()
    if row is None:
        return "never started"
    if row[0] == "driver_stop":
        return "stopped"
    info = dict(part.split("=", 1) for part in (row[1] or "").split() if "=" in part)
    pid, host = info.get("pid"), info.get("host")
    if pid and host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return f"gone (pid {pid} is not running: `pianoforge resume` continues)"
        except PermissionError:
            pass
        return f"running (pid {pid} on {host})"
    return f"unknown (pid {pid} on {host})"


def f1_histogram(values: list[float], bins: int = F1_BINS, width: int = 40) -> list[tuple[str, int, str]]:
    """(label, count, bar) rows over [0, 1]."""
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int(v * bins)))] += 1
    top = max(counts) or 1
    return [(f"{i / bins:.1f}-{(i + 1) / bins:.1f}", c, "█" * round(c / top * width)) for i, c in enumerate(counts)]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _node(node_id: str | None) -> str:
    """A Ray node id as `ray list nodes` starts it (the first 8 of its 56 hex digits)."""
    return node_id[:8] if node_id else "-"


def _rate(steps_per_s: float | None) -> str:
    return f"{steps_per_s:.1f}" if steps_per_s is not None else "-"


def render(status: CampaignStatus):
    """A rich renderable of ``status``."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text.assemble((f"campaign {status.name}", "bold"), f"  {status.dir}\n",
                         f"driver: {status.driver}   units: {status.total}   ",
                         f"throughput: {status.throughput_per_hour:.1f} units/h   " if status.throughput_per_hour else
                         "throughput: -   ", f"ETA: {_duration(status.eta_s)}")
    if status.logging_overhead is not None:
        head.append(f"   logging overhead: {status.logging_overhead:.3%} of worker time")
    if status.waiting:
        head.append(f"\n{status.waiting}", style="yellow")
    if status.ray_dashboard and not driver_ended(status.driver):  # a finished driver's Ray cluster is gone
        head.append(f"\nRay dashboard: {status.ray_dashboard}")

    states = Table(title="units by state", show_edge=False,
                   caption="gated: finished with F1 below gate.f1_threshold (its shard is not used for imitation)")
    for s in STATES:
        states.add_column(s, justify="right")
    states.add_row(*(str(status.counts[s]) for s in STATES))

    hist = Table(title=f"F1 of finished units (n={len(status.f1)})", show_edge=False)
    hist.add_column("F1")
    hist.add_column("units", justify="right")
    hist.add_column("")
    for label, count, bar in f1_histogram(status.f1):
        hist.add_row(label, str(count), bar)

    parts = [head, states, hist]
    if status.budgets and status.budgets.units:
        parts.append(Text(budget_text(status.budgets)))
    if status.where:
        where = Table(title="where units run", show_edge=False)
        for col in ("host", "slurm job", "Ray node", "units", "steps/s"):
            where.add_column(col, justify="right" if col in ("units", "steps/s") else "left")
        for w in status.where:
            where.add_row(w["hostname"] or "-", w["slurm_job_id"] or "-", _node(w["node_id"]), str(w["units"]),
                          _rate(w["steps_per_s"]))
        parts.append(where)
    if len(status.hosts) > 1 or status.steps_lost:
        lost = f"; {status.steps_lost} training steps lost with lost nodes" if status.steps_lost else ""
        hosts = Table(title="units by host of their latest attempt", show_edge=False, caption=lost.lstrip("; ") or None)
        for col in ("host", "units", "running", "finished", "failed", "pending"):
            hosts.add_column(col, justify="left" if col == "host" else "right")
        for h in status.hosts:
            hosts.add_row(h["host"], *(str(h[k]) for k in ("units", RUNNING, "finished", FAILED, PENDING)))
        parts.append(hosts)
    if status.running:
        run = Table(title="running", show_edge=False)
        for col in ("unit", "pack", "attempt", "host", "slurm job", "Ray node", "step", "steps/s", "checkpoint", "for"):
            run.add_column(col)
        now = time.time()
        for r in status.running:
            run.add_row(r["unit_id"], r["pack_id"] or "-", str(r["attempts"]), r["hostname"] or "-", r["slurm_job_id"] or "-",
                        _node(r["node_id"]), str(r["step"] if r["step"] is not None else "-"), _rate(r["steps_per_s"]),
                        str(r["checkpoint_step"] if r["checkpoint_step"] is not None else "-"),
                        _duration(now - r["started_at"]) if r["started_at"] else "-")
        parts.append(run)
    if status.packs:
        packs = Table(title="packs", show_edge=False)
        for col in ("pack", "units", "host", "steps/s"):
            packs.add_column(col)
        for p in status.packs:
            packs.add_row(p["pack_id"], ", ".join(p["units"]), p["hostname"] or "-",
                          _rate(p["steps_per_s"]))
        parts.append(packs)
    if status.last_errors:
        err = Table(title="last errors", show_edge=False)
        for col in ("unit", "state", "attempts", "error"):
            err.add_column(col)
        for e in status.last_errors:
            first = (e["error"] or "").strip().splitlines()
            err.add_row(e["unit_id"], e["state"], str(e["attempts"]), first[0][:160] if first else "")
        parts.append(err)
    if status.gate or status.il_launches:
        parts.append(_render_gate(status))
    if status.mlflow.get("tracking_uri"):
        parts.append(Text(f"MLflow: {status.mlflow['tracking_uri']}  experiment {status.mlflow['mlflow_experiment_id']}"
                          f"  parent run {status.mlflow['mlflow_parent_run_id']}"))
    return Group(*parts)


def steps_text(n: int) -> str:
    """A step count as people read it: 950, 12.5k, 3.20M."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    return f"{sign}{n / 1e6:.2f}M" if n >= 1e6 else (f"{sign}{n / 1e3:.1f}k" if n >= 1e3 else f"{sign}{n}")


def budget_text(b: BudgetSummary) -> str:
    """One line: why finished units stopped, and the steps the budgets saved (specialist.budget)."""
    reasons = ", ".join(f"{r} {b.reasons.get(r, 0)}" for r in REASONS)
    line = (f"stopped by: {reasons}   trained {steps_text(b.steps)} of {steps_text(b.budget_steps)} budgeted steps"
            f" (saved {steps_text(b.saved_steps)}, {b.saved_fraction:.0%})")
    if b.eval_share is not None:
        line += f"   evaluation: {b.eval_share:.1%} of worker time"
    return line


def _render_gate(status: CampaignStatus):
    """The F1 gate (passing/needed train shards) and the imitation jobs it launched."""
    from rich.text import Text

    text = Text()
    g = status.gate
    if g:
        text.append(f"gate: {g['passing']}/{g['needed']} train shards with F1 >= {g['threshold']:g} passing"
                    f" (launch: {g['launch']})", style="bold")
        if g.get("damaged"):
            text.append(f"\n{g['damaged']} damaged shard(s) left out (`pianoforge lake verify`; `resume` records them again)"
                        + "".join(f"\n  {path}" for path in g.get("damaged_shards", [])), style="red")
    for job in status.il_launches:
        line = f"\nimitation: launch {job['n']} {job['state']} ({job['policy']}, {job['passing']} shards)"
        if job.get("steps") is not None:
            line += f", {job['steps']} steps, loss {job['loss']:.4g}" if job.get("loss") is not None else f", {job['steps']} steps"
        line += f"  {job.get('policy_path') or job['out_dir']}"
        if job.get("mlflow_run_id"):
            line += f"  MLflow run {job['mlflow_run_id']}"
        text.append(line, style="red" if job["state"] == "failed" else None)
        if job.get("error"):
            text.append("\n  " + job["error"].strip().splitlines()[0][:200], style="red")
    return text
