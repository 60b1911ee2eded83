"""Faults on a multi-node Ray cluster (ray.cluster_utils.Cluster): node loss, data actor loss, unplaceable runs, NaN.

This module replaces the session's local runtime (`ray_local`) with its own multi-node cluster,
so it is named to run last; on teardown it starts the session runtime again, the way
tests/conftest.py does, in case other tests still follow (e.g. when files are given explicitly).
"""

import glob
import json
import os
import shutil
import signal
import tempfile
import threading
import time

import datasets_zarr as dz
import numpy as np
import pytest
import torch

from rayssl.config import resolve_config
from rayssl.checkpoint import latest_checkpoint_step, load_checkpoint_dir
from rayssl.train.trainer import PlacementError, pretrain

from helpers import free_ports

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# The tiny VoCo of tests/test_train.py.
TINY = ["n_x=2", "n_y=2", "region_size=[64,64,32]", "input_size=32", "num_random_crops=2",
        "unet_features=[4,4,8,8,16,4]", "proj_hidden_dim=32", "proj_dim=32",
        "train.batch_size=1", "data.split=all", "data.actors_max=1", "train.report_every=1"]

# Placement of a worker group that cannot fit times out after this many seconds (Ray's default: 60).
PLACEMENT_TIMEOUT_S = 12


def _cfg(store, out, *extra):
    return resolve_config(method="voco", profile="cpu",
                          overrides=[f"data.store={store}", f"out={out}", *TINY, *extra])


def _metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return out


def _alive_actors_by_class():
    """{actor class name: [(actor id, node id, pid)]} of live actors, from the GCS actor table."""
    from ray._private.state import actors

    table: dict[str, list[tuple[str, str, int]]] = {}
    for actor_id, info in actors().items():
        if info["State"] == "ALIVE":
            table.setdefault(info["ActorClassName"], []).append((actor_id, info["Address"]["NodeID"], info["Pid"]))
    return table


def _data_actors(table):
    return [a for name, entries in table.items() if "MapWorker" in name for a in entries]


