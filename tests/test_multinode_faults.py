"""Faults on a 3-node SLURM cluster (tests/multinode_fixtures.py) that leave processes of the
driver's past running, or take training workers away:

- a network partition: one node's link goes down while a pack trains there, for longer than Ray
  takes to declare the node dead, then comes back. The cut-off processes go on writing to the
  shared file system; the campaign ends with one shard per unit and with checkpoints and store
  rows of the attempts the driver trusts, the stale attempts' writes refused (workers.fencing);
- a node of the imitation job's DDP workers crashes mid-training: Ray Train restarts the worker
  group on the nodes left from the last checkpoint, and only the finished policy is published.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import psutil
import pytest

from orchestrator.store import SUCCEEDED, CampaignStore
from test_multinode import (FAST_HEALTH_CHECKS, SLOW_SYNTHETIC, assert_one_shard_per_unit, start_driver, stop, units,
                            wait_for)
from workers import fencing
from workers.synthetic import read_checkpoint_step, read_attempts

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 20  # one step a second, a checkpoint every step: the cut-off pack goes on writing


def test_a_partitioned_nodes_stale_writes_are_refused_and_the_trusted_attempts_kept(multinode_cluster, tmp_path):
    cluster, name = multinode_cluster, "partition"
    camp_dir, log = tmp_path / name, tmp_path / f"{name}.out"
    overrides = [*SLOW_SYNTHETIC, f"campaign.synthetic.sleep_s={STEPS}", f"campaign.synthetic.steps={STEPS}",
                 "campaign.synthetic.checkpoint_every=1", "campaign.pack_size=2", "campaign.cpus_per_unit=0.5",
                 "slurm.pools.cpu.max_jobs=3", "campaign.max_attempts=1"]
    driver = start_driver(cluster, tmp_path, name, "synthetic", 4, overrides, env=FAST_HEALTH_CHECKS)
    cut = None
    try:
        def pack_under_way():
            for r in units(camp_dir).values():
                if r.state == "running" and r.pack_id and r.hostname in cluster.nodes:
                    if 2 <= read_checkpoint_step(camp_dir / "units" / r.unit_id) <= STEPS // 2:
                        return r
            return None

        victim = wait_for(pack_under_way, driver, log)
        cut = victim.hostname
        pack = {u for u, r in units(camp_dir).items() if r.pack_id == victim.pack_id and r.state == "running"}
        stale_tokens = {u: units(camp_dir)[u].attempt_token for u in pack}
        cluster.script("link", cut.removeprefix("node"), "down")

        # The driver declares the node lost and launches newer attempts elsewhere, while the cut-off
        # pack goes on and tries to checkpoint: refused.
        def refused_while_cut_off():
            rows = units(camp_dir)
            moved = all(rows[u].attempt_token > stale_tokens[u] for u in pack)
            refused = [u for u in pack if (camp_dir / "units" / u / fencing.REFUSALS_LOG).exists()]
            return refused[0] if moved and refused else None

        refused = wait_for(refused_while_cut_off, driver, log, timeout=180)
        cluster.script("link", cut.removeprefix("node"), "up")
        cut = None
        driver.wait(timeout=300)
    finally:
        if cut is not None:
            cluster.script("link", cut.removeprefix("node"), "up", check=False)
        stop(driver, cluster, camp_dir)
        cluster.heal()
    assert driver.returncode == 0, log.read_text()[-8000:]

    rows = units(camp_dir)
    assert all(r.state == SUCCEEDED for r in rows.values()), {u: (r.state, r.error) for u, r in rows.items()}
    assert_one_shard_per_unit(camp_dir, rows)
    for unit_id in pack:
        unit_dir, row = camp_dir / "units" / unit_id, rows[unit_id]
        # The store holds the trusted attempt's row: its token, the host it ran on, not the cut-off node.
        assert row.attempt_token == fencing.read_token(unit_dir) > stale_tokens[unit_id]
        assert row.hostname != victim.hostname and row.attempts == 1, row
        assert read_checkpoint_step(unit_dir) == STEPS  # the trusted attempt's final checkpoint
        assert len(read_attempts(unit_dir)) >= 2
    refusals = (camp_dir / "units" / refused / fencing.REFUSALS_LOG).read_text()
    assert f"unit {refused}: checkpoint" in refusals and f"(token {stale_tokens[refused]}," in refusals
    assert f"on {victim.hostname})" in refusals and "is stale; the driver now trusts attempt token" in refusals
    print("refused:", refusals.splitlines()[0], json.dumps({u: rows[u].hostname for u in pack}))


def test_a_node_of_the_imitation_job_lost_mid_training_restarts_it_from_its_checkpoint(multinode_cluster, tmp_path):
    from il_fixtures import TINY_IL

    from workers.imitation.policies import load_policy

    cluster, name = multinode_cluster, "il-node-lost"
    camp_dir, log = tmp_path / name, tmp_path / f"{name}.out"
    steps = 1500
    overrides = [*SLOW_SYNTHETIC, "campaign.synthetic.sleep_s=1", "campaign.synthetic.steps=1",
                 "slurm.pools.cpu.max_jobs=3", "gate.min_shards=3", "gate.launch=after_campaign", "il.num_workers=2",
                 *TINY_IL, f"il.steps={steps}", "il.checkpoint_interval=50", "il.log_interval=50", "il.max_failures=2"]
    driver = start_driver(cluster, tmp_path, name, "synthetic", 3, overrides)
    killed = None
    try:
        def il_worker_node_after_a_checkpoint():
            # A checkpoint Ray Train's controller has registered (one only written may be lost with the node).
            snapshot = camp_dir / "il" / "flow" / "launch-1" / "ray_train" / "checkpoint_manager_snapshot.json"
            try:
                if not json.loads(snapshot.read_text())["checkpoint_results"]:
                    return None
            except (OSError, ValueError, KeyError):
                return None
            for node, (_, netns) in cluster.nodes.items():
                pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
                for pid in pids:
                    try:
                        if "RayTrainWorker" in " ".join(psutil.Process(int(pid)).cmdline()):
                            return node
                    except psutil.Error:
                        continue
            return None

        killed = wait_for(il_worker_node_after_a_checkpoint, driver, log, timeout=400)
        cluster.kill_node(killed)
        print(f"imitation: killed {killed}")
        driver.wait(timeout=400)
    finally:
        stop(driver, cluster, camp_dir)
        cluster.heal()
    assert driver.returncode == 0, log.read_text()[-8000:]
    with CampaignStore(camp_dir / "campaign.db", readonly=True) as store:
        [launch] = store.get_meta("il_launches")
    assert launch["state"] == "succeeded", launch
    assert launch["steps"] == steps and 0 < launch["start_step"] < steps, launch  # restarted from a checkpoint
    assert killed not in launch["worker_hosts"], launch  # the group that finished ran on the nodes left
    policy, meta = load_policy(Path(launch["policy_path"]))
    assert meta["step"] == steps
    print(f"imitation: node {killed} lost; restarted from step {launch['start_step']} on {launch['worker_hosts']}")
