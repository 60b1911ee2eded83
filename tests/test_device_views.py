"""The views' device part (issue 29): GVSL's and DrasCLR's augmentations on the actors and on the device are one
function of the drawn parameters; their distribution matches the reference implementations (MONAI Rand3DElastic /
Affine / RandAffine / AdjustContrast, numpy Models Genesis); the training loop counts its time as data wait;
resume stays exact."""

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


def _device_batch(method, samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """ViewBuilder samples carrying their augmentation parameters -> the batch the training loop gives the model."""
    assert "aug_affine" in samples[0]
    return method.device_views(_stack([{k: v for k, v in s.items() if k != "sample"} for s in samples]),
                               torch.device("cpu"))


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

    def test_uniform_values_are_pinned(self):
        """The values themselves: runs resume exactly only while the hash stays the same function (the
        in-place rewrite of 6ce3347 kept it bit for bit); these are its first values for two seeds."""
        u = augment.hash_uniform(torch.tensor([0, 2**62 - 1], dtype=torch.int64), 4)
        assert (u * 2**24).to(torch.int64).tolist() == [[10012722, 1929323, 13242876, 4099729],
                                                          [7126793, 6897570, 8060874, 7126636]]


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

    full, resumed = resumed_losses_equal_uninterrupted(cfg, tiny_store, _device_batch)
    assert resumed == full


# ---- DrasCLR: RandAffine, RandGaussianNoise, RandAdjustContrast of each landmark patch (issue 29) ----------------


def _drasclr(**overrides):
    from rayssl.methods.drasclr import DrasCLR, DrasCLRConfig
    from test_drasclr import TINY as DRASCLR_TINY

    return DrasCLR(DrasCLRConfig(**{**DRASCLR_TINY, **overrides}))


def _drasclr_samples(method, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Samples as the data actors build them, from smooth HU patches (the crops of the plan's boxes)."""
    from test_drasclr import _volumes

    volumes, out = _volumes(), []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        requests = method.plan(volumes, i % len(volumes), rng)
        crops = [(1400.0 * _smooth(3 * i + k, r.size) - 1100.0).astype(np.float32) for k, r in enumerate(requests)]
        out.append(method.views(crops, requests, rng))
    return out


class TestDrasCLRDeviceViews:
    @pytest.mark.parametrize("overrides", [
        dict(),  # the official probabilities (noise and contrast 0.25 each)
        dict(noise_prob=1.0, contrast_prob=1.0),
        dict(noise_prob=0.0, contrast_prob=0.0, affine_rotate_deg=0.0, affine_translate=0.0, affine_scale=0.0),
    ])
    def test_device_batch_equals_the_actor_path_for_the_same_parameters(self, overrides):
        on_actors = _drasclr(**overrides, views_on="actors")
        on_device = _drasclr(**overrides, views_on="device")
        finished, parts = _drasclr_samples(on_actors, 6), _drasclr_samples(on_device, 6)  # same seeds, same parameters
        views = {"view_q", "view_k", "neighbors"}
        assert views <= set(finished[0]) and not any(k.startswith("aug_") for k in finished[0])
        assert {"view_q", "neighbors", "aug_affine", "aug_flags", "aug_values", "aug_seeds", "aug_half"} <= set(parts[0])
        assert "view_k" not in parts[0]
        state = torch.random.get_rng_state()
        batch = on_device.device_views(_stack(parts), torch.device("cpu"))  # one batch of 6
        assert torch.equal(state, torch.random.get_rng_state())  # the device part draws nothing
        assert set(batch) == set(finished[0])
        for key in finished[0]:
            np.testing.assert_allclose(batch[key].numpy(), np.stack([s[key] for s in finished]), atol=1e-5,
                                       err_msg=key)
        assert on_device.device_views(batch, torch.device("cpu")) is batch
        np.testing.assert_allclose(on_device.finish_views(parts[0])["view_k"], finished[0]["view_k"], atol=1e-5)
        if not overrides:  # two independent augmentations of one patch
            assert not np.allclose(batch["view_q"].numpy(), batch["view_k"].numpy())

    def test_preview_finishes_device_views(self):
        """`rayssl preview` gets the actor's sample: preview_geometry applies the device part itself."""
        from test_drasclr import _volumes

        figures = []
        for on in ("actors", "device"):
            method = _drasclr(views_on=on)
            sample = _drasclr_samples(method, 1)[0]
            rng = np.random.default_rng([0, 0])
            figures.append(method.preview_geometry(_volumes(), method.plan(_volumes(), 0, rng), sample))
        assert [i.title for i in figures[0].images] == [i.title for i in figures[1].images]
        for a, b in zip(figures[0].images, figures[1].images):
            np.testing.assert_allclose(a.image, b.image, atol=1e-5)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    def test_cuda_equals_cpu(self):
        method = _drasclr(views_on="device", noise_prob=1.0, contrast_prob=1.0, patch_size=32)
        batch = _stack(_drasclr_samples(method, 4))
        cpu = method.device_views(batch, torch.device("cpu"))
        gpu = method.device_views(batch, torch.device("cuda"))
        for key in ("view_q", "view_k", "neighbors"):
            torch.testing.assert_close(gpu[key].cpu(), cpu[key], atol=1e-4, rtol=0)

    def test_fixed_parameters_give_monais_affine_and_adjust_contrast(self):
        """One augmentation with given parameters: MONAI's Affine (what RandAffine applies: bilinear, border
        padding) then AdjustContrast, then the [-1, 1] scaling; noise with std 0 changes nothing."""
        from monai.transforms import AdjustContrast

        method = _drasclr(views_on="device", patch_size=16)
        patch = (1264.0 * _smooth(4, (16, 16, 16))).astype(np.float32)
        rotate, translate, scale, gamma, half = [0.12, -0.1, 0.15], [2.5, -4.0, 1.0], [1.08, 0.93, 1.02], 2.2, 632.0
        matrix = create_rotate(3, rotate) @ create_translate(3, translate) @ create_scale(3, scale)
        sample = {"view_q": patch[None], "neighbors": np.stack([patch, patch[::-1].copy()])[:, None],
                  "aug_affine": np.stack([matrix] * 3).astype(np.float32),
                  "aug_flags": np.array([[1, 1]] * 3), "aug_values": np.array([[0.0, gamma]] * 3, dtype=np.float32),
                  "aug_seeds": np.array([1, 2, 3]), "aug_half": np.array([half], dtype=np.float32)}
        done = method.finish_views(sample)
        affine = Affine(rotate_params=rotate, translate_params=translate, scale_params=scale, mode="bilinear",
                        padding_mode="border", image_only=True)
        reference = np.asarray(AdjustContrast(gamma)(affine(torch.from_numpy(patch)[None]))) / half - 1.0
        np.testing.assert_allclose(done["view_q"], reference, atol=2e-5)
        np.testing.assert_allclose(done["view_k"], reference, atol=2e-5)
        # The neighbours are one two-channel image: one warp, and one min / range for the contrast.
        both = np.asarray(AdjustContrast(gamma)(affine(torch.from_numpy(sample["neighbors"][:, 0])))) / half - 1.0
        np.testing.assert_allclose(done["neighbors"][:, 0], both, atol=2e-5)

    def test_parameters_have_the_distribution_of_monais_transforms(self):
        """Many samples' drawn parameters against MONAI's own draws (RandAffine's matrix entries, KS test) and
        the noise / contrast frequencies and ranges against RandGaussianNoise / RandAdjustContrast's."""
        import math

        from monai.transforms import RandAffine

        method = _drasclr(views_on="device", patch_size=32)
        cfg, n = method.config, 600
        rng = np.random.default_rng(11)
        drawn = [method.draw_augmentation(rng) for _ in range(n)]
        ours = np.concatenate([d["aug_affine"] for d in drawn])  # [3n, 4, 4]
        reference = RandAffine(prob=1.0, spatial_size=(32,) * 3, translate_range=(cfg.affine_translate * 32,) * 3,
                               rotate_range=(math.radians(cfg.affine_rotate_deg),) * 3,
                               scale_range=(cfg.affine_scale,) * 3, padding_mode="border")
        reference.set_random_state(seed=3)
        theirs = []
        for _ in range(3 * n):
            reference.randomize()
            # RandAffine's matrix does not depend on the grid's size: a 2^3 grid makes it cheaply.
            reference.rand_affine_grid(spatial_size=(2, 2, 2), randomize=False)
            theirs.append(np.asarray(reference.rand_affine_grid.get_transformation_matrix(), dtype=np.float64))
        theirs = np.stack(theirs)
        for i in range(3):
            for j in range(4):
                assert stats.ks_2samp(ours[:, i, j], theirs[:, i, j]).pvalue > 1e-3, (i, j)
        flags = np.concatenate([d["aug_flags"] for d in drawn])
        values = np.concatenate([d["aug_values"] for d in drawn])
        for column, p in ((0, cfg.noise_prob), (1, cfg.contrast_prob)):  # binomial sd sqrt(p(1-p)/3n) = 0.01
            assert abs(flags[:, column].mean() - p) < 0.04, column
        assert 0.0 <= values[:, 0].min() and values[:, 0].max() <= cfg.noise_std
        assert abs(values[:, 0].mean() - cfg.noise_std / 2) < 0.05 * cfg.noise_std  # U(0, std): sd 0.012 std
        low, high = cfg.contrast_gamma
        assert low <= values[:, 1].min() and values[:, 1].max() <= high
        assert abs(values[:, 1].mean() - (low + high) / 2) < 0.05 * (high - low)
        assert len({int(s) for d in drawn for s in d["aug_seeds"]}) == 3 * n

    def test_noise_std_on_the_patch_matches_the_drawn_std(self):
        """The applied noise (device part, contrast off, identity affine): zero mean, sd the drawn std."""
        method = _drasclr(views_on="device", patch_size=32)
        patch = np.full((1, 32, 32, 32), 500.0, np.float32)
        eye = np.stack([np.eye(4)] * 3).astype(np.float32)
        sample = {"view_q": patch, "neighbors": np.stack([patch, patch]), "aug_affine": eye,
                  "aug_flags": np.array([[1, 0], [1, 0], [0, 0]]),
                  "aug_values": np.array([[40.0, 1.0], [10.0, 1.0], [40.0, 1.0]], dtype=np.float32),
                  "aug_seeds": np.array([5, 6, 7]), "aug_half": np.array([500.0], dtype=np.float32)}
        done = method.finish_views(sample)
        for key, std in (("view_q", 40.0), ("view_k", 10.0)):
            noise = (done[key] + 1.0) * 500.0 - 500.0
            assert abs(noise.mean()) < 0.02 * std and abs(noise.std() / std - 1.0) < 0.02, key
        np.testing.assert_allclose(done["neighbors"], 0.0, atol=1e-5)  # noise off: the flat patch, exactly

    def test_resume_with_device_views_replays_the_uninterrupted_run_exactly(self, demo_store_path):
        from helpers import resumed_losses_equal_uninterrupted
        from rayssl.config import resolve_config
        from test_drasclr import TINY as DRASCLR_TINY

        sets = [f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in DRASCLR_TINY.items() if k != "widths"]
        cfg = resolve_config(method="drasclr", profile="cpu", overrides=[
            *sets, "widths=[4,4,4,8,8]", "views_on=device", "noise_prob=0.5", "contrast_prob=0.5",
            "train.steps=3", "train.amp=false"])

        full, resumed = resumed_losses_equal_uninterrupted(cfg, demo_store_path, _device_batch)
        assert resumed == full
