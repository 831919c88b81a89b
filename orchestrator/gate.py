"""The F1 gate: when enough specialists are good enough, imitation learning starts.

A shard passes when its specialist's F1 is at least ``gate.f1_threshold`` (RP1M: 0.75) and it
belongs to the ``train`` split. The campaign driver calls, once per scheduling round::

    gate = Gate(cfg.gate)
    decision = gate.check(lake, last_launch_count)      # reads the lake catalog
    if decision.launch:
        launch_il(...)                                  # e.g. workers.imitation.trainer.train_il
        last_launch_count = decision.passing            # remember it in the campaign store

or, with the count already at hand, ``gate.decide(passing_count, last_launch_count)``.
The first launch happens at ``gate.min_shards`` passing shards; after that a relaunch happens
each time ``gate.relaunch_every`` more shards have passed (0: never relaunch).

``ImitationLauncher`` is that loop as the driver runs it: ``gate.launch`` says when
(``when_passing``, ``after_campaign`` or ``never``), each launch is recorded in the store's
meta ``il_launches`` and in its events, and a launch a stopped driver left unfinished resumes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateDecision:
    """What the gate saw: ``passing`` shards in the catalog and whether to ``launch`` now."""

    launch: bool
    passing: int
    shards: list[Any] = field(default_factory=list, repr=False)  # the passing ShardInfo records
    damaged: int = 0  # shards that would pass but whose file is damaged: not counted, not used
    damaged_shards: list[tuple[Any, str]] = field(default_factory=list, repr=False)  # (ShardInfo, what is wrong)

    @property
    def song_hashes(self) -> list[str]:
        """Songs the passing shards come from (what an IL run trained on counts as 'seen')."""
        return sorted({s.song_hash for s in self.shards})


class Gate:
    """The launch rule over passing-shard counts; ``gate_cfg`` is the ``gate`` config section."""

    def __init__(self, gate_cfg: Any):
        self.f1_threshold = float(gate_cfg.f1_threshold)
        self.min_shards = int(gate_cfg.min_shards)
        self.relaunch_every = int(gate_cfg.relaunch_every)

    def decide(self, passing: int, last_launch_count: int | None = None) -> bool:
        """True when imitation learning should (re)start.

        ``passing``: shards passing now; ``last_launch_count``: how many passed at the previous
        launch (``None`` or 0: never launched).
        """
        if not last_launch_count:
            return passing >= self.min_shards
        return self.relaunch_every > 0 and passing - last_launch_count >= self.relaunch_every

    def passes(self, f1: float) -> bool:
        """Whether a specialist with this F1 passes (its unit succeeds, its shards count): F1 >= the
        threshold (NaN never passes)."""
        return bool(f1 >= self.f1_threshold)

    def _train_shards(self, lake: Any) -> tuple[list[Any], list[Any]]:
        """(undamaged, damaged) committed train-split shards of ``lake`` whose specialist passes."""
        return lake.split_damaged([s for s in lake.shards(split="train") if self.passes(s.specialist_f1)])

    def passing_shards(self, lake: Any) -> list[Any]:
        """Committed train-split shards of ``lake`` (a ``workers.lake.Lake``) whose specialist passes
        and whose file is whole (``Lake.shard_problem``: size and sha256)."""
        return self._train_shards(lake)[0]

    def check(self, lake: Any, last_launch_count: int | None = None) -> GateDecision:
        """Read the lake catalog and decide; the decision carries the passing shards and counts
        the damaged ones it left out."""
        shards, damaged = self._train_shards(lake)
        return GateDecision(launch=self.decide(len(shards), last_launch_count), passing=len(shards), shards=shards,
                            damaged=len(damaged), damaged_shards=damaged)


# --------------------------------------------------------------------------------------------
# The gate in the campaign driver: launching imitation learning and keeping its record
# --------------------------------------------------------------------------------------------

IL_RUNNING, IL_SUCCEEDED, IL_FAILED, IL_INTERRUPTED = "running", "succeeded", "failed", "interrupted"
LAUNCHES_KEY = "il_launches"  # store meta: one record per imitation job the driver started
GATE_KEY = "gate"  # store meta: what the gate saw at its last check


def run_imitation(lake_root: str, cfg_dict: dict, out_dir: str, tracking_uri: str | None,
                  experiment: str | None, outbox: str | None = None) -> dict[str, Any]:
    """Train the imitation policy (``workers.imitation.trainer.train_il``) and return its result as plain
    values. Calling it again with the same ``out_dir`` resumes from the job's last checkpoint.
    ``outbox``: the campaign's MLflow outbox, which the driver delivers."""
    import configs
    from workers.imitation.trainer import train_il

    cfg = configs.from_dict(cfg_dict)
    result = train_il(lake_root, cfg, out_dir, policy=cfg.il.policy, num_workers=cfg.il.num_workers,
                      min_f1=cfg.gate.f1_threshold, tracking_uri=tracking_uri, experiment=experiment, outbox=outbox)
    return {"policy_path": str(result.policy_path), "steps": result.steps, "start_step": result.start_step,
            "mlflow_run_id": result.mlflow_run_id, "n_shards": result.n_shards, "n_songs": len(result.song_hashes),
            "loss": result.metrics.get("train/loss"), "worker_hosts": result.worker_hosts}


