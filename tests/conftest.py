"""Shared fixtures. Ray starts once per test session, and only for tests that ask for it."""

from __future__ import annotations

import pytest

@pytest.fixture(scope="session")
def ray_address():
    """A real local Ray cluster (4 logical CPUs on a 2-core machine is fine); its GCS address."""
    import ray

    from mixloop.ray_setup import init_ray

    init_ray(num_cpus=4)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
