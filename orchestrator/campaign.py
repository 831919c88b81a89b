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
import dataclasses
import json
import logging
import math
import os
import re
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from filelock import FileLock, Timeout

import configs
from configs.files import NoSpaceError, disk_full
from orchestrator.gate import LAUNCHES_KEY, Gate
from orchestrator.store import FAILED, FINISHED, GATED, PENDING, RUNNING, SUCCEEDED, CampaignStore
from workers import fencing
from workers.fencing import Fence
from workers.lake import Lake
from workers.units import UnitResult, UnitSpec
from configs.files import write_text_atomic

log = logging.getLogger(__name__)
POOL_TAGS_KEY = "slurm_pool_tags"  # store meta: the job-name tags of every pool manager a driver of this campaign started

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
UNIT_VIDEO = "rollout.mp4"  # a finished unit's clip, logged to its MLflow run with specialist.video


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


# What ``resume`` applies: the driver's settings. Units run with the config they were submitted
# with (env, droq, specialist, lake, campaign.synthetic), so overriding those on resume would be
# accepted and ignored: they are refused instead.
RESUME_SECTIONS = ("campaign", "mlflow", "gate", "il", "slurm", "ray")
RESUME_KEPT = ("campaign.synthetic",)


def check_resume_overrides(overrides: list[str]) -> None:
    """Raise :class:`configs.ConfigError` naming the first override that ``resume`` would not apply."""
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        applied = key.split(".")[0] in RESUME_SECTIONS and not any(key == k or key.startswith(k + ".") for k in RESUME_KEPT)
        if not applied:
            raise configs.ConfigError(
                f"--set {text}: resume does not apply '{key}': each unit keeps the config it was submitted with; "
                f"resume applies only {', '.join(s + '.*' for s in RESUME_SECTIONS)} "
                f"(not {', '.join(k + '.*' for k in RESUME_KEPT)}). Submit the manifest again with the new "
                "setting to train new units")


def load_saved_config(paths: CampaignPaths, overrides: list[str] | None = None) -> configs.Config:
    """The campaign's saved config.yaml with ``overrides`` applied (only those ``resume`` applies,
    see :data:`RESUME_SECTIONS`; others raise :class:`configs.ConfigError`)."""
    check_resume_overrides(overrides or [])
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
    return _Driver(paths, store, cfg, on_progress).run(ray_address, num_cpus, restart_failed_il)


