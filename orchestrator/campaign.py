"""A campaign: the units of one manifest (song chunk x config), their state, and the driver
that runs them to the end.

``submit`` adds units to the campaign's store (units already there keep their state, so
submitting the same manifest again continues the campaign) and drives every pending unit.
``resume`` drives a campaign again after its driver stopped: units left ``running`` by a
driver that is gone go back to ``pending`` (that interrupted attempt is not counted) and
``failed`` units get a fresh set of ``campaign.max_attempts`` attempts, and finished units whose
lake shard is damaged (its file not the size the catalog records) are run again: the damaged
file is set aside and the unit, from its final checkpoint, only records its rollouts. Either
way a unit restarts from its last checkpoint, because its directory ``units/<unit_id>/`` persists.

The driver also runs the F1 gate (``orchestrator.gate.ImitationLauncher``): as units finish it
checks the lake, and when enough train shards pass it starts imitation learning as a Ray task
(``gate.launch``: when_passing, after_campaign or never). A campaign is finished when its
imitation job is; ``resume`` restarts an interrupted (or failed) job from its checkpoint.

A full disk (a unit's write, the store's or the driver's) is the node's fault, not a unit's:
the driver stops at once, cancels the attempts in flight and puts them back to pending without
counting them, and ``CampaignSummary.no_space`` names the full path; SQLite leaves the store as
it was before the failed write. Once there is space, ``resume`` continues.

Campaign directory (``<root>/<campaign>/``)::

    campaign.db     the store (orchestrator.store; the driver is its only writer)
    config.yaml     the resolved config of the latest submit/resume
    driver.lock     held by the running driver (a second driver is refused)
    units/<id>/     each unit's checkpoints and results
    lake/           the trajectory lake (workers.lake)
    il/<policy>/launch-<n>/  each imitation-learning job the gate launched (policy.pt, checkpoints)
    mlflow.db       MLflow tracking (when mlflow.tracking_uri is null), mlartifacts/ next to it
    mlflow-outbox.db  what MLflow has not received yet (orchestrator.tracking; workers.tracking)
    logs/           driver logs
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from filelock import FileLock, Timeout

import configs
from configs.files import NoSpaceError, disk_full
from orchestrator.gate import LAUNCHES_KEY
from orchestrator.store import FAILED, FINISHED, GATED, PENDING, SUCCEEDED, CampaignStore
from workers.lake import Lake
from workers.units import UnitResult, UnitSpec
from configs.files import write_text_atomic

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CampaignError(RuntimeError):
    """A campaign cannot be started or resumed; the message says why and what to do."""


@dataclass(frozen=True)
class CampaignPaths:
    """Where everything of one campaign lives."""

    dir: Path

    @classmethod
    def of(cls, root: str | Path, name: str) -> CampaignPaths:
        if not _NAME.match(name):
            raise CampaignError(f"campaign name {name!r}: use letters, digits, '.', '_' and '-'")
        return cls(Path(root).expanduser().resolve() / name)

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def db(self) -> Path:
        return self.dir / "campaign.db"

    @property
    def config(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def lock(self) -> Path:
        return self.dir / "driver.lock"

    @property
    def units(self) -> Path:
        return self.dir / "units"

    @property
    def lake(self) -> Path:
        return self.dir / "lake"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    def unit_dir(self, unit_id: str) -> Path:
        return self.units / unit_id

    def create(self) -> CampaignPaths:
        for d in (self.dir, self.units, self.lake, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        return self


@dataclass
class CampaignSummary:
    """What a driver run did, and where the campaign stands after it."""

    name: str
    dir: Path
    counts: dict[str, int]
    attempts_run: int
    seconds: float
    tracking_uri: str
    experiment_id: str | None  # None until the tracking server has heard of the campaign
    parent_run_id: str | None
    logging_overhead: float | None  # worker time in the metrics callback / worker time, finished units
    sink_stats: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    imitation: dict[str, Any] | None = None  # the latest imitation job's record (store meta il_launches), if any
    no_space: NoSpaceError | None = None  # the driver stopped because this path's disk is full
    tracking_behind: str | None = None  # the warning line when MLflow records were left for later

    @property
    def done(self) -> bool:
        return self.counts.get(PENDING, 0) == 0 and self.counts.get("running", 0) == 0


def save_config(cfg: configs.Config, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_saved_config(paths: CampaignPaths, overrides: list[str] | None = None) -> configs.Config:
    """The campaign's saved config.yaml with ``overrides`` applied."""
    if not paths.config.exists():
        raise CampaignError(f"{paths.dir}: no config.yaml; is this a campaign directory?")
    cfg = configs.from_dict(yaml.safe_load(paths.config.read_text()))
    return cfg.with_overrides(overrides) if overrides else cfg


