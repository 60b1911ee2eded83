"""Conversion-time preprocessing: RAS+ reorientation, resampling, CT windowing, MR normalisation and the foreground bounding box."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from rayssl.data.intensity import IntensityMapping

from .errors import ConversionError

# CT windows used by the reference SSL/segmentation pipelines (e.g. SwinUNETR on BTCV).
DEFAULT_CT_WINDOW = (-175.0, 250.0)
DEFAULT_MR_PERCENTILES = (0.5, 99.5)
CT_BODY_THRESHOLD_HU = -500.0
CT_BACKGROUND_HU = -1024.0
# CT is stored as int16 HU. A volume whose values span less than this cannot be HU (air to soft
# tissue alone spans ~1000): it is normalised, a mask, or not CT. Fractional values need a wider
# span, since z-scored or [0, 255]-scaled CT can span a few tens.
HU_MIN_SPAN = 10.0
HU_MIN_SPAN_FRACTIONAL = 100.0
INT16 = np.iinfo(np.int16)
# Foreground boxes are found on a strided copy of big volumes: the box only needs to be ~voxel exact.
BBOX_MAX_VOXELS = 8_000_000


@dataclass
class PreparedVolume:
    """A volume ready to store: RAS+ (unless reorientation was turned off), with its record."""

    image: np.ndarray
    affine: np.ndarray
    modality: str
    label: np.ndarray | None = None
    mask: np.ndarray | None = None
    preprocessing: list[dict] = field(default_factory=list)
    bbox: list[int] | None = None
    background: float = 0.0
    intensity: dict = field(default_factory=dict)
    orientation: str = "RAS"


def axcodes(affine: np.ndarray) -> str:
    """Closest axis codes of an affine, e.g. 'RAS' or 'LPS'."""
    import nibabel as nib

    return "".join(nib.orientations.aff2axcodes(affine))


def reorient_to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/permute array axes to the closest RAS+ orientation, as nibabel.as_closest_canonical.

    Returns the reoriented (contiguous) array and its affine. Voxel values are untouched.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    if np.array_equal(ornt, nib.orientations.axcodes2ornt("RAS")):
        return array, affine
    reoriented = nib.orientations.apply_orientation(array, ornt)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)
    return np.ascontiguousarray(reoriented), new_affine


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each array axis: the norms of the affine's columns."""
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def direction_of(affine: np.ndarray) -> np.ndarray:
    """Direction cosines: rows = world axes (R, A, S), columns = array axes."""
    return np.asarray(affine)[:3, :3] / spacing_of(affine)[None, :]


def resample(array: np.ndarray, affine: np.ndarray, spacing: Sequence[float], *,
             nearest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Resample to `spacing` (mm) with MONAI `Spacing`: trilinear for images, nearest for labels.

    The orientation (direction cosines) is kept; MONAI picks the output grid and returns its
    affine. Images and their labels share input grids, so they get identical output grids.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    source_dtype = array.dtype
    tensor = MetaTensor(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None],
                        affine=torch.from_numpy(np.asarray(affine, dtype=np.float64)))
    transform = Spacing(pixdim=tuple(float(s) for s in spacing),
                        mode="nearest" if nearest else "bilinear", padding_mode="border",
                        dtype=torch.float32)
    out = transform(tensor)
    result = out.numpy()[0]
    new_affine = out.affine.numpy().astype(np.float64)
    if nearest or np.issubdtype(source_dtype, np.integer):
        info = np.iinfo(source_dtype) if np.issubdtype(source_dtype, np.integer) else None
        result = np.rint(result)
        if info is not None:
            result = np.clip(result, info.min, info.max)
        result = result.astype(source_dtype)
    return np.ascontiguousarray(result), new_affine


