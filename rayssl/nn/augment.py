"""Batched 3D augmentations in torch driven by parameters drawn elsewhere: elastic + affine warps, Models Genesis corruptions.

Every function here is a deterministic function of its tensor arguments, on any device: random
parameters are drawn by the caller (a data actor, from the sample's seed) and travel as tensors.
Dense noise (the elastic offsets, the painting noise, the shuffling permutations) is not drawn
with torch's generators, whose streams differ between CPU and CUDA, but from `hash_uniform`, a
counter-based hash of (seed, voxel index) in 64-bit integer arithmetic that gives the same values
on every device. So one sample's views are the same function of its parameters on a data actor's
CPU (a batch of one) and on the training device (a batch), to float tolerance.

Conventions follow rayssl.nn.spatial: tensors [B, C, D0, D1, D2], displacement fields in voxels,
channel i along axis i.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from rayssl.nn.spatial import warp

_MASK32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # odd, < 2^27: a 32-bit state times it stays below 2^63 in int64


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (three xor-shift-multiply rounds) of int64 values in [0, 2^32), computed
    in place on `x` (its callers pass temporaries): full-size int64 temporaries were most of its time."""
    for _ in range(3):
        x ^= x >> 16
        x *= _MULT
        x &= _MASK32
    x ^= x >> 16
    return x


