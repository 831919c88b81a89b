"""Campaigns on a 3-node SLURM cluster (network namespaces with their own addresses and
hostnames, tests/multinode_fixtures.py): the head on the host's side of the bridge, units and
imitation workers in pool jobs on the nodes, Ray traffic across the network stack.

- real units spread over the nodes; the store, ``status`` and the dashboard say where each ran;
  the gate's imitation job trains with DDP workers (gloo) on two nodes;
- a node that crashes mid-unit (every process of its namespace killed) costs its units no
  attempt: they resume elsewhere from their checkpoints, the lost pool job is replaced;
- a driver host restart (driver and Ray head killed): ``pianoforge resume`` cancels the old pool
  jobs and finishes without rerunning finished units.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import configs
from orchestrator.store import SUCCEEDED, CampaignStore
from workers.lake import Lake
from workers.synthetic import read_checkpoint_step
from workers.units import read_attempts

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

DRIVER = """
import sys
import configs
from orchestrator import campaign
from workers.synthetic import make_units

root, name, kind, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = configs.load("slurm", overrides=sys.argv[5:])
if kind == "real":
    from orchestrator.manifest import demo_manifest, load_manifest

    units = [u for u in load_manifest(demo_manifest(root + "/manifest"), cfg).units() if u.split == "train"][:n]
else:
    units = make_units(1, n, cfg.hash("env", "droq", "specialist"))
