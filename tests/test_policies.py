"""The flow-matching transformer and the BC baseline: shapes, the flow convention, learning, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import configs
from workers.piano.layout import GOAL_BITS
from workers.imitation.policies import (

    BCPolicy,
    FlowPolicy,
    build_policy,
    load_policy,
    normalization_stats,
    save_policy,
)

TINY = ["il.d_model=32", "il.n_layers=1", "il.n_heads=2", "il.bc_hidden=64", "il.action_chunk=4", "il.euler_steps=5"]


def il_cfg(*extra: str):
    return configs.load(overrides=TINY + list(extra)).il


def fake_batch(n: int, horizon: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Binary goal + continuous proprio; the action chunk is a fixed function of the proprio state."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, 1144, generator=g)
    obs[:, :GOAL_BITS] = (obs[:, :GOAL_BITS] > 1.0).float()
    base = torch.tanh(obs[:, GOAL_BITS : GOAL_BITS + 39])
    action = torch.stack([base * (k + 1) / horizon for k in range(horizon)], dim=1)
    mask = torch.ones(n, horizon, dtype=torch.bool)
    return {"obs": obs, "action": action, "action_mask": mask}


@pytest.mark.parametrize("kind", ["flow", "bc"])
def test_act_returns_an_action_chunk_per_observation(kind):
    policy = build_policy(il_cfg(), kind=kind).eval()
    obs = fake_batch(3)["obs"]
    one = policy.act(obs[0].numpy())
    assert isinstance(one, np.ndarray) and one.shape == (4, 39) and one.dtype == np.float32
    many = policy.act(obs)
    assert isinstance(many, torch.Tensor) and many.shape == (3, 4, 39)
    assert torch.isfinite(policy.loss(fake_batch(5))).item()


def test_build_policy_follows_config_and_rejects_unknown_kind():
    assert isinstance(build_policy(il_cfg("il.policy=flow")), FlowPolicy)
    assert isinstance(build_policy(il_cfg("il.policy=bc")), BCPolicy)
    with pytest.raises(ValueError, match="unknown policy 'gpt'"):
        build_policy(il_cfg(), kind="gpt")


def test_euler_integration_runs_from_noise_at_t0_to_data_at_t1():
    """With the exact velocity of the path x_t = t*a + (1-t)*noise, Euler lands exactly on a."""
    policy = build_policy(il_cfg("il.euler_steps=7"), kind="flow").eval()
    target = torch.full((2, 4, 39), 0.37)
    seen_t = []

    def exact_velocity(obs_n, x_t, t):
        seen_t.append(float(t[0]))
        return (target - x_t) / (1.0 - t)[:, None, None]

    policy.velocity = exact_velocity
    out = policy.act(torch.zeros(2, 1144))
    assert torch.allclose(out, target, atol=1e-5)
    assert seen_t == pytest.approx([k / 7 for k in range(7)])


def test_time_schedules_match_their_documented_distributions():
    torch.manual_seed(0)
    beta = build_policy(il_cfg("il.time_schedule=beta"), kind="flow").sample_time(40000, torch.device("cpu"))
    uniform = build_policy(il_cfg("il.time_schedule=uniform"), kind="flow").sample_time(40000, torch.device("cpu"))
    # noise level s ~ Beta(1.5, 1) has mean 0.6, so t = 1 - s has mean ~0.4 and favours noisy inputs
    assert beta.mean().item() == pytest.approx(0.4, abs=0.01)
    assert (beta < 0.5).float().mean().item() > 0.6
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    assert beta.min() >= 0 and beta.max() < 1


@pytest.mark.parametrize("kind", ["flow", "bc"])
def test_loss_ignores_padded_steps_past_the_episode_end(kind):
    policy = build_policy(il_cfg(), kind=kind)
    batch = fake_batch(8)
    batch["action_mask"][:, 2:] = False
    changed = dict(batch, action=batch["action"].clone())
    changed["action"][:, 2:] = 1e3
    torch.manual_seed(1)
    a = policy.loss(batch)
    torch.manual_seed(1)
    b = policy.loss(changed)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    changed["action"][:, 1] += 5.0  # a real step does count
    torch.manual_seed(1)
    assert policy.loss(changed).item() > a.item() + 1.0


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is faster and immune to OpenMP stalls on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ["flow", "bc"])
def test_policy_learns_a_state_to_action_mapping(kind, one_thread):
    torch.manual_seed(0)
    policy = build_policy(il_cfg("il.d_model=64", "il.n_heads=4", "il.bc_hidden=128"), kind=kind)
    train = fake_batch(256, seed=0)
    policy.set_normalization(normalization_stats(train["obs"].numpy(), train["action"].reshape(-1, 39).numpy()))
    error_before = (policy.eval().act(train["obs"][:64]) - train["action"][:64]).pow(2).mean().item()
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    policy.train()
    for step in range(300):
        idx = torch.randint(0, 256, (64,))
        loss = policy.loss({k: v[idx] for k, v in train.items()})
        opt.zero_grad()
        loss.backward()
        opt.step()
    error_after = (policy.eval().act(train["obs"][:64]) - train["action"][:64]).pow(2).mean().item()
    assert error_after < 0.1 * error_before


@pytest.mark.parametrize("kind", ["flow", "bc"])
def test_checkpoint_round_trip_keeps_weights_stats_and_meta(tmp_path, kind):
    policy = build_policy(il_cfg(), kind=kind).eval()
    batch = fake_batch(64)
    stats = normalization_stats(batch["obs"].numpy(), batch["action"].reshape(-1, 39).numpy())
    policy.set_normalization(stats)
    path = save_policy(policy, tmp_path / "policy.pt", song_hashes=["abc", "def"], step=12)
    assert not list(tmp_path.glob(".policy.pt.*")), "temporary file left behind"
    torch.load(path, weights_only=True)  # the promise: no pickled objects inside
    loaded, meta = load_policy(path)
    assert type(loaded) is type(policy) and meta == {"song_hashes": ["abc", "def"], "step": 12}
    assert torch.allclose(loaded.action_mean, torch.as_tensor(stats["action_mean"]))
    torch.manual_seed(3)
    a = policy.act(batch["obs"][:2])
    torch.manual_seed(3)
    b = loaded.act(batch["obs"][:2])
    assert torch.allclose(a, b)


def test_normalization_leaves_binary_goal_alone_and_guards_constant_dims():
    obs = np.random.default_rng(0).normal(3.0, 2.0, size=(500, 1144)).astype(np.float32)
    obs[:, 1100] = 5.0  # a joint that never moves
    stats = normalization_stats(obs, np.zeros((500, 39), np.float32))
    assert np.all(stats["obs_mean"][:GOAL_BITS] == 0) and np.all(stats["obs_std"][:GOAL_BITS] == 1)
    assert stats["obs_mean"][1000] == pytest.approx(3.0, abs=0.3)
    policy = build_policy(il_cfg(), kind="bc")
    policy.set_normalization(stats)
    assert policy.obs_std[1100].item() > 0 and policy.action_std.min().item() > 0


def test_load_policy_names_the_bad_file(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_policy(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_policy(tmp_path / "missing.pt")
