"""Embedded demo data: CT-like torso phantoms, MNI152-based brain MR variants, and cached demo stores built through the normal write path."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ConversionError

# Class ids of the phantom label map (`make_phantom`), id -> name.
DEMO_LABELS: dict[int, str] = {
    0: "background",
    1: "lung_right",
    2: "lung_left",
    3: "heart",
    4: "liver",
    5: "spleen",
    6: "kidney_right",
    7: "kidney_left",
    8: "bone",  # vertebrae and ribs
}
# Mean HU of each tissue; noise and partial-volume blur are added on top.
TISSUE_HU = {"air": -1000.0, "lung": -850.0, "fat": -100.0, "soft": 40.0, "vessel": 40.0,
             "heart": 45.0, "liver": 60.0, "spleen": 50.0, "kidney": 30.0, "disc": 80.0,
             "cancellous": 250.0, "bone": 700.0, "csf": 15.0}
DEFAULT_PHANTOM_SHAPE = (96, 96, 64)
DEFAULT_PHANTOM_SPACING = (4.0, 4.0, 5.0)
# Bump when the phantom or demo layout changes: cached demo stores are keyed on it.
# 2: arrays carry the chunk record (docs/store_format.md), so a cache built before it is rebuilt.
DEMO_VERSION = 2


# ----------------------------------------------------------------------------------------------
# CT phantom
# ----------------------------------------------------------------------------------------------


def phantom_affine(shape: Sequence[int] = DEFAULT_PHANTOM_SHAPE,
                   spacing: Sequence[float] = DEFAULT_PHANTOM_SPACING) -> np.ndarray:
    """RAS+ affine of a phantom grid: diagonal spacing, world origin at the grid centre."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * np.asarray(spacing, dtype=float)
    return affine


