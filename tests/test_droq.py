"""The DroQ agent: RP1M's architecture by default, it learns, and its state round-trips."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn as nn

import configs
from workers.rl.droq import DroQ, MaskDropout
from workers.rl.packing import EnsembleLayerNorm, EnsembleLinear, InputLinear
from workers.rl.replay import ReplayBuffer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_cfg(**overrides) -> configs.DroQConfig:
    base = {"droq.hidden_dims": [64, 64], "droq.batch_size": 64, "droq.device": "cpu"}
    base.update({f"droq.{k}": v for k, v in overrides.items()})
    return configs.load(overrides=base).droq


def test_default_networks_follow_rp1m_table_iv():
    cfg = configs.load().droq
    agent = DroQ(1144, 39, -np.ones(39), np.ones(39), cfg, device="cpu")
    kinds = [type(m) for m in agent.critic.net]
    block = [EnsembleLinear, MaskDropout, EnsembleLayerNorm, nn.GELU]
    assert kinds == [InputLinear, *block[1:]] + block * 2 + [EnsembleLinear]
    assert agent.critic.net[1].p == 0.01
    assert all(isinstance(m, nn.GELU) for m in agent.actor.trunk[1::2])
    # A lone agent's checkpoint keeps the layout it had before packing: nn.Linear's (out, in)
    # for the actor (exported policies rely on it), (num_qs, in, out) for the critic.
    state = agent.agent_state_dict(0)
    assert [state["actor"][f"trunk.{i}.weight"].shape for i in (0, 2, 4)] == [(256, 1144), (256, 256), (256, 256)]
    assert state["actor"]["mean.weight"].shape == (39, 256) and state["actor"]["mean.bias"].shape == (39,)
    assert state["critic"]["net.0.weight"].shape == (2, 1144 + 39, 256)
    assert state["critic"]["net.0.bias"].shape == (2, 1, 256) and state["critic"]["net.12.weight"].shape == (2, 256, 1)
    assert agent.target_entropy == -39 / 2 and agent.temperature == pytest.approx([1.0])
    assert agent.actor_opt.param_groups[0]["lr"] == 3e-4
    assert agent.critic_opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_actions_stay_within_asymmetric_bounds():
    low, high = np.array([-2.0, 0.0, 10.0]), np.array([1.0, 0.5, 10.125])
    agent = DroQ(4, 3, low, high, small_cfg(), device="cpu")
    obs = np.random.default_rng(0).normal(size=(500, 4)).astype(np.float32) * 10
    for deterministic in (False, True):
        a = agent.act(obs[None], deterministic=deterministic)
        assert a.shape == (1, 500, 3) and np.all(a >= low) and np.all(a <= high)
    assert agent.act(obs[:1]).shape == (1, 3)


def bandit_buffer(n: int, seed: int) -> ReplayBuffer:
    """One-step episodes: observe a target x in [-1, 1], reward -(a - x)^2 for a random action."""
    rng = np.random.default_rng(seed)
    buffer = ReplayBuffer(1, 1, 2 * n, discount=0.88, binary_dims=0, seed=seed)
    for _ in range(n):
        x = rng.uniform(-1, 1, 1).astype(np.float32)
        a = rng.uniform(-1, 1, 1).astype(np.float32)
        buffer.add(x, a, float(-((a - x) ** 2)[0]), x, terminated=True, truncated=False)
    return buffer


def test_learns_a_one_dimensional_task():
    torch.manual_seed(0)
    buffer = bandit_buffer(1000, seed=0)
    # A low temperature keeps the entropy bonus from blurring a reward that spans only ~1.
    agent = DroQ(1, 1, [-1.0], [1.0], small_cfg(init_temperature=0.05), device="cpu")
    xs = np.linspace(-0.8, 0.8, 9, dtype=np.float32)[:, None]
    error_before = np.abs(agent.act(xs[None], deterministic=True)[0] - xs).mean()
    [first] = agent.update([buffer])
    for _ in range(300):
        [last] = agent.update([buffer])
    error_after = np.abs(agent.act(xs[None], deterministic=True)[0] - xs).mean()
    assert last["train/critic_loss"] < 0.1 * first["train/critic_loss"]
    assert error_after < 0.1 and error_before > 0.3


def test_utd_ratio_counts_critic_updates():
    buffer = bandit_buffer(100, seed=1)
    agent = DroQ(1, 1, [-1.0], [1.0], small_cfg(utd_ratio=3), device="cpu")
    agent.update([buffer])
    agent.update([buffer])
    assert agent.updates == 6


def test_checkpoint_round_trip_with_weights_only():
    buffer = bandit_buffer(200, seed=2)
    cfg = small_cfg()
    agent = DroQ(1, 1, [-1.0], [1.0], cfg, device="cpu")
    for _ in range(5):
        agent.update([buffer])
    blob = io.BytesIO()
    torch.save(agent.agent_state_dict(0), blob)
    blob.seek(0)
    restored = DroQ(1, 1, [-1.0], [1.0], cfg, device="cpu")
    restored.load_agent_state_dict(0, torch.load(blob, weights_only=True))

    xs = np.linspace(-1, 1, 7, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(agent.act(xs[None], deterministic=True), restored.act(xs[None], deterministic=True))
    assert restored.temperature == agent.temperature and restored.agent_updates == agent.agent_updates == [5]
    # Optimiser moments came along too: one more identical update gives identical weights.
    batch = buffer.sample(64)
    for a in (agent, restored):
        torch.manual_seed(5)
        a.update_critic([batch])
        a.update_actor([batch])
    for p, q in zip(agent.critic.parameters(), restored.critic.parameters()):
        torch.testing.assert_close(p, q)
    for p, q in zip(agent.actor.parameters(), restored.actor.parameters()):
        torch.testing.assert_close(p, q)
