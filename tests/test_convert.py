"""Conversion into Zarr stores: DICOM == NIfTI, store layout and attrs, resume, preprocessing, splits, atomicity."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
import SimpleITK as sitk
import zarr

import datasets_zarr as dz
from datasets_zarr.demo import phantom_affine, write_dicom_series
from datasets_zarr.manifest import MANIFEST_COLUMNS, hash_split, manifest_schema
from datasets_zarr.preprocess import reorient_to_ras
from datasets_zarr.store import _pid_alive

SHAPE, SPACING = (40, 36, 24), (3.0, 2.5, 4.0)


@pytest.fixture(scope="module")
def phantom():
    """A small phantom (int16 HU, uint8 labels) with an off-centre RAS affine."""
    image, label = dz.make_phantom(7, shape=SHAPE, spacing=SPACING)
    affine = phantom_affine(SHAPE, SPACING)
    affine[:3, 3] += [12.0, -30.0, 55.0]
    return image, label, affine


def stored(store, volume_id, name="image"):
    return zarr.open_array(str(Path(store) / volume_id / name), mode="r")[...]


def attrs_of(store, volume_id):
    return dict(zarr.open_group(str(Path(store) / volume_id), mode="r").attrs)


class TestDicomMatchesNifti:
    @pytest.mark.parametrize("plane", ["axial", "coronal"])
    def test_same_array_spacing_origin(self, ray_local, tmp_path, phantom, plane):
        image, label, affine = phantom
        nifti = tmp_path / "scan.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), nifti)
        # A non-trivial rescale: stored = (HU + 1024) / 2 -> slope 2 (HU stay integers here:
        # the phantom is rounded to even values first).
        even = (image // 2) * 2
        nib.save(nib.Nifti1Image(even, affine), tmp_path / "even.nii.gz")
        series = tmp_path / "dicom" / "series1"
        write_dicom_series(even, affine, series, plane=plane, shuffle_seed=3, rescale_slope=2.0,
                           rescale_intercept=-1024.0)
        names = sorted(os.listdir(series))
        positions = [float(np.dot(__import__("pydicom").dcmread(series / n).ImagePositionPatient,
                                  [0, 0, 1] if plane == "axial" else [0, 1, 0])) for n in names]
        assert positions != sorted(positions) and positions != sorted(positions, reverse=True), \
            "file names must not follow slice order"

        store = tmp_path / "out.zarr"
        manifest = dz.convert([str(tmp_path / "even.nii.gz"), str(series)], store,
                              ids=["nifti", "dicom"], progress=False)
        assert set(manifest["id"]) == {"nifti", "dicom"}
        np.testing.assert_array_equal(stored(store, "dicom"), stored(store, "nifti"))
        np.testing.assert_array_equal(stored(store, "nifti"), even)
        a_dicom, a_nifti = attrs_of(store, "dicom")["rayssl"], attrs_of(store, "nifti")["rayssl"]
        np.testing.assert_allclose(a_dicom["spacing"], SPACING, atol=1e-5)
        np.testing.assert_allclose(a_dicom["spacing"], a_nifti["spacing"], atol=1e-5)
        np.testing.assert_allclose(a_dicom["origin"], affine[:3, 3], atol=1e-4)
        np.testing.assert_allclose(a_dicom["origin"], a_nifti["origin"], atol=1e-4)
        np.testing.assert_allclose(a_dicom["direction"], np.eye(3), atol=1e-6)
        assert a_dicom["modality"] == "CT" and a_dicom["dtype"] == "int16"
        assert a_dicom["preprocessing"][0] == {"op": "reorient", "from": "LPS" if plane == "axial"
                                               else "LIP", "to": "RAS"}

    def test_reader_agrees_with_simpleitk(self, tmp_path, phantom):
        """GDCM (inside SimpleITK) reads our synthetic series the same way our reader does."""
        image, _, affine = phantom
        series = tmp_path / "s"
        write_dicom_series(image, affine, series, plane="axial", shuffle_seed=1)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
        sitk.WriteImage(reader.Execute(), str(tmp_path / "gdcm.nii.gz"))
        gdcm = nib.as_closest_canonical(nib.load(tmp_path / "gdcm.nii.gz"))
        ours = dz.read_dicom_series(series)
        ours_array, ours_affine = reorient_to_ras(ours.array, ours.affine)
        np.testing.assert_array_equal(ours_array, np.asarray(gdcm.dataobj).astype(np.int16))
        np.testing.assert_allclose(ours_affine, gdcm.affine, atol=1e-4)
        np.testing.assert_array_equal(ours_array, image)

    def test_lps_nifti_and_mhd_are_reoriented(self, ray_local, tmp_path, phantom):
        image, _, affine = phantom
        flipped = image[::-1, ::-1, :]  # LPS voxel order
        lps_affine = affine @ np.array([[-1, 0, 0, SHAPE[0] - 1], [0, -1, 0, SHAPE[1] - 1],
                                        [0, 0, 1, 0], [0, 0, 0, 1]], float)
        nib.save(nib.Nifti1Image(flipped, lps_affine), tmp_path / "lps.nii")
        # MetaImage: ITK arrays are (z, y, x) and geometry is LPS; identity direction = LPS axes.
        itk = sitk.GetImageFromArray(np.ascontiguousarray(flipped.transpose(2, 1, 0)))
        itk.SetSpacing(SPACING)
        corner_ras = lps_affine[:3, 3]
        itk.SetOrigin((-corner_ras[0], -corner_ras[1], corner_ras[2]))
        sitk.WriteImage(itk, str(tmp_path / "lps.mhd"))
        store = tmp_path / "out.zarr"
        dz.convert([tmp_path / "lps.nii", tmp_path / "lps.mhd"], store, ids=["nii", "mhd"],
                   progress=False)
        for volume_id in ("nii", "mhd"):
            np.testing.assert_array_equal(stored(store, volume_id), image)
            np.testing.assert_allclose(attrs_of(store, volume_id)["rayssl"]["origin"],
                                       affine[:3, 3], atol=1e-4)


class TestStoreFormat:
    def test_layout_attrs_codecs_manifest(self, ray_local, tmp_path, phantom):
        image, label, affine = phantom
        nib.save(nib.Nifti1Image(image, affine), tmp_path / "ct.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), tmp_path / "ct_seg.nii.gz")
        np.save(tmp_path / "mr.npy", np.random.default_rng(0).random((20, 18, 16)) * 300)
        store = tmp_path / "s.zarr"
        manifest = dz.convert([tmp_path / "ct.nii.gz", tmp_path / "mr.npy"], store,
                              labels=[tmp_path / "ct_seg.nii.gz", None], chunks=16, shards=32,
                              npy_spacing=(1.0, 1.5, 2.0), progress=False)

        root = zarr.open_group(str(store), mode="r")
        assert root.attrs["rayssl"] == {"format": 1, "axis_order": "xyz", "orientation": "RAS"}
        assert not any((store / ".incoming").iterdir())
        ct = attrs_of(store, "ct")
        meta = ct["rayssl"]
        required = {"id", "shape", "spacing", "origin", "direction", "axis_order", "orientation",
                    "modality", "source", "source_sha256", "preprocessing", "bbox",
                    "background", "intensity", "has_label", "has_mask"}
        assert required <= set(meta)
        assert meta["shape"] == list(SHAPE) and meta["has_label"] and not meta["has_mask"]
        assert meta["background"] == -1024.0 and meta["intensity"] == {"unit": "HU"}
        assert meta["source"] == str(tmp_path / "ct.nii.gz")
        x0, y0, z0, x1, y1, z1 = meta["bbox"]
        assert 0 <= x0 < x1 <= SHAPE[0] and 0 <= y0 < y1 <= SHAPE[1] and 0 <= z0 < z1 <= SHAPE[2]
        ome = ct["ome"]["multiscales"][0]
        assert [a["name"] for a in ome["axes"]] == ["x", "y", "z"]
        assert all(a["type"] == "space" and a["unit"] == "millimeter" for a in ome["axes"])
        assert ome["datasets"][0]["path"] == "image"
        assert ome["datasets"][0]["coordinateTransformations"][0] == {
            "type": "scale", "scale": list(SPACING)}

        array_meta = json.loads((store / "ct" / "image" / "zarr.json").read_text())
        assert array_meta["zarr_format"] == 3 and array_meta["data_type"] == "int16"
        assert array_meta["chunk_grid"]["configuration"]["chunk_shape"] == [32, 32, 32]
        shard = array_meta["codecs"][0]
        assert shard["name"] == "sharding_indexed"
        assert shard["configuration"]["chunk_shape"] == [16, 16, 16]
        inner = shard["configuration"]["codecs"]
        assert inner[0] == {"name": "bytes", "configuration": {"endian": "little"}}
        assert inner[1]["name"] == "blosc"
        assert {k: inner[1]["configuration"][k] for k in ("cname", "clevel", "shuffle")} == {
            "cname": "zstd", "clevel": 3, "shuffle": "shuffle"}
        label_array = zarr.open_array(str(store / "ct" / "label"), mode="r")
        assert label_array.dtype == np.uint8 and label_array.shape == SHAPE
        np.testing.assert_array_equal(label_array[...], label)

        mr = attrs_of(store, "mr")["rayssl"]
        assert mr["modality"] == "MR" and mr["dtype"] == "float32"
        assert mr["spacing"] == [1.0, 1.5, 2.0] and mr["origin"] == [0.0, 0.0, 0.0]

        table = pq.read_table(store / "manifest.parquet")
        assert table.schema.equals(manifest_schema())
        assert tuple(table.column_names) == MANIFEST_COLUMNS
        frame = dz.read_manifest(store)
        assert list(frame["id"]) == ["ct", "mr"]
        row = frame.set_index("id").loc["ct"]
        assert row["store"] == str(store.absolute()) and row["group"] == "ct"
        assert list(row["shape"]) == list(SHAPE) and list(row["bbox"]) == meta["bbox"]
        assert row["dtype"] == "int16" and row["has_label"] and row["split"] in (
            "train", "val", "test")
        assert list(frame["id"]) == list(manifest["id"])
        assert [list(v) for v in frame["spacing"]] == [list(v) for v in manifest["spacing"]]
        # Ray Data reads the footer: same columns (a full read costs seconds of executor start).
        dataset = ray_local.data.read_parquet(str(store / "manifest.parquet"))
        assert tuple(dataset.schema().names) == MANIFEST_COLUMNS

        info = dz.volume_meta(store, "ct")
        assert info.shape == SHAPE and info.path == str(store.absolute() / "ct")
        np.testing.assert_allclose(info.affine, affine, atol=1e-6)
        assert [m.id for m in dz.iter_volume_meta(store)] == ["ct", "mr"]


class TestResume:
    def test_skips_unchanged_redoes_changed(self, ray_local, tmp_path, phantom, capsys):
        image, _, affine = phantom
        for offset, name in enumerate(("a", "b")):  # different content: copies are duplicates
            nib.save(nib.Nifti1Image(image + 3 * offset, affine), tmp_path / f"{name}.nii.gz")
        store = tmp_path / "s.zarr"
        first = dz.convert([tmp_path], store, progress=False)
        assert sorted(first.attrs["converted"]) == ["a", "b"]
        mtime = (store / "a" / "zarr.json").stat().st_mtime_ns

        again = dz.convert([tmp_path], store, progress=False)
        assert again.attrs["converted"] == [] and sorted(again.attrs["skipped"]) == ["a", "b"]
        assert "skipped 2 already converted" in capsys.readouterr().out
        assert (store / "a" / "zarr.json").stat().st_mtime_ns == mtime

        nib.save(nib.Nifti1Image(image + 1, affine), tmp_path / "b.nii.gz")
        changed = dz.convert([tmp_path], store, progress=False)
        assert changed.attrs["converted"] == ["b"] and changed.attrs["skipped"] == ["a"]
        np.testing.assert_array_equal(stored(store, "b"), image + 1)

        windowed = dz.convert([tmp_path], store, window=(-175, 250), progress=False)
        assert sorted(windowed.attrs["converted"]) == ["a", "b"]
        assert stored(store, "a").dtype == np.float32
        assert len(dz.read_manifest(store)) == 2


class TestPreprocessing:
    def test_resample_window_normalize_bbox(self, tmp_path, phantom):
        """Runs the per-volume task in this process: resampling imports torch/MONAI, which is
        paid once here rather than in every Ray worker of the test session."""
        image, label, affine = phantom
        nib.save(nib.Nifti1Image(image, affine), tmp_path / "ct.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), tmp_path / "ct_label.nii.gz")
        brain, mask, brain_affine = dz.make_mni_variant(None)
        crop = (slice(20, 70), slice(30, 80), slice(20, 60))
        nib.save(nib.Nifti1Image(brain[crop] * 500, brain_affine), tmp_path / "mr.nii.gz")
        store = str(dz.store.ensure_store(tmp_path / "s.zarr"))
        options = dz.ConversionOptions.build(spacing=(4.0, 4.0, 4.0), window=(-175, 250),
                                             normalize=(0.5, 99.5))
        jobs = [dz.VolumeJob("ct", dz.ScanRef(str(tmp_path / "ct.nii.gz")),
                             label=dz.ScanRef(str(tmp_path / "ct_label.nii.gz"))),
                dz.VolumeJob("mr", dz.ScanRef(str(tmp_path / "mr.nii.gz")))]
        results = [dz.convert_one(job, store, options) for job in jobs]
        assert [r.status for r in results] == ["converted", "converted"], results

        ct = attrs_of(store, "ct")["rayssl"]
        assert [step["op"] for step in ct["preprocessing"]] == ["reorient", "resample",
                                                                "ct_window"]
        assert ct["preprocessing"][1]["spacing"] == [4.0, 4.0, 4.0]
        np.testing.assert_allclose(ct["spacing"], [4.0, 4.0, 4.0])
        expected_shape = np.round(np.asarray(SHAPE) * SPACING / 4.0).astype(int)
        assert np.all(np.abs(np.asarray(ct["shape"]) - expected_shape) <= 1)
        ct_image, ct_label = stored(store, "ct"), stored(store, "ct", "label")
        assert ct_image.dtype == np.float32 and 0.0 <= ct_image.min() and ct_image.max() <= 1.0
        assert ct_label.shape == ct_image.shape
        assert set(np.unique(ct_label)) <= set(np.unique(label))  # nearest: no new classes
        assert ct["intensity"]["unit"] == "scaled" and ct["background"] == 0.0
        # Lungs (-850 HU) sit below the window: they are 0 after scaling.
        assert np.median(ct_image[ct_label == 1]) == 0.0

        mr = attrs_of(store, "mr")["rayssl"]
        assert mr["modality"] == "MR"
        assert [step["op"] for step in mr["preprocessing"]] == ["reorient", "resample",
                                                                "percentile_normalize"]
        mr_image = stored(store, "mr")
        assert mr_image.min() == 0.0 and mr_image.max() == 1.0
        high = np.mean(mr_image >= 1.0)
        assert 0.001 < high < 0.02  # clipped above the 99.5th percentile

    def test_ct_bbox_is_the_body(self):
        shape, spacing = (64, 64, 20), (8.0, 8.0, 10.0)  # 512 mm field: air around the body
        image, _ = dz.make_phantom(1, shape=shape, spacing=spacing)
        box = np.asarray(dz.foreground_bbox(image, "CT"))
        body = np.argwhere(image > -500)
        expected = np.concatenate([body.min(axis=0), body.max(axis=0) + 1])
        assert np.all(np.abs(box - expected) <= 1), (box, expected)  # opening may trim a tip
        assert box[0] > 5 and box[3] < shape[0] - 5  # tighter than the field of view
        empty = np.full((10, 10, 10), -1000, dtype=np.int16)
        assert dz.foreground_bbox(empty, "CT") == [0, 0, 0, 10, 10, 10]


class TestSplits:
    def test_hash_split_deterministic_and_proportional(self):
        ids = [f"case{i:04d}" for i in range(2000)]
        splits = [hash_split(i) for i in ids]
        assert splits == [hash_split(i) for i in ids]
        fractions = {name: splits.count(name) / len(ids) for name in ("train", "val", "test")}
        assert abs(fractions["train"] - 0.8) < 0.04 and abs(fractions["val"] - 0.1) < 0.03
        other = [hash_split(i, (0.5, 0.5, 0.0), seed=3) for i in ids]
        assert "test" not in other and abs(other.count("train") / len(ids) - 0.5) < 0.05
        assert other != [hash_split(i, (0.5, 0.5, 0.0), seed=4) for i in ids]

    def test_user_splits(self, ray_local, tmp_path):
        for value, name in enumerate(("p", "q", "r")):  # different content: copies are duplicates
            np.save(tmp_path / f"{name}.npy", np.full((8, 8, 8), 5.0 + value, dtype=np.float32))
        manifest = dz.convert([tmp_path], tmp_path / "s.zarr", splits={"p": "test", "q": "val"},
                              split_fractions=(1.0, 0.0, 0.0), modality="MR", progress=False)
        assert dict(zip(manifest["id"], manifest["split"])) == {"p": "test", "q": "val",
                                                                "r": "train"}


def test_folder_expansion_and_ids(tmp_path, phantom):
    image, _, affine = phantom
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "a" / "scan.nii.gz")
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "b" / "scan.nii.gz")
    np.save(tmp_path / "b" / "extra.npy", np.zeros((4, 4, 4)))
    (tmp_path / "b" / "notes.txt").write_text("not a scan")
    (tmp_path / "b" / "._scan.nii.gz").write_bytes(b"resource fork")
    patient = tmp_path / "dicom" / "patient1"
    write_dicom_series(image, affine, patient, series_uid="1.2.3.4.100", series_number=1,
                       file_prefix="A")
    write_dicom_series(image[:, :, :10], affine, patient, series_uid="1.2.3.4.200",
                       series_number=2, file_prefix="B")
    jobs, failures = dz.plan_jobs([str(tmp_path)])
    assert failures == []
    by_id = {job.volume_id: job.image for job in jobs}
    assert set(by_id) == {"a_scan", "b_scan", "extra", "patient1_s1", "patient1_s2"}
    assert by_id["patient1_s2"].series_uid == "1.2.3.4.200"
    assert by_id["patient1_s1"].path == str(patient)
    assert dz.read_dicom_series(patient, series_uid="1.2.3.4.200").array.shape == (40, 36, 10)
    with pytest.raises(dz.ConversionError, match="holds 2 DICOM series"):
        dz.read_dicom_series(patient)


def test_killed_conversion_leaves_nothing_visible(ray_local, tmp_path):
    """kill -9 the driver and the writing worker mid-write; a rerun completes and cleans up."""
    rng = np.random.default_rng(0)
    big = rng.integers(-1000, 1000, size=(176, 176, 160), dtype=np.int16)  # incompressible
    np.save(tmp_path / "big.npy", big)
    np.save(tmp_path / "small.npy", big[:16, :16, :16])
    store = tmp_path / "s.zarr"
    address = ray_local.get_runtime_context().gcs_address
    script = textwrap.dedent(f"""
        import ray, datasets_zarr as dz
        ray.init(address={address!r}, logging_level="WARNING")
        dz.convert([{str(tmp_path / 'big.npy')!r}], {str(store)!r}, chunks=16, modality="CT",
                   progress=False)
    """)
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=Path(dz.__file__).parents[1])
    incoming = store / ".incoming"
    deadline = time.monotonic() + 60
    killed_worker = None
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            notes = list(incoming.glob("big-*.writer.json")) if incoming.exists() else []
            chunks = [p for p in incoming.glob("big-*/image/c/*/*/*")] if notes else []
            if chunks:
                killed_worker = json.loads(notes[0].read_text())["pid"]
                # Driver first: a dead owner cannot resubmit the task to another worker.
                driver.send_signal(signal.SIGKILL)
                try:
                    os.kill(killed_worker, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # Ray already reaped the dead driver's worker
                break
            time.sleep(0.01)
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait(30)
    assert killed_worker is not None, "the conversion finished before it could be interrupted"
    # SIGKILL is delivered when the writer leaves uninterruptible disk I/O; until then it counts
    # as a live writer whose entry must be kept, so wait for it to be gone (or a zombie).
    deadline = time.monotonic() + 60
    while _pid_alive(killed_worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(killed_worker), f"writer {killed_worker} survived SIGKILL for 60 s"

    assert not (store / "big").exists()  # nothing half-written is visible
    assert any(p.is_dir() for p in incoming.iterdir())  # the interrupted write is still there
    if (store / "manifest.parquet").exists():
        assert "big" not in set(dz.read_manifest(store)["id"])

    manifest = dz.convert([tmp_path / "big.npy", tmp_path / "small.npy"], store, chunks=16,
                          modality="CT", progress=False)
    assert sorted(manifest["id"]) == ["big", "small"]
    assert [p.name for p in incoming.iterdir()] == []  # stale entries and notes removed
    np.testing.assert_array_equal(stored(store, "big"), big)


def test_write_limit_mid_volume_keeps_nothing_and_a_rerun_converts_only_what_is_missing(ray_local, tmp_path):
    """`rayssl convert` whose processes may write no file past 256 KiB (RLIMIT_FSIZE standing in for a full
    disk): the first 512 KiB chunk of `big` fails mid-volume."""
    import resource

    import pandas as pd

    rng = np.random.default_rng(0)
    big = rng.integers(-1000, 1000, size=(128, 128, 64), dtype=np.int16)  # incompressible: 512 KiB per chunk
    np.save(tmp_path / "big.npy", big)
    np.save(tmp_path / "small.npy", big[:16, :16, :16])
    store = tmp_path / "s.zarr"
    dz.convert([tmp_path / "small.npy"], store, modality="CT", progress=False)
    before = dz.read_manifest(store)

    limit = 256 * 1024
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    # The conversion runs in Ray workers of the session runtime (a runtime cannot start under the limit);
    # this job's workers set the limit on themselves (tests/helpers.py::limit_file_size), the driver via preexec_fn.
    job_config = {"runtime_env": {"worker_process_setup_hook": "helpers.limit_file_size",
                                  "env_vars": {"PYTHONPATH": tests_dir, "RAYSSL_TEST_FSIZE": str(limit)}}}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps(job_config)
    proc = subprocess.run(
        [sys.executable, "-m", "rayssl.cli", "convert", str(tmp_path / "big.npy"), str(tmp_path / "small.npy"),
         "--out", str(store), "--modality", "CT", "--address", ray_local.get_runtime_context().gcs_address],
        env=env, capture_output=True, text=True, timeout=180,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"big.npy: writing volume 'big' into {store} failed: File too large" in proc.stderr, proc.stderr
    assert "file-size limit" in proc.stderr and "converts only what is missing" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == ["manifest.parquet", "small",
                                                                                     "zarr.json"]
    assert list((store / ".incoming").iterdir()) == []
    pd.testing.assert_frame_equal(dz.read_manifest(store), before)

    manifest = dz.convert([tmp_path / "big.npy", tmp_path / "small.npy"], store, modality="CT", progress=False)
    assert manifest.attrs["converted"] == ["big"] and manifest.attrs["skipped"] == ["small"]
    np.testing.assert_array_equal(stored(store, "big"), big)
