"""A pack of K DroQ agents trains each agent exactly as it would train alone.

Every agent draws its dropout masks and action noise from its own generator, so given the
same seeds and batches a packed update and K lone updates see the same randomness, and their
results must agree to float tolerance (only the order of floating-point work differs).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import configs
from workers.rl.droq import DroQ
from workers.rl.replay import ReplayBuffer

OBS, ACT, GOAL = 6, 3, 3  # the first GOAL observation entries are binary, like the piano's goal
LOW, HIGH = np.array([-1.0, 0.0, -2.0]), np.array([1.0, 0.5, 2.0])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_cfg(**overrides) -> configs.DroQConfig:
    base = {"droq.hidden_dims": [32, 32], "droq.batch_size": 16, "droq.device": "cpu"}
    base.update({f"droq.{k}": v for k, v in overrides.items()})
    return configs.load(overrides=base).droq


def observation(rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([rng.random(GOAL) < 0.3, rng.normal(size=OBS - GOAL)]).astype(np.float32)


def make_buffer(seed: int) -> ReplayBuffer:
    """Short random episodes, different for each seed."""
    rng = np.random.default_rng(seed)
    buffer = ReplayBuffer(OBS, ACT, 400, discount=0.88, binary_dims=GOAL, seed=seed)
    for _ in range(30):
        obs = observation(rng)
        for t in range(5):
            nxt = observation(rng)
            action = rng.uniform(LOW, HIGH).astype(np.float32)
            buffer.add(obs, action, float(rng.normal()), nxt, terminated=t == 4 and seed % 2 == 0, truncated=t == 4)
            obs = nxt
    return buffer


def agent(cfg, **kwargs) -> DroQ:
    return DroQ(OBS, ACT, LOW, HIGH, cfg, device="cpu", goal_dims=GOAL, **kwargs)


def assert_same_state(a: dict, b: dict, exact: bool = False) -> None:
    """Two lone-agent states: every tensor equal (to float tolerance unless ``exact``)."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_state(a[key], b[key], exact)
        elif isinstance(a[key], list):
            assert len(a[key]) == len(b[key])
            for x, y in zip(a[key], b[key]):
                assert_same_state({"_": x}, {"_": y}, exact)
        elif isinstance(a[key], torch.Tensor) and a[key].is_floating_point() and not exact:
            torch.testing.assert_close(a[key], b[key], msg=lambda m: f"{key}: {m}")
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def train(learner: DroQ, batches: list, steps: int) -> list:
    """``steps`` critic + actor steps on given batches (per step, one per agent)."""
    metrics = []
    for step in range(steps):
        metrics.append(learner.update_critic(batches[step]))
        metrics.append(learner.update_actor(batches[step]))
    return metrics


@pytest.mark.parametrize("overrides", [{}, {"utd_ratio": 2, "num_qs": 3, "sparse_goal": True}])
def test_a_packed_update_equals_separate_updates(overrides):
    cfg = small_cfg(**overrides)
    seeds = [11, 12, 13]
    pack = agent(cfg, seed=seeds, num_agents=3)
    alone = [agent(cfg, seed=s) for s in seeds]
    for i, single in enumerate(alone):  # each starts as a lone agent with its seed
        assert_same_state(pack.agent_state_dict(i), single.agent_state_dict(0), exact=True)
    before = pack.agent_state_dict(0)

    buffers = [make_buffer(s) for s in seeds]
    batches = [[b.sample(cfg.batch_size) for b in buffers] for _ in range(4)]
    packed = train(pack, batches, 4)
    separate = [train(single, [[step[i]] for step in batches], 4) for i, single in enumerate(alone)]
    # update() samples its own batches: identical buffers give identical samples.
    packed.append(pack.update([make_buffer(s) for s in seeds]))
    for i, single in enumerate(alone):
        separate[i].append(single.update([make_buffer(seeds[i])]))

    for i, single in enumerate(alone):
        assert_same_state(pack.agent_state_dict(i), single.agent_state_dict(0))
        for pm, [sm] in zip(packed, separate[i]):
            assert pm[i].keys() == sm.keys()
            assert pm[i] == pytest.approx(sm, rel=1e-5, abs=1e-6)
    assert pack.temperature == pytest.approx([s.temperature[0] for s in alone], rel=1e-6)
    assert pack.agent_updates == [s.updates for s in alone] == [4 + cfg.utd_ratio] * 3
    # Not vacuous: training moved the weights, and the agents differ from one another.
    state = [pack.agent_state_dict(i) for i in range(3)]
    assert not torch.equal(state[0]["actor"]["mean.weight"], before["actor"]["mean.weight"])
    assert not torch.allclose(state[0]["critic"]["net.0.weight"], state[1]["critic"]["net.0.weight"])
    assert state[0]["critic_opt"]["state"][0]["step"] == 4 + cfg.utd_ratio