class _Driver:
    """One run of the campaign driver. ``run`` is the whole of it, top to bottom: start Ray,
    the metrics sink and (with ``--profile slurm``) the SLURM pools; then loop until no unit is
    left and the imitation job has ended: launch pending units (alone or in packs), keep the
    pools sized, refill packs' freed slots, take finished attempts; then close the books. The
    steps are the methods below it."""

    def __init__(self, paths: CampaignPaths, store: CampaignStore, cfg: configs.Config,
                 on_progress: Callable[[dict[str, int]], None] | None):
        self.paths, self.store, self.cfg, self.on_progress = paths, store, cfg, on_progress
        self.sink = None  # orchestrator.tracking.MetricsSink actor
        self._videos = None  # renders finished units' clips (specialist.video)
        self.feed = None  # orchestrator.scheduler.PackFeed actor (campaign.pack_refill)
        self.pools = None  # slurm: the PoolManager when the profile names SLURM pools
        self.pool: str | None = None
        self.last_reconcile = 0.0
        self.dir_probe = None  # slurm: a task on the first pool node that checks it sees the campaign directory
        self.attempts_run = 0
        self.interrupted = False
        self.no_space: NoSpaceError | None = None
        self.queue: deque[str] = deque()
        # Attempts whose worker died on a node Ray still lists: unit id -> (outcome, until when
        # to wait for Ray to declare the node dead), settled by _settle_suspects.
        self.suspects: dict[str, tuple[Any, float]] = {}
        self.last_node_check = 0.0  # _abandon_dead_nodes
        self.config_dicts: dict[str, dict] = {}
        self.pack_keys: dict[str, tuple] = {}  # pack id -> what a unit must share to join it (_pack_key)
        self.rates = _StepRates()
        self.last_drain = time.monotonic()
        self.last_behind_warning = -math.inf
        self.last_resources = -math.inf
        self.resources_seen: dict | None = None  # the last resource view recorded for status

    # --- the driver, top to bottom ---------------------------------------------------------
    def run(self, ray_address: str | None, num_cpus: int | None, restart_failed_il: bool) -> CampaignSummary:
        from orchestrator import scheduler as sched_mod
        from orchestrator.tracking import tracking_uri_for

        paths, store = self.paths, self.store
        t_start = time.perf_counter()
        handler = _QuietFileHandler(paths.logs / "driver.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("orchestrator").addHandler(handler)
        started_ray = sched_mod.connect(ray_address, num_cpus=num_cpus, ray_cfg=self.cfg.ray)
        self.uri = tracking_uri_for(self.cfg.mlflow, paths.dir)
        try:
            self._start(restart_failed_il)
            try:
                # Until no unit is left and the imitation job (if the gate launched one) has ended, or a disk is full.
                while self.no_space is None and (self.imitation.step(units_left=self._units_left()) or self._units_left()):
                    self._launch()
                    self._note_resources()
                    self._reconcile_pools()  # slurm
                    self._check_shared_dir()  # slurm
                    asks, outcomes = self._poll_feed()
                    outcomes += self.scheduler.wait(timeout=0.25 if self.feed is not None else 1.0)
                    outcomes += self._abandon_dead_nodes()
                    if outcomes or time.monotonic() - self.last_drain > 1.0:
                        self._drain()  # before finishing: worker notes belong to the attempt that just ended
                    for outcome in outcomes + self._settle_suspects():
                        self._finish(outcome)
                        self.imitation.note_unit_finished()
                    self._refill(asks)  # after finishing: a retry can go straight into a freed slot
                    if outcomes and self.on_progress is not None:
                        self.on_progress(store.counts())
                if self.no_space is None:
                    self._drain()
            except KeyboardInterrupt:
                self.interrupted = True
                n = self._stop_in_flight("driver interrupted")
                log.warning("interrupted: %d running units back to pending; `pianoforge resume %s` continues",
                            n, paths.name)
            except Exception as e:  # noqa: BLE001 - only a full disk is handled here; the rest is raised
                self.no_space = disk_full(e, paths=(paths.dir,))
                if self.no_space is None:
                    raise
            if self.no_space is not None:
                with _unless_disk_full():  # else `resume` puts them back, uncounted, the same way
                    self._stop_in_flight(f"stopped: {self.no_space}")
                log.error("%s: stopped; `pianoforge resume %s` continues", self.no_space, paths.name)
        except Exception as e:  # noqa: BLE001 - a full disk while starting (store, MLflow): stop the same way
            self.no_space = disk_full(e, paths=(paths.dir,))
            if self.no_space is None:
                raise
        finally:
            counts, overhead, sink_stats, behind = self._close()
            logging.getLogger("orchestrator").removeHandler(handler)
            handler.close()
            if started_ray:
                import ray

                ray.shutdown()
        launches = store.get_meta(LAUNCHES_KEY) or []
        experiment_id, parent_run_id = store.get_meta("mlflow_experiment_id"), store.get_meta("mlflow_parent_run_id")
        return CampaignSummary(name=paths.name, dir=paths.dir, counts=counts, attempts_run=self.attempts_run,
                               seconds=time.perf_counter() - t_start, tracking_uri=self.uri,
                               experiment_id=experiment_id and str(experiment_id),
                               parent_run_id=parent_run_id and str(parent_run_id),
                               logging_overhead=overhead, sink_stats=sink_stats, interrupted=self.interrupted,
                               imitation=launches[-1] if launches else None, no_space=self.no_space,
                               tracking_behind=behind)

    # --- the steps -------------------------------------------------------------------------
    def _start(self, restart_failed_il: bool) -> None:
        import ray

        from orchestrator import scheduler as sched_mod
        from orchestrator.gate import ImitationLauncher
        from orchestrator.tracking import artifact_location_for, known_runs, start_sink

        paths, store, cfg = self.paths, self.store, self.cfg
        self._refuse_unschedulable()
        store.set_meta("ray_dashboard_url", sched_mod.dashboard_url())  # status and the dashboard link to it
        # Tracking goes through the campaign's outbox: nothing here waits for the tracking server.
        self.sink = start_sink(paths.dir, self.uri, paths.name, artifact_location_for(self.uri, paths.dir), cfg.mlflow)
        ray.get(self.sink.open_campaign.remote(paths.name, cfg.to_dict(), paths.config.read_text(),
                                               cfg.mlflow.system_metrics, known_runs(store, self.uri)))
        store.set_meta("tracking_uri", self.uri)
        store.log_event("driver_start", f"pid={os.getpid()} host={socket.gethostname()}")
        self.scheduler = sched_mod.Scheduler(cfg, cfg.campaign.workload, self.sink)
        if cfg.campaign.pack_size > 1 and cfg.campaign.pack_refill:
            self.feed = sched_mod.start_feed()
        # --- slurm: pool jobs that join this Ray head and follow the queue (--profile slurm) ---------
        if cfg.slurm.pools:
            from slurm.pools import SlurmError, pool_for_units, start_for_campaign, unit_resources

            self.pool = pool_for_units(cfg.slurm, cfg.campaign.gpus_per_unit)
            earlier = store.get_meta(POOL_TAGS_KEY) or []
            self.pools = start_for_campaign(cfg, ray.get_runtime_context().gcs_address, paths.logs / "slurm", earlier)
            store.set_meta(POOL_TAGS_KEY, earlier + [self.pools.tag])
            probe, token = paths.dir / ".node-probe", uuid.uuid4().hex
            write_text_atomic(probe, token)
            self.dir_probe = ray.remote(sched_mod.sees_file).options(
                num_cpus=0, resources=unit_resources(self.pool), max_retries=-1).remote(str(probe), token)
            # Pool jobs of a driver that died are cancelled, not adopted: their nodes joined its head.
            try:
                if cancelled := self.pools.cancel_earlier_jobs():
                    store.log_event("pool_jobs_cancelled", f"{len(cancelled)} pool jobs of an earlier driver: "
                                                           + ", ".join(cancelled))
                store.set_meta(POOL_TAGS_KEY, [self.pools.tag])
            except SlurmError as e:  # the next driver tries again
                log.warning("could not cancel the pool jobs of an earlier driver: %s", e)
            self.scheduler.extra_resources = unit_resources(self.pool)
            self.scheduler.pool = cfg.slurm.pools[self.pool]
        # --- end slurm ---------------------------------------------------------------------------------
        self.imitation = ImitationLauncher(cfg, store, paths.dir, paths.lake, self.uri, paths.name)
        self.imitation.restart_unfinished(include_failed=restart_failed_il)
        self.queue = deque(store.unit_ids(PENDING))
        if self.on_progress is not None:
            self.on_progress(store.counts())

    def _refuse_unschedulable(self) -> None:
        """Stop before anything starts when no node (or SLURM pool job) could ever hold one launch:
        Ray would queue it forever. The units stay pending."""
        from orchestrator.scheduler import unschedulable

        pool = None
        if self.cfg.slurm.pools:
            from slurm.pools import pool_for_units

            pool = pool_for_units(self.cfg.slurm, self.cfg.campaign.gpus_per_unit)
        problem = unschedulable(self.cfg, pool)
        if problem is not None:
            self.store.log_event("unschedulable", problem)
            raise CampaignError(f"campaign {self.paths.name}: {problem}. Its units stay pending: "
                                f"`pianoforge resume {self.paths.name} --set SETTING=VALUE` runs them")

    def _note_resources(self) -> None:
        """Each second while attempts are in flight: what one launch needs and what the cluster
        offers, for ``pianoforge status`` (written when it changed); a warning when no node can
        hold a launch any more (the nodes that could have left)."""
        if not len(self.scheduler) or time.monotonic() - self.last_resources < 1.0:
            return
        from orchestrator.status import RESOURCES_KEY, describe_wait

        self.last_resources = time.monotonic()
        view = self.scheduler.resource_view()
        if view == self.resources_seen:
            return
        if view["nodes"] and not view["fits"] and (self.resources_seen or {}).get("fits", False):
            log.warning("no node of the Ray cluster can hold a launch now: %s", describe_wait(view))
        self.store.set_meta(RESOURCES_KEY, view)
        self.resources_seen = view

    def _units_left(self) -> bool:
        return bool(self.queue or len(self.scheduler) or self.suspects)

    def _launch(self) -> None:
        """Pending units out to Ray while there is room: alone, or ``campaign.pack_size`` at a time."""
        paths, store, scheduler = self.paths, self.store, self.scheduler
        while self.queue and scheduler.has_room():
            rows = _next_pack(self.queue, store, scheduler.pack_size)
            if not rows:
                continue
            pack_id = None
            if scheduler.pack_size > 1:
                packs_launched = int(store.get_meta("packs_launched", 0)) + 1
                store.set_meta("packs_launched", packs_launched)
                pack_id = f"pack-{packs_launched}"
                self.pack_keys[pack_id] = _pack_key(rows[0])
            fences = [self._mark_running(row, pack_id) for row in rows]
            row = rows[0]
            if row.config_key not in self.config_dicts:
                self.config_dicts[row.config_key] = store.get_config(row.config_key)
            config_ref = scheduler.config_ref(row.config_key, self.config_dicts[row.config_key])
            if pack_id is None:
                scheduler.launch(row.unit_id, row.spec_json, config_ref, paths.unit_dir(row.unit_id), paths.lake,
                                 fences[0])
            else:
                scheduler.launch_pack(pack_id, [r.unit_id for r in rows], [r.spec_json for r in rows], config_ref,
                                      [paths.unit_dir(r.unit_id) for r in rows], paths.lake, self.feed, fences)
                log.info("%s: %s", pack_id, ", ".join(r.unit_id for r in rows))

    def _mark_running(self, row, pack_id: str | None) -> Fence:
        """A new attempt of ``row``'s unit: its fencing token is issued (written to the unit
        directory) before it is recorded and launched, so an older attempt's writes fail from now on."""
        fence = fencing.issue(self.paths.unit_dir(row.unit_id), row.unit_id, after=row.attempt_token)
        attempt = self.store.mark_running(row.unit_id, pack_id, token=fence.token)
        self.attempts_run += 1
        self.sink.open_unit.remote(row.unit_id, _unit_params(row),
                                   {"state": "running", "attempt": attempt, **({"pack_id": pack_id} if pack_id else {})})
        return fence

    def _poll_feed(self) -> tuple[list[tuple[str, int]], list]:
        """Packs' requests for their freed slots, and the members' outcomes they sent ahead (as
        ``Outcome``s, each once: a pack that ended or died first has accounted for it)."""
        if self.feed is None:
            return [], []
        import ray
        import ray.exceptions

        try:
            asks, sent = ray.get(self.feed.poll.remote(), timeout=60)
        except (ray.exceptions.RayError, TimeoutError) as e:  # packs wait; their other slots go on
            log.warning("pack feed did not answer: %s", e)
            return [], []
        return asks, [o for pack_id, member in sent if (o := self.scheduler.member_outcome(pack_id, member)) is not None]

    def _refill(self, asks: list[tuple[str, int]]) -> None:
        """Each freed slot gets the next pending unit of its pack's config, or None: no more work
        for it (the slot idles; the pack ends when all of its slots have)."""
        for pack_id, slot in asks:
            assignment = None
            if self.scheduler.pack_running(pack_id) and self.no_space is None:
                rows = _next_pack(self.queue, self.store, 1, key=self.pack_keys[pack_id])
                if rows:
                    row = rows[0]
                    fence = self._mark_running(row, pack_id)
                    self.scheduler.join_pack(pack_id, row.unit_id)
                    assignment = {"spec_json": row.spec_json, "unit_dir": str(self.paths.unit_dir(row.unit_id)),
                                  "fence": fence}
                    log.info("%s: slot %d refilled with %s", pack_id, slot, row.unit_id)
            self.feed.answer.remote(pack_id, slot, assignment)

    def _check_shared_dir(self) -> None:
        """slurm: once the first pool node has answered, raise unless it sees the campaign directory."""
        if self.dir_probe is None:
            return
        import ray

        if not ray.wait([self.dir_probe], timeout=0)[0]:
            return
        probe, self.dir_probe = self.dir_probe, None
        try:
            host, sees = ray.get(probe)
        except Exception as e:  # noqa: BLE001 - the node went away: the units will tell
            log.warning("could not check that pool nodes see %s: %s", self.paths.dir, e)
            return
        if not sees:
            raise CampaignError(
                f"pool node {host} does not see the campaign directory {self.paths.dir}: put the campaign root on a "
                "file system every node mounts at the same path (see docs/cluster.md, 'Many hosts')")

    def _reconcile_pools(self) -> None:
        """slurm: pool jobs follow the queue. Units in flight count as running (never cancel a node
        that may hold one); the rest wait."""
        if self.pools is None or time.monotonic() - self.last_reconcile < self.cfg.slurm.poll_interval_s:
            return
        from slurm.pools import imitation_jobs

        # An imitation job in flight holds (or waits for) whole jobs for its DDP workers.
        reserved = dict([imitation_jobs(self.cfg)]) if self.imitation.ref is not None else {}
        self.pools.reconcile({self.pool: len(self.queue)}, {self.pool: len(self.scheduler)}, reserved)
        self.last_reconcile = time.monotonic()

    def _drain(self) -> None:
        """Workers' notes (where each attempt runs, its steps and checkpoints, its MLflow runs)
        into the store."""
        import ray
        import ray.exceptions

        from orchestrator.tracking import record_runs

        self.last_drain = time.monotonic()
        try:
            notes = ray.get(self.sink.drain.remote(), timeout=60)
        except (ray.exceptions.RayError, TimeoutError) as e:  # tracking must not stop the campaign
            log.warning("metrics sink did not answer: %s", e)
            return
        store = self.store
        for n in notes["started"]:
            if self._trusted(n["unit_id"], n.get("attempt_token"), "start note"):
                store.note_worker(n["unit_id"], n.get("hostname"), n.get("node_id"), n.get("pid"), n.get("slurm_job_id"))
        for unit_id, (step, ckpt, token) in notes["progress"].items():
            if self._trusted(unit_id, token, "progress"):
                store.note_progress(unit_id, step, ckpt, self.rates.note(unit_id, step))
        record_runs(store, notes["runs"])
        if notes["behind"] and time.monotonic() - self.last_behind_warning >= 60.0:  # one line a minute at most
            log.warning(notes["behind"])
            self.last_behind_warning = time.monotonic()

    def _trusted(self, unit_id: str, token: int | None, what: str) -> bool:
        """Whether a worker's ``what`` comes from the attempt of ``unit_id`` the driver trusts now
        (its fencing token is the unit's current one, ``workers.fencing``); a stale attempt's
        is dropped with a warning. Unfenced notes (token None) are the current attempt's."""
        current = self.store.unit(unit_id).attempt_token
        if token is None or token == current:
            return True
        log.warning("unit %s: %s of a stale attempt (token %s; the driver trusts token %s) ignored",
                    unit_id, what, token, current)
        return False

    def _abandon_dead_nodes(self) -> list:
        """Attempts in flight on a node Ray has declared dead, as ``node_lost`` outcomes (checked
        every few seconds): a node cut off by a partition is declared dead, but the call to it
        may not fail for long after, and its units must run elsewhere meanwhile."""
        if not len(self.scheduler) or time.monotonic() - self.last_node_check < 2.0:
            return []
        self.last_node_check = time.monotonic()
        alive = _alive_nodes()
        outcomes = []
        for row in self.store.units([RUNNING]):
            if row.node_id and row.node_id not in alive and row.unit_id not in self.suspects \
                    and all(o.unit_id != row.unit_id for o in outcomes):
                outcomes += self.scheduler.abandon(row.unit_id, f"NodeDiedError: Ray declared node {row.node_id} "
                                                                f"({row.hostname}) dead while the attempt ran there")
        return outcomes

    def _settle_suspects(self) -> list:
        """Suspected attempts now due: their node died (``node_lost``), or Ray kept it alive for
        ``campaign.node_loss_wait_s`` (the unit's fault after all: kind ``unit``)."""
        due = []
        alive = _alive_nodes() if self.suspects else set()  # one look at Ray per loop, not one per suspect
        for unit_id, (outcome, until) in list(self.suspects.items()):
            dead = self.store.unit(unit_id).node_id not in alive
            if dead or time.monotonic() >= until:
                del self.suspects[unit_id]
                due.append(dataclasses.replace(outcome, error_kind="node_lost" if dead else "unit"))
        return due

    def _lost_with_node(self, outcome, row) -> bool | None:
        """Whether a failed attempt died with its node (None: not known yet, wait). A dead worker
        on a live node is the unit's fault, except on a pool node, where the worker may have died
        first: Ray declares the node dead only after its health checks fail."""
        if outcome.error_kind == "node_lost":
            return True
        if outcome.error_kind != "system" or not row.node_id:
            return False
        import ray

        if row.node_id not in _alive_nodes():
            return True
        if row.node_id == ray.get_runtime_context().get_node_id() or self.cfg.campaign.node_loss_wait_s <= 0:
            return False  # the driver's own node is not lost while the driver runs
        self.suspects[row.unit_id] = (outcome, time.monotonic() + self.cfg.campaign.node_loss_wait_s)
        return None

    def _finish(self, outcome) -> None:
        """A finished attempt: the unit succeeded or was gated, or its failure is retried from its
        checkpoint (to the back of the queue) or, out of attempts, it failed. An attempt lost
        with its node goes to the front of the queue, uncounted. A stale attempt's outcome
        changes nothing."""
        cfg, store, sink = self.cfg, self.store, self.sink
        if not self._trusted(outcome.unit_id, outcome.token, "outcome"):
            return
        if outcome.error_kind == "disk_full":  # not the unit's fault: left running, requeued uncounted later
            log.error("unit %s: %s", outcome.unit_id, outcome.no_space)
            self.no_space = self.no_space or outcome.no_space
            return
        unit_id = outcome.unit_id
        if outcome.result is None:
            row = store.unit(unit_id)
            lost = self._lost_with_node(outcome, row)
            if lost is None:
                return  # settled by _settle_suspects
            if lost:
                # From now on the lost attempt is not trusted: what its processes still write (a node
                # cut off by a partition goes on running) is refused, even before the retry starts.
                store.revoke_attempt(unit_id, fencing.issue(self.paths.unit_dir(unit_id), unit_id,
                                                            after=row.attempt_token).token)
                steps = store.mark_node_lost(unit_id, outcome.error)
                if self.pools is not None and row.slurm_job_id:
                    self.pools.node_lost(row.slurm_job_id)  # replaced at once, before Ray's health checks agree
                    self.last_reconcile = 0.0
                log.warning("unit %s: its node was lost (%s); %d steps since its checkpoint lost; retrying elsewhere, "
                            "the attempt not counted", unit_id, outcome.error.splitlines()[0], steps)
                self.rates.forget(unit_id)
                self.queue.appendleft(unit_id)
                return
        self.rates.forget(unit_id)  # a retry is a new attempt
        row = store.unit(unit_id)
        tags = {"attempt": row.attempts, "hostname": row.hostname, "node_id": row.node_id,
                "slurm_job_id": row.slurm_job_id}
        if outcome.result is not None:
            res = outcome.result
            result = UnitResult(**{k: res[k] for k in UnitResult.model_fields if k in res})
            state = SUCCEEDED if Gate(cfg.gate).passes(result.f1) else GATED
            store.mark_finished(unit_id, result, state, res.get("report_seconds"))
            overhead = res.get("report_seconds", 0.0) / result.seconds if result.seconds > 0 else None
            sink.finish_unit.remote(unit_id, "FINISHED", {
                "return": result.episode_return, "f1": result.f1, "precision": result.precision,
                "recall": result.recall, "env_steps_per_s": result.env_steps_per_s,
                "updates_per_s": result.updates_per_s, "seconds": result.seconds,
                "logging_overhead": overhead, "stop_step": result.stop_step, "budget_steps": result.budget_steps,
                "eval_share": result.eval_seconds / result.seconds if result.seconds > 0 else None},
                {**tags, "state": state, "stop_reason": result.stop_reason})
            if cfg.specialist.video:
                self._log_video(unit_id)
            return
        retry = row.attempts < cfg.campaign.max_attempts
        new_state = store.mark_attempt_failed(unit_id, outcome.error, retry)
        log.warning("unit %s attempt %d failed (%s)%s: %s", unit_id, row.attempts, outcome.error_kind,
                    "; retrying from its checkpoint" if retry else "; no attempts left",
                    outcome.error.splitlines()[0])
        if retry:
            self.queue.append(unit_id)  # to the back: a bad unit does not hold up the others
        else:
            sink.finish_unit.remote(unit_id, "FAILED", {}, {**tags, "state": new_state,
                                                            "error": outcome.error.splitlines()[0][:500]})

    def _stop_in_flight(self, why: str) -> int:
        """Cancel every attempt in flight and the imitation job; running units back to pending,
        uncounted."""
        self.scheduler.cancel_all()
        self.imitation.interrupt()
        return self.store.requeue_interrupted(why)

    def _log_video(self, unit_id: str) -> None:
        """Render the finished unit's best rollout to ``units/<id>/rollout.mp4`` in the background
        and log it to the unit's MLflow run (``specialist.video``). A clip that cannot be made is a
        warning, never the unit's failure."""
        from concurrent.futures import ThreadPoolExecutor

        def render() -> None:
            from orchestrator.playback import render_unit, resolve_unit

            try:
                out = self.paths.unit_dir(unit_id) / UNIT_VIDEO
                render_unit(resolve_unit(self.paths.unit_dir(unit_id)), out, soundfont=self.cfg.dashboard.soundfont)
                self.sink.log_file.remote(unit_id, str(out))
            except Exception as e:  # noqa: BLE001 - a video is a bonus; the unit has finished
                log.warning("unit %s: no video for its MLflow run: %s", unit_id, e)

        if self._videos is None:
            self._videos = ThreadPoolExecutor(1, thread_name_prefix="unit-video")  # the renderer is a child process
        self._videos.submit(render)

    def _close(self) -> tuple[dict[str, int], float | None, dict[str, Any], str | None]:
        """No pool job outlives the driver; the campaign's MLflow run closes with its counts.
        Returns (counts, logging overhead, sink statistics, what MLflow has not received)."""
        import ray

        from orchestrator.tracking import record_runs, sync_hint

        if self.pools is not None:
            self.pools.shutdown()
        if self._videos is not None:  # the clips reach the outbox before it closes
            self._videos.shutdown(wait=True)
        store = self.store
        counts = store.counts()
        overhead = _logging_overhead(store)
        sink_stats: dict[str, Any] = {}
        behind = None
        if self.sink is not None:
            timeout = self.cfg.mlflow.close_timeout_s
            status = "KILLED" if self.interrupted or self.no_space else ("FAILED" if counts[FAILED] else "FINISHED")
            try:
                closed = ray.get(self.sink.close.remote(
                    status, {**{f"units_{k}": v for k, v in counts.items()}, "logging_overhead": overhead}, timeout),
                    timeout=timeout + 120)
                with _unless_disk_full():
                    record_runs(store, closed["runs"])
                sink_stats, behind = closed["stats"], closed["behind"]
            except Exception as e:  # the campaign's state is in the store; MLflow is a view of it
                behind = f"closing the metrics sink failed ({e}); {sync_hint(self.paths.name)}"
            if behind:
                log.warning(behind)
        with _unless_disk_full():
            store.log_event("driver_stop", f"attempts={self.attempts_run} interrupted={self.interrupted}"
                                           + (f" no_space={self.no_space.filename}" if self.no_space else ""))
        return counts, overhead, sink_stats, behind


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


def _pack_key(row) -> tuple[str, str]:
    """What units must share to train in one pack: the config and the overrides (one learner,
    one set of network settings)."""
    return row.config_key, json.dumps(row.spec.overrides, sort_keys=True)


def _next_pack(queue: deque, store: CampaignStore, size: int, key: tuple[str, str] | None = None) -> list:
    """Up to ``size`` pending units from the front of ``queue`` that can share one pack: the
    first pending unit's ``_pack_key``, or ``key`` when refilling a pack's slot. Units taken
    leave the queue, units no longer pending are dropped from it, the others keep their places."""
    rows, kept = [], deque()
    while queue and len(rows) < size:
        row = store.unit(queue.popleft())
        if row.state != PENDING:
            continue
        if key is None:
            key = _pack_key(row)
        if _pack_key(row) == key:
            rows.append(row)
        else:
            kept.append(row.unit_id)
    queue.extendleft(reversed(kept))
    return rows


def _alive_nodes() -> set[str]:
    """The ids of the nodes Ray lists as alive (an unknown id, or None, is not among them)."""
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def _logging_overhead(store: CampaignStore) -> float | None:
    """Share of finished units' worker time spent in the metrics callback."""
    row = store.db.execute(
        f"SELECT SUM(report_seconds), SUM(seconds) FROM units WHERE state IN ({','.join('?' * len(FINISHED))})"
        " AND report_seconds IS NOT NULL", FINISHED).fetchone()
    return row[0] / row[1] if row and row[1] else None
