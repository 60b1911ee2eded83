"""Tests of VoCo: geometry and labels, views, both loss forms, gradients, EMA teacher, export."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
import torch
from monai.networks.nets import BasicUNet, SwinUNETR

from helpers import load_export
from rayssl.data.read import read_box
from rayssl.methods import get_method_class
from rayssl.methods.base import ReadRequest, VolumeInfo
from rayssl.methods.voco import (
    VoCo,
    VoCoConfig,
    base_boxes,
    position_labels,
    region_start,
    voco_official_loss,
    voco_paper_loss,
)

torch.set_num_threads(2)

TINY_UNET = (4, 4, 8, 8, 16, 4)


def tiny_config(**overrides) -> VoCoConfig:
    """Small views + network: 64x64x32 region, 2x2 bases of 32^3, 2 random crops, tiny UNet."""
    base = dict(backbone="unet", unet_features=TINY_UNET, proj_hidden_dim=16, proj_dim=8,
                region_size=(64, 64, 32), n_x=2, n_y=2, n_z=1, num_random_crops=2, input_size=32)
    base.update(overrides)
    return VoCoConfig(**base)


def volume(shape=(80, 80, 40), bbox=None, modality="CT", background=-1024.0) -> VolumeInfo:
    bbox = bbox or (0, 0, 0, *shape)
    return VolumeInfo(index=0, id="vol0", shape=shape, spacing=(1.0, 1.0, 1.0), bbox=bbox,
                      background=background, modality=modality)


def brute_force_labels(starts: np.ndarray, crop_size, region_size, grid) -> np.ndarray:
    """Label each region voxel with its base id, then count the ids under each random crop."""
    ids = np.full(region_size, -1, dtype=np.int64)
    for b, (s, z) in enumerate(base_boxes(region_size, grid)):
        ids[s[0]:s[0] + z[0], s[1]:s[1] + z[1], s[2]:s[2] + z[2]] = b
    assert (ids >= 0).all(), "base crops must tile the region"
    n = int(np.prod(grid))
    rows = []
    for s in starts:
        window = ids[s[0]:s[0] + crop_size[0], s[1]:s[1] + crop_size[1], s[2]:s[2] + crop_size[2]]
        rows.append(np.bincount(window.ravel(), minlength=n) / window.size)
    return np.array(rows)


# ---------------------------------------------------------------------------------------------
class TestConfig:
    def test_registry_and_profiles_validate(self):
        assert get_method_class("voco") is VoCo
        for name in VoCo.profiles:
            cfg = VoCo.profile_config(name)
            assert cfg.num_bases == 16, name

    @pytest.mark.parametrize("field, value", [
        ("n_x", 7), ("n_y", 1), ("n_z", 0), ("n_xy", 6), ("lambda_reg", -0.5), ("teacher_momentum", 1.5),
        ("num_random_crops", 0), ("input_size", 8), ("backbone", "vit"), ("loss_form", "infonce"),
    ])
    def test_bad_value_names_field(self, field, value):
        with pytest.raises(pydantic.ValidationError, match=field):
            tiny_config(**{field: value})
        cfg = tiny_config()
        with pytest.raises(pydantic.ValidationError, match=field):
            setattr(cfg, field, value)

    def test_cross_field_errors(self):
        with pytest.raises(pydantic.ValidationError, match="multiple of 32"):
            tiny_config(backbone="swin", feature_size=12, input_size=48)
        with pytest.raises(pydantic.ValidationError, match=">= 64"):
            tiny_config(backbone="swin", feature_size=12, input_size=32, feature_pooling="multiscale")
        with pytest.raises(pydantic.ValidationError, match="region_size"):
            tiny_config(region_size=(12, 64, 32), n_x=4)
        with pytest.raises(pydantic.ValidationError, match="teacher"):
            tiny_config(loss_form="paper", export_weights="teacher")
        with pytest.raises(pydantic.ValidationError, match="extra"):
            tiny_config(lambda_typo=1.0)

    def test_paper_profile_follows_table_9(self):
        """Paper profile: 1.5 mm stores, no intensity shift (Table 9: rotate and flip), Eq. 5 as the
        pair mean; the official and cpu profiles keep the store's spacing and the official shift."""
        paper, official, cpu = (VoCo.profile_config(p) for p in ("paper", "official", "cpu"))
        assert paper.spacing_mm == 1.5 and official.spacing_mm is None and cpu.spacing_mm is None
        assert paper.shift_intensity_prob == 0.0 and official.shift_intensity_prob == cpu.shift_intensity_prob == 0.1
        assert paper.reg_reduction == cpu.reg_reduction == "pair_mean"

    def test_spacing_mm_refuses_other_spacings_naming_the_volume(self):
        from dataclasses import replace

        method = VoCo(tiny_config(spacing_mm=1.5))
        coarse = volume()  # 1 mm
        with pytest.raises(ValueError, match=r"volume 'vol0' has spacing \(1.0, 1.0, 1.0\) mm.*--spacing 1.5"):
            method.check_volumes([coarse])
        method.check_volumes([replace(coarse, spacing=(1.5, 1.5, 1.5)), replace(coarse, spacing=(1.51, 1.5, 1.49))])
        VoCo(tiny_config()).check_volumes([coarse])  # None: any spacing
        with pytest.raises(pydantic.ValidationError, match="spacing_mm"):
            tiny_config(spacing_mm=0.0)

    def test_n_xy_sets_square_grid(self):
        cfg = tiny_config(n_xy=3, region_size=(96, 96, 32))
        assert cfg.grid == (3, 3, 1) and cfg.num_bases == 9


