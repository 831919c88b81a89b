"""The typed config: defaults match RP1M, overrides and profiles merge, mistakes are named."""

import pytest

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
