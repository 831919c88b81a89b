"""DroQ: soft actor-critic with a small dropout + LayerNorm Q ensemble (Hiraoka et al. 2022).

This is the specialist RP1M trains per song; every number comes from ``cfg.droq``, whose
defaults are RP1M table IV: actor and critics 3 x 256 GELU, 2 Q-networks with dropout 0.01
and LayerNorm (Linear -> Dropout -> LayerNorm -> activation), discount 0.88, Adam 3e-4,
batch 256, target EMA 0.05, learnable temperature with target entropy -action_dim / 2.

Read top to bottom: the networks, then the agent (acting, one update, an agent's state). The
actor is a tanh-squashed Gaussian; internally actions live in [-1, 1] and are scaled to the
environment's bounds only on the way out (``act``) and back in (``update``), so the critic
sees every action dimension on the same scale. One ``update`` per environment step does
``utd_ratio`` critic updates (each on a fresh batch, each followed by the target EMA) and then
one actor and temperature update, as in DroQ.

``DroQ(num_agents=K)`` holds K independent agents -- a pack; K = 1 is the plain specialist --
and its calls take and return one entry per agent: observations (K, D) or (K, B, D), one
replay buffer per agent, one metrics dict per agent. Their weights are stacked along a
leading agent dimension (``workers.rl.packing``: the stacked layers, the optimiser, the
layout of one agent's state), so one update of all K is one batched matmul per layer. Agents
share nothing but the arithmetic: each samples its own batch from its own replay buffer,
draws its dropout masks and action noise from its own generator, and has its own temperature
and Adam state; ``agent_state_dict(i)`` is what a lone agent's checkpoint holds.

What this learner does differently from the single-agent one it replaced (the same algorithm
and initial weights; other random draws and float rounding): Adam is torch's fused kernel;
dropout masks come from 16-bit random integers (``MaskDropout``) and, with action noise, from
each agent's generator rather than torch's global RNG. Two options trade exactness for speed:
``droq.sparse_goal`` adds the goal's weight rows instead of a dense matmul (the same sums in
another order; it pays on a CPU, where the goal is 83% of the first layers' inputs at ~2%
density, so ``auto``, the default, turns it on for a CPU learner), and
``droq.matmul_precision: medium`` lets matmuls run in bfloat16 (8-bit mantissa inputs, float32
accumulation: ~3 significant digits per product).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from configs import DroQConfig
from workers.piano.layout import GOAL_BITS
from workers.rl.packing import (AgentTensor, EnsembleLayerNorm, EnsembleLinear, InputLinear, SparseRows, Staging,
                                StackedAdam, adam_state, agent_layout, load_adam_state, load_module_state,
                                module_state)
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
class MaskDropout(nn.Dropout):
    """Dropout with the mask given by the caller (``mask``: x's shape, 0 or 1 / keep probability).

    The agent draws masks from 16-bit integers, 4 per 64-bit random draw: a quarter of the
    random numbers ``bernoulli_`` needs. The drop probability is thus rounded to a multiple of
    2**-16 (0.01 -> 0.009995) and kept units are scaled by the inverse of the exact keep
    probability, so the layer's expectation is unchanged."""

    def mask(self, bits: torch.Tensor) -> torch.Tensor:
        """The mask for uniform int16 ``bits``."""
        dropped = round(self.p * MASK_LEVELS)
        return torch.where(bits >= dropped - MASK_LEVELS // 2, MASK_LEVELS / (MASK_LEVELS - dropped), 0.0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x if mask is None else x * mask


class QEnsemble(nn.Module):
    """K agents' ``num_qs`` Q-networks evaluated together.

    ``forward(obs, action, keep)`` takes (K, B, .) inputs (``obs`` as its blocks: the sparse
    goal and the rest, or just the whole) shared by each agent's ``num_qs`` members and returns
    Q values of shape (K, num_qs, B); ``keep`` holds one dropout mask of shape
    (K * num_qs, B, hidden) per dropout layer, or None for no dropout."""

    def __init__(self, k: int, obs_blocks: Sequence[int], action_dim: int, cfg: DroQConfig):
        super().__init__()
        self.num_qs = cfg.num_qs
        layers: list[nn.Module] = []
        for i, hidden in enumerate(cfg.hidden_dims):
            layers.append(InputLinear(k, cfg.num_qs, [*obs_blocks, action_dim], hidden) if i == 0
                          else EnsembleLinear(k * cfg.num_qs, cfg.hidden_dims[i - 1], hidden))
            if cfg.critic_dropout > 0:
                layers.append(MaskDropout(cfg.critic_dropout))
            if cfg.critic_layer_norm:
                layers.append(EnsembleLayerNorm(k * cfg.num_qs, hidden))
            layers.append(ACTIVATIONS[cfg.activation]())
        layers.append(EnsembleLinear(k * cfg.num_qs, cfg.hidden_dims[-1], 1))
        self.net = nn.Sequential(*layers)

    @property
    def dropouts(self) -> list[MaskDropout]:
        return [m for m in self.net if isinstance(m, MaskDropout)]

    def forward(self, obs: Sequence[torch.Tensor | SparseRows], action: torch.Tensor,
                keep: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        k, b = action.shape[:2]
        masks = iter(keep) if keep is not None else None
        x = self.net[0]([*obs, action])
        for layer in self.net[1:]:
            if isinstance(layer, MaskDropout):
                x = layer(x, next(masks) if masks is not None else None)
            else:
                x = layer(x)
        return x.view(k, self.num_qs, b)


class Actor(nn.Module):
    """K tanh-squashed Gaussian policies over actions in [-1, 1]: (K, B, obs) -> (K, B, action);
    the observation is given as its blocks (see ``QEnsemble``)."""

    def __init__(self, k: int, obs_blocks: Sequence[int], action_dim: int, cfg: DroQConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for i, hidden in enumerate(cfg.hidden_dims):
            layers += [InputLinear(k, 1, obs_blocks, hidden) if i == 0
                       else EnsembleLinear(k, cfg.hidden_dims[i - 1], hidden), ACTIVATIONS[cfg.activation]()]
        self.trunk = nn.Sequential(*layers)
        self.mean = EnsembleLinear(k, cfg.hidden_dims[-1], action_dim)
        self.log_std = EnsembleLinear(k, cfg.hidden_dims[-1], action_dim)

    def forward(self, obs: Sequence[torch.Tensor | SparseRows]) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk[1:](self.trunk[0](obs))
        log_std = torch.tanh(self.log_std(h))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)
        return self.mean(h), log_std

    def sample(self, obs: Sequence[torch.Tensor | SparseRows],
               noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reparameterised action in [-1, 1] for standard normal ``noise`` (K, B, action)
        and its log-probability (K, B)."""
        mean, log_std = self(obs)
        u = mean + noise * log_std.exp()
        action = torch.tanh(u)
        # Gaussian log density, then the change of variables for tanh in the numerically
        # stable form log(1 - tanh(u)^2).
        log_prob = -0.5 * noise.square() - log_std - 0.5 * math.log(2 * math.pi)
        log_prob = log_prob - 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
        return action, log_prob.sum(-1)

    def deterministic(self, obs: Sequence[torch.Tensor | SparseRows]) -> torch.Tensor:
        return torch.tanh(self(obs)[0])


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
        self.device = resolve_device(cfg.device) if device is None else torch.device(device)
        has_goal = 0 < goal_dims < obs_dim
        sparse = has_goal and self.device.type == "cpu" if cfg.sparse_goal == "auto" else cfg.sparse_goal
        if sparse and not has_goal:
            raise ValueError(f"droq.sparse_goal needs 0 < goal_dims < obs_dim, got {goal_dims} and {obs_dim}")
        self.goal_dims = goal_dims if sparse else 0  # leading observation entries taken as sparse
        self.cfg, self.num_agents = cfg, num_agents
        self.obs_dim, self.action_dim = obs_dim, action_dim
        low = np.asarray(action_low, np.float32).reshape(action_dim)
        high = np.asarray(action_high, np.float32).reshape(action_dim)
        if not np.all(high > low):
            raise ValueError("action_high must exceed action_low in every dimension")
        self.action_low, self.action_high = low, high
        self.action_scale = torch.as_tensor((high - low) / 2, device=self.device)
        self.action_bias = torch.as_tensor((high + low) / 2, device=self.device)

        k = num_agents
        blocks = [self.goal_dims, obs_dim - self.goal_dims] if self.goal_dims else [obs_dim]
        self.actor = Actor(k, blocks, action_dim, cfg).to(self.device)
        self.critic = QEnsemble(k, blocks, action_dim, cfg).to(self.device)
        self.critic_target = QEnsemble(k, blocks, action_dim, cfg).to(self.device)
        self.critic_target.requires_grad_(False)
        self.log_alpha = torch.zeros(k, device=self.device, requires_grad=True)
        self.target_entropy = -action_dim / 2 if cfg.target_entropy is None else float(cfg.target_entropy)

        settings = dict(betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, num_agents=k)
        self.actor_opt = StackedAdam(list(self.actor.parameters()), lr=cfg.actor_lr, **settings)
        self.critic_opt = StackedAdam(list(self.critic.parameters()), lr=cfg.critic_lr, **settings)
        self.alpha_opt = StackedAdam([self.log_alpha], lr=cfg.temp_lr, **settings)
        self.generators = [torch.Generator(self.device) for _ in range(k)]
        self.agent_updates = [0] * k  # critic steps of each agent (its checkpoint's ``updates``)
        self.updates = 0  # critic steps of the pack (each steps every agent)
        self._staging = Staging(self.device)

        seeds = [None] * k if seed is None else [seed + i for i in range(k)] if isinstance(seed, int) else list(seed)
        if len(seeds) != k:
            raise ValueError(f"{len(seeds)} seeds for {k} agents")
        for i, s in enumerate(seeds):
            self.reset_agent(i, s)

    @property
    def temperature(self) -> list[float]:
        """Each agent's temperature."""
        return self.log_alpha.detach().exp().tolist()

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
        draws are a lone agent's before packing: nn.Linear's initialisation for the actor,
        layer by layer, then the critic's uniform(+-1/sqrt(fan_in)) weights and biases."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        params = list(self.actor.parameters())
        for t in agent_layout(self.actor, 1, i):
            value = torch.empty(t.gather(params).shape)
            if value.dim() == 2:  # weight (out, in)
                nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=gen)
            else:
                bound = 1.0 / math.sqrt(t.layer.in_features)
                value.uniform_(-bound, bound, generator=gen)
            t.scatter(params, value)
        params = list(self.critic.parameters())
        for t in agent_layout(self.critic, self.cfg.num_qs, i):
            shape = t.gather(params).shape
            if isinstance(t.layer, EnsembleLayerNorm):
                value = torch.full(shape, 1.0 if t.name.endswith("weight") else 0.0)
            else:
                bound = 1.0 / math.sqrt(t.layer.in_features)
                value = torch.empty(shape).uniform_(-bound, bound, generator=gen)
            t.scatter(params, value)
        k = self.num_agents
        for p, target in zip(self.critic.parameters(), self.critic_target.parameters()):
            target.view(k, -1)[i] = p.view(k, -1)[i]  # every parameter holds agent i in row i
        self.log_alpha[i] = math.log(self.cfg.init_temperature)
        for opt in (self.actor_opt, self.critic_opt, self.alpha_opt):
            opt.reset_agent(i)
        self.generators[i].manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
        self.agent_updates[i] = 0

    # --- acting ------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False,
            generator: torch.Generator | None = None) -> np.ndarray:
        """Actions in the environment's bounds for observations (K, D) or (K, B, D), agent k
        acting on row k: (K, A) or (K, B, A).

        Stochastic actions draw their noise from ``generator`` (on the agent's device) when
        given, so a seeded generator replays the same actions whatever else ran; otherwise
        from each agent's own generator.
        """
        x = torch.as_tensor(np.asarray(obs, np.float32), device=self.device)
        if x.shape[-1] != self.obs_dim or x.dim() not in (2, 3) or x.shape[0] != self.num_agents:
            raise ValueError(f"observations of shape {tuple(x.shape)}; expected ({self.num_agents}, D) or "
                             f"({self.num_agents}, B, D) with D = {self.obs_dim}")
        batched = x.dim() == 3
        x = x.view(self.num_agents, -1, self.obs_dim)
        with self._precision():
            if deterministic:
                a = self.actor.deterministic(self._blocks(x))
            else:
                shape = (*x.shape[:2], self.action_dim)
                noise = torch.randn(shape, generator=generator, device=self.device) if generator is not None \
                    else self._normal(shape[1:], range(self.num_agents))
                a = self.actor.sample(self._blocks(x), noise)[0]
        a = (a * self.action_scale + self.action_bias).cpu().numpy()
        a = np.clip(a, self.action_low, self.action_high)  # float rounding at a saturated tanh
        return a if batched else a[:, 0]

    def _blocks(self, obs: torch.Tensor) -> list[torch.Tensor | SparseRows]:
        """Observations as the first layers take them: [sparse goal, the rest] or [all]."""
        if not self.goal_dims:
            return [obs]
        return [SparseRows.of(obs[..., :self.goal_dims]), obs[..., self.goal_dims:]]

    @torch.no_grad()
    def q_values(self, obs: np.ndarray, action: np.ndarray) -> torch.Tensor:
        """The critic's Q values (no dropout) of actions in the environment's bounds:
        observations (K, B, D) and actions (K, B, A) -> (K, num_qs, B)."""
        x = torch.as_tensor(np.asarray(obs, np.float32), device=self.device)
        a = torch.as_tensor(np.asarray(action, np.float32), device=self.device)
        x, a = x.view(self.num_agents, -1, self.obs_dim), a.view(self.num_agents, -1, self.action_dim)
        with self._precision():
            return self.critic(self._blocks(x), (a - self.action_bias) / self.action_scale)

    # --- randomness --------------------------------------------------------------------
    def _normal(self, shape: tuple[int, ...], agents: Sequence[int]) -> torch.Tensor:
        """Standard normal noise (K, *shape), agent k's from its own generator; zeros for
        agents not in ``agents`` (whose generators are left as they are)."""
        fill = torch.empty if len(agents) == self.num_agents else torch.zeros
        out = fill(self.num_agents, *shape, device=self.device)
        for k in agents:
            out[k].normal_(generator=self.generators[k])
        return out

    def _dropout_masks(self, passes: int, batch: int, agents: Sequence[int]) -> list[list[torch.Tensor] | None]:
        """Dropout masks for ``passes`` critic forward passes: per pass, one (K * num_qs, batch,
        hidden) mask per dropout layer, agent k's part drawn from its own generator (for agents
        not in ``agents``, a mask that keeps everything)."""
        dropouts = self.critic.dropouts
        if not dropouts:
            return [None] * passes
        q, k = self.cfg.num_qs, self.num_agents
        sizes = [q * batch * h for h in self.cfg.hidden_dims]  # each agent's share per layer, in 16-bit draws
        total = passes * sum(sizes)
        # One draw per agent for the whole step; each mask is computed from a column range of
        # it, which lays it out agent-major without a copy.
        bits = (torch.empty if len(agents) == k else torch.zeros)(k, -(-total // 4), dtype=torch.int64,
                                                                   device=self.device)
        for i in agents:
            bits[i].random_(-(2 ** 63), None, generator=self.generators[i])  # all 64 bits uniform
        bits = bits.view(torch.int16)
        out, at = [], 0
        for _ in range(passes):
            masks = []
            for layer, h, n in zip(dropouts, self.cfg.hidden_dims, sizes):
                masks.append(layer.mask(bits[:, at:at + n]).view(k * q, batch, h))
                at += n
            out.append(masks)
        return out

    # --- learning ----------------------------------------------------------------------
    def _batches(self, buffers: Sequence[ReplayBuffer | None]) -> tuple[torch.Tensor, ...]:
        """One batch from each agent's buffer (zeros for None), stacked (K, B, .) on the device."""
        b = self.cfg.batch_size

        def zeros() -> Batch:
            obs = np.zeros((b, self.obs_dim), np.float32)
            return Batch(obs, np.zeros((b, self.action_dim), np.float32), np.zeros(b, np.float32), obs,
                         np.zeros(b, np.float32))

        return self._staging.put([zeros() if buffer is None else buffer.sample(b) for buffer in buffers])

    def _critic_step(self, obs: torch.Tensor, action: torch.Tensor, reward: torch.Tensor, next_obs: torch.Tensor,
                     discount: torch.Tensor, active: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One critic step for every agent (or the ``active`` ones: the others' losses do not
        count and their state stays), then the target EMA; (K,) losses and mean Qs."""
        agents = range(self.num_agents) if active is None else active
        action = (action - self.action_bias) / self.action_scale
        noise = self._normal(next_obs.shape[1:2] + (self.action_dim,), agents)
        target_keep, keep = self._dropout_masks(2, obs.shape[1], agents)
        alpha = self.log_alpha.detach().exp()[:, None]
        with torch.no_grad():
            next_obs = self._blocks(next_obs)
            next_action, next_log_prob = self.actor.sample(next_obs, noise)
            # The target ensemble keeps dropout on too (DroQ), and the min over it curbs overestimation.
            next_q = self.critic_target(next_obs, next_action, target_keep).min(dim=1).values
            target = reward + discount * (next_q - alpha * next_log_prob)
        q = self.critic(self._blocks(obs), action, keep)
        losses = (q - target[:, None]).square().mean(dim=(1, 2))  # each agent's MSE, as alone
        self.critic_opt.zero_grad()
        self._total(losses, active).backward()
        self.critic_opt.step(active)
        with torch.no_grad():
            targets, online = list(self.critic_target.parameters()), list(self.critic.parameters())
            if active is not None:  # each parameter holds agent i in row i
                k = self.num_agents
                targets = [t.view(k, -1)[i] for i in active for t in targets]
                online = [p.view(k, -1)[i] for i in active for p in online]
            torch._foreach_lerp_(targets, online, self.cfg.tau)
        self.updates += 1
        for i in agents:
            self.agent_updates[i] += 1
        return losses.detach(), q.detach().mean(dim=(1, 2))

    def _total(self, losses: torch.Tensor, active: list[int] | None) -> torch.Tensor:
        """The sum of the (K,) per-agent ``losses`` whose gradients are wanted."""
        if active is None:
            return losses.sum()
        return losses[torch.as_tensor(active, device=self.device)].sum()

    def _actor_step(self, obs: torch.Tensor, active: list[int] | None = None) -> tuple[torch.Tensor, ...]:
        """One actor step (maximise mean ensemble Q + entropy), then one temperature step, for
        every agent (or the ``active`` ones); (K,) actor losses, temperatures and entropies."""
        agents = range(self.num_agents) if active is None else active
        noise = self._normal(obs.shape[1:2] + (self.action_dim,), agents)
        (keep,) = self._dropout_masks(1, obs.shape[1], agents)
        obs = self._blocks(obs)
        action, log_prob = self.actor.sample(obs, noise)
        self.critic.requires_grad_(False)  # gradients flow through the critic, not into it
        q = self.critic(obs, action, keep).mean(dim=1)  # dropout active, as in DroQ
        losses = (self.log_alpha.detach().exp()[:, None] * log_prob - q).mean(dim=1)
        self.actor_opt.zero_grad()
        self._total(losses, active).backward()
        self.actor_opt.step(active)
        self.critic.requires_grad_(True)

        alpha_loss = (self.log_alpha.exp()[:, None] * (-log_prob.detach() - self.target_entropy)).mean(dim=1)
        self.alpha_opt.zero_grad()
        self._total(alpha_loss, active).backward()
        self.alpha_opt.step(active)
        return losses.detach(), self.log_alpha.detach().exp(), -log_prob.detach().mean(dim=1)

    def _as_list(self, batches: Sequence[Batch]) -> list[Batch]:
        batches = list(batches)
        if len(batches) != self.num_agents:
            raise ValueError(f"{len(batches)} batches for {self.num_agents} agents")
        return batches

    @staticmethod
    def _metrics(values: dict[str, torch.Tensor]) -> list[dict[str, float]]:
        columns = {name: v.tolist() for name, v in values.items()}
        return [dict(zip(columns, row)) for row in zip(*columns.values())]

    def update_critic(self, batches: Sequence[Batch]) -> list[dict[str, float]]:
        """One critic step on given batches (one per agent), then the target-network EMA."""
        with self._precision():
            loss, q = self._critic_step(*self._staging.put(self._as_list(batches)))
        return self._metrics({"train/critic_loss": loss, "train/q": q})

    def update_actor(self, batches: Sequence[Batch]) -> list[dict[str, float]]:
        """One actor step and one temperature step on given batches (one per agent)."""
        with self._precision():
            obs = self._staging.put(self._as_list(batches))[0]
            loss, temperature, entropy = self._actor_step(obs)
        return self._metrics({"train/actor_loss": loss, "train/temperature": temperature, "train/entropy": entropy})

    def update(self, buffers: Sequence[ReplayBuffer | None]) -> list[dict[str, float]]:
        """``utd_ratio`` critic updates on fresh batches, then one actor/temperature update;
        one buffer per agent (each samples its own batches), one metrics dict per agent.

        An agent whose buffer is None sits this update out: nothing of it changes (weights,
        optimiser, temperature, update count, generator) and its dict is empty -- a member
        still in its warm-up, or an idle slot.
        """
        buffers = list(buffers)
        if len(buffers) != self.num_agents:
            raise ValueError(f"{len(buffers)} replay buffers for {self.num_agents} agents")
        active = [i for i, b in enumerate(buffers) if b is not None]
        if not active:
            raise ValueError("no replay buffer to update from: every entry is None")
        active = None if len(active) == self.num_agents else active
        with self._precision():
            for _ in range(self.cfg.utd_ratio):
                batch = self._batches(buffers)
                loss, q = self._critic_step(*batch, active=active)
            actor_loss, temperature, entropy = self._actor_step(batch[0], active=active)
        metrics = self._metrics({"train/critic_loss": loss, "train/q": q, "train/actor_loss": actor_loss,
                                 "train/temperature": temperature, "train/entropy": entropy})
        return metrics if active is None else [m if i in active else {} for i, m in enumerate(metrics)]

    # --- an agent's state --------------------------------------------------------------
    def _components(self) -> list[tuple[str, nn.Module, int, StackedAdam | None]]:
        q = self.cfg.num_qs
        return [("actor", self.actor, 1, self.actor_opt), ("critic", self.critic, q, self.critic_opt),
                ("critic_target", self.critic_target, q, None)]

    @staticmethod
    def _alpha_layout(i: int) -> list[AgentTensor]:
        return [AgentTensor("log_alpha", None, (0,), "agent", i, 1, 0)]

    def agent_state_dict(self, i: int) -> dict:
        """Agent i alone, as a lone agent's checkpoint holds it: tensors and plain containers
        only (loads with ``torch.load(weights_only=True)``), networks in nn.Linear's layout,
        optimiser state in torch.optim.Adam's format; ``rng`` is the agent's noise generator
        (``rng_device`` the device it is for)."""
        state = {}
        for name, module, m, opt in self._components():
            state[name] = module_state(module, m, i)
            if opt is not None:
                state[f"{name}_opt"] = adam_state(opt, agent_layout(module, m, i))
        state["log_alpha"] = self.log_alpha[i].detach().cpu().clone()
        state["alpha_opt"] = adam_state(self.alpha_opt, self._alpha_layout(i))
        state["updates"] = self.agent_updates[i]
        state["rng"], state["rng_device"] = self.generators[i].get_state(), self.device.type
        return state

    @torch.no_grad()
    def load_agent_state_dict(self, i: int, state: dict) -> None:
        """Put a lone agent's state (``agent_state_dict`` of any pack) into slot i."""
        for name, module, m, opt in self._components():
            load_module_state(module, m, i, state[name], name)
            if opt is not None:
                load_adam_state(opt, agent_layout(module, m, i), state[f"{name}_opt"], name)
        self.log_alpha[i] = state["log_alpha"]
        load_adam_state(self.alpha_opt, self._alpha_layout(i), state["alpha_opt"], "alpha")
        self.agent_updates[i] = int(state["updates"])
        if "rng" not in state:  # saved before agents had their own generators: keep the current one
            return
        if state.get("rng_device", "cpu") == self.device.type:
            self.generators[i].set_state(state["rng"])
        else:  # a CPU generator's state does not fit a CUDA one: continue from a seed derived from it
            self.generators[i].manual_seed(int(torch.as_tensor(state["rng"]).long().sum()) * 1_000_003 + i)
