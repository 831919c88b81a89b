"""The F1 gate: first launch at min_shards passing shards, relaunch every N more, catalog reading."""

from __future__ import annotations

import pytest

import configs
from il_fixtures import TINY_IL
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
    # One judgement for a unit (SUCCEEDED or GATED) and for its shards: at the threshold passes.
    assert [g.passes(f1) for f1 in (0.9, 0.75, 0.7499, float("nan"))] == [True, True, False, False]
    assert decision.shards == [s for s in lake.shards(split="train") if g.passes(s.specialist_f1)]
    assert decision.song_hashes == sorted(s.song_hash for s in decision.shards)
    assert not gate(min_shards=3, f1_threshold=0.75).check(lake).launch
    assert not g.check(lake, last_launch_count=2).launch


def test_gate_reads_its_section_of_the_config():
    g = Gate(configs.load().gate)
    assert g.f1_threshold == pytest.approx(0.75) and g.min_shards == 100


def test_launch_that_the_slurm_pools_can_never_hold_fails_with_the_reason(tmp_path):
    """On SLURM the cluster grows with the pools, so the check is against what they can hold."""
    from orchestrator.gate import GateDecision, ImitationLauncher
    from orchestrator.store import CampaignStore

    cfg = configs.load("slurm", overrides=["slurm.pools.cpu.max_jobs=2", "il.num_workers=3"])
    with CampaignStore(tmp_path / "campaign.db") as store:
        launcher = ImitationLauncher(cfg, store, tmp_path, tmp_path / "lake", None, None)
        launcher._launch(GateDecision(launch=True, passing=1))
        [job] = launcher.launches()
    assert launcher.ref is None and job["state"] == "failed"
    assert "il.num_workers = 3 needs 3 jobs of slurm.pools.cpu" in job["error"] and "max_jobs is 2" in job["error"]


# ---- the gate in the campaign driver: real Ray, Ray Train, MLflow; the synthetic workload ------

CAMPAIGN = [
    "campaign.workload=synthetic",
    "campaign.synthetic.sleep_s=0.1",
    "campaign.synthetic.steps=2",
    "campaign.synthetic.episodes=2",
    "campaign.synthetic.steps_per_episode=12",
    "campaign.synthetic.f1_mean=0.9",  # every unit's F1 is 0.8..1.0: all pass a 0.75 gate
    "gate.f1_threshold=0.75",
    "mlflow.system_metrics=false",
    "mlflow.flush_interval_s=0.5",
]


def _campaign(tmp_path, name, n_units, overrides):
    from orchestrator import campaign
    from workers.synthetic import make_units

    cfg = configs.load(overrides=CAMPAIGN + TINY_IL + overrides)
    units = make_units(n_units, 1, cfg.hash("env", "droq", "specialist"))
    return campaign.submit(units, cfg, name, root=tmp_path)


def _store_meta(summary):
    from orchestrator.store import CampaignStore

    with CampaignStore(summary.dir / "campaign.db", readonly=True) as store:
        return store.get_meta("il_launches") or [], store.get_meta("gate"), [e.kind for e in store.events()]


@pytest.mark.slow
def test_campaign_launches_imitation_when_the_gate_opens(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from workers.imitation.policies import load_policy

    summary = _campaign(tmp_path, "gated", 3, ["gate.min_shards=2", "il.num_workers=2"])
    launches, gate_seen, events = _store_meta(summary)
    assert summary.counts["succeeded"] == 3
    assert len(launches) == 1, launches  # relaunch_every=0: one job
    job = launches[0]
    assert job["state"] == "succeeded" and job["error"] is None, job
    assert job["passing"] >= 2 and job["steps"] == 6 and job["policy"] == "flow"
    assert job["out_dir"] == str(summary.dir / "il" / "flow" / "launch-1")
    assert summary.imitation == job
    policy, meta = load_policy(job["policy_path"])
    assert policy.kind == "flow" and meta["step"] == 6
    assert gate_seen["passing"] == 3 and gate_seen["needed"] == 2  # the last check saw every shard
    assert "il_launch" in events and "il_succeeded" in events
    assert events.index("il_succeeded") < events.index("driver_stop")  # the driver waited for the job

    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(job["mlflow_run_id"])
    assert run.info.experiment_id == summary.experiment_id and run.data.tags["pianoforge.kind"] == "imitation"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4, 6]

    from orchestrator.status import read_status, render
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render(read_status(summary.dir)))
    text = console.export_text()
    assert "gate: 3/2 train shards with F1 >= 0.75" in text and "launch 1 succeeded" in text


def test_launch_never_trains_nothing(ray_cluster, tmp_path):
    summary = _campaign(tmp_path, "never", 2, ["gate.min_shards=1", "gate.launch=never"])
    launches, gate_seen, events = _store_meta(summary)
    assert summary.counts["succeeded"] == 2 and launches == [] and summary.imitation is None
    assert gate_seen is None and "il_launch" not in events
    assert not (summary.dir / "il").exists()


def test_gate_stays_shut_below_min_shards(ray_cluster, tmp_path):
    summary = _campaign(tmp_path, "shut", 2, ["gate.min_shards=3"])
    launches, gate_seen, events = _store_meta(summary)
    assert launches == [] and "il_launch" not in events
    assert gate_seen == {**gate_seen, "passing": 2, "needed": 3, "launch": "when_passing"}


@pytest.mark.slow
def test_failed_job_is_recorded_and_resume_restarts_it(ray_cluster, tmp_path):
    from orchestrator import campaign

    # 3 DDP workers cannot fit a 2-CPU cluster: the job fails with that reason, the campaign ends.
    summary = _campaign(tmp_path, "retry", 2, ["gate.min_shards=2", "gate.launch=after_campaign", "il.num_workers=3"])
    launches, _, events = _store_meta(summary)
    assert summary.counts["succeeded"] == 2
    assert [j["state"] for j in launches] == ["failed"] and "il.num_workers = 3" in launches[0]["error"]
    assert "il_failed" in events

    summary = campaign.resume("retry", root=tmp_path, overrides=["il.num_workers=1"])
    launches, _, events = _store_meta(summary)
    assert len(launches) == 1 and launches[0]["state"] == "succeeded" and launches[0]["restarts"] == 1
    assert launches[0]["error"] is None and "il_restart" in events
    assert (tmp_path / "retry" / "il" / "flow" / "launch-1" / "policy.pt").exists()
