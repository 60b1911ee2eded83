"""Recipe for brain MRI collections: ADNI-style folders of NIfTI files and OASIS-1 sessions (Analyze .hdr/.img)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..convert import sanitize_id
from ..errors import ConversionError
from ..io import path_suffix, strip_suffix
from ._common import RecipeFiles, require_folder, run_recipe, visible

# 1 mm isotropic T1 scans, intensities normalised (MR has no physical unit).
DEFAULTS = {"modality": "MR", "spacing": (1.0, 1.0, 1.0), "normalize": (0.5, 99.5)}
# File names that hold derived maps rather than scans.
DERIVED = re.compile(r"(seg|mask|label|brainmask|aseg|aparc|_prob|fseg)", re.IGNORECASE)
OASIS_PATTERNS = {
    # first MPRAGE repetition of each session, raw scanner space
    "raw": "RAW/*_mpr-1_anon.hdr",
    # atlas-registered (Talairach 1 mm), bias-corrected average of the repetitions
    "t88": "PROCESSED/MPRAGE/T88_111/*_t88_gfc.hdr",
    # same, skull-stripped
    "t88_masked": "PROCESSED/MPRAGE/T88_111/*_t88_masked_gfc.hdr",
}


def find_nifti_brains(root: str | os.PathLike) -> RecipeFiles:
    """ADNI-style: every .nii/.nii.gz below `root` except derived maps (segmentations, masks).
    Ids: the file name (made unique with parent folder names when needed)."""
    from ..convert import unique_volume_ids
    from ..io import ScanRef

    root = require_folder(root, "brain MRI")
    images, skipped = [], []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not visible(path) or any(
                part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if path_suffix(path) not in (".nii", ".nii.gz"):
            continue
        if DERIVED.search(path.name):
            skipped.append(f"{path}: looks like a derived map (segmentation/mask)")
            continue
        images.append(str(path))
    if not images:
        raise ConversionError(f"{root}: no .nii/.nii.gz brain scans found below this folder.",
                              path=str(root))
    ids = unique_volume_ids([(ScanRef(p), strip_suffix(p)) for p in images])
    return RecipeFiles(images=images, ids=ids, skipped=skipped)


def find_oasis(root: str | os.PathLike, *, variant: str = "raw",
               tissue_labels: bool = False) -> RecipeFiles:
    """OASIS-1 sessions (OAS1_xxxx_MRy/ folders, possibly inside disc*/ folders), one scan per
    session picked by `variant` ('raw', 't88' or 't88_masked', see OASIS_PATTERNS). With
    `tissue_labels` (t88 variants only) the FSL_SEG *_fseg.hdr map (CSF/GM/WM) is the label.
    Ids: the session name, e.g. OAS1_0001_MR1."""
    if variant not in OASIS_PATTERNS:
        raise ConversionError(f"variant={variant!r}: use one of {sorted(OASIS_PATTERNS)}.")
    if tissue_labels and variant == "raw":
        raise ConversionError("tissue_labels needs variant='t88' or 't88_masked': the FSL_SEG "
                              "maps are in atlas space, not on the raw scans.")
    root = require_folder(root, "OASIS")
    sessions = sorted(p for p in root.rglob("OAS1_*_MR*") if p.is_dir() and visible(p))
    images, labels, ids, skipped = [], [], [], []
    for session in sessions:
        matches = sorted(p for p in session.glob(OASIS_PATTERNS[variant]) if visible(p))
        if not matches:
            skipped.append(f"{session}: no {OASIS_PATTERNS[variant]}")
            continue
        image = matches[0]
        label = None
        if tissue_labels:
            segs = sorted(session.glob("FSL_SEG/*_fseg.hdr"))
            label = str(segs[0]) if segs else None
            if label is None:
                skipped.append(f"{session}: no FSL_SEG/*_fseg.hdr; converted without label")
        images.append(str(image))
        labels.append(label)
        ids.append(sanitize_id(session.name))
    if not images:
        raise ConversionError(
            f"{root}: no OASIS-1 sessions found (expected OAS1_xxxx_MRy/{OASIS_PATTERNS[variant]}).",
            path=str(root))
    return RecipeFiles(images=images, labels=labels if tissue_labels else None, ids=ids,
                       skipped=skipped)


def convert_brain_mri(root: str | os.PathLike, out: str | os.PathLike, *, layout: str = "auto",
                      oasis_variant: str = "raw", tissue_labels: bool = False, **convert_kwargs):
    """Convert a local ADNI-style (`layout='nifti'`) or OASIS-1 (`layout='oasis'`) folder;
    'auto' picks OASIS when OAS1_* session folders exist. Defaults: MR, 1 mm isotropic,
    0.5/99.5 percentile normalisation; override any `convert` argument. Returns the manifest.

    Analyze (.hdr/.img) has no reliable orientation field: nibabel's Analyze default (LAS,
    radiological) is used, so check left/right on OASIS 'raw' scans if it matters.
    """
    if layout == "auto":
        layout = "oasis" if any(Path(root).expanduser().rglob("OAS1_*_MR*")) else "nifti"
    if layout == "oasis":
        files = find_oasis(root, variant=oasis_variant, tissue_labels=tissue_labels)
    elif layout == "nifti":
        files = find_nifti_brains(root)
    else:
        raise ConversionError(f"layout={layout!r}: use 'auto', 'nifti' or 'oasis'.")
    return run_recipe(files, out, DEFAULTS, convert_kwargs)