# ---------------------------------------------------------------------------------------------
class TestGeometry:
    @pytest.mark.parametrize("region, grid", [((64, 64, 32), (2, 2, 1)), ((23, 17, 9), (5, 3, 2)), ((384, 384, 96), (5, 5, 1))])
    def test_labels_match_voxel_count_and_sum_to_one(self, region, grid):
        rng = np.random.default_rng(1)
        crop = tuple(max(1, round(r / n)) for r, n in zip(region, grid))
        starts = np.stack([rng.integers(0, r - c + 1, size=12) for r, c in zip(region, crop)], axis=1)
        labels = position_labels(starts, crop, region, grid)
        if max(region) <= 64:
            np.testing.assert_allclose(labels, brute_force_labels(starts, crop, region, grid), atol=1e-6)
        np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-6)
        assert labels.shape == (12, int(np.prod(grid))) and labels.dtype == np.float32

    def test_aligned_crop_is_one_hot(self):
        # A random crop placed exactly on base (1, 0, 0) of a 2x2x1 grid belongs only to base index 2.
        labels = position_labels(np.array([[32, 0, 0]]), (32, 32, 32), (64, 64, 32), (2, 2, 1))
        np.testing.assert_array_equal(labels[0], [0, 0, 1, 0])
        # Shifted by 8 voxels in x and y: overlaps 24*24, 24*8, 8*24, 8*8 out of 32*32.
        labels = position_labels(np.array([[8, 8, 0]]), (32, 32, 32), (64, 64, 32), (2, 2, 1))
        np.testing.assert_allclose(labels[0], np.array([576, 192, 192, 64]) / 1024)

    def test_region_start_inside_and_covering(self):
        rng = np.random.default_rng(0)
        for _ in range(50):
            start = region_start((10, 20, 5, 110, 60, 45), (128, 128, 64), (64, 64, 32), rng)
            # x and z: the region fits in the box (100 >= 64, 40 >= 32) -> inside it.
            assert 10 <= start[0] <= 110 - 64
            assert 60 - 64 <= start[1] <= 20  # larger than the box along y: covers it
            assert 5 <= start[2] <= 45 - 32


