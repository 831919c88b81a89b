"""DroQ: soft actor-critic with a small dropout + LayerNorm Q ensemble (Hiraoka et al. 2022).

This is the specialist RP1M trains per song; every number comes from ``cfg.droq``, whose
defaults are RP1M table IV: actor and critics 3 x 256 GELU, 2 Q-networks with dropout 0.01
and LayerNorm (Linear -> Dropout -> LayerNorm -> activation), discount 0.88, Adam 3e-4,
batch 256, target EMA 0.05, learnable temperature with target entropy -action_dim / 2.

Read top to bottom: networks, then the agent (acting, one update, checkpoint state).
The actor is a tanh-squashed Gaussian; internally actions live in [-1, 1] and are scaled to
the environment's bounds only on the way out (``act``) and back in (``update``), so the
critic sees every action dimension on the same scale.

One ``update`` per environment step does ``utd_ratio`` critic updates (each on a fresh batch,
each followed by the target EMA) and then one actor and temperature update, as in DroQ.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from configs import DroQConfig
from workers.rl.replay import Batch, ReplayBuffer

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # bounds of the actor's log std (CleanRL's SAC)
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, CPU otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("droq.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


# --- networks --------------------------------------------------------------------------
class EnsembleLinear(nn.Module):
    """``n`` independent linear layers applied in one batched matmul: (n, B, in) -> (n, B, out)."""

    def __init__(self, n: int, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleLayerNorm(nn.Module):
    """LayerNorm over features with a separate scale and shift for each ensemble member."""

    def __init__(self, n: int, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, 1, features))
        self.bias = nn.Parameter(torch.zeros(n, 1, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:]) * self.weight + self.bias


class QEnsemble(nn.Module):
    """``num_qs`` Q-networks evaluated together; returns Q values of shape (num_qs, B)."""

    def __init__(self, obs_dim: int, action_dim: int, cfg: DroQConfig):
        super().__init__()
        self.num_qs = cfg.num_qs
        layers: list[nn.Module] = []
        width = obs_dim + action_dim
        for hidden in cfg.hidden_dims:
            layers.append(EnsembleLinear(cfg.num_qs, width, hidden))
            if cfg.critic_dropout > 0:
                layers.append(nn.Dropout(cfg.critic_dropout))  # independent masks per member
            if cfg.critic_layer_norm:
                layers.append(EnsembleLayerNorm(cfg.num_qs, hidden))
            layers.append(ACTIVATIONS[cfg.activation]())
            width = hidden
        layers.append(EnsembleLinear(cfg.num_qs, width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, action], dim=-1)
        return self.net(x.unsqueeze(0).expand(self.num_qs, *x.shape)).squeeze(-1)


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy over actions in [-1, 1]."""

    def __init__(self, obs_dim: int, action_dim: int, cfg: DroQConfig):
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim
        for hidden in cfg.hidden_dims:
            layers += [nn.Linear(width, hidden), ACTIVATIONS[cfg.activation]()]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.mean = nn.Linear(width, action_dim)
        self.log_std = nn.Linear(width, action_dim)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(obs)
        log_std = torch.tanh(self.log_std(h))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)
        return self.mean(h), log_std

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action in [-1, 1] and its log-probability (shape (B,)); the noise
        comes from ``generator`` when given, from torch's global RNG otherwise."""
        mean, log_std = self(obs)
        normal = torch.distributions.Normal(mean, log_std.exp())
        if generator is None:
            u = normal.rsample()
        else:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            u = mean + noise * normal.scale
        action = torch.tanh(u)
        # Change of variables for tanh, in the numerically stable form log(1 - tanh(u)^2).
        log_prob = normal.log_prob(u) - 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
        return action, log_prob.sum(-1)

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self(obs)[0])


