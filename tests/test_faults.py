"""Faults a campaign must survive that are not a unit's own: stale pid files, a full disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import configs
from workers.synthetic import make_units, run_unit
from workers.units import PID_FILE, live_worker_pid

SYNTHETIC = ["campaign.workload=synthetic", "campaign.synthetic.steps=4", "campaign.synthetic.episodes=1",
             "campaign.synthetic.steps_per_episode=4"]


def test_a_finished_units_pid_file_does_not_name_the_process_running_another_unit(tmp_path):
    """One process (as a Ray worker does) runs unit A, then unit B: A's pid file must not name it."""
    first, second = make_units(1, 2, "cfg00000")
    cfg = configs.load(overrides=SYNTHETIC + ["campaign.synthetic.sleep_s=0.0"])
    a_dir, b_dir = tmp_path / first.unit_id, tmp_path / second.unit_id
    run_unit(first, cfg, a_dir, tmp_path / "lake")

    slow = cfg.with_overrides(["campaign.synthetic.sleep_s=3.0"])
    runner = threading.Thread(target=run_unit, args=(second, slow, b_dir, tmp_path / "lake"))
    runner.start()
    deadline = time.time() + 30
    while not (b_dir / PID_FILE).exists() and time.time() < deadline:
        time.sleep(0.02)
    assert live_worker_pid(b_dir) == os.getpid()  # B runs in this process now
    assert live_worker_pid(a_dir) is None and not (a_dir / PID_FILE).exists()  # A is over
    runner.join()
    assert live_worker_pid(b_dir) is None


def test_a_pid_file_left_by_a_dead_worker_names_no_process(tmp_path):
    unit_dir = tmp_path / "u1"
    unit_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (unit_dir / PID_FILE).write_text(json.dumps({"pid": int(dead.stdout), "unit_id": "u1", "started": 1}))
    assert live_worker_pid(unit_dir) is None
    # This process is alive, but it is not the process that wrote the file (another start time).
    (unit_dir / PID_FILE).write_text(json.dumps({"pid": os.getpid(), "unit_id": "u1", "started": 1}))
    assert live_worker_pid(unit_dir) is None
    (unit_dir / PID_FILE).write_text(str(os.getpid()))  # the old bare-pid form carries no proof
    assert live_worker_pid(unit_dir) is None
