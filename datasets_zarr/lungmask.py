"""Classical lung and body masks (HU thresholds, components, morphology), stored as a volume's `mask` array."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from rayssl.data.intensity import stored_hu_offset

from .errors import ConversionError
from .store import blosc_codecs, read_volume_attrs

MaskKind = Literal["lung", "foreground"]

# Lung parenchyma is below about -400 HU and soft tissue above about -100 HU; -320 HU is the
# usual separating threshold of classical lung segmentation (e.g. Hu et al., IEEE TMI 2001).
LUNG_THRESHOLD_HU = -320.0
BODY_THRESHOLD_HU = -500.0
# Components of the air mask kept as lung: at least this fraction of the largest one (left and
# right lungs, possibly split), at least this volume (drops bowel gas bubbles and noise).
LUNG_COMPONENT_FRACTION = 0.1
LUNG_MIN_VOLUME_ML = 1.0
CLOSING_RADIUS_MM = 3.0
# A lung mask "looks healthy" (usable as atlas) when it fills this fraction of the body's bounding
# box (attrs `bbox`): about 0.1-0.3 for a chest CT, far less for a scan that only grazes the lungs.
PLAUSIBLE_LUNG_FRACTION = (0.05, 0.6)
GENERATOR = "datasets_zarr.lungmask"


class EmptyMaskError(ConversionError):
    """The mask of a volume is empty (e.g. a lung mask on a scan without lungs)."""


@dataclass(frozen=True)
class MaskInfo:
    """What is known about a volume's stored mask (attrs of its `mask` array)."""

    volume_id: str
    kind: str  # "lung", "foreground" or "user" (supplied with the volume)
    voxels: int
    volume_ml: float
    bbox_fraction: float  # mask voxels / voxels of the body bounding box (attrs `bbox`)

    @property
    def plausible_lung(self) -> bool:
        """Could be a healthy lung mask: a lung or user mask filling a plausible part of the body box."""
        lo, hi = PLAUSIBLE_LUNG_FRACTION
        return self.kind in ("lung", "user") and lo <= self.bbox_fraction <= hi