def ct_window(array: np.ndarray, hu_min: float, hu_max: float) -> np.ndarray:
    """Clip HU to [hu_min, hu_max] and scale linearly to [0, 1] (float32)."""
    if not hu_max > hu_min:
        raise ConversionError(f"window=({hu_min}, {hu_max}): the upper HU bound must exceed the "
                              "lower one, e.g. (-175, 250).")
    return IntensityMapping("hu_window", hu_min, hu_max).apply(array)


def percentile_normalize(array: np.ndarray, lower: float, upper: float
                         ) -> tuple[np.ndarray, float, float]:
    """Map the [lower, upper] percentiles of the volume to [0, 1] and clip (float32).

    Percentiles are over the whole volume (MR background is ~0, so the lower one is the
    background level). Returns the scaled array and the two intensity values used.
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise ConversionError(f"normalize=({lower}, {upper}): give two percentiles with "
                              "0 <= lower < upper <= 100, e.g. (0.5, 99.5).")
    mapping = IntensityMapping("percentile", lower, upper)
    low, high = mapping.bounds(array)  # type: ignore[misc]
    return mapping.apply(array, (low, high)), low, high


def foreground_bbox(array: np.ndarray, modality: str) -> list[int]:
    """Bounding box [x0, y0, z0, x1, y1, z1] (half-open voxel indices) of the body / foreground.

    CT: voxels above -500 HU, largest connected component after a small opening (which cuts the
    thin patient table off the body). MR: voxels above 5% of the 99th percentile, largest
    component. Falls back to the whole volume when nothing is found. Big volumes are searched on a
    strided copy and the box widened by one stride, so it never cuts the body.
    """
    from scipy import ndimage

    shape = np.asarray(array.shape)
    stride = max(1, int(np.ceil((array.size / BBOX_MAX_VOXELS) ** (1 / 3))))
    small = array[::stride, ::stride, ::stride]
    if modality == "CT":
        foreground = small > CT_BODY_THRESHOLD_HU
    else:
        high = float(np.percentile(small, 99.0))
        low = float(np.min(small))
        foreground = small > low + 0.05 * (high - low) if high > low else np.zeros_like(small,
                                                                                        bool)
    if foreground.any():
        opened = ndimage.binary_opening(foreground, iterations=1)
        if opened.any():
            foreground = opened
    labels, count = ndimage.label(foreground)
    if count == 0:
        return [0, 0, 0, *[int(s) for s in shape]]
    sizes = np.bincount(labels.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    box = ndimage.find_objects((labels == largest).astype(np.int8))[0]
    start = np.array([s.start for s in box]) * stride
    stop = np.array([s.stop for s in box]) * stride
    if stride > 1:
        start, stop = start - stride, stop + stride
    start = np.clip(start, 0, shape)
    stop = np.clip(stop, start + 1, shape)
    return [*(int(v) for v in start), *(int(v) for v in stop)]


def detect_modality(array: np.ndarray, declared: str | None) -> str:
    """'CT' or 'MR': the file's own Modality tag when it says CT/MR, else CT if min < -500."""
    if declared:
        upper = declared.upper()
        if upper == "CT":
            return "CT"
        if upper in ("MR", "MRI"):
            return "MR"
    return "CT" if float(np.min(array)) < -500 else "MR"


def as_label(array: np.ndarray, source: str) -> np.ndarray:
    """Integer class map (uint8, or uint16 when >255 classes); refuses fractional/negative values."""
    values = np.asarray(array)
    if np.issubdtype(values.dtype, np.floating):
        rounded = np.rint(values)
        if not np.allclose(values, rounded, atol=1e-3):
            raise ConversionError(
                f"{source}: label holds non-integer values; a label must be an integer class "
                "map (did you pass an image as the label?).", path=source)
        values = rounded
    if values.min() < 0:
        raise ConversionError(f"{source}: label holds negative values; class ids must be >= 0.",
                              path=source)
    top = int(values.max())
    if top > np.iinfo(np.uint16).max:
        raise ConversionError(f"{source}: label has class id {top}; at most 65535 is supported.",
                              path=source)
    return values.astype(np.uint8 if top <= 255 else np.uint16)


