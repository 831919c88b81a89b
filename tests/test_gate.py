"""The F1 gate: first launch at min_shards passing shards, relaunch every N more, catalog reading."""

from __future__ import annotations

import pytest

import configs
from orchestrator.gate import Gate


def gate(**over):
    return Gate(configs.load(overrides={f"gate.{k}": v for k, v in over.items()}).gate)


def test_first_launch_waits_for_min_shards():
    g = gate(min_shards=3, relaunch_every=0)
    assert [g.decide(n) for n in range(5)] == [False, False, False, True, True]
    assert g.decide(3, last_launch_count=0)  # 0 means never launched


def test_relaunch_every_n_more_passing_shards():
    g = gate(min_shards=3, relaunch_every=2)
    assert not g.decide(3, last_launch_count=3)
    assert not g.decide(4, last_launch_count=3)
    assert g.decide(5, last_launch_count=3)
    assert g.decide(9, last_launch_count=3)


def test_relaunch_zero_launches_once():
    g = gate(min_shards=1, relaunch_every=0)
    assert g.decide(1) and not g.decide(1000, last_launch_count=1)


def test_check_counts_only_train_shards_at_or_above_threshold(tmp_path):
    from il_fixtures import write_lake

    lake = write_lake(tmp_path / "lake", [0.9, 0.75, 0.74, 0.2], episodes=1, steps=4)
    write_lake(tmp_path / "lake", [0.99, 0.99], episodes=1, steps=4, split="held-out", song_prefix="held")
    g = gate(min_shards=2, relaunch_every=0, f1_threshold=0.75)
    decision = g.check(lake)
    assert decision.passing == 2 and decision.launch
    assert sorted(s.specialist_f1 for s in decision.shards) == [0.75, 0.9]
    assert decision.song_hashes == sorted(s.song_hash for s in decision.shards)
    assert not gate(min_shards=3, f1_threshold=0.75).check(lake).launch
    assert not g.check(lake, last_launch_count=2).launch


def test_gate_reads_its_section_of_the_config():
    g = Gate(configs.load().gate)
    assert g.f1_threshold == pytest.approx(0.75) and g.min_shards == 100
