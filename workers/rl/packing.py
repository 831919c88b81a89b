"""Packing: K agents' networks stacked along a leading agent dimension, and what that takes.

``workers.rl.droq`` builds its networks from these layers and reads as one agent's algorithm;
this module holds the mechanics of holding K of them at once:

- layers whose weights carry the agent dimension (``EnsembleLinear``, ``InputLinear``,
  ``EnsembleLayerNorm``), so one update of all K is one batched matmul per layer, and
  ``SparseRows``, the goal input multiplied as sums of weight rows;
- ``agent_layout``: where each parameter of a lone agent lies in the stacked tensors, so agent
  i's slice reads and writes as a lone agent's ``state_dict`` (``nn.Linear``'s (out, in)
  weights): checkpoints are per agent, whatever pack wrote or reads them;
- ``StackedAdam``: ``torch.optim.Adam`` over per-agent rows of the stacked parameters, each
  agent with its own moments and step count; an agent that sits an update out keeps them
  unchanged. ``adam_state`` / ``load_adam_state`` translate agent i's part to and from a lone
  ``torch.optim.Adam``'s ``state_dict``;
- ``Staging``: K numpy batches stacked into (K, B, .) device tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from workers.rl.replay import Batch


# --- stacked layers --------------------------------------------------------------------
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
    """The non-zeros of (K, B, D) inputs, row by row: the goal (~2% ones) multiplied as sums of
    weight rows rather than as a dense matmul."""

    agents: int
    batch: int
    index: torch.Tensor  # (nnz,) agent * D + column: the weight row of (K * D, N) it selects
    values: torch.Tensor  # (nnz,)
    offsets: torch.Tensor  # (K * B,) where each row's non-zeros start

    @classmethod
    def of(cls, x: torch.Tensor) -> SparseRows:
        k, b, d = x.shape
        flat = x.reshape(-1)
        nz = flat.nonzero().squeeze(1)  # (agent * B + row) * D + column, in order
        offsets = torch.zeros(k * b, dtype=torch.long, device=x.device)
        offsets[1:] = torch.bincount(nz // d, minlength=k * b).cumsum(0)[:-1]
        return cls(k, b, nz // (b * d) * d + nz % d, flat[nz], offsets)

    def times(self, weight: torch.Tensor) -> torch.Tensor:
        """(K, B, D) x (K, D, N) -> (K, B, N)."""
        k, d, n = weight.shape
        out = F.embedding_bag(self.index, weight.view(k * d, n), self.offsets, mode="sum",
                              per_sample_weights=self.values)
        return out.view(k, self.batch, n)


class InputLinear(nn.Module):
    """The first layer of K agents' networks, ``m`` per agent (its Q ensemble), all seeing the
    agent's input: (K, B, in) -> (K * m, B, out) as one (K, B, in) x (K, in, m * out) matmul.

    The input rows come in blocks (``blocks``: their sizes), one parameter each, so that a
    block needing no gradient (the observation when the actor learns through the critic)
    costs none, and a sparse block (the goal) skips the matmul; inputs are given per block.
    """

    def __init__(self, k: int, m: int, blocks: Sequence[int], out_features: int):
        super().__init__()
        self.m, self.in_features, self.out_features = m, sum(blocks), out_features
        self.blocks = nn.ParameterList([nn.Parameter(torch.empty(k, rows, m * out_features)) for rows in blocks])
        self.bias = nn.Parameter(torch.empty(k, 1, m * out_features))

    def forward(self, inputs: Sequence[torch.Tensor | SparseRows]) -> torch.Tensor:
        h = self.bias
        for x, w in zip(inputs, self.blocks):
            h = h + x.times(w) if isinstance(x, SparseRows) else torch.baddbmm(h, x, w)
        if self.m == 1:
            return h
        k, b = h.shape[:2]
        return h.view(k, b, self.m, self.out_features).transpose(1, 2).reshape(k * self.m, b, self.out_features)


class EnsembleLayerNorm(nn.Module):
    """LayerNorm over features with a separate scale and shift for each ensemble member."""

    def __init__(self, n: int, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, 1, features))
        self.bias = nn.Parameter(torch.zeros(n, 1, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, F.layer_norm(x, x.shape[-1:]), self.weight)


# --- one agent's slice -----------------------------------------------------------------
@dataclass(frozen=True)
class AgentTensor:
    """One parameter of a lone agent (``name``, of ``layer``) as it lies in stacked tensors:
    the concatenation along ``dim`` of agent ``agent``'s part of ``tensors[index]`` for each
    ``index`` in ``parts``, each part cut the way ``cut`` names (``CUTS``). ``tensors`` are a
    module's parameters or anything shaped like them (Adam's moments)."""

    name: str
    layer: nn.Module
    parts: tuple[int, ...]
    cut: str
    agent: int
    members: int  # networks per agent (its Q ensemble)
    dim: int

    def views(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [CUTS[self.cut](tensors[j], self.agent, self.members) for j in self.parts]

    def gather(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The lone agent's tensor (a copy)."""
        views = self.views(tensors)
        return views[0].clone(memory_format=torch.contiguous_format) if len(views) == 1 else torch.cat(views, self.dim)

    def scatter(self, tensors: Sequence[torch.Tensor], value: torch.Tensor) -> None:
        """Write the lone agent's tensor ``value`` into its place."""
        views, value = self.views(tensors), torch.as_tensor(value)
        shape = list(views[0].shape)
        if shape:
            shape[self.dim] = sum(v.shape[self.dim] for v in views)
        if list(value.shape) != shape:
            raise ValueError(f"{self.name}: a tensor of shape {tuple(value.shape)} where {tuple(shape)} belongs")
        if len(views) == 1:
            views[0].copy_(value)
            return
        for v, piece in zip(views, value.split([v.shape[self.dim] for v in views], self.dim)):
            v.copy_(piece)


