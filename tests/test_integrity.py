"""Store integrity (docs/errors.md, "Store integrity"): a lost chunk, an edited zarr.json or a truncated shard is an
error naming the volume and chunk, never silent zeros, and `rayssl verify [--fix]` finds (and repairs) them.

No Ray: stores are converted with `convert_one` (the task body of `rayssl convert`) in this process.
"""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import datasets_zarr as dz
from datasets_zarr.convert import ConversionOptions, VolumeJob, convert_one
from datasets_zarr.demo import phantom_affine
from datasets_zarr.io import ScanRef
from datasets_zarr.verify import verify_store
from rayssl.cli import main
from rayssl.data.read import CHUNK_RECORD_KEY, ChunkReadError, StoreReader

SHAPE, SPACING = (32, 32, 24), (6.0, 6.0, 8.0)  # chunks 16^3: a 2 x 2 x 2 grid


def _source(folder: Path, name: str, image: np.ndarray, label: np.ndarray | None = None) -> tuple[str, str | None]:
    affine = phantom_affine(SHAPE, SPACING)
    folder.mkdir(parents=True, exist_ok=True)
    image_path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), image_path)
    label_path = None
    if label is not None:
        label_path = folder / f"{name}_seg.nii.gz"
        nib.save(nib.Nifti1Image(label, affine), label_path)
    return str(image_path), None if label_path is None else str(label_path)


def _store(tmp_path: Path, shards: int | None = None) -> tuple[str, dict[str, np.ndarray]]:
    """A store of two CT volumes converted from NIfTI files: `ct` (phantom + label) and `water`, whose first
    16^3 chunk is all 0 HU, the fill value, so zarr leaves that chunk unwritten."""
    image, label = dz.make_phantom(3, shape=SHAPE, spacing=SPACING)
    water = dz.make_phantom(4, shape=SHAPE, spacing=SPACING)[0]
    water[:16, :16, :16] = 0
    ct_path, ct_label = _source(tmp_path / "scans", "ct", image, label)
    water_path, _ = _source(tmp_path / "scans", "water", water)
    store = str(tmp_path / "store.zarr")
    dz.store.ensure_store(store)
    options = ConversionOptions.build(modality="CT", chunks=16, shards=shards)
    for job in (VolumeJob("ct", ScanRef(ct_path), label=ScanRef(ct_label)), VolumeJob("water", ScanRef(water_path))):
        result = convert_one(job, store, options)
        assert result.status == "converted", result.error
    dz.write_manifest(store, splits={"ct": "train", "water": "train"})
    return store, {"ct": image, "water": water}


def test_record_lists_written_chunks_and_an_all_fill_chunk_reads_as_zeros(tmp_path):
    store, images = _store(tmp_path)
    record = json.loads(Path(store, "water", "image", "zarr.json").read_text())["attributes"]["rayssl"]
    assert record[CHUNK_RECORD_KEY]["grid"] == [2, 2, 2] and record[CHUNK_RECORD_KEY]["count"] == 7
    assert not Path(store, "water", "image", "c", "0", "0", "0").exists()  # zarr skipped the all-fill chunk
    reader = StoreReader(store)
    assert not reader.array_info("water").written[0, 0, 0] and reader.array_info("water").written.sum() == 7
    whole = reader.read("water", (0, 0, 0), SHAPE, dtype=None)
    np.testing.assert_array_equal(whole, images["water"])
    assert (whole[:16, :16, :16] == 0).all()
    np.testing.assert_array_equal(reader.read("ct", (0, 0, 0), SHAPE, dtype=None), images["ct"])


@pytest.mark.parametrize("shards", [None, 32])
def test_deleted_chunk_is_an_error_naming_volume_and_chunk(tmp_path, shards):
    store, _ = _store(tmp_path, shards=shards)
    lost = Path(store, "ct", "image", "c", "1", "0", "1") if shards is None else Path(store, "ct", "image", "c", "0",
                                                                                      "0", "0")
    lost.unlink()
    reader = StoreReader(store)
    with pytest.raises(ChunkReadError) as info:
        reader.read("ct", (20, 4, 18), (8, 8, 4))
    message = str(info.value)
    where = "ct/image/c/1/0/1 is missing" if shards is None else "ct/image/c/0/0/0[inner chunk 1,0,1] is missing"
    assert f"volume 'ct' in store {store}: chunk {where}" in message, message
    assert "chunk record says it was written" in message and "--set data.on_error=skip" in message
    if shards is None:  # boxes that avoid the lost chunk still read
        assert reader.read("ct", (0, 0, 0), (8, 8, 8)).shape == (8, 8, 8)


