"""Fixtures shared by the test modules: a local Ray cluster and the single-node SLURM cluster.

Helpers that are not fixtures (songs for the piano tests, a small lake for the imitation
tests) live in ``env_fixtures.py`` and ``il_fixtures.py`` beside this file.
"""

from __future__ import annotations

import pytest

from slurm_fixtures import slurm_cluster  # noqa: F401  (session fixture, shared by the SLURM tests)


@pytest.fixture(scope="module")
def ray_cluster():
    """A fresh local Ray instance (2 CPUs, token authentication as Ray sets it) for one test module."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