def test_acting_for_a_pack_is_each_agent_acting():
    cfg = small_cfg()
    pack = agent(cfg, seed=[3, 4], num_agents=2)
    alone = [agent(cfg, seed=s) for s in (3, 4)]
    obs = np.random.default_rng(0).normal(size=(2, 6, OBS)).astype(np.float32)
    for deterministic in (True, False):  # stochastic: each agent's noise from its own generator
        actions = pack.act(obs, deterministic=deterministic)
        assert actions.shape == (2, 6, ACT)
        for i, single in enumerate(alone):
            np.testing.assert_allclose(actions[i], single.act(obs[i:i + 1], deterministic=deterministic)[0], atol=1e-6)
    q = pack.q_values(obs, actions)
    assert q.shape == (2, 2, 6)
    for i, single in enumerate(alone):
        torch.testing.assert_close(q[i], single.q_values(obs[i:i + 1], actions[i:i + 1])[0])
    one = pack.act(obs[:, 0], deterministic=True)
    assert one.shape == (2, ACT) and np.all(one >= LOW) and np.all(one <= HIGH)
    with pytest.raises(ValueError, match="expected"):
        pack.act(obs[0])
    with pytest.raises(ValueError, match="replay buffers for 2 agents"):
        pack.update([make_buffer(0)])


def test_a_lone_agent_starts_as_before_packing():
    """Seeded globally, a pack of 1 draws its initial weights exactly as the plain nn.Linear
    actor and the Q ensemble did, in the same order, so a seeded specialist starts unchanged."""
    cfg = small_cfg()
    torch.manual_seed(5)
    linears = [nn.Linear(i, o) for i, o in ((OBS, 32), (32, 32), (32, ACT), (32, ACT))]  # trunk, mean, log_std
    critic = []
    for i, o in ((OBS + ACT, 32), (32, 32), (32, 1)):
        bound = 1.0 / math.sqrt(i)
        critic += [torch.empty(2, i, o).uniform_(-bound, bound), torch.empty(2, 1, o).uniform_(-bound, bound)]
    torch.manual_seed(5)
    state = agent(cfg).agent_state_dict(0)
    names = ["trunk.0", "trunk.2", "mean", "log_std"]
    for name, linear in zip(names, linears):
        assert torch.equal(state["actor"][f"{name}.weight"], linear.weight.detach())
        assert torch.equal(state["actor"][f"{name}.bias"], linear.bias.detach())
    weights = [state["critic"][f"net.{i}.{p}"] for i in (0, 4, 8) for p in ("weight", "bias")]
    for ours, reference in zip(weights, critic):
        assert torch.equal(ours, reference)
    assert state["critic"]["net.2.weight"].eq(1).all() and state["critic"]["net.2.bias"].eq(0).all()
    assert_same_state(state["critic"], state["critic_target"], exact=True)
    assert state["actor_opt"]["state"] == {} and state["updates"] == 0
    assert float(state["log_alpha"]) == pytest.approx(math.log(cfg.init_temperature))


def trained_pack(cfg: configs.DroQConfig) -> tuple[DroQ, list[ReplayBuffer]]:
    """A pack of 3 after 3 updates on its own buffers."""
    pack = agent(cfg, seed=[1, 2, 3], num_agents=3)
    buffers = [make_buffer(s) for s in (1, 2, 3)]
    for _ in range(3):
        pack.update(buffers)
    return pack, buffers


def test_an_agent_checkpoint_continues_in_a_pack_of_one_and_in_another_pack():
    cfg = small_cfg()
    pack, buffers = trained_pack(cfg)
    blob = io.BytesIO()
    torch.save(pack.agent_state_dict(1), blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)

    lone = agent(cfg, seed=99)
    lone.load_agent_state_dict(0, saved)
    other = agent(cfg, seed=[7, 8], num_agents=2)
    other.load_agent_state_dict(0, saved)
    assert_same_state(lone.agent_state_dict(0), saved, exact=True)
    assert lone.agent_updates == [3] and other.agent_updates == [3, 0]

    batches = [[b.sample(cfg.batch_size) for b in buffers] for _ in range(3)]
    train(pack, batches, 3)
    train(lone, [[step[1]] for step in batches], 3)
    train(other, [[step[1], step[0]] for step in batches], 3)
    assert_same_state(lone.agent_state_dict(0), pack.agent_state_dict(1))
    assert_same_state(other.agent_state_dict(0), pack.agent_state_dict(1))


def test_reset_agent_reinitialises_only_its_slot():
    cfg = small_cfg()
    pack, buffers = trained_pack(cfg)
    kept = [pack.agent_state_dict(i) for i in (0, 2)]
    pack.reset_agent(1, seed=42)
    for i, state in zip((0, 2), kept):
        assert_same_state(pack.agent_state_dict(i), state, exact=True)
    fresh = agent(cfg, seed=42).agent_state_dict(0)
    assert_same_state(pack.agent_state_dict(1), fresh, exact=True)
    assert pack.agent_updates == [3, 0, 3]
    # The reset slot trains like a fresh lone agent from there on.
    lone = agent(cfg, seed=42)
    batches = [[b.sample(cfg.batch_size) for b in buffers] for _ in range(2)]
    train(pack, batches, 2)
    train(lone, [[step[1]] for step in batches], 2)
    assert_same_state(pack.agent_state_dict(1), lone.agent_state_dict(0))


