"""Recipe for Medical Segmentation Decathlon tasks (TaskNN_Name/: dataset.json, imagesTr, labelsTr, imagesTs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConversionError
from ..io import strip_suffix
from ._common import RecipeFiles, require_folder, run_recipe, visible

CT_DEFAULTS = {"modality": "CT", "spacing": (1.5, 1.5, 2.0)}
# MR intensities have no unit: normalise them; keep the native spacing (MSD MR tasks differ a
# lot, e.g. prostate 0.6 x 0.6 x 3.6 mm).
MR_DEFAULTS = {"modality": "MR", "normalize": (0.5, 99.5)}


def read_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ConversionError(f"{path}: invalid JSON ({error}).", path=str(path)) from error


def task_modality(description: dict) -> str:
    """'CT' when dataset.json lists CT among its modalities, else 'MR'."""
    modalities = [str(v).upper() for v in (description.get("modality") or {}).values()]
    return "CT" if "CT" in modalities else "MR"


def find_msd(root: str | os.PathLike, *, include_test: bool = True) -> RecipeFiles:
    """Training pairs from dataset.json ('training': image/label), test images from 'test'
    (or imagesTr/labelsTr/imagesTs when dataset.json is absent). macOS '._' files are skipped.
    Ids: msd-<image name>."""
    root = require_folder(root, "MSD")
    description = read_dataset_json(root)
    images, labels, ids, skipped = [], [], [], []

    def add(image: Path, label: Path | None):
        if not image.exists():
            skipped.append(f"{image}: listed in dataset.json but missing")
            return
        images.append(str(image))
        labels.append(str(label) if label is not None and label.exists() else None)
        ids.append(f"msd-{strip_suffix(image)}")

    if description.get("training"):
        for entry in description["training"]:
            add(root / entry["image"], root / entry["label"] if entry.get("label") else None)
        if include_test:
            for entry in description.get("test", []):
                add(root / (entry if isinstance(entry, str) else entry["image"]), None)
    else:
        if not (root / "imagesTr").is_dir():
            raise ConversionError(
                f"{root}: not an MSD task folder: expected dataset.json and imagesTr/ "
                "(labelsTr/, imagesTs/) as in TaskNN_Name.tar.", path=str(root))
        for image in sorted(p for p in (root / "imagesTr").glob("*.nii*") if visible(p)):
            add(image, root / "labelsTr" / image.name)
        if include_test and (root / "imagesTs").is_dir():
            for image in sorted(p for p in (root / "imagesTs").glob("*.nii*") if visible(p)):
                add(image, None)
    return RecipeFiles(images=images, labels=labels, ids=ids, skipped=skipped)


def msd_defaults(root: str | os.PathLike) -> dict:
    """CT tasks: 1.5x1.5x2 mm, HU. MR tasks: percentile normalisation, native spacing; tasks with
    several channels (BrainTumour, Prostate) keep channel 0 (override with channel=N)."""
    description = read_dataset_json(Path(root).expanduser())
    defaults = dict(CT_DEFAULTS if task_modality(description) == "CT" else MR_DEFAULTS)
    if len(description.get("modality") or {}) > 1:
        defaults["channel"] = 0
    return defaults


def convert_msd(root: str | os.PathLike, out: str | os.PathLike, *, include_test: bool = True,
                **convert_kwargs):
    """Convert a local MSD task folder into `out` (see `msd_defaults`; override any `convert`
    argument). Returns the manifest."""
    return run_recipe(find_msd(root, include_test=include_test), out, msd_defaults(root),
                      convert_kwargs)
