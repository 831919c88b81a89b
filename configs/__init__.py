"""Typed configuration: ``default.yaml`` + a profile + overrides, validated once.

Every hyperparameter lives in the YAML files next to this module; code reads them only
through :class:`Config`. ``load(profile="local", overrides=["droq.batch_size=128"])``.

``default.yaml`` is the one place for every default: the models below declare types and
bounds, never a default value (``tests/test_configs.py`` checks both that no field has one and
that ``default.yaml`` sets every field). A config saved before a setting existed loads through
:func:`from_dict`, which merges it over ``default.yaml``. A key that no longer exists
(``REMOVED_KEYS``) is dropped: with a warning when a file or an override names it, silently
from a saved config (it was valid when saved).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import warnings
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

HERE = Path(__file__).resolve().parent
PROFILES = HERE / "profiles"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RewardConfig(_Section):
    ot_distance_threshold: float = Field(gt=0)
    collision_coef: float
    energy_coef: float
    ot_reduction: Literal["sum", "mean"]


# The observation layout (workers/piano/layout.py: an 11-step goal, 1144 entries), the lake's
# schema and fps, its LeRobot export and the imitation policies are built for RP1M's lookahead
# and control timestep; the env settings that would change them accept only these values.
LAYOUT_LOOKAHEAD = 10
LAYOUT_CONTROL_TIMESTEP = 0.05  # s: 20 control steps per second


class EnvConfig(_Section):
    control_timestep: float
    n_steps_lookahead: int
    gravity_compensation: bool
    trim_silence: bool
    stretch_factor: float = Field(gt=0)
    reduced_action_space: bool
    primitive_fingertip_collisions: bool
    disable_hand_collisions: bool
    disable_colorization: bool
    attachment_yaw: float
    wrong_press_termination: bool
    four_fingers: bool
    chunk_steps: int = Field(gt=0)
    reward: RewardConfig

    @field_validator("n_steps_lookahead")
    @classmethod
    def _layout_lookahead(cls, value: int) -> int:
        if value != LAYOUT_LOOKAHEAD:
            raise ValueError(f"{value} is not supported: only {LAYOUT_LOOKAHEAD} (RP1M's); the observation layout, "
                             f"the lake's schema and the imitation policies hold an {LAYOUT_LOOKAHEAD + 1}-step goal")
        return value

    @field_validator("control_timestep")
    @classmethod
    def _layout_timestep(cls, value: float) -> float:
        if not math.isclose(value, LAYOUT_CONTROL_TIMESTEP):
            raise ValueError(f"{value} s is not supported: only {LAYOUT_CONTROL_TIMESTEP} s (RP1M's); the lake and its "
                             f"LeRobot export record {round(1 / LAYOUT_CONTROL_TIMESTEP)} control steps per second")
        return value


class DroQConfig(_Section):
    hidden_dims: tuple[int, ...]
    activation: Literal["gelu", "relu", "tanh"]
    num_qs: int = Field(ge=1)
    critic_dropout: float = Field(ge=0, lt=1)
    critic_layer_norm: bool
    discount: float = Field(gt=0, le=1)
    actor_lr: float = Field(gt=0)
    critic_lr: float = Field(gt=0)
    temp_lr: float = Field(gt=0)
    adam_betas: tuple[float, float]
    adam_eps: float = Field(gt=0)
    batch_size: int = Field(gt=0)
    replay_capacity: int = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    tau: float = Field(gt=0, le=1)
    init_temperature: float = Field(gt=0)
    target_entropy: float | None
    utd_ratio: int = Field(ge=1)
    n_step: int = Field(ge=1)
    device: Literal["auto", "cpu", "cuda"]
    # float32 matmul precision of the learner (torch.set_float32_matmul_precision): "highest"
    # keeps full float32; "high"/"medium" let CUDA use TF32 and "medium" lets a CPU with bf16
    # support multiply in bfloat16 (8-bit mantissa inputs, float32 accumulation).
    matmul_precision: Literal["highest", "high", "medium"]
    # Multiply the observation's goal (979 entries, ~2% ones) into the first layers as sums of
    # weight rows instead of a dense matmul: the same function, float sums in another order.
    # "auto": on for a CPU learner whose observation has the piano goal (0.7x the update time
    # there, see tests/benchmarks/bench_pack.py); off on a GPU, where it would cost a host sync.
    sparse_goal: bool | Literal["auto"]


class BudgetConfig(_Section):
    """When a specialist stops before (or after) ``total_steps``; see ``workers.rl.budget``.
    Off in ``default.yaml``, so every unit trains exactly ``total_steps`` as in RP1M."""

    enabled: bool
    stop_at_f1: float | None = Field(ge=0, le=1)   # target; null: no target stop
    judge_evals: int = Field(ge=1)                 # evaluations judged together
    plateau_window: int | None = Field(ge=1)       # evaluations without improvement; null: no plateau stop
    plateau_margin: float = Field(gt=0)            # smoothed F1 rise that counts as an improvement
    min_steps: int = Field(ge=0)                   # no plateau stop before this step
    max_steps: int | None = Field(gt=0)            # cap for improving units; null: no extension

    @model_validator(mode="after")
    def _extension_needs_a_window(self) -> BudgetConfig:
        if self.max_steps is not None and self.plateau_window is None:
            raise ValueError("max_steps (the extension) needs plateau_window: it extends units still improving")
        return self


class SpecialistConfig(_Section):
    total_steps: int = Field(gt=0)
    eval_interval: int = Field(gt=0)
    eval_episodes: int = Field(ge=1)
    checkpoint_interval: int = Field(gt=0)
    log_interval: int = Field(gt=0)
    rollouts: int = Field(ge=0)
    seed: int
    # Rollout i plays (and samples its actions) with seed workers.rl.specialist.episode_seeds(...)[i].
    rollout_policy: Literal["stochastic", "deterministic"]
    video: bool  # a finished unit's clip as an artifact of its MLflow run
    budget: BudgetConfig

    @model_validator(mode="after")
    def _cap_not_below_budget(self) -> SpecialistConfig:
        cap = self.budget.max_steps
        if cap is not None and cap < self.total_steps:
            raise ValueError(f"budget.max_steps ({cap}) is below total_steps ({self.total_steps})")
        return self


class LakeConfig(_Section):
    compression: Literal["zstd", "snappy", "lz4", "gzip", "none"]
    compression_level: int | None
    row_group_rows: int = Field(gt=0)
    schema_version: int


class SyntheticConfig(_Section):
    sleep_s: float = Field(ge=0)
    episodes: int = Field(ge=1)
    steps_per_episode: int = Field(ge=1)
    f1_mean: float = Field(ge=0, le=1)
    steps: int = Field(ge=1)
    checkpoint_every: int = Field(ge=1)
    fail_pattern: str | None
    fail_first_attempts: int = Field(ge=0)


class CampaignConfig(_Section):
    root: str
    workload: Literal["specialist", "synthetic"]
    max_concurrent_units: int = Field(ge=0)
    max_attempts: int = Field(ge=1)
    node_loss_wait_s: float = Field(ge=0)
    cpus_per_unit: float = Field(ge=0)
    gpus_per_unit: float = Field(ge=0)
    pack_size: int = Field(ge=1)
    cpus_per_pack: float = Field(ge=0)
    gpus_per_pack: float | None = Field(ge=0)
    pack_refill: bool
    synthetic: SyntheticConfig

    def pack_resources(self, pool: "PoolConfig | None" = None) -> tuple[float, float]:
        """(CPUs, GPUs) one launch holds: a unit's with ``pack_size`` 1 (as before packs);
        for a pack, ``gpus_per_pack`` (None: one whole GPU when units use GPUs) and
        ``cpus_per_pack`` (0: on a GPU ``pool``, its cores split among its GPUs' packs;
        otherwise ``pack_size * cpus_per_unit``)."""
        if self.pack_size == 1:
            return self.cpus_per_unit, self.gpus_per_unit
        gpus = self.gpus_per_pack if self.gpus_per_pack is not None else (1.0 if self.gpus_per_unit > 0 else 0.0)
        if self.cpus_per_pack > 0:
            return self.cpus_per_pack, gpus
        if gpus > 0 and pool is not None and pool.gpus_per_job > 0:
            return pool.cpus_per_job * min(1.0, gpus / pool.gpus_per_job), gpus
        return self.pack_size * self.cpus_per_unit, gpus


class MlflowConfig(_Section):
    tracking_uri: str | None
    flush_interval_s: float = Field(gt=0)
    max_batch: int = Field(gt=0, le=1000)
    system_metrics: bool
    outbox_max_metrics: int = Field(gt=0)
    retry_max_s: float = Field(gt=0)
    close_timeout_s: float = Field(ge=0)


class GateConfig(_Section):
    f1_threshold: float = Field(ge=0, le=1)
    min_shards: int = Field(ge=1)
    relaunch_every: int = Field(ge=0)
    # When the campaign driver starts imitation learning once the gate opens:
    # when_passing: at once (the job waits in Ray's queue until il.num_workers CPUs are free);
    # after_campaign: once no unit is pending or running; never: only by hand (pianoforge train-il).
    launch: Literal["when_passing", "after_campaign", "never"]


class ILConfig(_Section):
    policy: Literal["flow", "bc"]
    action_chunk: int = Field(ge=1)
    d_model: int
    n_layers: int
    n_heads: int
    dropout: float
    time_schedule: Literal["beta", "uniform"]
    euler_steps: int = Field(ge=1)
    bc_hidden: int
    lr: float
    weight_decay: float
    batch_size: int
    steps: int
    shuffle_buffer: int
    num_workers: int = Field(ge=1)
    use_gpu: bool
    checkpoint_interval: int
    log_interval: int
    max_failures: int
    warmup_steps: int = Field(ge=0)
    seed: int
    replan_every: int = Field(ge=0)
    eval_max_steps: int = Field(ge=0)


class PoolConfig(_Section):
    partition: str
    cpus_per_job: int = Field(ge=1)
    gpus_per_job: int = Field(ge=0)
    mem_gb: float = Field(gt=0)
    time_min: int = Field(gt=0)
    min_jobs: int = Field(ge=0)
    max_jobs: int = Field(ge=0)


class SlurmConfig(_Section):
    head_port: int
    ray_tmp_root: str
    poll_interval_s: float = Field(gt=0)
    quick_end_s: float = Field(ge=0)
    max_backoff_s: float = Field(ge=0)
    pools: dict[str, PoolConfig]


class DashboardConfig(_Section):
    host: str
    port: int = Field(ge=0, le=65535)
    refresh_s: float = Field(gt=0)
    throughput_window_s: float = Field(gt=0)
    mlflow_ui_url: str | None
    learning_curve_metrics: tuple[str, ...]
    il_metrics: tuple[str, ...]
    max_curves: int = Field(ge=1)
    soundfont: str | None
    allowed_hosts: tuple[str, ...]


class ManifestConfig(_Section):
    """Bounds on what reading a song's MIDI file costs, counted on its bytes before mido builds a message."""

    max_midi_bytes: int = Field(gt=0)
    max_midi_events: int = Field(gt=0)
    max_song_notes: int = Field(gt=0)
    max_song_duration_s: float = Field(gt=0)


