"""The views' device part (issue 29): GVSL's augmentation on the actors and on the device is one function of the
drawn parameters; its distribution matches the reference implementations (MONAI Rand3DElastic / Affine, numpy
Models Genesis); the training loop counts its time as data wait; resume stays exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Affine
from monai.transforms.utils import create_rotate, create_scale, create_shear, create_translate
from scipy import stats

from rayssl.data.genesis import in_painting, local_pixel_shuffling, out_painting
from rayssl.methods.base import VolumeInfo
from rayssl.methods.gvsl import GVSL, GVSLConfig
from rayssl.nn import augment

SHAPE = (24, 24, 24)
TINY = dict(input_size=(16, 16, 16), features=(4, 4, 8, 8, 16, 4), num_groups=2,
            elastic_sigma=(1.5, 2.0), elastic_magnitude=(0.0, 4.0), shuffle_blocks=50)


def _smooth(seed: int, shape=SHAPE) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    v = gaussian_filter(np.random.default_rng(seed).random(shape), 1.5)
    return ((v - v.min()) / (v.max() - v.min())).astype(np.float32)


def _infos(n: int = 3) -> list[VolumeInfo]:
    return [VolumeInfo(index=i, id=f"v{i}", shape=(40, 36, 30), spacing=(1.0, 1.0, 1.0),
                       bbox=(4, 5, 6, 36, 30, 26), background=-1024.0, modality="CT") for i in range(n)]


def _samples(method: GVSL, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    infos, out = _infos(), []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        requests = method.plan(infos, i % len(infos), rng)
        crops = [(400.0 * _smooth(r.volume + 7 * i, r.size)).astype(np.float32) for r in requests]
        out.append(method.views(crops, requests, rng))
    return out


def _stack(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


class TestHash:
    def test_uniform_deterministic_and_seed_dependent(self):
        seeds = torch.tensor([0, 1, 2**40 + 3], dtype=torch.int64)
        u = augment.hash_uniform(seeds, 50_000)
        assert u.shape == (3, 50_000) and u.dtype == torch.float32
        assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
        torch.testing.assert_close(u, augment.hash_uniform(seeds, 50_000), rtol=0, atol=0)
        assert not torch.equal(u[0], u[1]) and not torch.equal(u[1], u[2])
        for row in u:  # U[0, 1): mean 1/2 (sd 1.3e-3 here), variance 1/12, no lag-1 correlation (sd 4.5e-3)
            assert abs(float(row.mean()) - 0.5) < 0.007 and abs(float(row.var()) - 1 / 12) < 0.003
            assert abs(float(np.corrcoef(row[:-1].numpy(), row[1:].numpy())[0, 1])) < 0.025


class TestTwoPathsAreOneFunction:
    @pytest.mark.parametrize("overrides", [
        dict(corruption="one_of"),
        dict(corruption="chain"),
        dict(corruption="chain", shuffle_prob=1.0, nonlinear_prob=1.0, inpaint_prob=0.5),  # out-painting too
        dict(corruption="chain", spatial_aug_prob=0.5, elastic_magnitude=(0.0, 0.0)),  # affine only / none
    ])
    def test_device_batch_equals_the_actor_path_for_the_same_parameters(self, overrides):
        on_actors = GVSL(GVSLConfig(**{**TINY, **overrides, "views_on": "actors"}))
        on_device = GVSL(GVSLConfig(**{**TINY, **overrides, "views_on": "device"}))
        finished = _samples(on_actors, 4)
        parts = _samples(on_device, 4)  # the same seeds: the same parameters
        assert set(finished[0]) == {"image_a", "image_a_corrupted", "image_b"}
        assert {"image_a", "image_b", "aug_affine", "aug_flags", "aug_seeds"} <= set(parts[0])
        assert "image_a_corrupted" not in parts[0]
        state = torch.random.get_rng_state()
        batch = on_device.device_views(_stack(parts), torch.device("cpu"))  # one batch of 4
        assert torch.equal(state, torch.random.get_rng_state())  # the device part draws nothing
        assert set(batch) == {"image_a", "image_a_corrupted", "image_b"}
        for key in finished[0]:
            np.testing.assert_allclose(batch[key].numpy(), np.stack([s[key] for s in finished]), atol=1e-5,
                                       err_msg=key)
        # A batch that is already finished passes unchanged; finish_views is the same function.
        assert on_device.device_views(batch, torch.device("cpu")) is batch
        np.testing.assert_allclose(on_device.finish_views(parts[0])["image_a_corrupted"],
                                   finished[0]["image_a_corrupted"], atol=1e-5)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    def test_cuda_equals_cpu(self):
        method = GVSL(GVSLConfig(**{**TINY, "views_on": "device"}))
        batch = _stack(_samples(method, 4))
        cpu = method.device_views(batch, torch.device("cpu"))
        gpu = method.device_views(batch, torch.device("cuda"))
        for key in cpu:
            torch.testing.assert_close(gpu[key].cpu(), cpu[key], atol=1e-4, rtol=0)


class TestSameDistributionAsTheReferences:
    def test_affine_geometry_is_monais(self):
        """For fixed rotation, shear, translation and scale, the warp equals MONAI's Affine (what
        RandAffine / Rand3DElastic apply) away from the border."""
        image = _smooth(1)
        rotate, shear, translate, scale = [0.2, -0.1, 0.15], [0.1, -0.05, 0.0, 0.08, -0.1, 0.02], [1.5, -2.0, 0.5], \
            [1.1, 0.9, 1.05]
        reference = Affine(rotate_params=rotate, shear_params=shear, translate_params=translate,
                           scale_params=scale, mode="bilinear", padding_mode="zeros", image_only=True)(
            torch.from_numpy(image)[None])
        matrix = create_rotate(3, rotate) @ create_shear(3, shear) @ create_translate(3, translate) @ create_scale(3, scale)
        dvf = augment.elastic_affine_dvf(SHAPE, torch.tensor(matrix, dtype=torch.float32)[None], torch.tensor([3.0]),
                                         torch.tensor([0.0]), torch.tensor([0]), tail=9)
        ours = augment.warp_stack(torch.from_numpy(image)[None, None], dvf)[0, 0]
        inner = (slice(5, -5),) * 3
        np.testing.assert_allclose(ours.numpy()[inner], np.asarray(reference)[0][inner], atol=1e-4)

    def test_elastic_displacements_match_rand3delastic(self):
        """RMS displacement per sample, MONAI's Rand3DElastic (read off a warped coordinate ramp) vs the
        hash-noise field, at fixed sigma and magnitude: the same distribution (KS test)."""
        from monai.transforms import Rand3DElastic

        sigma, magnitude, n = 3.0, 8.0, 40
        ramps = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in SHAPE], indexing="ij"))
        inner = (slice(None),) + (slice(8, -8),) * 3  # displacements stay under 8 voxels here
        elastic = Rand3DElastic(sigma_range=(sigma, sigma), magnitude_range=(magnitude, magnitude), prob=1.0,
                                mode="bilinear", padding_mode="border")
        monai_rms = []
        for seed in range(n):
            elastic.set_random_state(seed=seed)
            moved = torch.as_tensor(elastic(ramps)) - ramps
            monai_rms.append(float(moved[inner].pow(2).sum(0).mean().sqrt()))
        dvf = augment.elastic_affine_dvf(SHAPE, torch.eye(4).expand(n, 4, 4), torch.full((n,), sigma),
                                         torch.full((n,), magnitude), torch.arange(n) * 7919 + 1, tail=9)
        ours = dvf[inner[:1] + (slice(None),) + inner[1:]].pow(2).sum(1).mean(dim=(1, 2, 3)).sqrt().numpy()
        assert abs(ours.mean() / np.mean(monai_rms) - 1) < 0.1, (ours.mean(), np.mean(monai_rms))
        assert stats.ks_2samp(ours, monai_rms).pvalue > 1e-3

    def test_corruption_frequencies_match_models_genesis(self):
        """Share of voxels each corruption changes, numpy Models Genesis vs the parameters drawn for the
        device: in-painting, out-painting (fraction replaced by noise) and local shuffling."""
        n, shape = 60, (32, 32, 32)
        flat = np.full(shape, 0.5, dtype=np.float32)
        ramp = _smooth(2, shape)
        method = GVSL(GVSLConfig(**{**TINY, "input_size": shape, "shuffle_blocks": 200, "corruption": "chain", "shuffle_prob": 1.0, "nonlinear_prob": 0.0,
                                    "paint_prob": 1.0, "inpaint_prob": 0.5, "views_on": "device"}))
        draws = [method.draw_augmentation(np.random.default_rng(s)) for s in range(2 * n)]
        params = {k: torch.from_numpy(np.stack([d[k] for d in draws])) for k in draws[0]}
        flags = params["aug_flags"]
        painted = augment.paint(torch.from_numpy(flat).expand(2 * n, *shape), flags[:, 2], params["aug_paint_boxes"],
                                flags[:, 3], params["aug_seeds"][:, 2])
        changed = (painted != 0.5).float().mean(dim=(1, 2, 3)).numpy()
        mode = flags[:, 2].numpy()
        reference = {1: [float((in_painting(flat, np.random.default_rng(s)) != 0.5).mean()) for s in range(n)],
                     2: [float((out_painting(flat, np.random.default_rng(s)) != 0.5).mean()) for s in range(n)]}
        for kind in (1, 2):
            ours = changed[mode == kind]
            assert len(ours) > n / 2
            assert stats.ks_2samp(ours, reference[kind]).pvalue > 1e-3, kind
            assert abs(ours.mean() - np.mean(reference[kind])) < 0.05, kind
        block = method._shuffle_block()
        shuffled = augment.local_shuffle(torch.from_numpy(ramp).expand(2 * n, *shape).contiguous(), flags[:, 0],
                                         params["aug_shuffle_starts"], block, params["aug_seeds"][:, 1])
        ours = (shuffled.numpy() != ramp).mean(axis=(1, 2, 3))
        theirs = [(local_pixel_shuffling(ramp, np.random.default_rng(s), num_blocks=200, block_size=block) != ramp).mean()
                  for s in range(n)]
        assert abs(ours.mean() / np.mean(theirs) - 1) < 0.05, (ours.mean(), np.mean(theirs))
        # The values only move: each shuffled volume holds the input's values, block by block.
        assert np.isin(shuffled[0].numpy(), ramp).all()

    def test_nonlinear_is_np_interp_through_the_bezier_curve(self):
        from rayssl.data.genesis import bezier_intensity_curve

        x = _smooth(3, (16, 16, 16))
        rng = np.random.default_rng(4)
        controls = rng.random(4)
        xs, ys = bezier_intensity_curve(np.random.default_rng(4), n_points=100_000)  # same controls, same order
        ours = augment.nonlinear_intensity(torch.from_numpy(x)[None], torch.tensor([1]),
                                           torch.tensor(controls, dtype=torch.float32)[None])[0]
        np.testing.assert_allclose(ours.numpy(), np.interp(x, xs, ys), atol=1e-4)


def test_the_loop_counts_the_device_part_as_data_wait():
    """rayssl.train.loop.DeviceViews inside the data-wait meter: the device part's seconds are part of
    the wait the meter reports, and the window reports them."""
    from rayssl.train.loop import DeviceViews
    from rayssl.train.stall import DataWaitMeter

    method = GVSL(GVSLConfig(**{**TINY, "views_on": "device"}))
    batches = [_stack(_samples(method, 2, seed=s)) for s in range(3)]
    meter, part = DataWaitMeter(), DeviceViews(method, torch.device("cpu"))
    seen = list(meter.timed(part.stream(batches, skip=1)))
    assert "aug_affine" in seen[0] and "image_a_corrupted" in seen[1] and "image_a_corrupted" in seen[2]
    assert part.batches == 2 and 0 < part.seconds <= meter.wait_s
    window = part.window()
    assert window["device_views_s"] > 0 and window["device_views_s_per_batch"] == pytest.approx(window["device_views_s"] / 2)
    fields = meter.window(elapsed_s=meter.wait_s + 1.0, samples=6)
    assert fields["data_wait_s"] >= window["device_views_s"]
    # A method without a device part: nothing applied, nothing reported.
    plain = GVSL(GVSLConfig(**{**TINY, "views_on": "actors"}))
    part = DeviceViews(plain, torch.device("cpu"))
    finished = [_stack(_samples(plain, 2))]
    assert list(part.stream(finished))[0] is finished[0] and part.window() == {}


def test_resume_with_device_views_replays_the_uninterrupted_run_exactly(tiny_store):
    """Views from the data actors' ViewBuilder carry their parameters; the device part is a function of
    them, so 2 steps + checkpoint + 1 step equal 3 steps, bit for bit."""
    from helpers import resumed_losses_equal_uninterrupted
    from rayssl.config import resolve_config

    cfg = resolve_config(method="gvsl", profile="cpu", overrides=[
        "input_size=[16,16,16]", "features=[4,4,8,8,16,4]", "num_groups=2", "elastic_sigma=[1.5,2.0]",
        "elastic_magnitude=[0,4]", "shuffle_blocks=50", "views_on=device", "train.steps=3", "train.amp=false"])

    def make_batch(method, samples):
        assert "aug_affine" in samples[0]
        return method.device_views(_stack([{k: v for k, v in s.items() if k != "sample"} for s in samples]),
                                   torch.device("cpu"))

    full, resumed = resumed_losses_equal_uninterrupted(cfg, tiny_store, make_batch)
    assert resumed == full
