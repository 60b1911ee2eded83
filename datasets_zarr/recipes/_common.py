"""Shared pieces of the dataset recipes: the files a recipe found, and running convert with the recipe's defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConversionError
from ..io import ScanRef


@dataclass
class RecipeFiles:
    """What a recipe found in a dataset folder: images, optional labels/masks (None where a scan
    has none), one volume id per image, and notes on what was left out and why."""

    images: list[str | ScanRef]
    ids: list[str]
    labels: list[str | None] | None = None
    masks: list[str | None] | None = None
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def require_folder(root: str | os.PathLike, dataset: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ConversionError(f"{path}: no such folder. Point the {dataset} recipe at the "
                              "folder where the dataset was unpacked (nothing is downloaded).",
                              path=str(path))
    return path


def visible(path: Path) -> bool:
    """False for hidden files and macOS resource forks ('._name'), which some archives ship."""
    return not path.name.startswith(".")


def run_recipe(files: RecipeFiles, out: str | os.PathLike, defaults: dict, overrides: dict):
    """`convert(...)` on the files with the recipe's defaults, any of which `overrides` replaces."""
    from ..convert import convert

    if not files.images:
        raise ConversionError("the recipe found no scans to convert.")
    options = {**defaults, **overrides}
    for name in ("labels", "masks", "ids"):
        if name in options:
            raise ConversionError(f"{name}= is decided by the recipe from the dataset layout; "
                                  "call datasets_zarr.convert directly to choose it yourself.")
    return convert(files.images, out, labels=files.labels, masks=files.masks, ids=files.ids,
                   **options)
