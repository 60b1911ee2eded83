"""Derived stores holding each volume's foreground box resized to one fixed shape, written once.

VoCo's official pipeline resizes every volume's foreground box to its region size (384x384x96) and
caches the result (MONAI PersistentDataset). Doing that resize per sample costs ~4x the data CPU of
reading a prepared region (benchmarks/README.md), so `VoCo.prepare` writes the resized boxes here
once, as an ordinary rayssl store (one Ray task per volume, atomic per volume, reused while the
source volume, its box and the size are unchanged).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from rayssl.data.jobs import JobRunner, run_in_process

# Bump when the resize itself changes, so stores written by older code are rebuilt.
RESIZE_VERSION = 1


def default_resized_store(store: str, size: Sequence[int]) -> str:
    """`<store>.fg-XxYxZ.zarr` beside a local source store (on a shared filesystem it is shared too)."""
    if "://" in store:
        raise ValueError(
            f"source store {store} is not on a filesystem: give the resized store a path every node can "
            f"read and write (e.g. --set voco.prepared_store=/mnt/shared/regions.zarr), or disable the "
            f"preparation (--set voco.prepare_regions=false)")
    return f"{store.rstrip('/')}.fg-{'x'.join(str(int(v)) for v in size)}.zarr"


def foreground_box(bbox: Sequence[int], shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lo, hi) of a stored foreground box; the whole volume when conversion found no foreground."""
    x0, y0, z0, x1, y1, z1 = (int(v) for v in bbox)
    if x1 <= x0 or y1 <= y0 or z1 <= z0:
        return (0, 0, 0), tuple(int(v) for v in shape)
    return (x0, y0, z0), (x1, y1, z1)


def _spacing(lo, hi, spacing, size) -> tuple[float, float, float]:
    """Voxel spacing (mm) of a box [lo, hi) resized to `size` voxels."""
    return tuple(float((b - a) * s / n) for a, b, s, n in zip(lo, hi, spacing, size))


def _key(volume, size: Sequence[int], via_spacing: float | None = None) -> dict:
    """What a prepared region depends on: the source volume's content, its box, the target size (and the
    spacing it is resampled to on the way, when one is asked for)."""
    key = {"source_store": str(volume.extra.get("store")), "source_group": str(volume.extra.get("group")),
           "source_sha256": str(volume.extra.get("source_sha256", "")), "bbox": [int(v) for v in volume.bbox],
           "shape": [int(v) for v in volume.shape], "size": [int(v) for v in size], "version": RESIZE_VERSION}
    if via_spacing is not None:
        key["via_spacing_mm"] = float(via_spacing)
    return key


def spacing_grid(lo: Sequence[int], hi: Sequence[int], spacing: Sequence[float], via_spacing: float) -> tuple[int, ...]:
    """Voxels per axis of the box [lo, hi) resampled to `via_spacing` mm (at least 2 per axis)."""
    return tuple(max(2, int(round((b - a) * s / via_spacing))) for a, b, s in zip(lo, hi, spacing))


def _existing_key(out: str, volume_id: str) -> dict | None:
    path = Path(out) / volume_id / "zarr.json"
    try:
        attrs = json.loads(path.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return None
    return attrs.get("rayssl", {}).get("resized_from")  # write_volume keeps its attributes under "rayssl"


def _resize_one(volume, size: tuple[int, int, int], out: str, key: dict) -> None:
    """Read `volume`'s foreground box, resize it to `size` (trilinear, align_corners), write it to `out`.
    With `key["via_spacing_mm"]` the box is first resampled to that isotropic spacing (the paper pipeline's
    pre-processing, e.g. VoCo's Table 9: 1.5 mm, then resize), so detail finer than it is gone as there."""
    import torch
    import torch.nn.functional as F

    from datasets_zarr.store import write_volume
    from rayssl.data.read import StoreReader

    lo, hi = foreground_box(volume.bbox, volume.shape)
    reader = StoreReader(str(volume.extra["store"]))
    box = reader.read(volume.extra["group"], lo, [b - a for a, b in zip(lo, hi)], pad_value=volume.background,
                      dtype=None)
    with torch.no_grad():
        voxels = torch.from_numpy(box.astype(np.float32))[None, None]
        steps = [size]
        if key.get("via_spacing_mm") is not None:
            steps.insert(0, spacing_grid(lo, hi, volume.spacing, key["via_spacing_mm"]))
        for shape in steps:
            # antialias is unsupported for 3D trilinear; the first step is a resample like Spacingd's.
            voxels = F.interpolate(voxels, size=tuple(shape), mode="trilinear", align_corners=True)
        region = voxels[0, 0].numpy()
    if np.issubdtype(box.dtype, np.integer):  # int16 HU stays int16 HU (rounding: +-0.5 HU)
        info = np.iinfo(box.dtype)
        region = np.clip(np.rint(region), info.min, info.max).astype(box.dtype)
    spacing = _spacing(lo, hi, volume.spacing, size)
    affine = np.diag([*spacing, 1.0])
    write_volume(out, volume.id, region, affine, modality=volume.modality.upper(), bbox=[0, 0, 0, *size],
                 background=volume.background, source=f"{volume.extra['store']}#{volume.extra['group']}",
                 source_sha256=key["source_sha256"],
                 preprocessing=[{"step": "resize_foreground_box", "bbox": key["bbox"], "size": list(size),
                                 **({"via_spacing_mm": key["via_spacing_mm"]} if "via_spacing_mm" in key else {})}],
                 extra_attrs={"resized_from": key})


def resize_foreground_boxes(volumes: Sequence, size: Sequence[int], out: str, *,
                            runner: JobRunner = run_in_process, progress: bool = True,
                            via_spacing: float | None = None) -> list:
    """Each volume's foreground box resized to `size` (resampled to `via_spacing` mm isotropic on the
    way, when given), in the store `out`, one `runner` job per volume (rayssl.train runs them as Ray
    tasks; default: in this process); returns their VolumeInfo.

    Volumes already in `out` from the same source volume, box and size are reused, so a second run
    (or a resumed one) starts at once. The returned list keeps the order (and `index`) of `volumes`.
    """
    from datasets_zarr.manifest import write_manifest

    size = tuple(int(v) for v in size)
    os.makedirs(out, exist_ok=True)
    keys = {v.id: _key(v, size, via_spacing) for v in volumes}
    todo = [v for v in volumes if _existing_key(out, v.id) != keys[v.id]]
    if todo:
        print(f"[rayssl] resizing {len(todo)} of {len(volumes)} foreground boxes to {'x'.join(map(str, size))} "
              f"into {out} (once; reused by later runs)")
        runner(_resize_one, [(v, size, out, keys[v.id]) for v in todo], desc="resize regions", progress=progress)
        write_manifest(out, splits={v.id: str(v.extra.get("split", "train")) for v in volumes})
    prepared = []
    for v in volumes:
        spacing = _spacing(*foreground_box(v.bbox, v.shape), v.spacing, size)
        extra = {**v.extra, "store": os.path.abspath(out), "group": v.id, "resized_from_store": v.extra.get("store")}
        prepared.append(replace(v, shape=size, spacing=spacing, bbox=(0, 0, 0, *size), extra=extra))
    return prepared
