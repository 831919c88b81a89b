"""Fixtures shared by the test modules: a local Ray cluster, the single-node and the 3-node SLURM
cluster, one torch thread.

Helpers that are not fixtures (songs for the piano tests, a small lake for the imitation
tests) live in ``env_fixtures.py`` and ``il_fixtures.py`` beside this file.
"""

from __future__ import annotations

import pytest

from slurm_fixtures import slurm_cluster  # noqa: F401  (session fixture, shared by the SLURM tests)
from multinode_fixtures import multinode_cluster  # noqa: F401  (module fixture: 3 SLURM nodes in namespaces)


@pytest.fixture(scope="module")
def ray_cluster():
    """A fresh local Ray instance (2 CPUs, token authentication as Ray sets it) for one test module."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def one_torch_thread():
    """Small networks run fastest single-threaded, and CI has two shared cores (a module opts in
    with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