def test_bfloat16_matmuls_stay_local_to_the_learner():
    cfg = small_cfg(matmul_precision="medium")
    before = torch.get_float32_matmul_precision()
    learner = agent(cfg, seed=0, num_agents=2)
    metrics = learner.update([make_buffer(0), make_buffer(1)])
    assert all(np.isfinite(list(m.values())).all() for m in metrics)
    assert torch.get_float32_matmul_precision() == before


def test_a_sparse_goal_computes_the_same_updates():
    dense, sparse = (agent(small_cfg(sparse_goal=on), seed=4, num_agents=2) for on in (False, True))
    buffers = [make_buffer(s) for s in (4, 5)]
    batches = [[b.sample(16) for b in buffers] for _ in range(3)]
    obs = batches[0][0].obs[:5]
    np.testing.assert_allclose(sparse.act(np.stack([obs, obs])), dense.act(np.stack([obs, obs])), atol=1e-6)
    for a, b in zip(train(dense, batches, 3), train(sparse, batches, 3)):  # per step, per agent
        for x, y in zip(a, b):
            assert x == pytest.approx(y, rel=1e-5, abs=1e-6)
    for i in range(2):
        assert_same_state(dense.agent_state_dict(i), sparse.agent_state_dict(i))
    with pytest.raises(ValueError, match="goal_dims"):
        DroQ(OBS, ACT, LOW, HIGH, small_cfg(sparse_goal=True), device="cpu", goal_dims=OBS)


def test_agent_state_is_torch_adam_and_nn_linear_state():
    """A lone agent's checkpoint is what plain torch modules and torch.optim.Adam save, so
    checkpoints written before packing load, and exported actors run in plain PyTorch."""
    cfg = small_cfg()
    learner = agent(cfg, seed=0)
    learner.update([make_buffer(0)])
    state = learner.agent_state_dict(0)
    actor = nn.ModuleDict({"trunk": nn.Sequential(nn.Linear(OBS, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU()),
                           "mean": nn.Linear(32, ACT), "log_std": nn.Linear(32, ACT)})
    actor.load_state_dict(state["actor"])
    opt = torch.optim.Adam(actor.parameters(), lr=cfg.actor_lr)
    opt.load_state_dict(state["actor_opt"])
    for p in actor.parameters():  # one plain Adam step, then back into the learner
        p.grad = torch.ones_like(p)
    opt.step()
    state["actor"], state["actor_opt"] = actor.state_dict(), opt.state_dict()
    restored = agent(cfg, seed=1)
    restored.load_agent_state_dict(0, state)
    assert_same_state(restored.agent_state_dict(0), state, exact=True)
    assert restored.actor_opt.steps[0].eq(2).all()
    obs = np.random.default_rng(0).normal(size=(4, OBS)).astype(np.float32)
    plain = torch.tanh(actor["mean"](actor["trunk"](torch.as_tensor(obs)))).detach().numpy()
    np.testing.assert_allclose(restored.act(obs[None], deterministic=True)[0], LOW + (plain + 1) / 2 * (HIGH - LOW), atol=1e-5)


def test_an_agent_without_a_buffer_sits_the_update_out():
    """A member still in its warm-up (or an idle slot) passes None: it stays exactly as it was,
    generator included, while the others train exactly as alone."""
    cfg = small_cfg(utd_ratio=2)
    pack = agent(cfg, seed=[1, 2, 3], num_agents=3)
    alone = [agent(cfg, seed=s) for s in (1, 3)]
    idle = pack.agent_state_dict(1)
    for _ in range(2):
        metrics = pack.update([make_buffer(1), None, make_buffer(3)])
        for single, seed in zip(alone, (1, 3)):
            single.update([make_buffer(seed)])
    assert metrics[1] == {} and set(metrics[0]) == set(metrics[2]) and "train/critic_loss" in metrics[0]
    assert_same_state(pack.agent_state_dict(1), idle, exact=True)
    for i, single in zip((0, 2), alone):
        assert_same_state(pack.agent_state_dict(i), single.agent_state_dict(0))
    # Its first update later is a fresh agent's first update.
    lone = agent(cfg, seed=2)
    pack.update([make_buffer(1), make_buffer(2), make_buffer(3)])
    lone.update([make_buffer(2)])
    assert_same_state(pack.agent_state_dict(1), lone.agent_state_dict(0))
    with pytest.raises(ValueError, match="every entry is None"):
        pack.update([None, None, None])
