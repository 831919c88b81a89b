"""Running units on Ray: connect to (or start) a cluster, launch one task per unit attempt (or
per pack of ``campaign.pack_size`` unit attempts) with the resources the config declares, and
hand back finished attempts as ``Outcome``s, one per unit.

A pack is one Ray task holding ``CampaignConfig.pack_resources()``; it returns each member's
result or error, so a member that failed is retried alone while the others succeed. When the
pack's process dies (killed, out of memory, node lost) every member's attempt fails with that
error and each is retried from its own checkpoint.

Attempts are counted by the campaign store, not by Ray: tasks run with ``max_retries=0`` and
``retry_exceptions=False``, and every failure (an exception inside the unit, a worker process
or node that died) comes back to the driver, which decides whether to retry. A full disk is
the node's fault, not the unit's: it comes back as kind ``disk_full`` and costs no attempt.
"""

from __future__ import annotations

import logging
import math
import os
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
from slurm.raynode import JOB_LABEL as SLURM_JOB_LABEL
from workers.units import UnitResult, UnitSpec

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
                 dashboard_host=ray_cfg.dashboard_host, dashboard_port=port)
    return True


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


def _note_start(sink, unit_id: str) -> None:
    if sink is not None:
        ctx = ray.get_runtime_context()
        sink.started.remote(unit_id, {
            "hostname": socket.gethostname(),
            "node_id": ctx.get_node_id(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID") or _node_label(ctx, SLURM_JOB_LABEL),
        })


def execute_unit(workload: str, spec_json: str, cfg_dict: dict, unit_dir: str, lake_root: str, sink) -> dict:
    """Worker side of one attempt: say where it runs, run the workload, time its reporting.

    Returns ``UnitResult`` fields plus ``report_seconds`` (time spent inside the metrics
    callback).
    """
    unit = UnitSpec.model_validate_json(spec_json)
    cfg = configs.from_dict(cfg_dict)
    if unit.overrides:
        cfg = cfg.with_overrides(unit.overrides)
    _note_start(sink, unit.unit_id)
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
    return {**result.model_dump(), "report_seconds": report.seconds}


def execute_pack(workload: str, specs_json: list[str], cfg_dict: dict, unit_dirs: list[str], lake_root: str,
                 sink, cpus: float) -> list[dict]:
    """Worker side of one pack: its members' attempts in this process (``PACK_WORKLOADS``).

    Returns one dict per member: ``{"unit_id", "result"}`` with ``UnitResult`` fields plus
    ``report_seconds``, or ``{"unit_id", "error", "kind", "no_space"}`` with the
    member's traceback (kind ``disk_full`` with the ``NoSpaceError`` when a full disk caused it).
    """
    units = [UnitSpec.model_validate_json(s) for s in specs_json]
    cfg = configs.from_dict(cfg_dict)  # each member applies its own overrides
    for unit in units:
        _note_start(sink, unit.unit_id)
    reporters = [Reporter(sink, unit.unit_id, cfg.mlflow.flush_interval_s) for unit in units]
    run = _workload(workload, PACK_WORKLOADS)
    try:
        outcomes = run(units, cfg, [Path(d) for d in unit_dirs], Path(lake_root), reporters, cpus)
    finally:
        for report in reporters:
            report.close()  # metrics of failed members still reach MLflow
    out = []
    for outcome, report, unit_dir in zip(outcomes, reporters, unit_dirs):
        if outcome.error is not None:
            full = disk_full(outcome.error, paths=(unit_dir, lake_root))  # the node's fault, not the unit's
            out.append({"unit_id": outcome.unit_id, "error": _clip(outcome.error_text),
                        "kind": "disk_full" if full is not None else "unit", "no_space": full})
        else:
            out.append({"unit_id": outcome.unit_id, "result": {**outcome.result.model_dump(),
                        "report_seconds": report.seconds}})
    return out


class Reporter:
    """The ``report`` callback a workload gets: keeps metric dicts and sends them to the sink
    in one fire-and-forget Ray call per ``interval_s`` (and at the end), timing itself. It only
    saves Ray calls; batching for MLflow, retries and outages are the sink's outbox's
    (``workers.tracking``), the one path every MLflow write takes."""

    def __init__(self, sink, unit_id: str, interval_s: float):
        self.sink, self.unit_id, self.interval_s = sink, unit_id, interval_s
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
            self.sink.log_many.remote(self.unit_id, self.pending)
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
    # 'unit' (exception in the unit), 'system' (worker/node died, ...) or 'disk_full' (the node's
    # disk: ``no_space`` names the path; the attempt is not the unit's fault)
    error_kind: str | None
    no_space: NoSpaceError | None = None


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """(kind, text) for a failed attempt; text is the exception and the tail of its traceback."""
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


class Scheduler:
    """Launches unit attempts (alone, or ``campaign.pack_size`` at a time as one pack) as Ray
    tasks and reports them, one ``Outcome`` per unit, as they finish."""

    def __init__(self, cfg: configs.Config, workload: str, sink=None):
        _workload(workload)  # fail early on a bad name
        self.workload = workload
        self.camp = cfg.campaign
        self.sink = sink
        self._inflight: dict[ray.ObjectRef, tuple[str, ...]] = {}  # launch -> its unit ids
        self._packed: set[ray.ObjectRef] = set()  # launches that are packs
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

    def __len__(self) -> int:
        """Unit attempts in flight (queued in Ray or running), alone or in packs."""
        return sum(len(ids) for ids in self._inflight.values())

    def inflight(self) -> list[str]:
        """Unit ids of the attempts in flight (queued in Ray or running)."""
        return [unit_id for ids in self._inflight.values() for unit_id in ids]

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

    def launch(self, unit_id: str, spec_json: str, config_ref: ray.ObjectRef, unit_dir: Path, lake_root: Path) -> None:
        cpus, gpus = self.camp.cpus_per_unit, self.camp.gpus_per_unit
        ref = _execute_unit_remote.options(
            num_cpus=cpus,
            num_gpus=gpus,
            resources=self.extra_resources,  # slurm: {"pool:<name>": 1} with --profile slurm, else {}
            max_retries=0,             # the store counts attempts; see the module docstring
            retry_exceptions=False,
        ).remote(self.workload, spec_json, config_ref, str(unit_dir), str(lake_root), self.sink)
        self._inflight[ref] = (unit_id,)

    def launch_pack(self, unit_ids: list[str], specs_json: list[str], config_ref: ray.ObjectRef,
                    unit_dirs: list[Path], lake_root: Path) -> None:
        """One Ray task training ``unit_ids`` together (one config for all of them)."""
        cpus, gpus = self.resources()
        ref = _execute_pack_remote.options(
            num_cpus=cpus,
            num_gpus=gpus,
            resources=self.extra_resources,
            runtime_env={"env_vars": PACK_ENV_VARS},
            max_retries=0,
            retry_exceptions=False,
        ).remote(self.workload, specs_json, config_ref, [str(d) for d in unit_dirs], str(lake_root), self.sink, cpus)
        self._inflight[ref] = tuple(unit_ids)
        self._packed.add(ref)

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
            try:
                value = ray.get(ref)
            except Exception as e:  # RayTaskError, WorkerCrashedError, NodeDiedError, OutOfMemoryError, ...
                kind, text = describe_failure(e)
                no_space = disk_full(e.cause) if kind == "disk_full" else None
                outcomes.extend(Outcome(unit_id, None, text, kind, no_space) for unit_id in unit_ids)
                continue
            if not packed:
                outcomes.append(Outcome(unit_ids[0], value, None, None))
                continue
            for member in value:
                if "error" in member:
                    outcomes.append(Outcome(member["unit_id"], None, member["error"], member["kind"],
                                            member.get("no_space")))
                else:
                    outcomes.append(Outcome(member["unit_id"], member["result"], None, None))
        return outcomes

    def cancel_all(self) -> list[str]:
        """Cancel every attempt in flight (driver shutting down); returns their unit ids."""
        ids = self.inflight()
        for ref in list(self._inflight):
            try:
                ray.cancel(ref, force=True)
            except Exception:
                pass
        self._inflight.clear()
        self._packed.clear()
        return ids