def _start_session_runtime():
    """Mirrors tests/conftest.py::ray_local (2 CPUs, 512 MiB object store, tests/ on PYTHONPATH)."""
    import ray

    ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False,
             logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": TESTS_DIR, "RAY_USAGE_STATS_ENABLED": "0"}})
    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs: driver, Train controller, Data coordinator) + 3 one-CPU worker nodes.

    A private RAY_TMPDIR keeps the cluster's address file out of /tmp/ray, so no other process's
    `ray.init()` on this machine attaches to it.
    """
    import ray
    from ray.cluster_utils import Cluster

    session_runtime_was_up = ray.is_initialized()
    if session_runtime_was_up:
        ray.shutdown()
    saved_env = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")}
    temp_dir = tempfile.mkdtemp(prefix="rz", dir="/tmp")  # short: socket paths must fit 107 bytes
    os.environ["RAY_TMPDIR"] = temp_dir
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(PLACEMENT_TIMEOUT_S)  # inherited by every node
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    agent_port = free_ports(1)[0]  # Ray's default agent port (52365) may be taken by another Ray instance
    c = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, object_store_memory=256 * 2**20, include_dashboard=False, dashboard_agent_listen_port=agent_port))
    try:
        c.workers_added = [c.add_node(num_cpus=1, object_store_memory=192 * 2**20) for _ in range(3)]
        ray.init(address=c.address, logging_level="WARNING", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": TESTS_DIR, "RAY_USAGE_STATS_ENABLED": "0"}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp_dir, ignore_errors=True)
        if session_runtime_was_up:
            _start_session_runtime()


def _worker_logs_matching(cluster, text):
    logs = glob.glob(os.path.join(cluster.head_node.get_session_dir_path(), "logs", "worker-*.out"))
    hits = []
    for path in logs:
        with open(path, errors="replace") as f:
            hits += [line.strip() for line in f if text in line]
    return hits


def _registered_checkpoint_step(run_dir):
    """Step of the newest checkpoint Train's controller has registered (its snapshot on storage).

    A checkpoint reaches the controller when it next polls the workers (every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s); one on storage but not yet polled is not resumed from.
    """
    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
            return int(json.load(f)["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _kill_a_training_node_mid_run(cluster, thread, run_dir, outcome):
    """Once a checkpoint is registered and a later step is logged, kill a node that hosts a training
    worker and add a replacement node (what the autoscaler would do).

    Returns (registered checkpoint step at the kill, losses logged before the kill)."""
    train_nodes, data_nodes = set(), set()
    deadline = time.monotonic() + 600
    registered = None
    while thread.is_alive() and time.monotonic() < deadline:
        table = _alive_actors_by_class()
        train_nodes |= {node for _, node, _ in table.get("RayTrainWorker", [])}
        data_nodes |= {node for _, node, _ in _data_actors(table)}
        registered = _registered_checkpoint_step(run_dir)
        if registered and max((m["step"] for m in _metrics(run_dir)), default=0) > registered:
            break
        time.sleep(0.1)
    assert thread.is_alive(), f"the run ended before the node could be killed: {outcome}"
    before_kill = {m["step"]: m["loss"] for m in _metrics(run_dir)}
    # Spread: 2 training workers on 2 nodes, the data actor on the third, nothing on the head.
    head_id = cluster.head_node.node_id
    assert len(train_nodes) == 2 and head_id not in train_nodes, train_nodes
    assert data_nodes and head_id not in data_nodes and not data_nodes & train_nodes, (data_nodes, train_nodes)

    # What else lives on each training node: a node loss that also takes a singleton actor (one
    # that Ray Data or Train created there) is another failure than the one this test is about.
    table = _alive_actors_by_class()
    others = {node: sorted({name for name, entries in table.items() for _, n, _ in entries if n == node
                            and name != "RayTrainWorker"}) for node in train_nodes}
    victim = min((n for n in cluster.workers_added if n.node_id in train_nodes), key=lambda n: len(others[n.node_id]))
    outcome["victim_actors"] = others[victim.node_id]
    cluster.remove_node(victim, allow_graceful=False)
    cluster.workers_added.remove(victim)
    cluster.workers_added.append(cluster.add_node(num_cpus=1, object_store_memory=192 * 2**20))
    return registered, before_kill


@pytest.mark.slow
@pytest.mark.extended  # ~2.5 min: a 10-step DDP run restarted on a new node (README: Testing)
def test_node_loss_resumes_from_last_checkpoint(cluster, demo_store_path, tmp_path):
    """2 DDP workers on 2 nodes + a data actor on the third; the node of one worker is killed mid-run."""
    cfg = _cfg(demo_store_path, tmp_path / "runs", "name=nodeloss", "train.steps=10", "train.checkpoint_every=3",
               "train.num_workers=2", "train.cpus_per_worker=1", "data.actor_cpus=0.5", "train.max_failures=2")
    run_dir = str(tmp_path / "runs" / "nodeloss")
    outcome = {}

    def fit():
        try:
            outcome["result"] = pretrain(cfg)
        except BaseException as err:  # noqa: BLE001 - reported by the assertions below
            outcome["error"] = err

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    try:
        registered, before_kill = _kill_a_training_node_mid_run(cluster, thread, run_dir, outcome)
    finally:
        thread.join(timeout=600)  # never leave the run going into the next test

    assert "error" not in outcome, (f"run failed after the node loss: {outcome.get('error')!r}; the killed node "
                                    f"also hosted: {outcome.get('victim_actors')}")
    result = outcome["result"]
    assert result.status == "finished" and result.steps == 10
    resumed = _worker_logs_matching(cluster, "[rayssl] resumed from checkpoint at step")
    assert len(resumed) == 1, _worker_logs_matching(cluster, "[rayssl]")
    resumed_step = int(resumed[0].rsplit(" ", 1)[1])
    # From the checkpoint registered at the kill (or one the surviving rank 0 reported just before).
    assert resumed_step >= registered and resumed_step % 3 == 0 and resumed_step < max(before_kill)
    after = {m["step"]: m["loss"] for m in _metrics(run_dir)}
    assert sorted(after) == list(range(1, 11))
    # Steps up to the checkpoint are the pre-kill history; the steps after it were recomputed
    # after the restart from the same weights, optimizer, RNG state and samples: same losses.
    for step in range(1, resumed_step + 1):
        assert after[step] == before_kill[step]
    redone = [s for s in before_kill if s > resumed_step]
    assert redone, before_kill
    for step in redone:
        assert after[step] == pytest.approx(before_kill[step], rel=1e-5), (step, before_kill, after)
    assert latest_checkpoint_step(run_dir) == 10


def test_data_actor_killed_mid_epoch_loses_and_repeats_no_sample(cluster, demo_store_path):
    """What we promise: every sample of the epoch arrives exactly once although data actors die.

    How: Ray Data's pool actors have max_restarts=-1 and max_task_retries=-1, so Ray restarts a
    killed actor and re-runs its in-flight task; views are a pure function of the sample index
    (plan seeded by (seed, epoch, volume, position)), so the re-run yields the same rows, and
    outputs the failed attempt already streamed are not emitted twice.
    """
    from ray._private.state import actors as actor_table

    from rayssl.data.pipeline import build_dataset
    from rayssl.data.volumes import load_volumes
    from rayssl.methods import get_method_class

    method = get_method_class("voco")(_cfg(demo_store_path, "unused").method_cfg())
    volumes = load_volumes(str(demo_store_path), "all")
    samples_per_volume = 16
    epoch = len(volumes) * samples_per_volume  # 64 samples = 4 input blocks of 16 for 2 actors: >= 3 s of work

    def slow_views(crops, requests, rng):
        time.sleep(0.1)  # keeps the actors busy while the epoch streams
        return method.views(crops, requests, rng)

    ds = build_dataset(volumes, method.plan, slow_views, num_samples=epoch, start_sample=0, seed=0,
                       samples_per_volume=samples_per_volume, actors=(2, 2), actor_cpus=0.5)
    seen, killed, seen_at_kill = [], [], 0
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1):
        seen += batch["sample"].tolist()
        if not killed:
            killed = _data_actors(_alive_actors_by_class())
            for _, _, pid in killed:
                os.kill(pid, signal.SIGKILL)
            seen_at_kill = len(seen)
    assert killed, "no live data actor while the epoch streamed"
    assert seen_at_kill < epoch / 2  # most rows were still to come from the killed actors' tasks
    assert all(actor_table(actor_id)["NumRestarts"] >= 1 for actor_id, _, _ in killed)
    assert sorted(seen) == list(range(epoch)), sorted(seen)


def test_unplaceable_run_fails_fast_with_a_clear_message(cluster, demo_store_path, tmp_path):
    """4 workers x 1 CPU on a cluster with 3 CPUs: bounded retries, then an error naming the fix."""
    cfg = _cfg(demo_store_path, tmp_path / "runs", "name=toobig", "train.steps=2", "train.num_workers=4",
               "train.cpus_per_worker=1", "train.controller_failure_limit=1")
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as info:
        pretrain(cfg)
    elapsed = time.monotonic() - t0
    message = str(info.value)
    # Two placement attempts (the first + controller_failure_limit=1 retry) of PLACEMENT_TIMEOUT_S each.
    assert elapsed < 2 * PLACEMENT_TIMEOUT_S + 90, elapsed
    assert "4 training workers x {'CPU': 1.0}" in message and "train.num_workers" in message, message
    assert "in 2 attempt(s)" in message and "the cluster has {'CPU': 3.0}" in message, message
    summary = json.load(open(tmp_path / "runs" / "toobig" / "summary.json"))
    assert summary["status"] == "failed"


def _store_with_nan_volume(src, dst, seed=0, whole=False):
    """Copy of the demo store in which the volume of the 3rd sample of epoch 0 (step 3 with one
    worker and batch 1) holds a block of NaN voxels in the middle of its image (or only NaN)."""
    import zarr

    from rayssl.data.plan import epoch_order
    from rayssl.data.volumes import load_volumes

    shutil.copytree(src, dst)
    volumes = load_volumes(str(dst), "all")
    poisoned = volumes[int(epoch_order(len(volumes), 1, seed, 0)[2])]
    assert poisoned not in [volumes[int(i)] for i in epoch_order(len(volumes), 1, seed, 0)[:2]]
    path = os.path.join(str(dst), poisoned.extra["group"], "image")
    old = zarr.open_array(path, mode="r")
    image = old[...].astype(np.float32)
    cx, cy, cz = (s // 2 for s in image.shape)
    if whole:
        image[...] = np.nan
    else:
        image[cx - 8:cx + 8, cy - 8:cy + 8, cz - 4:cz + 4] = np.nan  # inside every VoCo region
    new = zarr.create_array(store=path, shape=image.shape, chunks=old.chunks, dtype="float32",
                            compressors=old.compressors, fill_value=float(old.fill_value),
                            attributes=dict(old.attrs), overwrite=True)
    new[...] = image
    # Record the new dtype where the reader checks it (the volume's attrs and the manifest), as a
    # conversion of float data would: the store is consistent, only its voxels are bad.
    from datasets_zarr.lungmask import update_volume_attrs

    update_volume_attrs(dst, poisoned.extra["group"], {"dtype": "float32"})
    manifest = dz.read_manifest(dst)
    dz.write_manifest(dst, splits=dict(zip(manifest["id"], manifest["split"])), store_uri=str(manifest["store"].iloc[0]))
    return str(dst)


def _all_finite(state):
    tensors = [v for v in state["model"].values() if torch.is_tensor(v) and v.is_floating_point()]
    for group in state["optimizer"]["state"].values():
        tensors += [v for v in group.values() if torch.is_tensor(v) and v.is_floating_point()]
    return bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(cluster, demo_store_path, tmp_path):
    store = _store_with_nan_volume(demo_store_path, tmp_path / "nan.zarr")
    cfg = _cfg(store, tmp_path / "runs", "name=nanstop", "train.steps=4", "train.checkpoint_every=2",
               "train.max_failures=0")
    with pytest.raises(Exception, match="non-finite loss at step 3"):
        pretrain(cfg)
    run_dir = str(tmp_path / "runs" / "nanstop")
    assert [m["step"] for m in _metrics(run_dir)] == [1, 2]
    assert latest_checkpoint_step(run_dir) == 2
    (ckpt,) = [d for d in glob.glob(os.path.join(run_dir, "checkpoint_*")) if os.path.isdir(d)]
    state = load_checkpoint_dir(ckpt)
    assert state["step"] == 2 and _all_finite(state)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["status"] == "failed" and "non-finite loss at step 3" in summary["error"]
    assert not os.path.exists(os.path.join(run_dir, "export", "backbone.pt"))


# MLSSCL with the paper's norms: its ResNet-18 and heads have BatchNorm, whose running statistics a NaN
# batch poisons during the forward pass, before the loss can be checked (the cpu profile's GroupNorm has none).
MLSSCL_TINY = ["clip_length=4", "long_stride=3", "short_stride=2", "plane_size=12", "image_size=12",
               "resnet_widen_factor=0.125", "proj_dim=16", "queue_length=8", "intensity=none",
               "train.batch_size=1", "data.split=all", "data.actors_max=1", "train.report_every=1"]


def test_nan_loss_with_skip_policy_skips_the_step_and_leaves_no_trace(cluster, demo_store_path, tmp_path):
    store = _store_with_nan_volume(demo_store_path, tmp_path / "nan.zarr", whole=True)
    cfg = resolve_config(method="mlsscl", profile="cpu", overrides=[
        f"data.store={store}", f"out={tmp_path / 'runs'}", *MLSSCL_TINY, "name=nanskip", "train.steps=3",
        "train.checkpoint_every=3", "train.nan_policy=skip", "mlsscl.norm=batch", "mlsscl.head_norm=batch"])
    result = pretrain(cfg)
    assert result.status == "finished" and result.steps == 3
    metrics = _metrics(result.run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert _worker_logs_matching(cluster, "step 3: non-finite loss, step skipped (nan_policy=skip)")
    (ckpt,) = [d for d in glob.glob(os.path.join(result.run_dir, "checkpoint_*")) if os.path.isdir(d)]
    state = load_checkpoint_dir(ckpt)
    assert state["step"] == 3
    assert any("running_mean" in k for k in state["model"])  # the check below covers BatchNorm statistics
    assert _all_finite(state), [k for k, v in state["model"].items()
                                if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    exported = torch.load(os.path.join(result.run_dir, "export", "backbone.pt"), weights_only=True)
    assert all(bool(torch.isfinite(v).all()) for v in exported.values() if v.is_floating_point())
