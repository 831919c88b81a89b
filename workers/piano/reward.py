"""RP1M's reward (eq. 3): each term defined once, as a pure function of one control step's state.

Both backends (``workers.piano.task`` through dm_control, ``workers.piano.lean`` on MjData
directly) read a ``StepState`` after each control step, each in its own way, and hand it to
the same ``Reward``: the terms of ``TERMS`` in order, each value times its weight, summed in
that order. A term is added or changed here, once; ``make_env`` refuses an environment whose
backend and task disagree on the terms' names or weights (``check_same_terms``).

    key_press_reward     r_press    RoboPianist's key press term
    sustain_reward       r_sustain  RoboPianist's sustain pedal term
    energy_reward        energy_coef * r_energy, r_energy = -sum |force * velocity|
    ot_fingering_reward  r_OT       optimal-transport fingering (``workers.piano.fingering``)
    collision_reward     collision_coef * r_collision, r_collision = 1 while no geom of
                         the right hand (forearm included) touches one of the left hand,
                         else 0: RoboPianist's forearm term widened from the two forearms
                         to the whole hands, so 0.5 per step like RoboPianist's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import configs
from workers.piano.fingering import ot_reward

# RoboPianist's key press and sustain shaping: tolerance(x, bounds=(0, 0.05), margin=0.5, sigmoid="gaussian")
# (robopianist.suite.tasks.piano_with_shadow_hands._KEY_CLOSE_ENOUGH_TO_PRESSED).
_CLOSE_ENOUGH = 0.05
_MARGIN = _CLOSE_ENOUGH * 10
_SCALE = np.sqrt(-2 * np.log(0.1))  # dm_control's Gaussian sigmoid, 0.1 at the margin


def tolerance(x: np.ndarray) -> np.ndarray:
    """``dm_control.utils.rewards.tolerance(x, bounds=(0, 0.05), margin=0.5, sigmoid="gaussian")``,
    the same float operations in fewer calls."""
    d = np.where(x < 0, 0 - x, x - _CLOSE_ENOUGH) / _MARGIN
    return np.where((0 <= x) & (x <= _CLOSE_ENOUGH), 1.0, np.exp(-0.5 * (d * _SCALE) ** 2))


@dataclass(frozen=True)
class StepState:
    """What the reward reads of one control step, after the physics has stepped."""

    goal: np.ndarray  # float[89]: this step's goal, 88 keys then the sustain pedal (1 = should sound)
    target: np.ndarray  # bool[88]: keys that should sound (goal[:88] > 0.5)
    keys: np.ndarray  # float[88]: key joint positions / their range (0 up .. 1 down)
    pressed: np.ndarray  # bool[88]: keys sounding
    sustain_pressed: bool  # the pedal is down
    power: tuple[np.ndarray, np.ndarray]  # |force * velocity| of each actuator, right hand then left
    ot_distance: float  # d_OT of the step's OT fingering (0 with no key to press)
    hands_touch: bool  # a geom of one hand touches one of the other


def key_press(s: StepState, cfg: configs.RewardConfig) -> float:
    """0.5 * mean closeness of the keys that should sound, + 0.5 unless a key sounds that should not."""
    value = 0.0
    if s.target.any():
        on = np.flatnonzero(s.target)
        value += 0.5 * tolerance(s.goal[on] - s.keys[on]).mean()
    return value + 0.5 * (1 - float(s.pressed[~s.target].any()))


def sustain(s: StepState, cfg: configs.RewardConfig) -> float:
    return float(tolerance(s.goal[-1] - float(s.sustain_pressed)))


def energy(s: StepState, cfg: configs.RewardConfig) -> float:
    """-sum |force * velocity| over both hands' actuators (summed per hand, right then left)."""
    return -float(s.power[0].sum()) - float(s.power[1].sum())


def ot_fingering(s: StepState, cfg: configs.RewardConfig) -> float:
    """r_OT of the step's d_OT; 0 with no key to press (as RoboPianist's fingering term)."""
    return ot_reward(s.ot_distance, cfg.ot_distance_threshold) if s.target.any() else 0.0


def no_collision(s: StepState, cfg: configs.RewardConfig) -> float:
    return 0.0 if s.hands_touch else 1.0


@dataclass(frozen=True)
class Term:
    """A named reward term: ``fn(state, reward config)``, then times ``weight`` (a number, or the
    name of the ``configs.RewardConfig`` field that holds it)."""

    name: str
    fn: Callable[[StepState, configs.RewardConfig], float]
    weight: float | str = 1.0


TERMS: tuple[Term, ...] = (
    Term("key_press_reward", key_press),
    Term("sustain_reward", sustain),
    Term("energy_reward", energy, "energy_coef"),
    Term("ot_fingering_reward", ot_fingering),
    Term("collision_reward", no_collision, "collision_coef"),
)


class Reward:
    """``TERMS`` with the weights of one reward config; call it with a step's state."""

    def __init__(self, cfg: configs.RewardConfig, terms: tuple[Term, ...] | None = None) -> None:
        self.cfg = cfg
        self.terms = TERMS if terms is None else terms
        self.weights: dict[str, float] = {
            t.name: float(getattr(cfg, t.weight) if isinstance(t.weight, str) else t.weight) for t in self.terms}

    def __call__(self, state: StepState) -> tuple[float, dict[str, float]]:
        """(reward, weighted value of each term by name): the values summed in ``TERMS`` order."""
        values = {t.name: self.weights[t.name] * t.fn(state, self.cfg) for t in self.terms}
        total = 0.0
        for value in values.values():
            total += value
        return total, values


def check_same_terms(backend: str, reward: Reward, task_reward: Reward) -> None:
    """Refuse a backend whose reward terms differ from its task's, by name or weight."""
    if reward.weights != task_reward.weights:
        raise ValueError(f"the {backend!r} backend's reward terms {reward.weights} differ from the task's "
                         f"{task_reward.weights}: both must come from workers.piano.reward.TERMS")
