"""The store manifest (`STORE/manifest.parquet`): one row per visible volume, deterministic splits, and `VolumeMeta` accessors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from rayssl.data.storage import is_remote

from . import remote
from .errors import ConversionError
from .store import list_volume_ids, read_volume_attrs

MANIFEST_NAME = "manifest.parquet"
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
MANIFEST_COLUMNS = ("id", "store", "group", "shape", "spacing", "dtype", "modality", "split",
                    "bbox", "background", "has_label", "has_mask", "source", "source_sha256", "intensity")


def manifest_schema():
    """Arrow schema of the manifest (column types of docs/store_format.md)."""
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("store", pa.string()), ("group", pa.string()),
        ("shape", pa.list_(pa.int64())), ("spacing", pa.list_(pa.float64())),
        ("dtype", pa.string()), ("modality", pa.string()), ("split", pa.string()),
        ("bbox", pa.list_(pa.int64())), ("background", pa.float64()),
        ("has_label", pa.bool_()), ("has_mask", pa.bool_()), ("source", pa.string()),
        ("source_sha256", pa.string()),
        ("intensity", pa.string()),  # the volume's `intensity` attribute as JSON (rayssl.data.intensity.hu_offset reads it)
    ])


def hash_split(volume_id: str, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
               seed: int = 0) -> str:
    """Deterministic split of one id: a seeded SHA-256 of the id mapped to [0, 1).

    A volume's split depends only on its id, the seed and the fractions, so adding volumes never
    moves existing ones between splits.
    """
    fractions = validate_fractions(fractions)
    digest = hashlib.sha256(f"{seed}:{volume_id}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions):
        edge += fraction
        if position < edge:
            return name
    return SPLITS[-1]


def validate_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(f < 0 for f in values) or not np.isclose(sum(values), 1.0):
        raise ConversionError(f"split_fractions={tuple(fractions)!r}: give three non-negative "
                              "fractions (train, val, test) summing to 1, e.g. (0.8, 0.1, 0.1).")
    return values


def manifest_row(store: str | os.PathLike, attrs: dict, split: str) -> dict:
    """One manifest row from a volume's `rayssl` attrs."""
    return {
        "id": attrs["id"],
        "store": str(store) if "://" in str(store) else str(Path(store).expanduser().absolute()),
        "group": attrs["id"],
        "shape": [int(v) for v in attrs["shape"]],
        "spacing": [float(v) for v in attrs["spacing"]],
        "dtype": str(attrs.get("dtype", "")),
        "modality": attrs["modality"],
        "split": split,
        "bbox": [int(v) for v in attrs["bbox"]],
        "background": float(attrs["background"]),
        "has_label": bool(attrs["has_label"]),
        "has_mask": bool(attrs["has_mask"]),
        "source": str(attrs.get("source", "")),
        "source_sha256": str(attrs.get("source_sha256", "")),
        "intensity": json.dumps(attrs.get("intensity", {}), sort_keys=True),
    }


def scan_volume_attrs(store: str | os.PathLike) -> dict[str, dict]:
    """`rayssl` attrs of every visible volume group in the store, by id."""
    found = {}
    for volume_id in list_volume_ids(store):
        attrs = read_volume_attrs(store, volume_id)
        if attrs is not None and attrs.get("id") == volume_id:
            found[volume_id] = attrs
    return found


