"""The bad-input matrix (docs/errors.md): each case is a clear error naming the file, volume or chunk, and nothing is lost.

Conversion cases are ConversionErrors naming the file and the fix, and a failed volume leaves nothing
visible in the store; training-time cases (corrupt chunk, bad config, missing or empty store) name
the field, path or chunk.
"""

import gzip
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

import datasets_zarr as dz
from datasets_zarr.demo import phantom_affine, write_dicom_series

SHAPE, SPACING = (12, 10, 8), (2.0, 2.0, 3.0)


@pytest.fixture()
def ct(tmp_path):
    """A small valid CT NIfTI and its (image, affine)."""
    image, _ = dz.make_phantom(2, shape=SHAPE, spacing=SPACING)
    affine = phantom_affine(SHAPE, SPACING)
    path = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), path)
    return path, image, affine


def dicom_series(folder, image, affine):
    write_dicom_series(image, affine, folder, plane="axial")
    return sorted(Path(folder).iterdir())


def visible_volumes(store):
    return sorted(p.name for p in Path(store).iterdir()
                  if p.is_dir() and not p.name.startswith("."))


def test_many_bad_volumes_fail_alone_and_leave_nothing(ray_local, tmp_path, ct):
    good, image, affine = ct
    bad = tmp_path / "bad"
    bad.mkdir()
    # truncated gzip stream
    data = (tmp_path / "good.nii.gz").read_bytes()
    (bad / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    # 4D
    nib.save(nib.Nifti1Image(np.zeros(SHAPE + (3,), np.int16), affine), bad / "four_d.nii.gz")
    # NaN voxels
    with_nan = image.astype(np.float32)
    with_nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(with_nan, affine), bad / "nan.nii.gz")
    # +Inf and -Inf voxels
    with_inf = image.astype(np.float32)
    with_inf[1, 2, 3], with_inf[4, 5, 6] = np.inf, -np.inf
    nib.save(nib.Nifti1Image(with_inf, affine), bad / "inf.nii.gz")
    # an axis of length 0
    np.save(bad / "zero_axis.npy", np.zeros((SHAPE[0], 0, SHAPE[2]), np.int16))
    # zero voxel size along y in a qform-only header (nibabel would silently assume 1 mm)
    qform_only = nib.Nifti1Image(image, affine)
    qform_only.set_sform(None, code=0)
    qform_only.set_qform(affine, code=1)
    nib.save(qform_only, bad / "zero_spacing.nii")
    with open(bad / "zero_spacing.nii", "r+b") as handle:
        handle.seek(76 + 4 * 2)  # pixdim[2], little-endian float32 (nibabel writes native LE)
        handle.write(struct.pack("<f", 0.0))
    # negative spacing in a MetaImage header
    (bad / "negative.raw").write_bytes(np.zeros(SHAPE, np.int16).tobytes())
    (bad / "negative.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nElementSpacing = 2 -2 3\n"
        f"DimSize = {SHAPE[0]} {SHAPE[1]} {SHAPE[2]}\nElementType = MET_SHORT\n"
        "ElementDataFile = negative.raw\n")
    # label on another grid
    # Images differ from `good` (and each other): a copy of good would be skipped as a duplicate.
    nib.save(nib.Nifti1Image(image + 1, affine), bad / "mismatch.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.uint8), affine), bad / "mismatch_seg.nii.gz")
    # label with fractional values
    nib.save(nib.Nifti1Image(image + 2, affine), bad / "fraction.nii.gz")
    nib.save(nib.Nifti1Image(np.full(SHAPE, 0.5, np.float32), affine), bad / "fraction_seg.nii")
    # DICOM series with a missing slice, and one with a duplicated slice
    gap = dicom_series(tmp_path / "gap_series", image, affine)
    gap[3].unlink()
    dup = dicom_series(tmp_path / "dup_series", image, affine)
    shutil.copy(dup[2], tmp_path / "dup_series" / "copy_of_slice.dcm")
    # DICOM series whose slices disagree on the in-plane spacing
    spacing_files = dicom_series(tmp_path / "spacing_series", image, affine)
    ds = pydicom.dcmread(spacing_files[4])
    ds.PixelSpacing = [2.5, 2.5]
    ds.save_as(spacing_files[4])
    # DICOM slice without geometry
    nogeo = dicom_series(tmp_path / "nogeo_series", image, affine)
    ds = pydicom.dcmread(nogeo[1])
    del ds.ImagePositionPatient
    ds.save_as(nogeo[1])

    inputs = [good, bad / "truncated.nii.gz", bad / "four_d.nii.gz", bad / "nan.nii.gz",
              bad / "zero_spacing.nii", bad / "negative.mhd", bad / "mismatch.nii.gz", bad / "fraction.nii.gz",
              tmp_path / "gap_series", tmp_path / "dup_series", tmp_path / "nogeo_series",
              tmp_path / "does_not_exist.nii.gz", bad / "inf.nii.gz", bad / "zero_axis.npy",
              tmp_path / "spacing_series"]
    labels = [None] * 6 + [bad / "mismatch_seg.nii.gz", bad / "fraction_seg.nii"] + [None] * 7
    store = tmp_path / "s.zarr"
    with pytest.warns(UserWarning, match="14 volume"):
        manifest = dz.convert(inputs, store, labels=labels, on_error="skip", progress=False)
    assert list(manifest["id"]) == ["good"]
    assert visible_volumes(store) == ["good"]
    assert list((store / ".incoming").iterdir()) == []
    errors = {f["id"]: f["error"] for f in manifest.attrs["failures"]}
    expected = {
        "truncated": ["truncated.nii.gz", "truncated, corrupt", "re-download"],
        "four_d": ["four_d.nii.gz", "4D", "channel="],
        "nan": ["nan.nii.gz", "1 voxel(s) are NaN or Inf", "nan_to_num"],
        "zero_spacing": ["zero_spacing.nii", "zero, negative", "1 mm"],
        "negative": ["negative.mhd", "ElementSpacing '2 -2 3'"],
        "mismatch": ["mismatch_seg.nii.gz", "(6, 5, 4)", str(SHAPE), "paired"],
        "fraction": ["fraction_seg.nii", "non-integer"],
        "gap_series": ["gap_series", "slice gaps vary", "missing"],
        "dup_series": ["dup_series", "same position", "duplicate"],
        "nogeo_series": ["ImagePositionPatient is missing"],
        "does_not_exist": ["does_not_exist.nii.gz", "no such file"],
        "inf": ["inf.nii.gz", "2 voxel(s) are NaN or Inf", "nan_to_num"],
        "zero_axis": ["zero_axis.npy", "(12, 0, 8)", "axis of length 0"],
        "spacing_series": ["spacing_series", "different image size or PixelSpacing", "one folder per series"],
    }
    assert set(errors) == set(expected)
    for volume_id, fragments in expected.items():
        for fragment in fragments:
            assert fragment in errors[volume_id], (volume_id, errors[volume_id])


def test_default_policy_raises_after_converting_the_rest(ray_local, tmp_path, ct):
    good, image, affine = ct
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(gzip.compress(b"this is not a nifti file" * 20))
    store = tmp_path / "s.zarr"
    with pytest.raises(dz.ConversionFailed) as caught:
        dz.convert([good, broken], store, progress=False)
    error = caught.value
    assert isinstance(error, dz.ConversionError) and isinstance(error, ValueError)
    assert [f["id"] for f in error.failures] == ["broken"]
    assert "broken.nii.gz" in str(error) and "on_error='skip'" in str(error)
    assert list(error.manifest["id"]) == ["good"]
    assert list(dz.read_manifest(store)["id"]) == ["good"]
    assert visible_volumes(store) == ["good"]


def test_input_problems_raise_before_any_work(tmp_path, ct):
    good, _, _ = ct
    store = tmp_path / "never.zarr"
    with pytest.raises(dz.ConversionError, match="missing.nii.gz: no such file"):
        dz.convert([good, tmp_path / "missing.nii.gz"], store)
    with pytest.raises(dz.ConversionError, match="labels has 2 entries but inputs has 1"):
        dz.convert([good], store, labels=[good, good])
    with pytest.raises(dz.ConversionError, match="npy_spacing"):
        dz.convert([good], store, npy_spacing=(1.0, -1.0, 1.0))
    with pytest.raises(dz.ConversionError, match="spacing"):
        dz.convert([good], store, spacing=(0.0, 1.0, 1.0))
    with pytest.raises(dz.ConversionError, match="window"):
        dz.convert([good], store, window=(250, -175))
    with pytest.raises(dz.ConversionError, match="multiple of chunks"):
        dz.convert([good], store, chunks=64, shards=96)
    with pytest.raises(dz.ConversionError, match="on_error"):
        dz.convert([good], store, on_error="ignore")
    twin = tmp_path / "twin.nii.gz"
    shutil.copy(good, twin)
    with pytest.raises(dz.ConversionError, match="ids must be unique"):
        dz.convert([good, twin], store, ids=["a", "a"])
    with pytest.raises(dz.ConversionError, match="more than once"):
        dz.convert([good, tmp_path], store)  # the folder holds good.nii.gz again
    assert not store.exists()

    not_a_store = tmp_path / "occupied"
    not_a_store.mkdir()
    (not_a_store / "notes.txt").write_text("mine")
    with pytest.raises(dz.ConversionError, match="not a rayssl store"):
        dz.convert([good], not_a_store)


def test_reader_errors_are_specific(tmp_path, ct):
    _, image, affine = ct
    with pytest.raises(dz.ConversionError, match="channel=5 is out of range"):
        nib.save(nib.Nifti1Image(np.zeros(SHAPE + (2,), np.int16), affine), tmp_path / "4d.nii")
        dz.read_nifti(tmp_path / "4d.nii", channel=5)
    volume = dz.read_nifti(tmp_path / "4d.nii", channel=1)
    assert volume.array.shape == SHAPE

    tilted = tmp_path / "tilted"
    files = dicom_series(tilted, image, affine)
    for index, file in enumerate(files):  # shift each slice sideways: a sheared stack
        ds = pydicom.dcmread(file)
        position = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [position[0], position[1] + 0.5 * index, position[2]]
        ds.save_as(file)
    with pytest.raises(dz.ConversionError, match="gantry tilt"):
        dz.read_dicom_series(tilted)

    mixed = tmp_path / "mixed"
    files = dicom_series(mixed, image, affine)
    ds = pydicom.dcmread(files[4])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(files[4])
    with pytest.raises(dz.ConversionError, match="different ImageOrientationPatient"):
        dz.read_dicom_series(mixed)

    zero = tmp_path / "zero_pixel_spacing"
    files = dicom_series(zero, image, affine)
    for file in files:
        ds = pydicom.dcmread(file)
        ds.PixelSpacing = [0.0, 2.0]
        ds.save_as(file)
    with pytest.raises(dz.ConversionError, match=r"PixelSpacing \[0.0, 2.0\] is not positive"):
        dz.read_dicom_series(zero)

    with pytest.raises(dz.ConversionError, match="unknown file type"):
        (tmp_path / "scan.xyz").write_text("?")
        dz.read_scan(tmp_path / "scan.xyz")

    with pytest.raises(dz.ConversionError, match="volume id"):
        dz.write_volume(tmp_path / "s.zarr", "bad/id", image, affine, modality="CT")
    with pytest.raises(dz.ConversionError, match="orientation is LPS"):
        flipped = affine @ np.diag([-1.0, -1.0, 1.0, 1.0])
        dz.write_volume(tmp_path / "s.zarr", "lps", image, flipped, modality="CT")


def test_id_taken_by_another_source(ray_local, tmp_path, ct):
    good, image, affine = ct
    other = tmp_path / "other" / "good.nii.gz"
    other.parent.mkdir()
    nib.save(nib.Nifti1Image(image + 5, affine), other)
    store = tmp_path / "s.zarr"
    dz.convert([good], store, progress=False)
    with pytest.raises(dz.ConversionFailed, match="already used in the store"):
        dz.convert([other], store, progress=False)
    manifest = dz.convert([other], store, overwrite=True, progress=False)
    assert list(manifest["source"]) == [str(other)]


def test_two_series_in_one_folder_are_split_or_named(ray_local, tmp_path, ct):
    """convert() makes one volume per series; reading the folder as one series names both series."""
    _, image, affine = ct
    folder = tmp_path / "patient"
    write_dicom_series(image, affine, folder, series_uid="1.2.3.4.100", series_number=1, file_prefix="A")
    write_dicom_series(image[:, :, :4], affine, folder, series_uid="1.2.3.4.200", series_number=2,
                       file_prefix="B")
    with pytest.raises(dz.ConversionError) as info:
        dz.read_dicom_series(folder)
    message = str(info.value)
    assert str(folder) in message and "holds 2 DICOM series" in message and "series_uid=" in message
    assert "1.2.3.4.100" in message and "1.2.3.4.200" in message
    manifest = dz.convert([folder], tmp_path / "s.zarr", progress=False)
    shapes = {row.id: tuple(row.shape) for row in manifest.itertuples()}
    assert shapes == {"patient_s1": SHAPE, "patient_s2": SHAPE[:2] + (4,)}


# ---- training time: config, store and chunk problems ----------------------------------------


def _mlsscl(store, out, *extra):
    from rayssl.config import resolve_config

    from helpers import MLSSCL_TINY

    return resolve_config(method="mlsscl", profile="cpu",
                          overrides=[f"data.store={store}", f"out={out}", *MLSSCL_TINY, *extra])


def test_unknown_config_field_is_named_before_ray_starts(tmp_path):
    from rayssl.config import resolve_config

    with pytest.raises(ValueError) as info:
        resolve_config(method="mlsscl", profile="cpu", overrides=["train.stpes=3"])
    assert "train.stpes: unknown field (got 3); valid fields here: [" in str(info.value)
    assert "'steps'" in str(info.value)
    with pytest.raises(ValueError) as info:
        resolve_config(method="mlsscl", profile="cpu", overrides=["no_such_field=1"])
    assert "--set no_such_field: unknown field" in str(info.value)
    run_yaml = tmp_path / "run.yaml"  # a config file with a typo in a section and in a method field
    run_yaml.write_text("method: mlsscl\ndata:\n  on_eror: skip\nmethod_config:\n  clip_lenght: 4\n")
    with pytest.raises(ValueError) as info:
        resolve_config(profile="cpu", file=str(run_yaml))
    assert "data.on_eror: unknown field ('skip'); valid fields here: [" in str(info.value).replace("(got ", "(")
    assert "'on_error'" in str(info.value)
    run_yaml.write_text("method: mlsscl\nmethod_config:\n  clip_lenght: 4\n")
    with pytest.raises(ValueError) as info:
        resolve_config(profile="cpu", file=str(run_yaml))
    assert "mlsscl.clip_lenght: unknown field (got 4); valid fields here: [" in str(info.value)
    assert "'clip_length'" in str(info.value)


def test_missing_or_empty_store_is_named(ray_local, tmp_path):
    from rayssl.train.trainer import pretrain

    runs = tmp_path / "runs"
    nowhere = tmp_path / "nowhere.zarr"
    with pytest.raises(FileNotFoundError) as info:
        pretrain(_mlsscl(nowhere, runs, "name=a", "train.steps=1"))
    assert f"no manifest at {nowhere}/manifest.parquet" in str(info.value)
    assert "is not a rayssl store" in str(info.value) and "rayssl convert" in str(info.value)

    # A store every scan of whose conversion failed: a manifest with no rows.
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(gzip.compress(b"this is not a nifti file" * 20))
    empty = tmp_path / "empty.zarr"
    with pytest.warns(UserWarning, match="broken.nii.gz"):
        manifest = dz.convert([broken], empty, on_error="skip", progress=False)
    assert len(manifest) == 0
    with pytest.raises(ValueError) as info:
        pretrain(_mlsscl(empty, runs, "name=b", "train.steps=1"))
    assert f"store {empty} holds no volumes (its manifest is empty)" in str(info.value)
    assert "rayssl convert" in str(info.value)
    assert not runs.exists() or not list(runs.iterdir())  # no run folder was started


@pytest.fixture(scope="module")
def store_with_corrupt_volumes(tmp_path_factory):
    """3 small CT phantoms (32^3 voxels, chunks 16^3), every image chunk of 2 of them corrupt."""
    from datasets_zarr import demo_store

    from helpers import corrupt_volume

    store = demo_store(root=tmp_path_factory.mktemp("corrupt"), n=3, shape=(32, 32, 32), spacing=(6.0, 6.0, 6.0),
                       chunks=16)
    bad = ["phantom-000", "phantom-002"]
    for group in bad:
        corrupt_volume(store, group)
    return str(store), bad


@pytest.mark.slow  # a short training run
def test_corrupt_chunk_at_training_time_is_named(ray_local, store_with_corrupt_volumes, tmp_path):
    import json
    import os

    from rayssl.train.trainer import DataReadError, pretrain

    store, bad = store_with_corrupt_volumes
    with pytest.raises(DataReadError) as info:
        pretrain(_mlsscl(store, tmp_path / "runs", "name=raise", "train.steps=2", "train.checkpoint_every=2",
                         "data.on_error=raise", "train.max_failures=0"))
    message = str(info.value)
    named = [v for v in bad if f"volume '{v}' in store {store}: chunk {v}/image/c/" in message]
    assert named, message
    assert "is corrupt" in message and "re-convert this volume" in message, message
    assert "--set data.on_error=skip" in message, message
    summary = json.load(open(os.path.join(tmp_path, "runs", "raise", "summary.json")))
    assert summary["status"] == "failed", summary

    # on_error=skip over corrupt volumes: tests/test_reliability.py (3 of 10 unreadable, more than one epoch).
