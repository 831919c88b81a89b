"""Worker pools on SLURM: pool jobs (submitit) that start Ray worker nodes, sized to the queue.

A profile names pools (``slurm.pools`` in the config): for each, a partition, the resources of
one job and a minimum and maximum number of jobs. The campaign driver calls
:meth:`PoolManager.reconcile` every few seconds with how many units wait and run per pool (and
the jobs an imitation job in flight needs, :func:`imitation_jobs`);
the manager submits jobs while units wait, replaces jobs that ended (time limit, preemption,
scancel, node failure; a job whose Ray node Ray declared dead is cancelled and replaced at once,
without waiting for SLURM to notice the host is gone) while work remains, cancels idle jobs when the queue drains, and
cancels everything on :meth:`PoolManager.shutdown` (also at interpreter exit).

A unit asks Ray for ``{pool_resource(pool): 1}`` (see :func:`unit_resources`) so it lands on a
node of its pool: GPU units on GPU nodes, CPU units on CPU nodes.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import logging
import math
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import configs
from configs import PoolConfig, SlurmConfig
from slurm.raynode import (JOB_LABEL, POOL_LABEL, RayNodeSpec, check_temp_root, pool_resource, run_worker_node,
                           write_private)

log = logging.getLogger(__name__)

# squeue states in which a job holds (or will hold) a node; anything else has ended.
ALIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED"}


class SlurmError(RuntimeError):
    """A SLURM command failed; the message has the command and its output."""


@dataclass
class PoolJob:
    """One pool job as the manager last saw it in ``squeue``."""

    pool: str
    job_id: str
    state: str  # SLURM state (PENDING, RUNNING, ...); ENDED once squeue no longer lists it
    submitted_at: float
    node: str = ""
    started_at: float | None = None
    joined: bool = False  # its Ray worker node was seen in the cluster

    @property
    def alive(self) -> bool:
        return self.state in ALIVE_STATES


def _run(cmd: list[str], timeout: float = 30) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmError(f"{' '.join(cmd)}: {e}") from e
    if out.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} exited with {out.returncode}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def squeue(job_names: list[str]) -> dict[str, tuple[str, str]]:
    """{job id: (state, node list)} for this user's jobs with these names, as SLURM lists them."""
    if not job_names:
        return {}
    out = _run(["squeue", "--noheader", f"--user={getpass.getuser()}", f"--name={','.join(job_names)}",
                "--format=%i|%T|%N"])
    jobs = {}
    for line in out.splitlines():
        if line.strip():
            job_id, state, nodes = line.strip().split("|", 2)
            jobs[job_id] = (state, nodes)
    return jobs


def scancel(job_ids: list[str]) -> None:
    if job_ids:
        _run(["scancel", *job_ids])