class RayConfig(_Section):
    dashboard: bool
    dashboard_host: str
    dashboard_port: int = Field(ge=0, le=65535)
    node_ip_address: str


class Config(_Section):
    env: EnvConfig
    droq: DroQConfig
    specialist: SpecialistConfig
    lake: LakeConfig
    campaign: CampaignConfig
    mlflow: MlflowConfig
    gate: GateConfig
    il: ILConfig
    slurm: SlurmConfig
    dashboard: DashboardConfig
    ray: RayConfig
    manifest: ManifestConfig

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self, *sections: str) -> str:
        """Stable short hash of the named sections (all when none): part of a unit's identity."""
        data = self.to_dict()
        if sections:
            data = {s: data[s] for s in sections}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> Config:
        return _validate(_apply_overrides(self.to_dict(), overrides), source="overrides", overrides=overrides)


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file and the field."""


class RemovedKeyWarning(UserWarning):
    """A config file or override names a key pianoforge no longer reads."""


# Keys configs once had, and why they went: named by an old file, override or saved config they are dropped.
REMOVED_KEYS: dict[str, str] = {
    "il.stats_steps": "the imitation learner normalises with the lake's statistics (meta/stats)",
}


def _drop_removed(data: dict, source: str | None) -> dict:
    """``data`` without the ``REMOVED_KEYS``; a warning naming ``source`` for each (None: silently)."""
    out = data
    for dotted, why in REMOVED_KEYS.items():
        section, key = dotted.split(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            if out is data:
                out = copy.deepcopy(data)
            del out[section][key]
            if source is not None:
                warnings.warn(f"{source}: config key '{dotted}' is no longer read ({why}); ignored",
                              RemovedKeyWarning, stacklevel=3)
    return out


def _deep_merge(base: dict, extra: dict, source: str, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        where = f"{prefix}{key}"
        if key not in out and not prefix.startswith("slurm.pools."):  # pool names are free
            raise ConfigError(f"{source}: unknown config key '{where}'")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value, source, where + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_overrides(data: dict, overrides: list[str] | dict[str, Any]) -> dict:
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    data = copy.deepcopy(data)
    for dotted, value in items:
        if dotted in REMOVED_KEYS:
            warnings.warn(f"override '{dotted}': config key '{dotted}' is no longer read ({REMOVED_KEYS[dotted]}); "
                          "ignored", RemovedKeyWarning, stacklevel=3)
            continue
        node = data
        parts = dotted.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                if node.get(p) is None and parts[0] == "slurm":
                    node[p] = {}
                else:
                    raise ConfigError(f"override '{dotted}': unknown config key '{p}'")
            node = node[p]
        if parts[-1] not in node and not dotted.startswith("slurm.pools."):
            raise ConfigError(f"override '{dotted}': unknown config key '{dotted}'")
        node[parts[-1]] = value
    return data


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. droq.batch_size=128")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _validate(data: dict, source: str, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """The config, or a :class:`ConfigError` naming what is wrong: the override that set a bad
    value (as given: ``--set key=value``), else ``source``."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        locs = [".".join(str(x) for x in err["loc"]) for err in e.errors()]
        given = ([(k, f"{k}={v!r}") for k, v in overrides.items()] if isinstance(overrides, dict)
                 else [(_split_override(o)[0], f"--set {o}") for o in overrides or []])
        blamed = [text for key, text in given if any(loc == key or loc.startswith(key + ".") for loc in locs)]
        by_file = any(not any(loc == key or loc.startswith(key + ".") for key, _ in given) for loc in locs)
        lines = [f"{', '.join(blamed + ([source] if by_file else []))}: invalid config"]
        for loc, err in zip(locs, e.errors()):
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def load(
    profile: str | None = "local",
    files: list[str | Path] | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Config:
    """Default YAML, then the profile, then each file, then ``key.sub=value`` overrides."""
    data = _read_yaml(HERE / "default.yaml")
    sources = []
    if profile:
        p = PROFILES / f"{profile}.yaml"
        if not p.exists():
            known = ", ".join(sorted(x.stem for x in PROFILES.glob("*.yaml")))
            raise ConfigError(f"unknown profile '{profile}' (known: {known})")
        sources.append(p)
    sources += [Path(f) for f in files or []]
    for src in sources:
        data = _deep_merge(data, _drop_removed(_read_yaml(src), str(src)), str(src))
    if overrides:
        data = _apply_overrides(data, overrides)
    return _validate(data, source=str(sources[-1]) if sources else "default.yaml", overrides=overrides)


def from_dict(data: dict[str, Any], source: str = "saved config") -> Config:
    """Rebuild a config saved with ``Config.to_dict()`` (e.g. in a campaign directory), merged
    over today's defaults so that a config saved before a setting existed still loads."""
    return _validate(_deep_merge(_defaults(), _drop_removed(data, None), source), source=source)


@functools.lru_cache(maxsize=1)
def _defaults() -> dict:
    """``default.yaml`` read once per process (``from_dict`` runs for every unit attempt); callers copy it."""
    return _read_yaml(HERE / "default.yaml")
