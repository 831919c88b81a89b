"""Packing mechanics: Adam over stacked agents is K plain torch Adams, an agent that sits a step
out keeps its Adam state, and an agent's slice of stacked layers reads and writes as a lone
agent's ``state_dict``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from workers.rl.packing import EnsembleLinear, InputLinear, Staging, StackedAdam, adam_state, agent_layout
from workers.rl.replay import Batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K, SHAPES = 3, [(4, 5), (1, 5)]


def grads(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(K, *s, generator=g) for s in SHAPES]


def test_stacked_adam_is_k_plain_adams_and_an_agent_sitting_out_keeps_its_state():
    stacked = [nn.Parameter(torch.randn(K, *s, generator=torch.Generator().manual_seed(j))) for j, s in enumerate(SHAPES)]
    plain = [[nn.Parameter(p.detach()[i].clone()) for p in stacked] for i in range(K)]
    opt = StackedAdam(stacked, K, lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    plains = [torch.optim.Adam(ps, lr=1e-2, betas=(0.9, 0.999), eps=1e-8) for ps in plain]
    active = [[0, 1, 2], [0, 2], [0, 2], [1], None]  # agent 1 sits steps 1 and 2 out, 0 and 2 step 3
    for step, agents in enumerate(active):
        opt.zero_grad()
        for p, g in zip(stacked, grads(step)):
            p.grad = g.clone()
        if agents == [1]:
            before = adam_state(opt, agent_layout(Holder(stacked), 1, 0))
        opt.step(agents)
        for i in agents if agents is not None else range(K):
            for p, g in zip(plain[i], grads(step)):
                p.grad = g[i].clone()
            plains[i].step()
        if agents == [1]:  # agent 0 did not step: moments and step count as they were
            after = adam_state(opt, agent_layout(Holder(stacked), 1, 0))
            assert after["state"].keys() == before["state"].keys()
            for j in after["state"]:
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    assert torch.equal(after["state"][j][key], before["state"][j][key])
    for i in range(K):
        for p, q in zip(stacked, plain[i]):
            torch.testing.assert_close(p.detach()[i], q.detach(), rtol=0, atol=1e-7)
        assert opt.steps[i].tolist() == [float(plains[i].state[q]["step"]) for q in plain[i]]
    assert opt.steps[:, 0].tolist() == [4.0, 3.0, 4.0]


class Holder(nn.Module):
    """Two stacked ``EnsembleLinear``-shaped parameters, one agent each (for ``agent_layout``)."""

    def __init__(self, params):
        super().__init__()
        layer = EnsembleLinear(K, SHAPES[0][0], SHAPES[0][1])
        layer.weight, layer.bias = params[0], params[1]
        self.layer = layer


def test_an_agents_slice_reads_and_writes_as_a_lone_agents_state_dict():
    torch.manual_seed(0)
    layer = InputLinear(K, 2, [3, 4], 5)  # 2 networks per agent, input in two blocks
    for p in layer.parameters():
        nn.init.normal_(p)
    layout = agent_layout(nn.Sequential(layer), 2, 1)
    assert [t.name for t in layout] == ["0.weight", "0.bias"]
    params = list(layer.parameters())
    weight = layout[0].gather(params)
    assert weight.shape == (2, 7, 5)  # (networks, all input rows, out)
    x = torch.randn(K, 6, 7)
    out = layer([x[..., :3], x[..., 3:]])  # (K * 2, B, out): agent 1's networks are rows 2, 3
    torch.testing.assert_close(out[2:4], torch.baddbmm(layout[1].gather(params), x[1].expand(2, 6, 7), weight))
    with torch.no_grad():
        layout[0].scatter(params, torch.zeros_like(weight))
    assert layer.blocks[0][1].abs().sum() == 0 and layer.blocks[1][1].abs().sum() == 0
    assert layer.blocks[0][0].abs().sum() > 0 and layer.blocks[0][2].abs().sum() > 0  # the others untouched
    with pytest.raises(ValueError, match=r"0\.weight: a tensor of shape \(7, 5\)"):
        layout[0].scatter(params, torch.zeros(7, 5))


def test_staging_stacks_each_field_of_k_batches():
    batches = [Batch(*(np.full((2, 3), i, np.float32) for _ in range(5))) for i in range(K)]
    staged = Staging(torch.device("cpu")).put(batches)
    assert len(staged) == 5 and all(t.shape == (K, 2, 3) for t in staged)
    assert staged[0][:, 0, 0].tolist() == [0.0, 1.0, 2.0]
