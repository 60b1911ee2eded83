"""Embedded demo data: phantom anatomy, demo stores (format, caching, concurrent first use) and the MNI152 brain set."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

import datasets_zarr as dz
from datasets_zarr.demo import DEMO_LABELS, default_cache_dir, demo_splits, phantom_affine
from datasets_zarr.manifest import manifest_schema

FIXTURE_SHAPE, FIXTURE_SPACING = (64, 64, 48), (6.0, 6.0, 20.0 / 3.0)


class TestPhantom:
    def test_deterministic_and_varied(self):
        first, first_label = dz.make_phantom(5, shape=(48, 48, 32), spacing=(8.0, 8.0, 10.0))
        again, again_label = dz.make_phantom(5, shape=(48, 48, 32), spacing=(8.0, 8.0, 10.0))
        other, other_label = dz.make_phantom(6, shape=(48, 48, 32), spacing=(8.0, 8.0, 10.0))
        np.testing.assert_array_equal(first, again)
        np.testing.assert_array_equal(first_label, again_label)
        assert first.dtype == np.int16 and first_label.dtype == np.uint8
        assert np.mean(first != other) > 0.5
        volumes = [np.bincount(first_label.ravel(), minlength=9),
                   np.bincount(other_label.ravel(), minlength=9)]
        assert np.any(np.abs(volumes[0][1:] - volumes[1][1:]) > 0.05 * volumes[0][1:])

    def test_anatomy_in_hounsfield_units(self):
        image, label = dz.make_phantom(0)  # default 96x96x64 at 4 x 4 x 5 mm
        assert image.shape == (96, 96, 64)
        assert set(np.unique(label)) == set(DEMO_LABELS)
        def median(class_id):  # noqa: E306
            return float(np.median(image[label == class_id]))
        assert -900 < median(1) < -700 and -900 < median(2) < -700  # lungs (+ vessels)
        assert 20 < median(3) < 70 and 40 < median(4) < 80 and 30 < median(5) < 70  # organs
        assert 10 < median(6) < 50 and 10 < median(7) < 50  # kidneys
        assert median(8) > 200  # bone: cortex ~700, cancellous ~250, blurred at 4 mm
        corner = image[:4, :4, :]
        assert abs(corner.mean() + 1000) < 10 and 5 < corner.std() < 40  # noisy air
        lung = image[label == 1]
        assert np.mean(lung > -500) > 0.01  # the vessel tree shows inside the lung
        # Right lung on the patient's right: x grows toward the right in RAS.
        right_x = np.argwhere(label == 1)[:, 0].mean()
        left_x = np.argwhere(label == 2)[:, 0].mean()
        assert right_x > left_x
        liver_x = np.argwhere(label == 4)[:, 0].mean()
        assert liver_x > image.shape[0] / 2  # liver on the right
        lung_z = np.argwhere(label == 1)[:, 2].mean()
        assert lung_z > np.argwhere(label == 4)[:, 2].mean()  # lungs above the liver

    def test_size_is_physical(self):
        fine, _ = dz.make_phantom(3, shape=(96, 96, 32), spacing=(4.0, 4.0, 10.0))
        coarse, _ = dz.make_phantom(3, shape=(48, 48, 32), spacing=(8.0, 8.0, 10.0))
        body_fine = np.mean(fine > -500) * 96 * 96 * 16.0
        body_coarse = np.mean(coarse > -500) * 48 * 48 * 64.0
        assert abs(body_fine - body_coarse) / body_fine < 0.05  # same mm^2 of body


class TestDemoStore:
    def test_fixture_store_format(self, demo_store_path, ray_local, tmp_path):
        store = Path(demo_store_path)
        manifest = dz.read_manifest(store)
        assert list(manifest["id"]) == [f"phantom-{i:03d}" for i in range(4)]
        assert list(manifest["split"]) == ["train", "train", "val", "test"]
        assert all(manifest["has_label"]) and all(manifest["has_mask"])
        assert set(manifest["store"]) == {str(store.absolute())}
        import pyarrow.parquet as pq
        assert pq.read_schema(store / "manifest.parquet").equals(manifest_schema())
        image, label = dz.make_phantom(2, shape=FIXTURE_SHAPE, spacing=FIXTURE_SPACING)
        group = zarr.open_group(str(store / "phantom-002"), mode="r")
        np.testing.assert_array_equal(group["image"][...], image)
        np.testing.assert_array_equal(group["label"][...], label)
        np.testing.assert_array_equal(group["mask"][...], np.isin(label, (1, 2)))
        assert group["image"].chunks == (32, 32, 32)
        demo_attrs = dict(group.attrs["rayssl"])
        assert demo_attrs["spacing"] == list(FIXTURE_SPACING)
        np.testing.assert_allclose(demo_attrs["origin"],
                                   phantom_affine(FIXTURE_SHAPE, FIXTURE_SPACING)[:3, 3])

        # The same phantom through the file-based convert path gives the same keys and arrays.
        affine = phantom_affine(FIXTURE_SHAPE, FIXTURE_SPACING)
        for name, data in (("img", image), ("seg", label),
                           ("lungs", np.isin(label, (1, 2)).astype(np.uint8))):
            nib.save(nib.Nifti1Image(data, affine), tmp_path / f"{name}.nii.gz")
        converted = tmp_path / "converted.zarr"
        dz.convert([tmp_path / "img.nii.gz"], converted, labels=[tmp_path / "seg.nii.gz"],
                   masks=[tmp_path / "lungs.nii.gz"], chunks=32, progress=False)
        other = zarr.open_group(str(converted / "img"), mode="r")
        assert set(other.attrs["rayssl"]) == set(demo_attrs)
        assert set(other.attrs) == set(group.attrs) == {"rayssl", "ome"}
        for key in ("shape", "bbox", "background", "intensity", "dtype", "modality",
                    "has_label", "has_mask", "preprocessing"):
            assert other.attrs["rayssl"][key] == demo_attrs[key], key
        for key in ("spacing", "origin", "direction"):  # NIfTI holds float32 geometry
            np.testing.assert_allclose(other.attrs["rayssl"][key], demo_attrs[key], atol=1e-4)
        np.testing.assert_array_equal(other["image"][...], image)

    def test_cached_and_env_dir(self, tmp_path, monkeypatch):
        monkeypatch.setenv("RAYSSL_CACHE", str(tmp_path / "cache"))
        assert default_cache_dir() == tmp_path / "cache" / "demo"
        start = time.perf_counter()
        path = dz.demo_store(n=1, shape=(24, 24, 16), spacing=(16.0, 16.0, 20.0))
        assert path.parent == tmp_path / "cache" / "demo"
        built = (path / "manifest.parquet").stat().st_mtime_ns
        assert time.perf_counter() - start < 10
        again = dz.demo_store(n=1, shape=(24, 24, 16), spacing=(16.0, 16.0, 20.0))
        assert again == path and (path / "manifest.parquet").stat().st_mtime_ns == built
        different = dz.demo_store(n=1, shape=(24, 24, 16), spacing=(16.0, 16.0, 20.0), seed=1)
        assert different != path
        assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name,
                                                                       different.name])

    def test_concurrent_first_use(self, tmp_path):
        script = textwrap.dedent(f"""
            import datasets_zarr as dz
            print(dz.demo_store({str(tmp_path)!r}, n=3, shape=(32, 32, 24),
                                spacing=(12.0, 12.0, 13.0)))
        """)
        cwd = Path(dz.__file__).parents[1]
        workers = [subprocess.Popen([sys.executable, "-c", script], cwd=cwd,
                                    stdout=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [w.communicate(timeout=120)[0].strip() for w in workers]
        assert all(w.returncode == 0 for w in workers)
        assert outputs[0] == outputs[1]
        assert [p.name for p in tmp_path.iterdir()] == [Path(outputs[0]).name]  # no leftovers
        assert len(dz.read_manifest(outputs[0])) == 3

    def test_splits_of_small_stores(self):
        assert set(demo_splits(["a", "b"]).values()) == {"train"}
        assert sorted(demo_splits(["a", "b", "c"]).values()) == ["train", "train", "val"]
        splits = demo_splits([f"v{i}" for i in range(20)])
        assert sorted(splits.values()).count("val") == 2 and list(splits.values()).count(
            "test") == 2

    def test_mni_brains(self, tmp_path):
        path = dz.demo_store(tmp_path, n=2, kind="mni")
        manifest = dz.read_manifest(path)
        assert list(manifest["modality"]) == ["MR", "MR"] and all(manifest["has_mask"])
        assert not any(manifest["has_label"])
        from nilearn.datasets import load_mni152_template
        template = np.asarray(load_mni152_template(resolution=2).get_fdata(), np.float32)
        first = zarr.open_array(str(path / "mni-000" / "image"), mode="r")[...]
        low, high = np.percentile(template, [0.5, 99.5])
        np.testing.assert_allclose(first, np.clip((template - low) / (high - low), 0, 1),
                                   atol=1e-5)
        second = zarr.open_array(str(path / "mni-001" / "image"), mode="r")[...]
        mask = zarr.open_array(str(path / "mni-001" / "mask"), mode="r")[...]
        assert second.shape == first.shape and 0.0 <= second.min() and second.max() <= 1.0
        assert np.corrcoef(first.ravel(), second.ravel())[0, 1] > 0.5  # same anatomy, moved
        assert not np.allclose(first, second, atol=0.05)
        assert second[mask == 1].mean() > 3 * second[mask == 0].mean()  # mask follows brain
        meta = dz.volume_meta(path, "mni-001")
        assert meta.spacing == (2.0, 2.0, 2.0) and meta.intensity["unit"] == "scaled"


@pytest.mark.slow
def test_default_demo_store_builds_fast(tmp_path):
    start = time.perf_counter()
    path = dz.demo_store(tmp_path)
    elapsed = time.perf_counter() - start
    assert len(dz.read_manifest(path)) == 8
    assert elapsed < 20, f"default demo store took {elapsed:.1f} s"


class TestPopulation:
    """`rayssl demo`: pretraining populations (issue 24): distinct volumes, seeds disjoint from every probe set."""

    def test_synthetic_mr_subjects_differ_in_shape_and_contrast_and_repeat_by_seed(self):
        from datasets_zarr.demo import MNI_TISSUE_LABELS
        from datasets_zarr.synth_mr import make_synth_mr

        first, first_label, first_mask, affine = make_synth_mr(1)
        again, *_ = make_synth_mr(1)
        other, other_label, other_mask, _ = make_synth_mr(2)
        np.testing.assert_array_equal(first, again)
        assert first.dtype == np.float32 and first.shape == other.shape and affine.shape == (4, 4)
        assert set(np.unique(first_label)) == set(MNI_TISSUE_LABELS)
        # The deformation moves the anatomy: the tissue maps of two subjects disagree on many brain voxels.
        brain = (first_mask > 0) | (other_mask > 0)
        assert np.mean(first_label[brain] != other_label[brain]) > 0.1
        # Per-tissue contrast: the order of mean grey- and white-matter intensity is random, so over a few
        # subjects it is not fixed (T1-like and T2-like both occur); ratios differ subject to subject.
        ratios = [first[first_label == 3].mean() / first[first_label == 2].mean(),
                  other[other_label == 3].mean() / other[other_label == 2].mean()]
        for seed in (3, 4, 5):
            image, label, _, _ = make_synth_mr(seed)
            ratios.append(image[label == 3].mean() / image[label == 2].mean())
        assert min(ratios) < 1.0 < max(ratios), ratios

    def test_cli_builds_distinct_volumes_and_refuses_probe_seeds(self, tmp_path, capsys):
        from rayssl.cli import main
        from rayssl.eval.probe import PROBE_DEMO_SEED

        store = tmp_path / "ct.zarr"
        assert main(["demo", "--kind", "ct", "--n", "3", "--out", str(store)]) == 0
        manifest = dz.read_manifest(store)
        assert len(manifest) == 3 and manifest["source_sha256"].nunique() == 3
        seeds = sorted(int(s.split("seed=")[1].split("&")[0]) for s in manifest["source"])
        assert seeds == [5000, 5001, 5002] and not set(seeds) & set(range(PROBE_DEMO_SEED, PROBE_DEMO_SEED + 8))
        # Asking again returns the same store; other parameters at the same path are refused, not mixed in.
        assert main(["demo", "--kind", "ct", "--n", "3", "--out", str(store)]) == 0
        assert main(["demo", "--kind", "ct", "--n", "4", "--out", str(store)]) == 2
        assert "other parameters" in capsys.readouterr().err
        assert main(["demo", "--kind", "ct", "--n", "5", "--seed", str(PROBE_DEMO_SEED - 2),
                     "--out", str(tmp_path / "leak.zarr")]) == 2
        assert "overlap the demo probe set" in capsys.readouterr().err
        assert not (tmp_path / "leak.zarr").exists()
