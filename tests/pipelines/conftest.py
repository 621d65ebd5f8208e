"""The own_cluster tests' shared cluster (see tests/pipelines/cluster_harness.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def own_cluster():
    """One local Ray with the job server for the whole (own_cluster) session: a Cluster."""
    from tests.pipelines.cluster_harness import job_cluster

    with job_cluster(num_cpus=2) as cluster:
        yield cluster


@pytest.fixture
def job_server(own_cluster) -> str:
    """The shared cluster's job server address (http://127.0.0.1:PORT)."""
    return own_cluster.address
