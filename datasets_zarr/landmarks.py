"""DrasCLR landmarks: grid patches inside the atlas mask, their nearest neighbours, their place in every subject."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from rayssl.data.jobs import JobRunner, run_in_process

from .errors import ConversionError
from .lungmask import MaskInfo, ensure_mask, read_mask
from .manifest import MANIFEST_NAME, volume_meta
from .register import register_volumes, store_path
from .store import list_volume_ids


@dataclass
class AnatomyTable:
    """Landmarks of a set of volumes registered to one atlas (all arrays small numpy arrays)."""

    atlas_id: str
    atlas_store: str
    atlas_shape: tuple[int, int, int]
    mask_kind: str
    patch_size: int
    step: int
    atlas_centres: np.ndarray  # [L, 3] int64: landmark patch centres, atlas voxel indices
    atlas_coords: np.ndarray  # [L, 3] float32: the same scaled to [-1, 1] (2c/(shape-1) - 1)
    neighbors: np.ndarray  # [L, k] int64: k nearest other landmarks (atlas distance), nearest first
    subject_positions: dict[str, np.ndarray] = field(default_factory=dict)  # id -> [L, 3] float32 voxel
    atlas_to_subject: dict[str, np.ndarray] = field(default_factory=dict)  # id -> 4x4 voxel affine
    dice: dict[str, float] = field(default_factory=dict)  # id -> atlas/subject mask Dice after registration

    @property
    def n_landmarks(self) -> int:
        return int(len(self.atlas_centres))


def atlas_coordinates(points: np.ndarray, atlas_shape: Sequence[int]) -> np.ndarray:
    """Atlas voxel coordinates [N, 3] -> [-1, 1] per axis: 2c/(shape-1) - 1 (DrasCLR's routing input)."""
    denominator = np.maximum(np.asarray(atlas_shape, dtype=np.float64) - 1.0, 1.0)
    return (2.0 * np.asarray(points, dtype=np.float64) / denominator - 1.0).astype(np.float32)


def grid_landmarks(mask: np.ndarray, patch_size: int, step: int, min_fraction: float = 0.1) -> np.ndarray:
    """Centres [L, 3] (int64 voxel) of the grid patches covering the mask (official 1_patchify_atlas).

    Patches of `patch_size`^3 start every `step` voxels from index 0 along each axis (the last
    start is at most shape - patch_size); a patch is a landmark when more than `min_fraction` of
    its voxels lie in `mask`. Its centre is start + patch_size // 2, so a patch read as
    [centre - patch_size // 2, centre + patch_size // 2) is the same patch. Order: x, then y, then z.
    """
    mask = np.asarray(mask) > 0
    if any(n < patch_size for n in mask.shape):
        raise ConversionError(
            f"the atlas ({mask.shape}) is smaller than one landmark patch ({patch_size}^3); lower patch_size"
        )
    # Integral volume: the mask count of any box is 8 look-ups.
    integral = np.zeros(tuple(n + 1 for n in mask.shape), dtype=np.int64)
    integral[1:, 1:, 1:] = mask.cumsum(0).cumsum(1).cumsum(2)
    starts = [np.arange(0, n - patch_size + 1, step) for n in mask.shape]
    sx, sy, sz = np.meshgrid(*starts, indexing="ij")
    sx, sy, sz = sx.ravel(), sy.ravel(), sz.ravel()
    ex, ey, ez = sx + patch_size, sy + patch_size, sz + patch_size
    inside = (
        integral[ex, ey, ez]
        - integral[sx, ey, ez]
        - integral[ex, sy, ez]
        - integral[ex, ey, sz]
        + integral[sx, sy, ez]
        + integral[sx, ey, sz]
        + integral[ex, sy, sz]
        - integral[sx, sy, sz]
    )
    keep = inside > min_fraction * patch_size**3
    return np.stack([sx[keep], sy[keep], sz[keep]], axis=1).astype(np.int64) + patch_size // 2


def nearest_landmarks(centres: np.ndarray, k: int) -> np.ndarray:
    """[L, k] indices of each landmark's k nearest other landmarks (Euclidean), by the official rule.

    DrasCLR's `data/copd_patch.py` takes `np.argsort(pairwise_distances(loc)[j])[1:k+1]`: sklearn's
    Euclidean distances (dot-product form, whose rounding differs between equal grid distances)
    and NumPy's default (unstable) sort. On a landmark grid every landmark has up to six neighbours
    at the same distance; that rule spreads the picks over all six directions, where a stable sort
    of exact distances (ties by index) would pick the -x / -y neighbours almost always.
    """
    from sklearn.metrics import pairwise_distances

    centres = np.asarray(centres, dtype=np.float64)
    if len(centres) < k + 1:
        raise ConversionError(
            f"only {len(centres)} landmark(s) but n_neighbors={k}: lower n_neighbors, or get more "
            f"landmarks with a smaller landmark_step / patch_size"
        )
    order = np.argsort(pairwise_distances(centres, metric="euclidean"), axis=1)
    return order[:, 1:k + 1].astype(np.int64)  # column 0 is the landmark itself (distance 0)


def map_to_subject(centres: np.ndarray, atlas_to_subject_voxel: np.ndarray) -> np.ndarray:
    """Atlas voxel points [L, 3] -> subject voxel points [L, 3] (float32) through the 4x4 affine."""
    homogeneous = np.concatenate([np.asarray(centres, dtype=np.float64), np.ones((len(centres), 1))], axis=1)
    return (homogeneous @ np.asarray(atlas_to_subject_voxel, dtype=np.float64).T)[:, :3].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Whole pipeline: masks -> atlas -> registration -> manifest -> landmarks
# ---------------------------------------------------------------------------------------------


def _ref(volume: Any) -> tuple[str, str]:
    """(absolute store path, group) of a VolumeInfo-like object (`extra` with "store" and "group")."""
    extra: Mapping[str, Any] = getattr(volume, "extra", {}) or {}
    if "store" not in extra:
        raise ConversionError(f"volume {volume.id!r} carries no store path (VolumeInfo.extra['store'])")
    return store_path(extra["store"]), str(extra.get("group", volume.id))


def _mask_job(store: str, volume_id: str, kind: str) -> MaskInfo:
    return ensure_mask(store, volume_id, kind)  # type: ignore[arg-type]


def choose_atlas(masks: Mapping[tuple[str, str], MaskInfo], requested: str | None) -> tuple[str, str]:
    """The atlas (store, id): `requested` when given, else the first volume whose mask looks healthy, else the first."""
    refs = list(masks)
    if requested is not None:
        for ref in refs:
            if ref[1] == requested:
                return ref
        raise ConversionError(
            f"atlas={requested!r} is not a volume of this run; choose one of "
            f"{[r[1] for r in refs[:10]]}{' ...' if len(refs) > 10 else ''}"
        )
    for ref in refs:
        if masks[ref].plausible_lung:
            return ref
    return refs[0]


def update_manifest_columns(store: str | os.PathLike, columns: Mapping[str, Mapping[str, Any]]) -> None:
    """Set per-volume values of (possibly new) manifest columns; atomic rewrite of manifest.parquet.

    `columns` maps column name -> {volume id: value}; rows not mentioned keep their value (or
    null in a new column). Other columns and their types are kept.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(store) / MANIFEST_NAME
    table = pq.read_table(path)
    ids = table.column("id").to_pylist()
    for name, values in columns.items():
        old = table.column(name).to_pylist() if name in table.column_names else [None] * len(ids)
        new = [values.get(volume_id, previous) for volume_id, previous in zip(ids, old)]
        array = pa.array(new, type=table.schema.field(name).type) if name in table.column_names else pa.array(new)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    temporary = path.with_name(f".{MANIFEST_NAME}.tmp-{secrets.token_hex(4)}")
    try:
        pq.write_table(table, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def prepare_anatomy(
    volumes: Sequence[Any],
    *,
    mask: str = "lung",
    atlas: str | None = None,
    patch_size: int = 32,
    step: int = 26,
    min_fraction: float = 0.1,
    n_neighbors: int = 2,
    runner: JobRunner = run_in_process,
    progress: bool = True,
) -> AnatomyTable:
    """Masks, atlas registration and landmarks for `volumes` (VolumeInfo-like, from one or more stores).

    1. every volume gets a `mask` (its own if it has one, else a generated lung / body mask), one
       `runner` job per volume (rayssl.train runs them as Ray tasks; default: in this process); 2. the atlas is `atlas` or the first volume with a plausible lung mask;
    3. every volume is registered to the atlas (affine, mask to mask, one job per volume) and
       its transforms and Dice are stored in its attrs and in the manifest columns `atlas`,
    `atlas_dice`, `atlas_to_subject_voxel`, `subject_to_atlas_voxel` (4x4 row-major, 16 floats);
    4. landmarks are the grid patches inside the atlas mask, mapped into every subject.
    Finished volumes are skipped, so an interrupted run resumes where it stopped.
    """
    if mask not in ("lung", "foreground"):
        raise ConversionError(f"mask={mask!r}: use 'lung' or 'foreground'")
    if not volumes:
        raise ConversionError("no volumes to prepare")
    refs = [_ref(v) for v in volumes]
    ids = {ref: v.id for ref, v in zip(refs, volumes)}
    if atlas is not None and not any(ref[1] == atlas for ref in refs):
        # An atlas outside this split (e.g. a validation volume): take it from the first of the
        # volumes' stores that holds it.
        stores = list(dict.fromkeys(ref[0] for ref in refs))
        store = next((s for s in stores if atlas in list_volume_ids(s)), None)
        if store is None:
            raise ConversionError(f"atlas={atlas!r} is not a volume of {' or '.join(stores)}")
        refs_all = refs + [(store, atlas)]
    else:
        refs_all = refs
    infos = runner(_mask_job, [(s, g, mask) for s, g in refs_all], desc=f"{mask} masks", progress=progress)
    masks = dict(zip(refs_all, infos))
    atlas_ref = choose_atlas(masks, atlas)
    entries = register_volumes(refs, atlas_ref, mask, runner=runner, progress=progress)

    by_store: dict[str, dict[str, dict[str, Any]]] = {}
    for (store, group), entry in entries.items():
        columns = by_store.setdefault(
            store,
            {"has_mask": {}, "atlas": {}, "atlas_dice": {}, "atlas_to_subject_voxel": {}, "subject_to_atlas_voxel": {}},
        )
        columns["has_mask"][group] = True
        columns["atlas"][group] = atlas_ref[1]
        columns["atlas_dice"][group] = float(entry["dice"])
        columns["atlas_to_subject_voxel"][group] = [float(v) for row in entry["atlas_to_subject_voxel"] for v in row]
        columns["subject_to_atlas_voxel"][group] = [float(v) for row in entry["subject_to_atlas_voxel"] for v in row]
    for store, columns in by_store.items():
        update_manifest_columns(store, columns)

    atlas_meta = volume_meta(*atlas_ref)
    centres = grid_landmarks(read_mask(*atlas_ref), patch_size, step, min_fraction)
    if len(centres) == 0:
        raise ConversionError(
            f"no landmark: no {patch_size}^3 patch of atlas {atlas_ref[1]!r} (step {step}) is more "
            f"than {min_fraction:.0%} inside its {mask} mask; lower landmark_step, patch_size or "
            f"landmark_min_fraction"
        )
    table = AnatomyTable(
        atlas_id=atlas_ref[1],
        atlas_store=atlas_ref[0],
        atlas_shape=tuple(atlas_meta.shape),
        mask_kind=mask,
        patch_size=patch_size,
        step=step,
        atlas_centres=centres,
        atlas_coords=atlas_coordinates(centres, atlas_meta.shape),
        neighbors=nearest_landmarks(centres, n_neighbors),
    )
    for ref, entry in entries.items():
        table.atlas_to_subject[ids[ref]] = np.asarray(entry["atlas_to_subject_voxel"], dtype=np.float64)
        table.subject_positions[ids[ref]] = map_to_subject(centres, table.atlas_to_subject[ids[ref]])
        table.dice[ids[ref]] = float(entry["dice"])
    if progress:
        print(
            f"[datasets_zarr] {table.n_landmarks} landmarks ({patch_size}^3 patches, step {step}) in the {mask} mask "
            f"of atlas {atlas_ref[1]!r}; {n_neighbors} neighbours each",
            flush=True,
        )
    return table
