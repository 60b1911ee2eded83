"""Differentiable 3D warping: batched affine matrices, displacement fields, fusion, local NCC and smoothness."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

# Conventions used by every function here.
# - Tensors are [B, C, D0, D1, D2]; "axis i" is spatial dimension D_i (our arrays' x, y, z).
# - A displacement vector field (DVF) is [B, 3, D0, D1, D2] in *voxels*, channel i along axis i.
# - Transforms are backward ("pull") maps, as in `grid_sample`: a DVF u moves the value found at
#   p + u(p) in the moving image to voxel p of the output.
# - An affine matrix is [B, 3, 4] acting on *normalised* coordinates q in [-1, 1] per axis
#   (q = -1 / +1 at the centres of the first / last voxel, i.e. align_corners=True), in the same
#   axis order as the tensor (not grid_sample's reversed x/y/z order): q_moving = A q + t. Because it
#   acts on normalised coordinates, one matrix aligns an image and its same-extent feature maps.

N_AFFINE_PARAMS = 15  # 3 rotation, 3 translation, 3 scaling, 6 shearing (GVSL, He et al. 2023, Sec. 3.2.1)


def identity_grid(shape: Sequence[int], device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[3, *shape] normalised coordinates of every voxel (align_corners=True), tensor axis order."""
    axes = [torch.linspace(-1.0, 1.0, int(n), device=device, dtype=dtype) if n > 1
            else torch.zeros(1, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _voxel_to_normalised_scale(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """[1, 3, 1, 1, 1] factors 2/(n-1) turning voxel displacements into normalised ones."""
    factors = [2.0 / (n - 1) if n > 1 else 0.0 for n in shape]
    return torch.tensor(factors, device=like.device, dtype=like.dtype).view(1, 3, 1, 1, 1)


def dvf_to_normalised(dvf: torch.Tensor) -> torch.Tensor:
    """A DVF in voxels -> the same displacements in normalised units."""
    return dvf * _voxel_to_normalised_scale(dvf.shape[2:], dvf)


def normalised_to_dvf(displacement: torch.Tensor) -> torch.Tensor:
    """Normalised displacements [B, 3, *shape] -> voxels (inverse of `dvf_to_normalised`)."""
    shape = displacement.shape[2:]
    factors = [(n - 1) / 2.0 for n in shape]
    scale = torch.tensor(factors, device=displacement.device, dtype=displacement.dtype).view(1, 3, 1, 1, 1)
    return displacement * scale


def _rotation_matrices(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched rotations about axis 0, 1 and 2 ([B, 3, 3] each) from angles [B, 3] in radians."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(angles[:, 0]), torch.zeros_like(angles[:, 0])
    c0, c1, c2 = cos.unbind(dim=1)
    s0, s1, s2 = sin.unbind(dim=1)
    # torch.stack keeps every entry in the autograd graph (a FloatTensor([...]) literal would not).
    rot0 = torch.stack([one, zero, zero, zero, c0, -s0, zero, s0, c0], dim=1).view(-1, 3, 3)
    rot1 = torch.stack([c1, zero, s1, zero, one, zero, -s1, zero, c1], dim=1).view(-1, 3, 3)
    rot2 = torch.stack([c2, -s2, zero, s2, c2, zero, zero, zero, one], dim=1).view(-1, 3, 3)
    return rot0, rot1, rot2


def affine_matrix(rotation: torch.Tensor, translation: torch.Tensor, scale: torch.Tensor,
                  shear: torch.Tensor) -> torch.Tensor:
    """Batched, differentiable [B, 3, 4] affine matrix from its 15 parameters.

    Composition as in the official GVSL code: A = Sh · S · R2 · R1 · R0 and t = translation, so
    q_moving = A q + t. The shear matrix has ones on the diagonal and tan(angle) off it, entry
    (i, j) taking `shear[:, k]` in the order (01, 02, 10, 12, 20, 21).

    Args:
        rotation: [B, 3] angles (radians) about axes 0, 1, 2.
        translation: [B, 3] in normalised units (1.0 = half the image extent).
        scale: [B, 3] scale factors (1.0 = identity).
        shear: [B, 6] shear angles (radians).
    """
    rot0, rot1, rot2 = _rotation_matrices(rotation)
    scale_matrix = torch.diag_embed(scale)
    one = torch.ones_like(shear[:, 0])
    t = torch.tan(shear)
    shear_matrix = torch.stack([one, t[:, 0], t[:, 1],
                                t[:, 2], one, t[:, 3],
                                t[:, 4], t[:, 5], one], dim=1).view(-1, 3, 3)
    linear = shear_matrix @ scale_matrix @ rot2 @ rot1 @ rot0
    return torch.cat([linear, translation.unsqueeze(2)], dim=2)


@dataclass(frozen=True)
class AffineRanges:
    """Bounds of a predicted affine transform (GVSL defaults: He et al. 2023, supplementary Fig. 12).

    rotation and shear in radians, scale as the largest |s - 1|, translation in normalised units.
    """

    rotation: float = math.pi / 9
    translation: float = 0.25
    scale: float = 0.25
    shear: float = math.pi / 18


def affine_from_raw(raw: torch.Tensor, ranges: AffineRanges = AffineRanges()) -> torch.Tensor:
    """[B, 15] unbounded network outputs -> [B, 3, 4] affine matrix with every parameter bounded.

    Each parameter is `bound · tanh(raw)` (scale: 1 + bound · tanh(raw)); raw = 0 is the identity.
    tanh keeps a gradient everywhere, where the official code's clamp is flat outside [-1, 1].
    Order of `raw`: rotation (3), translation (3), scale (3), shear (6).
    """
    if raw.dim() != 2 or raw.shape[1] != N_AFFINE_PARAMS:
        raise ValueError(f"expected raw affine parameters of shape [B, {N_AFFINE_PARAMS}], got {tuple(raw.shape)}")
    bounded = torch.tanh(raw)
    rotation = bounded[:, 0:3] * ranges.rotation
    translation = bounded[:, 3:6] * ranges.translation
    scale = 1.0 + bounded[:, 6:9] * ranges.scale
    shear = bounded[:, 9:15] * ranges.shear
    return affine_matrix(rotation, translation, scale, shear)


def identity_affine(batch: int, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, 3, 4] identity affine matrices."""
    eye = torch.eye(3, 4, device=device, dtype=dtype)
    return eye.unsqueeze(0).expand(batch, 3, 4).clone()


def fuse_affine_dvf(matrix: torch.Tensor | None, dvf: torch.Tensor | None,
                    shape: Sequence[int] | None = None) -> torch.Tensor:
    """One DVF (voxels) equal to warping by the affine first and then by the DVF.

    Warping image m by the affine gives m_a(p) = m(T(p)); warping m_a by u gives
    m_a(p + u(p)) = m(T(p + u(p))). The fused DVF is therefore T(p + u(p)) - p, computed exactly
    (T is affine, so no resampling of u is needed): one interpolation of m instead of two. This is
    the order of the official GVSL code, `stn(atn(B, A), u)`; it differs from the paper's Eq. 15
    (Appendix D.3), which evaluates u at T(p).

    Args:
        matrix: [B, 3, 4] affine (normalised coordinates) or None for the identity.
        dvf: [B, 3, *shape] displacement in voxels or None for zero.
        shape: spatial shape, needed only when `dvf` is None.
    """
    if matrix is None and dvf is None:
        raise ValueError("fuse_affine_dvf needs a matrix, a dvf or both")
    if dvf is not None:
        shape = tuple(dvf.shape[2:])
        like = dvf
    else:
        if shape is None:
            raise ValueError("shape is required when dvf is None")
        like = matrix  # type: ignore[assignment]
    grid = identity_grid(shape, device=like.device, dtype=like.dtype).unsqueeze(0)  # [1, 3, *shape]
    points = grid if dvf is None else grid + dvf_to_normalised(dvf)
    if matrix is not None:
        linear, translation = matrix[:, :, :3], matrix[:, :, 3]
        points = torch.einsum("bij,bj...->bi...", linear, points.expand(matrix.shape[0], *points.shape[1:]))
        points = points + translation.view(-1, 3, *([1] * len(shape)))
    return normalised_to_dvf(points - grid)


def affine_to_dvf(matrix: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The DVF (voxels) of an affine matrix on a grid of `shape`."""
    return fuse_affine_dvf(matrix, None, shape)


def warp(image: torch.Tensor, dvf: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Warp `image` [B, C, *shape] by a DVF [B, 3, *shape] (voxels) with `grid_sample`.

    out(p) = image(p + u(p)), interpolated trilinearly (grid_sample's "bilinear" on 5D input is
    trilinear: GVSL supplementary Eq. 10). Values sampled outside the image follow `padding_mode`.
    """
    if dvf.shape[1] != 3 or dvf.shape[2:] != image.shape[2:]:
        raise ValueError(f"dvf {tuple(dvf.shape)} does not match image {tuple(image.shape)}")
    grid = identity_grid(image.shape[2:], device=image.device, dtype=image.dtype).unsqueeze(0)
    locations = grid + dvf_to_normalised(dvf)
    # grid_sample wants [B, *shape, 3] with the last tensor axis first (x=W, y=H, z=D).
    locations = locations.permute(0, 2, 3, 4, 1).flip(-1)
    return F.grid_sample(image, locations, mode=mode, padding_mode=padding_mode, align_corners=True)


def affine_warp(image: torch.Tensor, matrix: torch.Tensor, mode: str = "bilinear",
                padding_mode: str = "zeros") -> torch.Tensor:
    """Warp `image` [B, C, *shape] by affine matrices [B, 3, 4] (normalised coordinates)."""
    return warp(image, affine_to_dvf(matrix, image.shape[2:]), mode=mode, padding_mode=padding_mode)


def local_ncc_map(a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """Squared local normalised cross-correlation at every voxel of two [B, C, *shape] images.

    GVSL, He et al. 2023, Eq. 1 (VoxelMorph's local NCC): for every voxel p, with sums over a
    window^3 cube around p (zero-padded at the borders, as the official code),
        cc(p) = (Σ (a - ā)(b - b̄))² / (Σ (a - ā)² · Σ (b - b̄)² + eps)   in [0, 1].
    Invariant to a linear intensity change of either image wherever the window does not reach
    the zero padding and the variances dominate `eps`.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"NCC window must be an odd positive integer, got {window}")
    if a.dim() != 5:
        raise ValueError(f"local NCC expects [B, C, D0, D1, D2] tensors, got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"NCC inputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    n = float(window ** 3)
    half = window // 2
    # Variances are differences of large sums: never compute them in half precision.
    if a.dtype in (torch.float16, torch.bfloat16) or b.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()

    def box_mean(x: torch.Tensor) -> torch.Tensor:
        # Separable box filter (3 x `window` taps instead of window^3); zero padding is counted in
        # the mean, so this is sum / window^3 exactly as the official convolution with a ones kernel.
        for kernel, padding in (((window, 1, 1), (half, 0, 0)), ((1, window, 1), (0, half, 0)),
                                ((1, 1, window), (0, 0, half))):
            x = F.avg_pool3d(x, kernel, stride=1, padding=padding, count_include_pad=True)
        return x

    mean_a, mean_b = box_mean(a), box_mean(b)
    cross = (box_mean(a * b) - mean_a * mean_b) * n
    # Clamped at 0: in flat regions float32 rounding can make E[x²] - E[x]² slightly negative.
    var_a = ((box_mean(a * a) - mean_a * mean_a) * n).clamp_min(0.0)
    var_b = ((box_mean(b * b) - mean_b * mean_b) * n).clamp_min(0.0)
    return cross * cross / (var_a * var_b + eps)


def local_ncc(a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """Mean of `local_ncc_map` over voxels and batch: the similarity of GVSL Eq. 1 (1 = best)."""
    return local_ncc_map(a, b, window=window, eps=eps).mean()


def local_ncc_loss(a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """L_NCC = 1 - local_ncc(a, b) (GVSL Eq. 1 turned into a loss as in the official code)."""
    return 1.0 - local_ncc(a, b, window=window, eps=eps)


def smoothness_loss(dvf: torch.Tensor) -> torch.Tensor:
    """L_smooth (GVSL Eq. 2): mean squared forward difference of the DVF, averaged over the 3 axes."""
    d0 = dvf[:, :, 1:, :, :] - dvf[:, :, :-1, :, :]
    d1 = dvf[:, :, :, 1:, :] - dvf[:, :, :, :-1, :]
    d2 = dvf[:, :, :, :, 1:] - dvf[:, :, :, :, :-1]
    return (d0.pow(2).mean() + d1.pow(2).mean() + d2.pow(2).mean()) / 3.0
