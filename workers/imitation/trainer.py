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
same step counter, same MLflow run. The finished policy is copied to ``out_dir/policy.pt``.

Metrics (``train/loss``, ``train/samples_per_s``, ``train/lr``) go from rank 0 to MLflow in
batches, when a tracking uri is given.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import configs
from workers.imitation.policies import atomic_torch_save, build_policy, policy_state
from configs.files import atomic_write, write_text_atomic

RUN_NAME = "ray_train"  # Ray Train's folder under out_dir; fixed so that a second call resumes
RUN_FILE = "il_run.json"  # out_dir's record of the MLflow run, so a resumed job logs to the same run


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


class MetricBatcher:
    """Collects metrics and sends them to MLflow in one ``log_batch`` call per flush."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, mlflow_cfg: Any):
        self.client = None
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)
        self.run_id, self.cfg = run_id, mlflow_cfg
        self.pending: list[Any] = []
        self.last_flush = time.monotonic()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.pending) >= self.cfg.max_batch or time.monotonic() - self.last_flush >= self.cfg.flush_interval_s:
            self.flush()

    def flush(self) -> None:
        while self.client is not None and self.pending:
            chunk, self.pending = self.pending[: self.cfg.max_batch], self.pending[self.cfg.max_batch :]
            self.client.log_batch(self.run_id, metrics=chunk)
        self.last_flush = time.monotonic()


def _save_checkpoint(folder: Path, policy: Any, optimizer: Any, step: int, song_hashes: list[str]) -> None:
    atomic_torch_save(policy_state(policy, step=step, song_hashes=song_hashes), folder / "policy.pt")
    atomic_torch_save(optimizer.state_dict(), folder / "optimizer.pt")


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: restore, stream the lake, step, log (rank 0), checkpoint."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader

    from workers.lake import TrajectoryDataset

    il, mlflow_cfg = configs.ILConfig(**config["il"]), configs.MlflowConfig(**config["mlflow"])
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
    metrics = MetricBatcher(config["tracking_uri"], config["run_id"], mlflow_cfg) if rank == 0 else None

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
            if metrics:
                metrics.log(logs, step)
            window_loss.zero_()
            window_n, window_start = 0, time.perf_counter()
        if step == il.steps:  # whole-run throughput, loader warm-up included; the benchmark reads it
            elapsed = time.perf_counter() - run_start
            logs["train/run_samples_per_s"] = (step - start_step) * il.batch_size * world / elapsed
            logs["worker/torch_threads"] = torch.get_num_threads()
        if step % il.checkpoint_interval == 0 or step == il.steps:
            if metrics:
                metrics.flush()
            report(step, logs, save=True)
        if step >= il.steps:
            break
    if step == start_step:  # nothing left to train: the restored checkpoint stays the result
        report(step, {}, save=False)


def _mlflow_run(out_dir: Path, tracking_uri: str | None, experiment: str | None, params: dict[str, Any]) -> str | None:
    """The MLflow run of this job: the one recorded in ``out_dir`` (a resumed job), else a new one."""
    if not tracking_uri:
        return None
    from mlflow.tracking import MlflowClient

    record = out_dir / RUN_FILE
    if record.exists():
        saved = json.loads(record.read_text())
        if saved.get("tracking_uri") == tracking_uri:
            return saved["run_id"]
    client = MlflowClient(tracking_uri)
    name = experiment or "pianoforge-il"
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=f"il-{params['policy']}", tags={"pianoforge.kind": "imitation"})
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    write_text_atomic(record, json.dumps({"tracking_uri": tracking_uri, "run_id": run.info.run_id, "experiment": name}))
    return run.info.run_id


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
    _fail_at_step: int | None = None,
) -> ILResult:
    """Train an imitation policy on the lake; blocks until done and returns where the policy is.

    ``policy`` (flow|bc) and ``num_workers`` override ``il.policy``/``il.num_workers``;
    ``min_f1`` defaults to ``gate.f1_threshold``. Ray is started in-process if it is not
    running. ``_fail_at_step`` kills the last worker once at that step (a failure drill).
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
    run_id = _mlflow_run(out_dir, tracking_uri, experiment, params)

    loop_config = {
        "il": il.model_dump(), "mlflow": cfg.mlflow.model_dump(), "policy": il.policy, "lake_root": str(lake_root), "min_f1": min_f1,
        "stats": {k: v.tolist() for k, v in stats.items()}, "song_hashes": song_hashes,
        "shards": shards, "tracking_uri": tracking_uri, "run_id": run_id,
        "fail_at_step": _fail_at_step, "fail_marker": str(out_dir / ".failure-drill-done"),
    }
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
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{out_dir}: imitation learning finished without a checkpoint")
    policy_path = out_dir / "policy.pt"
    with result.checkpoint.as_directory() as folder:
        with atomic_write(policy_path, "wb") as f, open(Path(folder) / "policy.pt", "rb") as src:
            shutil.copyfileobj(src, f)
    metrics = dict(result.metrics or {})
    return ILResult(policy_path=policy_path, steps=int(metrics.get("step", il.steps)),
                    start_step=int(metrics.get("start_step", 0)), metrics=metrics, song_hashes=song_hashes,
                    n_shards=len(shards), mlflow_run_id=run_id, checkpoint_path=result.checkpoint.path)
