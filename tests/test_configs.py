"""The typed config: defaults match RP1M, overrides and profiles merge, mistakes are named."""

import typing
import warnings
from pathlib import Path

import pytest
import yaml

import configs
from configs import ConfigError


def test_overrides_are_typed_and_change_the_hash():
    base = configs.load()
    cfg = configs.load(overrides=["droq.batch_size=64", "specialist.total_steps=1000", "env.four_fingers=true"])
    assert cfg.droq.batch_size == 64 and cfg.specialist.total_steps == 1000 and cfg.env.four_fingers is True
    assert cfg.hash("env", "droq") != base.hash("env", "droq")
    assert cfg.hash("lake") == base.hash("lake")
    assert base.with_overrides({"droq.batch_size": 64}).droq.batch_size == 64


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="droq.batchsize"):
        configs.load(overrides=["droq.batchsize=64"])


def test_bad_value_names_the_field():
    with pytest.raises(ConfigError, match=r"droq\.discount"):
        configs.load(overrides=["droq.discount=1.5"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        configs.load(overrides=["droq.discount"])


def test_user_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("droq:\n  warmup_steps: -3\n")
    with pytest.raises(ConfigError, match="mine.yaml") as e:
        configs.load(files=[bad])
    assert "droq.warmup_steps" in str(e.value)
    typo = tmp_path / "typo.yaml"
    typo.write_text("drq:\n  warmup_steps: 3\n")
    with pytest.raises(ConfigError, match="typo.yaml: unknown config key 'drq'"):
        configs.load(files=[typo])


def test_profiles_and_saved_config_round_trip():
    slurm = configs.load(profile="slurm")
    assert "cpu" in slurm.slurm.pools and slurm.slurm.pools["cpu"].max_jobs >= 1
    assert configs.from_dict(slurm.to_dict()) == slurm
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        configs.load(profile="nope")


# --- default.yaml is the one place for every default -----------------------------------------
def _sections() -> set[type]:
    found, todo = set(), [configs._Section]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.add(sub)
            todo.append(sub)
    return found


def test_no_config_field_has_a_default_in_python():
    with_default = [f"{cls.__name__}.{name}" for cls in _sections() for name, field in cls.model_fields.items()
                    if not field.is_required()]
    assert not with_default, f"give these their value in configs/default.yaml, not in Python: {with_default}"


def test_default_yaml_sets_every_field_of_every_section():
    defaults = yaml.safe_load((Path(configs.__file__).parent / "default.yaml").read_text())
    missing, reached = [], set()

    def walk(cls: type, data: dict, where: str) -> None:
        reached.add(cls)
        for name, field in cls.model_fields.items():
            if name not in data:
                missing.append(where + name)
                continue
            kind, args = typing.get_origin(field.annotation), typing.get_args(field.annotation)
            if isinstance(field.annotation, type) and issubclass(field.annotation, configs._Section):
                walk(field.annotation, data[name], f"{where}{name}.")
            elif kind is dict and isinstance(args[1], type) and issubclass(args[1], configs._Section):
                reached.add(args[1])  # named entries (slurm.pools): every field set per entry, in a profile
                for key, value in data[name].items():
                    walk(args[1], value, f"{where}{name}.{key}.")

    walk(configs.Config, defaults, "")
    assert not missing, f"configs/default.yaml lacks {missing}"
    assert _sections() <= reached, f"sections not reachable from Config: {_sections() - reached}"


def test_config_saved_before_newer_settings_existed_loads_with_todays_defaults():
    saved = configs.load().to_dict()
    for section in ("dashboard", "ray", "manifest"):
        del saved[section]
    for section, key in [("specialist", "budget"), ("specialist", "rollout_policy"), ("droq", "matmul_precision"),
                         ("droq", "sparse_goal"), ("campaign", "pack_size"), ("gate", "launch"), ("il", "seed")]:
        del saved[section][key]
    assert configs.from_dict(saved) == configs.load()


def test_a_removed_key_is_ignored_with_a_warning_naming_where_it_was(tmp_path):
    """``il.stats_steps`` is no longer read: an old file or override naming it loads with a warning,
    an old saved config silently; a key that never existed is still an error."""
    old = tmp_path / "old.yaml"
    old.write_text("il:\n  stats_steps: 500\n  steps: 7\n")
    with pytest.warns(configs.RemovedKeyWarning, match=rf"{old}: config key 'il.stats_steps' is no longer read"):
        cfg = configs.load(files=[old])
    assert cfg.il.steps == 7 and "stats_steps" not in cfg.to_dict()["il"]
    with pytest.warns(configs.RemovedKeyWarning, match="override 'il.stats_steps'"):
        assert configs.load(overrides=["il.stats_steps=100"]) == configs.load()
    saved = configs.load().to_dict()
    saved["il"]["stats_steps"] = 50000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert configs.from_dict(saved) == configs.load()
    assert saved["il"]["stats_steps"] == 50000  # the caller's dict is left as it was
    with pytest.raises(configs.ConfigError, match="unknown config key 'il.stats_stepz'"):
        configs.load(overrides=["il.stats_stepz=1"])
