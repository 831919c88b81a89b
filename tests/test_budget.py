"""F1-driven budgets: the stop rule's decisions, exactly where each reason fires, and its checkpoint.

Sequences use F1 values exact in binary (0.25, 0.5, ...) so that boundaries (">= target",
"rise of at least the margin", "window evaluations") are tested exactly: moving any of them
by one evaluation or turning ">=" into ">" fails a test here.
"""

from __future__ import annotations

import io

import pytest
import torch

import configs
from configs import ConfigError
from workers.rl.budget import BUDGET, CAP, PLATEAU, TARGET, StopRule

EVERY = 10  # steps between evaluations in these tests


DEFAULT_BUDGET = configs.load().specialist.budget.model_dump()  # default.yaml's


def rule(total_steps: int = 1000, **budget) -> StopRule:
    return StopRule(configs.BudgetConfig(**{**DEFAULT_BUDGET, "enabled": True, **budget}), total_steps)


def first_stop(r: StopRule, f1s: list[float], every: int = EVERY) -> tuple[int | None, str | None]:
    """Feed evaluations at every, 2*every, ...; the step and reason of the first stop (None, None: none)."""
    for i, f1 in enumerate(f1s, start=1):
        stop, reason = r.observe(i * every, f1)
        if stop:
            return i * every, reason
    return None, None


# --- target ---------------------------------------------------------------------------------
def test_target_needs_each_of_the_last_judge_evals_at_or_above_it():
    # One swing above the target stops nothing; the third consecutive evaluation at 0.75 does.
    assert first_stop(rule(stop_at_f1=0.75, judge_evals=3), [0.25, 0.875, 0.5, 0.75, 0.875, 0.75]) == (60, TARGET)


def test_target_is_not_the_mean_of_the_window():
    # Mean of the last three is 0.79 > 0.75, but the middle one failed: no stop.
    assert first_stop(rule(stop_at_f1=0.75, judge_evals=3), [1.0, 0.5, 0.875]) == (None, None)


def test_target_with_one_evaluation_stops_at_the_first_pass():
    assert first_stop(rule(stop_at_f1=0.5, judge_evals=1), [0.25, 0.375, 0.5]) == (30, TARGET)


def test_no_target_when_stop_at_f1_is_null():
    assert first_stop(rule(stop_at_f1=None, judge_evals=1), [1.0] * 5) == (None, None)


def test_target_wins_over_budget_at_the_last_step():
    r = rule(total_steps=30, stop_at_f1=0.5, judge_evals=2)
    assert first_stop(r, [0.5, 0.5, 0.5]) == (20, TARGET)
    r = rule(total_steps=30, stop_at_f1=0.5, judge_evals=3)
    assert first_stop(r, [0.5, 0.5, 0.5]) == (30, TARGET)


# --- plateau --------------------------------------------------------------------------------
def test_plateau_fires_window_evaluations_after_the_last_rise_of_the_mean():
    # Means of three: idx2 0, idx3 0.25, idx4 0.5, idx5 0.75 (best), then flat: stalled once
    # 3 evaluations (idx6, idx7, idx8) have passed without a rise -> stops at the 9th evaluation.
    f1s = [0.0, 0.0, 0.0, 0.75, 0.75, 0.75] + [0.75] * 10
    assert first_stop(rule(stop_at_f1=None, judge_evals=3, plateau_window=3, plateau_margin=0.125), f1s) == (90, PLATEAU)


def test_a_rise_of_exactly_the_margin_counts_as_improvement():
    # Single evaluations (judge_evals 1) rising by exactly the margin every other evaluation never
    # stall a window of 2; with a window of 1 the evaluation in between already stalls.
    f1s = [0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75]
    assert first_stop(rule(stop_at_f1=None, judge_evals=1, plateau_window=2, plateau_margin=0.25), f1s) == (None, None)
    assert first_stop(rule(stop_at_f1=None, judge_evals=1, plateau_window=1, plateau_margin=0.25), f1s) == (20, PLATEAU)


def test_a_slow_steady_rise_below_the_margin_per_evaluation_is_still_improving():
    # +0.125 per evaluation against a margin of 0.25: the best moves every second evaluation.
    f1s = [i * 0.125 for i in range(8)]
    assert first_stop(rule(stop_at_f1=None, judge_evals=1, plateau_window=2, plateau_margin=0.25), f1s) == (None, None)


