"""Distributed imitation learning on the trajectory lake: Ray Train ``TorchTrainer`` + DDP.

``train_il(lake_root, cfg, out_dir)`` trains the ``il.policy`` (flow or bc, see
``workers.imitation.policies``) on the lake's train-split shards whose specialist F1 is at least
``min_f1`` (default: the gate's threshold). Each of ``il.num_workers`` workers streams its
own part of the lake through ``TrajectoryDataset`` (which splits row groups across ranks);
``il.batch_size`` is per worker, so the global batch is ``num_workers * il.batch_size``.
Observation/action normalisation comes from the lake's per-shard statistics (exact over every
selected step, no data read; see ``workers.lake.stats``) and is stored in the policy. The learning rate warms up linearly, then decays (``lr_at``).

Fault tolerance: every ``il.checkpoint_interval`` steps rank 0 reports a checkpoint
(``policy.pt``: weights, normalisation, step, trained-on songs; ``optimizer.pt``), all plain
tensors loadable with ``weights_only=True``. Ray Train keeps them under ``out_dir/ray_train``;
a failed worker group restarts from the latest one (``il.max_failures`` times), and calling
``train_il`` again with the same ``out_dir`` (e.g. with more ``il.steps``) continues from it:
same step counter, same MLflow run. The finished policy is published as ``out_dir/policy.pt``
only when the run succeeded, loaded back and checked to be of the step the run reached, then
renamed into place (``publish_policy``): a failed or interrupted run never leaves a part of one.

Metrics (``train/loss``, ``train/samples_per_s``, ``train/lr``) go from rank 0 to MLflow through
an outbox (``workers.tracking``; the campaign's when the gate launched the job), when a tracking
uri is given: training never waits on the tracking server, and the run (keyed by ``out_dir``, so
a resumed job logs to the same run) ends FINISHED or FAILED once delivered.
"""

from __future__ import annotations

import io
import math
import os
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import configs
from workers.imitation.policies import atomic_torch_save, build_policy, policy_from_state, policy_state
from configs.files import atomic_write
from workers.tracking import OUTBOX_FILE, Outbox, il_key

RUN_NAME = "ray_train"  # Ray Train's folder under out_dir; fixed so that a second call resumes


@dataclass
class ILResult:
    """What a finished imitation-learning job produced."""

    policy_path: Path  # out_dir/policy.pt: load with workers.imitation.policies.load_policy
    steps: int  # the step the policy reached
    start_step: int  # where the last (re)start of the worker group picked up from its checkpoint
    metrics: dict[str, Any]  # the last reported metrics (train/loss, train/samples_per_s, train/lr, ...)
    song_hashes: list[str]  # songs of the shards trained on ("seen" in evaluation)
    n_shards: int
    mlflow_run_id: str | None = None
    checkpoint_path: str | None = None  # Ray Train's latest checkpoint folder
    worker_hosts: list[str] | None = None  # the host of each rank, in rank order (as of the last step)


def lr_at(step: int, il: Any) -> float:
    """Linear warm-up over ``il.warmup_steps``, then cosine decay to 10% of ``il.lr`` at ``il.steps``."""
    if step < il.warmup_steps:
        return il.lr * (step + 1) / il.warmup_steps
    progress = min(1.0, (step - il.warmup_steps) / max(1, il.steps - il.warmup_steps))
    return il.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def dataset_stats(lake_root: Path, shards: list[Any]) -> dict[str, np.ndarray]:
    """Normalisation statistics over every step of ``shards``, from the lake's per-shard statistics
    (``meta/stats/<unit_id>.npz``, written when each shard committed): no row of data is read,
    however large the lake (shards committed before the lake kept statistics are read once)."""
    from workers.lake import Lake
    from workers.lake.stats import normalization_from
    from workers.piano.layout import GOAL_BITS

    moments = Lake(lake_root).stats(shards)
    if moments is None:
        raise ValueError(f"{lake_root}: no shards to take normalisation statistics from")
    return normalization_from(moments, GOAL_BITS)