class _DriverLock:
    """One driver per campaign: an OS file lock the kernel drops when the driver dies."""

    def __init__(self, paths: CampaignPaths):
        self.paths = paths
        self.lock = FileLock(str(paths.lock))

    def __enter__(self):
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise CampaignError(f"campaign {self.paths.name} is being driven by another process "
                                f"(it holds {self.paths.lock}); watch it with `pianoforge status {self.paths.name}`") from None
        return self

    def __exit__(self, *exc):
        self.lock.release()


def submit(units: Iterable[UnitSpec], cfg: configs.Config, name: str, root: str | Path | None = None,
           ray_address: str | None = None, num_cpus: int | None = None,
           on_progress: Callable[[dict[str, int]], None] | None = None) -> CampaignSummary:
    """Add ``units`` to campaign ``name`` (created if new) and drive it until no unit is pending.

    Units already in the campaign keep their state: finished ones are not run again, failed
    ones stay failed (``resume`` retries them). The workload is ``cfg.campaign.workload``.
    """
    paths = CampaignPaths.of(root or cfg.campaign.root, name).create()
    with _DriverLock(paths), CampaignStore(paths.db) as store:
        save_config(cfg, paths.config)
        store.set_meta("name", paths.name)
        if store.get_meta("created_at") is None:
            store.set_meta("created_at", time.time())
        config_key = store.put_config(cfg.to_dict(), cfg.hash())
        units = list(units)
        added = store.add_units(units, config_key)
        store.log_event("submit", f"{added} new units of {len(units)} submitted")
        requeued = store.requeue_interrupted("driver gone; requeued by submit")
        log.info("campaign %s: %d new units, %d already known, %d interrupted requeued",
                 paths.name, added, len(units) - added, requeued)
        return _drive(paths, store, cfg, ray_address, num_cpus, on_progress, restart_failed_il=False)


def resume(name: str, root: str | Path | None = None, overrides: list[str] | None = None,
           ray_address: str | None = None, num_cpus: int | None = None,
           on_progress: Callable[[dict[str, int]], None] | None = None) -> CampaignSummary:
    """Drive campaign ``name`` again: interrupted units go back to pending without losing an
    attempt, failed units go back to pending with their attempts reset to 0. Both restart
    from their last checkpoint. ``overrides`` change the orchestration settings (campaign.*,
    mlflow.*, gate.*); each unit keeps the config it was submitted with."""
    root = root if root is not None else configs.load(profile=None).campaign.root
    paths = CampaignPaths.of(root, name)
    if not paths.db.exists():
        raise CampaignError(f"no campaign {name!r} under {paths.dir.parent} (no {paths.db.name})")
    paths.create()
    with _DriverLock(paths), CampaignStore(paths.db) as store:
        cfg = load_saved_config(paths, overrides)
        save_config(cfg, paths.config)
        requeued = store.requeue_interrupted("driver gone; requeued by resume")
        reset = store.reset_failed("failed; attempts reset by resume")
        rerecord = requeue_damaged_shards(store, Lake(paths.lake, cfg.lake))
        store.log_event("resume", f"{requeued} interrupted, {reset} failed and {rerecord} units with a damaged "
                                  "shard requeued")
        log.info("campaign %s: resuming %d interrupted, %d failed and %d units with a damaged shard",
                 name, requeued, reset, rerecord)
        return _drive(paths, store, cfg, ray_address, num_cpus, on_progress, restart_failed_il=True)