def test_rises_smaller_than_the_margin_do_not_reset_the_window():
    # 0.5 then rises of 0.125 (< margin 0.25) and back: the best stays at the first 0.5.
    f1s = [0.5, 0.625, 0.5, 0.625, 0.5]
    assert first_stop(rule(stop_at_f1=None, judge_evals=1, plateau_window=3, plateau_margin=0.25), f1s) == (40, PLATEAU)


def test_plateau_waits_for_min_steps():
    f1s = [0.125] * 10
    cfg = dict(stop_at_f1=None, judge_evals=1, plateau_window=2, plateau_margin=0.25)
    assert first_stop(rule(**cfg), f1s) == (30, PLATEAU)
    assert first_stop(rule(**cfg, min_steps=75), f1s) == (80, PLATEAU)
    assert first_stop(rule(**cfg, min_steps=80), f1s) == (80, PLATEAU)  # from min_steps on


def test_no_plateau_stop_without_a_window():
    assert first_stop(rule(stop_at_f1=None, judge_evals=1), [0.125] * 50) == (None, None)


def test_a_drop_after_the_best_still_stalls():
    # Forgetting (F1 falls) is not improvement.
    f1s = [0.25, 0.75, 0.25, 0.25, 0.25]
    assert first_stop(rule(stop_at_f1=None, judge_evals=1, plateau_window=3, plateau_margin=0.25), f1s) == (50, PLATEAU)


# --- budget, extension, cap -----------------------------------------------------------------
def test_budget_at_total_steps_without_extension():
    assert first_stop(rule(total_steps=50, stop_at_f1=None), [0.5] * 10) == (50, BUDGET)
    r = rule(total_steps=50, stop_at_f1=None)
    assert r.end_step == 50


def test_improving_unit_is_extended_to_the_cap():
    r = rule(total_steps=30, stop_at_f1=None, judge_evals=1, plateau_window=2, plateau_margin=0.125, max_steps=60)
    assert r.end_step == 60
    assert first_stop(r, [i * 0.125 for i in range(10)]) == (60, CAP)


def test_extension_ends_with_budget_once_the_unit_stops_improving():
    # Improving up to step 40 (past total_steps 30), flat after: stalled at step 60 -> budget, not plateau.
    f1s = [0.0, 0.125, 0.25, 0.375, 0.375, 0.375, 0.375]
    r = rule(total_steps=30, stop_at_f1=None, judge_evals=1, plateau_window=2, plateau_margin=0.125, max_steps=100)
    assert first_stop(r, f1s) == (60, BUDGET)


def test_unit_not_improving_at_total_steps_is_not_extended():
    # No rise for the 2 evaluations up to total_steps: stopped there (budget, not plateau) ...
    cfg = dict(total_steps=50, stop_at_f1=None, judge_evals=1, plateau_window=2, plateau_margin=0.125, max_steps=100)
    assert first_stop(rule(**cfg), [0.0, 0.125, 0.25, 0.25, 0.25]) == (50, BUDGET)
    # ... while the same unit rising at its last evaluation goes on.
    assert first_stop(rule(**cfg), [0.0, 0.125, 0.25, 0.25, 0.375]) == (None, None)


def test_disabled_rule_keeps_rp1m_behaviour():
    cfg = configs.load().specialist
    assert cfg.budget.enabled is False
    r = StopRule(configs.BudgetConfig(**{**DEFAULT_BUDGET, "enabled": False, "stop_at_f1": 0.5, "judge_evals": 1,
                                         "plateau_window": 1, "max_steps": 10_000}), total_steps=50)
    assert r.end_step == 50  # no extension when disabled
    assert first_stop(r, [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]) == (50, BUDGET)


# --- state ----------------------------------------------------------------------------------
def test_stopped_rule_keeps_its_answer():
    r = rule(stop_at_f1=0.5, judge_evals=1)
    assert r.observe(10, 0.75) == (True, TARGET)
    assert r.observe(20, 0.0) == (True, TARGET)
    assert r.stop_step == 10 and r.history == [(10, 0.75)]


