"""Tests of rayssl.nn.spatial: affine matrices, warping, fusion, local NCC and smoothness."""

import math

import numpy as np
import pytest
import torch

from rayssl.nn.spatial import (
    AffineRanges,
    affine_from_raw,
    affine_matrix,
    affine_to_dvf,
    affine_warp,
    fuse_affine_dvf,
    identity_affine,
    local_ncc,
    local_ncc_loss,
    local_ncc_map,
    smoothness_loss,
    warp,
)


def _smooth_volume(seed: int, shape=(16, 16, 16)) -> torch.Tensor:
    """[1, 1, *shape] smooth random texture (no flat regions), values around [0, 1]."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    v = gaussian_filter(rng.random(shape), 1.5)
    v = (v - v.min()) / (v.max() - v.min())
    return torch.from_numpy(v.astype(np.float32))[None, None]


def _rotation_numpy(axis: int, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    if axis == 0:
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == 1:
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


class TestAffineMatrix:
    def test_identity_parameters_give_identity(self):
        m = affine_matrix(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 6))
        assert m.shape == (2, 3, 4)
        assert torch.allclose(m, identity_affine(2), atol=1e-7)
        assert torch.allclose(affine_from_raw(torch.zeros(3, 15)), identity_affine(3), atol=1e-7)

    def test_batched_composition_matches_numpy(self):
        rng = np.random.default_rng(0)
        rot, trans = rng.uniform(-0.3, 0.3, (2, 3)), rng.uniform(-0.2, 0.2, (2, 3))
        scale, shear = rng.uniform(0.8, 1.2, (2, 3)), rng.uniform(-0.15, 0.15, (2, 6))
        m = affine_matrix(*(torch.tensor(a, dtype=torch.float64) for a in (rot, trans, scale, shear)))
        for b in range(2):
            t = np.tan(shear[b])
            sh = np.array([[1, t[0], t[1]], [t[2], 1, t[3]], [t[4], t[5], 1]])
            linear = sh @ np.diag(scale[b]) @ _rotation_numpy(2, rot[b, 2]) @ _rotation_numpy(1, rot[b, 1]) \
                @ _rotation_numpy(0, rot[b, 0])
            expected = np.concatenate([linear, trans[b][:, None]], axis=1)
            np.testing.assert_allclose(m[b].numpy(), expected, atol=1e-12)
        assert not torch.allclose(m[0], m[1])  # each sample keeps its own parameters

    def test_gradient_reaches_every_raw_parameter(self):
        raw = (torch.randn(2, 15, generator=torch.Generator().manual_seed(0)) * 0.3).requires_grad_()
        weights = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
        (affine_from_raw(raw) * weights).sum().backward()
        assert raw.grad is not None
        assert (raw.grad.abs() > 0).all()

    def test_ranges_bound_the_parameters(self):
        ranges = AffineRanges(rotation=0.1, translation=0.2, scale=0.1, shear=0.05)
        m = affine_from_raw(torch.full((1, 15), 50.0), ranges)  # tanh saturates at +1
        assert torch.allclose(m[0, :, 3], torch.full((3,), 0.2))
        assert m.abs().max() < 2.0


class TestWarp:
    def test_identity_affine_and_zero_dvf_return_the_image(self):
        image = torch.rand(2, 3, 8, 9, 10)
        dvf = fuse_affine_dvf(identity_affine(2), torch.zeros(2, 3, 8, 9, 10))
        assert torch.allclose(dvf, torch.zeros_like(dvf), atol=1e-5)
        assert torch.allclose(warp(image, dvf), image, atol=1e-5)
        assert torch.allclose(affine_warp(image, identity_affine(2)), image, atol=1e-5)

    @pytest.mark.parametrize("axis", [0, 1, 2])
    def test_dvf_translation_matches_np_roll(self, axis):
        volume = torch.rand(1, 1, 12, 13, 14)
        shift = 3
        dvf = torch.zeros(1, 3, 12, 13, 14)
        dvf[:, axis] = shift  # out(p) = in(p + shift e_axis)
        out = warp(volume, dvf)[0, 0].numpy()
        expected = np.roll(volume[0, 0].numpy(), -shift, axis=axis)
        inner = [slice(None)] * 3
        inner[axis] = slice(0, volume.shape[2 + axis] - shift)
        np.testing.assert_allclose(out[tuple(inner)], expected[tuple(inner)], atol=1e-5)
        # Beyond the border the zero padding shows up.
        outer = [slice(None)] * 3
        outer[axis] = slice(volume.shape[2 + axis] - shift, None)
        assert np.abs(out[tuple(outer)]).max() < 1e-6

    def test_affine_translation_matches_np_roll(self):
        n, shift = 11, 2
        volume = torch.rand(1, 1, n, n, n)
        matrix = identity_affine(1)
        matrix[0, 1, 3] = 2.0 * shift / (n - 1)  # normalised units along axis 1
        out = affine_warp(volume, matrix)[0, 0].numpy()
        expected = np.roll(volume[0, 0].numpy(), -shift, axis=1)
        np.testing.assert_allclose(out[:, : n - shift], expected[:, : n - shift], atol=1e-5)

    def test_affine_rotation_follows_tensor_axis_order(self):
        # 90 degrees about axis 2: sampling location (q0, q1) -> (-q1, q0), so out[i, j] = in[n-1-j, i].
        n = 7
        volume = torch.rand(1, 1, n, n, 5)
        rotation = torch.tensor([[0.0, 0.0, math.pi / 2]])
        matrix = affine_matrix(rotation, torch.zeros(1, 3), torch.ones(1, 3), torch.zeros(1, 6))
        out = affine_warp(volume, matrix)[0, 0].numpy()
        expected = np.transpose(volume[0, 0].numpy()[::-1], (1, 0, 2))
        np.testing.assert_allclose(out, expected, atol=1e-5)

    def test_fused_transform_equals_affine_then_dvf(self):
        # On an image linear in the coordinates trilinear interpolation is exact, so the one-step
        # fused warp must equal the two-step warp wherever both stay inside the volume.
        shape = (12, 12, 12)
        grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
        image = (0.3 * grid[0] - 0.2 * grid[1] + 0.1 * grid[2] + 1.0)[None, None]
        matrix = affine_matrix(torch.tensor([[0.05, -0.04, 0.03]], dtype=torch.float64),
                               torch.tensor([[0.02, -0.03, 0.01]], dtype=torch.float64),
                               torch.tensor([[0.95, 1.02, 0.97]], dtype=torch.float64),
                               torch.tensor([[0.02, -0.01, 0.03, 0.0, -0.02, 0.01]], dtype=torch.float64))
        dvf = 0.6 * torch.sin(grid / 3.0)[None]
        two_step = warp(affine_warp(image, matrix), dvf)
        fused = warp(image, fuse_affine_dvf(matrix, dvf))
        inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
        assert torch.allclose(two_step[inner], fused[inner], atol=1e-9)

    def test_fused_dvf_formula(self):
        # T(p + u(p)) - p, checked voxel-wise against a hand computation in voxel units.
        shape = (5, 6, 7)
        matrix = affine_matrix(torch.tensor([[0.1, 0.2, -0.1]]), torch.tensor([[0.1, 0.0, -0.2]]),
                               torch.tensor([[1.1, 0.9, 1.0]]), torch.zeros(1, 6)).double()
        dvf = torch.randn(1, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        fused = fuse_affine_dvf(matrix, dvf)
        p = np.array([2, 3, 4])
        u = dvf[0, :, 2, 3, 4].numpy()
        half = (np.array(shape) - 1) / 2.0
        q = (p + u) / half - 1.0  # normalised position of p + u(p)
        moved = matrix[0, :, :3].numpy() @ q + matrix[0, :, 3].numpy()
        expected = (moved + 1.0) * half - p
        np.testing.assert_allclose(fused[0, :, 2, 3, 4].numpy(), expected, atol=1e-10)

    def test_affine_to_dvf_of_translation_is_constant(self):
        matrix = identity_affine(1)
        matrix[0, 0, 3] = 0.5
        dvf = affine_to_dvf(matrix, (9, 5, 5))
        assert torch.allclose(dvf[0, 0], torch.full((9, 5, 5), 0.5 * 4.0))  # 0.5 * (9-1)/2 voxels
        assert torch.allclose(dvf[0, 1:], torch.zeros(2, 9, 5, 5), atol=1e-6)

    def test_gradient_flows_to_dvf_and_image(self):
        image = torch.rand(2, 1, 6, 6, 6, requires_grad=True)
        dvf = (0.3 * torch.randn(2, 3, 6, 6, 6)).requires_grad_()
        warp(image, dvf).pow(2).sum().backward()
        assert image.grad.abs().sum() > 0 and dvf.grad.abs().sum() > 0


class TestLocalNCC:
    def test_self_similarity_is_best(self):
        a, b = _smooth_volume(0), _smooth_volume(1)
        self_ncc = local_ncc(a, a, window=5)
        assert abs(self_ncc.item() - 1.0) < 1e-3
        assert local_ncc(a, b, window=5) < self_ncc - 0.1
        assert local_ncc_loss(a, a, window=5).item() < 1e-3

    def test_invariant_to_positive_linear_intensity_change(self):
        a, b = _smooth_volume(2), _smooth_volume(3)
        # Pure scaling keeps the zero padding: the whole mean is invariant.
        assert torch.allclose(local_ncc(a, 3.0 * b, window=5), local_ncc(a, b, window=5), atol=1e-4)
        # With an offset the zero padding breaks invariance at the border only: compare the interior.
        inner = (slice(None), slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
        reference = local_ncc_map(a, b, window=5)[inner]
        changed = local_ncc_map(a, 2.0 * b + 0.5, window=5)[inner]
        assert torch.allclose(changed, reference, atol=1e-4)

    def test_hand_computed_window(self):
        # One 3^3 window fully inside a 3^3 volume: the centre voxel's cc is the squared Pearson r.
        rng = np.random.default_rng(4)
        a, b = rng.random((3, 3, 3)), rng.random((3, 3, 3))
        r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        cc = local_ncc_map(torch.tensor(a)[None, None], torch.tensor(b)[None, None], window=3, eps=0.0)
        assert abs(cc[0, 0, 1, 1, 1].item() - r**2) < 1e-10

    def test_rejects_even_window(self):
        with pytest.raises(ValueError, match="odd"):
            local_ncc(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 1, 4, 4, 4), window=4)


class TestSmoothness:
    def test_hand_computed_ramp(self):
        dvf = torch.zeros(1, 3, 4, 4, 4)
        dvf[0, 0] = torch.arange(4.0).view(4, 1, 1)  # slope 1 along axis 0, in channel 0 only
        # d0 = 1 in channel 0, 0 elsewhere: mean d0^2 = 1/3; d1 = d2 = 0; total (1/3)/3.
        assert abs(smoothness_loss(dvf).item() - 1.0 / 9.0) < 1e-7

    def test_constant_field_is_free(self):
        assert smoothness_loss(torch.full((2, 3, 4, 5, 6), 2.5)).item() == 0.0