summary = campaign.submit(units, cfg, name, root=root, num_cpus=0)
print("COUNTS", summary.counts)
"""

POOLS = ["slurm.poll_interval_s=1", "slurm.pools.cpu.cpus_per_job=1", "slurm.pools.cpu.mem_gb=2",
         "slurm.pools.cpu.time_min=15", "mlflow.system_metrics=false", "mlflow.flush_interval_s=0.5"]
# Synthetic units of ~8 s, one step a second, a checkpoint every other step: a kill mid-unit
# loses at most one step past the checkpoint.
SLOW_SYNTHETIC = ["campaign.workload=synthetic", "campaign.synthetic.sleep_s=8", "campaign.synthetic.steps=8",
                  "campaign.synthetic.checkpoint_every=2", "campaign.synthetic.episodes=1",
                  "campaign.synthetic.steps_per_episode=4", "gate.f1_threshold=0.0", "gate.launch=never"]


# Ray declares a silent node dead after about 5 s (default: 30 s), well before the campaign ends.
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                      "RAY_health_check_failure_threshold": "5"}


def start_driver(cluster, tmp_path: Path, name: str, kind: str, n: int, overrides: list[str],
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    """The campaign driver (and its Ray head) as its own process group, output to driver.out;
    ``env``: added to the cluster's environment."""
    with open(tmp_path / f"{name}.out", "w") as out:
        return subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), name, kind, str(n),
                                 *POOLS, *cluster.overrides, *overrides],
                                env={**cluster.env, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen, cluster, camp_dir: Path) -> None:
    """After a failed assertion: stop the driver (it cancels its jobs), then any job left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
    if leftover := submitted_jobs(camp_dir) & cluster.squeue():
        subprocess.run(["scancel", *leftover], env=cluster.env, check=False)


def submitted_jobs(camp_dir: Path) -> set[str]:
    folder = camp_dir / "logs" / "slurm" / "cpu"
    return {p.name for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()


def units(camp_dir: Path) -> dict:
    try:
        with CampaignStore(camp_dir / "campaign.db", readonly=True) as store:
            return {r.unit_id: r for r in store.units()}
    except Exception:  # the driver is still creating the store
        return {}


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (found := predicate()) is not None:
            return found
        time.sleep(0.2)
    raise AssertionError("the campaign never got there:\n" + log.read_text()[-6000:])


def assert_one_shard_per_unit(camp_dir: Path, unit_ids, results: bool = False) -> None:
    """One committed shard per unit, no other shard file; with ``results``, every unit's result.json
    (real units write one; synthetic ones only their shard)."""
    shards = Lake(camp_dir / "lake", configs.load().lake).shards()
    assert sorted(s.unit_id for s in shards) == sorted(unit_ids)
    data_files = sorted(str(f.resolve()) for f in (camp_dir / "lake").rglob("*.parquet"))
    assert data_files == sorted(str(Path(s.path).resolve()) for s in shards)  # no stray or duplicate shard files
    assert not results or all((camp_dir / "units" / u / "result.json").exists() for u in unit_ids)


def test_real_units_spread_over_nodes_and_imitation_trains_across_two(multinode_cluster, tmp_path):
    from il_fixtures import TINY_IL

    cluster, name = multinode_cluster, "spread"
    camp_dir = tmp_path / name
    overrides = [
        "campaign.workload=specialist", "env.chunk_steps=40", "specialist.total_steps=20", "droq.warmup_steps=10",
        "droq.batch_size=16", "droq.replay_capacity=1000", "specialist.eval_interval=20",
        "specialist.checkpoint_interval=10", "specialist.log_interval=10", "specialist.rollouts=1",
        "slurm.pools.cpu.max_jobs=3", "gate.f1_threshold=0.0", "gate.min_shards=3", "gate.launch=after_campaign",
        "il.num_workers=2", *TINY_IL,
    ]
    driver = start_driver(cluster, tmp_path, name, "real", 3, overrides)
    try:
        driver.wait(timeout=600)
    finally:
        stop(driver, cluster, camp_dir)
    assert driver.returncode == 0, (tmp_path / f"{name}.out").read_text()[-8000:]

    rows = units(camp_dir)
    assert len(rows) == 3 and all(r.state in (SUCCEEDED, "gated") for r in rows.values())
    # Each unit ran on a node (never on the head), in a pool job and a Ray node of that node only.
    placed: dict[str, tuple[set, set]] = {}
    for r in rows.values():
        assert r.hostname in cluster.nodes and r.slurm_job_id and r.node_id, r
        jobs, ray_nodes = placed.setdefault(r.hostname, (set(), set()))
        jobs.add(r.slurm_job_id)
        ray_nodes.add(r.node_id)
    assert len(placed) >= 2, placed
    hosts = list(placed)
    for i, a in enumerate(hosts):
        for b in hosts[i + 1:]:
            assert not placed[a][0] & placed[b][0] and not placed[a][1] & placed[b][1], placed
    assert_one_shard_per_unit(camp_dir, rows, results=True)

    # status and the dashboard say where the units ran
    status = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", name, "--root", str(tmp_path), "--json"],
                            env=cluster.env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    by_host = {h["host"]: h for h in json.loads(status.stdout)["hosts"]}
    assert {h: by_host[h]["finished"] for h in by_host} == {h: sum(r.hostname == h for r in rows.values()) for h in placed}
    from dashboards.data import Campaign, summary

    dash_cfg = configs.load().dashboard
    dash = summary(Campaign(camp_dir, dash_cfg).snapshot(), dash_cfg)
    assert {h["host"]: h["finished"] for h in dash["hosts"]} == {h["host"]: h["finished"] for h in by_host.values()}

    # The imitation job's two DDP workers ran on two different nodes and finished as on one node.
    with CampaignStore(camp_dir / "campaign.db", readonly=True) as store:
        launches = store.get_meta("il_launches")
    assert len(launches) == 1 and launches[0]["state"] == "succeeded", launches
    launch = launches[0]
    assert launch["steps"] == 6 and launch["n_shards"] == 3 and launch["loss"] is not None
    workers = launch["worker_hosts"]
    assert len(workers) == 2 and len(set(workers)) == 2 and set(workers) <= set(cluster.nodes), workers
    assert Path(launch["policy_path"]).exists()
    assert not submitted_jobs(camp_dir) & cluster.squeue()  # no pool job outlives the driver


def test_a_crashed_node_costs_no_attempt_and_its_units_resume_elsewhere(multinode_cluster, tmp_path):
    cluster, name = multinode_cluster, "crash"
    camp_dir, log = tmp_path / name, tmp_path / f"{name}.out"
    # One attempt per unit: the crash must not use it up. Four units on three 1-CPU nodes: one
    # waits, so the pool needs its third job back after the crash.
    driver = start_driver(cluster, tmp_path, name, "synthetic", 4,
                          [*SLOW_SYNTHETIC, "campaign.max_attempts=1", "slurm.pools.cpu.max_jobs=3"])
    try:
        def running_with_checkpoint():
            for r in units(camp_dir).values():
                if r.state == "running" and r.hostname in cluster.nodes:
                    step = read_checkpoint_step(camp_dir / "units" / r.unit_id)
                    if 2 <= step <= 5:
                        return r, step
            return None

        victim, step_at_kill = wait_for(running_with_checkpoint, driver, log)
        doomed = {u for u, r in units(camp_dir).items() if r.hostname == victim.hostname and r.state == "running"}
        killed_at = time.time()
        cluster.kill_node(victim.hostname)
        driver.wait(timeout=300)
    finally:
        stop(driver, cluster, camp_dir)
        cluster.heal()  # the next test gets three nodes again
    assert driver.returncode == 0, log.read_text()[-8000:]

    rows = units(camp_dir)
    assert all(r.state == SUCCEEDED for r in rows.values()), {u: (r.state, r.error) for u, r in rows.items()}
    for unit_id in doomed:
        row = rows[unit_id]
        assert row.attempts == 1 and row.hostname != victim.hostname, row  # not counted; retried elsewhere
        assert row.steps_lost is not None and 0 <= row.steps_lost <= 2, row  # at most the steps since a checkpoint
        attempts = read_attempts(camp_dir / "units" / unit_id)
        assert len(attempts) == 2 and attempts[-1]["start_step"] >= 2  # from its own last checkpoint
        with CampaignStore(camp_dir / "campaign.db", readonly=True) as store:
            lost_at = next(e.ts for e in store.events(unit_id=unit_id) if "node lost" in (e.detail or ""))
        print(f"node lost: {unit_id} requeued {lost_at - killed_at:.1f} s after the kill, running again after "
              f"{attempts[-1]['time'] - killed_at:.1f} s, {row.steps_lost} steps lost")
    assert rows[victim.unit_id].steps_lost is not None and read_attempts(
        camp_dir / "units" / victim.unit_id)[-1]["start_step"] >= step_at_kill
    assert_one_shard_per_unit(camp_dir, rows)
    # The pool manager replaced the crashed node's job.
    events = (camp_dir / "logs" / "slurm" / "pools.log").read_text().splitlines()
    lost_at = next(i for i, line in enumerate(events) if f"job {victim.slurm_job_id}" in line and
                   ("Ray lost the node" in line or "ended" in line))
    assert any("submitted job" in line for line in events[lost_at + 1:]), "\n".join(events)
    assert not submitted_jobs(camp_dir) & cluster.squeue()


def test_resume_after_the_driver_host_died_cancels_its_pool_jobs_and_reruns_no_finished_unit(
        multinode_cluster, tmp_path):
    cluster, name = multinode_cluster, "restart"
    camp_dir, log = tmp_path / name, tmp_path / f"{name}.out"
    # Four units on two pool jobs: two finish, then two run when the driver host dies.
    driver = start_driver(cluster, tmp_path, name, "synthetic", 4, [*SLOW_SYNTHETIC, "slurm.pools.cpu.max_jobs=2"])
    try:
        def some_done_others_running():
            rows = units(camp_dir)
            done = {u for u, r in rows.items() if r.state == SUCCEEDED}
            running = [u for u, r in rows.items() if r.state == "running" and r.hostname in cluster.nodes
                       and read_checkpoint_step(camp_dir / "units" / u) >= 2]
            return done if done and running else None

        done = wait_for(some_done_others_running, driver, log)
        old_jobs = submitted_jobs(camp_dir) & cluster.squeue()
        assert old_jobs
        before = {u: (r.finished_at, len(read_attempts(camp_dir / "units" / u))) for u, r in units(camp_dir).items()
                  if u in done}
        # The host goes down: the driver and its Ray head (all its processes) die at once.
        head = psutil.Process(driver.pid)
        for p in [head, *head.children(recursive=True)]:
            p.kill()
        driver.wait(timeout=30)
    except BaseException:
        stop(driver, cluster, camp_dir)
        raise
    resumed = subprocess.run([sys.executable, "-m", "orchestrator.cli", "resume", name, "--root", str(tmp_path)],
                             env=cluster.env, capture_output=True, text=True, timeout=400)
    if resumed.returncode != 0 and (left := submitted_jobs(camp_dir) & cluster.squeue()):
        subprocess.run(["scancel", *left], env=cluster.env, check=False)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-6000:]
    with CampaignStore(camp_dir / "campaign.db", readonly=True) as store:
        [cancelled] = [e.detail for e in store.events() if e.kind == "pool_jobs_cancelled"]
    cancelled_ids = set(cancelled.split(": ", 1)[1].split(", "))
    assert cancelled_ids and cancelled_ids <= old_jobs, (cancelled, old_jobs)  # the old driver's jobs, cancelled
    assert not old_jobs & cluster.squeue()  # no orphaned SLURM job
    rows = units(camp_dir)
    assert all(r.state == SUCCEEDED for r in rows.values()), {u: r.state for u, r in rows.items()}
    after = {u: (rows[u].finished_at, len(read_attempts(camp_dir / "units" / u))) for u in done}
    assert after == before  # finished units were not run again
    assert_one_shard_per_unit(camp_dir, rows)
    assert not submitted_jobs(camp_dir) & cluster.squeue()