def requeue_damaged_shards(store: CampaignStore, lake: Lake) -> int:
    """Finished units whose shard is damaged (or gone from the catalog) back to pending: the
    damaged file is set aside (``Lake.set_aside``) and the unit, whose final checkpoint is kept,
    only records its rollouts again. Returns how many."""
    listed = {s.unit_id: s for s in lake.shards()}
    n = 0
    for row in store.units(FINISHED):
        if row.shard_path is None:
            continue
        shard = listed.get(row.unit_id)
        problem = "no catalog entry" if shard is None else lake.shard_problem(shard)
        if problem is None:
            continue
        aside = lake.set_aside(shard) if shard is not None else None
        detail = f"shard {row.shard_path} damaged ({problem})" + (f", set aside as {aside}" if aside else "")
        log.warning("unit %s: %s; recording its rollouts again", row.unit_id, detail)
        store.set_state(row.unit_id, PENDING, detail + "; rollouts recorded again")
        n += 1
    return n


def _unit_params(row) -> dict[str, Any]:
    return {"song": row.song_name, "song_hash": row.song_hash, "chunk": row.chunk_index, "unit_id": row.unit_id,
            "config_hash": row.config_hash, "split": row.split}


class _StepRates:
    """Steps per second of running units, measured by the driver as their steps arrive: over the
    attempt so far from its first report, so start-up and steps resumed from a checkpoint are left out."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[int, float]] = {}  # unit_id -> (step, time) of the attempt's first report

    def note(self, unit_id: str, step: int | None) -> float | None:
        if step is None:
            return None
        now = time.monotonic()
        first_step, first_at = self._first.setdefault(unit_id, (step, now))
        return (step - first_step) / (now - first_at) if step > first_step and now > first_at else None

    def forget(self, unit_id: str) -> None:
        self._first.pop(unit_id, None)


def _drive(paths: CampaignPaths, store: CampaignStore, cfg: configs.Config, ray_address: str | None,
           num_cpus: int | None, on_progress: Callable[[dict[str, int]], None] | None,
           restart_failed_il: bool = False) -> CampaignSummary:
    """Run every pending unit to success or failure, retrying failed attempts from checkpoints,
    and the imitation job the gate launches to its end."""
    import ray
    import ray.exceptions

    from orchestrator import scheduler as sched_mod
    from orchestrator.gate import ImitationLauncher
    from orchestrator.tracking import (artifact_location_for, known_runs, record_runs, start_sink,
                                       tracking_uri_for)

    t_start = time.perf_counter()
    handler = _QuietFileHandler(paths.logs / "driver.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("orchestrator").addHandler(handler)
    started_ray = sched_mod.connect(ray_address, num_cpus=num_cpus, ray_cfg=cfg.ray)
    sink = None
    pools = None  # slurm: the PoolManager when the profile names SLURM pools
    attempts_run = 0
    interrupted = False
    no_space: NoSpaceError | None = None
    uri = tracking_uri_for(cfg.mlflow, paths.dir)
    try:
        store.set_meta("ray_dashboard_url", sched_mod.dashboard_url())  # status and the dashboard link to it
        # Tracking goes through the campaign's outbox: nothing here waits for the tracking server.
        sink = start_sink(paths.dir, uri, paths.name, artifact_location_for(uri, paths.dir), cfg.mlflow)
        ray.get(sink.open_campaign.remote(paths.name, cfg.to_dict(), paths.config.read_text(),
                                          cfg.mlflow.system_metrics, known_runs(store, uri)))
        store.set_meta("tracking_uri", uri)
        store.log_event("driver_start", f"pid={os.getpid()} host={socket.gethostname()}")

        scheduler = sched_mod.Scheduler(cfg, cfg.campaign.workload, sink)
        # --- slurm: pool jobs that join this Ray head and follow the queue (--profile slurm) ---------
        pool, last_reconcile = None, 0.0
        if cfg.slurm.pools:
            from slurm.pools import imitation_jobs, pool_for_units, start_for_campaign, unit_resources

            pool = pool_for_units(cfg.slurm, cfg.campaign.gpus_per_unit)
            pools = start_for_campaign(cfg, ray.get_runtime_context().gcs_address, paths.logs / "slurm")
            scheduler.extra_resources = unit_resources(pool)
            scheduler.pool = cfg.slurm.pools[pool]

        def reconcile_pools() -> None:
            # Units in flight count as running (never cancel a node that may hold one); the rest wait.
            nonlocal last_reconcile
            if pools is not None and time.monotonic() - last_reconcile >= cfg.slurm.poll_interval_s:
                # An imitation job in flight holds (or waits for) whole jobs for its DDP workers.
                reserved = dict([imitation_jobs(cfg)]) if imitation.ref is not None else {}
                pools.reconcile({pool: len(queue)}, {pool: len(scheduler)}, reserved)
                last_reconcile = time.monotonic()
        # --- end slurm ---------------------------------------------------------------------------------
        imitation = ImitationLauncher(cfg, store, paths.dir, paths.lake, uri, paths.name)
        imitation.restart_unfinished(include_failed=restart_failed_il)
        queue = deque(store.unit_ids(PENDING))
        if on_progress is not None:
            on_progress(store.counts())
        config_dicts: dict[str, dict] = {}
        last_drain = time.monotonic()
        rates = _StepRates()
        last_behind_warning = -math.inf

        def drain() -> None:
            nonlocal last_behind_warning
            try:
                notes = ray.get(sink.drain.remote(), timeout=60)
            except (ray.exceptions.RayError, TimeoutError) as e:  # tracking must not stop the campaign
                log.warning("metrics sink did not answer: %s", e)
                return
            for n in notes["started"]:
                store.note_worker(n["unit_id"], n.get("hostname"), n.get("node_id"), n.get("pid"), n.get("slurm_job_id"))
            for unit_id, (step, ckpt) in notes["progress"].items():
                store.note_progress(unit_id, step, ckpt, rates.note(unit_id, step))
            record_runs(store, notes["runs"])
            if notes["behind"] and time.monotonic() - last_behind_warning >= 60.0:  # one line a minute at most
                log.warning(notes["behind"])
                last_behind_warning = time.monotonic()

        def finish(outcome) -> None:
            nonlocal no_space
            if outcome.error_kind == "disk_full":  # not the unit's fault: left running, requeued uncounted below
                log.error("unit %s: %s", outcome.unit_id, outcome.no_space)
                no_space = no_space or outcome.no_space
                return
            unit_id = outcome.unit_id
            rates.forget(unit_id)  # a retry is a new attempt
            row = store.unit(unit_id)
            tags = {"attempt": row.attempts, "hostname": row.hostname, "node_id": row.node_id,
                    "slurm_job_id": row.slurm_job_id}
            if outcome.result is not None:
                res = outcome.result
                result = UnitResult(**{k: res[k] for k in UnitResult.model_fields if k in res})
                state = SUCCEEDED if result.f1 >= cfg.gate.f1_threshold else GATED
                store.mark_finished(unit_id, result, state, res.get("report_seconds"))
                overhead = res.get("report_seconds", 0.0) / result.seconds if result.seconds > 0 else None
                sink.finish_unit.remote(unit_id, "FINISHED", {
                    "return": result.episode_return, "f1": result.f1, "precision": result.precision,
                    "recall": result.recall, "env_steps_per_s": result.env_steps_per_s,
                    "updates_per_s": result.updates_per_s, "seconds": result.seconds,
                    "logging_overhead": overhead, "stop_step": result.stop_step, "budget_steps": result.budget_steps,
                    "eval_share": result.eval_seconds / result.seconds if result.seconds > 0 else None},
                    {**tags, "state": state, "stop_reason": result.stop_reason})
                return
            retry = row.attempts < cfg.campaign.max_attempts
            new_state = store.mark_attempt_failed(unit_id, outcome.error, retry)
            log.warning("unit %s attempt %d failed (%s)%s: %s", unit_id, row.attempts, outcome.error_kind,
                        "; retrying from its checkpoint" if retry else "; no attempts left",
                        outcome.error.splitlines()[0])
            if retry:
                queue.append(unit_id)  # to the back: a bad unit does not hold up the others
            else:
                sink.finish_unit.remote(unit_id, "FAILED", {}, {**tags, "state": new_state,
                                                                "error": outcome.error.splitlines()[0][:500]})

        try:
            # Until no unit is left and the imitation job (if the gate launched one) has ended, or a disk is full.
            while no_space is None and (imitation.step(units_left=bool(queue or len(scheduler))) or queue
                                        or len(scheduler)):
                while queue and scheduler.has_room():
                    rows = _next_pack(queue, store, scheduler.pack_size)
                    if not rows:
                        continue
                    pack_id = None
                    if scheduler.pack_size > 1:
                        packs_launched = int(store.get_meta("packs_launched", 0)) + 1
                        store.set_meta("packs_launched", packs_launched)
                        pack_id = f"pack-{packs_launched}"
                    for row in rows:
                        attempt = store.mark_running(row.unit_id, pack_id)
                        attempts_run += 1
                        sink.open_unit.remote(row.unit_id, _unit_params(row),
                                              {"state": "running", "attempt": attempt, **({"pack_id": pack_id} if pack_id else {})})
                    row = rows[0]
                    if row.config_key not in config_dicts:
                        config_dicts[row.config_key] = store.get_config(row.config_key)
                    config_ref = scheduler.config_ref(row.config_key, config_dicts[row.config_key])
                    if pack_id is None:
                        scheduler.launch(row.unit_id, row.spec_json, config_ref, paths.unit_dir(row.unit_id), paths.lake)
                    else:
                        scheduler.launch_pack([r.unit_id for r in rows], [r.spec_json for r in rows], config_ref,
                                              [paths.unit_dir(r.unit_id) for r in rows], paths.lake)
                        log.info("%s: %s", pack_id, ", ".join(r.unit_id for r in rows))
                reconcile_pools()  # slurm
                outcomes = scheduler.wait(timeout=1.0)
                if outcomes or time.monotonic() - last_drain > 1.0:
                    drain()  # before finishing: worker notes belong to the attempt that just ended
                    last_drain = time.monotonic()
                for outcome in outcomes:
                    finish(outcome)
                    imitation.note_unit_finished()
                if outcomes and on_progress is not None:
                    on_progress(store.counts())
            if no_space is None:
                drain()
        except KeyboardInterrupt:
            interrupted = True
            scheduler.cancel_all()
            imitation.interrupt()
            n = store.requeue_interrupted("driver interrupted")
            log.warning("interrupted: %d running units back to pending; `pianoforge resume %s` continues",
                        n, paths.name)
        except Exception as e:  # noqa: BLE001 - only a full disk is handled here; the rest is raised
            no_space = disk_full(e, paths=(paths.dir,))
            if no_space is None:
                raise
        if no_space is not None:
            scheduler.cancel_all()
            imitation.interrupt()
            with _unless_disk_full():  # else `resume` puts them back, uncounted, the same way
                store.requeue_interrupted(f"stopped: {no_space}")
            log.error("%s: stopped; `pianoforge resume %s` continues", no_space, paths.name)
    except Exception as e:  # noqa: BLE001 - a full disk while starting (store, MLflow): stop the same way
        no_space = disk_full(e, paths=(paths.dir,))
        if no_space is None:
            raise
    finally:
        if pools is not None:  # slurm: no pool job outlives the driver
            pools.shutdown()
        counts = store.counts()
        overhead = _logging_overhead(store)
        sink_stats: dict[str, Any] = {}
        behind = None
        if sink is not None:
            try:
                closed = ray.get(sink.close.remote(
                    "KILLED" if interrupted or no_space else ("FAILED" if counts[FAILED] else "FINISHED"),
                    {**{f"units_{k}": v for k, v in counts.items()}, "logging_overhead": overhead},
                    cfg.mlflow.close_timeout_s), timeout=cfg.mlflow.close_timeout_s + 120)
                with _unless_disk_full():
                    record_runs(store, closed["runs"])
                sink_stats, behind = closed["stats"], closed["behind"]
            except Exception as e:  # the campaign's state is in the store; MLflow is a view of it
                behind = f"closing the metrics sink failed ({e}); `pianoforge mlflow sync {paths.name}` delivers what is left"
            if behind:
                log.warning(behind)
        with _unless_disk_full():
            store.log_event("driver_stop", f"attempts={attempts_run} interrupted={interrupted}"
                                           + (f" no_space={no_space.filename}" if no_space else ""))
        launches = store.get_meta(LAUNCHES_KEY) or []
        logging.getLogger("orchestrator").removeHandler(handler)
        handler.close()
        if started_ray:
            ray.shutdown()
        experiment_id, parent_run_id = store.get_meta("mlflow_experiment_id"), store.get_meta("mlflow_parent_run_id")
    return CampaignSummary(name=paths.name, dir=paths.dir, counts=counts, attempts_run=attempts_run,
                           seconds=time.perf_counter() - t_start, tracking_uri=uri,
                           experiment_id=experiment_id and str(experiment_id), parent_run_id=parent_run_id and str(parent_run_id),
                           logging_overhead=overhead, sink_stats=sink_stats, interrupted=interrupted,
                           imitation=launches[-1] if launches else None, no_space=no_space,
                           tracking_behind=behind)


class _QuietFileHandler(logging.FileHandler):
    """The driver log: a line that cannot be written (full disk) is dropped, not printed as a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


