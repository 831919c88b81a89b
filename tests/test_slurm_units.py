"""Pool sizing and the ``ray start`` line a pool job builds, without a cluster.

SLURM itself is replaced here only where the test is about the manager's own decisions
(how many jobs, which to cancel); tests/test_slurm_pools.py runs the real thing.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

import configs
from slurm import pools, raynode


def slurm_cfg(**pool):
    """One CPU pool named ``cpu``, whatever the profile holds."""
    defaults = dict(partition="debug", cpus_per_job=1, gpus_per_job=0, mem_gb=1, time_min=10, min_jobs=0, max_jobs=3)
    base = configs.load("slurm").slurm.model_dump()
    return configs.SlurmConfig(**{**base, "poll_interval_s": 1.0, "quick_end_s": 60, "max_backoff_s": 8,
                                  "pools": {"cpu": {**defaults, **pool}}})


SPEC = raynode.RayNodeSpec(pool="gpu", head_address="10.0.0.1:6379", ray_tmp_root="/tmp", auth_token_file="/h/tok", mem_gb=10)
PORTS = raynode.NodePorts(1, 2, 3, 4, 5, 6, min_worker=20000, max_worker=20511)


def flag(cmd, name):
    values = [x.split("=", 1)[1] for x in cmd if x.startswith(f"--{name}=")]
    assert len(values) == 1, (name, cmd)
    return values[0]


def test_ray_start_uses_the_allocation_not_the_machine():
    env = {"SLURM_JOB_ID": "77", "SLURM_CPUS_PER_TASK": "6", "SLURM_CPUS_ON_NODE": "8",
           "SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_GPUS": "4,5", "CUDA_VISIBLE_DEVICES": "0,1"}
    cmd = raynode.ray_start_command(SPEC, env, PORTS)
    assert flag(cmd, "address") == "10.0.0.1:6379"
    assert flag(cmd, "num-cpus") == "6"
    assert flag(cmd, "num-gpus") == "2"
    assert json.loads(flag(cmd, "resources")) == {"pool:gpu": raynode.POOL_RESOURCE_AMOUNT}
    assert flag(cmd, "labels") == "slurm-job-id=77,pianoforge-pool=gpu"
    assert flag(cmd, "temp-dir") == "/tmp/pf-77"
    assert flag(cmd, "min-worker-port") == "20000" and flag(cmd, "max-worker-port") == "20511"
    assert int(flag(cmd, "memory")) + int(flag(cmd, "object-store-memory")) == 10_000_000_000
    # SLURM's (possibly renumbered) device list is kept for Ray to hand out.
    node_env = raynode.ray_node_env(SPEC, env)
    assert node_env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert node_env["RAY_AUTH_MODE"] == "token" and node_env["RAY_AUTH_TOKEN_PATH"] == "/h/tok"


def test_pool_node_announces_the_address_it_reaches_the_head_from():
    env = {"SLURM_JOB_ID": "9", "SLURM_CPUS_ON_NODE": "1"}
    assert flag(raynode.ray_start_command(SPEC, env, PORTS, node_ip="10.0.0.12"), "node-ip-address") == "10.0.0.12"
    assert not any(x.startswith("--node-ip-address") for x in raynode.ray_start_command(SPEC, env, PORTS))
    assert raynode.address_towards("127.0.0.1:6379") == "127.0.0.1"


def test_gloo_binds_to_the_interface_of_the_node_address_unless_told_otherwise():
    env = {"SLURM_JOB_ID": "9", "SLURM_CPUS_ON_NODE": "1"}
    assert raynode.ray_node_env(SPEC, env, "127.0.0.1")["GLOO_SOCKET_IFNAME"] == "lo"
    assert raynode.ray_node_env(SPEC, {**env, "GLOO_SOCKET_IFNAME": "ib0"}, "127.0.0.1")["GLOO_SOCKET_IFNAME"] == "ib0"
    assert "GLOO_SOCKET_IFNAME" not in raynode.ray_node_env(SPEC, env)


def test_a_node_says_whether_it_sees_the_drivers_file(tmp_path):
    from orchestrator.scheduler import sees_file

    (tmp_path / "probe").write_text("token-1")
    assert sees_file(str(tmp_path / "probe"), "token-1")[1]
    assert not sees_file(str(tmp_path / "probe"), "token-2")[1]  # another campaign's file at that path
    assert not sees_file(str(tmp_path / "absent"), "token-1")[1]  # not mounted there


def test_cpu_job_hides_gpus_exported_from_the_submitting_shell():
    env = {"SLURM_JOB_ID": "8", "SLURM_CPUS_ON_NODE": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3", "RAY_AUTH_TOKEN": "x"}
    assert flag(raynode.ray_start_command(SPEC, env, PORTS), "num-gpus") == "0"
    node_env = raynode.ray_node_env(SPEC, env)
    assert node_env["CUDA_VISIBLE_DEVICES"] == ""
    assert "RAY_AUTH_TOKEN" not in node_env


def test_gpus_without_cuda_visible_devices_come_from_slurm_job_gpus():
    assert raynode.allocated_gpus({"SLURM_JOB_GPUS": "2,3"}) == (2, "2,3")


def test_missing_cpu_allocation_is_a_clear_error():
    with pytest.raises(RuntimeError, match="SLURM_CPUS"):
        raynode.allocated_cpus({})


def test_long_ray_tmp_root_is_rejected_before_any_job_starts():
    raynode.check_temp_root("/tmp")
    with pytest.raises(ValueError, match="107-byte"):
        raynode.check_temp_root("/scratch/" + "x" * 60)


def test_ports_differ_and_worker_block_is_free():
    ports = raynode.pick_ports("12345")
    singles = [ports.node_manager, ports.object_manager, ports.metrics_export, ports.dashboard_agent_listen,
               ports.dashboard_agent_grpc, ports.runtime_env_agent]
    assert len(set(singles)) == 6
    assert ports.max_worker - ports.min_worker + 1 == 512
    assert not any(ports.min_worker <= p <= ports.max_worker for p in singles)


def test_auth_token_from_env_is_written_private(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-token")
    path = pools.resolve_auth_token_file(tmp_path)
    assert open(path).read() == "secret-token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert pools.resolve_auth_token_file(tmp_path) is None


def test_units_per_job_and_pool_choice_follow_the_campaign():
    cfg = configs.load("slurm", overrides={
        "slurm.pools.cpu.cpus_per_job": 4, "campaign.cpus_per_unit": 1, "campaign.gpus_per_unit": 0.0,
        "slurm.pools.gpu": dict(partition="gpu", cpus_per_job=8, gpus_per_job=2, mem_gb=32, time_min=60, min_jobs=0, max_jobs=4),
    })
    assert pools.units_per_job(cfg, "cpu") == 4
    assert pools.pool_for_units(cfg.slurm, gpus_per_unit=0.0) == "cpu"
    assert pools.pool_for_units(cfg.slurm, gpus_per_unit=0.5) == "gpu"
    gpu_cfg = cfg.with_overrides({"campaign.gpus_per_unit": 0.5, "campaign.cpus_per_unit": 1})
    assert pools.units_per_job(gpu_cfg, "gpu") == 4  # 2 GPUs / 0.5, below 8 CPUs / 1
    assert pools.unit_resources("gpu") == {"pool:gpu": 1}


class FakeSlurm:
    """Stands in for sbatch/squeue/scancel to check the manager's decisions."""

    def __init__(self, monkeypatch):
        self.queue: dict[str, tuple[str, str]] = {}
        self.cancelled: list[str] = []
        self.next_id = 100
        monkeypatch.setattr(pools, "squeue", lambda names: dict(self.queue))
        monkeypatch.setattr(pools, "scancel", self.scancel)
        monkeypatch.setattr(pools, "_run", lambda cmd, timeout=30: "")

    def scancel(self, ids):
        self.cancelled += ids
        for i in ids:
            self.queue.pop(i, None)

    def executor(self):
        fake = self

        class Job:
            def __init__(self):
                fake.next_id += 1
                self.job_id = str(fake.next_id)
                fake.queue[self.job_id] = ("PENDING", "")

        class Executor:
            def submit(self, fn, spec):
                return Job()

        return Executor()


