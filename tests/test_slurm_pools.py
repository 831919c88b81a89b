"""Pool jobs on a real single-node SLURM (slurm/cluster.sh) joining a real Ray head.

The Ray driver runs in a subprocess so this test process never holds global Ray state (or
auth settings) that other test modules would inherit.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.util import get_node_ip_address

import configs
from slurm import pools, raynode

RAY = str(Path(sys.executable).with_name("ray"))

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head with token auth and no CPUs (so tasks must run on pool nodes)."""
    tmp = tmp_path_factory.mktemp("head")
    token_file = tmp / "auth_token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, secrets.token_hex(32).encode())
    os.close(fd)
    port = raynode._free_ports(1)[0]
    temp_dir = f"/tmp/pf-h{secrets.token_hex(3)}"
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    env.pop("RAY_AUTH_TOKEN", None)
    head = subprocess.Popen(
        raynode.head_start_command(port, temp_dir, raynode.pick_ports(str(port)), ray=RAY),
        env=env, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"{get_node_ip_address()}:{port}"
    yield {"address": address, "token_file": str(token_file), "env": env}
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, 9)
    shutil.rmtree(temp_dir, ignore_errors=True)


def pool_cfg(**pool):
    """One 1-CPU pool named ``cpu`` on the test cluster's partition, whatever the profile holds."""
    defaults = dict(partition="debug", cpus_per_job=1, gpus_per_job=0, mem_gb=1, time_min=10, min_jobs=0, max_jobs=1)
    base = configs.load("slurm").slurm.model_dump()
    return configs.SlurmConfig(**{**base, "poll_interval_s": 0.5, "quick_end_s": 60, "max_backoff_s": 2,
                                  "pools": {"cpu": {**defaults, **pool}}})


@pytest.fixture
def manager_factory(slurm_cluster, ray_head, tmp_path):
    made = []

    def make(**pool):
        m = pools.PoolManager(pool_cfg(**pool), ray_head["address"], tmp_path / f"pool{len(made)}",
                              auth_token_file=ray_head["token_file"], idle_jobs=lambda: None)
        made.append(m)
        return m

    yield make
    for m in made:
        m.shutdown()


DRIVER = """
import json, os, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)

@ray.remote(num_cpus=1, resources={sys.argv[2]: 1})
def where():
    ctx = ray.get_runtime_context()
    return {"job": os.environ.get("SLURM_JOB_ID"), "labels": ctx.get_node_labels()}

print("RESULT " + json.dumps(ray.get(where.remote(), timeout=float(sys.argv[3]))))
"""


def run_task_on_pool(head, pool: str, timeout: float = 150) -> dict:
    """Run one Ray task that needs the pool's resource; returns where it ran."""
    out = subprocess.run([sys.executable, "-c", DRIVER, head["address"], raynode.pool_resource(pool), str(timeout)],
                         env=head["env"], capture_output=True, text=True, timeout=timeout + 60)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, f"driver failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def reconcile_until(manager, waiting, running, done, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        manager.reconcile(waiting, running)
        if done(manager.jobs()):
            return manager.jobs()
        time.sleep(0.5)
    raise AssertionError(f"pool jobs never reached the expected state: {manager.jobs()}")


def squeue_ids(manager) -> set[str]:
    return set(pools.squeue([manager.job_name(p) for p in manager.cfg.pools]))


def running_job(manager, waiting=1):
    jobs = reconcile_until(manager, {"cpu": waiting}, {}, lambda js: any(j.state == "RUNNING" for j in js))
    return next(j for j in jobs if j.state == "RUNNING")


def test_pool_job_joins_head_and_runs_task_inside_slurm_job(manager_factory, ray_head):
    manager = manager_factory()
    job = running_job(manager)
    where = run_task_on_pool(ray_head, "cpu")
    assert where["job"] == job.job_id  # SLURM_JOB_ID reaches Ray workers through the node's env
    assert where["labels"][raynode.JOB_LABEL] == job.job_id
    assert where["labels"][raynode.POOL_LABEL] == "cpu"
    assert job.job_id in squeue_ids(manager)


def test_cancelled_pool_job_is_replaced_while_work_remains(manager_factory, ray_head):
    manager = manager_factory()
    first = running_job(manager)
    subprocess.run(["scancel", first.job_id], check=True)
    jobs = reconcile_until(manager, {"cpu": 1}, {}, lambda js: any(j.job_id != first.job_id for j in js))
    assert first.job_id not in {j.job_id for j in jobs}
    replacement = running_job(manager)
    assert replacement.job_id != first.job_id
    assert run_task_on_pool(ray_head, "cpu")["job"] == replacement.job_id


def test_drained_queue_scales_to_minimum_and_shutdown_leaves_no_job(manager_factory):
    manager = manager_factory(min_jobs=1, max_jobs=2)
    assert manager.reconcile({}, {}) == {"cpu": 1}  # the minimum even without work
    reconcile_until(manager, {"cpu": 2}, {}, lambda js: len(js) == 2)
    jobs = reconcile_until(manager, {}, {}, lambda js: len(js) == 1)
    assert squeue_ids(manager) >= {jobs[0].job_id}
    manager.shutdown()
    assert squeue_ids(manager) == set()
    assert manager.jobs() == []
