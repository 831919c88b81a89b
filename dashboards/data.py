"""What the dashboard shows, gathered from a campaign directory without writing to it.

Sources (all read-only; the driver may be writing meanwhile):

- the campaign store ``campaign.db`` (``orchestrator.store.CampaignStore(readonly=True)``):
  units, their states, attempts, F1, timings, node, error, MLflow run id, and the ``events``
  table of state changes (units by state over time);
- the lake ``lake/`` (``workers.lake.Lake``): committed shards; the pressed-key histogram reads
  only each shard's ``pressed`` column (cached per shard commit); the focused unit's best
  rollout (highest episode F1) is read in full;
- MLflow (``mlflow.tracking_uri``, default ``sqlite:///<campaign>/mlflow.db``): metric
  histories of the units' runs, of the imitation job's run and its evaluation, whose ids the
  store holds (never searched for on the server, which other campaigns may share). A SQLite
  tracking file that does not exist yet is not created.

Which finger pressed which key (the OT fingering the lake records, or re-run for older shards) lives in
:mod:`dashboards.fingering`; MLflow reads in :mod:`dashboards.mlflow_reader`.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import configs
from dashboards import timeline
from dashboards.fingering import RECORDED, KeyCounter, best_episode, episode_finger_key_counts, pedal_after_each_step
from dashboards.mlflow_reader import MlflowReader, evaluation_f1
from dashboards.timeline import StateChange
from orchestrator.gate import IL_RUNNING, LAUNCHES_KEY
from orchestrator.status import budget_text, group_packs, placement, steps_text, throughput_eta
from orchestrator.store import BudgetSummary
from workers.tracking import outbox_path, pending_records

STORE_FILE = "campaign.db"
CONFIG_FILE = "config.yaml"
LAKE_DIR = "lake"
UNITS_DIR = "units"
MLFLOW_FILE = "mlflow.db"
DASHBOARD_DIR = "dashboard"  # the dashboard's own cache (rendered WAVs) inside the campaign dir



# Terminal colour codes (Ray colours its tracebacks); a web page shows them as garbage.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class CampaignNotFound(FileNotFoundError):
    """No campaign store where one was asked for; the message lists the campaigns found."""


def find_campaign(root: str | Path, name: str | None = None) -> Path:
    """The campaign directory ``<root>/<name>``; without a name, ``root`` itself when it holds a
    store, else the campaign under ``root`` whose store changed last."""
    root = Path(root)
    if name:
        path = root / name
        if (path / STORE_FILE).exists():
            return path
        raise CampaignNotFound(f"{path}: no campaign here (no {STORE_FILE}); campaigns under {root}: "
                               f"{', '.join(_campaign_names(root)) or 'none'}")
    if (root / STORE_FILE).exists():
        return root
    found = sorted(root.glob(f"*/{STORE_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise CampaignNotFound(f"{root}: no campaign found (no */{STORE_FILE}); give --root or a campaign name")
    return found[-1].parent


def _campaign_names(root: Path) -> list[str]:
    return sorted(p.parent.name for p in root.glob(f"*/{STORE_FILE}"))


# --------------------------------------------------------------------------------------------
# What the page is made of (plain data)
# --------------------------------------------------------------------------------------------


@dataclass
class Unit:
    """One unit as the dashboard shows it."""

    unit_id: str
    song_name: str
    chunk_index: int
    split: str
    state: str
    attempts: int
    f1: float | None
    started_at: float | None
    finished_at: float | None
    seconds: float | None
    node: str | None
    error: str | None
    mlflow_run_id: str | None
    shard_path: str | None
    step: int | None = None
    run_link: str | None = None
    stop_reason: str | None = None  # why training ended (workers.rl.budget), once finished
    stop_step: int | None = None
    budget_steps: int | None = None
    pack_id: str | None = None  # the pack of its latest attempt (campaign.pack_size > 1)
    steps_per_s: float | None = None  # env steps/s its running attempt last reported


@dataclass
class GateView:
    """The F1 gate: passing train shards against the number needed, and the imitation job."""

    threshold: float
    needed: int
    passing: int
    launched: bool
    il_run_id: str | None = None
    il_link: str | None = None


@dataclass
class Focus:
    """The unit whose fingering and audio are shown: its best rollout in the lake."""

    unit_id: str
    song_name: str
    chunk_index: int
    seed: int
    f1: float
    n_steps: int
    finger_key: np.ndarray  # int64 (10, 88)
    pressed: np.ndarray  # bool (T, 88), for the audio
    sustain: np.ndarray  # bool (T,)
    run_link: str | None = None
    how: str = RECORDED  # where finger_key comes from (dashboards.fingering)


@dataclass
class Snapshot:
    """Everything on the page at one moment."""

    campaign: str
    directory: str
    taken_at: float
    units: list[Unit]
    changes: list[StateChange]
    gate: GateView
    key_counts: np.ndarray  # int64 (88,)
    lake_steps: int
    lake_shards: int
    lake_episodes: int
    curves: dict[str, dict[str, tuple[list, list]]]
    il_curves: dict[str, tuple[list, list]]
    il_eval: dict[str, dict[str, float]]  # {policy: {group (seen | held-out): mean F1}}
    focus: Focus | None
    control_timestep: float
    problems: list[str] = field(default_factory=list)
    il_running: bool = False  # the driver's imitation job (store meta il_launches) is still training
    tracking_pending: int = 0  # records the campaign's MLflow outbox has not delivered yet
    ray_dashboard: str | None = None  # the Ray dashboard of the driver's cluster (store meta ray_dashboard_url)
    budgets: BudgetSummary | None = None  # finished units' stop reasons and steps saved (specialist.budget)

    @property
    def started_at(self) -> float | None:
        return min((c.time for c in self.changes), default=None)

    @property
    def finished(self) -> bool:
        """No unit is pending or running, nor the imitation job (and there is at least one unit)."""
        return (bool(self.units) and not self.il_running
                and all(u.state not in timeline.OPEN_STATES for u in self.units))

    def throughput_eta(self, window_s: float) -> tuple[float | None, float | None]:
        """Units ended per hour and the ETA, as ``pianoforge status`` computes them."""
        ended = [u.finished_at for u in self.units if u.state not in timeline.OPEN_STATES and u.finished_at]
        remaining = sum(1 for u in self.units if u.state in timeline.OPEN_STATES)
        return throughput_eta(ended, self.started_at, self.taken_at, remaining, window_s)

    @property
    def settled(self) -> bool:
        """Finished, and MLflow has received everything (so the curves are complete): the page
        stops refreshing."""
        return self.finished and self.tracking_pending == 0

    @property
    def until(self) -> float:
        """The end of the campaign's time axis: its last state change once finished, else now."""
        return max((c.time for c in self.changes), default=self.taken_at) if self.finished else self.taken_at