def as_mask(array: np.ndarray) -> np.ndarray:
    """Binary uint8 {0, 1} mask: every non-zero voxel is inside."""
    return (np.asarray(array) != 0).astype(np.uint8)


def check_same_grid(image_shape: tuple, image_affine: np.ndarray, other_shape: tuple,
                    other_affine: np.ndarray, *, what: str, image_source: str,
                    other_source: str) -> None:
    """Refuse a label/mask whose voxel grid differs from the image's (after reorientation)."""
    if tuple(image_shape) != tuple(other_shape):
        raise ConversionError(
            f"{other_source}: {what} shape {tuple(other_shape)} does not match the image shape "
            f"{tuple(image_shape)} of {image_source}. The {what} must be on the image's voxel "
            f"grid: check that the {what}s are paired with the right images.",
            path=other_source)
    spacing = spacing_of(image_affine)
    # Headers of labels are often re-saved with float noise: tolerate a fraction of a voxel.
    tolerance = 0.5 * float(spacing.min())
    if np.abs(np.asarray(other_affine) - np.asarray(image_affine))[:3].max() > tolerance:
        raise ConversionError(
            f"{other_source}: {what} has the image's shape but a different position/orientation "
            f"than {image_source} (affines differ by more than half a voxel). Resample the "
            f"{what} onto the image grid first.", path=other_source)


def check_ct_values(image: np.ndarray, source: str | None = None) -> list[dict]:
    """Refuse CT values that cannot be Hounsfield units; return records of what storing them does.

    Refused (ConversionError naming `source` and the fix): values outside int16 (e.g. uint16 with
    an implicit offset: clipping would corrupt them), and a span too narrow for HU (data scaled to
    [0, 1], a mask). Fractional HU in a plausible range are rounded to int16 (at most 0.5 HU) and
    the rounding is recorded; a CT with no value below 0 (no air or fat) gets a warning record.
    """
    where = f"{source}: " if source else ""
    fix = ("If it is not CT, pass --modality MR (convert(modality='MR')); if it is CT, rescale "
           "it to Hounsfield units first (HU = stored * RescaleSlope + RescaleIntercept).")
    low, high = float(np.min(image)), float(np.max(image))
    if high > INT16.max or low < INT16.min:
        outside = int(np.count_nonzero((image > INT16.max) | (image < INT16.min)))
        raise ConversionError(
            f"{where}CT values span [{low:g}, {high:g}]: {outside} voxel(s) lie outside "
            f"[{INT16.min}, {INT16.max}], which no Hounsfield value reaches and int16 cannot "
            "hold (storing them would clip them). This looks like unsigned raw data with an "
            "implicit offset (stored = HU + 1024 or + 32768): subtract the offset and save the "
            f"scan again. {fix}", path=source)
    fractional = bool(np.issubdtype(image.dtype, np.floating)
                      and not np.array_equal(np.rint(image), image))
    span = high - low
    if span < HU_MIN_SPAN or (fractional and span < HU_MIN_SPAN_FRACTIONAL):
        kind = "fractional values" if fractional else "values"
        raise ConversionError(
            f"{where}modality CT, but its {kind} span only [{low:g}, {high:g}]: these cannot "
            "be Hounsfield units (air is about -1000, soft tissue 0 to 100), and storing them as "
            f"int16 HU would round them to {int(np.rint(high - low)) + 1} level(s). {fix}",
            path=source)
    notes: list[dict] = []
    if fractional:
        change = np.abs(np.rint(image) - image)
        notes.append({"op": "round_to_int16_hu", "voxels_changed": int(np.count_nonzero(change)),
                      "max_change": float(change.max())})
    if low >= 0:
        notes.append({"op": "check_hu", "min": low, "max": high,
                      "warning": f"{where}CT has no value below 0 (minimum {low:g}): no air or "
                                 "fat, so the values may carry an implicit offset (e.g. HU + "
                                 "1024) and not be Hounsfield units. If so, subtract it and "
                                 "convert again."})
    return notes


