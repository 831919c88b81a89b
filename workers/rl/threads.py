"""OpenMP threads that sleep when idle, so learners sharing a node's cores do not spin on them.

With OpenMP's default wait policy an idle torch thread spins for a while before sleeping; on
a busy node two-thread DroQ updates then took ~10x longer than one-thread ones. libgomp reads
``OMP_WAIT_POLICY`` once, when torch loads it, so the variable must be set before the first
``import torch`` of the process: ``workers/__init__.py`` does it, so any process that imports
``workers`` before torch (every worker entry point) gets it. The number of threads is set
separately (``torch.set_num_threads``; the specialist uses ``campaign.cpus_per_unit``).
"""

from __future__ import annotations

import os
import sys


def passive_openmp() -> bool:
    """Default ``OMP_WAIT_POLICY`` to PASSIVE (an explicit setting wins); True if it came
    before torch was imported, i.e. takes effect in this process."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "torch" not in sys.modules