CUTS = {  # how agent i's part of a stacked tensor looks as a lone agent's (m networks per agent)
    "member": lambda t, i, m: t[i * m:(i + 1) * m],  # (K * m, ...) -> (m, ...)
    "transposed": lambda t, i, m: t[i].T,  # (K, in, out) -> (out, in)
    "row": lambda t, i, m: t[i, 0],  # (K, 1, out) -> (out,)
    "split": lambda t, i, m: t[i].view(t.shape[1], m, -1).transpose(0, 1),  # (K, rows, m * out) -> (m, rows, out)
    "agent": lambda t, i, m: t[i],  # (K,) -> ()
}


def agent_layout(module: nn.Module, members: int, i: int) -> list[AgentTensor]:
    """Agent i's part of ``module`` (``members`` networks per agent) in a lone agent's layout,
    the one checkpoints keep, per lone-agent parameter in its order."""
    index = {n: j for j, (n, _) in enumerate(module.named_parameters())}
    out = []
    for prefix, layer in module.named_modules():
        if isinstance(layer, InputLinear):
            blocks = tuple(index[f"{prefix}.blocks.{b}"] for b in range(len(layer.blocks)))
            cut = "transposed" if members == 1 else "split"
            out.append(AgentTensor(f"{prefix}.weight", layer, blocks, cut, i, members, 1))
            out.append(AgentTensor(f"{prefix}.bias", layer, (index[f"{prefix}.bias"],),
                                   "row" if members == 1 else "split", i, members, 0))
        elif isinstance(layer, (EnsembleLinear, EnsembleLayerNorm)):
            weight = "transposed" if isinstance(layer, EnsembleLinear) else "row"
            for name, cut in (("weight", weight), ("bias", "row")):
                out.append(AgentTensor(f"{prefix}.{name}", layer, (index[f"{prefix}.{name}"],),
                                       cut if members == 1 else "member", i, members, 0))
    return out


def module_state(module: nn.Module, members: int, i: int) -> dict[str, torch.Tensor]:
    """Agent i's part of ``module`` as a lone agent's ``state_dict`` (on the CPU)."""
    params = list(module.parameters())
    return {t.name: t.gather(params).detach().cpu() for t in agent_layout(module, members, i)}


@torch.no_grad()
def load_module_state(module: nn.Module, members: int, i: int, state: dict, what: str) -> None:
    """Put a lone agent's ``state_dict`` of ``module`` (``what``, for errors) into agent i's part."""
    layout = agent_layout(module, members, i)
    names = sorted(t.name for t in layout)
    if sorted(state) != names:
        raise ValueError(f"agent state's {what} has parameters {sorted(state)}, this learner has {names}")
    params = list(module.parameters())
    for t in layout:
        t.scatter(params, state[t.name])


