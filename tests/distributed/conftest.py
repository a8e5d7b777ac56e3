"""The Ray cluster the Ray tests share (tests/distributed/test_ray_*.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def ray_cluster():
    """A real Ray cluster on this machine, every address 127.0.0.1: a head with no CPUs and two one-CPU worker nodes
    (a test that removes a node adds a replacement). Started on first use (about 10-20 s) and stopped when the
    distributed tests are done: its daemons would otherwise take CPU from every test after them."""
    from benchmarks.servers import start_ray_cluster

    cluster = start_ray_cluster(worker_nodes=2)
    yield cluster
    cluster.shutdown()
