"""DrasCLR's downstream feature API: landmark, image-level and sliding-window features of a pretrained encoder.

The array functions (embed_landmarks, embed_image, embed_voxels) take a subject's volume and its
landmarks or atlas affine; embed_volume reads a registered volume and its atlas from a store and
calls them. Kept apart from the method (method.py): pretraining never opens a store itself.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from rayssl.data.intensity import IntensityMapping, stored_hu_offset
from rayssl.data.read import read_box
from rayssl.methods.drasclr.method import CT_WINDOW, DRASCLR_INTENSITY, DrasCLREncoder, landmark_starts


def _patch_mapping(window: tuple[float, float] | None) -> IntensityMapping:
    """The paper's mapping of a patch to [-1, 1]: stored `window` (CT_WINDOW for CT in HU), or (None)
    the patch's 0.5-99.5 percentiles, as `DRASCLR_INTENSITY` resolves for data not in HU."""
    if window is None:
        return DRASCLR_INTENSITY.resolve_stored("MR", None)
    return IntensityMapping("fixed", *window, out_range=DRASCLR_INTENSITY.out_range)


@torch.no_grad()
def _encode_patches(
    encoder: DrasCLREncoder,
    image: np.ndarray,
    centres: np.ndarray,
    coords: np.ndarray,
    patch_size: int,
    background: float,
    window: tuple[float, float] | None,
    batch_size: int,
    device: torch.device | str,
) -> np.ndarray:
    was_training = encoder.training
    encoder.eval()
    starts = landmark_starts(centres, patch_size)
    features = []
    for i in range(0, len(starts), batch_size):
        patches = [read_box(image, s, (patch_size,) * 3, background, np.float32) for s in starts[i : i + batch_size]]
        patches = [_patch_mapping(window).apply(p) for p in patches]
        x = torch.from_numpy(np.stack(patches)[:, None]).to(device)
        loc = torch.from_numpy(np.asarray(coords[i : i + batch_size], dtype=np.float32)).to(device)
        features.append(encoder(x, loc).cpu().numpy())
    encoder.train(was_training)
    return np.concatenate(features, axis=0)


