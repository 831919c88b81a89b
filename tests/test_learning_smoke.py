"""A learning smoke test: DroQ (the specialist's learner, with its replay buffer) must learn a
task small enough to learn in seconds, and its critic must hold the right values.

The task: a point on [-1, 1] moves by 0.25 x action per step; reward 1 - |x - 0.5|; every
episode is cut by a time limit after 20 steps (truncation, never termination), discount 0.95.
The best policy reaches 0.5 and stays there, so the soft value of standing at the goal is
about 1 / (1 - 0.95) = 20; an episode's return is at most ~19.5.

Measured with these settings (seed 0, 1000 updates), and what breaks when the learner is wrong:

============================================  ==============  ==============  ===========
learner                                        eval return      Q(goal, 0)     temperature
============================================  ==============  ==============  ===========
as it is                                       19.2             17.7            0.19
critic target ``reward - discount * (...)``    18.1             0.46 (fails)    0.16
temperature loss sign flipped                  11.4 (fails)     362 (fails)     525
truncation stored as termination               18.3             9.2 (fails)     0.19
doing nothing (action 0) / random actions      ~7.5 / ~10
============================================  ==============  ==============  ===========

So the test checks the return (catches a learner that does not learn) and the critic's value
at the goal (catches a wrong Bellman target: sign, or bootstrapping cut at time limits).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import configs
from workers.rl.droq import DroQ
from workers.rl.replay import ReplayBuffer

GOAL, HORIZON, SPEED, DISCOUNT = 0.5, 20, 0.25, 0.95


def _move(x: np.ndarray, action: np.ndarray) -> tuple[np.ndarray, float]:
    x = np.clip(x + SPEED * action, -1.0, 1.0).astype(np.float32)
    return x, float(1.0 - abs(x[0] - GOAL))


@pytest.mark.slow
def test_droq_learns_to_reach_and_values_the_goal():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    steps, warmup = 1200, 200
    cfg = configs.load(overrides={"droq.hidden_dims": [64, 64], "droq.batch_size": 64, "droq.discount": DISCOUNT,
                                  "droq.actor_lr": 1e-3, "droq.critic_lr": 1e-3, "droq.temp_lr": 3e-3,
                                  "droq.device": "cpu"}).droq
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        agent = DroQ(1, 1, np.array([-1.0]), np.array([1.0]), cfg)
        buffer = ReplayBuffer(1, 1, steps + 10, DISCOUNT, cfg.n_step, binary_dims=0, seed=0)
        x, t = rng.uniform(-1, 1, 1).astype(np.float32), 0
        for i in range(steps):
            action = rng.uniform(-1, 1, 1).astype(np.float32) if i < warmup else agent.act(x[None])[0]
            next_x, reward = _move(x, action)
            t += 1
            buffer.add(x, action, reward, next_x, terminated=False, truncated=t == HORIZON)
            x = next_x
            if t == HORIZON:
                x, t = rng.uniform(-1, 1, 1).astype(np.float32), 0
            if i >= warmup:
                agent.update([buffer])

        starts = np.random.default_rng(99).uniform(-1, 1, (10, 1)).astype(np.float32)
        returns = []
        for x in starts:
            total = 0.0
            for _ in range(HORIZON):
                x, reward = _move(x, agent.act(x[None], deterministic=True)[0])
                total += reward
            returns.append(total)
        q_goal = agent.q_values(np.array([[[GOAL]]]), np.array([[[0.0]]]))[0].min(dim=0).values.item()
    finally:
        torch.set_num_threads(threads)

    assert np.mean(returns) > 16.0, returns  # doing nothing scores ~7.5, random actions ~10
    assert 14.0 < q_goal < 26.0, q_goal  # the soft value of staying at the goal is ~20
    assert agent.temperature[0] < cfg.init_temperature  # entropy above the target pulls it down
