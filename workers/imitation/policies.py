"""Imitation policies for the robot pianist: a flow-matching transformer and a BC MLP baseline.

Both map an RP1M observation (1144 floats) to a chunk of ``il.action_chunk`` future actions
(39 each) and share one interface:

    policy.loss(batch) -> scalar tensor     # batch: {"obs": [B,1144], "action": [B,H,39], "action_mask": [B,H]}
    policy.act(obs)    -> action chunk      # [H,39] for one observation, [B,H,39] for a batch

Flow matching (Lipman et al. 2023; pi0's action expert), our convention: t = 0 is pure noise,
t = 1 is the data, ``x_t = t * action + (1 - t) * noise`` and the network regresses the
constant velocity ``action - noise``. Inference integrates ``dx/dt = v(x, t)`` from noise at
t = 0 to t = 1 with ``il.euler_steps`` Euler steps. ``il.time_schedule``:
``uniform`` samples t ~ U(0, 1); ``beta`` follows pi0, whose noise level s ~ Beta(1.5, 1)
favours noisy inputs: with our convention that is t = 1 - s.

Observations and actions are standardised with statistics taken from the dataset and kept
as buffers, so a checkpoint carries them. The binary goal part of the observation (the
first 979 entries) is left as it is.

Checkpoints are plain dicts of tensors and primitives (``torch.load(weights_only=True)``);
``save_policy``/``load_policy`` write and read them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from configs.files import atomic_write
from workers.piano.layout import ACTION_DIM, GOAL_BITS, N_KEYS, OBS_DIM

# RP1M observation layout (contract 2): 11 x 88 piano goal, 11 sustain goal, then proprioception.
MIN_STD = 1e-2  # near-constant joints must not blow up when standardised


class Policy(nn.Module):
    """What both policies share: normalisation buffers, masked loss helpers, chunk shapes."""

    kind: str = ""

    def __init__(self, il_cfg: dict[str, Any]):
        super().__init__()
        self.cfg = dict(il_cfg)
        self.cfg.setdefault("obs_dim", OBS_DIM)  # saved policies record their shapes
        self.cfg.setdefault("action_dim", ACTION_DIM)
        self.obs_dim, self.action_dim, self.horizon = self.cfg["obs_dim"], self.cfg["action_dim"], il_cfg["action_chunk"]
        self.register_buffer("obs_mean", torch.zeros(self.obs_dim))
        self.register_buffer("obs_std", torch.ones(self.obs_dim))
        self.register_buffer("action_mean", torch.zeros(self.action_dim))
        self.register_buffer("action_std", torch.ones(self.action_dim))

    def set_normalization(self, stats: dict[str, Any]) -> None:
        """Use dataset statistics ``{"obs_mean", "obs_std", "action_mean", "action_std"}``."""
        for name in ("obs_mean", "obs_std", "action_mean", "action_std"):
            value = torch.as_tensor(np.asarray(stats[name]), dtype=torch.float32)
            if name.endswith("std"):
                value = value.clamp_min(MIN_STD)
            getattr(self, name).copy_(value)

    def _obs(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def _norm_action(self, action: torch.Tensor) -> torch.Tensor:
        return (action - self.action_mean) / self.action_std

    def _denorm_action(self, action: torch.Tensor) -> torch.Tensor:
        return action * self.action_std + self.action_mean

    @staticmethod
    def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the chunk steps that belong to the episode (mask [B,H])."""
        mask = mask.to(pred.dtype).unsqueeze(-1)
        return ((pred - target) ** 2 * mask).sum() / (mask.sum() * pred.shape[-1]).clamp_min(1.0)

    @torch.no_grad()
    def act(self, obs: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Action chunk for ``obs``: [H,39] for one observation, [B,H,39] for a batch.

        A numpy input gets a numpy float32 output; a tensor gets a tensor.
        """
        as_numpy = not isinstance(obs, torch.Tensor)
        x = torch.as_tensor(np.asarray(obs) if as_numpy else obs, dtype=torch.float32, device=self.obs_mean.device)
        single = x.dim() == 1
        actions = self._sample(self._obs(x[None] if single else x))
        actions = self._denorm_action(actions)
        actions = actions[0] if single else actions
        return actions.cpu().numpy() if as_numpy else actions

    def _sample(self, obs_n: torch.Tensor) -> torch.Tensor:  # normalised obs -> normalised chunk
        raise NotImplementedError

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss; ``forward`` so that DDP's gradient hooks see it."""
        return self.loss(batch)


def _sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled to the usual 0..1000 diffusion range)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class FlowPolicy(Policy):
    """Transformer over [11 goal tokens | 1 proprio token | H noisy-action tokens] predicting velocity.

    Each goal token is one lookahead step (88 keys + sustain = 89); the proprio token holds the
    165 continuous state floats; each action token is one noisy 39-d action with the flow-time
    embedding added. The encoder is bidirectional; velocities are read off the action tokens.
    """

    kind = "flow"

    def __init__(self, il_cfg: dict[str, Any]):
        super().__init__(il_cfg)
        d = il_cfg["d_model"]
        self.n_goal = (GOAL_BITS // (N_KEYS + 1))  # 11 lookahead steps
        self.goal_in = nn.Linear(N_KEYS + 1, d)
        self.proprio_in = nn.Linear(self.obs_dim - GOAL_BITS, d)
        self.action_in = nn.Linear(self.action_dim, d)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.pos = nn.Parameter(torch.randn(self.n_goal + 1 + self.horizon, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, il_cfg["n_heads"], 4 * d, il_cfg["dropout"], activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, il_cfg["n_layers"], enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, self.action_dim)

    def velocity(self, obs_n: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v(x_t, t | obs) for normalised obs [B,1144], noisy normalised chunk [B,H,39], t [B]."""
        n_look = self.n_goal
        keys = obs_n[:, : n_look * N_KEYS].reshape(-1, n_look, N_KEYS)
        sustain = obs_n[:, n_look * N_KEYS : GOAL_BITS].unsqueeze(-1)
        goal = self.goal_in(torch.cat([keys, sustain], dim=-1))
        proprio = self.proprio_in(obs_n[:, GOAL_BITS:]).unsqueeze(1)
        time = self.time_mlp(_sinusoidal(t, self.pos.shape[-1])).unsqueeze(1)
        actions = self.action_in(x_t) + time
        h = self.encoder(torch.cat([goal, proprio, actions], dim=1) + self.pos)
        return self.head(self.norm(h[:, -self.horizon :]))

    def sample_time(self, n: int, device: torch.device) -> torch.Tensor:
        if self.cfg["time_schedule"] == "uniform":
            return torch.rand(n, device=device)
        noise_level = torch.distributions.Beta(1.5, 1.0).sample((n,)).to(device)
        return (1.0 - noise_level) * 0.999  # t = 1 exactly would leave no noise to remove

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        obs_n = self._obs(batch["obs"])
        # padding past the episode end is whatever the dataset wrote; replace it by the mean action so
        # that it cannot leak into the valid steps through attention (its loss is masked anyway)
        action = self._norm_action(batch["action"]) * batch["action_mask"].unsqueeze(-1)
        noise = torch.randn_like(action)
        t = self.sample_time(action.shape[0], action.device)
        x_t = t[:, None, None] * action + (1.0 - t[:, None, None]) * noise
        return self._masked_mse(self.velocity(obs_n, x_t, t), action - noise, batch["action_mask"])

    def _sample(self, obs_n: torch.Tensor) -> torch.Tensor:
        steps = self.cfg["euler_steps"]
        x = torch.randn(obs_n.shape[0], self.horizon, self.action_dim, device=obs_n.device)
        for k in range(steps):
            t = torch.full((obs_n.shape[0],), k / steps, device=obs_n.device)
            x = x + self.velocity(obs_n, x, t) / steps
        return x


class BCPolicy(Policy):
    """RP1M's behaviour-cloning baseline: an MLP from observation to the action chunk (MSE)."""

    kind = "bc"

    def __init__(self, il_cfg: dict[str, Any]):
        super().__init__(il_cfg)
        hidden = il_cfg["bc_hidden"]
        self.net = nn.Sequential(
            nn.Linear(self.obs_dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, self.horizon * self.action_dim),
        )

    def _sample(self, obs_n: torch.Tensor) -> torch.Tensor:
        return self.net(obs_n).view(-1, self.horizon, self.action_dim)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pred = self._sample(self._obs(batch["obs"]))
        return self._masked_mse(pred, self._norm_action(batch["action"]), batch["action_mask"])


POLICIES: dict[str, type[Policy]] = {"flow": FlowPolicy, "bc": BCPolicy}


def build_policy(il_cfg: Any, kind: str | None = None) -> Policy:
    """A fresh policy from the ``il`` config section (an ``ILConfig`` or its dict); ``kind`` overrides ``il.policy``."""
    cfg = il_cfg.model_dump(mode="json") if hasattr(il_cfg, "model_dump") else dict(il_cfg)
    kind = kind or cfg["policy"]
    if kind not in POLICIES:
        raise ValueError(f"unknown policy '{kind}' (known: {', '.join(POLICIES)})")
    cfg["policy"] = kind
    return POLICIES[kind](cfg)


def normalization_stats(obs: np.ndarray, action: np.ndarray) -> dict[str, np.ndarray]:
    """Per-dimension mean/std of observations [N,1144] and actions [N,39]; binary goal left unscaled."""
    obs_mean, obs_std = obs.mean(0), obs.std(0)
    obs_mean[:GOAL_BITS], obs_std[:GOAL_BITS] = 0.0, 1.0
    return {"obs_mean": obs_mean.astype(np.float32), "obs_std": obs_std.astype(np.float32),
            "action_mean": action.mean(0).astype(np.float32), "action_std": action.std(0).astype(np.float32)}


def policy_state(policy: Policy, **meta: Any) -> dict[str, Any]:
    """The checkpoint dict of a policy: kind, its ``il`` config, weights and primitive ``meta``."""
    return {"kind": policy.kind, "il": dict(policy.cfg), "model": policy.state_dict(), "meta": dict(meta)}


def policy_from_state(state: dict[str, Any]) -> Policy:
    policy = build_policy(state["il"], kind=state["kind"])
    policy.load_state_dict(state["model"])
    return policy


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary name in the same folder, then rename: never a half-written file."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def save_policy(policy: Policy, path: str | Path, **meta: Any) -> Path:
    """Write ``policy`` (and ``meta``: song hashes, step, ...) atomically to ``path``."""
    return atomic_torch_save(policy_state(policy, **meta), path)


def load_policy(path: str | Path, device: str = "cpu") -> tuple[Policy, dict[str, Any]]:
    """Read a policy written by :func:`save_policy` (or a trainer checkpoint); returns (policy in eval mode, meta)."""
    path = Path(path)
    if path.is_dir():
        path = path / "policy.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no policy checkpoint here")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise ValueError(f"{path}: not a pianoforge policy checkpoint ({e})") from e
    if not isinstance(state, dict) or "kind" not in state or "model" not in state:
        raise ValueError(f"{path}: not a pianoforge policy checkpoint (missing 'kind'/'model')")
    policy = policy_from_state(state).to(device).eval()
    return policy, dict(state.get("meta", {}))