# ---------------------------------------------------------------------------------------------
class TestViews:
    def test_shapes_dtypes_labels(self):
        cfg = tiny_config(region_size=(48, 48, 16), flip_prob=0.0, rot90_prob=0.0, shift_intensity_prob=0.0)
        method = VoCo(cfg)
        rng = np.random.default_rng(3)
        vol = volume()
        image = rng.normal(0, 300, size=vol.shape).astype(np.float32)
        requests = method.plan([vol], 0, rng)
        assert len(requests) == 1 and requests[0].size == (48, 48, 16)
        region = read_box(image, requests[0].start, requests[0].size, vol.background, np.float32)
        views = method.views([region], requests, rng)
        assert views["bases"].shape == (4, 1, 32, 32, 32) and views["bases"].dtype == np.float32
        assert views["randoms"].shape == (2, 1, 32, 32, 32) and views["randoms"].dtype == np.float32
        assert views["labels"].shape == (2, 4) and views["labels"].dtype == np.float32
        assert views["random_starts"].dtype == np.int64
        np.testing.assert_allclose(views["labels"].sum(axis=1), 1.0, atol=1e-6)
        expected = brute_force_labels(views["random_starts"], cfg.base_size, cfg.region_size, cfg.grid)
        np.testing.assert_allclose(views["labels"], expected, atol=1e-6)
        for key in ("bases", "randoms"):  # CT window [-175, 250] HU -> [0, 1]
            assert views[key].min() >= 0.0 and views[key].max() <= 1.0

    def test_crops_are_the_right_region_parts(self):
        # No resize (bases 32^3 = input), no augmentation: crops must equal windowed slices of the region.
        cfg = tiny_config(flip_prob=0.0, rot90_prob=0.0, shift_intensity_prob=0.0)
        method = VoCo(cfg)
        rng = np.random.default_rng(5)
        region = rng.uniform(-175, 250, size=(64, 64, 32)).astype(np.float32)
        request = ReadRequest(volume=0, start=(0, 0, 0), size=(64, 64, 32))
        original = region.copy()
        views = method.views([region], [request], rng)
        np.testing.assert_array_equal(region, original)  # the caller's crop is not modified
        windowed = (region + 175) / 425
        np.testing.assert_allclose(views["bases"][1, 0], windowed[0:32, 32:64, 0:32], atol=1e-6)
        s = views["random_starts"][0]
        np.testing.assert_allclose(views["randoms"][0, 0], windowed[s[0]:s[0] + 32, s[1]:s[1] + 32, 0:32], atol=1e-6)

    def test_region_larger_than_volume_is_padded(self):
        cfg = tiny_config(flip_prob=0.0, rot90_prob=0.0, shift_intensity_prob=0.0)
        method = VoCo(cfg)
        vol = volume(shape=(16, 16, 16), bbox=(2, 2, 2, 14, 14, 14))
        image = np.full(vol.shape, 100.0, dtype=np.float32)
        for seed in range(5):
            rng = np.random.default_rng(seed)
            (request,) = method.plan([vol], 0, rng)
            assert request.size == (64, 64, 32)
            for axis in range(3):  # the region covers the whole foreground box
                assert request.start[axis] <= 2 and request.start[axis] + request.size[axis] >= 14
            region = read_box(image, request.start, request.size, vol.background, np.float32)
            views = method.views([region], [request], rng)
            assert views["bases"].shape == (4, 1, 32, 32, 32)
            values = np.unique(np.concatenate([views["bases"].ravel(), views["randoms"].ravel()]))
            assert values.min() == 0.0  # background -1024 HU -> 0
            assert np.isclose(values.max(), 275 / 425)  # the volume's 100 HU is somewhere in the region
            np.testing.assert_allclose(views["labels"].sum(axis=1), 1.0, atol=1e-6)

    def test_foreground_resize_mode(self):
        method = VoCo(tiny_config(region_mode="foreground_resize"))
        vol = volume(shape=(40, 30, 20), bbox=(5, 5, 2, 35, 25, 18))
        rng = np.random.default_rng(0)
        (request,) = method.plan([vol], 0, rng)
        assert request.start == (5, 5, 2) and request.size == (30, 20, 16)
        crop = np.zeros(request.size, dtype=np.float32)
        views = method.views([crop], [request], rng)
        assert views["bases"].shape == (4, 1, 32, 32, 32) and views["labels"].shape == (2, 4)

    def test_deterministic_given_rng(self):
        method = VoCo(tiny_config(region_size=(48, 48, 16)))
        vol = volume()
        image = np.random.default_rng(0).normal(0, 300, size=vol.shape).astype(np.float32)
        outs = []
        for _ in range(2):
            rng = np.random.default_rng(42)
            requests = method.plan([vol], 0, rng)
            region = read_box(image, requests[0].start, requests[0].size, vol.background, np.float32)
            outs.append(method.views([region], requests, rng))
        for key in outs[0]:
            np.testing.assert_array_equal(outs[0][key], outs[1][key])

    def test_mr_percentile_and_modality_check(self):
        with pytest.raises(ValueError, match="vol0"):
            VoCo(tiny_config()).check_volumes([volume(modality="MR")])
        method = VoCo(tiny_config(intensity="percentile", shift_intensity_prob=0.0))
        method.check_volumes([volume(modality="MR")])
        rng = np.random.default_rng(0)
        region = rng.gamma(2.0, 200.0, size=(64, 64, 32)).astype(np.float32)
        views = method.views([region], [ReadRequest(0, (0, 0, 0), (64, 64, 32))], rng)
        assert views["bases"].min() >= 0.0 and views["bases"].max() <= 1.0

    def test_percentile_scaling_matches_monai_on_the_region(self):
        from monai.transforms import ScaleIntensityRangePercentiles

        cfg = tiny_config(intensity="percentile", percentiles=(2.0, 98.0), flip_prob=0.0, rot90_prob=0.0,
                          shift_intensity_prob=0.0)
        region = np.random.default_rng(1).gamma(2.0, 200.0, size=(64, 64, 32)).astype(np.float32)
        views = VoCo(cfg).views([region], [ReadRequest(0, (0, 0, 0), (64, 64, 32))], np.random.default_rng(0))
        expected = np.asarray(ScaleIntensityRangePercentiles(lower=2.0, upper=98.0, b_min=0.0, b_max=1.0,
                                                             clip=True)(region[None]))[0]
        np.testing.assert_allclose(views["bases"][0, 0], expected[0:32, 0:32, 0:32], atol=1e-5)

    @pytest.mark.parametrize("mode,intensity", [("crop", "ct_window"), ("crop", "percentile"),
                                                ("foreground_resize", "ct_window")])
    def test_store_dtype_region_gives_the_float_views(self, mode, intensity):
        """Regions arrive as int16 HU (read_dtype None): the views equal those of the float32 region."""
        assert VoCo.read_dtype is None
        method = VoCo(tiny_config(region_mode=mode, intensity=intensity, region_size=(48, 48, 16)))
        region = np.random.default_rng(2).integers(-1024, 1500, size=(52, 44, 20)).astype(np.int16)
        if mode == "crop":
            region = region[:48, :44, :16]
            region = np.concatenate([region, region[:, :4]], axis=1)  # 48 x 48 x 16
        request = ReadRequest(0, (0, 0, 0), region.shape)
        a = method.views([region], [request], np.random.default_rng(9))
        b = method.views([region.astype(np.float32)], [request], np.random.default_rng(9))
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=1e-6)


