"""Reinforcement learning of one specialist per song chunk (RP1M).

- :mod:`workers.rl.droq`: the DroQ learner (SAC with a dropout + LayerNorm Q ensemble): networks,
  acting, one update, an agent's state; ``DroQ(num_agents=K)`` holds K agents, one entry per agent
  in and out;
- :mod:`workers.rl.packing`: holding K agents at once: layers stacked along an agent dimension,
  Adam over them (``torch.optim.Adam``, per-agent moments and steps), one agent's slice as a lone
  agent's ``state_dict``, batches staged onto the device;
- :mod:`workers.rl.replay`: compact replay memory with N-step returns;
- :mod:`workers.rl.threads`: OpenMP threads that sleep rather than spin when idle;
- :mod:`workers.rl.checkpoints`: checkpoints that keep the last two and set a damaged one aside;
- :mod:`workers.rl.budget`: F1-driven budgets: when a specialist stops (target, plateau, budget, cap);
- :mod:`workers.rl.specialist`: one unit's pieces: playing episodes and their seeds, rollouts into
  the lake, checkpoints and results;
- :mod:`workers.rl.envpool`: a pack's environments, stepped together in worker processes (which
  also play its evaluations and rollouts, and are replaced when one dies) or in this process;
- :mod:`workers.rl.pack`: the training loop: K units trained in one process with one learner,
  each member in one named state (``train_unit`` is a pack of one).
"""