def write_manifest(store: str | os.PathLike, attrs_by_id: Mapping[str, dict] | None = None, *,
                   splits: Mapping[str, str] | None = None,
                   split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
                   split_seed: int = 0, store_uri: str | None = None):
    """Write `STORE/manifest.parquet` atomically (temp file + os.replace) and return it as pandas.

    `attrs_by_id` defaults to a scan of the store's volume groups. A volume's split is
    `splits[id]` when given, else `hash_split(id, split_fractions, split_seed)`. `store_uri` is
    what the `store` column records (default: the store's absolute path), e.g. the final path of
    a store built elsewhere and renamed.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    if is_remote(store):  # one PUT: readers see the old manifest or the new one
        attrs_by_id = scan_volume_attrs(store) if attrs_by_id is None else attrs_by_id
        rows = [manifest_row(store_uri or str(store).rstrip("/"), attrs_by_id[volume_id],
                             (splits or {}).get(volume_id) or hash_split(volume_id, split_fractions, split_seed))
                for volume_id in sorted(attrs_by_id)]
        table = pa.Table.from_pylist(rows, schema=manifest_schema())
        remote.write_remote_file(str(store), MANIFEST_NAME, remote.parquet_bytes(table))
        return table.to_pandas()
    root = Path(store).expanduser().absolute()
    if attrs_by_id is None:
        attrs_by_id = scan_volume_attrs(root)
    splits = dict(splits or {})
    for volume_id, split in splits.items():
        if split not in SPLITS:
            raise ConversionError(f"splits[{volume_id!r}]={split!r}: use one of {SPLITS}.",
                                  volume_id=volume_id)
    rows = [manifest_row(store_uri or root, attrs_by_id[volume_id],
                         splits.get(volume_id) or hash_split(volume_id, split_fractions,
                                                              split_seed))
            for volume_id in sorted(attrs_by_id)]
    table = pa.Table.from_pylist(rows, schema=manifest_schema())
    temporary = root / f".{MANIFEST_NAME}.tmp-{secrets.token_hex(4)}"
    try:
        pq.write_table(table, temporary)
        os.replace(temporary, root / MANIFEST_NAME)
    finally:
        temporary.unlink(missing_ok=True)
    return table.to_pandas() if rows else pd.DataFrame(
        {name: pd.Series(dtype=object) for name in MANIFEST_COLUMNS})


def read_manifest(store: str | os.PathLike):
    """The store's manifest as a pandas DataFrame (list columns hold numpy arrays)."""
    import pandas as pd

    if is_remote(store):
        try:
            return pd.read_parquet(io.BytesIO(remote.read_remote_bytes(str(store), MANIFEST_NAME)))
        except FileNotFoundError:
            raise ConversionError(f"{store}: no manifest. Is it a rayssl store? Build one with "
                                  "`rayssl convert SCANS --out URL`.", path=str(store)) from None
    path = Path(store).expanduser() / MANIFEST_NAME
    if not path.exists():
        raise ConversionError(
            f"{path}: no manifest. Is {store} a rayssl store? Build one with "
            "datasets_zarr.convert(...) or datasets_zarr.demo_store().", path=str(path))
    return pd.read_parquet(path)


@dataclass(frozen=True)
class VolumeMeta:
    """Everything a reader needs to know about one stored volume (from its group attributes)."""

    id: str
    store: str
    group: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, ...], ...]
    dtype: str
    modality: str
    bbox: tuple[int, int, int, int, int, int]
    background: float
    intensity: dict
    preprocessing: tuple[dict, ...]
    has_label: bool
    has_mask: bool
    source: str
    source_sha256: str
    orientation: str = "RAS"
    split: str | None = None

    @property
    def path(self) -> str:
        """Local path of the volume group."""
        return os.path.join(self.store, self.group)

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel -> RAS mm affine."""
        affine = np.eye(4)
        affine[:3, :3] = np.asarray(self.direction) * np.asarray(self.spacing)[None, :]
        affine[:3, 3] = self.origin
        return affine

    @classmethod
    def from_attrs(cls, store: str | os.PathLike, attrs: dict, split: str | None = None
                   ) -> "VolumeMeta":
        return cls(
            id=attrs["id"], store=str(store).rstrip("/") if is_remote(store) else str(Path(store).expanduser().absolute()),
            group=attrs["id"],
            shape=tuple(int(v) for v in attrs["shape"]),
            spacing=tuple(float(v) for v in attrs["spacing"]),
            origin=tuple(float(v) for v in attrs["origin"]),
            direction=tuple(tuple(float(v) for v in row) for row in attrs["direction"]),
            dtype=str(attrs.get("dtype", "")), modality=attrs["modality"],
            bbox=tuple(int(v) for v in attrs["bbox"]), background=float(attrs["background"]),
            intensity=dict(attrs.get("intensity", {})),
            preprocessing=tuple(attrs.get("preprocessing", ())),
            has_label=bool(attrs["has_label"]), has_mask=bool(attrs["has_mask"]),
            source=str(attrs.get("source", "")), source_sha256=str(attrs.get("source_sha256", "")),
            orientation=str(attrs.get("orientation", "RAS")), split=split)


def volume_meta(store: str | os.PathLike, volume_id: str, split: str | None = None) -> VolumeMeta:
    """`VolumeMeta` of one volume, read from its group attributes."""
    attrs = read_volume_attrs(store, volume_id)
    if attrs is None:
        raise ConversionError(f"{store}: no volume '{volume_id}' in this store.",
                              volume_id=volume_id)
    return VolumeMeta.from_attrs(store, attrs, split)


def iter_volume_meta(store: str | os.PathLike, split: str | None = None) -> Iterator[VolumeMeta]:
    """`VolumeMeta` of every manifest row (optionally of one split), in manifest order."""
    manifest = read_manifest(store)
    if split is not None:
        manifest = manifest[manifest["split"] == split]
    for volume_id, row_split in zip(manifest["id"], manifest["split"]):
        yield volume_meta(store, volume_id, row_split)