def test_deleted_chunk_is_skipped_under_on_error_skip(tmp_path):
    """The data actors' on_error policy (rayssl.data.pipeline.ViewBuilder, here in-process): raise names the
    chunk; skip marks the volume bad and builds every sample from the other one."""
    from rayssl.data.pipeline import ViewBuilder
    from rayssl.data.types import ReadRequest
    from rayssl.data.volumes import load_volumes

    store, _ = _store(tmp_path)
    Path(store, "ct", "image", "c", "0", "1", "0").unlink()
    volumes = load_volumes(store, "all")
    bad = next(v.index for v in volumes if v.id == "ct")

    def plan(volumes, volume, rng):
        return [ReadRequest(volume, (0, 0, 0), SHAPE)]

    def views(crops, requests, rng):
        return {"volume": np.int64(requests[0].volume), "mean": np.float64(crops[0].mean())}

    raising = ViewBuilder(volumes, plan, views, on_error="raise")
    with pytest.raises(ChunkReadError, match=r"volume 'ct' .*chunk ct/image/c/0/1/0 is missing"):
        for sample in range(len(volumes)):
            raising.build_sample(sample)
    skipping = ViewBuilder(volumes, plan, views, on_error="skip")
    built = [skipping.build_sample(sample) for sample in range(2 * len(volumes))]
    assert skipping.bad_volumes == {bad}
    assert all(int(b["volume"]) != bad for b in built)


def test_edited_zarr_json_dtype_is_a_clear_error(tmp_path, capsys):
    store, _ = _store(tmp_path)
    meta_path = Path(store, "ct", "image", "zarr.json")
    meta = json.loads(meta_path.read_text())
    assert meta["data_type"] == "int16"
    meta["data_type"] = "uint16"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ChunkReadError) as info:
        StoreReader(store).read("ct", (0, 0, 0), (4, 4, 4))
    message = str(info.value)
    assert (f"volume 'ct' in store {store}: image/zarr.json says uint16, the manifest says int16: the store was "
            f"edited or corrupted; re-convert the volume") in message, message
    assert main(["verify", store, "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "BAD ct: image/zarr.json says uint16, the manifest says int16" in out, out
    assert "1 volume(s) ok, 1 bad" in out, out


def test_truncated_shard_is_reported_by_verify(tmp_path):
    store, _ = _store(tmp_path, shards=32)
    shard = Path(store, "ct", "label", "c", "0", "0", "0")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    report = verify_store(store, progress=False)
    assert [v.id for v in report.bad] == ["ct"]
    problems = report.bad[0].problems
    assert problems == ["shard ct/label/c/0/0/0 is truncated or corrupt: the shard index fails its crc32c check"], \
        problems
    assert "BAD ct: shard ct/label/c/0/0/0 is truncated or corrupt" in report.summary()


def test_verify_passes_on_a_good_store_and_the_demo_store(tmp_path, demo_store_path, capsys):
    store, _ = _store(tmp_path)
    assert main(["verify", store]) == 0
    out = capsys.readouterr().out
    assert f"verify {store}: 2 volume(s) ok, 0 bad (24 chunks checked)" in out, out  # image 8 + label 8 + water 8
    report = verify_store(demo_store_path, progress=False)
    assert report.ok and len(report.volumes) == 4 and not any(v.notes for v in report.volumes), report.summary()


def test_fix_restores_a_deleted_chunk_from_its_source(tmp_path, capsys):
    store, images = _store(tmp_path)
    lost = Path(store, "ct", "image", "c", "1", "1", "0")
    lost.unlink()
    Path(store, "ct", "label", "c", "0", "0", "1").write_bytes(b"not a blosc frame")
    assert main(["verify", store]) == 1
    out = capsys.readouterr().out
    assert "BAD ct: chunk ct/image/c/1/1/0 is missing" in out and "BAD ct: chunk ct/label/c/0/0/1 is corrupt" in out
    manifest_before = dz.read_manifest(store)
    assert main(["verify", store, "--fix"]) == 0
    out = capsys.readouterr().out
    assert "FIXED ct: re-converted from" in out and "2 volume(s) ok, 0 bad" in out, out
    assert lost.exists()
    np.testing.assert_array_equal(StoreReader(store).read("ct", (0, 0, 0), SHAPE, dtype=None), images["ct"])
    assert dz.read_manifest(store).drop(columns=["shape", "spacing", "bbox"]).equals(
        manifest_before.drop(columns=["shape", "spacing", "bbox"]))
    # A source that changed since conversion is not re-converted under the old id.
    lost.unlink()
    source = json.loads(Path(store, "ct", "zarr.json").read_text())["attributes"]["rayssl"]["source"]
    nib.save(nib.Nifti1Image(images["ct"] + 1, phantom_affine(SHAPE, SPACING)), source)
    assert main(["verify", store, "--fix"]) == 1
    out = capsys.readouterr().out
    assert f"NOT FIXED ct: its image source {source} has changed since it was converted" in out, out
    assert not lost.exists()


def test_store_without_a_chunk_record_keeps_the_zarr_rule(tmp_path):
    """Stores written before the chunk record: a missing chunk reads as fill value (undetectable), and verify
    says so in a note without failing."""
    store, _ = _store(tmp_path)
    meta_path = Path(store, "ct", "image", "zarr.json")
    meta = json.loads(meta_path.read_text())
    del meta["attributes"]["rayssl"][CHUNK_RECORD_KEY]
    meta_path.write_text(json.dumps(meta))
    Path(store, "ct", "image", "c", "0", "0", "0").unlink()
    assert (StoreReader(store).read("ct", (0, 0, 0), (4, 4, 4), dtype=None) == 0).all()
    report = verify_store(store, progress=False)
    assert report.ok and "1 volume(s) have arrays without a chunk record (ct)" in report.summary()