def _ball(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Ellipsoidal structuring element of `radius_mm` on a grid of `spacing` (at least 1 voxel)."""
    radii = [max(1, int(round(radius_mm / max(s, 1e-6)))) for s in spacing]
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    return sum((g / r) ** 2 for g, r in zip(grids, radii)) <= 1.0


def _morphology(operation, mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """A scipy.ndimage binary `operation` that treats the volume edge as continuing (edge padding).

    Scans cut the body (and often the lungs) at the field of view; with scipy's default zero
    border an erosion would eat the mask along those faces.
    """
    pad = [(r, r) for r in (np.asarray(structure.shape) // 2)]
    padded = np.pad(mask, pad, mode="edge")
    out = operation(padded, structure=structure)
    return out[tuple(slice(r, r + n) for (r, _), n in zip(pad, mask.shape))]


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill holes in every axial (z) slice: vessels inside the lungs, open to the hilum in 3D."""
    from scipy import ndimage

    out = mask.copy()
    for z in range(mask.shape[2]):
        if out[:, :, z].any():
            out[:, :, z] = ndimage.binary_fill_holes(out[:, :, z])
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def body_mask(image: np.ndarray, *, hu: bool = True, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Body (or head) outline: threshold, largest component, holes filled per axial slice.

    CT in HU: voxels above -500 HU. Otherwise (MR, scaled CT): above 5% of the intensity range up
    to the 99th percentile, as `preprocess.foreground_bbox`. Returns bool (x, y, z).
    """
    from scipy import ndimage

    image = np.asarray(image)
    if hu:
        foreground = image > BODY_THRESHOLD_HU
    else:
        high, low = float(np.percentile(image, 99.0)), float(np.min(image))
        foreground = image > low + 0.05 * (high - low) if high > low else np.zeros(image.shape, bool)
    if not foreground.any():
        return foreground
    # A small opening detaches the scanner table before the largest component is taken.
    opened = _morphology(ndimage.binary_opening, foreground, ndimage.generate_binary_structure(3, 1))
    foreground = _largest_component(opened if opened.any() else foreground)
    foreground = _morphology(ndimage.binary_closing, foreground, _ball(CLOSING_RADIUS_MM, spacing))
    return _fill_holes_per_slice(foreground)


def lung_mask(
    image_hu: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), *, threshold_hu: float = LUNG_THRESHOLD_HU
) -> np.ndarray:
    """Classical lung segmentation of a CT in HU: returns a uint8 mask (x, y, z).

    1. air = HU < threshold; 2. remove air connected to the x/y faces of the volume (the air
    around the patient; z faces are kept, lungs are often cut by the field of view); 3. keep the
    large remaining components (left/right lungs and airways: >= 10% of the largest, >= 1 mL);
    4. morphological closing (3 mm ball) and holes filled per axial slice (vessels, nodules).
    """
    from scipy import ndimage

    image_hu = np.asarray(image_hu)
    spacing = [float(s) for s in spacing]
    air = image_hu < threshold_hu
    labels, count = ndimage.label(air)
    if count:
        faces = np.concatenate([labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(), labels[:, -1].ravel()])
        outside = np.unique(faces[faces > 0])
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        sizes[0] = 0
        sizes[outside] = 0
        voxel_ml = float(np.prod(spacing)) / 1000.0
        largest = int(sizes.max())
        keep = (sizes >= max(LUNG_COMPONENT_FRACTION * largest, LUNG_MIN_VOLUME_ML / voxel_ml)) & (sizes > 0)
        lungs = keep[labels]
    else:
        lungs = np.zeros(image_hu.shape, bool)
    if lungs.any():
        lungs = _morphology(ndimage.binary_closing, lungs, _ball(CLOSING_RADIUS_MM, spacing))
        lungs = _fill_holes_per_slice(lungs)
    return lungs.astype(np.uint8)


def empty_mask_message(volume_id: str, kind: str) -> str:
    if kind == "lung":
        return (
            f"volume {volume_id!r}: the lung mask is empty (no air region below {LUNG_THRESHOLD_HU:g} HU inside "
            f"the body). If this scan has no lungs (e.g. a head or abdomen scan), let the landmarks cover the "
            f"body outline instead: --set mask=foreground"
        )
    return (
        f"volume {volume_id!r}: the {kind} mask is empty (no foreground found); check the volume's intensities "
        f"or supply a `mask` array with the volume"
    )


# ---------------------------------------------------------------------------------------------
# Stored masks
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace a JSON file atomically (temp file + os.replace), so readers never see half of it."""
    temporary = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        temporary.write_text(json.dumps(data, indent=2))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def update_volume_attrs(store: str | os.PathLike, volume_id: str, updates: dict) -> dict:
    """Merge `updates` into a volume group's `rayssl` attrs (atomic rewrite of its zarr.json)."""
    path = Path(store) / volume_id / "zarr.json"
    metadata = _read_json(path)
    if metadata.get("node_type") != "group":
        raise ConversionError(f"{store}: no volume group {volume_id!r}", volume_id=volume_id)
    attrs = metadata.setdefault("attributes", {}).setdefault("rayssl", {})
    attrs.update(updates)
    write_json_atomic(path, metadata)
    return attrs


def stored_mask_info(store: str | os.PathLike, volume_id: str) -> MaskInfo | None:
    """The volume's usable stored mask, else None.

    A `mask` array this module did not generate is the user's and always counts. A generated one
    counts only once the volume attrs say `has_mask` (set after it was completely written).
    """
    attrs = read_volume_attrs(store, volume_id)
    mask_meta = _read_json(Path(store) / volume_id / "mask" / "zarr.json")
    if not attrs or mask_meta.get("node_type") != "array":
        return None
    info = mask_meta.get("attributes", {}).get("rayssl", {})
    if info.get("generated_by") == GENERATOR:
        if not attrs.get("has_mask"):
            return None
        kind, voxels = str(info["kind"]), int(info["voxels"])
    else:
        kind, voxels = "user", int(np.count_nonzero(read_mask(store, volume_id)))
    return _mask_info(volume_id, kind, voxels, attrs)


def _mask_info(volume_id: str, kind: str, voxels: int, attrs: dict) -> MaskInfo:
    spacing = attrs.get("spacing", (1.0, 1.0, 1.0))
    box = attrs.get("bbox") or [0, 0, 0, *attrs["shape"]]
    box_voxels = max(1, int(np.prod(np.subtract(box[3:], box[:3]))))
    return MaskInfo(volume_id, kind, voxels, voxels * float(np.prod(spacing)) / 1000.0, voxels / box_voxels)


def _write_mask_array(store: Path, volume_id: str, mask: np.ndarray, mask_attrs: dict) -> None:
    """Write `mask` next to `image` (same chunks, shards, codecs) under a temporary name, then rename.

    The volume's `has_mask` is switched off before and on after, so neither a half-written array
    nor a stale one is ever taken as valid.
    """
    import zarr

    group_path = store / volume_id
    image_meta = _read_json(group_path / "image" / "zarr.json")
    chunks, shards = _chunking(image_meta, mask.shape)
    update_volume_attrs(store, volume_id, {"has_mask": False})
    for leftover in group_path.glob(".mask-*"):  # arrays of an interrupted earlier write
        shutil.rmtree(leftover, ignore_errors=True)
    temporary_name = f".mask-{secrets.token_hex(4)}"
    serializer, compressors = blosc_codecs()
    group = zarr.open_group(str(group_path), mode="r+")
    array = group.create_array(
        temporary_name,
        shape=mask.shape,
        dtype=np.uint8,
        chunks=chunks,
        shards=shards,
        fill_value=0,
        serializer=serializer,
        compressors=compressors,
        dimension_names=("x", "y", "z"),
        attributes={"rayssl": mask_attrs},
    )
    array[...] = np.ascontiguousarray(mask, dtype=np.uint8)
    final = group_path / "mask"
    if final.exists():
        retired = group_path / f".mask-old-{secrets.token_hex(4)}"
        os.rename(final, retired)
        shutil.rmtree(retired, ignore_errors=True)
    os.rename(group_path / temporary_name, final)
    update_volume_attrs(store, volume_id, {"has_mask": True})


def _chunking(image_meta: dict, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(chunks, shards) of the image array, read from its metadata (sharded arrays nest the chunks)."""
    grid = image_meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
    for codec in image_meta.get("codecs", []):
        if codec.get("name") == "sharding_indexed":
            return tuple(codec["configuration"]["chunk_shape"]), tuple(grid)
    return tuple(grid or [min(64, s) for s in shape]), None


def ensure_mask(store: str | os.PathLike, volume_id: str, kind: MaskKind = "lung") -> MaskInfo:
    """Compute and store the volume's mask unless a valid one exists; returns what is stored.

    A user-supplied mask (one this module did not generate) is always used as is. A generated
    mask of another kind is recomputed. Raises EmptyMaskError naming the volume when the mask
    would be empty (for lung masks, suggesting `--set mask=foreground`).
    """
    import zarr

    store = Path(store)
    existing = stored_mask_info(store, volume_id)
    if existing is not None and existing.kind in ("user", kind):
        if existing.voxels == 0:
            raise EmptyMaskError(empty_mask_message(volume_id, kind), volume_id=volume_id)
        if not (read_volume_attrs(store, volume_id) or {}).get("has_mask"):
            update_volume_attrs(store, volume_id, {"has_mask": True})  # a user mask added without the flag
        return existing
    attrs = read_volume_attrs(store, volume_id)
    if attrs is None:
        raise ConversionError(f"{store}: no volume {volume_id!r}", volume_id=volume_id)
    spacing = [float(s) for s in attrs["spacing"]]
    offset = stored_hu_offset(str(attrs.get("modality", "")), attrs.get("intensity"), str(attrs.get("dtype", "")))
    is_hu = offset is not None
    image = zarr.open_array(str(store / volume_id / "image"), mode="r")[...]
    if offset:  # stored = HU + offset (e.g. a uint16 CT): the thresholds are in HU
        image = image.astype(np.float32) - np.float32(offset)
    if kind == "lung":
        if not is_hu:
            raise ConversionError(
                f"volume {volume_id!r}: a lung mask needs a CT stored in HU (this volume is {attrs.get('modality')} "
                f"with intensity {attrs.get('intensity')}); supply a `mask` array, or use --set mask=foreground",
                volume_id=volume_id,
            )
        mask = lung_mask(image, spacing)
    else:
        mask = body_mask(image, hu=is_hu, spacing=spacing).astype(np.uint8)
    voxels = int(mask.sum())
    if voxels == 0:
        raise EmptyMaskError(empty_mask_message(volume_id, kind), volume_id=volume_id)
    info = _mask_info(volume_id, kind, voxels, attrs)
    mask_attrs = {
        "generated_by": GENERATOR,
        "kind": kind,
        "voxels": voxels,
        "volume_ml": info.volume_ml,
        "threshold_hu": LUNG_THRESHOLD_HU if kind == "lung" else (BODY_THRESHOLD_HU if is_hu else None),
    }
    _write_mask_array(store, volume_id, mask, mask_attrs)
    return info


def read_mask(store: str | os.PathLike, volume_id: str) -> np.ndarray:
    """The stored mask of a volume as a bool array (x, y, z)."""
    import zarr

    return zarr.open_array(str(Path(store) / volume_id / "mask"), mode="r")[...] != 0
