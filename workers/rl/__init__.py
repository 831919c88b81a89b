"""Reinforcement learning of one specialist per song chunk (RP1M).

- :mod:`workers.rl.droq`: the DroQ learner (SAC with a dropout + LayerNorm Q ensemble), for one
  agent or a pack of K trained in one batched update;
- :mod:`workers.rl.threads`: OpenMP threads that sleep rather than spin when idle;
- :mod:`workers.rl.replay`: compact replay memory with N-step returns;
- :mod:`workers.rl.checkpoints`: checkpoints that keep the last two and set a damaged one aside;
- :mod:`workers.rl.budget`: F1-driven budgets: when a specialist stops (target, plateau, budget, cap);
- :mod:`workers.rl.specialist`: one unit of work: train, checkpoint, evaluate, record rollouts to the lake.
"""
