"""DrasCLR landmark per batch: every sample of one optimizer step, on every rank, shares one landmark.

The planner gives each sample its step (index // effective batch); every rank streams its own
micro-batches (rank r's m-th = block m*W + r), so step k is samples [k*G, (k+1)*G) everywhere.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time

import numpy as np
import pytest

from rayssl.config import resolve_config
from rayssl.data.pipeline import build_dataset
from rayssl.data.plan import Planner
from rayssl.methods.base import VolumeInfo
from rayssl.train.shards import rank_data_config, rank_dataset_name, rank_datasets, rank_pool, rank_sample_ids
from rayssl.methods.drasclr import EXTRA_ATLAS_COORDS, EXTRA_NEIGHBORS, EXTRA_POSITIONS, DrasCLR, DrasCLRConfig

N_LANDMARKS = 12


def _volumes(n_volumes: int = 3) -> list[VolumeInfo]:
    """Prepared volumes with N_LANDMARKS landmarks on a line (tables by hand, as DrasCLR.prepare writes them)."""
    centres = np.stack([np.arange(N_LANDMARKS) * 4 + 8, np.full(N_LANDMARKS, 10), np.full(N_LANDMARKS, 9)], 1)
    neighbors = np.array([[max(i - 1, 0) if i else 1, min(i + 1, N_LANDMARKS - 1) if i < N_LANDMARKS - 1
                           else N_LANDMARKS - 3] for i in range(N_LANDMARKS)])
    coords = np.linspace(-1, 1, N_LANDMARKS * 3, dtype=np.float32).reshape(N_LANDMARKS, 3)
    return [VolumeInfo(index=i, id=f"v{i}", shape=(64, 24, 24), spacing=(1.0, 1.0, 1.0), bbox=(0, 0, 0, 64, 24, 24),
                       background=-1024.0, modality="CT",
                       extra={"store": "/nowhere", "group": f"v{i}", EXTRA_POSITIONS: centres.astype(np.float32) + i,
                              EXTRA_NEIGHBORS: neighbors, EXTRA_ATLAS_COORDS: coords})
            for i in range(n_volumes)]


def _method(**overrides) -> DrasCLR:
    return DrasCLR(DrasCLRConfig(patch_size=8, **overrides))


def _landmarks(method: DrasCLR, samples_per_step: int | None, samples: range, seed: int = 3) -> list[int]:
    """The landmark each global sample index is planned at."""
    planner = Planner(_volumes(), method.plan, seed=seed, samples_per_volume=N_LANDMARKS,
                      samples_per_step=samples_per_step if method.step_shared_plans else None)
    return [planner.plan_requests(s)[2][0].context["landmark"] for s in samples]


class TestPlanner:
    def test_every_sample_of_a_step_shares_the_landmark_and_steps_move_on(self):
        g = 8  # batch 2 x 2 workers x accumulate 2; 3 volumes -> each landmark kept ceil(3 / 8) = 1 step
        method = _method()
        assert method.config.landmark_sampling == "per_batch" and method.step_shared_plans
        start = 5 * g  # a resumed run starts at a whole step
        per_sample = np.array(_landmarks(method, g, range(start, start + N_LANDMARKS * g))).reshape(N_LANDMARKS, g)
        assert (per_sample == per_sample[:, :1]).all(), per_sample
        steps = per_sample[:, 0]
        assert np.all(steps[1:] != steps[:-1])
        # Every landmark once per cycle of N_LANDMARKS runs (steps 5..16 straddle cycles 0 and 1).
        cycle_1 = np.array(_landmarks(method, g, range(N_LANDMARKS * g, 2 * N_LANDMARKS * g, g)))
        assert sorted(cycle_1) == list(range(N_LANDMARKS))
        # Deterministic in (seed, step), and a different run seed gives another order.
        assert _landmarks(method, g, range(start, start + 4 * g, g)) == list(steps[:4])
        assert _landmarks(method, g, range(0, N_LANDMARKS * g, g), seed=4) != \
            _landmarks(method, g, range(0, N_LANDMARKS * g, g), seed=3)

    def test_hold_keeps_a_landmark_for_consecutive_steps(self):
        g = 2
        method = _method(landmark_hold_steps=3)
        steps = _landmarks(method, g, range(0, 9 * g, g))
        assert steps[0:3] == [steps[0]] * 3 and steps[3:6] == [steps[3]] * 3 and steps[6:9] == [steps[6]] * 3
        assert len({steps[0], steps[3], steps[6]}) == 3
        # Default hold: one pass over the volumes (ceil(3 volumes / 2 samples per step) = 2 steps).
        assert _method().landmark_hold(n_volumes=3, samples_per_step=2) == 2
        assert "kept 3 steps" in method.recipe()["landmark sampling"]

    def test_per_sample_draws_a_landmark_per_sample(self):
        method = _method(landmark_sampling="per_sample")
        assert not method.step_shared_plans
        drawn = np.array(_landmarks(method, 8, range(0, 64))).reshape(8, 8)
        assert all(len(set(row)) > 1 for row in drawn)
        assert method.recipe()["landmark sampling"] == "one per sample"

    def test_outside_training_plans_draw_per_sample(self):
        """preview and streaming have no steps: the landmark is the sample's own draw."""
        method = _method()
        js = {method.plan(_volumes(), 0, np.random.default_rng(i))[0].context["landmark"] for i in range(20)}
        assert len(js) > 1

    def test_rank_streams_interleave_whole_micro_batches(self):
        """Rank r's m-th micro-batch is block m*W + r: step k is [k*G, (k+1)*G) on every rank."""
        world, batch, accumulate, start_step, steps = 3, 2, 2, 4, 5
        g = world * batch * accumulate
        ids = [rank_sample_ids(start_step * g, steps * g, batch, world, r).reshape(-1, batch) for r in range(world)]
        for k in range(steps):
            step = np.concatenate([ids[r][k * accumulate:(k + 1) * accumulate] for r in range(world)], axis=None)
            assert sorted(step) == list(range((start_step + k) * g, (start_step + k + 1) * g))
        assert ids[1][0].tolist() == [start_step * g + 2, start_step * g + 3]
        with pytest.raises(ValueError, match="whole rounds"):
            rank_sample_ids(2, 12, batch, 2, 0)
        with pytest.raises(ValueError, match="outside"):
            rank_sample_ids(0, 12, batch, 2, 2)

    @pytest.mark.parametrize("actors,cpus,world,expected", [
        ((1, 2), 0.5, 2, ((1, 1), 0.5)),       # the default pool split between 2 ranks
        ((2, 4), 1.0, 2, ((1, 2), 1.0)),
        ((1, 1), 0.5, 2, ((1, 1), 0.25)),      # one actor's CPUs shared by two rank pools
        ((1, 3), 1.0, 2, ((1, 2), 0.75)),      # 4 actors x 0.75 = the 3 CPUs of one pool of 3
        ((1, 2), 0.5, 1, ((1, 2), 0.5)),
    ])
    def test_rank_pools_reserve_what_one_pool_would(self, actors, cpus, world, expected):
        pool, per_actor = rank_pool(actors, cpus, world)
        assert (pool, pytest.approx(per_actor)) == (expected[0], expected[1])
        assert world * pool[1] * per_actor == pytest.approx(actors[1] * cpus)

    def test_build_dataset_takes_a_range_or_sample_ids(self):
        with pytest.raises(ValueError, match="either num_samples"):
            build_dataset(_volumes(), _method().plan, _views, num_samples=8, sample_ids=[1, 2])
        with pytest.raises(ValueError, match="either num_samples"):
            build_dataset(_volumes(), _method().plan, _views)
        with pytest.raises(ValueError, match="sample_ids"):
            build_dataset(_volumes(), _method().plan, _views, sample_ids=[3, -1])