# ---------------------------------------------------------------------------------------------
class TestLosses:
    def test_paper_loss_hand_computed(self):
        # p = (1, 0); q1 = (1, 0), q2 = (3, 4): l = (1, 0.6); y = (0.75, 0.25): |y - l| = (0.25, 0.35).
        p = torch.tensor([[[1.0, 0.0]]])
        q = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])
        y = torch.tensor([[[0.75, 0.25]]])
        out = voco_paper_loss(p, q, y, lambda_reg=0.5)
        pred = -(math.log(0.75) + math.log(0.65)) / 2
        reg = 0.6  # |cos(q1, q2)|, one pair
        assert out["pred"].item() == pytest.approx(pred, abs=1e-6)
        assert out["reg"].item() == pytest.approx(reg, abs=1e-6)
        assert out["loss"].item() == pytest.approx(pred + 0.5 * reg, abs=1e-6)

    def test_paper_loss_regulariser_is_mean_abs_over_pairs(self):
        # Three bases (1,0), (0,1), (-1,1)/sqrt2: |cos| pairs = 0, 1/sqrt2, 1/sqrt2 -> mean sqrt2/3.
        q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]])
        p = torch.tensor([[[1.0, 0.0]]])
        y = torch.tensor([[[1.0, 0.0, 0.0]]])
        out = voco_paper_loss(p, q, y)
        assert out["reg"].item() == pytest.approx(math.sqrt(2) / 3, abs=1e-6)
        # l = (1, 0, -1/sqrt2); |y - l| = (0, 0, 1/sqrt2)
        assert out["pred"].item() == pytest.approx(-math.log(1 - 1 / math.sqrt(2)) / 3, abs=1e-6)

    def test_literal_sum_reading_of_eq5_is_twice_the_pair_mean(self):
        # Eq. 5 as printed: 2/(n(n-1)) sum over ordered pairs i != j. Same three bases: the ordered
        # sum is 2 (0 + 1/sqrt2 + 1/sqrt2), times 2/(3*2) = 2 sqrt2/3 = twice the pair mean.
        q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]])
        p = torch.tensor([[[1.0, 0.0]]])
        y = torch.tensor([[[1.0, 0.0, 0.0]]])
        mean = voco_paper_loss(p, q, y, lambda_reg=1.0, reg_reduction="pair_mean")
        literal = voco_paper_loss(p, q, y, lambda_reg=1.0, reg_reduction="literal_sum")
        assert literal["reg"].item() == pytest.approx(2 * math.sqrt(2) / 3, abs=1e-6)
        assert literal["pred"].item() == pytest.approx(mean["pred"].item())
        # literal_sum with lambda = pair_mean with 2 lambda, also over a random batch.
        torch.manual_seed(0)
        p, q = torch.randn(3, 2, 8), torch.randn(3, 5, 8)
        y = torch.softmax(torch.randn(3, 2, 5), dim=-1)
        a = voco_paper_loss(p, q, y, lambda_reg=0.7, reg_reduction="literal_sum")
        b = voco_paper_loss(p, q, y, lambda_reg=1.4, reg_reduction="pair_mean")
        assert a["loss"].item() == pytest.approx(b["loss"].item(), rel=1e-6)
        with pytest.raises(ValueError, match="reg_reduction"):
            voco_paper_loss(p, q, y, reg_reduction="sum")

    def test_reg_reduction_reaches_the_method_loss_and_needs_the_paper_form(self):
        with pytest.raises(pydantic.ValidationError, match="reg_reduction"):
            tiny_config(loss_form="official", reg_reduction="literal_sum")
        outputs = {"random": torch.randn(2, 2, 8), "bases": torch.randn(2, 4, 8)}
        batch = {"labels": torch.softmax(torch.randn(2, 2, 4), dim=-1)}
        mean = VoCo(tiny_config(loss_form="paper")).loss(outputs, batch)
        literal = VoCo(tiny_config(loss_form="paper", reg_reduction="literal_sum")).loss(outputs, batch)
        assert literal["reg"].item() == pytest.approx(2 * mean["reg"].item(), rel=1e-6)

    def test_paper_loss_is_finite_when_cosine_is_negative(self):
        p = torch.tensor([[[1.0, 0.0]]], requires_grad=True)
        q = torch.tensor([[[-1.0, 0.0], [0.0, 1.0]]], requires_grad=True)
        y = torch.tensor([[[1.0, 0.0]]])  # |y - l| = 2 for base 0: clamped inside the log
        out = voco_paper_loss(p, q, y, log_eps=1e-6)
        assert torch.isfinite(out["loss"])
        assert out["pred"].item() == pytest.approx(-(math.log(1e-6) + math.log(1.0)) / 2, rel=1e-5)
        out["loss"].backward()
        assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()

    def test_paper_loss_stops_gradient_of_bases_in_prediction(self):
        p = torch.tensor([[[1.0, 0.2]]], requires_grad=True)
        q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], requires_grad=True)  # orthogonal: reg gradient 0
        voco_paper_loss(p, q, torch.tensor([[[0.5, 0.5]]]), lambda_reg=0.0)["loss"].backward()
        assert p.grad.abs().sum() > 0
        assert q.grad is None or q.grad.abs().sum() == 0

    def test_official_loss_hand_computed(self):
        # Student random crop (0.6, 0.8), teacher random crop (1, 0); bases (student) and (teacher):
        xs = torch.tensor([[[0.6, 0.8]]])
        xt = torch.tensor([[[1.0, 0.0]]])
        bs = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [0.0, 1.0]]])
        bt = torch.tensor([[[1.0, 0.0], [-3.0, 4.0], [0.0, -1.0]]])
        y = torch.tensor([[[0.75, 0.25, 0.0]]])
        # logits1 = relu(cos(xs, bt)) = relu(0.6, 0.28, -0.8) = (0.6, 0.28, 0)
        # logits2 = relu(cos(xt, bs)) = relu(1, 0.6, 0) = (1, 0.6, 0)
        l = [(0.6 + 1.0) / 2, (0.28 + 0.6) / 2, 0.0]
        pos = -(0.75 * math.log(1 - abs(0.75 - l[0]) + 1e-6) + 0.25 * math.log(1 - abs(0.25 - l[1]) + 1e-6)) / (1 + 1e-6)
        neg = l[2] ** 2 / (1 + 1e-6)
        # regulariser on student bases: relu(cos)^2 of pairs (0.6, 0, 0.8) -> (0.36 + 0 + 0.64) / 3
        reg = 1.0 / 3
        out = voco_official_loss(xs, bs, xt, bt, y, lambda_reg=2.0)
        assert out["pos"].item() == pytest.approx(pos, abs=1e-6)
        assert out["neg"].item() == pytest.approx(neg, abs=1e-6)
        assert out["reg"].item() == pytest.approx(reg, abs=1e-6)
        assert out["loss"].item() == pytest.approx(pos + neg + 2.0 * reg, abs=1e-6)

    def test_official_negative_term_and_batch_mean(self):
        # Sample 0 as above but teacher random crop (0, 1): base 2 gets logit (0 + 1)/2 with y = 0.
        xs = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
        xt = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])
        bs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
        bt = bs.clone()
        y = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
        out = voco_official_loss(xs, bs, xt, bt, y)
        # sample 0: logits = ((1 + 0)/2, (0 + 1)/2) = (0.5, 0.5); sample 1: (1, 0)
        pos0 = -math.log(1 - 0.5 + 1e-6) / (1 + 1e-6)
        pos1 = -math.log(1 + 1e-6) / (1 + 1e-6)
        neg0, neg1 = 0.25 / (1 + 1e-6), 0.0
        assert out["pos"].item() == pytest.approx((pos0 + pos1) / 2, abs=1e-6)
        assert out["neg"].item() == pytest.approx((neg0 + neg1) / 2, abs=1e-6)
        assert out["reg"].item() == pytest.approx(0.0, abs=1e-7)

    def test_official_regulariser_detaches_second_base(self):
        bs = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]], requires_grad=True)
        out = voco_official_loss(torch.tensor([[[1.0, 0.0]]]), bs, torch.tensor([[[1.0, 0.0]]]),
                                 bs.detach(), torch.tensor([[[1.0, 0.0]]]), lambda_reg=1.0)
        grad = torch.autograd.grad(out["reg"], bs)[0]
        # reg = ReLU(cos(q_0, sg(q_1)))^2: only the first base of the pair receives gradient.
        assert grad[0, 0].abs().sum() > 0 and grad[0, 1].abs().sum() == 0


