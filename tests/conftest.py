"""Shared fixtures: ONE local[2] SparkSession for the whole test session, a fresh warehouse per test."""
from __future__ import annotations

import pytest

from jobs.spark import get_spark
from jobs.tables import Warehouse


@pytest.fixture(scope="session")
def spark():
    session = get_spark("local[2]", app="dr-tests", conf={"spark.sql.shuffle.partitions": "4"})
    yield session
    session.stop()


@pytest.fixture
def warehouse(tmp_path) -> Warehouse:
    return Warehouse(tmp_path / "warehouse")


@pytest.fixture(scope="session")
def ray_local():
    """ONE local Ray for the test session (4 logical CPUs: 2 train workers + Ray Data tasks fit), small object store."""
    import ray

    from ray_trainers.config import ray_environment

    ray_environment()
    if ray.is_initialized():  # a job under test started its own Ray: replace it with the session's settings
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=200 * 2 ** 20, log_to_driver=False)
    yield ray
    ray.shutdown()