def _views(crops, requests, rng) -> dict[str, np.ndarray]:
    return {"x": np.zeros((4, 8, 8, 8), np.float32)}


def _no_boxes(volumes, index, rng, step=None):
    return []


def _uneven_views(crops, requests, rng) -> dict[str, np.ndarray]:
    """Some samples take 20x longer to build than others (as a slow chunk or a big volume would)."""
    time.sleep(0.04 if rng.random() < 0.3 else 0.002)
    return {"x": np.zeros((2,), np.float32)}


def test_rank_streams_through_train_data_config_under_uneven_timing(ray_local):
    """Per-rank datasets through Ray Train's own DataConfig.configure (as TorchTrainer's dataset
    manager calls it), consumed concurrently with uneven build times and one rank much slower to
    consume: every rank's m-th micro-batch is exactly block m*W + r, so each optimizer step holds
    exactly samples [k*G, (k+1)*G) across ranks, each rank's micro-batches in order."""
    import ray

    world, batch, accumulate = 3, 1, 2
    g, start_step, steps = world * batch * accumulate, 5, 6
    build = functools.partial(build_dataset, _volumes(), _no_boxes, _uneven_views, samples_per_step=g)
    datasets = rank_datasets(build, start_sample=start_step * g, num_samples=steps * g, micro_batch=batch,
                             world=world, actors=(1, world), actor_cpus=0.5)
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    config = rank_data_config(ingest)
    iterators = {}
    for name, ds in datasets.items():  # Train's DatasetManager configures one dataset at a time
        iterators[name] = config.configure({name: ds}, world_size=world, worker_handles=None,
                                           worker_node_ids=None)
    got: list[list[list[int]]] = [[] for _ in range(world)]
    errors: list[BaseException] = []

    def consume(rank: int) -> None:
        shard = iterators[rank_dataset_name(rank)][rank][rank_dataset_name(rank)]
        try:
            for b in shard.iter_batches(batch_size=batch, drop_last=True, batch_format="numpy", prefetch_batches=1):
                got[rank].append(b["sample"].tolist())
                if rank == 0:
                    time.sleep(0.05)  # rank 0 lags: the others run ahead of it
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(err)

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    for rank in range(world):
        assert len(got[rank]) == steps * accumulate
        for m, micro in enumerate(got[rank]):
            first = start_step * g + (m * world + rank) * batch
            assert micro == list(range(first, first + batch)), (rank, m, micro)
    for k in range(steps):
        step = sorted(s for r in range(world) for m in got[r][k * accumulate:(k + 1) * accumulate] for s in m)
        assert step == list(range((start_step + k) * g, (start_step + k + 1) * g))


