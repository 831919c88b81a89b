"""Watching and replaying what a unit learned: find a unit's song, config and lake shard from its
directory, render its recorded rollouts, play and export its policy.

A unit directory knows its unit from either

- ``unit.json`` next to the checkpoint (written by ``pianoforge specialist``: the unit's spec,
  its resolved config and its lake), or
- the campaign around it (``<campaign>/units/<unit_id>``: the spec and config in
  ``campaign.db``, the lake in ``<campaign>/lake``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import configs
from configs.files import write_json_atomic
from workers.units import UnitSpec

UNIT_FILE = "unit.json"


class UnitNotFound(FileNotFoundError):
    """The folder is not a unit directory this can read; the message says what is missing."""


@dataclass
class UnitView:
    """A unit as found from its directory."""

    unit_dir: Path
    spec: UnitSpec
    cfg: configs.Config
    lake_root: Path

    def shard(self):
        """The unit's committed lake shard, or None."""
        from workers.lake import Lake

        return next((s for s in Lake(self.lake_root).shards() if s.unit_id == self.spec.unit_id), None)


def write_unit_file(unit_dir: Path, spec: UnitSpec, cfg: configs.Config, lake_root: Path) -> Path:
    """Record the unit's spec, config and lake in ``unit_dir/unit.json`` (for render, play, export)."""
    return write_json_atomic(Path(unit_dir) / UNIT_FILE, {"spec": spec.model_dump(mode="json"), "config": cfg.to_dict(),
                                                          "lake": str(Path(lake_root).absolute())})


def resolve_unit(unit_dir: str | Path) -> UnitView:
    """The unit in ``unit_dir`` (see the module docstring for where it is looked up)."""
    unit_dir = Path(unit_dir).absolute()
    if not unit_dir.is_dir():
        raise UnitNotFound(f"{unit_dir}: no such unit directory")
    record = unit_dir / UNIT_FILE
    if record.exists():
        data = json.loads(record.read_text())
        spec = UnitSpec(**data["spec"])
        try:
            cfg = configs.from_dict(data["config"])
        except configs.ConfigError as e:
            raise UnitNotFound(f"{record}: its config no longer loads ({e})") from None
        return UnitView(unit_dir, spec, spec.config(cfg), Path(data["lake"]))
    campaign = unit_dir.parent.parent
    if unit_dir.parent.name == "units" and (campaign / "campaign.db").exists():
        from orchestrator.store import CampaignStore, StoreError

        with CampaignStore(campaign / "campaign.db", readonly=True) as store:
            try:
                row = store.unit(unit_dir.name)
            except StoreError:
                raise UnitNotFound(f"{unit_dir}: campaign {campaign.name} has no unit {unit_dir.name}") from None
            spec, cfg = row.spec, configs.from_dict(store.get_config(row.config_key))
        return UnitView(unit_dir, spec, spec.config(cfg), campaign / "lake")
    raise UnitNotFound(f"{unit_dir}: not a unit directory (no {UNIT_FILE}, and not <campaign>/units/<unit_id>)")


def specialist_policy_state(view: UnitView) -> dict:
    """The unit's trained actor in the exported form (``workers.imitation.export``)."""
    from workers.imitation.export import specialist_state
    from workers.piano.env import make_env
    from workers.piano.music import load_chunk, song_limits
    from workers.rl import checkpoints
    from workers.rl.specialist import CHECKPOINT, read_result

    loaded = checkpoints.load(view.unit_dir / CHECKPOINT)
    checkpoint = loaded.state
    if checkpoint is None and loaded.damaged:
        raise UnitNotFound(f"{view.unit_dir}: its checkpoint is damaged, nothing to play or export: "
                           + "; ".join(loaded.messages[:len(loaded.damaged)]))
    if checkpoint is None:
        raise UnitNotFound(f"{view.unit_dir}: no checkpoint.pt: the unit has not trained yet")
    midi = load_chunk(view.spec.song_path, view.spec.chunk_index, view.cfg.env, expected_hash=view.spec.song_hash,
                      limits=song_limits(view.cfg.manifest))
    env = make_env(midi, view.cfg.env)  # the action bounds the actor was trained in
    try:
        low, high = env.action_low, env.action_high
    finally:
        env.close()
    result = read_result(view.unit_dir) or {}
    meta = {"unit_id": view.spec.unit_id, "song_hash": view.spec.song_hash, "song_name": view.spec.song_name,
            "chunk_index": view.spec.chunk_index, "step": int(checkpoint.get("step", 0)),
            "f1": result.get("f1"), "done": bool(result.get("done")), "config_hash": view.spec.config_hash}
    return specialist_state(checkpoint, action_low=low, action_high=high, activation=view.cfg.droq.activation,
                            meta=meta)


def render_unit(view: UnitView, out: Path, *, seed: int | None = None, width: int = 640, height: int = 480,
                max_steps: int | None = None, soundfont: str | None = None, quality: str = "fast",
                poster: Path | None = None, progress: bool = False):
    """Render the unit's best recorded rollout (or the one with ``seed``) to ``out``, replayed from
    the lake's actions; without a shard, the unit's policy plays (deterministically) from ``seed``.
    ``poster``, ``progress``: see :func:`workers.piano.render.render_in_process`."""
    import tempfile

    from workers.imitation.export import save_state
    from workers.lake import Lake
    from workers.lake.episodes import read_episode
    from workers.piano.render import render_rollout

    spec = view.spec
    shard = view.shard()
    common = dict(width=width, height=height, max_steps=max_steps, soundfont=soundfont, song_hash=spec.song_hash,
                  quality=quality, poster=poster, progress=progress)
    if shard is not None:
        episode = read_episode(Lake(view.lake_root), shard, seed=seed)
        return render_rollout(spec.song_path, spec.chunk_index, view.cfg.env, out, actions=episode.action,
                              seed=episode.seed, **common)
    with tempfile.TemporaryDirectory(prefix="pianoforge-policy-") as tmp:
        policy = save_state(specialist_policy_state(view), Path(tmp) / "policy.pt")
        return render_rollout(spec.song_path, spec.chunk_index, view.cfg.env, out, policy=policy,
                              seed=spec_seed(view) if seed is None else seed, **common)


def spec_seed(view: UnitView) -> int:
    """The seed of the unit's first rollout."""
    from workers.rl.specialist import episode_seeds

    return episode_seeds(view.cfg.specialist, 1)[0]
