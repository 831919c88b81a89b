"""Settings are honoured or refused, never accepted and ignored."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

import configs
from orchestrator.campaign import CampaignPaths, check_resume_overrides, load_saved_config

BENCH = Path(__file__).parent / "benchmarks"


@pytest.mark.parametrize("override, named", [("env.n_steps_lookahead=5", "env.n_steps_lookahead"),
                                             ("env.control_timestep=0.025", "env.control_timestep")])
def test_env_settings_the_layout_fixes_are_refused_at_config_time_naming_the_setting(override, named):
    with pytest.raises(configs.ConfigError) as e:
        configs.load(overrides=[override])
    assert f"--set {override}" in str(e.value) and named in str(e.value) and "not supported" in str(e.value)
    assert configs.load(overrides=["env.n_steps_lookahead=10", "env.control_timestep=0.05"]).env.n_steps_lookahead == 10


def test_the_fast_profile_uses_the_settings_its_learning_evidence_was_measured_with():
    spec = importlib.util.spec_from_file_location("bench_learning", BENCH / "bench_learning.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = json.loads((BENCH / "results" / "learning-grid" / "temp0.1-utd2-n3.json").read_text())["args"]
    measured = configs.load(overrides={**bench.GRID[run["grid"]], "droq.batch_size": run["batch"]}).droq
    assert configs.load(profile="fast").droq == measured


def test_resume_refuses_overrides_it_would_not_apply(tmp_path):
    paths = CampaignPaths.of(tmp_path, "c")
    paths.dir.mkdir(parents=True)
    paths.config.write_text(yaml.safe_dump(configs.load().to_dict()))
    assert load_saved_config(paths, ["gate.min_shards=3", "il.steps=10"]).gate.min_shards == 3
    for bad in ["specialist.total_steps=1000", "droq.batch_size=64", "env.chunk_steps=100", "lake.compression=snappy",
                "campaign.synthetic.steps=3"]:
        with pytest.raises(configs.ConfigError) as e:
            load_saved_config(paths, [bad])
        key = bad.split("=")[0]
        assert f"resume does not apply '{key}'" in str(e.value) and "campaign.*, mlflow.*, gate.*" in str(e.value)
    check_resume_overrides(["mlflow.close_timeout_s=3", "campaign.max_attempts=5"])