def make_phantom(seed: int, shape: Sequence[int] = DEFAULT_PHANTOM_SHAPE,
                 spacing: Sequence[float] = DEFAULT_PHANTOM_SPACING
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like torso (chest + upper abdomen) phantom: (image int16 HU, label uint8), axes (x, y, z) RAS+.

    Anatomy is defined in millimetres (x toward the patient's right, y anterior, z superior), so
    `shape`/`spacing` only change the sampling (field of view = shape * spacing, centred): a body
    outline with subcutaneous fat around soft tissue, two lungs (~-850 HU) with a branching vessel
    tree (~+40 HU), heart, liver, spleen, kidneys, vertebrae with discs and spinal canal, ribs
    (~+700 HU), air (-1000 HU) outside; partial-volume blur and correlated noise. Size, shape,
    position, rotation and noise vary with `seed`; the same seed gives the same volume. Class ids
    are in DEMO_LABELS.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing, dtype=np.float32)
    affine = phantom_affine(shape, spacing)
    axes = [(np.arange(n, dtype=np.float32) * spacing[d] + np.float32(affine[d, 3]))
            for d, n in enumerate(shape)]
    # Subject pose: a small rotation about z and a shift of the body in the field of view.
    angle = np.deg2rad(rng.uniform(-6, 6))
    shift = rng.normal(0, 6, size=2).astype(np.float32)
    gx, gy = np.meshgrid(axes[0] - shift[0], axes[1] - shift[1], indexing="ij")
    x2 = (np.cos(angle) * gx + np.sin(angle) * gy)[:, :, None]
    y2 = (-np.sin(angle) * gx + np.cos(angle) * gy)[:, :, None]
    z = axes[2][None, None, :] - np.float32(rng.normal(0, 8))

    image = np.full(shape, TISSUE_HU["air"], dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)

    def ellipsoid(center, radii):
        return (((x2 - center[0]) / radii[0]) ** 2 + ((y2 - center[1]) / radii[1]) ** 2
                + ((z - center[2]) / radii[2]) ** 2) <= 1.0

    # Body: elliptic cylinder whose width breathes slightly along z; fat ring under the skin.
    half_width = rng.uniform(150, 180) * (1 + 0.04 * np.sin(z / 90.0 + rng.uniform(0, 6)))
    half_depth = rng.uniform(100, 125) * np.ones_like(z)
    body_radius = np.sqrt((x2 / half_width) ** 2 + (y2 / half_depth) ** 2)
    body = body_radius <= 1.0
    fat_thickness = rng.uniform(8, 22)
    inner = np.sqrt((x2 / (half_width - fat_thickness)) ** 2
                    + (y2 / (half_depth - fat_thickness)) ** 2) <= 1.0
    image[body] = TISSUE_HU["fat"]
    image[inner & body] = TISSUE_HU["soft"]
    width, depth = float(np.mean(half_width)), float(half_depth.mean())

    # Lungs above a domed diaphragm; the mediastinum separates them.
    diaphragm = rng.uniform(5, 35)
    lung_height = rng.uniform(80, 100)
    masks = {}
    for side, label_id in ((1, 1), (-1, 2)):
        center = (side * 0.42 * width, -0.08 * depth, diaphragm + lung_height)
        radii = (0.32 * width * (1.0 if side > 0 else 0.9), 0.68 * depth, lung_height)
        lung = ellipsoid(center, radii) & inner & (side * x2 > 28)
        masks[label_id] = lung
    heart_center = (-0.15 * width + rng.normal(0, 5), 0.3 * depth, diaphragm + rng.uniform(35, 50))
    heart_radii = tuple(r * rng.uniform(0.85, 1.15) for r in (55.0, 45.0, 50.0))
    heart = ellipsoid(heart_center, heart_radii) & inner
    for label_id, lung in masks.items():
        lung &= ~heart
        image[lung] = TISSUE_HU["lung"]
        label[lung] = label_id

    # Vessel tree: from each hilum, branches aimed at random points of the lung, each splitting
    # in two, rasterised as capsules (segment + radius).
    vessels = np.zeros(shape, dtype=bool)
    for side, label_id in ((1, 1), (-1, 2)):
        lung = masks[label_id]
        if not lung.any():
            continue
        points = np.stack([np.broadcast_to(a, shape)[lung] for a in (x2, y2, z)], axis=1)
        hilum = np.array([side * 40.0, -0.05 * depth, diaphragm + 0.75 * lung_height])
        _grow_vessels(vessels, lung, x2, y2, z, hilum, points, radius=5.0, depth=5, rng=rng)
    image[vessels] = TISSUE_HU["vessel"]

    image[heart] = TISSUE_HU["heart"]
    label[heart] = 3
    # Abdomen texture: visceral fat and bowel gas pockets between the organs (unlabelled).
    abdomen = inner & (z < diaphragm - 10)
    for _ in range(14):
        center = (rng.uniform(-0.6, 0.6) * width, rng.uniform(-0.3, 0.7) * depth,
                  diaphragm - rng.uniform(20, 160))
        blob = ellipsoid(center, tuple(rng.uniform(8, 22, size=3))) & abdomen
        image[blob] = TISSUE_HU["fat"] if rng.random() < 0.6 else -900.0
    liver = ellipsoid((0.32 * width, 0.05 * depth, diaphragm - 55),
                      (0.5 * width * rng.uniform(0.9, 1.1), 0.7 * depth, rng.uniform(60, 80)))
    liver &= inner & (z < diaphragm + 12)
    image[liver] = TISSUE_HU["liver"]
    label[liver] = 4
    spleen = ellipsoid((-0.58 * width, -0.35 * depth, diaphragm - 45),
                       tuple(r * rng.uniform(0.8, 1.2) for r in (28.0, 45.0, 45.0))) & inner
    image[spleen] = TISSUE_HU["spleen"]
    label[spleen] = 5
    for side, label_id in ((1, 6), (-1, 7)):
        kidney = ellipsoid((side * 0.36 * width, -0.45 * depth,
                            diaphragm - 105 - (12 if side > 0 else 0) + rng.normal(0, 5)),
                           tuple(r * rng.uniform(0.85, 1.15) for r in (25.0, 28.0, 48.0)))
        image[kidney & inner] = TISSUE_HU["kidney"]
        label[kidney & inner] = label_id

    # Descending aorta, left-anterior of the spine (unlabelled, blood density).
    aorta = np.broadcast_to((x2 + 18) ** 2 + (y2 + 0.62 * depth - 34) ** 2 <= 11.0 ** 2, shape)
    image[aorta & inner & (label == 0)] = TISSUE_HU["vessel"]

    # Spine: vertebral bodies (cortex + cancellous bone) separated by discs, canal behind.
    spine_y = -0.62 * depth
    radius = rng.uniform(16, 20)
    ring = np.sqrt(x2 ** 2 + (y2 - spine_y) ** 2)
    period, phase = rng.uniform(28, 34), rng.uniform(0, 30)
    disc = np.abs(((z - phase) % period) - period / 2) < 3.0
    vertebra = (ring <= radius) & ~disc
    image[vertebra] = TISSUE_HU["cancellous"]
    image[vertebra & (ring > radius - 3.0)] = TISSUE_HU["bone"]
    image[(ring <= radius) & disc] = TISSUE_HU["disc"]
    canal_y = spine_y - radius - 10
    canal = np.broadcast_to(np.sqrt(x2 ** 2 + (y2 - canal_y) ** 2) <= 8.0, shape)
    arch = (np.sqrt(x2 ** 2 + (y2 - canal_y) ** 2) <= 14.0) & ~canal & ~disc
    spinous = (np.abs(x2) < 5) & (y2 < canal_y - 10) & (y2 > canal_y - 38) & ~disc
    posterior = (arch | spinous) & inner
    image[posterior] = TISSUE_HU["bone"]
    image[canal] = TISSUE_HU["csf"]
    bone = vertebra | posterior

    # Ribs: tilted bands just inside the body wall over the thorax, open at the sternum.
    rib_gap = rng.uniform(22, 28)
    tilt = 0.25 * (y2 - spine_y)
    band = np.abs(((z + tilt - rng.uniform(0, rib_gap)) % rib_gap) - rib_gap / 2) < 4.0
    shell = (body_radius > 0.86) & (body_radius < 0.93) & inner
    ribs = band & shell & (z > diaphragm - 50) & ~((np.abs(x2) < 25) & (y2 > 0))
    image[ribs] = TISSUE_HU["bone"]
    bone |= ribs
    label[bone] = 8

    # Partial-volume blur, then mildly correlated noise, as in a reconstructed CT.
    image = ndimage.gaussian_filter(image, sigma=0.6)
    noise = ndimage.gaussian_filter(rng.normal(0, 1, size=shape).astype(np.float32), sigma=0.7)
    noise *= rng.uniform(10, 25) / max(float(noise.std()), 1e-6)
    image = np.clip(np.rint(image + noise), -1024, 3071).astype(np.int16)
    return image, label


def _grow_vessels(out: np.ndarray, lung: np.ndarray, x, y, z, start: np.ndarray,
                  targets: np.ndarray, *, radius: float, depth: int,
                  rng: np.random.Generator) -> None:
    """Draw `2` branches from `start` toward random lung points (`targets`, (n, 3) mm), each
    going 60% of the way, then recurse from their ends with thinner branches."""
    for _ in range(2):
        target = targets[rng.integers(len(targets))]
        step = 0.6 * (target - start)
        length = float(np.linalg.norm(step))
        if length < 2 * radius:
            continue
        end = start + step
        # Only the z slices the capsule can reach are computed (x, y are rotated grids).
        z_axis = z[0, 0, :]
        reach = (z_axis >= min(start[2], end[2]) - radius) & (
            z_axis <= max(start[2], end[2]) + radius)
        z_index = np.nonzero(reach)[0]
        if z_index.size:
            zs = slice(int(z_index[0]), int(z_index[-1]) + 1)
            px, py, pz = x - start[0], y - start[1], z[:, :, zs] - start[2]
            t = np.clip((px * step[0] + py * step[1] + pz * step[2]) / (length * length), 0, 1)
            dist2 = (px - t * step[0]) ** 2 + (py - t * step[1]) ** 2 + (pz - t * step[2]) ** 2
            out[:, :, zs] |= (dist2 <= radius ** 2) & lung[:, :, zs]
        if depth > 1:
            _grow_vessels(out, lung, x, y, z, end, targets, radius=max(radius * 0.72, 1.2),
                          depth=depth - 1, rng=rng)


# ----------------------------------------------------------------------------------------------
# DICOM export (demos and tests of the DICOM path)
# ----------------------------------------------------------------------------------------------


def write_dicom_series(image: np.ndarray, affine: np.ndarray, folder: str | os.PathLike, *,
                       plane: str = "axial", modality: str = "CT",
                       rescale_slope: float = 1.0, rescale_intercept: float = -1024.0,
                       shuffle_seed: int | None = None, series_uid: str | None = None,
                       series_number: int = 1, patient_id: str = "PHANTOM",
                       file_prefix: str = "IM") -> list[str]:
    """Write an (x, y, z) RAS+ volume with a diagonal affine as a DICOM series, one file per slice.

    `plane` picks the slice orientation as a scanner would store it: 'axial' (rows toward the
    patient's left, columns posterior), 'coronal' or 'sagittal'. Stored values are
    (value - intercept) / slope. With `shuffle_seed`, file names are a random permutation of the
    slice order, so readers cannot rely on names. Files are named `<file_prefix><n>.dcm`.
    Returns the written paths.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, MRImageStorage,
                             generate_uid)

    image = np.asarray(image)
    affine = np.asarray(affine, dtype=float)
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or np.any(
            np.diag(affine)[:3] <= 0):
        raise ConversionError("write_dicom_series needs a RAS+ volume with a diagonal affine.")
    nx, ny, nz = image.shape
    sx, sy, sz = np.diag(affine)[:3]

    def ras_to_lps(point):
        return [-float(point[0]), -float(point[1]), float(point[2])]

    def world(i, j, k):
        return affine[:3, :3] @ np.array([i, j, k], float) + affine[:3, 3]

    # For each plane: (orientation cosines in LPS, pixel spacing [between rows, between columns],
    # number of slices, function slice index -> (pixels[rows, cols], RAS position of pixel 0,0)).
    if plane == "axial":
        orientation, pixel_spacing, count = [1, 0, 0, 0, 1, 0], [sy, sx], nz
        def cut(k):  # noqa: E306 - rows go posterior (-y), columns go left (-x)
            return image[::-1, ::-1, k].T, world(nx - 1, ny - 1, k)
    elif plane == "coronal":
        orientation, pixel_spacing, count = [1, 0, 0, 0, 0, -1], [sz, sx], ny
        def cut(j):  # noqa: E306 - rows go inferior (-z), columns go left (-x)
            return image[::-1, j, ::-1].T, world(nx - 1, j, nz - 1)
    elif plane == "sagittal":
        orientation, pixel_spacing, count = [0, 1, 0, 0, 0, -1], [sz, sy], nx
        def cut(i):  # noqa: E306 - rows go inferior (-z), columns go posterior (-y)
            return image[i, ::-1, ::-1].T, world(i, ny - 1, nz - 1)
    else:
        raise ConversionError(f"plane={plane!r}: use 'axial', 'coronal' or 'sagittal'.")

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, frame_uid = generate_uid(), generate_uid()
    series_uid = series_uid or generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    names = np.arange(count)
    if shuffle_seed is not None:
        names = np.random.default_rng(shuffle_seed).permutation(count)
    normal = np.cross(orientation[:3], orientation[3:])
    paths = []
    for index in range(count):
        pixels, corner = cut(index)
        stored = np.rint((pixels.astype(np.float64) - rescale_intercept) / rescale_slope)
        signed = stored.min() < 0
        stored = stored.astype(np.int16 if signed else np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{file_prefix}{int(names[index]):05d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.PatientID = patient_id
        ds.PatientName = patient_id
        ds.SeriesNumber = series_number
        ds.InstanceNumber = index + 1
        ds.SeriesDescription = f"{plane} phantom"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if plane == "axial" else "OTHER"]
        position = ras_to_lps(corner)
        ds.ImagePositionPatient = [round(v, 6) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.SliceThickness = float([sz, sy, sx][["axial", "coronal", "sagittal"].index(plane)])
        ds.SliceLocation = float(np.dot(position, normal))
        ds.RescaleSlope, ds.RescaleIntercept = rescale_slope, rescale_intercept
        ds.RescaleType = "HU" if modality == "CT" else "US"
        ds.set_pixel_data(np.ascontiguousarray(stored), photometric_interpretation="MONOCHROME2",
                          bits_stored=16, generate_instance_uid=False)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------------------------
# MNI152 brain MR variants
# ----------------------------------------------------------------------------------------------


def make_mni_variant(seed: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """nilearn's MNI152 T1 template (2 mm, shipped inside nilearn) as an MR "subject".

    `seed=None` gives the template itself; a seed gives a deterministic variant: a random affine
    pose/size change (rotations up to 8 degrees, scale 0.92-1.08, shifts up to 6 mm), a smooth
    bias field, a gamma change, an arbitrary intensity scale and Rician-like noise. Returns
    (image float32, brain mask uint8, RAS affine).
    """
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template
    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    template = load_mni152_template(resolution=2)
    brain = load_mni152_brain_mask(resolution=2)
    image = np.asarray(template.get_fdata(), dtype=np.float32)
    mask = (np.asarray(brain.get_fdata()) > 0.5).astype(np.uint8)
    affine = np.asarray(template.affine, dtype=float)
    if seed is None:
        return image, mask, affine
    rng = np.random.default_rng(seed)
    rotation = Rotation.from_euler("xyz", rng.uniform(-8, 8, size=3), degrees=True).as_matrix()
    matrix = rotation @ np.diag(rng.uniform(0.92, 1.08, size=3))
    center = (np.asarray(image.shape) - 1) / 2.0
    shift_voxels = rng.uniform(-6, 6, size=3) / np.diag(affine)[:3]
    # affine_transform maps output voxels to input voxels: invert the subject's deformation.
    inverse = np.linalg.inv(matrix)
    offset = center - inverse @ (center + shift_voxels)
    image = ndimage.affine_transform(image, inverse, offset=offset, order=1, mode="constant")
    mask = ndimage.affine_transform(mask, inverse, offset=offset, order=0, mode="constant")
    return mr_appearance(image, rng), mask.astype(np.uint8), affine


def mr_appearance(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seeded MR scanner appearance on a [0, 1] template: smooth bias field, gamma change,
    arbitrary intensity scale and Rician-like noise (float32)."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in image.shape],
                       indexing="ij")
    coefficients = rng.normal(0, 0.12, size=3)
    bias = np.exp(sum(c * g for c, g in zip(coefficients, grid)))
    image = np.clip(image, 0, None) ** rng.uniform(0.8, 1.25) * bias * rng.uniform(200, 1500)
    sigma = 0.02 * float(np.percentile(image, 99))
    noisy = np.hypot(image + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
    return noisy.astype(np.float32)


# Class ids of the MNI152 tissue label map (`make_mni_tissue_hemisphere`), id -> name.
MNI_TISSUE_LABELS: dict[int, str] = {0: "background", 1: "csf", 2: "grey_matter", 3: "white_matter"}
MNI_HEMISPHERES = ("left", "right")


def make_mni_tissue_hemisphere(side: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One hemisphere of nilearn's MNI152 (ICBM 2009c sym, 2 mm) T1 template with a tissue label map.

    Labels (`MNI_TISSUE_LABELS`) come from the template's grey- and white-matter probability maps
    inside its brain mask: each brain voxel takes the most probable of CSF (1 - GM - WM), grey
    matter and white matter. The right hemisphere is mirrored onto the left's grid, so both
    volumes share one shape and orientation and a probe can fit on one and score on the other.
    The template is exactly symmetric, so each hemisphere gets its own seeded MR appearance
    (`mr_appearance`: bias field, gamma, scale, noise) to keep the two from being copies.
    Returns (image float32, label uint8, brain mask uint8, RAS affine), cropped to the brain.
    """
    from nilearn.datasets import (load_mni152_brain_mask, load_mni152_gm_template,
                                  load_mni152_template, load_mni152_wm_template)

    if side not in MNI_HEMISPHERES:
        raise ConversionError(f"side={side!r}: use one of {MNI_HEMISPHERES}.")
    template = load_mni152_template(resolution=2)
    affine = np.asarray(template.affine, dtype=float)
    image = np.asarray(template.get_fdata(), dtype=np.float32)
    mask = np.asarray(load_mni152_brain_mask(resolution=2).get_fdata()) > 0.5
    grey = np.asarray(load_mni152_gm_template(resolution=2).get_fdata(), dtype=np.float32)
    white = np.asarray(load_mni152_wm_template(resolution=2).get_fdata(), dtype=np.float32)
    csf = np.clip(1.0 - grey - white, 0.0, 1.0)
    label = np.where(mask, np.stack([csf, grey, white]).argmax(0) + 1, 0).astype(np.uint8)
    # x = 0 (the mid-sagittal plane) is the voxel column where the affine maps to 0 mm.
    midline = int(round(-affine[0, 3] / affine[0, 0]))
    if side == "left":  # RAS+: x < 0 is the subject's left
        cut = slice(0, midline)
    else:
        cut = slice(image.shape[0] - 1, midline, -1)  # x > 0, mirrored onto the left's grid
    image, label, mask = image[cut], label[cut], mask[cut]
    # Crop both hemispheres to the same box around the brain (the template is symmetric).
    nonzero = np.argwhere(mask)
    lo = np.maximum(nonzero.min(0) - 2, 0)
    hi = np.minimum(nonzero.max(0) + 3, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    cropped_affine = affine.copy()
    cropped_affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    rng = np.random.default_rng([seed, MNI_HEMISPHERES.index(side)])
    return (mr_appearance(image[box], rng), label[box], mask[box].astype(np.uint8), cropped_affine)


# ----------------------------------------------------------------------------------------------
# Demo stores
# ----------------------------------------------------------------------------------------------


# Kinds of demo store (`demo_store(kind=...)`, `rayssl demo --kind`).
DEMO_KINDS = ("ct", "mr", "mni", "mni-tissue")


def _demo_params(store: Path) -> dict | None:
    """The parameters a demo store was built with (recorded in each volume's conversion attributes),
    or None when `store` is not a complete demo store."""
    from .manifest import MANIFEST_NAME, read_manifest
    from .store import read_volume_attrs

    if not (store / MANIFEST_NAME).exists():
        return None
    try:
        first = read_manifest(store)["id"].iloc[0]
        return (read_volume_attrs(store, first) or {}).get("conversion", {}).get("demo")
    except Exception:  # noqa: BLE001 - anything unreadable is "not a demo store" here
        return None


def default_cache_dir() -> Path:
    """`$RAYSSL_CACHE/demo`, else `~/.cache/rayssl/demo`."""
    base = os.environ.get("RAYSSL_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "rayssl") / "demo"


def demo_splits(volume_ids: Sequence[str]) -> dict[str, str]:
    """Fixed splits for a demo store: ~10% val and ~10% test (at least one each from 3 / 4
    volumes), the rest train, so tiny stores always have a non-empty train and val split."""
    ids = sorted(volume_ids)
    n = len(ids)
    n_val = max(1, round(0.1 * n)) if n >= 3 else 0
    n_test = max(1, round(0.1 * n)) if n >= 4 else 0
    splits = {volume_id: "train" for volume_id in ids}
    for volume_id in ids[n - n_val - n_test: n - n_test]:
        splits[volume_id] = "val"
    for volume_id in ids[n - n_test:]:
        splits[volume_id] = "test"
    return splits


def demo_store(root: str | os.PathLike | None = None, n: int = 8, *, kind: str = "ct",
               shape: Sequence[int] = DEFAULT_PHANTOM_SHAPE,
               spacing: Sequence[float] = DEFAULT_PHANTOM_SPACING, seed: int = 0,
               chunks: int | Sequence[int] = 64, shards: int | Sequence[int] | None = None,
               rebuild: bool = False, out: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """Path of a ready demo store, building it on first use (cached under `root`).

    kind='ct': `n` phantoms from `make_phantom(seed + i, shape, spacing)` with the organ label map
    as `label` and the lungs as `mask`; int16 HU. kind='mni': `n` MR volumes from nilearn's MNI152
    template (volume 0 the template, then `make_mni_variant` variants), percentile-normalised to
    [0, 1], brain mask as `mask` (`shape`/`spacing` are ignored: 99x117x95 at 2 mm).
    kind='mni-tissue': the labelled MNI152 probe set, two volumes from
    `make_mni_tissue_hemisphere` (`mni-left`, `mni-right` mirrored), tissue classes as `label`
    (`MNI_TISSUE_LABELS`), brain mask as `mask`, percentile-normalised; `n` must be 2.
    kind='mr': a brain-MR pretraining population, `n` SynthSeg-style subjects from
    `synth_mr.make_synth_mr(seed + i)` (random smooth deformation and per-tissue contrast of the
    MNI152 maps, bias field, noise), tissue classes as `label`, brain mask as `mask`, percentile-normalised.

    `out` writes the store at exactly that path instead of the cache (`rayssl demo --out`); an
    existing complete store there is returned only if it was built with the same parameters.
    `progress` shows a progress bar over the volumes.

    Volumes go through the same preprocessing and `write_volume` code as `convert`, so the format
    and manifest are identical. `root` defaults to `default_cache_dir()`. The store is built in a
    temporary folder and renamed into place, so two processes asking at once both end up with
    one complete store. Splits: see `demo_splits`.
    """
    from .convert import ConversionOptions, prepare_and_write
    from .io import ScanVolume
    from .manifest import MANIFEST_NAME, write_manifest
    from .store import ensure_store

    if kind not in DEMO_KINDS:
        raise ConversionError(f"kind={kind!r}: use 'ct' (torso phantoms), 'mr' (a synthetic brain-MR population), "
                              f"'mni' (MNI152 pose variants) or 'mni-tissue' (two labelled MNI152 hemispheres).")
    if kind == "mni-tissue" and int(n) != len(MNI_HEMISPHERES):
        raise ConversionError(f"kind='mni-tissue' has exactly {len(MNI_HEMISPHERES)} volumes "
                              f"{MNI_HEMISPHERES}, got n={n!r}.")
    if int(n) < 1:
        raise ConversionError(f"n={n!r}: a demo store needs at least one volume.")
    root = Path(root).expanduser() if root is not None else default_cache_dir()
    params = {"kind": kind, "n": int(n), "seed": int(seed), "version": DEMO_VERSION,
              "chunks": chunks if np.ndim(chunks) == 0 else list(chunks),
              "shards": shards if shards is None or np.ndim(shards) == 0 else list(shards)}
    if kind == "ct":
        params.update(shape=[int(s) for s in shape], spacing=[float(s) for s in spacing])
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    final = root / f"{kind}-n{int(n)}-seed{int(seed)}-{key}.zarr"
    if out is not None:
        final = Path(out).expanduser().absolute()
        root = final.parent
        if final.exists() and not rebuild:
            built_with = _demo_params(final)
            if built_with is None:
                raise ConversionError(f"{final} exists and is not a demo store built by rayssl demo: choose another "
                                      f"--out, or remove it first.")
            if built_with != params:
                raise ConversionError(f"{final} is a demo store built with other parameters ({built_with}); choose "
                                      f"another --out, or pass --rebuild to replace it.")
            return final
    if final.exists() and not rebuild:
        if (final / MANIFEST_NAME).exists():
            return final
        # A store without manifest was not made by this function's atomic rename: rebuild.
    root.mkdir(parents=True, exist_ok=True)
    building = root / f".build-{final.name}-{secrets.token_hex(4)}"
    try:
        ensure_store(building)
        options = ConversionOptions.build(modality="CT" if kind == "ct" else "MR",
                                          normalize=None if kind == "ct" else True,
                                          chunks=chunks, shards=shards)
        volume_ids = []
        indices = range(int(n))
        if progress:
            from tqdm import tqdm

            indices = tqdm(indices, desc=f"demo {kind} store", unit="volume")
        for index in indices:
            if kind == "ct":
                volume_id = f"phantom-{index:03d}"
                image, label = make_phantom(seed + index, shape, spacing)
                affine = phantom_affine(shape, spacing)
                mask = ((label == 1) | (label == 2)).astype(np.uint8)
                source = (f"demo:phantom?seed={seed + index}&shape={'x'.join(map(str, shape))}"
                          f"&spacing={'x'.join(map(str, spacing))}")
            elif kind == "mni-tissue":
                side = MNI_HEMISPHERES[index]
                volume_id = f"mni-{side}"
                image, label, mask, affine = make_mni_tissue_hemisphere(side, seed)
                source = f"demo:mni152-tissue?hemisphere={side}&seed={seed}"
            elif kind == "mr":
                from .synth_mr import make_synth_mr

                volume_id = f"synth-mr-{index:04d}"
                image, label, mask, affine = make_synth_mr(seed + index)
                source = f"demo:synth-mr?seed={seed + index}"
            else:
                volume_id = f"mni-{index:03d}"
                image, mask, affine = make_mni_variant(None if index == 0 else seed + index)
                label = None
                source = f"demo:mni152?variant={'template' if index == 0 else seed + index}"
            digest = hashlib.sha256(image.tobytes())
            for extra in (label, mask):
                if extra is not None:
                    digest.update(extra.tobytes())
            prepare_and_write(
                building, volume_id,
                ScanVolume(image, affine, source, "CT" if kind == "ct" else "MR"), options,
                source_sha256=digest.hexdigest(),
                label_scan=None if label is None else ScanVolume(label, affine, source + "#label"),
                mask_scan=ScanVolume(mask, affine, source + "#mask"),
                conversion={"demo": params})
            volume_ids.append(volume_id)
        write_manifest(building, splits=demo_splits(volume_ids), store_uri=str(final.absolute()))
        try:
            if rebuild and final.exists():
                shutil.rmtree(final)
            os.rename(building, final)
        except OSError:
            if not (final / MANIFEST_NAME).exists():
                raise
            # Another process finished first; its store is identical. Use it.
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return final
