"""Conversion that refuses to guess (issue 25): duplicate content, values that cannot be HU, DICOM rescale, one bad file, header sizes, unusable output paths.

Most cases run the per-volume functions in this process (no Ray); the two that are about the
driver (duplicates across runs, a bad file among a series' files) use the shared Ray runtime.
"""

import gzip
import os
import shutil
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import zarr

import datasets_zarr as dz
from datasets_zarr.demo import phantom_affine, write_dicom_series

SHAPE, SPACING = (12, 10, 8), (2.0, 2.0, 3.0)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def ct():
    image, _ = dz.make_phantom(2, shape=SHAPE, spacing=SPACING)
    return image, phantom_affine(SHAPE, SPACING)


def convert_here(tmp_path, path, **options):
    """Run one volume's conversion task in this process; returns (result, store)."""
    store = str(dz.store.ensure_store(tmp_path / "s.zarr"))
    job = dz.VolumeJob(Path(path).name.split(".")[0], dz.ScanRef(str(path)))
    return dz.convert_one(job, store, dz.ConversionOptions.build(**options)), store


def rayssl_attrs(store, volume_id):
    return dict(zarr.open_group(str(Path(store) / volume_id), mode="r").attrs)["rayssl"]


# ----------------------------------------------------------------------------------------------
# The same scan is never stored twice
# ----------------------------------------------------------------------------------------------


def test_same_content_is_skipped_as_a_duplicate_within_and_across_conversions(
        ray_local, tmp_path, ct, capsys):
    image, affine = ct
    scans = tmp_path / "in"
    scans.mkdir()
    nib.save(nib.Nifti1Image(image, affine), scans / "a_scan.nii.gz")
    shutil.copy(scans / "a_scan.nii.gz", scans / "b_same.nii.gz")  # a copy under another name
    store = tmp_path / "s.zarr"

    first = dz.convert([scans / "a_scan.nii.gz", scans / "b_same.nii.gz"], store, progress=False)
    assert list(first["id"]) == ["a_scan"]
    assert first.attrs["converted"] == ["a_scan"]
    [record] = first.attrs["duplicates"]
    assert record["id"] == "b_same" and record["duplicate_of"] == "a_scan"
    assert record["source"].endswith("b_same.nii.gz")
    assert "skipped 1 duplicate(s)" in capsys.readouterr().out
    assert not (store / "b_same").exists()

    # A later conversion adds another scan named a_scan: ids grow folder prefixes (in_a_scan,
    # other_a_scan), and the already stored content must not come back as in_a_scan.
    other = tmp_path / "other"
    other.mkdir()
    nib.save(nib.Nifti1Image(image + 7, affine), other / "a_scan.nii.gz")
    second = dz.convert([scans, other], store, progress=False)
    assert sorted(second["id"]) == ["a_scan", "other_a_scan"]
    assert second.attrs["converted"] == ["other_a_scan"]
    assert {d["id"]: d["duplicate_of"] for d in second.attrs["duplicates"]} == {
        "in_a_scan": "a_scan", "b_same": "a_scan"}
    out = capsys.readouterr().out
    assert "skipped 2 duplicate(s)" in out and "in_a_scan = a_scan" in out
    assert len(set(second["source_sha256"])) == len(second)


# ----------------------------------------------------------------------------------------------
# CT values that cannot be Hounsfield units
# ----------------------------------------------------------------------------------------------


def test_ct_on_values_that_cannot_be_hu_is_refused_naming_the_fix(tmp_path, ct):
    image, affine = ct
    unit = ((image - image.min()) / float(image.max() - image.min())).astype(np.float32)
    nib.save(nib.Nifti1Image(unit, affine), tmp_path / "unit.nii.gz")
    result, store = convert_here(tmp_path, tmp_path / "unit.nii.gz", modality="CT")
    assert result.status == "failed"
    assert "unit.nii.gz" in result.error and "cannot be Hounsfield units" in result.error
    assert "--modality MR" in result.error and "rescale it to Hounsfield units" in result.error
    assert not (Path(store) / "unit").exists()

    # uint16 with an implicit offset: values above 32767 would be clipped by int16.
    raw = (image.astype(np.int32) + 32768).astype(np.uint16)
    above = int(np.count_nonzero(raw > 32767))
    nib.save(nib.Nifti1Image(raw, affine), tmp_path / "offset.nii.gz")
    result, _ = convert_here(tmp_path, tmp_path / "offset.nii.gz", modality="CT")
    assert result.status == "failed"
    assert f"{above} voxel(s) lie outside [-32768, 32767]" in result.error
    assert "implicit offset" in result.error and "subtract the offset" in result.error


