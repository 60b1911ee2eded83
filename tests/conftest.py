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


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """3 CT phantoms of 32^3 voxels, chunks 16^3 (splits: 2 train, 1 val; a real store, built without Ray),
    for the tests that fail before Ray starts (tests/test_validation.py, tests/test_run_ownership.py)."""
    from datasets_zarr import demo_store

    return str(demo_store(root=tmp_path_factory.mktemp("tiny"), n=3, shape=(32, 32, 32), spacing=(6.0, 6.0, 6.0),
                          chunks=16))


@pytest.fixture(scope="session")
def voco_resume_runs(ray_local, demo_store_path, tmp_path_factory):
    """One tiny VoCo run of 4 steps (checkpoints at 2 and 4) made three ways, shared by
    tests/test_train.py (run folder, export, exact resume), tests/test_tracking.py (TensorBoard and
    MLflow across a resume) and tests/test_online_probe.py.

    All three evaluate the held-out objective (2 samples) at their first report and every 2 steps.
    `full`: uninterrupted, with an online probe at each checkpoint (the probe runs in its own Ray
    task, so `full` stays the reference for the exact resume). `part`: stopped after step 2 while
    logging to a local MLflow database. `resumed`: `part` continued to step 4 with no URI given
    (its run folder's mlflow.json says where). Each pretrain costs ~1 min of Ray start-up on
    2 cores, so the runs are made once per session instead of once per test module."""
    import json
    from types import SimpleNamespace

    from rayssl.config import resolve_config
    from rayssl.train.trainer import pretrain

    from helpers import VOCO_TINY

    root = tmp_path_factory.mktemp("voco_runs")

    def cfg(*extra):
        return resolve_config(method="voco", profile="cpu", overrides=[
            f"data.store={demo_store_path}", *VOCO_TINY, "train.report_every=1", "train.steps=4",
            "train.checkpoint_every=2", "train.heldout_samples=2", "train.heldout_every=2", *extra])

    uri = f"sqlite:///{root}/mlflow.db"
    full = pretrain(cfg(f"out={root / 'a'}", "name=full", f"eval.probe_store={demo_store_path}", "eval.probe_crops=4"))
    part = pretrain(cfg(f"out={root / 'b'}", "name=part", "train.stop_after=2"), mlflow_uri=uri)
    with open(os.path.join(part.run_dir, "mlflow.json")) as f:
        first_id = json.load(f)["run_id"]
    resumed_cfg = resolve_config(file=os.path.join(part.run_dir, "config.yaml"), overrides=["train.stop_after=null"])
    resumed = pretrain(resumed_cfg, resume=part.run_dir)
    return SimpleNamespace(full=full, part=part, resumed=resumed, mlflow_uri=uri, mlflow_run_id=first_id)