@contextlib.contextmanager
def _unless_disk_full():
    """Skip a bookkeeping write that a full disk refuses (SQLite rolls it back); raise anything else."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        if disk_full(e) is None:
            raise


def _next_pack(queue: deque, store: CampaignStore, size: int) -> list:
    """Up to ``size`` pending units from the front of ``queue`` that can share one pack: the
    same config and the same overrides (one learner, one set of network settings). Units
    taken leave the queue; the others keep their places. Empty when the front was not pending."""
    rows = []
    while queue and not rows:
        row = store.unit(queue.popleft())
        if row.state == PENDING:
            rows.append(row)
    if not rows or size == 1:
        return rows
    key = (rows[0].config_key, json.dumps(rows[0].spec.overrides, sort_keys=True))
    kept = deque()
    while queue and len(rows) < size:
        row = store.unit(queue.popleft())
        if row.state != PENDING:
            continue
        if (row.config_key, json.dumps(row.spec.overrides, sort_keys=True)) == key:
            rows.append(row)
        else:
            kept.append(row.unit_id)
    queue.extendleft(reversed(kept))
    return rows


def _logging_overhead(store: CampaignStore) -> float | None:
    """Share of finished units' worker time spent in the metrics callback."""
    row = store.db.execute(
        f"SELECT SUM(report_seconds), SUM(seconds) FROM units WHERE state IN ({','.join('?' * len(FINISHED))})"
        " AND report_seconds IS NOT NULL", FINISHED).fetchone()
    return row[0] / row[1] if row and row[1] else None