def test_ct_float_hu_is_stored_and_rounding_is_recorded(tmp_path, ct):
    image, affine = ct
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), tmp_path / "whole.nii.gz")
    result, store = convert_here(tmp_path, tmp_path / "whole.nii.gz", modality="CT")
    assert result.status == "converted", result.error
    np.testing.assert_array_equal(zarr.open_array(f"{store}/whole/image", mode="r")[...], image)
    assert [s["op"] for s in rayssl_attrs(store, "whole")["preprocessing"]] == ["reorient"]

    fractional = image.astype(np.float32) + 0.25
    nib.save(nib.Nifti1Image(fractional, affine), tmp_path / "frac.nii.gz")
    result, store = convert_here(tmp_path, tmp_path / "frac.nii.gz", modality="CT")
    assert result.status == "converted", result.error
    rounding = rayssl_attrs(store, "frac")["preprocessing"][0]
    assert rounding == {"op": "round_to_int16_hu", "voxels_changed": image.size,
                        "max_change": 0.25}


# ----------------------------------------------------------------------------------------------
# DICOM rescale tags
# ----------------------------------------------------------------------------------------------


def test_dicom_rescale_slope_zero_is_refused_naming_the_file(tmp_path, ct):
    image, affine = ct
    files = write_dicom_series(image, affine, tmp_path / "series")
    ds = pydicom.dcmread(files[3])
    ds.RescaleSlope = 0
    ds.save_as(files[3])
    with pytest.raises(dz.ConversionError, match="RescaleSlope is 0") as info:
        dz.read_dicom_series(tmp_path / "series")
    assert str(info.value).startswith(str(files[3]))


def test_ct_series_without_rescale_tags_is_converted_with_a_recorded_warning(tmp_path, ct):
    image, affine = ct
    files = write_dicom_series(image, affine, tmp_path / "series", rescale_intercept=0.0)
    for file in files:
        ds = pydicom.dcmread(file)
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.save_as(file)
    result, store = convert_here(tmp_path, tmp_path / "series")
    assert result.status == "converted", result.error
    [warning] = result.details["warnings"]
    assert f"{len(files)} of {len(files)} CT slice(s)" in warning
    assert "may not be Hounsfield units" in warning
    step = rayssl_attrs(store, "series")["preprocessing"][0]
    assert step["op"] == "dicom_rescale" and step["assumed"] and step["warning"] == warning


def test_dicom_rows_columns_beyond_the_pixel_data_are_refused_before_allocating(tmp_path, ct):
    """Was a MemoryError ('ran out of memory ... give the tasks more memory') for 26.8 GiB."""
    image, affine = ct
    files = write_dicom_series(image, affine, tmp_path / "series")
    for file in files:
        ds = pydicom.dcmread(file)
        ds.Rows = ds.Columns = 30000
        ds.save_as(file)
    tracemalloc.start()
    try:
        with pytest.raises(dz.ConversionError, match=r"Rows x Columns = 30000 x 30000 \(16-bit\) "
                                                     r"needs 1.8 GB of pixel data") as info:
            dz.read_dicom_series(tmp_path / "series")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(info.value).startswith(str(files[0])) and "Re-export" in str(info.value)
    assert peak < 50e6


# ----------------------------------------------------------------------------------------------
# One unreadable file fails alone
# ----------------------------------------------------------------------------------------------


def test_a_non_dicom_dcm_file_fails_alone_and_the_series_converts(ray_local, tmp_path, ct):
    image, affine = ct
    series = tmp_path / "series"
    files = write_dicom_series(image, affine, series)
    (series / "notes.dcm").write_text("exported by a viewer, not DICOM\n")

    jobs, failures = dz.plan_jobs([str(series)])
    assert [job.volume_id for job in jobs] == ["series"]
    [failure] = failures
    assert failure.source == str(series / "notes.dcm") and "cannot read the file" in failure.error

    store = tmp_path / "s.zarr"
    with pytest.raises(dz.ConversionFailed) as info:  # default on_error='raise': after the rest
        dz.convert([series], store, progress=False)
    assert [f["source"] for f in info.value.failures] == [str(series / "notes.dcm")]
    manifest = info.value.manifest
    assert list(manifest["id"]) == ["series"]
    assert rayssl_attrs(store, "series")["shape"] == list(SHAPE)
    assert len(files) == SHAPE[2]


# ----------------------------------------------------------------------------------------------
# Header-claimed sizes are checked before allocation
# ----------------------------------------------------------------------------------------------


def huge_header() -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 1024))
    header.set_data_dtype(np.int16)
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4  # 348-byte header, 4-byte extension flag