# --- the optimiser ---------------------------------------------------------------------
class StackedAdam:
    """``torch.optim.Adam`` (fused where torch has a fused kernel) over parameters stacked along
    a leading agent dimension, as K separate Adams.

    Adam is elementwise, so it runs over each agent's row of each stacked parameter: those rows
    are the optimiser's parameters, and their moments and step counts are rows of stacked
    tensors too (``exp_avg``, ``exp_avg_sq``: shaped like the parameters; ``steps``: (K,
    tensors)). Each agent has its own step count (Adam's bias correction depends on it), so an
    agent re-initialised or loaded mid-run continues exactly as it would alone; ``step(agents)``
    gives gradients to those agents' rows only, and Adam leaves a row without a gradient as it
    is (its moments and step count too)."""

    def __init__(self, params: list[torch.Tensor], num_agents: int, lr: float, betas: tuple[float, float],
                 eps: float):
        self.params, self.num_agents = params, num_agents
        k = num_agents
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        device = params[0].device
        self.steps = torch.zeros(k, len(params), device=device)  # per agent, per tensor
        fused = device.type in ("cpu", "cuda")
        with torch.no_grad():  # rows of the parameters, written in place by Adam
            self.rows = [[p.view(k, -1)[i] for p in params] for i in range(k)]
        self.adam = torch.optim.Adam([r for rows in self.rows for r in rows], lr=lr, betas=tuple(betas), eps=eps,
                                     fused=fused or None, foreach=None if fused else True)
        for i, rows in enumerate(self.rows):
            for j, row in enumerate(rows):
                self.adam.state[row] = {"step": self.steps[i, j], "exp_avg": self.exp_avg[j].view(k, -1)[i],
                                        "exp_avg_sq": self.exp_avg_sq[j].view(k, -1)[i]}

    @property
    def param_groups(self) -> list[dict]:
        return self.adam.param_groups

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, agents: Sequence[int] | None = None) -> None:
        """One Adam step of every agent, or of ``agents`` only (the others stay as they are)."""
        stepping = set(range(self.num_agents) if agents is None else agents)
        grads = [p.grad.reshape(self.num_agents, -1) for p in self.params]
        for i, rows in enumerate(self.rows):
            for row, grad in zip(rows, grads):
                row.grad = grad[i] if i in stepping else None
        self.adam.step()
        for rows in self.rows:
            for row in rows:
                row.grad = None

    @torch.no_grad()
    def reset_agent(self, i: int) -> None:
        """Agent i's Adam starts over: zero moments, step 0."""
        for t in self.exp_avg + self.exp_avg_sq:
            t.view(self.num_agents, -1)[i].zero_()
        self.steps[i].zero_()


def adam_state(opt: StackedAdam, layout: Sequence[AgentTensor]) -> dict:
    """Agent ``layout``'s part of ``opt`` as torch.optim.Adam's ``state_dict`` of a lone agent
    whose parameters are ``layout``, in order."""
    state = {}
    for j, t in enumerate(layout):
        step = float(opt.steps[t.agent, t.parts[0]])  # all parts of a parameter step together
        if step > 0:
            state[j] = {"step": torch.tensor(step), "exp_avg": t.gather(opt.exp_avg).cpu(),
                        "exp_avg_sq": t.gather(opt.exp_avg_sq).cpu()}
    group = opt.param_groups[0]
    template = torch.optim.Adam([torch.zeros(1)], lr=group["lr"], betas=group["betas"], eps=group["eps"])
    return {"state": state, "param_groups": [{**template.state_dict()["param_groups"][0],
                                              "params": list(range(len(layout)))}]}


@torch.no_grad()
def load_adam_state(opt: StackedAdam, layout: Sequence[AgentTensor], state: dict, what: str) -> None:
    """Put a lone agent's torch.optim.Adam ``state_dict`` (of ``what``, for errors) into agent
    ``layout``'s part of ``opt``."""
    count = len(state["param_groups"][0]["params"])
    if count != len(layout):
        raise ValueError(f"agent state's {what} optimiser has {count} parameters, this learner has {len(layout)}")
    i = layout[0].agent
    opt.reset_agent(i)
    for j, s in state["state"].items():
        t = layout[int(j)]
        t.scatter(opt.exp_avg, s["exp_avg"])
        t.scatter(opt.exp_avg_sq, s["exp_avg_sq"])
        for index in t.parts:
            opt.steps[i, index] = float(s["step"])


# --- batches onto the device -----------------------------------------------------------
class Staging:
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
