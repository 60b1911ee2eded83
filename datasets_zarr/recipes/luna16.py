"""Recipe for LUNA16: subset0..9/<seriesuid>.mhd (+ .raw) CT scans, optional seg-lungs-LUNA16 lung masks."""

from __future__ import annotations

import os

from ..errors import ConversionError
from ..io import strip_suffix
from ._common import RecipeFiles, require_folder, run_recipe, visible

# Nodules are small: keep 1 mm isotropic. Images stay int16 HU.
DEFAULTS = {"modality": "CT", "spacing": (1.0, 1.0, 1.0)}
MASK_FOLDER = "seg-lungs-LUNA16"


def find_luna16(root: str | os.PathLike, *, subsets: list[int] | None = None,
                lung_masks: bool = True) -> RecipeFiles:
    """Scans of subset0..subset9 (or the `subsets` given); with `lung_masks`, the matching
    seg-lungs-LUNA16/<seriesuid>.mhd becomes the volume's `mask` (any non-zero value: both lungs
    and the trachea). Ids: the seriesuid."""
    root = require_folder(root, "LUNA16")
    folders = sorted(p for p in root.glob("subset*") if p.is_dir())
    if subsets is not None:
        folders = [p for p in folders if p.name in {f"subset{i}" for i in subsets}]
    if not folders:
        raise ConversionError(f"{root}: not a LUNA16 folder: expected subset0/ ... subset9/ with "
                              "<seriesuid>.mhd + .raw files.", path=str(root))
    mask_dir = root / MASK_FOLDER
    images, masks, ids, skipped = [], [], [], []
    for folder in folders:
        for header in sorted(p for p in folder.glob("*.mhd") if visible(p)):
            uid = strip_suffix(header)
            mask = mask_dir / f"{uid}.mhd"
            images.append(str(header))
            masks.append(str(mask) if lung_masks and mask.exists() else None)
            ids.append(uid)
            if lung_masks and mask_dir.is_dir() and not mask.exists():
                skipped.append(f"{header}: no lung mask in {MASK_FOLDER}; converted without mask")
    return RecipeFiles(images=images, masks=masks if any(masks) else None, ids=ids,
                       skipped=skipped)


def convert_luna16(root: str | os.PathLike, out: str | os.PathLike, *,
                   subsets: list[int] | None = None, lung_masks: bool = True, **convert_kwargs):
    """Convert a local LUNA16 copy into `out` (defaults: CT, 1 mm isotropic; override any
    `convert` argument). Returns the manifest."""
    return run_recipe(find_luna16(root, subsets=subsets, lung_masks=lung_masks), out, DEFAULTS,
                      convert_kwargs)