@pytest.mark.parametrize("name", ["huge.nii.gz", "huge.nii"])
def test_a_header_claiming_more_than_the_file_holds_is_refused_before_allocating(tmp_path, name):
    path = tmp_path / name
    data = huge_header() + b"\0" * 64
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    if name.endswith(".gz"):
        assert path.stat().st_size < 200  # a few dozen bytes claiming 2.1 GB
    tracemalloc.start()
    try:
        with pytest.raises(dz.ConversionError) as info:
            dz.read_nifti(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert message.startswith(str(path))
    assert "1024 x 1024 x 1024 int16 image (2.1 GB)" in message and "truncated" in message
    assert peak < 50e6, f"{peak / 1e6:.0f} MB allocated before the refusal"


def test_a_valid_gzip_nifti_of_highly_compressible_data_still_reads(tmp_path):
    zeros = np.zeros((128, 128, 128), np.int16)
    zeros[0, 0, 0] = -1000
    nib.save(nib.Nifti1Image(zeros, np.eye(4)), tmp_path / "zeros.nii")
    # gzip -9 of zeros comes within a few percent of deflate's ~1032:1 limit.
    packed = gzip.compress((tmp_path / "zeros.nii").read_bytes(), compresslevel=9)
    (tmp_path / "zeros.nii.gz").write_bytes(packed)
    assert len(packed) * 900 < zeros.nbytes
    np.testing.assert_array_equal(dz.read_nifti(tmp_path / "zeros.nii.gz").array, zeros)


METAIMAGE_HEADER = ("ObjectType = Image\nNDims = 3\nElementSpacing = 1 1 1\n"
                    "DimSize = 1024 1024 1024\nElementType = MET_SHORT\n")


@pytest.mark.parametrize("name", ["big.mhd", "big.mha", "big.nrrd"])
def test_metaimage_and_nrrd_headers_claiming_more_than_the_data_are_refused(tmp_path, name):
    """Compressed .mha took 4.3 GB and 2 minutes in SimpleITK before failing."""
    path = tmp_path / name
    junk = bytes(range(92))
    if name == "big.mhd":
        (tmp_path / "tiny.raw").write_bytes(junk)
        path.write_text(METAIMAGE_HEADER + "ElementDataFile = tiny.raw\n")
    elif name == "big.mha":
        path.write_bytes((METAIMAGE_HEADER + "CompressedData = True\nElementDataFile = LOCAL\n"
                          ).encode() + junk)
    else:
        path.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 1024 1024 1024\n"
                         b"encoding: gzip\n\n" + junk)
    started = time.perf_counter()
    with pytest.raises(dz.ConversionError, match=r"claims a 1024 x 1024 x 1024 image of 2-byte "
                                                 r"values \(2.1 GB\)") as info:
        dz.read_sitk(path)
    assert str(info.value).startswith(str(path)) and "truncated" in str(info.value)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("name,compress", [("ok.mhd", False), ("ok.mha", True), ("ok.nrrd", True),
                                           ("raw.nrrd", False)])
def test_valid_metaimage_and_nrrd_files_still_read(tmp_path, ct, name, compress):
    import SimpleITK as sitk

    image, _ = ct
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(image.T)), str(tmp_path / name),
                    compress)
    np.testing.assert_array_equal(dz.read_sitk(tmp_path / name).array, image)


# ----------------------------------------------------------------------------------------------
# Output paths that cannot become a store
# ----------------------------------------------------------------------------------------------


def test_out_that_is_an_existing_file_is_refused_before_any_work(tmp_path, ct, capsys):
    from rayssl.cli import main

    image, affine = ct
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "scan.nii.gz")
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    started = time.perf_counter()
    assert main(["convert", str(tmp_path / "scan.nii.gz"), "--out", str(taken)]) == 2
    assert time.perf_counter() - started < 5  # no Ray start, no input read
    err = capsys.readouterr().err
    assert f"{taken}: the output path is an existing file" in err and "notes.zarr" in err
    assert taken.read_text() == "mine\n"


def test_read_only_store_parent_is_refused_before_any_work(tmp_path, ct):
    """In a process without the permission-override capabilities (root writes anywhere), so the
    permission check is the kernel's."""
    image, affine = ct
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "scan.nii.gz")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a folder read-only")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                  "--inh-caps=-dac_override,-dac_read_search"]
    out = locked / "new" / "s.zarr"
    script = textwrap.dedent(f"""
        import sys
        from rayssl.cli import main
        sys.exit(main(["convert", {str(tmp_path / 'scan.nii.gz')!r}, "--out", {str(out)!r}]))
    """)
    try:
        done = subprocess.run([*prefix, sys.executable, "-c", script], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert f"{out}: cannot write the store: its parent folder {locked} is not writable" \
            in done.stderr
        assert "Traceback" not in done.stderr and "Ray instance" not in done.stderr
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
