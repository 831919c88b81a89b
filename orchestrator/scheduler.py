"""Running units on Ray: connect to (or start) a cluster, launch one task per unit attempt (or
per pack of ``campaign.pack_size`` unit attempts) with the resources the config declares, and
hand back finished attempts as ``Outcome``s, one per unit.

A pack is one Ray task holding ``CampaignConfig.pack_resources()``; it returns each member's
result or error, so a member that failed is retried alone while the others succeed. When the
pack's process dies (killed, out of memory, node lost) every member's attempt fails with that
error and each is retried from its own checkpoint.

What one launch asks of Ray (``launch_needs``) is checked before anything runs
(``unschedulable``): when no node of the cluster, or on SLURM pools no job of the unit's pool,
can ever hold it, the campaign is refused with the settings that ask for it. Launches that only
wait for busy resources stay queued; ``Scheduler.resource_view`` says what they wait for (the
driver records it for ``pianoforge status``).

With ``campaign.pack_refill`` a pack does not wait for its slowest member: each member's
outcome comes back through the campaign's ``PackFeed`` actor as soon as it is final, and the
freed slot asks the driver for the next pending unit of the pack's config (``RayRefill`` on the
worker side; on the driver's, ``orchestrator.campaign``'s ``_poll_feed`` and ``_refill``, which
hands the unit over and records it with ``Scheduler.join_pack``). A unit handed to a pack joins
its members here, so a pack that dies fails (and retries) exactly the units it held at that moment.

Attempts are counted by the campaign store, not by Ray: tasks run with ``max_retries=0`` and
``retry_exceptions=False``, and every failure (an exception inside the unit, a worker process
or node that died) comes back to the driver, which decides whether to retry. A full disk is
the node's fault, not the unit's: it comes back as kind ``disk_full`` and costs no attempt; so
does an attempt whose node was lost (kind ``node_lost``, or a dead worker on a node Ray then
declares dead).

Each attempt carries the fencing token the driver issued for it (``workers.fencing``): the
worker side holds it while the unit runs, so the unit's commits check it, and tags its start
note, its progress and its outcome with it, so the driver can ignore a stale attempt's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.exceptions

import configs
from configs.files import NoSpaceError, disk_full
from orchestrator.status import resource_amount as _amount
from slurm.raynode import JOB_LABEL as SLURM_JOB_LABEL
from workers import fencing
from workers.fencing import Fence
from workers.units import Arrival, MemberOutcome, Refill, UnitResult, UnitSpec

log = logging.getLogger(__name__)

WORKLOADS = {
    "specialist": ("workers.rl.pack", "train_unit"),
    "synthetic": ("workers.synthetic", "run_unit"),
}
PACK_WORKLOADS = {
    "specialist": ("workers.rl.pack", "run_pack"),
    "synthetic": ("workers.synthetic", "run_pack"),
}
# Pack processes run a multi-threaded learner beside their environment workers: OpenMP threads
# must sleep, not spin, while they wait (set before torch is imported in the worker process).
PACK_ENV_VARS = {"OMP_WAIT_POLICY": "PASSIVE"}
ERROR_CHARS = 4000  # how much of a traceback the store keeps: the end, where the cause is


def connect(address: str | None = None, num_cpus: int | None = None, ray_cfg: configs.RayConfig | None = None) -> bool:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``), else start one in this process,
    with Ray's dashboard on ``ray.dashboard_host:dashboard_port`` when ``ray.dashboard`` is on
    (:func:`dashboard_url` says where it ended up).

    Token authentication stays as Ray sets it (on by default for a new local cluster).
    Returns True when this call started Ray (so the caller shuts it down).
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:  # the head's own settings decide its dashboard
        ray.init(address=address, log_to_driver=False)
    else:
        ray_cfg = ray_cfg or configs.load().ray
        port = ray_cfg.dashboard_port
        if ray_cfg.dashboard and port and not _port_free(ray_cfg.dashboard_host, port):
            log.warning("Ray dashboard port %s:%d is taken (another Ray on this machine?); using a free one",
                        ray_cfg.dashboard_host, port)
            port = 0  # Ray refuses to start on a taken dashboard port; 0 lets it pick
        ray.init(num_cpus=num_cpus, log_to_driver=False, include_dashboard=ray_cfg.dashboard,
                 dashboard_host=ray_cfg.dashboard_host, dashboard_port=port,
                 _node_ip_address=ray_cfg.node_ip_address or None)
    return True


def sees_file(path: str, text: str) -> tuple[str, bool]:
    """(this host's name, whether ``path`` holds ``text``): run on a node to check that it sees
    the driver's files (a shared file system mounted at the same path)."""
    try:
        return socket.gethostname(), Path(path).read_text() == text
    except OSError:
        return socket.gethostname(), False


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def dashboard_url() -> str | None:
    """``http://host:port`` of the Ray dashboard of the cluster this process is connected to, or
    None (not connected, or the cluster runs no dashboard)."""
    if not ray.is_initialized():
        return None
    try:
        from ray._private.worker import get_dashboard_url  # what ray.init's context reports, for any caller

        url = get_dashboard_url()
    except Exception:  # noqa: BLE001 - a Ray without it: the link is only a convenience
        return None
    return (url if url.startswith("http") else f"http://{url}") if url else None


def _workload(name: str, table: dict[str, tuple[str, str]] = WORKLOADS):
    if name not in table:
        raise ValueError(f"unknown workload {name!r} (known: {', '.join(table)})")
    module, func = table[name]
    return getattr(__import__(module, fromlist=[func]), func)


def _note_start(sink, unit_id: str, fence: Fence | None) -> None:
    fencing.hold(fence)  # the unit's commits in this process check it from now on
    if sink is not None:
        ctx = ray.get_runtime_context()
        sink.started.remote(unit_id, {
            "attempt_token": _token(unit_id),
            "hostname": socket.gethostname(),
            "node_id": ctx.get_node_id(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID") or _node_label(ctx, SLURM_JOB_LABEL),
        })


def _token(unit_id: str) -> int | None:
    """The fencing token this process holds for ``unit_id`` (None: not fenced)."""
    fence = fencing.held(unit_id)
    return None if fence is None else fence.token


def execute_unit(workload: str, spec_json: str, cfg_dict: dict, unit_dir: str, lake_root: str, sink,
                 fence: Fence | None = None) -> dict:
    """Worker side of one attempt: say where it runs, run the workload (given the campaign's
    config: it applies the unit's overrides, ``UnitSpec.config``), time its reporting.

    Returns ``UnitResult`` fields plus ``report_seconds`` (time spent inside the metrics
    callback) and ``attempt_token`` (``fence``'s token: the driver ignores a stale attempt's result).
    """
    unit = UnitSpec.model_validate_json(spec_json)
    cfg = configs.from_dict(cfg_dict)
    _note_start(sink, unit.unit_id, fence)
    report = Reporter(sink, unit.unit_id, cfg.mlflow.flush_interval_s)
    run = _workload(workload)
    try:
        result: UnitResult = run(unit, cfg, Path(unit_dir), Path(lake_root), report)
    except Exception as e:
        full = disk_full(e, paths=(unit_dir, lake_root))  # seen here, where the worker's disks are
        if full is not None and full is not e:
            raise full from e
        raise
    finally:
        report.close()  # metrics of a failed attempt still reach MLflow
        fencing.release(unit.unit_id)
    return {**result.model_dump(), "report_seconds": report.seconds, "attempt_token": report.token}


def execute_pack(workload: str, specs_json: list[str], cfg_dict: dict, unit_dirs: list[str], lake_root: str,
                 sink, cpus: float, feed=None, pack_id: str | None = None,
                 fences: list[Fence | None] | None = None) -> list[dict]:
    """Worker side of one pack: its members' attempts in this process (``PACK_WORKLOADS``),
    and, with a ``feed`` (``PackFeed``), the units the driver sends to refill freed slots.
    ``fences``: each member's attempt (``workers.fencing``), so each member's writes are fenced alone.

    Returns one dict per member (``member_dict``), launched or sent.
    """
    units = [UnitSpec.model_validate_json(s) for s in specs_json]
    cfg = configs.from_dict(cfg_dict)  # each member applies its own overrides
    refill = RayRefill(feed, pack_id, sink, cfg.mlflow.flush_interval_s, lake_root) if feed is not None else None
    reporters = []
    for unit, unit_dir, fence in zip(units, unit_dirs, fences or [None] * len(units)):
        _note_start(sink, unit.unit_id, fence)
        reporters.append(Reporter(sink, unit.unit_id, cfg.mlflow.flush_interval_s))
        if refill is not None:
            refill.members[unit.unit_id] = (reporters[-1], unit_dir)
    run = _workload(workload, PACK_WORKLOADS)
    try:
        outcomes = run(units, cfg, [Path(d) for d in unit_dirs], Path(lake_root), reporters, cpus,
                       **({"refill": refill} if refill is not None else {}))
    finally:
        for report in reporters + (refill.reporters() if refill is not None else []):
            report.close()  # metrics of failed members still reach MLflow
            fencing.release(report.unit_id)
    if refill is not None:
        return [refill.member_dict(o) for o in outcomes]
    return [member_dict(o, report, unit_dir, lake_root) for o, report, unit_dir in zip(outcomes, reporters, unit_dirs)]


def member_dict(outcome: MemberOutcome, report: Reporter, unit_dir: str, lake_root: str) -> dict:
    """A member's outcome as the driver reads it: ``{"unit_id", "result"}`` with ``UnitResult``
    fields plus ``report_seconds``, or ``{"unit_id", "error", "kind", "no_space"}`` with its
    traceback (kind ``disk_full`` with the ``NoSpaceError`` when a full disk caused it); both
    with the attempt's ``attempt_token``."""
    if outcome.error is not None:
        full = disk_full(outcome.error, paths=(unit_dir, lake_root))  # the node's fault, not the unit's
        return {"unit_id": outcome.unit_id, "error": _clip(outcome.error_text), "attempt_token": report.token,
                "kind": "disk_full" if full is not None else "unit", "no_space": full}
    return {"unit_id": outcome.unit_id, "attempt_token": report.token,
            "result": {**outcome.result.model_dump(), "report_seconds": report.seconds}}


class PackFeed:
    """The campaign's mailbox between its packs and its driver (``campaign.pack_refill``).

    A pack calls ``next(pack_id, slot)`` for a freed slot (the call resolves when the driver
    answers) and ``done(pack_id, member)`` with each member's outcome; the driver reads both
    with ``poll()`` and answers with ``answer(pack_id, slot, assignment)``: ``{"spec_json",
    "unit_dir", "fence"}`` or None (no more work for that slot)."""

    def __init__(self) -> None:
        self._asks: dict[tuple[str, int], asyncio.Future] = {}
        self._seen: set[tuple[str, int]] = set()
        self._outcomes: list[tuple[str, dict]] = []

    async def next(self, pack_id: str, slot: int) -> dict | None:
        future = asyncio.get_running_loop().create_future()
        self._asks[(pack_id, slot)] = future
        try:
            return await future
        finally:
            self._asks.pop((pack_id, slot), None)
            self._seen.discard((pack_id, slot))

    async def done(self, pack_id: str, member: dict) -> None:
        self._outcomes.append((pack_id, member))

    async def poll(self) -> tuple[list[tuple[str, int]], list[tuple[str, dict]]]:
        """(requests not yet passed on, outcomes since the last poll)."""
        asks = [key for key in self._asks if key not in self._seen]
        self._seen.update(asks)
        outcomes, self._outcomes = self._outcomes, []
        return asks, outcomes

    async def answer(self, pack_id: str, slot: int, assignment: dict | None) -> None:
        future = self._asks.get((pack_id, slot))
        if future is not None and not future.done():
            future.set_result(assignment)


def start_feed():
    """Start the campaign's ``PackFeed`` actor on this (the driver's) node; it needs no CPU slot."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return ray.remote(PackFeed).options(
        num_cpus=0, max_restarts=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
    ).remote()


class RayRefill(Refill):
    """A pack's ``Refill`` through the campaign's ``PackFeed``: outcomes go to the driver as they
    come, each freed slot waits (without blocking the pack) for the driver's answer."""

    def __init__(self, feed, pack_id: str, sink, flush_interval_s: float, lake_root: str):
        super().__init__()
        self.feed, self.pack_id, self.sink = feed, pack_id, sink
        self.flush_interval_s, self.lake_root = flush_interval_s, lake_root
        self.members: dict[str, tuple[Reporter, str]] = {}  # unit_id -> (its reporter, its unit directory)
        self._asks: dict[int, ray.ObjectRef] = {}
        # id(outcome) -> (outcome, its member dict), made once when the outcome is final: a unit that
        # failed here and was sent here again has two outcomes, each with its own attempt's token.
        self._dicts: dict[int, tuple[MemberOutcome, dict]] = {}

    def reporters(self) -> list[Reporter]:
        return [report for report, _ in self.members.values()]

    def member_dict(self, outcome: MemberOutcome) -> dict:
        if id(outcome) not in self._dicts:
            report, unit_dir = self.members[outcome.unit_id]
            report.close()
            self._dicts[id(outcome)] = (outcome, member_dict(outcome, report, unit_dir, self.lake_root))
        return self._dicts[id(outcome)][1]

    def done(self, outcome: MemberOutcome) -> None:
        if outcome.unit_id in self.members and id(outcome) not in self._dicts:
            self.feed.done.remote(self.pack_id, self.member_dict(outcome))

    def request(self, slot: int) -> None:
        self._asks[slot] = self.feed.next.remote(self.pack_id, slot)

    def poll(self) -> list[tuple[int, Arrival | None]]:
        if not self._asks:
            return []
        ready, _ = ray.wait(list(self._asks.values()), num_returns=len(self._asks), timeout=0)
        answers = []
        for slot, ref in list(self._asks.items()):
            if ref not in ready:
                continue
            del self._asks[slot]
            assignment = ray.get(ref)
            if assignment is None:
                answers.append((slot, None))
                continue
            unit = UnitSpec.model_validate_json(assignment["spec_json"])
            _note_start(self.sink, unit.unit_id, assignment.get("fence"))
            report = Reporter(self.sink, unit.unit_id, self.flush_interval_s)
            self.members[unit.unit_id] = (report, assignment["unit_dir"])
            answers.append((slot, Arrival(unit, Path(assignment["unit_dir"]), report)))
        return answers

    @property
    def waiting(self) -> bool:
        return bool(self._asks)


class Reporter:
    """The ``report`` callback a workload gets: keeps metric dicts and sends them to the sink
    in one fire-and-forget Ray call per ``interval_s`` (and at the end), timing itself. It only
    saves Ray calls; batching for MLflow, retries and outages are the sink's outbox's
    (``workers.tracking``), the one path every MLflow write takes."""

    def __init__(self, sink, unit_id: str, interval_s: float):
        self.sink, self.unit_id, self.interval_s = sink, unit_id, interval_s
        self.token = _token(unit_id)  # the attempt's fencing token: the driver drops a stale attempt's progress
        self.pending: list[tuple[dict, int]] = []
        self.last_send = time.monotonic()
        self.seconds = 0.0  # everything spent in here: the share of worker time that logging costs

    def __call__(self, metrics: dict) -> None:
        t0 = time.perf_counter()
        self.pending.append((dict(metrics), int(time.time() * 1000)))
        if time.monotonic() - self.last_send >= self.interval_s:
            self._send()
        self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        t0 = time.perf_counter()
        self._send()
        self.seconds += time.perf_counter() - t0

    def _send(self) -> None:
        if self.pending and self.sink is not None:
            self.sink.log_many.remote(self.unit_id, self.pending, self.token)
        self.pending = []
        self.last_send = time.monotonic()


_execute_unit_remote = ray.remote(execute_unit)
_execute_pack_remote = ray.remote(execute_pack)


def _node_label(ctx, key: str) -> str | None:
    try:
        return (ctx.get_node_labels() or {}).get(key)
    except Exception:  # labels are an extra; a node without them is fine
        return None


@dataclass
class Outcome:
    """A finished attempt: ``result`` (with ``report_seconds``) on success, else ``error``."""

    unit_id: str
    result: dict | None
    error: str | None
    # 'unit' (exception in the unit), 'system' (its worker died, ...), 'node_lost' (its node died)
    # or 'disk_full' (the node's disk: ``no_space`` names the path); the last two are not the unit's fault
    error_kind: str | None
    no_space: NoSpaceError | None = None
    token: int | None = None  # the attempt's fencing token (None: the scheduler's own verdict on a launch in flight)


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """(kind, text) for a failed attempt; text is the exception and the tail of its traceback.

    Kinds: ``unit`` (the unit's code raised), ``disk_full``, ``node_lost`` (Ray says its node
    died) and ``system`` (its worker process died: the unit's fault, unless the driver finds
    that its node died too; see ``campaign._Driver._finish``)."""
    if isinstance(exc, ray.exceptions.NodeDiedError):
        return "node_lost", _clip("".join(traceback.format_exception_only(type(exc), exc)).strip())
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
        kind = "disk_full" if cause is not None and disk_full(cause) is not None else "unit"
        head = f"{type(cause).__name__}: {cause}" if cause is not None else type(exc).__name__
        text = f"{head}\n{exc}"
    else:
        kind = "system"
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return kind, _clip(text)


def _clip(text: str) -> str:
    """The first line and the end of a long error, where the cause is."""
    if len(text) > ERROR_CHARS:
        first, rest = text.split("\n", 1) if "\n" in text else (text, "")
        text = first + "\n...\n" + rest[-(ERROR_CHARS - len(first)):]
    return text


def launch_needs(camp: configs.CampaignConfig, pool: configs.PoolConfig | None = None,
                 extra: dict[str, float] | None = None) -> dict[str, float]:
    """The Ray resources one launch (a unit, or a pack) asks for: CPU, GPU and ``extra`` (a pool's)."""
    cpus, gpus = camp.pack_resources(pool)
    return {**({"CPU": cpus} if cpus > 0 else {}), **({"GPU": gpus} if gpus > 0 else {}), **(extra or {})}


def _settings(camp: configs.CampaignConfig, resource: str) -> str:
    """The settings that make one launch ask for its CPUs or GPUs, as a user would change them."""
    if camp.pack_size == 1:
        return f"campaign.cpus_per_unit = {camp.cpus_per_unit:g}" if resource == "CPU" else \
            f"campaign.gpus_per_unit = {camp.gpus_per_unit:g}"
    if resource == "CPU":
        return f"campaign.cpus_per_pack = {camp.cpus_per_pack:g}" if camp.cpus_per_pack > 0 else \
            f"campaign.pack_size = {camp.pack_size} x campaign.cpus_per_unit = {camp.cpus_per_unit:g}"
    return f"campaign.gpus_per_pack = {camp.gpus_per_pack:g}" if camp.gpus_per_pack is not None else \
        f"campaign.pack_size = {camp.pack_size} with campaign.gpus_per_unit > 0 (one GPU per pack)"


def _names(settings: list[str]) -> str:
    """The setting names in ``_settings`` texts: ``campaign.pack_size or campaign.cpus_per_unit``."""
    return " or ".join(dict.fromkeys(re.findall(r"(campaign\.\w+) [=w]", " ".join(settings))))


def unschedulable(cfg: configs.Config, pool_name: str | None = None) -> str | None:
    """Why no launch of this campaign could ever start, naming the settings; None when one can.

    On SLURM pools (``pool_name``: the units' pool) one job of the pool must hold a launch
    (``slurm.pools.<pool>.cpus_per_job``/``gpus_per_job``): its nodes join later. Otherwise some
    node of the Ray cluster this process is connected to must hold it now.
    """
    camp = cfg.campaign
    what = f"a pack of {camp.pack_size}" if camp.pack_size > 1 else "a unit"
    if pool_name is not None:
        pool = cfg.slurm.pools[pool_name]
        needs = launch_needs(camp, pool)
        limits = {"CPU": pool.cpus_per_job, "GPU": pool.gpus_per_job}
        short = [r for r, n in needs.items() if n > limits[r] + 1e-9]
        if not short:
            return None
        return (f"{what} asks for {', '.join(_amount(r, needs[r]) for r in short)} "
                f"({'; '.join(_settings(camp, r) for r in short)}), more than one job of slurm.pools.{pool_name} "
                f"holds ({', '.join(f'{_amount(r, limits[r])}' for r in short)}): lower "
                f"{_names([_settings(camp, r) for r in short])}, or raise "
                f"{' and '.join(f'slurm.pools.{pool_name}.' + ('cpus_per_job' if r == 'CPU' else 'gpus_per_job') for r in short)}")
    needs = launch_needs(camp)
    view = resource_view(needs)
    if view["fits"]:
        return None
    short = [r for r, n in needs.items() if view["largest"].get(r, 0) + 1e-9 < n] or list(needs)
    return (f"{what} asks Ray for {', '.join(_amount(r, n) for r, n in needs.items())} "
            f"({'; '.join(_settings(camp, r) for r in short)}); no node of the Ray cluster can ever hold it "
            f"(largest node: {', '.join(_amount(r, view['largest'].get(r, 0)) for r in needs)}; {view['nodes']} node(s)): "
            f"lower {_names([_settings(camp, r) for r in short])}, or add a node that big")


def resource_view(needs: dict[str, float]) -> dict[str, Any]:
    """What the Ray cluster offers ``needs`` now: ``nodes`` alive, the ``largest`` amount of each
    resource on one node, what is ``free`` in all, and whether one node ``fits`` it at all."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    free = ray.available_resources()
    return {
        "needs": needs, "nodes": len(nodes),
        "largest": {r: max((n.get(r, 0.0) for n in nodes), default=0.0) for r in needs},
        "free": {r: free.get(r, 0.0) for r in needs},
        "fits": any(all(n.get(r, 0.0) + 1e-9 >= v for r, v in needs.items()) for n in nodes),
    }


class Scheduler:
    """Launches unit attempts (alone, or ``campaign.pack_size`` at a time as one pack) as Ray
    tasks and reports them, one ``Outcome`` per unit, as they finish."""

    def __init__(self, cfg: configs.Config, workload: str, sink=None):
        _workload(workload)  # fail early on a bad name
        self.workload = workload
        self.camp = cfg.campaign
        self.sink = sink
        self._inflight: dict[ray.ObjectRef, list[str]] = {}  # launch -> the unit ids it holds now
        self._packed: set[ray.ObjectRef] = set()  # launches that are packs
        self._packs: dict[str, ray.ObjectRef] = {}  # pack id -> its launch
        self._config_refs: dict[str, ray.ObjectRef] = {}
        self._capacity: int | None = None
        self._capacity_at = 0.0
        # --- slurm: custom resources that pin units to a SLURM pool's nodes (slurm.pools.unit_resources)
        self.extra_resources: dict[str, float] = {}
        self.pool: configs.PoolConfig | None = None  # sizes packs on a SLURM GPU pool (pack_resources)
        # --- end slurm

    @property
    def pack_size(self) -> int:
        return self.camp.pack_size

    def resources(self) -> tuple[float, float]:
        """(CPUs, GPUs) of one launch: a unit, or a pack."""
        return self.camp.pack_resources(self.pool)

    def resource_view(self) -> dict[str, Any]:
        """What the cluster offers one launch now (``resource_view``)."""
        return resource_view(launch_needs(self.camp, self.pool, self.extra_resources))

    def __len__(self) -> int:
        """Unit attempts in flight (queued in Ray or running), alone or in packs."""
        return sum(len(ids) for ids in self._inflight.values())

    def capacity(self) -> int:
        """How many launches (units, or packs) to keep in flight: ``max_concurrent_units``
        (in units, so packs of K take K each), or (0) what the cluster's CPUs/GPUs fit,
        rechecked every few seconds as nodes join or leave."""
        if self.camp.max_concurrent_units > 0:
            return max(1, self.camp.max_concurrent_units // self.pack_size)
        now = time.monotonic()
        if self._capacity is None or now - self._capacity_at > 5.0:
            cpus, gpus = self.resources()
            res = ray.cluster_resources()
            fits = []
            if cpus > 0:
                fits.append(int(res.get("CPU", 0) // cpus))
            if gpus > 0:
                fits.append(int(math.floor(res.get("GPU", 0) / gpus + 1e-9)))
            slots = min(fits) if fits else int(res.get("CPU", 1))
            # At least one queued attempt, so an autoscaling pool sees demand even with no nodes yet.
            self._capacity, self._capacity_at = max(1, slots), now
        return self._capacity

    def has_room(self) -> bool:
        """Room for another launch: ``max_concurrent_units`` bounds launches in flight exactly;
        with 0, up to twice what fits are in flight, so Ray has the next one queued when one
        ends (those wait in Ray's queue, ``running`` in the store with no host yet)."""
        limit = self.capacity() if self.camp.max_concurrent_units > 0 else 2 * self.capacity()
        return len(self._inflight) < limit

    def config_ref(self, config_key: str, config_dict: dict) -> ray.ObjectRef:
        """The unit config in Ray's object store once, shared by every task that uses it."""
        if config_key not in self._config_refs:
            self._config_refs[config_key] = ray.put(config_dict)
        return self._config_refs[config_key]

    def launch(self, unit_id: str, spec_json: str, config_ref: ray.ObjectRef, unit_dir: Path, lake_root: Path,
               fence: Fence | None = None) -> None:
        cpus, gpus = self.camp.cpus_per_unit, self.camp.gpus_per_unit
        ref = _execute_unit_remote.options(
            num_cpus=cpus,
            num_gpus=gpus,
            resources=self.extra_resources,  # slurm: {"pool:<name>": 1} with --profile slurm, else {}
            max_retries=0,             # the store counts attempts; see the module docstring
            retry_exceptions=False,
        ).remote(self.workload, spec_json, config_ref, str(unit_dir), str(lake_root), self.sink, fence)
        self._inflight[ref] = [unit_id]

    def launch_pack(self, pack_id: str, unit_ids: list[str], specs_json: list[str], config_ref: ray.ObjectRef,
                    unit_dirs: list[Path], lake_root: Path, feed=None, fences: list[Fence] | None = None) -> None:
        """One Ray task training ``unit_ids`` together (one config for all of them); with a
        ``feed`` (``PackFeed``) it asks for more units as its slots free. ``fences``: the members' attempts."""
        cpus, gpus = self.resources()
        ref = _execute_pack_remote.options(
            num_cpus=cpus,
            num_gpus=gpus,
            resources=self.extra_resources,
            runtime_env={"env_vars": PACK_ENV_VARS},
            max_retries=0,
            retry_exceptions=False,
        ).remote(self.workload, specs_json, config_ref, [str(d) for d in unit_dirs], str(lake_root), self.sink, cpus,
                 feed, pack_id, fences)
        self._inflight[ref] = list(unit_ids)
        self._packed.add(ref)
        self._packs[pack_id] = ref

    def pack_running(self, pack_id: str) -> bool:
        return pack_id in self._packs

    def join_pack(self, pack_id: str, unit_id: str) -> None:
        """``unit_id`` was sent to refill a slot of ``pack_id``: it fails with the pack from now on."""
        self._inflight[self._packs[pack_id]].append(unit_id)

    def member_outcome(self, pack_id: str, member: dict) -> Outcome | None:
        """A member's outcome that its pack sent ahead (``PackFeed.done``); None when the pack
        has already been accounted for (it ended or died first)."""
        ref = self._packs.get(pack_id)
        if ref is None or member["unit_id"] not in self._inflight[ref]:
            return None
        self._inflight[ref].remove(member["unit_id"])
        return _member_outcome(member)

    def wait(self, timeout: float) -> list[Outcome]:
        """Attempts that finished within ``timeout`` seconds (possibly none), one per unit."""
        if not self._inflight:
            time.sleep(min(timeout, 0.1))
            return []
        refs = list(self._inflight)
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:  # take every attempt that is done by now, not just the first
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        outcomes = []
        for ref in ready:
            unit_ids = self._inflight.pop(ref)
            packed = ref in self._packed
            self._packed.discard(ref)
            self._packs = {p: r for p, r in self._packs.items() if r != ref}
            try:
                value = ray.get(ref)
            except Exception as e:  # RayTaskError, WorkerCrashedError, NodeDiedError, OutOfMemoryError, ...
                kind, text = describe_failure(e)
                no_space = disk_full(e.cause) if kind == "disk_full" else None
                outcomes.extend(Outcome(unit_id, None, text, kind, no_space) for unit_id in unit_ids)
                continue
            if not packed:
                outcomes.append(Outcome(unit_ids[0], value, None, None, token=value.get("attempt_token")))
                continue
            # Members whose outcome came ahead through the feed are no longer listed.
            outcomes.extend(_member_outcome(member) for member in value if member["unit_id"] in unit_ids)
        return outcomes

    def abandon(self, unit_id: str, why: str) -> list[Outcome]:
        """Give up on the launch that holds ``unit_id`` (alone, or its whole pack) because Ray
        declared its node dead: it is cancelled, and each unit it holds comes back as kind
        ``node_lost`` with ``why``. Cut off by a network partition, such a task's call to its
        node can hang long after the node was declared dead, so the driver does not wait for it;
        whatever the cut-off processes still write is fenced (``workers.fencing``)."""
        ref = next((r for r, ids in self._inflight.items() if unit_id in ids), None)
        if ref is None:
            return []
        unit_ids = self._inflight.pop(ref)
        self._packed.discard(ref)
        self._packs = {p: r for p, r in self._packs.items() if r != ref}
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - the node is gone either way
            pass
        return [Outcome(u, None, why, "node_lost") for u in unit_ids]

    def cancel_all(self) -> list[str]:
        """Cancel every attempt in flight (driver shutting down); returns their unit ids."""
        ids = [unit_id for ids in self._inflight.values() for unit_id in ids]
        for ref in list(self._inflight):
            try:
                ray.cancel(ref, force=True)
            except Exception:
                pass
        self._inflight.clear()
        self._packed.clear()
        self._packs.clear()
        return ids


def _member_outcome(member: dict) -> Outcome:
    if "error" in member:
        return Outcome(member["unit_id"], None, member["error"], member["kind"], member.get("no_space"),
                       member.get("attempt_token"))
    return Outcome(member["unit_id"], member["result"], None, None, token=member.get("attempt_token"))