@pytest.fixture
def fake(monkeypatch, tmp_path):
    fake = FakeSlurm(monkeypatch)
    fake.log_dir = tmp_path
    fake.managers = []
    yield fake
    for m in fake.managers:  # while the fakes are in place, so no real scancel runs at exit
        m.shutdown(wait_s=0)


def manager(fake, cfg, idle=lambda: None, joined=lambda: None, **kw):
    m = pools.PoolManager(cfg, "h:1", fake.log_dir, auth_token_file=None, idle_jobs=idle, joined_jobs=joined, **kw)
    m._executors["cpu"] = fake.executor()
    fake.managers.append(m)
    return m


def test_jobs_follow_the_queue_within_min_and_max(fake):
    m = manager(fake, slurm_cfg(min_jobs=1, max_jobs=3), units_per_job={"cpu": 2})
    assert m.reconcile({}, {}) == {"cpu": 1}
    assert len(m.jobs()) == 1
    assert m.reconcile({"cpu": 3}, {"cpu": 2}) == {"cpu": 3}  # ceil(5 / 2) = 3
    assert len(m.jobs()) == 3
    assert m.reconcile({"cpu": 50}, {}) == {"cpu": 3}  # capped at max_jobs
    assert len(m.jobs()) == 3 and len(fake.queue) == 3
    m.reconcile({}, {})  # all pending: the newest two go
    assert sorted(fake.cancelled) == ["102", "103"]
    assert [j.job_id for j in m.jobs()] == ["101"]


