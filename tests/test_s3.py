"""Stores on a real S3-compatible server (moto's standalone server + s3fs): convert to s3://, read sharded crops with ranged requests, pretrain and probe from the bucket, and faults named by volume and chunk."""

from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import MotoServer


@pytest.fixture(scope="module")
def s3(ray_local):
    """A moto S3 server for this module, with the AWS_* environment pointing at it (restored after).

    Ray's workers were started before these variables existed: rayssl forwards them (runtime_env),
    which is what these tests check too.
    """
    import fsspec

    server = MotoServer().start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    fsspec.AbstractFileSystem.clear_instance_cache()
    fs = fsspec.filesystem("s3")
    fs.mkdir("rayssl-test")
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    fsspec.AbstractFileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="module")
def s3_store(s3, tmp_path_factory):
    """Three CT phantoms (64x64x48, one with a label map) converted straight into s3://rayssl-test/ct.zarr."""
    import nibabel as nib

    from datasets_zarr import convert
    from datasets_zarr.demo import make_phantom

    folder = tmp_path_factory.mktemp("scans")
    labels = []
    for i in range(3):
        image, label = make_phantom(i, (64, 64, 48), (6.0, 6.0, 20.0 / 3.0))
        affine = np.diag([6.0, 6.0, 20.0 / 3.0, 1.0])
        nib.save(nib.Nifti1Image(image.astype(np.int16), affine), folder / f"ct{i}.nii.gz")
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), folder / f"ct{i}_seg.nii.gz")
        labels.append(str(folder / f"ct{i}_seg.nii.gz"))
    inputs = [str(folder / f"ct{i}.nii.gz") for i in range(3)]
    convert(inputs, "s3://rayssl-test/ct.zarr", labels=labels, chunks=16, progress=False)
    return "s3://rayssl-test/ct.zarr"


def test_convert_writes_a_sharded_store_into_the_bucket(s3, s3_store, tmp_path):
    import fsspec

    from datasets_zarr.manifest import read_manifest
    from rayssl.data.read import StoreReader

    fs = fsspec.filesystem("s3")
    assert not os.path.exists("s3:"), "convert must not write a local folder named s3:"
    manifest = read_manifest(s3_store)
    assert sorted(manifest["id"]) == ["ct0", "ct1", "ct2"] and set(manifest["store"]) == {s3_store}
    # Sharded by default on object stores: 4x the chunk edge, so each 64x64x48 volume is one shard.
    assert fs.ls("rayssl-test/ct.zarr/ct0/image/c/0/0") == ["rayssl-test/ct.zarr/ct0/image/c/0/0/0"]
    reader = StoreReader(s3_store)
    info = reader.array_info("ct0")
    assert info.fast and info.shards == (64, 64, 64) and info.chunks == (16, 16, 16)
    # Crops from the bucket equal the arrays zarr itself reads from it.
    import zarr

    image = zarr.open_array(s3_store + "/ct1/image", mode="r")[:]
    for start in ((0, 0, 0), (10, 20, 5), (40, 40, 30)):
        np.testing.assert_array_equal(reader.read("ct1", start, (24, 24, 18), dtype=None),
                                      image[start[0]:start[0] + 24, start[1]:start[1] + 24, start[2]:start[2] + 18])
    # Index fetched once per shard, then one coalesced ranged request per crop.
    before = reader.stats.requests
    reader.read("ct1", (16, 16, 16), (16, 16, 16))
    assert reader.stats.requests - before == 1
    # Converting again skips every volume (same sources, same settings).
    from datasets_zarr import convert

    inputs = [m for m in manifest["source"]]
    again = convert(inputs, s3_store, progress=False,
                    labels=[str(p).replace(".nii.gz", "_seg.nii.gz") for p in inputs], chunks=16)
    assert sorted(again.attrs["skipped"]) == ["ct0", "ct1", "ct2"]


# A tiny VoCo (as in test_train.py): 2x2 base crops of a 64x64x32 region, 32^3 inputs.
TINY = ["n_x=2", "n_y=2", "region_size=[64,64,32]", "input_size=32", "num_random_crops=2",
        "unet_features=[4,4,8,8,16,4]", "proj_hidden_dim=32", "proj_dim=32",
        "train.batch_size=1", "data.split=all", "data.actors_max=1", "train.report_every=1"]


@pytest.mark.slow
def test_pretrain_two_steps_and_probe_from_the_bucket(s3, s3_store, tmp_path, capsys):
    """`rayssl pretrain --data s3://...` then `rayssl probe RUN --data s3://...`, end to end."""
    import json

    from rayssl.cli import main

    out = main(["pretrain", "--method", "voco", "--data", s3_store, "--steps", "2", "--out", str(tmp_path),
                "--name", "s3run", *[a for o in TINY for a in ("--set", o)]])
    assert out == 0
    run = tmp_path / "s3run"
    summary = json.load(open(run / "summary.json"))
    assert summary["status"] == "finished"
    card = json.load(open(run / "export" / "model_card.json"))
    assert card["data"]["store"] == s3_store
    assert main(["probe", str(run), "--data", s3_store, "--fractions", "100", "--crops-per-volume", "2",
                 "--no-baseline", "--threads", "2"]) == 0
    report = json.load(open(run / "probe.json"))
    assert len(report["fit_volumes"]) + len(report["eval_volumes"]) == 3
    assert all(0.0 <= row["score"] <= 1.0 for row in report["rows"])