# ---------------------------------------------------------------------------------------------
def make_batch(method: VoCo, batch_size: int, spatial=None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of `batch_size` samples from views() on random volumes (optionally other crop shapes)."""
    rng = np.random.default_rng(seed)
    vol = volume()
    samples = []
    for _ in range(batch_size):
        image = rng.normal(0, 300, size=vol.shape).astype(np.float32)
        requests = method.plan([vol], 0, rng)
        region = read_box(image, requests[0].start, requests[0].size, vol.background, np.float32)
        samples.append(method.views([region], requests, rng))
    batch = {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}
    if spatial is not None:  # smaller, non-cubic crops to keep the Swin test fast
        for key in ("bases", "randoms"):
            b, n = batch[key].shape[:2]
            batch[key] = torch.rand(b, n, 1, *spatial, generator=torch.Generator().manual_seed(seed))
    return batch


def assert_all_trainable_params_have_grad(model: torch.nn.Module) -> None:
    missing = [name for name, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient reached: {missing[:10]} ({len(missing)} total)"


class TestModel:
    @pytest.mark.parametrize("loss_form", ["paper", "official"])
    def test_unet_gradients_both_forms_batch_2(self, loss_form):
        torch.manual_seed(0)
        method = VoCo(tiny_config(loss_form=loss_form))
        model = method.build_model()
        batch = make_batch(method, batch_size=2)
        outputs = model(batch)
        assert outputs["random"].shape == (2, 2, 8) and outputs["bases"].shape == (2, 4, 8)
        losses = method.loss(outputs, batch)
        assert set(losses) == ({"loss", "pred", "reg"} if loss_form == "paper" else {"loss", "pos", "neg", "reg"})
        assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
        losses["loss"].backward()
        assert_all_trainable_params_have_grad(model)
        if loss_form == "official":
            assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
        else:
            assert model.teacher is None

    @pytest.mark.parametrize("loss_form, pooling", [("official", "multiscale"), ("paper", "deepest")])
    def test_swin_gradients(self, loss_form, pooling):
        torch.manual_seed(0)
        cfg = tiny_config(backbone="swin", feature_size=12, input_size=64, feature_pooling=pooling,
                          loss_form=loss_form, num_random_crops=1)
        method = VoCo(cfg)
        model = method.build_model()
        # 64x32x32 crops: SwinUNETR needs multiples of 32, multiscale needs > 1 voxel at 1/32 scale.
        # One sample (5 crops) keeps this fast; batch size 2 is covered by the UNet test.
        batch = make_batch(method, batch_size=1, spatial=(64, 32, 32))
        losses = method.loss(model(batch), batch)
        losses["loss"].backward()
        assert_all_trainable_params_have_grad(model)

    def test_teacher_ema_update_and_state(self):
        torch.manual_seed(0)
        method = VoCo(tiny_config(loss_form="official", teacher_momentum=0.9))
        model = method.build_model()
        teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
        with torch.no_grad():
            for p in model.student.parameters():
                p.add_(1.0)
        metrics = method.after_step(model, {}, step=0, total_steps=10)
        assert metrics == {"teacher_momentum": 0.9}
        student = model.student.state_dict()
        for key, value in model.teacher.state_dict().items():
            if value.is_floating_point():
                torch.testing.assert_close(value, 0.9 * teacher_before[key] + 0.1 * student[key])
        # The teacher is part of the model's state (checkpointed with it); the method has no extra state.
        assert any(k.startswith("teacher.") for k in model.state_dict())
        assert method.state_dict() == {}
        fresh = method.build_model()
        fresh.load_state_dict(model.state_dict())
        for (k, a), b in zip(model.teacher.state_dict().items(), fresh.teacher.state_dict().values()):
            torch.testing.assert_close(a, b, msg=k)
        method.load_state_dict(method.state_dict())

    def test_paper_form_after_step_is_noop(self):
        method = VoCo(tiny_config(loss_form="paper"))
        assert method.after_step(method.build_model(), {}, 0, 1) == {}


# ---------------------------------------------------------------------------------------------
class TestExport:
    def test_swin_multiscale_export_loads_into_swinunetr(self):
        method = VoCo(tiny_config(backbone="swin", feature_size=12, input_size=64, loss_form="official"))
        model = method.build_model()
        exported = method.export(model)
        assert exported.network == "monai.networks.nets.SwinUNETR"
        assert any(k.startswith("swinViT.") for k in exported.state_dict)
        assert any(k.startswith("encoder10.") for k in exported.state_dict)
        load_export(exported, SwinUNETR)

    def test_unet_export_loads_into_basicunet_and_teacher_export(self):
        method = VoCo(tiny_config(export_weights="teacher"))
        model = method.build_model()
        with torch.no_grad():
            for p in model.teacher.parameters():
                p.fill_(0.5)
        exported = method.export(model)
        assert exported.network == "monai.networks.nets.BasicUNet"
        assert all(k.split(".")[0] in ("conv_0", "down_1", "down_2", "down_3", "down_4") for k in exported.state_dict)
        assert all((v == 0.5).all() for k, v in exported.state_dict.items() if v.is_floating_point())
        load_export(exported, BasicUNet)

    def test_card(self):
        card = VoCo(VoCo.profile_config("official")).card()
        assert card["pretraining_patch_size"] == [64, 64, 64]
        assert card["recommended_downstream_patch_size"] == [96, 96, 96]
        assert card["base_crop_size"] == [96, 96, 96] and card["base_grid"] == [4, 4, 1]


# ---------------------------------------------------------------------------------------------
class TestPreparedRegions:
    """foreground_resize + prepare_regions: boxes resized once into a derived store, reused, same views."""

    def _setup(self, demo_store_path, tmp_path, **overrides):
        from rayssl.data.volumes import load_volumes

        cfg = tiny_config(region_mode="foreground_resize", prepared_store=str(tmp_path / "regions.zarr"), **overrides)
        method = VoCo(cfg)
        return method, load_volumes(demo_store_path, split="all")

    def test_spacing_mm_resamples_prepared_regions_on_the_way(self, demo_store_path, tmp_path):
        """Table 9's pipeline (resample to spacing_mm, then resize): the prepared regions of the demo's
        6 x 6 x 6.67 mm phantoms via 30 mm lose detail finer than 30 mm, any store spacing is accepted
        (it is the region that is resampled), and the cached regions are keyed on the spacing."""
        import zarr

        from datasets_zarr.resized import spacing_grid

        plain, volumes = self._setup(demo_store_path, tmp_path / "plain")
        coarse, _ = self._setup(demo_store_path, tmp_path / "coarse", spacing_mm=30.0)
        coarse.check_volumes(volumes)  # resampled in prepare: no refusal of the 6 mm store
        with pytest.raises(ValueError, match="region_mode"):
            VoCo(coarse.config.model_copy(update={"prepare_regions": False})).check_volumes(volumes)
        a, b = plain.prepare(volumes)[0], coarse.prepare(volumes)[0]
        assert a.shape == b.shape and a.spacing == b.spacing
        read = lambda p: zarr.open_array(f"{p.extra['store']}/{p.extra['group']}/image", mode="r")[...].astype(float)
        sharp, smooth = read(a), read(b)
        # Resampling to 30 mm then back up to the region grid is a low-pass: smaller voxel-to-voxel steps.
        assert np.abs(np.diff(smooth, axis=0)).mean() < 0.8 * np.abs(np.diff(sharp, axis=0)).mean()
        (x0, y0, z0, x1, y1, z1) = volumes[0].bbox
        assert spacing_grid((x0, y0, z0), (x1, y1, z1), volumes[0].spacing, 30.0) == tuple(
            max(2, round((h - l) * s / 30.0)) for l, h, s in zip((x0, y0, z0), (x1, y1, z1), volumes[0].spacing))
        again = VoCo(coarse.config.model_copy(update={"spacing_mm": None}))
        np.testing.assert_array_equal(read(again.prepare(volumes)[0]), sharp)  # key differs: rebuilt, not reused

    def test_prepared_views_match_per_sample_resize(self, demo_store_path, tmp_path):
        from rayssl.data.pipeline import ViewBuilder

        method, volumes = self._setup(demo_store_path, tmp_path, flip_prob=0.0, rot90_prob=0.0,
                                      shift_intensity_prob=0.0)
        prepared = method.prepare(volumes)
        assert [v.id for v in prepared] == [v.id for v in volumes]
        assert [v.index for v in prepared] == [v.index for v in volumes]
        for v, p in zip(volumes, prepared):
            assert p.shape == (64, 64, 32) and p.bbox == (0, 0, 0, 64, 64, 32)
            assert p.extra["store"] == str(tmp_path / "regions.zarr") and p.extra["group"] == v.id
            (x0, y0, z0, x1, y1, z1) = v.bbox
            np.testing.assert_allclose(p.spacing, [(x1 - x0) * v.spacing[0] / 64, (y1 - y0) * v.spacing[1] / 64,
                                                   (z1 - z0) * v.spacing[2] / 32])
        per_sample = VoCo(method.config.model_copy(update={"prepare_regions": False}))
        assert per_sample.prepare(volumes) == volumes
        a_builder = ViewBuilder(prepared, method.plan, method.views, seed=3, read_dtype=method.read_dtype)
        b_builder = ViewBuilder(volumes, per_sample.plan, per_sample.views, seed=3, read_dtype=per_sample.read_dtype)
        for sample in range(len(volumes)):
            a, b = a_builder.build_sample(sample), b_builder.build_sample(sample)
            np.testing.assert_array_equal(a["random_starts"], b["random_starts"])
            np.testing.assert_allclose(a["labels"], b["labels"])
            # Same resize, stored as int16 HU: +-0.5 HU = +-0.0012 after the [-175, 250] window.
            np.testing.assert_allclose(a["bases"], b["bases"], atol=1.5e-3)
            np.testing.assert_allclose(a["randoms"], b["randoms"], atol=1.5e-3)

    def test_regions_are_reused_and_rebuilt_when_the_source_changes(self, demo_store_path, tmp_path):
        from dataclasses import replace

        method, volumes = self._setup(demo_store_path, tmp_path)
        method.prepare(volumes)
        arrays = {v.id: tmp_path / "regions.zarr" / v.id / "image" / "zarr.json" for v in volumes}
        stamps = {k: p.stat().st_mtime_ns for k, p in arrays.items()}
        method.prepare(volumes)  # unchanged: nothing rewritten
        assert {k: p.stat().st_mtime_ns for k, p in arrays.items()} == stamps
        changed = [replace(volumes[0], bbox=(0, 0, 0, *volumes[0].shape))] + volumes[1:]
        method.prepare(changed)  # a new box for the first volume: only it is rebuilt
        assert arrays[volumes[0].id].stat().st_mtime_ns != stamps[volumes[0].id]
        assert all(arrays[v.id].stat().st_mtime_ns == stamps[v.id] for v in volumes[1:])

    def test_remote_store_needs_an_explicit_prepared_store(self):
        from datasets_zarr.resized import default_resized_store

        with pytest.raises(ValueError, match="prepared_store"):
            default_resized_store("s3://bucket/ct.zarr", (384, 384, 96))
        assert default_resized_store("/data/ct.zarr/", (384, 384, 96)) == "/data/ct.zarr.fg-384x384x96.zarr"