def resolve_auth_token_file(log_dir: Path) -> str | None:
    """The file with the head's Ray auth token, readable by pool jobs; None when auth is off.

    Ray looks for the token in RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token;
    this follows the same order. A token given only in the environment is written (mode 0600)
    to ``log_dir/ray_auth_token``, because pool jobs read it from a file, never from the
    pickled submission.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return str(write_private(Path(log_dir) / "ray_auth_token", token))
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return str(Path(path).expanduser().resolve())
    default = Path.home() / ".ray" / "auth_token"
    if default.exists():
        return str(default)
    raise RuntimeError(
        "no Ray auth token to give pool jobs: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the head's "
        "token (or create ~/.ray/auth_token with `ray get-auth-token --generate` before starting the head); "
        "RAY_AUTH_MODE=disabled turns auth off"
    )


def ray_joined_jobs() -> set[str] | None:
    """SLURM job ids of pool nodes alive in the connected Ray cluster (None: not connected)."""
    import ray

    if not ray.is_initialized():
        return None
    return {job_id for node in ray.nodes() if node.get("Alive")
            if (job_id := (node.get("Labels") or {}).get(JOB_LABEL))}


def ray_idle_jobs() -> set[str] | None:
    """SLURM job ids of pool nodes that run nothing now, from the connected Ray cluster.

    None when this process is not connected to Ray (the manager then keeps busy-looking jobs).
    """
    import ray

    if not ray.is_initialized():
        return None
    from ray._private.state import available_resources_per_node

    available = available_resources_per_node()
    idle = set()
    for node in ray.nodes():
        job_id = (node.get("Labels") or {}).get(JOB_LABEL)
        if not job_id or not node.get("Alive"):
            continue
        total, free = node.get("Resources", {}), available.get(node["NodeID"], {})
        if all(free.get(k, 0.0) >= v for k, v in total.items() if k in ("CPU", "GPU")):
            idle.add(job_id)
    return idle


class PoolManager:
    """Keeps the number of SLURM pool jobs in line with the campaign's queue."""

    def __init__(
        self,
        slurm_cfg: SlurmConfig,
        head_address: str,
        log_dir: str | Path,
        *,
        units_per_job: Mapping[str, int] | None = None,
        auth_token_file: str | None = "auto",
        idle_jobs: Callable[[], set[str] | None] = ray_idle_jobs,
        joined_jobs: Callable[[], set[str] | None] = ray_joined_jobs,
        earlier_tags: list[str] | tuple[str, ...] = (),
    ) -> None:
        """``units_per_job[pool]``: how many units one job of the pool runs at once (default 1).
        ``auth_token_file``: the head's token file, None when the head runs without auth, "auto"
        to find it like Ray does (see :func:`resolve_auth_token_file`).
        ``idle_jobs``: the running jobs that may be cancelled (None: unknown).
        ``joined_jobs``: the jobs whose Ray node has joined the cluster (None: unknown).
        ``earlier_tags``: the tags of earlier managers of the same campaign, whose jobs
        :meth:`cancel_earlier_jobs` cancels and :meth:`shutdown` waits for."""
        if not slurm_cfg.pools:
            raise ValueError("slurm.pools is empty: the profile must name at least one pool")
        check_temp_root(slurm_cfg.ray_tmp_root)
        for name, pool in slurm_cfg.pools.items():
            if pool.min_jobs > pool.max_jobs:
                raise ValueError(f"slurm.pools.{name}: min_jobs {pool.min_jobs} > max_jobs {pool.max_jobs}")
        self.cfg = slurm_cfg
        self.head_address = head_address
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.units_per_job = {p: max(1, int((units_per_job or {}).get(p, 1))) for p in slurm_cfg.pools}
        self.auth_token_file = resolve_auth_token_file(self.log_dir) if auth_token_file == "auto" else auth_token_file
        self._idle_jobs = idle_jobs
        self._joined_jobs = joined_jobs
        self._reported_lost: set[str] = set()  # jobs whose node the driver saw die (node_lost)
        # Job names carry a per-manager tag, so squeue/scancel only ever touch our own jobs.
        self.tag = f"pf-{uuid.uuid4().hex[:8]}"
        self.earlier_tags = list(earlier_tags)
        self._jobs: dict[str, PoolJob] = {}
        self._executors: dict = {}
        self._quick_ends = {p: 0 for p in slurm_cfg.pools}
        self._next_submit_at = {p: 0.0 for p in slurm_cfg.pools}
        self._closed = False
        # Submissions, replacements and cancellations, next to the jobs' own logs.
        self._log_file = logging.FileHandler(self.log_dir / "pools.log")
        self._log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(self._log_file)
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)
        atexit.register(self.shutdown)

    # -- public API -------------------------------------------------------------------------

    def job_name(self, pool: str, tag: str | None = None) -> str:
        return f"{tag or self.tag}-{pool}"

    def cancel_earlier_jobs(self) -> list[str]:
        """Cancel the pool jobs of earlier managers of this campaign (``earlier_tags``): a driver
        that died (its host restarted, SIGKILL) could not cancel them, and their Ray nodes joined a
        head that is gone. Returns the ids of those SLURM still listed."""
        names = [self.job_name(p, tag) for tag in self.earlier_tags for p in self.cfg.pools]
        earlier = sorted(squeue(names))
        if earlier:
            log.warning("cancelling %d pool job(s) of an earlier driver: %s", len(earlier), ", ".join(earlier))
            _run(["scancel", f"--user={getpass.getuser()}", f"--name={','.join(names)}"])
        return earlier

    def jobs(self) -> list[PoolJob]:
        """Pool jobs that hold or wait for a node, as of the last reconcile."""
        return [j for j in self._jobs.values() if j.alive]

    def target_jobs(self, pool: str, waiting: int, running: int, reserved: int = 0) -> int:
        """How many jobs ``pool`` should have for this many waiting and running units, plus
        ``reserved`` whole jobs for other work (an imitation job's DDP workers)."""
        cfg = self.cfg.pools[pool]
        wanted = math.ceil((waiting + running) / self.units_per_job[pool]) + reserved
        return max(cfg.min_jobs, min(cfg.max_jobs, wanted))

    def reconcile(self, waiting_units_by_pool: Mapping[str, int], running_units_by_pool: Mapping[str, int],
                  reserved_jobs_by_pool: Mapping[str, int] | None = None) -> dict[str, int]:
        """Refresh job states from SLURM, then submit or cancel jobs toward each pool's target.

        ``reserved_jobs_by_pool``: jobs wanted besides the units' (see :func:`imitation_jobs`),
        so work that is not a unit never waits for nodes the queue alone would not ask for.
        Returns the target number of jobs per pool. A failing ``squeue`` leaves everything as is
        (a busy controller must not look like every job ended).
        """
        if self._closed:
            raise RuntimeError("PoolManager.reconcile after shutdown")
        reserved_jobs_by_pool = reserved_jobs_by_pool or {}
        unknown = set(waiting_units_by_pool) | set(running_units_by_pool) | set(reserved_jobs_by_pool)
        if unknown - set(self.cfg.pools):
            raise ValueError(f"units for unknown pools {sorted(unknown - set(self.cfg.pools))}; "
                             f"slurm.pools has {sorted(self.cfg.pools)}")
        try:
            self._refresh()
        except SlurmError as e:
            log.warning("squeue failed, keeping pool jobs as they are: %s", e)
            return {}
        targets = {}
        for pool in self.cfg.pools:
            waiting = int(waiting_units_by_pool.get(pool, 0))
            running = int(running_units_by_pool.get(pool, 0))
            reserved = int(reserved_jobs_by_pool.get(pool, 0))
            targets[pool] = target = self.target_jobs(pool, waiting, running, reserved)
            alive = [j for j in self._jobs.values() if j.pool == pool and j.alive]
            if len(alive) < target:
                self._submit(pool, target - len(alive))
            elif len(alive) > target:
                self._scale_down(pool, alive, len(alive) - target, running + reserved)
        return targets

    def node_lost(self, job_id: str) -> None:
        """The driver saw a unit die with the node of job ``job_id`` (``NodeDiedError``): the next
        :meth:`reconcile` cancels and replaces that job without waiting for Ray's health checks
        to declare the node dead (or for SLURM's, which take minutes)."""
        self._reported_lost.add(str(job_id))

    def shutdown(self, wait_s: float = 60.0) -> None:
        """Cancel every pool job of this manager and wait until SLURM lists none of them."""
        if self._closed:
            return
        self._closed = True
        # Earlier drivers' jobs too: cancelled at the start, they may still be ending.
        names = [self.job_name(p, tag) for tag in [self.tag, *self.earlier_tags] for p in self.cfg.pools]
        try:
            scancel([j.job_id for j in self._jobs.values() if j.alive])
            # Also by name: a job submitted just before a crash of this process is still ours.
            _run(["scancel", f"--user={getpass.getuser()}", f"--name={','.join(names)}"])
            deadline = time.monotonic() + wait_s
            while squeue(names) and time.monotonic() < deadline:
                time.sleep(0.5)
        except SlurmError as e:
            log.warning("pool shutdown: %s", e)
        for job in self._jobs.values():
            job.state = "ENDED" if job.alive else job.state
        log.info("pools shut down; jobs were %s", ", ".join(self._jobs) or "none")
        log.removeHandler(self._log_file)
        self._log_file.close()
        atexit.unregister(self.shutdown)

    # -- internals ----------------------------------------------------------------------------

    def _refresh(self) -> None:
        listed = squeue([self.job_name(p) for p in self.cfg.pools])
        now = time.time()
        joined = self._joined_jobs() if any(j.alive for j in self._jobs.values()) else None
        lost = []
        for job in self._jobs.values():
            if joined is None or not job.alive:
                continue
            if (job.joined and job.job_id not in joined) or job.job_id in self._reported_lost:
                lost.append(job)  # its node is dead: SLURM may take minutes to notice a crashed host
            if not job.joined and job.job_id in joined:
                job.joined = True
                log.info("pool %s: job %s joined the Ray cluster", job.pool, job.job_id)
        if lost:
            log.warning("Ray lost the node of %s; cancelling and replacing them",
                        ", ".join(f"job {j.job_id} ({j.pool}, {j.node or 'no node'})" for j in lost))
            with contextlib.suppress(SlurmError):  # a controller that cannot reach the node still ends the job
                scancel([j.job_id for j in lost])
            for job in lost:
                job.state = "NODE_LOST"
                self._on_end(job, now)
        for job in self._jobs.values():
            if not job.alive:
                continue
            state, nodes = listed.get(job.job_id, ("ENDED", job.node))
            if state == "RUNNING" and job.started_at is None:
                job.started_at = now
            job.state, job.node = state, nodes
            if not job.alive:
                self._on_end(job, now)

    def _on_end(self, job: PoolJob, now: float) -> None:
        lived = now - job.submitted_at
        log.info("pool %s: job %s ended (%s) after %.0f s", job.pool, job.job_id, job.state, lived)
        # A job that ends soon after its submission, before its Ray node ever joined, is likely
        # broken (bad partition, ray start failing): back off exponentially instead of
        # resubmitting in a tight loop. One that served units (then was cancelled or preempted)
        # is replaced at once.
        if lived < self.cfg.quick_end_s and not job.joined:
            self._back_off(job.pool)
        else:
            self._quick_ends[job.pool] = 0

    def _back_off(self, pool: str) -> float:
        """Delay the pool's next submission: doubles with each failed start, up to max_backoff_s."""
        self._quick_ends[pool] += 1
        delay = min(self.cfg.max_backoff_s, self.cfg.poll_interval_s * 2 ** self._quick_ends[pool])
        self._next_submit_at[pool] = time.monotonic() + delay
        return delay

    def _executor(self, pool: str):
        if pool not in self._executors:
            import submitit

            cfg: PoolConfig = self.cfg.pools[pool]
            ex = submitit.AutoExecutor(folder=self.log_dir / pool / "%j", cluster="slurm")
            params = dict(
                name=self.job_name(pool),
                timeout_min=cfg.time_min,
                cpus_per_task=cfg.cpus_per_job,
                mem_gb=cfg.mem_gb,
                nodes=1,
                tasks_per_node=1,
                slurm_partition=cfg.partition,
                # submitit's USR2 warning before the time limit: the job then stops Ray and ends.
                # SLURM's usual 90 s, but at most a quarter of a short limit.
                slurm_signal_delay_s=min(90, cfg.time_min * 15),
            )
            if cfg.gpus_per_job:
                params["slurm_gres"] = f"gpu:{cfg.gpus_per_job}"
            ex.update_parameters(**params)
            self._executors[pool] = ex
        return self._executors[pool]

    def _submit(self, pool: str, n: int) -> None:
        if time.monotonic() < self._next_submit_at[pool]:
            return
        spec = RayNodeSpec(
            pool=pool,
            head_address=self.head_address,
            ray_tmp_root=self.cfg.ray_tmp_root,
            auth_token_file=self.auth_token_file,
            mem_gb=self.cfg.pools[pool].mem_gb,
        )
        for _ in range(n):
            try:
                job = self._executor(pool).submit(run_worker_node, spec)
            except Exception as e:  # sbatch refused (bad partition, QOS limit, controller down)
                delay = self._back_off(pool)
                log.error("pool %s: submitting a job failed (retry in %.0f s): %s", pool, delay, e)
                return
            self._jobs[job.job_id] = PoolJob(pool=pool, job_id=job.job_id, state="PENDING", submitted_at=time.time())
            log.info("pool %s: submitted job %s", pool, job.job_id)

    def _scale_down(self, pool: str, alive: list[PoolJob], excess: int, busy: int) -> None:
        # Pending jobs first (they run nothing), newest first; then running jobs that run nothing.
        pending = sorted((j for j in alive if j.state != "RUNNING"), key=lambda j: -j.submitted_at)
        cancel = pending[:excess]
        excess -= len(cancel)
        if excess > 0:
            running = sorted((j for j in alive if j.state == "RUNNING"), key=lambda j: -j.submitted_at)
            idle = self._idle_jobs()
            if idle is not None:
                candidates = [j for j in running if j.job_id in idle]
            elif busy == 0:
                candidates = running  # nothing of this pool runs anywhere
            else:
                candidates = []  # cannot tell which nodes are idle: keep them rather than kill work
            cancel += candidates[:excess]
        if cancel:
            log.info("pool %s: cancelling %s", pool, ", ".join(j.job_id for j in cancel))
            try:
                scancel([j.job_id for j in cancel])
            except SlurmError as e:  # try again at the next reconcile
                log.warning("pool %s: %s", pool, e)
                return
            for j in cancel:
                j.state = "CANCELLED"