def _save_checkpoint(folder: Path, policy: Any, optimizer: Any, step: int, song_hashes: list[str]) -> None:
    atomic_torch_save(policy_state(policy, step=step, song_hashes=song_hashes), folder / "policy.pt")
    atomic_torch_save(optimizer.state_dict(), folder / "optimizer.pt")


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: restore, stream the lake, step, log (rank 0), checkpoint."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader

    from workers.lake import TrajectoryDataset

    il = configs.ILConfig(**config["il"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    policy = build_policy(il, kind=config["policy"])
    policy.set_normalization(config["stats"])
    optimizer = torch.optim.AdamW(policy.parameters(), lr=il.lr, weight_decay=il.weight_decay)
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "policy.pt", map_location="cpu", weights_only=True)
            policy.load_state_dict(state["model"])
            optimizer.load_state_dict(torch.load(Path(folder) / "optimizer.pt", map_location="cpu", weights_only=True))
            start_step = int(state["meta"]["step"])
    model = ray.train.torch.prepare_model(policy)  # moves to the device, wraps in DDP when world > 1
    torch.manual_seed(il.seed + 1000 * rank + start_step)

    # The driver's shard listing, so every rank reads the same lake however it grows meanwhile;
    # repeat=True streams epoch after epoch, so every rank runs the same number of steps (DDP needs
    # it). A resumed run reshuffles with a new seed rather than replaying the same first batches.
    dataset = TrajectoryDataset(config["lake_root"], min_f1=config["min_f1"], splits=("train",),
                                shuffle_buffer=il.shuffle_buffer, seed=il.seed + start_step,
                                action_chunk=il.action_chunk, shards=config["shards"], repeat=True)
    loader = DataLoader(dataset, batch_size=il.batch_size, num_workers=0)
    run_log = config.get("run_log") if rank == 0 else None  # a RunLog actor on the coordinator's node
    hosts = [socket.gethostname()] * world
    if world > 1:
        torch.distributed.all_gather_object(hosts, socket.gethostname())

    def batches():
        for batch in loader:
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def report(step: int, logs: dict[str, float], save: bool) -> None:
        logs = dict(logs, step=step, start_step=start_step)
        if save and rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                _save_checkpoint(Path(folder), policy, optimizer, step, config["song_hashes"])
                ray.train.report(logs, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(logs)

    step, window_loss, window_n = start_step, torch.zeros((), device=device), 0
    window_start = run_start = time.perf_counter()
    logs: dict[str, float] = {}
    model.train()
    for batch in batches() if step < il.steps else ():
        lr = lr_at(step, il)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        window_loss += loss.detach()
        window_n += 1
        if config.get("fail_at_step") == step and rank == world - 1 and not Path(config["fail_marker"]).exists():
            Path(config["fail_marker"]).touch()  # a drill: this worker dies once, the group restarts
            time.sleep(3.0)  # let the controller's health check (every 2 s) register the last checkpoint
            os._exit(1)
        if step % il.log_interval == 0 or step == il.steps:
            if world > 1:  # the loss of the whole global batch, not only rank 0's share
                torch.distributed.all_reduce(window_loss)
            elapsed = time.perf_counter() - window_start
            logs = {"train/loss": window_loss.item() / (window_n * world), "train/lr": lr,
                    "train/samples_per_s": window_n * il.batch_size * world / max(elapsed, 1e-9)}
            if run_log:
                run_log.log.remote(config["run_key"], logs, step)
            window_loss.zero_()
            window_n, window_start = 0, time.perf_counter()
        if step == il.steps:  # whole-run throughput, loader warm-up included; the benchmark reads it
            elapsed = time.perf_counter() - run_start
            logs["train/run_samples_per_s"] = (step - start_step) * il.batch_size * world / elapsed
            logs["worker/torch_threads"] = torch.get_num_threads()
            logs["worker_hosts"] = hosts  # where each rank ran, in rank order
        if step % il.checkpoint_interval == 0 or step == il.steps:
            if run_log:
                ray.get(run_log.flush.remote())
            report(step, logs, save=True)
        if step >= il.steps:
            break
    if step == start_step:  # nothing left to train: the restored checkpoint stays the result
        report(step, {}, save=False)
    if run_log:
        ray.get(run_log.flush.remote())  # the metrics are in the outbox; whoever holds its send lock delivers them


class RunLog:
    """Rank 0's metrics into the outbox. A Ray actor on the coordinator's node: workers run on
    other hosts, and the outbox (SQLite) is written from one host only."""

    def __init__(self, config: dict[str, Any]):
        self.outbox = _outbox(config)

    def log(self, key: str, metrics: dict[str, Any], step: int) -> None:
        self.outbox.log(key, metrics, step)

    def flush(self) -> None:
        self.outbox.flush()


def _outbox(config: dict[str, Any]) -> Outbox:
    return Outbox(config["outbox"], config["tracking_uri"], configs.MlflowConfig(**config["mlflow"]))


def train_il(
    lake_root: str | Path,
    cfg: configs.Config,
    out_dir: str | Path,
    *,
    policy: str | None = None,
    num_workers: int | None = None,
    min_f1: float | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    outbox: str | Path | None = None,
    _fail_at_step: int | None = None,
) -> ILResult:
    """Train an imitation policy on the lake; blocks until done and returns where the policy is.

    ``policy`` (flow|bc) and ``num_workers`` override ``il.policy``/``il.num_workers``;
    ``min_f1`` defaults to ``gate.f1_threshold``. Ray is started in-process if it is not
    running. ``outbox``: the MLflow outbox file (default ``out_dir/mlflow-outbox.db``).
    ``_fail_at_step`` kills the last worker once at that step (a failure drill).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from workers.lake import Lake

    lake_root, out_dir = Path(lake_root).resolve(), Path(out_dir).resolve()
    overrides: dict[str, Any] = {}
    if policy:
        overrides["il.policy"] = policy
    if num_workers:
        overrides["il.num_workers"] = num_workers
    cfg = cfg.with_overrides(overrides) if overrides else cfg
    il = cfg.il
    min_f1 = cfg.gate.f1_threshold if min_f1 is None else float(min_f1)

    lake = Lake(lake_root, cfg.lake)
    shards, damaged = lake.split_damaged(lake.shards(min_f1=min_f1, split="train"))
    if damaged:
        warnings.warn(f"{lake_root}: leaving out {len(damaged)} damaged shard(s): "
                      + "; ".join(f"{s.path}: {problem}" for s, problem in damaged[:5]))
    if not shards:
        raise ValueError(f"{lake_root}: no committed train shards with specialist F1 >= {min_f1}")
    song_hashes = sorted({s.song_hash for s in shards})
    pieces = sum(max(1, s.n_row_groups) for s in shards)  # the dataset's unit of work: a row group
    if pieces < il.num_workers:
        raise ValueError(f"{lake_root}: {len(shards)} passing shard(s) hold {pieces} row group(s), fewer than "
                         f"il.num_workers = {il.num_workers}; some workers would get no data")
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = dataset_stats(lake_root, shards)

    params = {f"il.{k}": v for k, v in il.model_dump(mode="json").items()}
    params.update(policy=il.policy, lake=str(lake_root), min_f1=min_f1, n_shards=len(shards), n_damaged_shards=len(damaged),
                  n_songs=len(song_hashes))
    key, tracker = il_key(out_dir), None
    loop_config = {
        "il": il.model_dump(), "mlflow": cfg.mlflow.model_dump(), "policy": il.policy, "lake_root": str(lake_root), "min_f1": min_f1,
        "stats": {k: v.tolist() for k, v in stats.items()}, "song_hashes": song_hashes,
        "shards": shards, "tracking_uri": tracking_uri, "run_key": key, "outbox": str(outbox or out_dir / OUTBOX_FILE),
        "fail_at_step": _fail_at_step, "fail_marker": str(out_dir / ".failure-drill-done"),
    }
    run_log = None
    if tracking_uri:  # opened (or reopened, for a resumed job) before any worker logs to it
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        tracker = _outbox(loop_config)
        tracker.start_run(key, experiment or "pianoforge-il", f"il-{il.policy}", tags={"pianoforge.kind": "imitation"},
                          params=params)
        tracker.start_sender()
        if not ray.is_initialized():  # as the trainer would start it
            ray.init()
        here = ray.get_runtime_context().get_node_id()
        run_log = ray.remote(RunLog).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(loop_config)
        loop_config["run_log"] = run_log
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=il.num_workers, use_gpu=il.use_gpu),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=str(out_dir),
            failure_config=FailureConfig(max_failures=il.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    status = "FAILED"
    try:
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"{out_dir}: imitation learning finished without a checkpoint")
        status = "FINISHED"
    finally:
        if run_log is not None:
            ray.kill(run_log)
        run_id = _close_run(tracker, key, status, cfg.mlflow.close_timeout_s) if tracker else None
    metrics = dict(result.metrics or {})
    policy_path = out_dir / "policy.pt"
    with result.checkpoint.as_directory() as folder:
        publish_policy(Path(folder) / "policy.pt", policy_path, int(metrics.get("step", il.steps)))
    return ILResult(policy_path=policy_path, steps=int(metrics.get("step", il.steps)), worker_hosts=metrics.get("worker_hosts"),
                    start_step=int(metrics.get("start_step", 0)), metrics=metrics, song_hashes=song_hashes,
                    n_shards=len(shards), mlflow_run_id=run_id, checkpoint_path=result.checkpoint.path)


def publish_policy(source: Path, policy_path: Path, step: int) -> None:
    """Make the finished run's policy ``policy_path``: its bytes are loaded back and checked to be
    a whole policy of ``step`` (the step the run reached) before they are written under a
    temporary name and renamed; a reader sees the previous policy or this one, never a part. A
    checkpoint that does not load, or holds another step, raises and publishes nothing."""
    data = source.read_bytes()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        policy_from_state(state)
        found = int(state["meta"]["step"])
    except Exception as e:  # noqa: BLE001 - torch, zipfile and pickle raise many types for a damaged file
        raise RuntimeError(f"{source}: the run's last checkpoint is not a whole policy ({type(e).__name__}: {e}); "
                           f"{policy_path} not published") from e
    if found != step:
        raise RuntimeError(f"{source}: the run's last checkpoint holds step {found}, not the {step} it reached; "
                           f"{policy_path} not published")
    with atomic_write(policy_path, "wb") as f:
        f.write(data)


def _close_run(tracker: Any, key: str, status: str, wait_s: float) -> str | None:
    """End the job's run; deliver for up to ``wait_s`` seconds. Returns its MLflow id once delivered."""
    import logging

    tracker.end_run(key, status)
    left = tracker.stop(wait_s)
    run_id = tracker.run_id(key)
    tracker.close()
    if not left.empty and not tracker.path.with_name("campaign.db").exists():  # a campaign's driver says it itself
        logging.getLogger(__name__).warning(left.describe(tracker.uri, tracker.sync_hint))
    return run_id