def test_checkpointed_state_continues_the_same_judgement():
    cfg = dict(stop_at_f1=0.875, judge_evals=2, plateau_window=3, plateau_margin=0.125, total_steps=200,
               max_steps=400)
    f1s = [0.0, 0.25, 0.5, 0.5, 0.625, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    whole = first_stop(rule(**cfg), f1s)
    assert whole[1] == PLATEAU

    for cut in range(1, len(f1s)):
        first = rule(**cfg)
        assert first_stop(first, f1s[:cut]) == (None, None) or cut * EVERY >= whole[0]
        if first.stopped:
            continue
        # Through torch.save / weights_only load, as in the unit's checkpoint.
        buf = io.BytesIO()
        torch.save({"budget": first.state_dict()}, buf)
        buf.seek(0)
        second = rule(**cfg)
        second.load_state_dict(torch.load(buf, weights_only=True)["budget"])
        rest = [second.observe((cut + i) * EVERY, f) for i, f in enumerate(f1s[cut:], start=1)]
        stops = [((cut + i) * EVERY, reason) for i, (stop, reason) in enumerate(rest, start=1) if stop]
        assert stops[0] == whole, cut


def test_config_checks_the_extension():
    with pytest.raises(ConfigError, match="max_steps"):
        configs.load(overrides={"specialist.budget.max_steps": 9_000_000})  # no plateau_window
    with pytest.raises(ConfigError, match="below total_steps"):
        configs.load(overrides={"specialist.budget.max_steps": 100, "specialist.budget.plateau_window": 5})
    fast = configs.load(profile="fast")
    b = fast.specialist.budget
    assert b.enabled and b.max_steps >= fast.specialist.total_steps and b.plateau_window
    # the learner settings the grid chose apply on top of the defaults, which stay RP1M's
    base = configs.load()
    assert (base.droq.init_temperature, base.droq.utd_ratio, base.droq.n_step) == (1.0, 1, 1)
    assert (fast.droq.init_temperature, fast.droq.utd_ratio, fast.droq.n_step) == (0.1, 2, 3)
    assert fast.droq.tau == base.droq.tau and fast.droq.hidden_dims == base.droq.hidden_dims


# --- what a campaign shows ------------------------------------------------------------------
def test_status_shows_stop_reasons_and_the_steps_saved(tmp_path):
    from rich.console import Console

    from orchestrator.status import read_status, render, steps_text
    from orchestrator.store import SUCCEEDED, CampaignStore
    from workers.synthetic import make_units
    from workers.units import UnitResult

    units = make_units(1, 4, "cfg00000")
    stops = [("target", 2_000_000), ("target", 3_000_000), ("plateau", 1_500_000), ("cap", 12_000_000)]
    with CampaignStore(tmp_path / "campaign.db") as store:
        store.put_config({}, "k")
        store.add_units(units, "k")
        for unit, (reason, steps) in zip(units, stops):
            store.mark_running(unit.unit_id)
            store.mark_finished(unit.unit_id, UnitResult(
                unit_id=unit.unit_id, f1=0.8, precision=0.8, recall=0.8, episode_return=1.0, steps=steps,
                shard_path=None, seconds=100.0, eval_seconds=2.0, stop_reason=reason, stop_step=steps,
                budget_steps=8_000_000), SUCCEEDED)
    status = read_status(tmp_path)
    console = Console(width=250, record=True)
    console.print(render(status))
    text = console.export_text()
    # 32M budgeted, 18.5M trained: 13.5M (42%) saved; evaluations 2 s of every 100 s.
    assert "stopped by: target 2, plateau 1, budget 0, cap 1" in text
    assert "trained 18.50M of 32.00M budgeted steps (saved 13.50M, 42%)" in text
    assert "evaluation: 2.0% of worker time" in text
    assert [steps_text(n) for n in (950, 12_500, -3_200_000)] == ["950", "12.5k", "-3.20M"]


def test_status_without_budgets_shows_no_budget_line(tmp_path):
    from rich.console import Console

    from orchestrator.status import read_status, render
    from orchestrator.store import CampaignStore
    from workers.synthetic import make_units

    with CampaignStore(tmp_path / "campaign.db") as store:
        store.put_config({}, "k")
        store.add_units(make_units(1, 2, "cfg00000"), "k")
    console = Console(width=250, record=True)
    console.print(render(read_status(tmp_path)))
    assert "stopped by" not in console.export_text()