def _fits(pool: PoolConfig, cpus: float, gpus: float) -> int:
    """How many tasks of ``cpus`` CPUs and ``gpus`` GPUs one job of ``pool`` holds (0: none)."""
    fits = [pool.cpus_per_job / cpus] if cpus > 0 else []
    if gpus > 0:
        fits.append(pool.gpus_per_job / gpus)
    return int(min(fits)) if fits else 1


def units_per_job(cfg: configs.Config, pool: str) -> int:
    """How many units of the campaign one job of ``pool`` runs at once: launches (units, or
    packs of ``campaign.pack_size``, by default one pack per GPU) that fit, times the pack size."""
    p = cfg.slurm.pools[pool]
    cpus, gpus = cfg.campaign.pack_resources(p)
    return max(1, _fits(p, cpus, gpus)) * cfg.campaign.pack_size


def imitation_jobs(cfg: configs.Config) -> tuple[str, int]:
    """(pool, jobs) that the imitation job's ``il.num_workers`` DDP workers need.

    Each worker asks Ray Train's default of 1 CPU (and 1 GPU with ``il.use_gpu``); the Ray head
    has no CPUs, so without these jobs the imitation job would wait for workers forever. A
    ValueError says why the pools can never hold them.
    """
    il = cfg.il
    gpus = 1 if il.use_gpu else 0
    try:
        pool = pool_for_units(cfg.slurm, gpus)
    except ValueError as e:
        raise ValueError(f"imitation workers (il.use_gpu = {il.use_gpu}): {e}") from None
    per_job = _fits(cfg.slurm.pools[pool], 1, gpus)
    if per_job < 1:
        raise ValueError(f"slurm.pools.{pool}: one job ({cfg.slurm.pools[pool].cpus_per_job} CPUs, "
                         f"{cfg.slurm.pools[pool].gpus_per_job} GPUs) cannot hold an imitation worker (1 CPU, {gpus} GPU)")
    jobs = math.ceil(il.num_workers / per_job)
    if jobs > cfg.slurm.pools[pool].max_jobs:
        raise ValueError(f"il.num_workers = {il.num_workers} needs {jobs} jobs of slurm.pools.{pool} "
                         f"({per_job} workers each); its max_jobs is {cfg.slurm.pools[pool].max_jobs}: "
                         "lower il.num_workers or raise max_jobs")
    return pool, jobs