def running_packs(units: list[Unit]) -> list[dict[str, Any]]:
    """Packs with a running unit (``orchestrator.status.group_packs``), placed by Ray node."""
    return group_packs([{"unit_id": u.unit_id, "pack_id": u.pack_id, "node": u.node, "steps_per_s": u.steps_per_s}
                        for u in units if u.state == "running" and u.pack_id], place="node")


def summary(s: Snapshot, dash: configs.DashboardConfig) -> dict[str, Any]:
    """The numbers at the top of the page, as JSON for ``/api/summary``. ``version`` changes
    whenever the store has a new state change or a unit's F1 arrives, so a page that shows an
    older version reloads."""
    counts = timeline.state_counts(u.state for u in s.units)
    remaining = sum(counts[st] for st in timeline.OPEN_STATES)
    per_hour, eta = s.throughput_eta(dash.throughput_window_s)
    finished = s.finished
    last = max((c.time for c in s.changes), default=0.0)
    return {
        "campaign": s.campaign,
        "taken_at": s.taken_at,
        "taken_at_text": timeline.iso(s.taken_at)[:19],
        # finished | running (some unit runs) | waiting (units pending, none running) | empty
        "status": "finished" if finished else ("running" if counts["running"] else ("waiting" if s.units else "empty")),
        "finished": finished,
        "settled": s.settled,
        "tracking_pending": s.tracking_pending,
        "total": len(s.units),
        "counts": counts,
        "remaining": remaining,
        "throughput_per_hour": per_hour,
        "throughput_text": "–" if per_hour is None else f"{per_hour:.1f}/h",
        "eta_s": eta,
        "eta_text": "done" if finished else timeline.human_duration(eta),
        "gate": {"passing": s.gate.passing, "needed": s.gate.needed, "threshold": s.gate.threshold,
                 "launched": s.gate.launched, "il_run_id": s.gate.il_run_id},
        "lake": {"shards": s.lake_shards, "episodes": s.lake_episodes, "steps": s.lake_steps},
        # Why finished units stopped and the steps their budgets saved; None until one recorded a budget.
        "budgets": None if not (s.budgets and s.budgets.units) else {
            **dataclasses.asdict(s.budgets), "saved_steps": s.budgets.saved_steps, "text": budget_text(s.budgets),
            "saved_text": f"{steps_text(s.budgets.saved_steps)} ({s.budgets.saved_fraction:.0%})"},
        # Units per host of their latest attempt (orchestrator.status.placement).
        "hosts": placement((u.node, u.state) for u in s.units),
        "failures": [{"unit_id": u.unit_id, "attempts": u.attempts, "error": (u.error or "").strip().splitlines()[-1:]}
                     for u in s.units if u.state == "failed"],
        # ... and when MLflow catches up: run ids arrive, the outbox empties.
        "version": f"{len(s.changes)}-{last:.3f}-{s.lake_shards}-{s.gate.il_run_id or ''}"
                   f"-{sum(1 for u in s.units if u.mlflow_run_id)}-{s.tracking_pending == 0}",
    }


