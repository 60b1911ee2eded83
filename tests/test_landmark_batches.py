"""DrasCLR landmark per batch: every sample of one optimizer step, on every rank, shares one landmark.

The planner gives each sample its step (index // effective batch); the stream leaves in micro-batch
blocks that Ray Train's split deals to ranks in turn, so step k is samples [k*G, (k+1)*G) everywhere.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from rayssl.config import resolve_config
from rayssl.data.pipeline import build_dataset
from rayssl.data.plan import Planner
from rayssl.methods.base import VolumeInfo
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
    method = DrasCLR(DrasCLRConfig(patch_size=8, **overrides))
    method.attach(_volumes())
    return method


def _landmarks(method: DrasCLR, samples_per_step: int | None, samples: range, seed: int = 3) -> list[int]:
    """The landmark each global sample index is planned at."""
    planner = Planner(_volumes(), method.plan, seed=seed, samples_per_volume=N_LANDMARKS,
                      samples_per_step=samples_per_step if method.step_shared_plans else None)
    return [method._landmark_of(planner.plan_requests(s)[2]) for s in samples]


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
        js = {method._landmark_of(method.plan(_volumes(), 0, np.random.default_rng(i))) for i in range(20)}
        assert len(js) > 1

    def test_step_shared_streams_must_be_whole_steps(self, ray_local):
        with pytest.raises(ValueError, match="whole steps"):
            build_dataset(_volumes(), _method().plan, _views, num_samples=8, start_sample=2, samples_per_step=4,
                          micro_batch=2)
        with pytest.raises(ValueError, match="micro_batch"):
            build_dataset(_volumes(), _method().plan, _views, num_samples=8, samples_per_step=4, micro_batch=3)


def _views(crops, requests, rng) -> dict[str, np.ndarray]:
    return {"x": np.zeros((4, 8, 8, 8), np.float32)}


def _no_boxes(volumes, index, rng, step=None):
    return []


@pytest.mark.parametrize("world,batch,accumulate", [(2, 2, 2), (3, 1, 1)])
def test_ray_train_split_hands_out_whole_micro_batch_blocks(ray_local, world, batch, accumulate):
    """On Ray Data's split as Ray Train configures it (streaming_split(equal=True), preserve_order),
    every micro-batch a rank receives is one whole, aligned block of `batch` consecutive samples, and
    every sample arrives once. Which rank gets which block is the splitter's choice: a CI run saw
    rank 1 run two blocks ahead, so step-aligned landmarks are exact only with one worker (see
    docs/methods/drasclr.md); `step_landmarks` reports what each step got."""
    import ray

    g, start_step, steps = world * batch * accumulate, 5, 9
    ds = build_dataset(_volumes(), _no_boxes, _views, num_samples=(steps + 1) * g, start_sample=start_step * g,
                       actors=(1, 2), samples_per_step=g, micro_batch=batch)
    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        splits = ds.streaming_split(world, equal=True)
        got: list[list[list[int]]] = [[] for _ in range(world)]

        def consume(rank: int) -> None:
            got[rank] = [b["sample"].tolist() for b in
                         splits[rank].iter_batches(batch_size=batch, drop_last=True, batch_format="numpy")]

        threads = [threading.Thread(target=consume, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        context.execution_options.preserve_order = saved
    micro_batches = [m for rank in got for m in rank]
    for m in micro_batches:
        assert m == list(range(m[0], m[0] + batch)) and m[0] % batch == 0, m
    delivered = sorted(s for m in micro_batches for s in m)
    assert delivered == list(range(start_step * g, start_step * g + len(delivered)))
    assert len(delivered) >= steps * g


@pytest.mark.slow
def test_pretrain_with_accumulation_each_step_sees_one_landmark(ray_local, demo_store_path, tmp_path):
    """Ray Data + Ray Train, 1 worker x batch 2 x accumulate 2: the keys of every optimizer step (both
    micro-batches) come from a single landmark, and its queue fills. (Several workers: see the split test.)"""
    cfg = resolve_config(method="drasclr", profile="cpu", overrides=[
        f"data.store={demo_store_path}", f"out={tmp_path / 'runs'}", "data.split=all", "data.actors_max=1",
        "train.num_workers=1", "train.batch_size=2", "train.accumulate=2",
        "train.max_failures=0",
        "train.steps=3", "train.report_every=1", "train.checkpoint_every=3", "drasclr.widths=[2,4,4,8,8]",
        "drasclr.rep_dim=8", "drasclr.proj_dim=8", "drasclr.num_experts=2", "drasclr.queue_size=8"])
    from rayssl.train.trainer import pretrain

    result = pretrain(cfg)
    assert result.status == "finished" and result.steps == 3
    with open(os.path.join(result.run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [m["step_landmarks"] for m in metrics] == [1.0, 1.0, 1.0]
    # 4 volumes / 4 samples per step: a new landmark every step, whose queue (8 slots) each step fills.
    fills = [m["bank_fill"] for m in metrics]
    assert fills[0] < fills[1] < fills[2]
