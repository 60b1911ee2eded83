"""Load a store's manifest as VolumeInfo records (what planners know without reading voxels)."""

from __future__ import annotations

import os
import posixpath
from typing import Callable, Sequence

import fsspec
import numpy as np
import pandas as pd

from rayssl.data.types import VolumeInfo

_BASE_COLUMNS = {"id", "store", "group", "shape", "spacing", "bbox", "background", "modality", "has_label", "has_mask"}


def read_manifest_table(store: str) -> pd.DataFrame:
    """The store's manifest.parquet as a DataFrame (clear error when the path is not a store)."""
    path = posixpath.join(store.rstrip("/"), "manifest.parquet")
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        raise FileNotFoundError(
            f"no manifest at {path}: {store!r} is not a rayssl store; create one with "
            f"`rayssl convert SCANS... --out {store}` (or omit --data to use the demo data)"
        )
    with fs.open(fs_path, "rb") as f:
        return pd.read_parquet(f)


def volumes_from_table(table: pd.DataFrame) -> list[VolumeInfo]:
    volumes = []
    for index, row in enumerate(table.itertuples(index=False)):
        row = row._asdict()
        extra = {k: v for k, v in row.items() if k not in _BASE_COLUMNS}
        extra["store"] = row["store"]
        extra["group"] = row["group"]
        volumes.append(VolumeInfo(
            index=index,
            id=str(row["id"]),
            shape=tuple(int(v) for v in row["shape"]),
            spacing=tuple(float(v) for v in row["spacing"]),
            bbox=tuple(int(v) for v in row["bbox"]),
            background=float(row["background"]),
            modality=str(row["modality"]),
            has_label=bool(row.get("has_label", False)),
            has_mask=bool(row.get("has_mask", False)),
            extra=extra,
        ))
    return volumes


def load_volumes(stores: str | Sequence[str], split: str | None = "train") -> list[VolumeInfo]:
    """VolumeInfo of every volume of `stores` in `split` (None or "all" = every split)."""
    if isinstance(stores, (str, os.PathLike)):
        stores = [stores]
    stores = [os.fspath(s) for s in stores]
    tables = [read_manifest_table(s) for s in stores]
    # Read each store where it is now (the path given), not where the manifest says it was written:
    # stores move (converted locally, then copied to s3:// or to a cluster's shared filesystem).
    for store, t in zip(stores, tables):
        t["store"] = str(store) if "://" in str(store) else os.path.abspath(store)
    for store, t in zip(stores, tables):
        if not len(t):  # e.g. every scan of its conversion failed: nothing to train on
            raise ValueError(f"store {store} holds no volumes (its manifest is empty); convert scans into it "
                             f"with `rayssl convert SCANS... --out {store}` and check its failures")
    table = pd.concat(tables, ignore_index=True)
    duplicated = table["id"][table["id"].duplicated()]
    if len(duplicated):
        clash = str(duplicated.iloc[0])
        where = sorted(table["store"][table["id"] == clash])
        raise ValueError(f"volume id {clash!r} appears in several stores ({', '.join(where)}); volume ids must be "
                         f"unique across the stores of a run: re-convert one store with other ids (ids=...)")
    if split not in (None, "all"):
        if "split" in table and (table["split"] == split).any():
            table = table[table["split"] == split].reset_index(drop=True)
        else:
            raise ValueError(
                f"no volume has split={split!r} in {list(stores)}; splits present: "
                f"{sorted(table['split'].unique()) if 'split' in table else 'none'} (use --set data.split=all)"
            )
    return volumes_from_table(table)


def manifest_digest(stores: str | Sequence[str]) -> str:
    """sha256 of the manifests' bytes: identifies the data a model was pretrained on."""
    import hashlib

    if isinstance(stores, str):
        stores = [stores]
    digest = hashlib.sha256()
    for store in stores:
        with fsspec.open(posixpath.join(store.rstrip("/"), "manifest.parquet"), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def spacing_summary(volumes: Sequence[VolumeInfo]) -> list[float]:
    """Median voxel spacing (mm) over volumes, for the model card."""
    return [float(v) for v in np.median(np.array([v.spacing for v in volumes]), axis=0)]


def split_counts(stores: str | Sequence[str]) -> dict[str, int]:
    """Volumes per manifest split over `stores` (e.g. {"train": 3, "val": 1})."""
    if isinstance(stores, (str, os.PathLike)):
        stores = [stores]
    tables = [read_manifest_table(os.fspath(s)) for s in stores]
    table = pd.concat(tables, ignore_index=True)
    if "split" not in table:
        return {"all": len(table)}
    return {str(k): int(v) for k, v in table["split"].value_counts().sort_index().items()}


def check_volumes_in_split(check: Callable[[Sequence[VolumeInfo]], None], volumes: Sequence[VolumeInfo],
                           stores: str | Sequence[str], split: str | None) -> None:
    """Run a method's `check(volumes)`; a ValueError it raises gets the split's counts and how to change it."""
    try:
        check(volumes)
    except ValueError as err:
        counts = split_counts(stores)
        if split in (None, "all"):
            raise
        per_split = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise ValueError(
            f"{err}. data.split={split!r} holds {len(volumes)} of the store's {sum(counts.values())} volumes "
            f"(per split: {per_split}); train on every volume with --set data.split=all, or convert more "
            f"volumes") from err
