"""DroQ: soft actor-critic with a small dropout + LayerNorm Q ensemble (Hiraoka et al. 2022).

This is the specialist RP1M trains per song; every number comes from ``cfg.droq``, whose
defaults are RP1M table IV: actor and critics 3 x 256 GELU, 2 Q-networks with dropout 0.01
and LayerNorm (Linear -> Dropout -> LayerNorm -> activation), discount 0.88, Adam 3e-4,
batch 256, target EMA 0.05, learnable temperature with target entropy -action_dim / 2.

Read top to bottom: networks, the optimiser, then the agent (acting, one update, checkpoint
state). The actor is a tanh-squashed Gaussian; internally actions live in [-1, 1] and are
scaled to the environment's bounds only on the way out (``act``) and back in (``update``), so
the critic sees every action dimension on the same scale.

One ``update`` per environment step does ``utd_ratio`` critic updates (each on a fresh batch,
each followed by the target EMA) and then one actor and temperature update, as in DroQ.

A learner holds ``num_agents`` (K) independent agents -- a pack -- with every weight stacked
along a leading agent dimension (the critic's along agents x Q-ensemble), so one update of all
K is one batched matmul per layer. Agents share nothing but the arithmetic: each samples its
own batch from its own replay buffer, draws its dropout masks and action noise from its own
generator, and has its own temperature and Adam state (moments and step count). A pack of 1
is the plain specialist, and ``agent_state_dict(i)`` is exactly what a pack of 1 saves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.adam import adam

from configs import DroQConfig
from workers.piano.layout import GOAL_BITS
from workers.rl.replay import Batch, ReplayBuffer

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # bounds of the actor's log std (CleanRL's SAC)
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}
MASK_LEVELS = 1 << 16  # dropout keeps a unit when a uniform 16-bit integer clears p * 2**16


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, CPU otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("droq.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


# --- networks --------------------------------------------------------------------------
class EnsembleLinear(nn.Module):
    """``n`` independent linear layers applied in one batched matmul: (n, B, in) -> (n, B, out).

    Weights start uninitialised: the agent fills each member (see ``DroQ.reset_agent``)."""

    def __init__(self, n: int, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class SparseRows(NamedTuple):
    """The non-zeros of the first ``dims`` entries of (K, B, D) inputs, row by row: the goal,
    ~2% ones, multiplied as sums of weight rows rather than as a dense matmul."""

    dims: int
    agents: int
    batch: int
    index: torch.Tensor  # (nnz,) flat position in an agent's weight rows: agent * rows + column
    values: torch.Tensor  # (nnz,)
    counts: torch.Tensor  # (K * B,) non-zeros per row

    @classmethod
    def of(cls, x: torch.Tensor, dims: int) -> SparseRows:
        k, b = x.shape[:2]
        goal = x[..., :dims].reshape(k * b, dims)
        row, col = goal.nonzero(as_tuple=True)
        return cls(dims, k, b, (row // b) * dims + col, goal[row, col], torch.bincount(row, minlength=k * b))

    def times(self, layer: EnsembleLinear, dense: torch.Tensor) -> torch.Tensor:
        """``layer`` applied to [sparse part, ``dense``] for a layer of K x m members (m per
        agent, each seeing its agent's rows): (K * m, B, out)."""
        n, rows = layer.weight.shape[:2]
        m = n // self.agents
        # Bags in (member q, agent, row) order: agent a's member q owns weight rows (a * m + q) * rows.
        agent, col = self.index // self.dims, self.index % self.dims
        index = torch.cat([(agent * m + q) * rows + col for q in range(m)])
        offsets = torch.zeros(m * self.agents * self.batch, dtype=torch.long, device=self.counts.device)
        offsets[1:] = self.counts.repeat(m).cumsum(0)[:-1]
        sparse = F.embedding_bag(index, layer.weight.view(n * rows, -1), offsets, mode="sum",
                                 per_sample_weights=self.values.repeat(m))
        sparse = sparse.view(m, self.agents, self.batch, -1).transpose(0, 1).reshape(n, self.batch, -1)
        return torch.baddbmm(layer.bias, dense, layer.weight[:, self.dims:]) + sparse


class EnsembleLayerNorm(nn.Module):
    """LayerNorm over features with a separate scale and shift for each ensemble member."""

    def __init__(self, n: int, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, 1, features))
        self.bias = nn.Parameter(torch.zeros(n, 1, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:]) * self.weight + self.bias