# --------------------------------------------------------------------------------------------
# Reading the sources
# --------------------------------------------------------------------------------------------


def campaign_config(campaign_dir: Path, problems: list[str]) -> configs.Config:
    """The campaign's config: ``config.yaml`` (a saved ``Config.to_dict()``, or a partial config
    merged over the defaults), else the defaults (noted in ``problems``)."""
    path = campaign_dir / CONFIG_FILE
    if not path.exists():
        problems.append(f"{path} not found: using the default config")
        return configs.load()
    try:
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, dict) and set(configs.Config.model_fields) - {"dashboard"} <= set(data):
            return configs.from_dict(data)
        return configs.load(files=[path])
    except (configs.ConfigError, yaml.YAMLError, OSError) as e:
        problems.append(f"{path}: {e}; using the default config")
        return configs.load()


def read_store(campaign_dir: Path) -> tuple[list[Unit], list[StateChange], dict[str, Any], BudgetSummary | None]:
    """Units, state changes, the meta table and the budgets summary from the campaign store, opened read-only."""
    import sqlite3

    from orchestrator.store import CampaignStore

    try:
        with CampaignStore(campaign_dir / STORE_FILE, readonly=True) as store:
            rows = list(store.units())
            events = store.events()
            meta = {k: store.get_meta(k) for (k,) in store.db.execute("SELECT key FROM meta")}
            budgets = store.budgets()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):  # the driver has created the file but not its tables yet
            return [], [], {}, None
        raise
    units = [Unit(unit_id=r.unit_id, song_name=r.song_name, chunk_index=r.chunk_index, split=r.split, state=r.state,
                  attempts=r.attempts, f1=r.f1, started_at=r.started_at, finished_at=r.finished_at,
                  seconds=r.seconds, node=r.hostname or r.node_id, error=_ANSI.sub("", r.error) if r.error else None, mlflow_run_id=r.mlflow_run_id,
                  shard_path=r.shard_path, step=r.step, stop_reason=r.stop_reason, stop_step=r.stop_step,
                  budget_steps=r.budget_steps, pack_id=r.pack_id,
                  steps_per_s=r.env_steps_per_s if r.state == "running" else None)
             for r in rows]
    changes = [StateChange(e.ts, e.unit_id, e.to_state) for e in events
               if e.kind == "state" and e.unit_id and e.to_state]
    return units, changes, meta, budgets


# --------------------------------------------------------------------------------------------
# The snapshot
# --------------------------------------------------------------------------------------------