def _copy_store(src: str, dst: str) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.copy(src.removeprefix("s3://"), dst.removeprefix("s3://"), recursive=True)
    fs.invalidate_cache()


def test_missing_and_truncated_objects_are_named(s3, s3_store):
    import fsspec

    from rayssl.data.read import ChunkReadError, StoreReader

    fs = fsspec.filesystem("s3")
    store = "s3://rayssl-test/faults.zarr"
    _copy_store(s3_store, store)
    # A truncated shard: its index (at the end) no longer checks out.
    shard = "rayssl-test/faults.zarr/ct0/image/c/0/0/0"
    fs.pipe_file(shard, fs.cat_file(shard)[:-100])
    with pytest.raises(ChunkReadError, match=r"volume 'ct0' in store s3://rayssl-test/faults.zarr: shard "
                                             r"ct0/image/c/0/0/0 is truncated or corrupt"):
        StoreReader(store).read("ct0", (0, 0, 0), (8, 8, 8))
    # A missing array object (zarr.json of the image): named with what to do.
    fs.rm_file("rayssl-test/faults.zarr/ct1/image/zarr.json")
    fs.invalidate_cache()
    with pytest.raises(ChunkReadError, match=r"volume 'ct1' .*array 'image' not found.*re-run `rayssl convert`"):
        StoreReader(store).read("ct1", (0, 0, 0), (8, 8, 8))
    # The stream skips both volumes with on_error=skip, counts them, and keeps the batch size.
    from rayssl.data.pipeline import SkipLedger, build_dataset
    from rayssl.data.volumes import load_volumes

    volumes = load_volumes(store, split="all")
    ledger = SkipLedger.remote()

    def plan(volumes, index, rng):
        from rayssl.methods.base import ReadRequest

        return [ReadRequest(volume=index, start=(0, 0, 0), size=(8, 8, 8))]

    def views(crops, requests, rng):
        return {"image": crops[0]}

    ds = build_dataset(volumes, plan, views, num_samples=6, on_error="skip", ledger=ledger, actors=(1, 1))
    rows = ds.take_all()
    assert len(rows) == 6
    import ray

    skipped = ray.get(ledger.summary.remote())
    assert sorted(skipped) == ["ct0", "ct1"] and all(e["count"] >= 1 for e in skipped.values()), skipped


def test_server_stopping_mid_stream_is_a_clear_error_not_a_hang(s3, s3_store):
    """A second server holding a copy of the store is killed between two reads: the next read
    fails within bounded retries, naming the volume and the object."""
    import time

    import fsspec

    from helpers import MotoServer
    from rayssl.data.read import ChunkReadError, StoreReader

    other = MotoServer().start()
    try:
        options = {"endpoint_url": other.url, "key": "testing", "secret": "testing"}
        dst = fsspec.filesystem("s3", **options)
        dst.mkdir("gone")
        src = fsspec.filesystem("s3")
        for path in src.find("rayssl-test/ct.zarr/ct2"):
            dst.pipe_file(path.replace("rayssl-test/ct.zarr", "gone/ct.zarr"), src.cat_file(path))
        reader = StoreReader("s3://gone/ct.zarr", storage_options={**options,
                                                                    "config_kwargs": {"connect_timeout": 2, "read_timeout": 5,
                                                                                      "retries": {"max_attempts": 2}}})
        assert reader.read("ct2", (0, 0, 0), (16, 16, 16)).shape == (16, 16, 16)
        other.stop()
        started = time.monotonic()
        with pytest.raises(ChunkReadError, match=r"volume 'ct2' in store s3://gone/ct.zarr: cannot fetch ct2/image/c/0/0/0"):
            reader.read("ct2", (20, 20, 20), (16, 16, 16))
        assert time.monotonic() - started < 60
    finally:
        other.stop()


def test_metrics_history_in_a_bucket_is_put_whole_and_read_back_on_resume(s3):
    """An object store cannot append: each report puts the whole metrics.jsonl; a resume reads it back."""
    import json

    import fsspec
    import torch

    from rayssl.config import DataSection
    from rayssl.train.report import Reporter
    from rayssl.train.stall import DataWaitMeter

    run_dir = "s3://rayssl-test/runs/metrics-history"
    row = lambda step: {"step": step, "loss": 1.0, "samples_per_s": 2.0, "crops_per_s": 8.0,  # noqa: E731
                        "data_wait_pct": 0.0, "lr": 1e-3}
    reporter = Reporter(run_dir, 0, rank=0, stop=4, data=DataSection(), data_wait=DataWaitMeter())
    assert not reporter.appends
    for step in (1, 2, 3):
        reporter.record(row(step), {"loss": torch.tensor(1.0)}, step)
    resumed = Reporter(run_dir, 2, rank=0, stop=4, data=DataSection(), data_wait=DataWaitMeter())
    resumed.record(row(3), {"loss": torch.tensor(1.0)}, 3)
    with fsspec.open(f"{run_dir}/metrics.jsonl", "r") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
