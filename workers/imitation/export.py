"""A finished specialist's policy on its own, as plain tensors, and one way to load any policy file.

``specialist_state`` (written by ``save_state``) holds the DroQ actor of a unit's checkpoint as a dict that loads with
``torch.load(path, weights_only=True)`` and needs nothing from pianoforge to run::

    {"kind": "specialist", "format": 1,
     "hidden": [[W0, b0], [W1, b1], [W2, b2]],   # Linear layers, each followed by `activation`
     "mean": [W, b], "log_std": [W, b],           # the Gaussian head (log_std: tanh-squashed to [-5, 2])
     "activation": "gelu",                        # torch.nn.functional.<activation>
     "action_low": float32[39], "action_high": float32[39],
     "obs_dim": 1144, "action_dim": 39, "meta": {unit_id, song_hash, song_name, chunk_index, f1, ...}}

Acting (the deterministic policy, as the specialist's rollouts with ``rollout_policy:
deterministic``; its stochastic rollouts add ``exp(log_std) * noise`` before the ``tanh``)::

    h = obs                                       # float32 [1144], RP1M order, not normalised
    for W, b in p["hidden"]: h = F.gelu(h @ W.T + b)
    a = torch.tanh(h @ p["mean"][0].T + p["mean"][1])             # in [-1, 1]
    action = low + (a + 1) / 2 * (high - low)                     # the environment's bounds

:func:`load_any_policy` loads either this or an imitation policy (``workers.imitation.policies``)
behind one interface: ``act(obs) -> float32 [H, 39]`` (H = 1 for a specialist).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.files import atomic_write

FORMAT = 1
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # as workers.rl.droq.Actor


def actor_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The DroQ actor's ``state_dict`` (``trunk.{i}.weight``, ``mean.*``, ``log_std.*``) in a unit's
    ``checkpoint.pt`` (as loaded with ``weights_only=True``): the one place that knows where the
    checkpoint keeps it."""
    try:
        return dict(checkpoint["agent"]["actor"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a specialist checkpoint: no agent/actor weights ({e})") from None


def _linear_pairs(weights: dict[str, torch.Tensor], prefix: str) -> list[list[torch.Tensor]]:
    indices = sorted({int(k.split(".")[1]) for k in weights if k.startswith(prefix + ".") and k.endswith(".weight")})
    return [[weights[f"{prefix}.{i}.weight"].float().cpu(), weights[f"{prefix}.{i}.bias"].float().cpu()] for i in indices]


def specialist_state(checkpoint: dict[str, Any], *, action_low: np.ndarray, action_high: np.ndarray,
                     activation: str = "gelu", meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The exported form (module docstring) of the actor in ``checkpoint``."""
    weights = actor_weights(checkpoint)
    hidden = _linear_pairs(weights, "trunk")
    if not hidden:
        raise ValueError("the actor has no hidden layers named trunk.<i>")
    return {
        "kind": "specialist", "format": FORMAT, "hidden": hidden,
        "mean": [weights["mean.weight"].float().cpu(), weights["mean.bias"].float().cpu()],
        "log_std": [weights["log_std.weight"].float().cpu(), weights["log_std.bias"].float().cpu()],
        "activation": activation,
        "action_low": torch.as_tensor(np.asarray(action_low, np.float32)),
        "action_high": torch.as_tensor(np.asarray(action_high, np.float32)),
        "obs_dim": int(hidden[0][0].shape[1]), "action_dim": int(weights["mean.weight"].shape[0]),
        "meta": dict(meta or {}),
    }


def save_state(state: dict[str, Any], out: str | Path) -> Path:
    """Write an exported policy (:func:`specialist_state`) to ``out`` atomically; returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:
        torch.save(state, f)
    return out


class SpecialistPolicy(nn.Module):
    """An exported specialist as a module: ``act(obs)`` gives the deterministic action as a chunk of one."""

    kind = "specialist"
    horizon = 1

    def __init__(self, state: dict[str, Any]):
        super().__init__()
        if state.get("kind") != "specialist" or state.get("format") != FORMAT:
            raise ValueError(f"not an exported specialist policy (kind {state.get('kind')!r}, format {state.get('format')!r})")
        self.activation = getattr(F, state["activation"])
        self.hidden = nn.ModuleList()
        for W, b in state["hidden"]:
            layer = nn.Linear(W.shape[1], W.shape[0])
            layer.load_state_dict({"weight": W, "bias": b})
            self.hidden.append(layer)
        self.mean = nn.Linear(state["mean"][0].shape[1], state["mean"][0].shape[0])
        self.mean.load_state_dict({"weight": state["mean"][0], "bias": state["mean"][1]})
        self.register_buffer("action_low", state["action_low"].float())
        self.register_buffer("action_high", state["action_high"].float())
        self.meta = dict(state.get("meta", {}))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        h = obs
        for layer in self.hidden:
            h = self.activation(layer(h))
        a = torch.tanh(self.mean(h))
        return self.action_low + (a + 1) / 2 * (self.action_high - self.action_low)

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """float32 [1, 39] for one observation (a chunk of one action)."""
        x = torch.as_tensor(np.asarray(obs, np.float32))
        return self(x[None] if x.dim() == 1 else x).numpy()


def load_any_policy(path: str | Path):
    """An exported specialist (:class:`SpecialistPolicy`) or an imitation policy
    (``workers.imitation.policies.load_policy``), in eval mode; both have ``act(obs) -> [H, 39]``."""
    path = Path(path)
    if path.is_dir():
        path = path / "policy.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no policy file here")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise ValueError(f"{path}: not a policy file ({e})") from e
    if isinstance(state, dict) and state.get("kind") == "specialist":
        return SpecialistPolicy(state).eval()
    from workers.imitation.policies import load_policy

    return load_policy(path)[0]