def test_running_jobs_are_cancelled_only_when_idle(fake):
    idle: set[str] = set()
    m = manager(fake, slurm_cfg(max_jobs=2), idle=lambda: idle)
    m.reconcile({"cpu": 2}, {})
    for i in fake.queue:
        fake.queue[i] = ("RUNNING", "n1")
    m.reconcile({}, {"cpu": 1})  # target 1 of 2, but no node is known idle: keep both
    assert fake.cancelled == [] and len(m.jobs()) == 2
    idle.add("101")
    m.reconcile({}, {"cpu": 1})
    assert fake.cancelled == ["101"]


def test_without_ray_running_jobs_go_only_when_nothing_runs(fake):
    m = manager(fake, slurm_cfg(max_jobs=2))
    m.reconcile({"cpu": 2}, {})
    for i in fake.queue:
        fake.queue[i] = ("RUNNING", "n1")
    m.reconcile({}, {"cpu": 1})
    assert fake.cancelled == []
    m.reconcile({}, {})
    assert sorted(fake.cancelled) == ["101", "102"] and m.jobs() == []


def test_a_job_that_served_units_is_replaced_without_backoff(fake, monkeypatch):
    """Cancelled soon after it started, but its Ray node had joined: not a failed start."""
    clock = [1000.0]
    monkeypatch.setattr(pools.time, "monotonic", lambda: clock[0])
    joined: set[str] = set()
    m = manager(fake, slurm_cfg(max_jobs=1), joined=lambda: joined)
    m.reconcile({"cpu": 1}, {})
    joined.add("101")
    m.reconcile({}, {"cpu": 1})  # the node joined and runs the unit
    fake.queue.clear()  # scancel: the job is gone
    m.reconcile({"cpu": 1}, {})
    assert [j.job_id for j in m.jobs()] == ["102"]  # replaced in the same round


