"""Policies on their own: a specialist exported as plain tensors (loadable without pianoforge),
and ``pianoforge play`` running a unit's specialist, an exported one or an imitation policy."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import configs
from env_fixtures import TWINKLE
from unit_fixtures import ffprobe, tiny_unit


@pytest.fixture(scope="module")
def unit(tmp_path_factory):
    return tiny_unit(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def exported(unit, tmp_path_factory):
    from orchestrator.cli import app

    out = tmp_path_factory.mktemp("export") / "specialist.pt"
    result = CliRunner().invoke(app, ["export-policy", str(unit), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def plain_pytorch_action(p: dict, obs: np.ndarray) -> np.ndarray:
    """The recipe in docs/research.md, with nothing from pianoforge."""
    h = torch.as_tensor(obs)
    for W, b in p["hidden"]:
        h = getattr(F, p["activation"])(h @ W.T + b)
    a = torch.tanh(h @ p["mean"][0].T + p["mean"][1])
    return (p["action_low"] + (a + 1) / 2 * (p["action_high"] - p["action_low"])).numpy()


def test_exported_specialist_acts_like_the_trained_agent(unit, exported):
    from workers.lake import Lake
    from workers.rl.droq import DroQ
    from workers.rl.specialist import load_agent, load_checkpoint
    from orchestrator.playback import resolve_unit

    p = torch.load(exported, weights_only=True)
    assert p["kind"] == "specialist" and p["obs_dim"] == 1144 and p["action_dim"] == 39
    view = resolve_unit(unit)
    assert p["meta"]["unit_id"] == view.spec.unit_id and p["meta"]["done"]

    agent = DroQ(1144, 39, p["action_low"].numpy(), p["action_high"].numpy(), view.cfg.droq, device="cpu")
    load_agent(agent, 0, load_checkpoint(unit)["agent"])  # a finished unit keeps its policy only
    obs = Lake(view.lake_root).read_episodes(view.shard())[0].obs[:8]
    np.testing.assert_allclose(plain_pytorch_action(p, obs), agent.act(obs[None], deterministic=True)[0], atol=1e-5)


def test_play_a_unit_and_its_exported_policy_alike(unit, exported):
    from orchestrator.cli import app

    from_unit = CliRunner().invoke(app, ["play", str(unit), "--episodes", "2"])
    assert from_unit.exit_code == 0, from_unit.output
    f1s = [float(x) for x in re.findall(r"F1 ([0-9.]+)\n", from_unit.output)]
    assert len(f1s) == 2 and all(0 <= f <= 1 for f in f1s) and "mean F1" in from_unit.output
    from_file = CliRunner().invoke(app, ["play", str(exported), "--song", str(TWINKLE), "--chunk", "0",
                                         "--set", "env.chunk_steps=20"])
    assert from_file.exit_code == 0, from_file.output
    # The same deterministic policy on the same chunk: the same F1.
    assert re.search(r"episode 0 .*F1 ([0-9.]+)", from_file.output).group(1) == \
        re.search(r"episode 0 .*F1 ([0-9.]+)", from_unit.output).group(1)


def test_play_an_imitation_policy_and_render_it(tmp_path):
    from orchestrator.cli import app
    from workers.imitation.policies import build_policy, save_policy

    il = configs.load(overrides=["il.d_model=16", "il.n_layers=1", "il.n_heads=2", "il.action_chunk=4",
                                 "il.euler_steps=2"]).il
    path = save_policy(build_policy(il, kind="flow"), tmp_path / "policy.pt", step=0, song_hashes=[])
    out = tmp_path / "flow.mp4"
    result = CliRunner().invoke(app, ["play", str(path), "--song", str(TWINKLE), "--max-steps", "6", "--render",
                                      str(out), "--width", "64", "--height", "48"])
    assert result.exit_code == 0, result.output
    assert "episode 0 (seed 0): 6 steps" in result.output
    streams = ffprobe(out)
    assert int(streams["video"]["nb_read_frames"]) == 6 + 20 and "audio" in streams


def test_play_refuses_a_policy_file_without_a_song(exported):
    from orchestrator.cli import app

    result = CliRunner().invoke(app, ["play", str(exported)])
    assert result.exit_code == 2 and "needs --song" in result.output


def test_action_names_follow_the_environments_actuators():
    from env_fixtures import env_config, twinkle
    from workers.piano.env import make_env
    from workers.piano.layout import ACTION_NAMES

    env = make_env(twinkle(1.0), env_config())
    try:
        for ours, theirs in zip(ACTION_NAMES, env.action_names, strict=True):
            if ours == "sustain":
                assert theirs == "sustain"
                continue
            hand, actuator = ours.split(".")
            assert theirs.startswith({"right_hand": "rh_", "left_hand": "lh_"}[hand]) and theirs.endswith(actuator)
    finally:
        env.close()


def test_an_imitation_bc_policy_runs_in_plain_pytorch(tmp_path):
    """The recipe in docs/research.md for a trained BC policy file: normalise, MLP, de-normalise."""
    from workers.imitation.policies import build_policy, load_policy, save_policy

    il = configs.load(overrides=["il.bc_hidden=32", "il.action_chunk=4"]).il
    policy = build_policy(il, kind="bc")
    rng = np.random.default_rng(0)
    policy.set_normalization({"obs_mean": rng.normal(size=1144), "obs_std": rng.uniform(0.5, 2, 1144),
                              "action_mean": rng.normal(size=39), "action_std": rng.uniform(0.5, 2, 39)})
    path = save_policy(policy, tmp_path / "bc.pt", step=0, song_hashes=[])
    obs = rng.normal(size=(3, 1144)).astype(np.float32)

    state = torch.load(path, weights_only=True)
    m = state["model"]
    x = (torch.as_tensor(obs) - m["obs_mean"]) / m["obs_std"]
    x = F.gelu(x @ m["net.0.weight"].T + m["net.0.bias"])
    x = F.gelu(x @ m["net.2.weight"].T + m["net.2.bias"])
    chunk = (x @ m["net.4.weight"].T + m["net.4.bias"]).view(3, state["il"]["action_chunk"], 39)
    actions = chunk * m["action_std"] + m["action_mean"]
    np.testing.assert_allclose(actions.numpy(), load_policy(path)[0].act(obs), atol=1e-5)
