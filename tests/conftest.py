"""Shared pytest fixtures: one local Ray runtime per session and a tiny demo store."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray runtime shared by the whole session (2 CPUs, 512 MiB object store)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = False
    if not ray.is_initialized():
        # Workers import test modules by name (functions defined in tests are pickled by reference).
        tests_dir = os.path.dirname(os.path.abspath(__file__))
        ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": tests_dir, "RAY_USAGE_STATS_ENABLED": "0"}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def demo_store_path(tmp_path_factory):
    """A tiny demo store: 4 CT phantoms of 64x64x48 voxels (6 x 6 x 6.67 mm), chunks 32^3,
    with organ labels and lung masks; splits 2 train / 1 val / 1 test."""
    from datasets_zarr import demo_store

    return demo_store(root=tmp_path_factory.mktemp("demo"), n=4, shape=(64, 64, 48),
                      spacing=(6.0, 6.0, 20.0 / 3.0), chunks=32)