def test_a_job_whose_ray_node_died_is_cancelled_and_replaced_before_slurm_notices(fake):
    joined: set[str] = set()
    m = manager(fake, slurm_cfg(max_jobs=2), joined=lambda: joined)
    m.reconcile({"cpu": 2}, {})
    fake.queue.update({"101": ("RUNNING", "node1"), "102": ("RUNNING", "node2")})
    joined.update({"101", "102"})
    m.reconcile({}, {"cpu": 2})
    joined.discard("101")  # Ray declared node1 dead; SLURM still lists its job as running
    m.reconcile({}, {"cpu": 2})
    assert fake.cancelled == ["101"]
    assert sorted(j.job_id for j in m.jobs()) == ["102", "103"]
    assert "Ray lost the node of job 101 (cpu, node1)" in (fake.log_dir / "pools.log").read_text()


def test_a_job_the_driver_saw_die_is_replaced_before_rays_health_checks_agree(fake):
    joined = {"101", "102"}
    m = manager(fake, slurm_cfg(max_jobs=2), joined=lambda: joined)
    m.reconcile({"cpu": 2}, {})
    fake.queue.update({"101": ("RUNNING", "node1"), "102": ("RUNNING", "node2")})
    m.reconcile({}, {"cpu": 2})
    assert fake.cancelled == []
    m.node_lost("101")  # a unit died with NodeDiedError there; Ray still lists the node as alive
    m.reconcile({}, {"cpu": 2})
    assert fake.cancelled == ["101"]
    assert sorted(j.job_id for j in m.jobs()) == ["102", "103"]


def test_jobs_of_an_earlier_driver_are_cancelled_by_name_and_waited_for(fake, monkeypatch):
    calls, listed = [], []
    monkeypatch.setattr(pools, "squeue", lambda names: listed.append(names) or (
        {"7": ("RUNNING", "node2")} if "pf-old-cpu" in names else {}))
    monkeypatch.setattr(pools, "_run", lambda cmd, timeout=30: calls.append(cmd) or "")
    assert manager(fake, slurm_cfg(), earlier_tags=["pf-old"]).cancel_earlier_jobs() == ["7"]
    assert calls == [["scancel", f"--user={pools.getpass.getuser()}", "--name=pf-old-cpu"]]
    m = manager(fake, slurm_cfg(), earlier_tags=["pf-gone"])
    calls.clear()
    assert m.cancel_earlier_jobs() == [] and calls == []
    m.shutdown(wait_s=0)
    assert "pf-gone-cpu" in listed[-1]  # shutdown waits for the earlier jobs to leave the queue too


