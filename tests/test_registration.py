"""Tests of DrasCLR's anatomical alignment: lung masks, atlas registration, landmarks (datasets_zarr)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from datasets_zarr import demo
from datasets_zarr.landmarks import (
    atlas_coordinates,
    choose_atlas,
    grid_landmarks,
    map_to_subject,
    nearest_landmarks,
    prepare_anatomy,
)
from datasets_zarr.lungmask import (
    EmptyMaskError,
    MaskInfo,
    ensure_mask,
    lung_mask,
    read_mask,
    stored_mask_info,
    update_volume_attrs,
)
from datasets_zarr.manifest import read_manifest, write_manifest
from datasets_zarr.register import register_volume
from datasets_zarr.store import read_volume_attrs, write_volume

SHAPE, SPACING = (64, 64, 40), (6.0, 6.0, 8.0)


def _private_copy(store: Path, destination: Path) -> Path:
    """A copy of a store with its manifest pointing at the copy (prepare writes into stores)."""
    shutil.copytree(store, destination)
    old = read_manifest(store)
    write_manifest(destination, splits=dict(zip(old["id"], old["split"])))
    return destination


@pytest.fixture(scope="module")
def phantom():
    return demo.make_phantom(3, SHAPE, SPACING)


@pytest.fixture(scope="module")
def shifted_store(tmp_path_factory, phantom):
    """An atlas phantom and a copy of it scaled and shifted by a known voxel affine (no masks supplied)."""
    image, _ = phantom
    centre = (np.asarray(SHAPE) - 1) / 2.0
    matrix = np.diag([1.08, 0.93, 1.05])
    shift = np.array([3.0, -2.0, 1.5])
    atlas_to_subject = np.eye(4)
    atlas_to_subject[:3, :3] = matrix
    atlas_to_subject[:3, 3] = centre + shift - matrix @ centre
    inverse = np.linalg.inv(atlas_to_subject)
    subject = ndimage.affine_transform(
        image.astype(np.float32), inverse[:3, :3], inverse[:3, 3], order=1, mode="constant", cval=-1024.0
    )
    store = tmp_path_factory.mktemp("shifted") / "store.zarr"
    affine = demo.phantom_affine(SHAPE, SPACING)
    write_volume(store, "atlas", image, affine, modality="CT")
    write_volume(store, "subject", np.rint(subject).astype(np.int16), affine, modality="CT")
    write_manifest(store, splits={"atlas": "train", "subject": "train"})
    return store, atlas_to_subject


class TestLungMask:
    def test_classical_mask_matches_the_phantom_lungs(self, phantom):
        image, label = phantom
        mask = lung_mask(image, SPACING) > 0
        truth = (label == 1) | (label == 2)
        dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
        assert dice > 0.9

    def test_mask_is_stored_like_the_image_and_published_whole(self, shifted_store):
        store, _ = shifted_store
        info = ensure_mask(store, "atlas", "lung")
        assert info.kind == "lung" and info.voxels > 0 and info.plausible_lung
        image_meta = json.loads((store / "atlas" / "image" / "zarr.json").read_text())
        mask_meta = json.loads((store / "atlas" / "mask" / "zarr.json").read_text())
        assert mask_meta["data_type"] == "uint8"
        assert mask_meta["shape"] == image_meta["shape"]
        assert mask_meta["chunk_grid"] == image_meta["chunk_grid"]
        assert [c["name"] for c in mask_meta["codecs"]] == [c["name"] for c in image_meta["codecs"]]
        assert read_volume_attrs(store, "atlas")["has_mask"] is True
        assert not list((store / "atlas").glob(".mask*")), "temporary mask arrays were left behind"
        # A second call finds the stored mask and does not rewrite it.
        before = (store / "atlas" / "mask" / "zarr.json").stat().st_mtime_ns
        assert ensure_mask(store, "atlas", "lung") == info
        assert (store / "atlas" / "mask" / "zarr.json").stat().st_mtime_ns == before
        # A generated mask whose publication was interrupted (has_mask still off) is not trusted.
        update_volume_attrs(store, "atlas", {"has_mask": False})
        assert stored_mask_info(store, "atlas") is None
        assert ensure_mask(store, "atlas", "lung") == info
        assert read_volume_attrs(store, "atlas")["has_mask"] is True

    def test_user_supplied_mask_is_used_as_is(self, demo_store_path, tmp_path):
        store = _private_copy(demo_store_path, tmp_path / "copy.zarr")
        supplied = read_mask(store, "phantom-000")
        info = ensure_mask(store, "phantom-000", "foreground")
        assert info.kind == "user" and info.voxels == int(supplied.sum())
        np.testing.assert_array_equal(read_mask(store, "phantom-000"), supplied)

    def test_empty_lung_mask_names_the_volume_and_suggests_foreground(self, tmp_path):
        # A soft-tissue block surrounded by air: no air inside the body, so no lungs.
        image = np.full((32, 32, 16), -1000, dtype=np.int16)
        image[6:26, 6:26, :] = 40
        store = tmp_path / "nolungs.zarr"
        write_volume(store, "head-007", image, np.diag([2.0, 2.0, 2.0, 1.0]), modality="CT")
        write_manifest(store)
        with pytest.raises(EmptyMaskError, match=r"'head-007'.*--set mask=foreground"):
            ensure_mask(store, "head-007", "lung")
        assert stored_mask_info(store, "head-007") is None
        info = ensure_mask(store, "head-007", "foreground")
        # The opening that detaches a scanner table rounds off the block's 4 corner edges (64 voxels).
        assert info.kind == "foreground" and 0.98 * 20 * 20 * 16 <= info.voxels <= 20 * 20 * 16
        assert not read_mask(store, "head-007")[:6].any()


class TestLandmarks:
    def test_grid_landmarks_by_hand(self):
        mask = np.zeros((12, 12, 8), dtype=bool)
        mask[0:4, 0:4, 0:4] = True  # fills the patch starting at (0, 0, 0)
        mask[8, 8, 4] = True  # 1 voxel of 64 = 1.6%: below 10%, not a landmark
        mask[4:6, 8:12, 4:8] = True  # 32 of 64 voxels of the patch at (4, 8, 4)
        centres = grid_landmarks(mask, patch_size=4, step=4, min_fraction=0.1)
        np.testing.assert_array_equal(centres, [[2, 2, 2], [6, 10, 6]])

    def test_nearest_landmarks_by_hand(self):
        centres = np.array([[0, 0, 0], [1, 0, 0], [3, 0, 0], [7, 0, 0]])
        np.testing.assert_array_equal(nearest_landmarks(centres, 2), [[1, 2], [0, 2], [1, 0], [2, 1]])
        with pytest.raises(ValueError, match="n_neighbors=4"):
            nearest_landmarks(centres, 4)

    def test_nearest_landmarks_spread_grid_ties_over_all_six_directions(self):
        """The official rule (sklearn distances + NumPy's default argsort), not ties by index: on a
        landmark grid the picks spread over the six directions (ties by index: +x 5 %, -x 29 %)."""
        rng = np.random.default_rng(0)
        grid = np.array([(x, y, z) for x in range(0, 260, 26) for y in range(0, 260, 26) for z in range(0, 234, 26)],
                        dtype=np.float64)
        centres = grid[rng.random(len(grid)) < 0.6]
        steps = centres[nearest_landmarks(centres, 2)] - centres[:, None, :]
        axis = np.abs(steps).argmax(-1)
        sign = np.take_along_axis(steps, axis[..., None], -1)[..., 0] > 0
        counts = np.bincount((axis * 2 + sign).ravel(), minlength=6)
        total = counts.sum()  # uniform would be total / 6 each
        assert counts.min() > total / 12 and counts.max() < total / 4, counts

    def test_atlas_coordinates_span_minus_one_to_one(self):
        np.testing.assert_allclose(
            atlas_coordinates([[0, 0, 0], [9, 4.5, 19]], (10, 10, 20)), [[-1, -1, -1], [1, 0, 1]]
        )

    def test_atlas_choice(self):
        healthy = MaskInfo("b", "lung", 1000, 1.0, 0.2)
        tiny = MaskInfo("a", "lung", 10, 0.01, 0.001)
        masks = {("s", "a"): tiny, ("s", "b"): healthy}
        assert choose_atlas(masks, None) == ("s", "b")
        assert choose_atlas(masks, "a") == ("s", "a")
        assert choose_atlas({("s", "a"): tiny}, None) == ("s", "a")
        with pytest.raises(ValueError, match="atlas='zz'"):
            choose_atlas(masks, "zz")


class TestRegistration:
    def test_shifted_scaled_copy_is_recovered_within_a_voxel(self, shifted_store, monkeypatch):
        store, truth = shifted_store
        for volume_id in ("atlas", "subject"):
            ensure_mask(store, volume_id, "lung")
        entry = register_volume(str(store), "subject", str(store), "atlas", "lung")
        centres = grid_landmarks(read_mask(store, "atlas"), patch_size=8, step=4)
        assert len(centres) > 20
        found = map_to_subject(centres, np.asarray(entry["atlas_to_subject_voxel"]))
        expected = map_to_subject(centres, truth)
        assert np.abs(found - expected).max() < 1.0
        assert entry["dice"] > 0.9
        np.testing.assert_allclose(
            np.asarray(entry["subject_to_atlas_voxel"]) @ np.asarray(entry["atlas_to_subject_voxel"]),
            np.eye(4),
            atol=1e-8,
        )
        # Stored and resumable: a second call reuses the stored result without registering again.
        monkeypatch.setattr(
            "datasets_zarr.register.register_masks",
            lambda *a, **k: pytest.fail("registration ran again instead of resuming"),
        )
        assert register_volume(str(store), "subject", str(store), "atlas", "lung") == entry
        assert read_volume_attrs(store, "subject")["atlas_registration"]["dice"] == entry["dice"]

    def test_prepare_anatomy_with_ray_tasks_updates_attrs_and_manifest(self, demo_store_path, tmp_path, ray_local):
        from rayssl.data.volumes import load_volumes

        store = _private_copy(demo_store_path, tmp_path / "copy.zarr")
        volumes = load_volumes(str(store), "all")
        from rayssl.train.jobs import ray_job_runner

        table = prepare_anatomy(volumes, patch_size=8, step=4, n_neighbors=2, runner=ray_job_runner(),
                                progress=False)
        assert table.atlas_id == "phantom-000"  # the first volume with a plausible lung mask
        assert table.n_landmarks > 10 and table.neighbors.shape == (table.n_landmarks, 2)
        assert np.abs(table.atlas_coords).max() <= 1.0
        manifest = read_manifest(store)
        assert {"atlas", "atlas_dice", "atlas_to_subject_voxel", "subject_to_atlas_voxel"} <= set(manifest.columns)
        assert (manifest["atlas"] == "phantom-000").all() and manifest["has_mask"].all()
        assert (manifest["atlas_dice"] > 0.8).all()
        for row in manifest.itertuples():
            assert np.asarray(row.atlas_to_subject_voxel).shape == (16,)
            positions = table.subject_positions[row.id]
            assert positions.shape == (table.n_landmarks, 3)
            assert table.dice[row.id] == pytest.approx(row.atlas_dice)
        # The atlas maps onto itself.
        np.testing.assert_allclose(table.subject_positions["phantom-000"], table.atlas_centres)
        # Reloading the manifest gives the transforms to planners (VolumeInfo.extra).
        reloaded = load_volumes(str(store), "all")
        assert np.asarray(reloaded[1].extra["atlas_to_subject_voxel"]).shape == (16,)
