"""When a specialist stops training: F1-driven budgets.

RP1M trains every unit for ``specialist.total_steps`` whatever it achieves, so units that
pass early and hopeless ones both spend the whole budget. ``StopRule`` is fed each
evaluation's F1 and says whether to stop, and why (``specialist.budget``):

- ``target``: each of the last ``judge_evals`` evaluations reached ``stop_at_f1``. One lucky
  evaluation does not stop a unit (evaluation F1 swings by +-0.2 between evaluations early
  on), and the last one, whose policy plays the rollouts, passed too.
- ``plateau``: the *mean* F1 of the last ``judge_evals`` evaluations has not risen by
  ``plateau_margin`` above its best for ``plateau_window`` evaluations (after ``min_steps``:
  a specialist's F1 stays at the "press nothing" level for its first ~10k steps). The best
  moves only by a margin, so a slow steady rise still counts as improving.
- ``budget``: ``total_steps`` reached and the unit is not extended (no ``max_steps``, or
  its mean F1 is no longer improving by the plateau rule).
- ``cap``: an extended unit reached ``max_steps``.

With ``enabled: false`` the only reason is ``budget`` at ``total_steps`` (RP1M's behaviour).
The rule is pure (steps and F1s in, a decision out) and its state is plain containers, so it
travels in the unit's checkpoint and a resumed unit continues judging where it was.
"""

from __future__ import annotations

from typing import Any

import configs

TARGET, PLATEAU, BUDGET, CAP = "target", "plateau", "budget", "cap"
REASONS = (TARGET, PLATEAU, BUDGET, CAP)


class StopRule:
    """Decides after each evaluation whether a unit stops training (see the module docstring)."""

    def __init__(self, cfg: configs.BudgetConfig, total_steps: int) -> None:
        self.cfg = cfg
        self.total_steps = int(total_steps)
        self.history: list[tuple[int, float]] = []  # (step, F1) of every evaluation
        self.best: float | None = None  # best mean F1 (moved only by rises of plateau_margin)
        self.best_at = 0  # index into history of the evaluation that last moved ``best``
        self.reason: str | None = None
        self.stop_step: int | None = None

    @property
    def extends(self) -> bool:
        return self.cfg.enabled and self.cfg.max_steps is not None

    @property
    def end_step(self) -> int:
        """The last step training may reach: the cap for an extensible unit, else ``total_steps``."""
        return int(self.cfg.max_steps) if self.extends else self.total_steps

    @property
    def stopped(self) -> bool:
        return self.reason is not None

    def improving(self) -> bool:
        """Whether the mean F1 rose by the margin within the last ``plateau_window`` evaluations."""
        if self.cfg.plateau_window is None:
            return True
        if self.best is None:  # fewer than judge_evals evaluations: too early to say
            return True
        return len(self.history) - 1 - self.best_at < self.cfg.plateau_window

    def observe(self, step: int, f1: float) -> tuple[bool, str | None]:
        """Record the evaluation at ``step``; returns ``(stop, reason)`` (reason None: go on).
        Once stopped, it keeps answering the same reason."""
        if self.stopped:
            return True, self.reason
        self.history.append((int(step), float(f1)))
        recent = [f for _, f in self.history[-self.cfg.judge_evals:]]
        if len(recent) == self.cfg.judge_evals:
            score = sum(recent) / len(recent)
            if self.best is None or score >= self.best + self.cfg.plateau_margin:
                self.best, self.best_at = score, len(self.history) - 1
        reason = self._reason(step, recent)
        if reason is not None:
            self.reason, self.stop_step = reason, int(step)
        return reason is not None, reason

    def _reason(self, step: int, recent: list[float]) -> str | None:
        cfg = self.cfg
        if not cfg.enabled:
            return BUDGET if step >= self.total_steps else None
        if cfg.stop_at_f1 is not None and len(recent) == cfg.judge_evals and min(recent) >= cfg.stop_at_f1:
            return TARGET
        if step >= self.end_step:
            return CAP if self.extends else BUDGET
        if step >= self.total_steps and not (self.extends and self.improving()):
            return BUDGET
        if cfg.plateau_window is not None and step >= cfg.min_steps and not self.improving():
            return PLATEAU
        return None

    # --- checkpointing (plain containers: torch.load(weights_only=True) reads them) -------
    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history], "best": self.best, "best_at": self.best_at,
                "reason": self.reason, "stop_step": self.stop_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [(int(s), float(f)) for s, f in state["history"]]
        self.best, self.best_at = state["best"], int(state["best_at"])
        self.reason, self.stop_step = state["reason"], state["stop_step"]