class Campaign:
    """A campaign directory as the dashboard sees it; :meth:`snapshot` gathers the page's data.

    Keeps caches (per-shard key counts, MLflow client, focus unit) between snapshots, so a page
    refresh costs little more than reading the store.
    """

    def __init__(self, directory: str | Path, dash: configs.DashboardConfig | None = None):
        self.directory = Path(directory).resolve()
        if not (self.directory / STORE_FILE).exists():
            raise CampaignNotFound(f"{self.directory}: no campaign here (no {STORE_FILE})")
        self.problems: list[str] = []
        self.cfg = campaign_config(self.directory, self.problems)
        self.dash = dash or self.cfg.dashboard
        # The driver records the tracking uri it used in the store; the config says it otherwise.
        meta = read_store(self.directory)[2]
        uri = meta.get("tracking_uri") or self.cfg.mlflow.tracking_uri or f"sqlite:///{self.directory / MLFLOW_FILE}"
        self.mlflow = MlflowReader(uri, self.dash.mlflow_ui_url)
        self.keys = KeyCounter()
        self._focus_cache: dict[tuple[str, str], Focus] = {}
        self._video_locks: dict[Path, threading.Lock] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.directory.name

    def lake(self):
        from workers.lake import Lake

        return Lake(self.directory / LAKE_DIR, self.cfg.lake)

    def snapshot(self, curve_units: list[str] | None = None, focus_unit: str | None = None,
                 full: bool = True) -> Snapshot:
        """Read everything the page shows. ``curve_units``: units whose learning curves to show
        (default: the best finished ones, then running ones, up to ``dashboard.max_curves``);
        ``focus_unit``: the unit whose fingering and audio to show (default: the best finished).
        ``full=False`` leaves out the learning curves and the focus unit (for ``/api/summary``)."""
        with self._lock:
            return self._snapshot(curve_units, focus_unit, full)

    def _snapshot(self, curve_units, focus_unit, full) -> Snapshot:
        from orchestrator.gate import Gate

        problems = list(self.problems)
        taken_at = time.time()
        units, changes, meta, budgets = read_store(self.directory)
        by_id = {u.unit_id: u for u in units}

        lake = self.lake()
        shards = lake.shards()
        key_counts, lake_steps = self.keys.counts(lake, shards)
        gate = Gate(self.cfg.gate)
        passing = len(gate.passing_shards(lake))

        if meta.get("mlflow_experiment_id") is not None:
            self.mlflow.default_experiment = str(meta["mlflow_experiment_id"])
            self.mlflow.ready = True
        # Run ids come from this campaign's store only: a tracking server shared by several
        # campaigns holds other campaigns' imitation and evaluation runs too.
        launches = meta.get(LAUNCHES_KEY) or []
        il_run = next((rec["mlflow_run_id"] for rec in reversed(launches) if rec.get("mlflow_run_id")), None)
        eval_run = next((rec["eval_run_id"] for rec in reversed(launches) if rec.get("eval_run_id")), None)
        curves: dict[str, dict[str, tuple[list, list]]] = {}
        il_curves: dict[str, tuple[list, list]] = {}
        il_eval: dict[str, dict[str, float]] = {}
        try:
            for u in units:
                u.run_link = self.mlflow.link(u.mlflow_run_id)
            if il_run and full:
                il_curves = self.mlflow.curves(il_run, list(self.dash.il_metrics))
            if eval_run and full:
                il_eval = evaluation_f1(self.mlflow.metrics(eval_run))
            for uid in self._curve_units(units, curve_units) if full else []:
                run_id = by_id[uid].mlflow_run_id
                if run_id:
                    curves[uid] = self.mlflow.curves(run_id, list(self.dash.learning_curve_metrics))
        except Exception as e:  # MLflow down or busy: the rest of the page is still useful
            problems.append(f"MLflow ({self.mlflow.tracking_uri}): {type(e).__name__}: {e}")

        focus = None
        fid = (focus_unit or self._default_focus(units)) if full else None
        if fid:
            try:
                focus = self._focus(lake, shards, by_id.get(fid), fid)
            except Exception as e:
                problems.append(f"unit {fid}: cannot show its rollout: {type(e).__name__}: {e}")
        gate_view = GateView(threshold=gate.f1_threshold, needed=gate.min_shards, passing=passing,
                             launched=bool(launches), il_run_id=il_run, il_link=self.mlflow.link(il_run))
        return Snapshot(
            campaign=str(meta.get("name") or self.name), directory=str(self.directory), taken_at=taken_at,
            units=units, changes=changes, gate=gate_view, key_counts=key_counts, lake_steps=lake_steps,
            lake_shards=len(shards), lake_episodes=sum(s.n_episodes for s in shards), curves=curves,
            il_curves=il_curves, il_eval=il_eval, focus=focus,
            control_timestep=self.cfg.env.control_timestep, problems=problems,
            il_running=any(rec.get("state") == IL_RUNNING for rec in meta.get(LAUNCHES_KEY) or []),
            tracking_pending=pending_records(outbox_path(self.directory)),
            ray_dashboard=meta.get("ray_dashboard_url"), budgets=budgets,
        )

    def _curve_units(self, units: list[Unit], wanted: list[str] | None) -> list[str]:
        known = {u.unit_id for u in units}
        if wanted:
            return [u for u in wanted if u in known]
        finished = sorted((u for u in units if u.f1 is not None), key=lambda u: -u.f1)
        running = [u for u in units if u.state == "running"]
        return [u.unit_id for u in (finished + running)[: self.dash.max_curves]]

    @staticmethod
    def _default_focus(units: list[Unit]) -> str | None:
        done = [u for u in units if u.f1 is not None and u.shard_path]
        return max(done, key=lambda u: u.f1).unit_id if done else None

    def focus(self, unit_id: str) -> Focus | None:
        """The unit's best rollout (``None`` while it has no committed shard)."""
        lake = self.lake()
        with self._lock:
            return self._focus(lake, lake.shards(), None, unit_id)

    def _focus(self, lake, shards, unit: Unit | None, unit_id: str) -> Focus | None:
        shard = next((s for s in shards if s.unit_id == unit_id), None)
        if shard is None:
            return None
        key = (unit_id, shard.commit_id or str(shard.committed_at))
        if key not in self._focus_cache:
            ep = best_episode(lake, shard)
            finger_key, how = episode_finger_key_counts(ep)
            self._focus_cache[key] = Focus(
                unit_id=unit_id, song_name=shard.song_name, chunk_index=shard.chunk_index, seed=ep.seed,
                f1=ep.f1, n_steps=ep.n_steps, finger_key=finger_key, how=how,
                pressed=ep.pressed, sustain=pedal_after_each_step(ep),
            )
        focus = self._focus_cache[key]
        if unit is not None:
            focus.run_link = unit.run_link
        return focus

    def audio_path(self, focus: Focus) -> Path:
        """Where the focus rollout's WAV is cached in the campaign directory (rendered on demand)."""
        return self.directory / DASHBOARD_DIR / "audio" / f"{focus.unit_id}-seed{focus.seed}.wav"

    def video_path(self, focus: Focus) -> Path:
        """Where the focus rollout's MP4 is cached in the campaign directory (rendered on demand)."""
        return self.directory / DASHBOARD_DIR / "video" / f"{focus.unit_id}-seed{focus.seed}.mp4"

    def render_video(self, focus: Focus, width: int = 640, height: int = 480) -> Path:
        """The MP4 (with sound) of ``focus``'s best rollout, replayed from the lake once and cached;
        concurrent requests for the same clip wait for one rendering."""
        from orchestrator.playback import render_unit, resolve_unit

        path = self.video_path(focus)
        with self._lock:
            lock = self._video_locks.setdefault(path, threading.Lock())
        with lock:
            if not path.exists():
                view = resolve_unit(self.directory / "units" / focus.unit_id)
                render_unit(view, path, seed=focus.seed, width=width, height=height, soundfont=self.dash.soundfont)
        return path

    def render_audio(self, focus: Focus) -> Path:
        """The WAV of ``focus``'s best rollout, rendered once with RoboPianist's synthesizer."""
        from dashboards.audio import render_rollout_wav

        path = self.audio_path(focus)
        if not path.exists():
            render_rollout_wav(path, focus.pressed, self.cfg.env.control_timestep, focus.sustain, self.dash.soundfont)
        return path