def preprocess(image: np.ndarray, affine: np.ndarray, *, modality: str,
               label: np.ndarray | None = None, mask: np.ndarray | None = None,
               reorient: bool = True, spacing: Sequence[float] | None = None,
               window: Sequence[float] | None = None,
               normalize: Sequence[float] | None = None,
               source: str | None = None) -> PreparedVolume:
    """Run the conversion steps in order and record each in `preprocessing`.

    Order: reorient -> resample -> bbox (on HU / raw MR intensities) -> CT window (CT only) or
    percentile normalisation (MR only). `label` and `mask` must already be on the image grid;
    they are reoriented/resampled with it (nearest neighbour). CT without a window stays int16 HU;
    CT values that cannot be HU are refused first (`check_ct_values`, messages name `source`).
    """
    # On the values as read: resampling would make integer HU fractional.
    steps: list[dict] = check_ct_values(image, source) if modality == "CT" else []
    orientation = axcodes(affine)
    if reorient:
        image_new, affine_new = reorient_to_ras(image, affine)
        if label is not None:
            label, _ = reorient_to_ras(label, affine)
        if mask is not None:
            mask, _ = reorient_to_ras(mask, affine)
        steps.append({"op": "reorient", "from": orientation, "to": "RAS"})
        image, affine, orientation = image_new, affine_new, "RAS"

    if spacing is not None:
        before = spacing_of(affine)
        target = np.asarray(spacing, dtype=float)
        if not np.allclose(before, target, rtol=1e-4, atol=1e-4):
            image, new_affine = resample(image, affine, target, nearest=False)
            if label is not None:
                label, _ = resample(label, affine, target, nearest=True)
            if mask is not None:
                mask, _ = resample(mask, affine, target, nearest=True)
            affine = new_affine
        steps.append({"op": "resample", "spacing": [float(s) for s in target],
                      "from_spacing": [round(float(s), 6) for s in before],
                      "image_mode": "bilinear", "label_mode": "nearest", "library": "monai.Spacing"})

    if modality == "CT":
        # Keep HU as int16: it is lossless for CT and half the bytes of float32.
        if np.issubdtype(image.dtype, np.floating):
            image = np.rint(image)
        # check_ct_values refused values outside int16; resampling stays within the input range.
        image = np.clip(image, INT16.min, INT16.max).astype(np.int16)
    else:
        image = np.asarray(image, dtype=np.float32)

    bbox = foreground_bbox(image, modality)

    if modality == "CT":
        intensity, background = {"unit": "HU"}, CT_BACKGROUND_HU
        if window is not None:
            hu_min, hu_max = (float(v) for v in window)
            image = ct_window(image, hu_min, hu_max)
            steps.append({"op": "ct_window", "hu_min": hu_min, "hu_max": hu_max,
                          "out_range": [0.0, 1.0], "clip": True})
            intensity = {"unit": "scaled", "range": [0.0, 1.0], "from": "HU",
                         "window": [hu_min, hu_max]}
            background = 0.0
    else:
        intensity, background = {"unit": "arbitrary"}, 0.0
        if normalize is not None:
            lower, upper = (float(v) for v in normalize)
            image, low_value, high_value = percentile_normalize(image, lower, upper)
            steps.append({"op": "percentile_normalize", "lower_percentile": lower,
                          "upper_percentile": upper, "lower_value": low_value,
                          "upper_value": high_value, "out_range": [0.0, 1.0], "clip": True})
            intensity = {"unit": "scaled", "range": [0.0, 1.0],
                         "percentiles": [lower, upper]}
            background = 0.0

    return PreparedVolume(image=image, affine=affine, modality=modality, label=label, mask=mask,
                          preprocessing=steps, bbox=bbox, background=float(background),
                          intensity=intensity, orientation=orientation)