def test_ended_job_is_replaced_after_a_backoff_that_grows(fake, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(pools.time, "monotonic", lambda: clock[0])
    m = manager(fake, slurm_cfg(max_jobs=1))
    m.reconcile({"cpu": 1}, {})
    fake.queue.clear()  # the job vanished soon after submission (e.g. failed to start)
    m.reconcile({"cpu": 1}, {})
    assert m.jobs() == []  # waits poll_interval * 2 before resubmitting
    clock[0] += 2.1
    m.reconcile({"cpu": 1}, {})
    assert [j.job_id for j in m.jobs()] == ["102"]
    fake.queue.clear()
    m.reconcile({"cpu": 1}, {})
    clock[0] += 2.1
    m.reconcile({"cpu": 1}, {})
    assert m.jobs() == []  # second quick failure: 4 s
    clock[0] += 2.0
    m.reconcile({"cpu": 1}, {})
    assert [j.job_id for j in m.jobs()] == ["103"]


def test_failing_squeue_changes_nothing(fake, monkeypatch):
    m = manager(fake, slurm_cfg(max_jobs=1))
    m.reconcile({"cpu": 1}, {})

    def broken(names):
        raise pools.SlurmError("squeue: slurm_load_jobs error: Socket timed out")

    monkeypatch.setattr(pools, "squeue", broken)
    assert m.reconcile({"cpu": 1}, {}) == {}
    assert [j.job_id for j in m.jobs()] == ["101"] and fake.next_id == 101


def test_reserved_jobs_are_provisioned_and_kept_while_no_unit_is_left(fake):
    """An imitation job's DDP workers need nodes even when no unit waits (the head has no CPUs)."""
    m = manager(fake, slurm_cfg(max_jobs=3))
    assert m.reconcile({}, {}, {"cpu": 2}) == {"cpu": 2}
    assert len(m.jobs()) == 2
    for i in fake.queue:
        fake.queue[i] = ("RUNNING", "n1")
    m.reconcile({}, {}, {"cpu": 2})  # without Ray nothing is known idle: the reserved jobs stay
    assert fake.cancelled == [] and len(m.jobs()) == 2
    assert m.reconcile({"cpu": 5}, {}, {"cpu": 2}) == {"cpu": 3}  # units and reserved share max_jobs
    m.reconcile({}, {}, {})  # the imitation job ended: back to the queue's size
    assert m.jobs() == []


def test_imitation_jobs_follow_workers_and_name_what_cannot_fit():
    gpu_pool = dict(partition="gpu", cpus_per_job=8, gpus_per_job=2, mem_gb=32, time_min=60, min_jobs=0, max_jobs=2)
    cfg = configs.load("slurm", overrides={"slurm.pools.cpu.cpus_per_job": 2, "slurm.pools.cpu.max_jobs": 2,
                                           "slurm.pools.gpu": gpu_pool, "il.num_workers": 3, "il.use_gpu": False})
    assert pools.imitation_jobs(cfg) == ("cpu", 2)  # 3 workers of 1 CPU, 2 per job
    assert pools.imitation_jobs(cfg.with_overrides({"il.use_gpu": True})) == ("gpu", 2)  # 2 GPUs per job
    with pytest.raises(ValueError, match=r"il.num_workers = 5 needs 3 jobs of slurm.pools.cpu .*max_jobs is 2"):
        pools.imitation_jobs(cfg.with_overrides({"il.num_workers": 5}))
    no_gpu = configs.load("slurm", overrides={"slurm.pools": {"cpu": cfg.slurm.pools["cpu"].model_dump()},
                                              "il.use_gpu": True})
    with pytest.raises(ValueError, match="il.use_gpu = True.*no GPU pool"):
        pools.imitation_jobs(no_gpu)


def test_unknown_pool_is_a_clear_error(fake):
    m = manager(fake, slurm_cfg())
    with pytest.raises(ValueError, match="unknown pools"):
        m.reconcile({"gpu": 1}, {})


def test_refused_submission_backs_off_instead_of_raising(fake, monkeypatch):
    clock = [50.0]
    monkeypatch.setattr(pools.time, "monotonic", lambda: clock[0])
    m = manager(fake, slurm_cfg(max_jobs=1))

    class Refusing:
        def submit(self, fn, spec):
            raise RuntimeError("sbatch: error: invalid partition specified: gpu")

    m._executors["cpu"] = Refusing()
    m.reconcile({"cpu": 1}, {})
    assert m.jobs() == []
    m._executors["cpu"] = fake.executor()
    m.reconcile({"cpu": 1}, {})
    assert m.jobs() == []  # still backing off
    clock[0] += 2.1
    m.reconcile({"cpu": 1}, {})
    assert len(m.jobs()) == 1


def test_head_sbatch_command_writes_a_script_that_runs_the_command_next_to_a_head(tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    out = tmp_path / "head.sbatch"
    result = CliRunner().invoke(app, ["slurm", "head-sbatch", "--out", str(out), "--partition", "login",
                                      "--cpus", "3", "--log-dir", str(tmp_path / "logs"), "--token-file", "/shared/tok",
                                      "--", "pianoforge", "submit", "my songs.yaml", "--profile", "slurm"])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "#SBATCH --partition=login" in text and "#SBATCH --cpus-per-task=3" in text
    assert f"#SBATCH --output={tmp_path / 'logs'}/head-%j.out" in text
    assert text.rstrip().endswith("-m slurm.head --profile slurm --token-file /shared/tok -- "
                                  "pianoforge submit 'my songs.yaml' --profile slurm")