# --- agent -----------------------------------------------------------------------------
class DroQ:
    """The DroQ agent: networks, optimisers, temperature, and the update rule."""

    def __init__(self, obs_dim: int, action_dim: int, action_low: np.ndarray, action_high: np.ndarray,
                 cfg: DroQConfig, device: str | torch.device | None = None):
        self.cfg = cfg
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.device = resolve_device(cfg.device) if device is None else torch.device(device)
        low = np.asarray(action_low, np.float32).reshape(action_dim)
        high = np.asarray(action_high, np.float32).reshape(action_dim)
        if not np.all(high > low):
            raise ValueError("action_high must exceed action_low in every dimension")
        self.action_low, self.action_high = low, high
        self.action_scale = torch.as_tensor((high - low) / 2, device=self.device)
        self.action_bias = torch.as_tensor((high + low) / 2, device=self.device)

        self.actor = Actor(obs_dim, action_dim, cfg).to(self.device)
        self.critic = QEnsemble(obs_dim, action_dim, cfg).to(self.device)
        self.critic_target = QEnsemble(obs_dim, action_dim, cfg).to(self.device)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(cfg.init_temperature), device=self.device, requires_grad=True)
        self.target_entropy = -action_dim / 2 if cfg.target_entropy is None else float(cfg.target_entropy)

        adam = dict(betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr, **adam)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr, **adam)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=cfg.temp_lr, **adam)
        self.updates = 0

    @property
    def temperature(self) -> float:
        return float(self.log_alpha.detach().exp())

    # --- acting ------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False,
            generator: torch.Generator | None = None) -> np.ndarray:
        """Action(s) in the environment's bounds for one observation (D,) or a batch (B, D).

        Stochastic actions draw their noise from ``generator`` (on the agent's device) when
        given, so a seeded generator replays the same actions whatever the global RNG state.
        """
        x = torch.as_tensor(np.asarray(obs, np.float32), device=self.device)
        squeeze = x.dim() == 1
        x = x.unsqueeze(0) if squeeze else x
        a = self.actor.deterministic(x) if deterministic else self.actor.sample(x, generator)[0]
        a = (a * self.action_scale + self.action_bias).cpu().numpy()
        a = np.clip(a, self.action_low, self.action_high)  # float rounding at a saturated tanh
        return a[0] if squeeze else a

    # --- learning ----------------------------------------------------------------------
    def _tensors(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        t = [torch.as_tensor(x, device=self.device) for x in batch]
        obs, action, reward, next_obs, discount = t
        return obs, (action - self.action_bias) / self.action_scale, reward, next_obs, discount

    def update_critic(self, batch: Batch) -> dict[str, float]:
        """One critic step on the soft Bellman target, then the target-network EMA."""
        obs, action, reward, next_obs, discount = self._tensors(batch)
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_action, next_log_prob = self.actor.sample(next_obs)
            # The target ensemble keeps dropout on too (DroQ), and the min over it curbs overestimation.
            next_q = self.critic_target(next_obs, next_action).min(dim=0).values
            target = reward + discount * (next_q - alpha * next_log_prob)
        q = self.critic(obs, action)
        critic_loss = F.mse_loss(q, target.unsqueeze(0).expand_as(q))
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        with torch.no_grad():
            for p, p_target in zip(self.critic.parameters(), self.critic_target.parameters()):
                p_target.lerp_(p, self.cfg.tau)
        self.updates += 1
        return {"train/critic_loss": float(critic_loss.detach()), "train/q": float(q.detach().mean())}

    def update_actor(self, batch: Batch) -> dict[str, float]:
        """One actor step (maximise mean ensemble Q + entropy), then one temperature step."""
        obs = torch.as_tensor(batch.obs, device=self.device)
        action, log_prob = self.actor.sample(obs)
        self.critic.requires_grad_(False)  # gradients flow through the critic, not into it
        q = self.critic(obs, action).mean(dim=0)  # dropout active, as in DroQ
        actor_loss = (self.log_alpha.exp().detach() * log_prob - q).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        self.critic.requires_grad_(True)

        alpha_loss = (self.log_alpha.exp() * (-log_prob.detach() - self.target_entropy)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()
        return {"train/actor_loss": float(actor_loss.detach()), "train/temperature": self.temperature,
                "train/entropy": float(-log_prob.detach().mean())}

    def update(self, buffer: ReplayBuffer) -> dict[str, float]:
        """``utd_ratio`` critic updates on fresh batches, then one actor/temperature update."""
        for _ in range(self.cfg.utd_ratio):
            batch = buffer.sample(self.cfg.batch_size)
            metrics = self.update_critic(batch)
        metrics.update(self.update_actor(batch))
        return metrics

    # --- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors and plain containers only (loads with ``torch.load(weights_only=True)``)."""
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "alpha_opt": self.alpha_opt.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.alpha_opt.load_state_dict(state["alpha_opt"])
        self.updates = int(state["updates"])