def pool_for_units(slurm_cfg: SlurmConfig, gpus_per_unit: float) -> str:
    """The pool a unit belongs to: a GPU pool when it needs a GPU, else a CPU-only pool."""
    if not slurm_cfg.pools:
        raise ValueError("slurm.pools is empty: the profile must name at least one pool")
    wanted = [n for n, p in slurm_cfg.pools.items() if (p.gpus_per_job > 0) == (gpus_per_unit > 0)]
    if not wanted:
        kind = "GPU" if gpus_per_unit > 0 else "CPU-only"
        raise ValueError(f"no {kind} pool in slurm.pools ({sorted(slurm_cfg.pools)}) for units with gpus_per_unit={gpus_per_unit}")
    return wanted[0]


def unit_resources(pool: str) -> dict[str, float]:
    """Extra Ray resources a unit asks for so it runs on a node of ``pool``."""
    return {pool_resource(pool): 1}


def start_for_campaign(cfg: configs.Config, head_address: str, log_dir: str | Path,
                       earlier_tags: list[str] | tuple[str, ...] = ()) -> PoolManager:
    """The campaign driver's entry point: a PoolManager for the profile's pools, at their minimum.
    ``earlier_tags``: see :class:`PoolManager` (cancelling their jobs is up to the caller)."""
    manager = PoolManager(
        cfg.slurm,
        head_address,
        log_dir,
        units_per_job={p: units_per_job(cfg, p) for p in cfg.slurm.pools},
        earlier_tags=earlier_tags,
    )
    manager.reconcile({}, {})
    return manager


__all__ = [
    "JOB_LABEL", "POOL_LABEL", "PoolJob", "PoolManager", "SlurmError", "imitation_jobs", "pool_for_units", "pool_resource",
    "ray_idle_jobs", "ray_joined_jobs", "resolve_auth_token_file", "squeue", "start_for_campaign", "unit_resources", "units_per_job",
]