def embed_landmarks(
    encoder: DrasCLREncoder,
    image: np.ndarray,
    positions: np.ndarray,
    atlas_coords: np.ndarray,
    patch_size: int,
    *,
    background: float = -1024.0,
    window: tuple[float, float] | None = CT_WINDOW,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Representation of every landmark patch of one subject: [L, rep_dim].

    Args:
        encoder: a (pretrained) DrasCLREncoder.
        image: the subject's volume (x, y, z), in HU for CT.
        positions: [L, 3] landmark centres in the subject's voxel grid (VolumeInfo.extra["drasclr_landmarks"]).
        atlas_coords: [L, 3] the landmarks' atlas coordinates in [-1, 1] (extra["drasclr_atlas_coords"]).
        patch_size: patch edge used in pretraining.
        window: intensity window (None = per-patch 0.5-99.5 percentiles, for non-CT).
    """
    return _encode_patches(
        encoder,
        image,
        np.asarray(positions),
        np.asarray(atlas_coords),
        patch_size,
        background,
        window,
        batch_size,
        device,
    )


def embed_image(
    encoder: DrasCLREncoder,
    image: np.ndarray,
    positions: np.ndarray,
    atlas_coords: np.ndarray,
    patch_size: int,
    **kwargs: Any,
) -> np.ndarray:
    """Image-level representation [rep_dim]: the mean of the landmark representations (as the paper)."""
    return embed_landmarks(encoder, image, positions, atlas_coords, patch_size, **kwargs).mean(axis=0)


def embed_voxels(
    encoder: DrasCLREncoder,
    image: np.ndarray,
    subject_to_atlas_voxel: np.ndarray,
    atlas_shape: Sequence[int],
    patch_size: int,
    stride: int | None = None,
    *,
    background: float = -1024.0,
    window: tuple[float, float] | None = CT_WINDOW,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Sliding-window features over a whole subject: ([rep_dim, gx, gy, gz], centres [gx, gy, gz, 3]).

    A window of `patch_size` is centred every `stride` voxels (default patch_size // 2); each is
    encoded with the atlas coordinate of its centre, found through the subject->atlas affine
    (`subject_to_atlas_voxel`, 4x4 in voxel indices, attrs["rayssl"]["drasclr"] of the volume).
    Interpolate the grid at the returned centres for per-voxel features.
    """
    stride = stride or max(1, patch_size // 2)
    axes = [np.arange(0, max(n, 1), stride, dtype=np.int64) + min(stride, n) // 2 for n in image.shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # [gx, gy, gz, 3]
    centres = grid.reshape(-1, 3)
    homogeneous = np.concatenate([centres, np.ones((len(centres), 1))], axis=1)
    atlas_points = (np.asarray(subject_to_atlas_voxel, dtype=np.float64) @ homogeneous.T).T[:, :3]
    from datasets_zarr.landmarks import atlas_coordinates

    coords = atlas_coordinates(atlas_points, atlas_shape)  # windows outside the atlas extrapolate
    feats = _encode_patches(encoder, image, centres, coords, patch_size, background, window, batch_size, device)
    return feats.T.reshape(-1, *grid.shape[:3]), grid


def embed_volume(
    encoder: DrasCLREncoder,
    store: str,
    volume_id: str,
    *,
    patch_size: int,
    level: str = "image",
    landmark_step: int = 26,
    landmark_min_fraction: float = 0.1,
    stride: int | None = None,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> Any:
    """Features of a stored, registered volume, for downstream probes.

    level "image": [rep_dim], the mean over landmarks; "landmarks": [L, rep_dim]; "voxels": the
    sliding-window grid and centres of `embed_voxels`. The volume must have been registered to
    its atlas (DrasCLR.prepare / datasets_zarr.landmarks.prepare_anatomy); the landmark grid is
    rebuilt from the atlas mask with the pretraining `patch_size`, `landmark_step` and
    `landmark_min_fraction` (the model card's "landmarks" entry).
    """
    import zarr

    from datasets_zarr.landmarks import atlas_coordinates, grid_landmarks, map_to_subject
    from datasets_zarr.lungmask import read_mask
    from datasets_zarr.manifest import volume_meta
    from datasets_zarr.register import ATTRS_KEY
    from datasets_zarr.store import read_volume_attrs

    if level not in ("image", "landmarks", "voxels"):
        raise ValueError(f"level must be 'image', 'landmarks' or 'voxels', got {level!r}")
    attrs = read_volume_attrs(store, volume_id) or {}
    entry = attrs.get(ATTRS_KEY)
    if not entry:
        raise ValueError(
            f"volume {volume_id!r} of {store} is not registered to an atlas: run DrasCLR.prepare "
            f"(or datasets_zarr.landmarks.prepare_anatomy) on its store first"
        )
    image = zarr.open_array(f"{store}/{volume_id}/image", mode="r")[...]
    modality = str(attrs.get("modality", ""))
    mapping = DRASCLR_INTENSITY.resolve_stored(
        modality, stored_hu_offset(modality, attrs.get("intensity"), str(attrs.get("dtype", ""))))
    options = dict(
        background=float(attrs.get("background", -1024.0)),
        window=mapping.bounds() if mapping.kind == "hu_window" else None,
        batch_size=batch_size,
        device=device,
    )
    atlas_shape = volume_meta(entry["atlas_store"], entry["atlas"]).shape
    if level == "voxels":
        return embed_voxels(
            encoder, image, np.asarray(entry["subject_to_atlas_voxel"]), atlas_shape, patch_size, stride, **options
        )
    centres = grid_landmarks(
        read_mask(entry["atlas_store"], entry["atlas"]), patch_size, landmark_step, landmark_min_fraction
    )
    positions = map_to_subject(centres, np.asarray(entry["atlas_to_subject_voxel"]))
    features = embed_landmarks(
        encoder, image, positions, atlas_coordinates(centres, atlas_shape), patch_size, **options
    )
    return features.mean(axis=0) if level == "image" else features