class ImitationLauncher:
    """The campaign driver's side of the gate: checks it as units finish, starts the imitation job
    as a Ray task when it opens (``gate.launch``), and records every launch in the store.

    The task itself takes no CPU: only Ray Train's ``il.num_workers`` workers do, so the job
    waits in Ray's queue while units hold the CPUs instead of blocking them (no deadlock on a
    small machine). One job runs at a time; a relaunch (``gate.relaunch_every``) waits for it.
    Each launch trains into ``<campaign>/il/<policy>/launch-<n>``; a launch that a stopped
    driver left unfinished is started again in the same folder, which resumes its checkpoint.
    """

    def __init__(self, cfg: Any, store: Any, campaign_dir: Path, lake_root: Path, tracking_uri: str | None,
                 experiment: str | None):
        self.cfg, self.store = cfg, store
        self.gate = Gate(cfg.gate)
        self.policy = cfg.gate.launch
        self.campaign_dir, self.lake_root = Path(campaign_dir), Path(lake_root)
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.ref = None  # the running job's ObjectRef
        self.dirty = True  # something may have changed since the last gate check (a unit finished)
        self.last_check = 0.0
        self.lake = None  # one workers.lake.Lake for every check: it remembers the files it found whole
        self.reported: set[tuple[str, str]] = set()  # (unit_id, commit_id) of damaged shards already logged

    # ---- the store's record ------------------------------------------------------------
    def launches(self) -> list[dict[str, Any]]:
        return list(self.store.get_meta(LAUNCHES_KEY) or [])

    def _update(self, index: int, **fields: Any) -> dict[str, Any]:
        launches = self.launches()
        launches[index].update(fields)
        self.store.set_meta(LAUNCHES_KEY, launches)
        return launches[index]

    def last_launch_count(self) -> int:
        """Passing shards at the latest launch (0: never launched)."""
        launches = self.launches()
        return int(launches[-1]["passing"]) if launches else 0

    # ---- driving -------------------------------------------------------------------------
    def restart_unfinished(self, include_failed: bool = False) -> bool:
        """Start the latest launch again if a driver left it running or interrupted (and, with
        ``include_failed``, failed), in its own folder so it resumes. True when one started."""
        launches = self.launches()
        if self.policy == "never" or not launches:
            return False
        states = (IL_RUNNING, IL_INTERRUPTED) + ((IL_FAILED,) if include_failed else ())
        last = launches[-1]
        if last["state"] not in states:
            return False
        self.store.log_event("il_restart", f"launch {last['n']} ({last['state']}) restarted in {last['out_dir']}")
        self._update(len(launches) - 1, state=IL_RUNNING, error=None, restarts=int(last.get("restarts", 0)) + 1,
                     restarted_at=time.time())
        self._submit(last["out_dir"])
        return True

    def note_unit_finished(self) -> None:
        self.dirty = True

    def step(self, units_left: bool) -> bool:
        """Collect a finished job, check the gate when due and launch; True while a job is in flight.

        ``units_left``: units are still pending or running. With none left and a job running,
        this waits up to a second for it (the driver's loop has nothing else to do)."""
        if self.ref is not None:
            self._collect(timeout=0.0 if units_left else 1.0)
        if self.ref is None and self.policy != "never" and self.dirty:
            due = time.monotonic() - self.last_check >= 1.0 or not units_left
            if due and (self.policy == "when_passing" or not units_left):
                self._check_and_launch()
        return self.ref is not None

    def interrupt(self) -> None:
        """The driver is stopping: cancel the job, mark it interrupted (resume starts it again)."""
        import ray

        if self.ref is None:
            return
        try:
            ray.cancel(self.ref, force=True)
        except Exception:  # already gone: nothing to cancel
            pass
        self.ref = None
        launches = self.launches()
        if launches and launches[-1]["state"] == IL_RUNNING:
            self._update(len(launches) - 1, state=IL_INTERRUPTED)
            self.store.log_event("il_interrupted", f"launch {launches[-1]['n']}: driver stopped")

    # ---- internals -----------------------------------------------------------------------
    def _check_and_launch(self) -> None:
        self.dirty, self.last_check = False, time.monotonic()
        from workers.lake import Lake

        self.lake = self.lake or Lake(self.lake_root, self.cfg.lake)
        decision = self.check(self.lake)
        if decision.launch:
            self._launch(decision)

    def check(self, lake: Any) -> GateDecision:
        """Check the gate against the latest launch and record what it saw in the store."""
        decision = self.gate.check(lake, self.last_launch_count())
        for shard, problem in decision.damaged_shards:
            if (shard.unit_id, shard.commit_id) not in self.reported:
                self.reported.add((shard.unit_id, shard.commit_id))
                detail = f"{shard.path}: {problem}; not counted (`pianoforge resume` records it again)"
                log.warning("damaged shard of unit %s: %s", shard.unit_id, detail)
                self.store.log_event("shard_damaged", f"unit {shard.unit_id}: {detail}")
        self.store.set_meta(GATE_KEY, {"passing": decision.passing, "damaged": decision.damaged,
                                       "damaged_shards": [str(s.path) for s, _ in decision.damaged_shards[:10]],
                                       "needed": self.gate.min_shards,
                                       "threshold": self.gate.f1_threshold, "launch": self.policy,
                                       "relaunch_every": self.gate.relaunch_every, "checked_at": time.time()})
        return decision

    def _launch(self, decision: GateDecision) -> None:
        launches = self.launches()
        n = len(launches) + 1
        out_dir = self.campaign_dir / "il" / self.cfg.il.policy / f"launch-{n}"
        record = {"n": n, "passing": decision.passing, "songs": len(decision.song_hashes), "policy": self.cfg.il.policy,
                  "out_dir": str(out_dir), "state": IL_RUNNING, "launched_at": time.time(), "finished_at": None,
                  "policy_path": None, "mlflow_run_id": None, "steps": None, "loss": None, "error": None, "restarts": 0}
        self.store.set_meta(LAUNCHES_KEY, launches + [record])
        self.store.log_event("il_launch", f"launch {n}: {decision.passing} passing shards "
                                          f"(gate: {self.gate.min_shards} with F1 >= {self.gate.f1_threshold}) -> {out_dir}")
        log.info("gate open: %d passing shards; imitation learning launch %d -> %s", decision.passing, n, out_dir)
        self._submit(str(out_dir))

    def _submit(self, out_dir: str) -> None:
        import ray

        problem = self._resource_problem()
        if problem:  # it could never start: say so rather than wait forever
            self._finish_failed(problem)
            return
        from workers.tracking import outbox_path

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: it writes the campaign's MLflow outbox (SQLite: one writer host);
        # its DDP workers go wherever Ray Train places them.
        here = ray.get_runtime_context().get_node_id()
        task = ray.remote(run_imitation).options(num_cpus=0, max_retries=0, retry_exceptions=False,
                                                 scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
        self.ref = task.remote(str(self.lake_root), self.cfg.to_dict(), out_dir, self.tracking_uri, self.experiment,
                               str(outbox_path(self.campaign_dir)))

    def _resource_problem(self) -> str | None:
        import ray

        if self.cfg.slurm.pools:  # nodes come with the pools: can they ever hold the DDP workers?
            from slurm.pools import imitation_jobs

            try:
                imitation_jobs(self.cfg)
            except ValueError as e:
                return str(e)
            return None
        il, res = self.cfg.il, ray.cluster_resources()
        if res.get("CPU", 0) < il.num_workers:
            return (f"il.num_workers = {il.num_workers} needs {il.num_workers} CPUs; the Ray cluster has "
                    f"{res.get('CPU', 0):g}: lower il.num_workers")
        if il.use_gpu and res.get("GPU", 0) < il.num_workers:
            return f"il.use_gpu with il.num_workers = {il.num_workers} needs as many GPUs; the Ray cluster has {res.get('GPU', 0):g}"
        return None

    def _collect(self, timeout: float) -> None:
        import ray

        ready, _ = ray.wait([self.ref], timeout=timeout)
        if not ready:
            return
        ref, self.ref = self.ref, None
        self.dirty = True  # shards that passed meanwhile may call for a relaunch
        try:
            result = ray.get(ref)
        except Exception as e:  # a failed job is recorded; the campaign goes on
            from orchestrator.scheduler import describe_failure

            self._finish_failed(describe_failure(e)[1])
            return
        launches = self.launches()
        if result.get("mlflow_run_id") is None:  # not delivered yet: the driver records it when it is
            result.pop("mlflow_run_id", None)
        rec = self._update(len(launches) - 1, state=IL_SUCCEEDED, finished_at=time.time(), **result)
        self.store.log_event("il_succeeded", f"launch {rec['n']}: {rec['policy_path']} after {rec['steps']} steps"
                                             f" (loss {rec['loss']})")
        log.info("imitation learning launch %d succeeded: %s", rec["n"], rec["policy_path"])

    def _finish_failed(self, error: str) -> None:
        launches = self.launches()
        rec = self._update(len(launches) - 1, state=IL_FAILED, finished_at=time.time(), error=error)
        first = error.strip().splitlines()[0] if error.strip() else "unknown error"
        self.store.log_event("il_failed", f"launch {rec['n']}: {first[:500]}")
        log.warning("imitation learning launch %d failed: %s", rec["n"], first)


def record_il_run(store: Any, out_dir: str, run_id: str) -> None:
    """The MLflow run of the imitation job trained in ``out_dir``, in its launch record."""
    launches = list(store.get_meta(LAUNCHES_KEY) or [])
    changed = False
    for rec in launches:
        if Path(rec["out_dir"]).resolve() == Path(out_dir).resolve() and rec.get("mlflow_run_id") != run_id:
            rec["mlflow_run_id"], changed = run_id, True
    if changed:
        store.set_meta(LAUNCHES_KEY, launches)


def record_evaluation(store: Any, out_dir: str, run_id: str) -> None:
    """The MLflow run of an evaluation of the policy trained in ``out_dir``, in its launch record
    (the dashboard shows the latest launch's evaluation)."""
    launches = list(store.get_meta(LAUNCHES_KEY) or [])
    for rec in launches:
        if Path(rec["out_dir"]).resolve() == Path(out_dir).resolve():
            rec["eval_run_id"] = run_id
    store.set_meta(LAUNCHES_KEY, launches)
