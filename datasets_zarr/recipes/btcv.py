"""Recipe for BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, abdomen): RawData/Training/img + label, RawData/Testing/img."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ConversionError
from ..io import strip_suffix
from ._common import RecipeFiles, require_folder, run_recipe, visible

# The SwinUNETR BTCV setting: 1.5 x 1.5 x 2.0 mm; images stay int16 HU (window on read).
DEFAULTS = {"modality": "CT", "spacing": (1.5, 1.5, 2.0)}


def _raw_data(root: Path) -> Path:
    for candidate in (root, root / "Abdomen", root.parent):
        if (candidate / "RawData" / "Training" / "img").is_dir():
            return candidate / "RawData"
    if (root / "Training" / "img").is_dir():
        return root
    raise ConversionError(
        f"{root}: not a BTCV folder: expected RawData/Training/img/img*.nii.gz (and "
        "RawData/Training/label/label*.nii.gz) under it, as in the Synapse 'RawData.zip'.",
        path=str(root))


def find_btcv(root: str | os.PathLike, *, include_test: bool = True) -> RecipeFiles:
    """Training images with their labels (img0001 <-> label0001) and, optionally, the unlabelled
    Testing images. Ids: btcv-img0001."""
    raw = _raw_data(require_folder(root, "BTCV"))
    images, labels, ids, skipped = [], [], [], []
    folders = [("Training", True)] + ([("Testing", False)] if include_test else [])
    for split_folder, labelled in folders:
        image_dir = raw / split_folder / "img"
        if not image_dir.is_dir():
            continue
        for image in sorted(p for p in image_dir.glob("img*.nii*") if visible(p)):
            number = re.sub(r"^img", "", strip_suffix(image))
            label = raw / split_folder / "label" / f"label{number}{image.name[3 + len(number):]}"
            if labelled and not label.exists():
                skipped.append(f"{image}: no label file {label.name}; converted without label")
            images.append(str(image))
            labels.append(str(label) if labelled and label.exists() else None)
            ids.append(f"btcv-{strip_suffix(image)}")
    if not images:
        raise ConversionError(f"{raw}: no img*.nii.gz files under Training/img.", path=str(raw))
    return RecipeFiles(images=images, labels=labels, ids=ids, skipped=skipped)


def convert_btcv(root: str | os.PathLike, out: str | os.PathLike, *, include_test: bool = True,
                 **convert_kwargs):
    """Convert a local BTCV copy into `out` (defaults: CT, 1.5x1.5x2 mm; override any
    `convert` argument). Returns the manifest."""
    return run_recipe(find_btcv(root, include_test=include_test), out, DEFAULTS, convert_kwargs)
