"""Fixed, seeded crop pools of labelled volumes, nested label-fraction subsets, and the crops' frozen features."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from rayssl.data.read import read_box
from rayssl.eval.features import FeatureNet, IntensityFn, sample_levels
from rayssl.eval.probe_data import ProbeData


@dataclass
class CropPool:
    """Fixed crops of some volumes: where they are, their centre class, and voxels for the voxel probe."""

    patch: int
    volume: np.ndarray  # [N] index into ProbeData.volumes
    starts: np.ndarray  # [N, 3]
    centre_class: np.ndarray  # [N]
    points: list[np.ndarray] = field(default_factory=list)  # per crop [n, 3] voxel indices inside the crop
    point_classes: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.volume)


def build_pool(data: ProbeData, indices: Sequence[int], per_volume: int, patch: int, voxels_per_class: int,
               seed: int) -> CropPool:
    """`per_volume` crops of `patch`^3 per volume, centred on voxels of classes taken in turn (seeded per volume).

    Crops may reach outside the volume (read as background; those voxels are never probe targets),
    so each crop's centre is exactly the drawn voxel.
    """
    vols, starts, centres, points, point_classes = [], [], [], [], []
    half = patch // 2
    for v in indices:
        label = data.volumes[v].label
        rng = np.random.default_rng([seed, int(v)])
        present = np.unique(label)
        where = {int(c): np.flatnonzero(label.ravel() == c) for c in present}
        order = rng.permutation(present)
        for i in range(per_volume):
            c = int(order[i % len(order)])
            centre = np.array(np.unravel_index(int(rng.choice(where[c])), label.shape))
            start = centre - half
            crop = read_box(label, start, (patch,) * 3, fill=-1)
            pts, cls = [], []
            for k in np.unique(crop[crop >= 0]):
                flat = np.flatnonzero(crop.ravel() == k)
                chosen = rng.choice(flat, size=min(voxels_per_class, len(flat)), replace=False)
                pts.append(np.stack(np.unravel_index(np.sort(chosen), crop.shape), axis=1))
                cls.append(np.full(len(chosen), int(k), dtype=np.int64))
            vols.append(v)
            starts.append(start)
            centres.append(c)
            points.append(np.concatenate(pts).astype(np.int64))
            point_classes.append(np.concatenate(cls))
    return CropPool(patch=patch, volume=np.array(vols, dtype=np.int64), starts=np.array(starts, dtype=np.int64).reshape(-1, 3),
                    centre_class=np.array(centres, dtype=np.int64), points=points, point_classes=point_classes)


def fraction_subset(pool: CropPool, fraction: float, seed: int, unit: str = "crops") -> np.ndarray:
    """Indices of the pool's crops in a label fraction: nested across fractions (one seeded permutation).

    unit="crops": ceil(fraction * N) crops. unit="volumes": every crop of ceil(fraction * V) volumes.
    """
    rng = np.random.default_rng([seed, 7919])
    if unit == "volumes":
        volumes = np.unique(pool.volume)
        keep = volumes[rng.permutation(len(volumes))[: max(1, math.ceil(fraction * len(volumes) - 1e-9))]]
        return np.flatnonzero(np.isin(pool.volume, keep))
    order = rng.permutation(len(pool))
    return np.sort(order[: max(1, math.ceil(fraction * len(pool) - 1e-9))])


def scaled_volumes(data: ProbeData, scaler: IntensityFn) -> list[np.ndarray]:
    return [np.ascontiguousarray(scaler(v.image, v.info), dtype=np.float32) for v in data.volumes]


def _crop_loc(data: ProbeData, volume: int, start: np.ndarray, patch: int) -> np.ndarray:
    """Crop centre scaled to [-1, 1] per axis of its volume (stand-in for DrasCLR's atlas coordinate)."""
    shape = np.asarray(data.volumes[volume].label.shape, dtype=np.float64)
    centre = start + patch // 2
    return (2.0 * centre / np.maximum(shape - 1.0, 1.0) - 1.0).astype(np.float32)


@torch.no_grad()
def pool_features(net: FeatureNet, data: ProbeData, scaled: list[np.ndarray], pool: CropPool, batch_size: int,
                  voxels: bool = True) -> dict[str, Any]:
    """Frozen features of every crop: pooled [N, C] and (voxels=True) the voxel features [M, C] with their labels."""
    pooled, voxel_feats = [], []
    for lo in range(0, len(pool), batch_size):
        idx = range(lo, min(lo + batch_size, len(pool)))
        x = torch.from_numpy(np.stack([read_box(scaled[pool.volume[i]], pool.starts[i], (pool.patch,) * 3,
                                                fill=float(scaled[pool.volume[i]].min())) for i in idx])[:, None])
        loc = None
        if not net.dense:
            loc = torch.from_numpy(np.stack([_crop_loc(data, pool.volume[i], pool.starts[i], pool.patch) for i in idx]))
        levels = net.levels(x, loc)
        pooled.append(net.pool(levels))
        if voxels and net.dense:
            voxel_feats.extend(sample_levels(levels, (pool.patch,) * 3, [torch.from_numpy(pool.points[i]) for i in idx]))
    out: dict[str, Any] = {"pooled": torch.cat(pooled).double().numpy()}
    if voxels and net.dense:
        out["voxels"] = voxel_feats  # per crop [n_i, C] float32
        out["channels"] = [int(f.shape[1]) for f in levels]
    return out