def hash_uniform(seeds: torch.Tensor, count: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[B, count] float32 values in [0, 1), a function of (seed, index) only: the same on every device.

    `seeds`: [B] integers (int64). Each value has 24 random bits (exactly representable in float32).
    """
    seeds = seeds.to(device=device, dtype=torch.int64).reshape(-1, 1)
    key = _mix32((seeds & _MASK32) ^ _mix32(((seeds >> 32) + 0x9E3779B) & _MASK32))
    bits = torch.arange(count, device=seeds.device, dtype=torch.int64).unsqueeze(0) + key
    bits &= _MASK32
    bits = _mix32(bits)
    bits ^= key
    bits = _mix32(bits)
    bits >>= 8
    return bits.to(torch.float32).mul_(1.0 / 2**24)


# ---- spatial: elastic + affine ---------------------------------------------------------------------


def gaussian_kernels(sigmas: torch.Tensor, tail: int, truncated: float = 3.0) -> torch.Tensor:
    """[B, 2 * tail + 1] 1D Gaussian kernels (MONAI's "erf" approximation), one per sigma, each cut at
    its own int(sigma * truncated + 0.5) voxels (zero beyond, as MONAI's shorter kernel) and summing to 1."""
    sigmas = sigmas.to(torch.float32).reshape(-1, 1)
    x = torch.arange(-tail, tail + 1, dtype=torch.float32, device=sigmas.device).unsqueeze(0)
    t = 0.70710678 / sigmas.abs().clamp(min=1e-6)
    out = (0.5 * (torch.erf(t * (x + 0.5)) - torch.erf(t * (x - 0.5)))).clamp(min=0)
    own_tail = torch.floor(torch.clamp(sigmas * truncated, min=0.5) + 0.5)
    out = torch.where(x.abs() <= own_tail, out, torch.zeros_like(out))
    return out / out.sum(dim=1, keepdim=True)


def smoothing_matrices(kernels: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n, n] banded matrices M with (M x)[i] = sum_k kernel[k] x[i + k - tail], x zero outside [0, n):
    a 1D convolution with zero padding, as a matrix product (which every device does fast)."""
    tail = (kernels.shape[1] - 1) // 2
    i = torch.arange(n, device=kernels.device)
    offset = i.view(1, -1) - i.view(-1, 1) + tail  # [n (output i), n (input j)]: kernel index j - i + tail
    inside = (offset >= 0) & (offset < kernels.shape[1])
    taps = kernels[:, offset.clamp(0, kernels.shape[1] - 1)]  # [B, n, n]
    return torch.where(inside.unsqueeze(0), taps, torch.zeros_like(taps))


def smooth_fields(fields: torch.Tensor, sigmas: torch.Tensor, tail: int, truncated: float = 3.0) -> torch.Tensor:
    """Separable Gaussian smoothing of [B, C, D0, D1, D2] with sigma `sigmas[b]` per sample, zero padding
    (MONAI's GaussianFilter, as Rand3DElastic applies it), one batched matrix product per axis."""
    kernels = gaussian_kernels(sigmas.to(fields.device), tail, truncated).to(fields.dtype)  # [B, K]
    d0, d1, d2 = fields.shape[2:]
    m0, m1, m2 = (smoothing_matrices(kernels, int(n)) for n in (d0, d1, d2))
    x = torch.einsum("bij,bcdej->bcdei", m2, fields)
    x = torch.einsum("bij,bcdjf->bcdif", m1, x)
    return torch.einsum("bij,bcjef->bcief", m0, x)


def elastic_affine_dvf(shape: Sequence[int], affine: torch.Tensor, sigma: torch.Tensor, magnitude: torch.Tensor,
                       seeds: torch.Tensor, tail: int, truncated: float = 3.0) -> torch.Tensor:
    """The DVF [B, 3, *shape] (voxels) of MONAI's Rand3DElastic for given parameters.

    Centred voxel coordinates c (voxel index - (n - 1) / 2) are offset by `magnitude` times the
    Gaussian-smoothed (`sigma`, cut at `truncated` sigma, at most `tail` voxels) U(-1, 1) noise of
    `seeds` (`hash_uniform`), then mapped by the homogeneous `affine` [B, 4, 4]; the result, back
    in voxel indices, minus the identity is the field. A sample with magnitude 0 skips the noise.
    """
    shape = tuple(int(n) for n in shape)
    device = affine.device
    b = affine.shape[0]
    axes = [torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2.0 for n in shape]
    centred = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)  # [1, 3, *shape]
    coords = centred.expand(b, 3, *shape)
    magnitude = magnitude.to(device=device, dtype=torch.float32)
    if bool((magnitude != 0).any()):
        noise = hash_uniform(seeds, 3 * math.prod(shape), device) * 2.0 - 1.0
        offsets = smooth_fields(noise.view(b, 3, *shape), sigma.to(device), tail, truncated)
        coords = coords + offsets * magnitude.view(b, 1, 1, 1, 1)
    matrix = affine.to(torch.float32)
    moved = torch.einsum("bij,bj...->bi...", matrix[:, :3, :3], coords) + matrix[:, :3, 3].view(b, 3, 1, 1, 1)
    return moved - centred


def affine_dvf(shape: Sequence[int], affine: torch.Tensor) -> torch.Tensor:
    """The DVF [B, 3, *shape] (voxels) of homogeneous `affine` [B, 4, 4] acting on centred voxel coordinates,
    as MONAI's AffineGrid builds RandAffine's grid: `elastic_affine_dvf` without the elastic part."""
    zeros = torch.zeros(affine.shape[0], device=affine.device)
    return elastic_affine_dvf(shape, affine, zeros, zeros, zeros.long(), tail=0)


def warp_stack(images: torch.Tensor, dvf: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """`images` [B, C, *shape] warped by `dvf` (voxels): trilinear, zero padding by default (MONAI's Resample)."""
    return warp(images, dvf, mode="bilinear", padding_mode=padding_mode)


# ---- Models Genesis corruptions --------------------------------------------------------------------


def local_shuffle(x: torch.Tensor, apply: torch.Tensor, starts: torch.Tensor, block: Sequence[int],
                  seeds: torch.Tensor) -> torch.Tensor:
    """Models Genesis local pixel shuffling of [B, *shape] where `apply[b]`: blocks of edge `block` at
    `starts` [B, N, 3] have their voxels permuted (the permutation: argsort of `hash_uniform` keys of
    `seeds`), read from the input and written in block order, so the last of overlapping blocks wins."""
    b, shape = x.shape[0], tuple(x.shape[1:])
    n_blocks = starts.shape[1]
    volume = int(torch.tensor(block).prod())
    chosen = torch.nonzero(apply.to(x.device).bool()).flatten()
    if n_blocks == 0 or volume == 1 or chosen.numel() == 0:
        return x.clone()
    device = x.device
    offsets = torch.stack(torch.meshgrid(*[torch.arange(int(e), device=device) for e in block], indexing="ij"),
                          dim=-1).reshape(-1, 3)  # [V, 3]
    strides = torch.tensor([shape[1] * shape[2], shape[2], 1], device=device, dtype=torch.int64)
    out = x.clone()
    for i in chosen.tolist():
        start = starts[i].to(device=device, dtype=torch.int64)  # [N, 3]
        flat = ((start[:, None, :] + offsets[None, :, :]) * strides).sum(-1)  # [N, V]
        source = x[i].reshape(-1)
        keys = hash_uniform(seeds[i:i + 1], n_blocks * volume, device).view(n_blocks, volume)
        perm = torch.argsort(keys, dim=1, stable=True)
        values = torch.gather(source[flat], 1, perm)
        # Last block wins: each voxel keeps the value of the highest-numbered block covering it.
        order = torch.arange(n_blocks, device=device).view(-1, 1).expand(n_blocks, volume)
        owner = torch.full((source.numel(),), -1, device=device, dtype=torch.int64)
        owner.scatter_reduce_(0, flat.reshape(-1), order.reshape(-1), reduce="amax")
        keep = owner[flat] == order
        result = source.clone()
        result[flat[keep]] = values[keep]
        out[i] = result.view(shape)
    return out


def bezier_curves(controls: torch.Tensor, n_points: int = 100_000) -> tuple[torch.Tensor, torch.Tensor]:
    """(xs, ys), each [B, n_points] and sorted, of the cubic Bezier curves from (0, 0) to (1, 1) with
    control points `controls` [B, 4] = (x1, y1, x2, y2) (Models Genesis' non-linear transformation)."""
    t = torch.linspace(0.0, 1.0, n_points, device=controls.device, dtype=torch.float32)
    b1, b2, b3 = 3 * t * (1 - t) ** 2, 3 * t ** 2 * (1 - t), t ** 3
    c = controls.to(torch.float32)
    xs = c[:, 0:1] * b1 + c[:, 2:3] * b2 + b3
    ys = c[:, 1:2] * b1 + c[:, 3:4] * b2 + b3
    return torch.sort(xs, dim=1).values, torch.sort(ys, dim=1).values


def interp(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """`np.interp` per row: x [B, M] through the piecewise-linear maps (xs, ys) [B, P], xs sorted;
    values outside [xs[0], xs[-1]] take the end values."""
    p = xs.shape[1]
    right = torch.searchsorted(xs.contiguous(), x.contiguous(), right=True).clamp(1, p - 1)
    left = right - 1
    x0, x1 = torch.gather(xs, 1, left), torch.gather(xs, 1, right)
    y0, y1 = torch.gather(ys, 1, left), torch.gather(ys, 1, right)
    span = x1 - x0
    w = torch.where(span > 0, (x - x0) / torch.where(span > 0, span, torch.ones_like(span)), torch.ones_like(span))
    out = y0 + w.clamp(0, 1) * (y1 - y0)
    out = torch.where(x <= xs[:, :1], ys[:, :1], out)
    return torch.where(x >= xs[:, -1:], ys[:, -1:], out)


def nonlinear_intensity(x: torch.Tensor, apply: torch.Tensor, controls: torch.Tensor,
                        n_points: int = 100_000) -> torch.Tensor:
    """x [B, *shape] mapped through each sample's Bezier curve (`bezier_curves`) where `apply[b]`."""
    chosen = apply.to(x.device).bool()
    if not bool(chosen.any()):
        return x.clone()
    xs, ys = bezier_curves(controls.to(x.device), n_points)
    mapped = interp(x.reshape(x.shape[0], -1), xs, ys).view(x.shape)
    return torch.where(chosen.view(-1, *[1] * (x.dim() - 1)), mapped, x)


def box_masks(shape: Sequence[int], boxes: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[B, *shape] bool: the union of the first `count[b]` boxes `boxes[b]` [K, 6] = (start, size) per axis."""
    b, k = boxes.shape[:2]
    device = boxes.device
    mask = torch.zeros((b, *shape), dtype=torch.bool, device=device)
    for j in range(k):
        live = (count.to(device) > j).view(b, 1)
        axes = []
        for axis, n in enumerate(shape):
            i = torch.arange(int(n), device=device).view(1, -1)
            start, size = boxes[:, j, axis].view(b, 1), boxes[:, j, 3 + axis].view(b, 1)
            axes.append((i >= start) & (i < start + size) & live)
        mask |= axes[0][:, :, None, None] & axes[1][:, None, :, None] & axes[2][:, None, None, :]
    return mask


def paint(x: torch.Tensor, mode: torch.Tensor, boxes: torch.Tensor, count: torch.Tensor,
          seeds: torch.Tensor) -> torch.Tensor:
    """Models Genesis painting of [B, *shape]: mode 1 (in-painting) fills the boxes with U[0, 1) noise,
    mode 2 (out-painting) keeps only the boxes and fills the rest, mode 0 leaves the sample as it is.
    The noise at a voxel is `hash_uniform(seed)` at its flat index."""
    mode = mode.to(x.device).view(-1, *[1] * (x.dim() - 1))
    if not bool((mode > 0).any()):
        return x.clone()
    inside = box_masks(tuple(x.shape[1:]), boxes.to(x.device), count)
    noise = hash_uniform(seeds, x[0].numel(), x.device).view(x.shape).to(x.dtype)
    painted = torch.where((mode == 1) & inside, noise, x)
    return torch.where((mode == 2) & ~inside, noise, painted)


# ---- intensity: MONAI's RandGaussianNoise and AdjustContrast ----------------------------------------


def hash_normal(seeds: torch.Tensor, count: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[B, count] standard normal float32 values from `hash_uniform` (Box-Muller, both of each pair's values):
    the same on every device."""
    pairs = (count + 1) // 2
    u = hash_uniform(seeds, 2 * pairs, device)
    radius = torch.sqrt(-2.0 * torch.log(1.0 - u[:, :pairs]))  # 1 - u in (0, 1]
    angle = (2.0 * math.pi) * u[:, pairs:]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :count]


def gaussian_noise(x: torch.Tensor, apply: torch.Tensor, std: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """[B, ...] plus zero-mean Gaussian noise of std `std[b]` where `apply[b]` (MONAI's RandGaussianNoise with
    its std drawn by the caller); the noise at an element is `hash_normal(seed)` at its flat index, drawn only
    for the samples it is added to."""
    chosen = torch.nonzero(apply.to(x.device).bool()).flatten()
    out = x.clone()
    if chosen.numel() == 0:
        return out
    noise = hash_normal(seeds.to(x.device)[chosen], x[0].numel(), x.device).view(-1, *x.shape[1:]).to(x.dtype)
    out[chosen] = x[chosen] + noise * std.to(x)[chosen].view(-1, *[1] * (x.dim() - 1))
    return out


def adjust_contrast(x: torch.Tensor, apply: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """MONAI's AdjustContrast of each sample of [B, ...] where `apply[b]`, with gamma `gamma[b]`: min and range
    over the whole sample (all channels), ((x - min) / (range + 1e-7)) ** gamma * range + min."""
    b = x.shape[0]
    shape = (b, *[1] * (x.dim() - 1))
    flat = x.reshape(b, -1)
    low = flat.min(dim=1).values.view(shape)
    span = flat.max(dim=1).values.view(shape) - low
    adjusted = ((x - low) / (span + 1e-7)) ** gamma.to(x).view(shape) * span + low
    return torch.where(apply.to(x.device).bool().view(shape), adjusted, x)
