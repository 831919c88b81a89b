"""One generalist from all specialists (OmniPianist): policies, distributed training, evaluation.

- :mod:`workers.imitation.policies`: the flow-matching transformer and a BC MLP baseline;
- :mod:`workers.imitation.trainer`: Ray Train DDP on the lake's passing shards;
- :mod:`workers.imitation.evaluate`: per-song F1 on songs seen in training and held out;
- :mod:`workers.imitation.export`: policies as plain tensors that load without pianoforge.
"""