@pytest.mark.slow
def test_two_worker_pretrain_trains_every_step_on_one_landmark(ray_local, demo_store_path, tmp_path):
    """Ray Data + Ray Train, 2 ranks x batch 2 x accumulate 2 (the suite's two-worker DDP run): the keys of
    every optimizer step, over both ranks and both micro-batches (gathered in after_step), come from a
    single landmark, and its queue fills."""
    steps = 2  # two steps: enough to see the landmark move on and its queue fill; each costs ~10 s on 2 cores
    cfg = resolve_config(method="drasclr", profile="cpu", overrides=[
        f"data.store={demo_store_path}", f"out={tmp_path / 'runs'}", "data.split=all", "data.actors_max=2",
        "data.actor_cpus=0.2", "train.num_workers=2", "train.cpus_per_worker=0.5", "train.batch_size=2",
        "train.accumulate=2", "train.max_failures=0", f"train.steps={steps}", "train.report_every=1",
        f"train.checkpoint_every={steps}", "drasclr.widths=[4,4,4,8,8]", "drasclr.rep_dim=8", "drasclr.proj_dim=8",
        "drasclr.num_experts=2", "drasclr.queue_size=8"])
    from rayssl.train.trainer import pretrain

    result = pretrain(cfg)
    assert result.status == "finished" and result.steps == steps
    with open(os.path.join(result.run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert [m["step_landmarks"] for m in metrics] == [1.0] * steps
    # 4 volumes / 8 samples per step: a new landmark every step, whose queue (8 slots) each step fills.
    fills = [m["bank_fill"] for m in metrics]
    assert all(a < b for a, b in zip(fills, fills[1:])), fills
