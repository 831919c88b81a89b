"""The F1 gate: when enough specialists are good enough, imitation learning starts.

A shard passes when its specialist's F1 is at least ``gate.f1_threshold`` (RP1M: 0.75) and it
belongs to the ``train`` split. The campaign driver calls, once per scheduling round::

    gate = Gate(cfg.gate)
    decision = gate.check(lake, last_launch_count)      # reads the lake catalog
    if decision.launch:
        launch_il(...)                                  # e.g. workers.il_trainer.train_il
        last_launch_count = decision.passing            # remember it in the campaign store

or, with the count already at hand, ``gate.decide(passing_count, last_launch_count)``.
The first launch happens at ``gate.min_shards`` passing shards; after that a relaunch happens
each time ``gate.relaunch_every`` more shards have passed (0: never relaunch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GateDecision:
    """What the gate saw: ``passing`` shards in the catalog and whether to ``launch`` now."""

    launch: bool
    passing: int
    shards: list[Any] = field(default_factory=list, repr=False)  # the passing ShardInfo records

    @property
    def song_hashes(self) -> list[str]:
        """Songs the passing shards come from (what an IL run trained on counts as 'seen')."""
        return sorted({s.song_hash for s in self.shards})


class Gate:
    """The launch rule over passing-shard counts; ``gate_cfg`` is the ``gate`` config section."""

    def __init__(self, gate_cfg: Any):
        self.f1_threshold = float(gate_cfg.f1_threshold)
        self.min_shards = int(gate_cfg.min_shards)
        self.relaunch_every = int(gate_cfg.relaunch_every)

    def decide(self, passing: int, last_launch_count: int | None = None) -> bool:
        """True when imitation learning should (re)start.

        ``passing``: shards passing now; ``last_launch_count``: how many passed at the previous
        launch (``None`` or 0: never launched).
        """
        if not last_launch_count:
            return passing >= self.min_shards
        return self.relaunch_every > 0 and passing - last_launch_count >= self.relaunch_every

    def passing_shards(self, lake: Any) -> list[Any]:
        """Committed train-split shards of ``lake`` (a ``workers.lake.Lake``) with F1 >= the threshold."""
        return list(lake.shards(min_f1=self.f1_threshold, split="train"))

    def check(self, lake: Any, last_launch_count: int | None = None) -> GateDecision:
        """Read the lake catalog and decide; the decision carries the passing shards."""
        shards = self.passing_shards(lake)
        return GateDecision(launch=self.decide(len(shards), last_launch_count), passing=len(shards), shards=shards)