class MaskDropout(nn.Dropout):
    """Dropout with the keep mask given by the caller (``keep``, bool, x's shape).

    The agent draws all masks of a step at once from 16-bit integers, 4 per 64-bit random
    draw: a quarter of the random numbers ``bernoulli_`` needs. The drop probability is thus
    rounded to a multiple of 2**-16 (0.01 -> 0.009995) and kept units are scaled by the
    inverse of the exact keep probability, so the layer's expectation is unchanged."""

    @property
    def threshold(self) -> int:
        """Keep a unit when its int16 draw is >= this."""
        return -(MASK_LEVELS // 2) + round(self.p * MASK_LEVELS)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if keep is None:
            return x
        scale = MASK_LEVELS / (MASK_LEVELS - round(self.p * MASK_LEVELS))
        return torch.where(keep, x, 0.0) * scale


class QEnsemble(nn.Module):
    """``n`` Q-networks (agents x Q-ensemble) evaluated together.

    ``forward(obs, action, keep)`` takes (K, B, .) inputs shared by each agent's ``num_qs``
    members and returns Q values of shape (K, num_qs, B); ``keep`` holds one dropout mask of
    shape (K * num_qs, B, hidden) per dropout layer, or None for no dropout."""

    def __init__(self, n: int, obs_dim: int, action_dim: int, cfg: DroQConfig):
        super().__init__()
        self.num_qs = cfg.num_qs
        layers: list[nn.Module] = []
        width = obs_dim + action_dim
        for hidden in cfg.hidden_dims:
            layers.append(EnsembleLinear(n, width, hidden))
            if cfg.critic_dropout > 0:
                layers.append(MaskDropout(cfg.critic_dropout))
            if cfg.critic_layer_norm:
                layers.append(EnsembleLayerNorm(n, hidden))
            layers.append(ACTIVATIONS[cfg.activation]())
            width = hidden
        layers.append(EnsembleLinear(n, width, 1))
        self.net = nn.Sequential(*layers)

    @property
    def dropouts(self) -> list[MaskDropout]:
        return [m for m in self.net if isinstance(m, MaskDropout)]

    def forward(self, obs: torch.Tensor, action: torch.Tensor, keep: Sequence[torch.Tensor] | None = None,
                sparse: SparseRows | None = None) -> torch.Tensor:
        k, b = obs.shape[:2]
        x = torch.cat([obs if sparse is None else obs[..., sparse.dims:], action], dim=-1)
        x = x.unsqueeze(1).expand(k, self.num_qs, b, x.shape[-1]).reshape(k * self.num_qs, b, x.shape[-1])
        masks = iter(keep) if keep is not None else None
        layers = iter(self.net)
        if sparse is not None:
            x = sparse.times(next(layers), x)
        for layer in layers:
            if isinstance(layer, MaskDropout):
                x = layer(x, next(masks) if masks is not None else None)
            else:
                x = layer(x)
        return x.view(k, self.num_qs, b)


class Actor(nn.Module):
    """K tanh-squashed Gaussian policies over actions in [-1, 1]: (K, B, obs) -> (K, B, action)."""

    def __init__(self, n: int, obs_dim: int, action_dim: int, cfg: DroQConfig):
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim
        for hidden in cfg.hidden_dims:
            layers += [EnsembleLinear(n, width, hidden), ACTIVATIONS[cfg.activation]()]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.mean = EnsembleLinear(n, width, action_dim)
        self.log_std = EnsembleLinear(n, width, action_dim)

    def forward(self, obs: torch.Tensor, sparse: SparseRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if sparse is None:
            h = self.trunk(obs)
        else:
            h = self.trunk[1:](sparse.times(self.trunk[0], obs[..., sparse.dims:]))
        log_std = torch.tanh(self.log_std(h))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)
        return self.mean(h), log_std

    def sample(self, obs: torch.Tensor, noise: torch.Tensor,
               sparse: SparseRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The reparameterised action in [-1, 1] for standard normal ``noise`` (K, B, action)
        and its log-probability (K, B)."""
        mean, log_std = self(obs, sparse)
        u = mean + noise * log_std.exp()
        action = torch.tanh(u)
        # Gaussian log density, then the change of variables for tanh in the numerically
        # stable form log(1 - tanh(u)^2).
        log_prob = -0.5 * noise.square() - log_std - 0.5 * math.log(2 * math.pi)
        log_prob = log_prob - 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
        return action, log_prob.sum(-1)

    def deterministic(self, obs: torch.Tensor, sparse: SparseRows | None = None) -> torch.Tensor:
        return torch.tanh(self(obs, sparse)[0])


# --- optimiser -------------------------------------------------------------------------
class PackedAdam:
    """Adam over parameters stacked along a leading agent dimension.

    Each agent has its own step count (Adam's bias correction depends on it), so an agent
    re-initialised or loaded mid-run continues exactly as it would alone. Adam is elementwise,
    so one fused call over per-agent views of the stacked tensors is K separate Adams."""

    def __init__(self, params: list[torch.Tensor], num_agents: int, lr: float, betas: tuple[float, float],
                 eps: float):
        self.params, self.num_agents = params, num_agents
        self.param_groups = [{"lr": lr, "betas": tuple(betas), "eps": eps}]
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        device = params[0].device
        self.steps = torch.zeros(num_agents, len(params), device=device)  # per agent, per tensor
        self.fused = device.type in ("cpu", "cuda")

        def rows(tensors):  # agent k's part of each stacked tensor, as contiguous views
            return [t.view(num_agents, -1)[k] for k in range(num_agents) for t in tensors]

        self._params, self._exp_avg, self._exp_avg_sq = rows(params), rows(self.exp_avg), rows(self.exp_avg_sq)
        self._steps = [self.steps[k, j] for k in range(num_agents) for j in range(len(params))]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        grads = [p.grad.reshape(self.num_agents, -1)[k] for k in range(self.num_agents) for p in self.params]
        group = self.param_groups[0]
        adam(
            self._params, grads, self._exp_avg, self._exp_avg_sq, [], self._steps,
            fused=self.fused, foreach=None if self.fused else True, amsgrad=False,
            beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"], weight_decay=0.0,
            eps=group["eps"], maximize=False)

    def reset_agent(self, k: int) -> None:
        with torch.no_grad():
            for t in self.exp_avg + self.exp_avg_sq:
                t.view(self.num_agents, -1)[k].zero_()
            self.steps[k].zero_()


# --- agent -----------------------------------------------------------------------------
class DroQ:
    """K DroQ agents (K = ``num_agents``, default 1): networks, optimisers, temperatures and the
    update rule, all stacked along an agent dimension.

    ``seed``: None initialises from torch's global RNG (as ``torch.manual_seed`` set it), an int
    gives agent k the seed ``seed + k``, a sequence gives each agent its own; an agent with seed
    s starts exactly as ``DroQ(..., seed=s)`` and ``reset_agent(i, s)`` do. ``goal_dims``: how
    many leading observation entries ``droq.sparse_goal`` multiplies as sparse (the goal).
    """

    def __init__(self, obs_dim: int, action_dim: int, action_low: np.ndarray, action_high: np.ndarray,
                 cfg: DroQConfig, device: str | torch.device | None = None,
                 seed: int | Sequence[int] | None = None, num_agents: int = 1, goal_dims: int = GOAL_BITS):
        if num_agents < 1:
            raise ValueError(f"num_agents must be >= 1, got {num_agents}")
        if cfg.sparse_goal and not 0 < goal_dims < obs_dim:
            raise ValueError(f"droq.sparse_goal needs 0 < goal_dims < obs_dim, got {goal_dims} and {obs_dim}")
        self.goal_dims = goal_dims if cfg.sparse_goal else 0  # leading observation entries taken as sparse
        self.cfg, self.num_agents = cfg, num_agents
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.device = resolve_device(cfg.device) if device is None else torch.device(device)
        low = np.asarray(action_low, np.float32).reshape(action_dim)
        high = np.asarray(action_high, np.float32).reshape(action_dim)
        if not np.all(high > low):
            raise ValueError("action_high must exceed action_low in every dimension")
        self.action_low, self.action_high = low, high
        self.action_scale = torch.as_tensor((high - low) / 2, device=self.device)
        self.action_bias = torch.as_tensor((high + low) / 2, device=self.device)

        k, q = num_agents, cfg.num_qs
        self.actor = Actor(k, obs_dim, action_dim, cfg).to(self.device)
        self.critic = QEnsemble(k * q, obs_dim, action_dim, cfg).to(self.device)
        self.critic_target = QEnsemble(k * q, obs_dim, action_dim, cfg).to(self.device)
        self.critic_target.requires_grad_(False)
        self.log_alpha = torch.zeros(k, device=self.device, requires_grad=True)
        self.target_entropy = -action_dim / 2 if cfg.target_entropy is None else float(cfg.target_entropy)

        adam = dict(betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, num_agents=k)
        self.actor_opt = PackedAdam(list(self.actor.parameters()), lr=cfg.actor_lr, **adam)
        self.critic_opt = PackedAdam(list(self.critic.parameters()), lr=cfg.critic_lr, **adam)
        self.alpha_opt = PackedAdam([self.log_alpha], lr=cfg.temp_lr, **adam)
        self.generators = [torch.Generator(self.device) for _ in range(k)]
        self.agent_updates = [0] * k  # critic steps of each agent (its checkpoint's ``updates``)
        self.updates = 0  # critic steps of the pack (each steps every agent)
        self._staging = _Staging(self.device)

        seeds = [None] * k if seed is None else [seed + i for i in range(k)] if isinstance(seed, int) else list(seed)
        if len(seeds) != k:
            raise ValueError(f"{len(seeds)} seeds for {k} agents")
        for i, s in enumerate(seeds):
            self.reset_agent(i, s)

    @property
    def temperature(self) -> float | list[float]:
        """The temperature (a list of K for a pack)."""
        t = self.log_alpha.detach().exp().tolist()
        return t[0] if self.num_agents == 1 else t

    @contextmanager
    def _precision(self):
        """``droq.matmul_precision`` for the learner's own matmuls only."""
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.cfg.matmul_precision)
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)

    @torch.no_grad()
    def reset_agent(self, i: int, seed: int | None = None) -> None:
        """Re-initialise agent i (weights, target, temperature, optimiser state, update count,
        noise generator) as a fresh agent with ``seed`` (None: from torch's global RNG). The
        draws are today's: nn.Linear's initialisation for the actor, then the critic's."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for layer in [m for m in self.actor.modules() if isinstance(m, EnsembleLinear)]:
            weight = torch.empty(layer.out_features, layer.in_features)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=gen)
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight[i].copy_(weight.T)
            layer.bias[i, 0].copy_(torch.empty(layer.out_features).uniform_(-bound, bound, generator=gen))
        q = slice(i * self.cfg.num_qs, (i + 1) * self.cfg.num_qs)
        for layer in self.critic.net:
            if isinstance(layer, EnsembleLinear):
                bound = 1.0 / math.sqrt(layer.in_features)
                for p in (layer.weight, layer.bias):
                    p[q].copy_(torch.empty(p[q].shape).uniform_(-bound, bound, generator=gen))
            elif isinstance(layer, EnsembleLayerNorm):
                layer.weight[q] = 1.0
                layer.bias[q] = 0.0
        for p, target in zip(self.critic.parameters(), self.critic_target.parameters()):
            target[q].copy_(p[q])
        self.log_alpha[i] = math.log(self.cfg.init_temperature)
        for opt in (self.actor_opt, self.critic_opt, self.alpha_opt):
            opt.reset_agent(i)
        self.generators[i].manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
        self.agent_updates[i] = 0

    # --- acting ------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False,
            generator: torch.Generator | None = None) -> np.ndarray:
        """Actions in the environment's bounds. A pack of 1 takes one observation (D,) or a
        batch (B, D); a pack of K takes (K, D) or (K, B, D), agent k acting on row k.

        Stochastic actions draw their noise from ``generator`` (on the agent's device) when
        given, so a seeded generator replays the same actions whatever else ran; otherwise
        from each agent's own generator.
        """
        x = torch.as_tensor(np.asarray(obs, np.float32), device=self.device)
        single = self.num_agents == 1
        if x.shape[-1] != self.obs_dim or x.dim() - (0 if single else 1) not in (1, 2) or \
                (not single and x.shape[0] != self.num_agents):
            expect = "(D,) or (B, D)" if single else f"({self.num_agents}, D) or ({self.num_agents}, B, D)"
            raise ValueError(f"observations of shape {tuple(x.shape)}; expected {expect} with D = {self.obs_dim}")
        batched = x.dim() == (2 if single else 3)
        x = x.view(self.num_agents, -1, self.obs_dim)
        with self._precision():
            if deterministic:
                a = self.actor.deterministic(x, self._sparse(x))
            else:
                shape = (*x.shape[:2], self.action_dim)
                noise = torch.randn(shape, generator=generator, device=self.device) if generator is not None \
                    else self._normal(shape[1:])
                a = self.actor.sample(x, noise, self._sparse(x))[0]
        a = (a * self.action_scale + self.action_bias).cpu().numpy()
        a = np.clip(a, self.action_low, self.action_high)  # float rounding at a saturated tanh
        if single:
            return a[0] if batched else a[0, 0]
        return a if batched else a[:, 0]

    def _sparse(self, x: torch.Tensor) -> SparseRows | None:
        return SparseRows.of(x, self.goal_dims) if self.goal_dims else None

    # --- randomness --------------------------------------------------------------------
    def _normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal noise (K, *shape), agent k's from its own generator."""
        out = torch.empty(self.num_agents, *shape, device=self.device)
        for k, gen in enumerate(self.generators):
            out[k].normal_(generator=gen)
        return out

    def _dropout_masks(self, passes: int, batch: int) -> list[list[torch.Tensor] | None]:
        """Keep masks for ``passes`` critic forward passes: per pass, one (K * num_qs, batch,
        hidden) bool mask per dropout layer, agent k's from its own generator."""
        if not self.critic.dropouts:
            return [None] * passes
        q, k = self.cfg.num_qs, self.num_agents
        sizes = [q * batch * h for h in self.cfg.hidden_dims]
        per_agent = passes * sum(sizes)
        bits = torch.empty(k, -(-per_agent // 4), dtype=torch.int64, device=self.device)
        for i, gen in enumerate(self.generators):
            bits[i].random_(-(2 ** 63), None, generator=gen)  # all 64 bits uniform
        keep = bits.view(torch.int16)[:, :per_agent] >= self.critic.dropouts[0].threshold
        out, at = [], 0
        for _ in range(passes):
            masks = []
            for h, n in zip(self.cfg.hidden_dims, sizes):
                masks.append(keep[:, at:at + n].reshape(k * q, batch, h))
                at += n
            out.append(masks)
        return out

    # --- learning ----------------------------------------------------------------------
    def _batches(self, buffers: Sequence[ReplayBuffer]) -> tuple[torch.Tensor, ...]:
        """One batch from each agent's buffer, stacked (K, B, .) on the device."""
        return self._staging.put([b.sample(self.cfg.batch_size) for b in buffers])

    def _critic_step(self, obs: torch.Tensor, action: torch.Tensor, reward: torch.Tensor, next_obs: torch.Tensor,
                     discount: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One critic step for every agent, then the target EMA; (K,) losses and mean Qs."""
        action = (action - self.action_bias) / self.action_scale
        noise = self._normal(next_obs.shape[1:2] + (self.action_dim,))
        target_keep, keep = self._dropout_masks(2, obs.shape[1])
        alpha = self.log_alpha.detach().exp()[:, None]
        with torch.no_grad():
            sparse_next = self._sparse(next_obs)
            next_action, next_log_prob = self.actor.sample(next_obs, noise, sparse_next)
            # The target ensemble keeps dropout on too (DroQ), and the min over it curbs overestimation.
            next_q = self.critic_target(next_obs, next_action, target_keep, sparse_next).min(dim=1).values
            target = reward + discount * (next_q - alpha * next_log_prob)
        q = self.critic(obs, action, keep, self._sparse(obs))
        losses = (q - target[:, None]).square().mean(dim=(1, 2))  # each agent's MSE, as alone
        self.critic_opt.zero_grad()
        losses.sum().backward()
        self.critic_opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), self.cfg.tau)
        self.updates += 1
        self.agent_updates = [n + 1 for n in self.agent_updates]
        return losses.detach(), q.detach().mean(dim=(1, 2))

    def _actor_step(self, obs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One actor step (maximise mean ensemble Q + entropy), then one temperature step, for
        every agent; (K,) actor losses, temperatures and entropies."""
        noise = self._normal(obs.shape[1:2] + (self.action_dim,))
        (keep,) = self._dropout_masks(1, obs.shape[1])
        sparse = self._sparse(obs)
        action, log_prob = self.actor.sample(obs, noise, sparse)
        self.critic.requires_grad_(False)  # gradients flow through the critic, not into it
        q = self.critic(obs, action, keep, sparse).mean(dim=1)  # dropout active, as in DroQ
        losses = (self.log_alpha.detach().exp()[:, None] * log_prob - q).mean(dim=1)
        self.actor_opt.zero_grad()
        losses.sum().backward()
        self.actor_opt.step()
        self.critic.requires_grad_(True)

        alpha_loss = (self.log_alpha.exp()[:, None] * (-log_prob.detach() - self.target_entropy)).mean(dim=1)
        self.alpha_opt.zero_grad()
        alpha_loss.sum().backward()
        self.alpha_opt.step()
        return losses.detach(), self.log_alpha.detach().exp(), -log_prob.detach().mean(dim=1)

    def _as_list(self, batches: Batch | Sequence[Batch]) -> list[Batch]:
        batches = [batches] if isinstance(batches, Batch) else list(batches)
        if len(batches) != self.num_agents:
            raise ValueError(f"{len(batches)} batches for {self.num_agents} agents")
        return batches

    @staticmethod
    def _metrics(values: dict[str, torch.Tensor]) -> list[dict[str, float]]:
        columns = {name: v.tolist() for name, v in values.items()}
        return [dict(zip(columns, row)) for row in zip(*columns.values())]

    def update_critic(self, batches: Batch | Sequence[Batch]) -> dict[str, float] | list[dict[str, float]]:
        """One critic step on given batches (one per agent), then the target-network EMA."""
        with self._precision():
            loss, q = self._critic_step(*self._staging.put(self._as_list(batches)))
        metrics = self._metrics({"train/critic_loss": loss, "train/q": q})
        return metrics[0] if isinstance(batches, Batch) else metrics

    def update_actor(self, batches: Batch | Sequence[Batch]) -> dict[str, float] | list[dict[str, float]]:
        """One actor step and one temperature step on given batches (one per agent)."""
        with self._precision():
            obs = self._staging.put(self._as_list(batches))[0]
            loss, temperature, entropy = self._actor_step(obs)
        metrics = self._metrics({"train/actor_loss": loss, "train/temperature": temperature,
                                 "train/entropy": entropy})
        return metrics[0] if isinstance(batches, Batch) else metrics

    def update(self, buffers: ReplayBuffer | Sequence[ReplayBuffer]) -> dict[str, float] | list[dict[str, float]]:
        """``utd_ratio`` critic updates on fresh batches, then one actor/temperature update.

        A pack of 1 takes one buffer and returns one dict; otherwise one buffer per agent (each
        agent samples its own batches) and one dict per agent."""
        single = isinstance(buffers, ReplayBuffer)
        buffers = [buffers] if single else list(buffers)
        if len(buffers) != self.num_agents:
            raise ValueError(f"{len(buffers)} replay buffers for {self.num_agents} agents")
        with self._precision():
            for _ in range(self.cfg.utd_ratio):
                batch = self._batches(buffers)
                loss, q = self._critic_step(*batch)
            actor_loss, temperature, entropy = self._actor_step(batch[0])
        metrics = self._metrics({"train/critic_loss": loss, "train/q": q, "train/actor_loss": actor_loss,
                                 "train/temperature": temperature, "train/entropy": entropy})
        return metrics[0] if single else metrics

    # --- checkpointing -----------------------------------------------------------------
    def _agent_views(self, i: int) -> dict[str, list[tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]]:
        """Agent i's part of every stacked tensor in a lone agent's layout (nn.Linear's (out, in)
        actor weights): per component, (name, parameter, exp_avg, exp_avg_sq) views."""
        q = slice(i * self.cfg.num_qs, (i + 1) * self.cfg.num_qs)

        def actor_view(t: torch.Tensor) -> torch.Tensor:
            return t[i, 0] if t.shape[1] == 1 else t[i].T  # (K, 1, out) biases, (K, in, out) weights

        views = {}
        for name, module, opt, view in (("actor", self.actor, self.actor_opt, actor_view),
                                        ("critic", self.critic, self.critic_opt, lambda t: t[q])):
            views[name] = [(n, view(p), view(m), view(v))
                           for (n, p), m, v in zip(module.named_parameters(), opt.exp_avg, opt.exp_avg_sq)]
        views["critic_target"] = [(n, p[q], None, None) for n, p in self.critic_target.named_parameters()]
        views["log_alpha"] = [("log_alpha", self.log_alpha[i], self.alpha_opt.exp_avg[0][i],
                               self.alpha_opt.exp_avg_sq[0][i])]
        return views

    def agent_state_dict(self, i: int) -> dict:
        """Agent i alone, exactly as a pack of 1 saves it: tensors and plain containers only
        (loads with ``torch.load(weights_only=True)``), torch.optim.Adam's state format."""
        views = self._agent_views(i)
        cpu = lambda t: t.detach().to("cpu", copy=True).contiguous()  # noqa: E731
        state = {name: {n: cpu(p) for n, p, _, _ in views[name]} for name in ("actor", "critic", "critic_target")}
        state["log_alpha"] = cpu(self.log_alpha[i])
        for name, opt, key in (("actor_opt", self.actor_opt, "actor"), ("critic_opt", self.critic_opt, "critic"),
                               ("alpha_opt", self.alpha_opt, "log_alpha")):
            steps = opt.steps[i].tolist()
            state[name] = {
                "state": {j: {"step": torch.tensor(steps[j]), "exp_avg": cpu(m), "exp_avg_sq": cpu(v)}
                          for j, (_, _, m, v) in enumerate(views[key]) if steps[j] > 0},
                "param_groups": [_adam_group(opt, len(views[key]))],
            }
        state["updates"] = self.agent_updates[i]
        state["rng"] = self.generators[i].get_state()
        return state

    @torch.no_grad()
    def load_agent_state_dict(self, i: int, state: dict) -> None:
        """Put a lone agent's state (``agent_state_dict`` of any pack) into slot i."""
        views = self._agent_views(i)
        for name in ("actor", "critic", "critic_target"):
            if set(state[name]) != {n for n, *_ in views[name]}:
                raise ValueError(f"agent state's {name} has parameters {sorted(state[name])}, "
                                 f"this learner has {sorted(n for n, *_ in views[name])}")
            for n, p, _, _ in views[name]:
                p.copy_(state[name][n])
        self.log_alpha[i] = state["log_alpha"]
        for name, opt, key in (("actor_opt", self.actor_opt, "actor"), ("critic_opt", self.critic_opt, "critic"),
                               ("alpha_opt", self.alpha_opt, "log_alpha")):
            opt.reset_agent(i)
            if len(state[name]["param_groups"][0]["params"]) != len(views[key]):
                raise ValueError(f"agent state's {name} has {len(state[name]['param_groups'][0]['params'])} "
                                 f"parameters, this learner has {len(views[key])}")
            for j, s in state[name]["state"].items():
                _, _, m, v = views[key][int(j)]
                m.copy_(s["exp_avg"])
                v.copy_(s["exp_avg_sq"])
                opt.steps[i, int(j)] = float(s["step"])
        self.agent_updates[i] = int(state["updates"])
        if "rng" in state:  # saved before agents had their own generators: keep the current one
            self.generators[i].set_state(state["rng"])

    def state_dict(self) -> dict:
        """A pack of 1: its agent's state (``agent_state_dict(0)``); a pack: every agent's."""
        if self.num_agents == 1:
            return self.agent_state_dict(0)
        return {"agents": [self.agent_state_dict(i) for i in range(self.num_agents)], "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if self.num_agents == 1:
            self.load_agent_state_dict(0, state)
            self.updates = self.agent_updates[0]
            return
        if len(state["agents"]) != self.num_agents:
            raise ValueError(f"state of {len(state['agents'])} agents, this learner has {self.num_agents}")
        for i, agent in enumerate(state["agents"]):
            self.load_agent_state_dict(i, agent)
        self.updates = int(state["updates"])


def _adam_group(opt: PackedAdam, n: int) -> dict:
    """torch.optim.Adam's param_groups entry for ``n`` parameters with ``opt``'s settings."""
    group = opt.param_groups[0]
    template = torch.optim.Adam([torch.zeros(1)], lr=group["lr"], betas=group["betas"], eps=group["eps"])
    return {**template.state_dict()["param_groups"][0], "params": list(range(n))}


class _Staging:
    """Stacks K numpy batches into (K, B, .) device tensors. On CUDA the copy goes through
    pinned host memory without blocking (two buffers, each reused only once its copy is done);
    on the CPU the stacked arrays are used as they are."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.pinned: list[list[torch.Tensor] | None] = [None, None]
        self.events: list = [None, None]
        self.turn = 0

    def put(self, batches: Sequence[Batch]) -> tuple[torch.Tensor, ...]:
        fields = list(zip(*batches))  # per field, K arrays
        if not self.cuda:
            return tuple(torch.from_numpy(np.stack(arrays)) for arrays in fields)
        slot, self.turn = self.turn, 1 - self.turn
        shapes = [(len(arrays), *arrays[0].shape) for arrays in fields]
        if self.pinned[slot] is None or [tuple(t.shape) for t in self.pinned[slot]] != shapes:
            self.pinned[slot] = [torch.empty(s, pin_memory=True) for s in shapes]
        elif self.events[slot] is not None:
            self.events[slot].synchronize()  # its previous copy has left the buffer
        out = []
        for arrays, buf in zip(fields, self.pinned[slot]):
            np.stack(arrays, out=buf.numpy())
            out.append(buf.to(self.device, non_blocking=True))
        self.events[slot] = torch.cuda.Event()
        self.events[slot].record()
        return tuple(out)
