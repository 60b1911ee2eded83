"""A brain-MR pretraining population from nilearn's MNI152 maps: random smooth deformations, per-tissue contrast, bias field and noise (SynthSeg-style)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .demo import mr_appearance

# Largest random displacement of the smooth field, in mm, and the control-point spacing it is drawn on.
MAX_WARP_MM = 4.0
CONTROL_SPACING_MM = 32.0


@lru_cache(maxsize=1)
def _mni_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(T1 template, grey matter, white matter, CSF probabilities, RAS affine, brain mask) of nilearn's
    MNI152 at 2 mm, the volumes float32 on one grid. Read once per process."""
    from nilearn.datasets import (load_mni152_brain_mask, load_mni152_gm_template,
                                  load_mni152_template, load_mni152_wm_template)

    template = load_mni152_template(resolution=2)
    t1 = np.asarray(template.get_fdata(), dtype=np.float32)
    brain = (np.asarray(load_mni152_brain_mask(resolution=2).get_fdata()) > 0.5).astype(np.float32)
    grey = np.asarray(load_mni152_gm_template(resolution=2).get_fdata(), dtype=np.float32) * brain
    white = np.asarray(load_mni152_wm_template(resolution=2).get_fdata(), dtype=np.float32) * brain
    csf = np.clip(brain - grey - white, 0.0, 1.0)
    return t1, grey, white, csf, np.asarray(template.affine, dtype=float), brain


def _sample_coordinates(shape: tuple[int, ...], spacing_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Voxel coordinates [3, *shape] at which to sample the template: a random affine (rotations up to
    10 degrees, scale 0.9-1.1, shifts up to 6 mm about the centre) plus a smooth random displacement
    (cubic upsampling of Gaussian control-point offsets, at most MAX_WARP_MM), as SynthSeg draws them."""
    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    rotation = Rotation.from_euler("xyz", rng.uniform(-10, 10, size=3), degrees=True).as_matrix()
    matrix = rotation @ np.diag(rng.uniform(0.9, 1.1, size=3))
    center = (np.asarray(shape, dtype=float) - 1) / 2.0
    shift = rng.uniform(-6, 6, size=3) / spacing_mm
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    flat = grid.reshape(3, -1) - center[:, None]
    coords = (np.linalg.inv(matrix) @ flat + (center - shift)[:, None]).reshape(3, *shape)
    control = [max(2, int(round(n * spacing_mm / CONTROL_SPACING_MM)) + 1) for n in shape]
    amplitude = rng.uniform(0.0, MAX_WARP_MM) / spacing_mm
    for axis in range(3):
        offsets = rng.normal(0.0, amplitude / 2.0, size=control)
        field = ndimage.zoom(offsets, [n / c for n, c in zip(shape, control)], order=3, mode="nearest")
        coords[axis] += np.clip(field, -amplitude, amplitude)[: shape[0], : shape[1], : shape[2]]
    return coords.astype(np.float32)


def make_synth_mr(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic brain MR "subject" from the MNI152 tissue maps, deterministic in `seed`.

    The tissue probability maps (grey matter, white matter, CSF = brain - GM - WM) and the template's
    non-brain head are moved by `_sample_coordinates`; each tissue gets its own random mean intensity
    (uniform in [0, 1], so T1-, T2- and PD-like contrasts all occur) and within-tissue noise, the head
    outside the brain keeps the template's structure at a random brightness, a random blur mimics
    other resolutions, then `mr_appearance` adds a bias field, gamma, scanner scale and Rician noise.
    Returns (image float32, tissue label uint8 with `MNI_TISSUE_LABELS` ids, brain mask uint8, RAS affine).
    """
    from scipy import ndimage

    t1, grey, white, csf, affine, brain = _mni_maps()
    rng = np.random.default_rng([seed, 152])
    coords = _sample_coordinates(t1.shape, float(abs(affine[0, 0])), rng)

    def warp(volume: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0)

    tissues = [warp(m) for m in (csf, grey, white)]
    warped_brain = warp(brain)
    head = warp(t1) * (1.0 - warped_brain)  # scalp, skull, neck: structure kept, brightness random
    means = rng.uniform(0.0, 1.0, size=3)
    stds = rng.uniform(0.0, 0.05, size=3)
    image = head * rng.uniform(0.3, 1.2)
    for probability, mean, std in zip(tissues, means, stds):
        image += probability * (mean + rng.normal(0.0, std, size=probability.shape).astype(np.float32))
    blur = rng.uniform(0.0, 0.75)
    if blur > 0.1:
        image = ndimage.gaussian_filter(image, blur)
    mask = (warped_brain > 0.5).astype(np.uint8)
    label = np.where(mask > 0, np.stack(tissues).argmax(0) + 1, 0).astype(np.uint8)
    return mr_appearance(np.clip(image, 0.0, None).astype(np.float32), rng), label, mask, affine
