"""Ray Data pipeline: deterministic plans, actors that read the right voxels, and the on_error policy."""

import os

import numpy as np
import pandas as pd
import pytest
import zarr
from zarr.codecs import BloscCodec

from rayssl.data.pipeline import SkipLedger, build_dataset, iter_samples
from rayssl.data.plan import Planner
from rayssl.data.volumes import load_volumes
from rayssl.methods.base import ReadRequest

CROP = (8, 8, 8)


def make_store(root, n=3, shape=(24, 20, 18)):
    """A small store in the documented layout, voxel value = 10000*v + 100*x + y (z in a second array)."""
    group = zarr.open_group(root, mode="w")
    rows = []
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for v in range(n):
        data = (1000 * v + 30 * x + y).astype(np.int16)
        g = group.create_group(f"vol{v}")
        g.create_array("image", shape=shape, chunks=(8, 8, 8), dtype="int16",
                       compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"))[:] = data
        g.create_array("label", shape=shape, chunks=(8, 8, 8), dtype="uint8")[:] = (z % 7).astype(np.uint8)
        rows.append(dict(id=f"vol{v}", store=os.path.abspath(root), group=f"vol{v}", shape=list(shape),
                         spacing=[1.0, 1.0, 1.0], dtype="int16", modality="CT", split="train",
                         bbox=[0, 0, 0, *shape], background=-1024.0, has_label=True, has_mask=False,
                         source="synthetic", source_sha256=str(v)))
    pd.DataFrame(rows).to_parquet(os.path.join(root, "manifest.parquet"))
    return root


def plan_corner(volumes, index, rng):
    shape = volumes[index].shape
    start = tuple(int(rng.integers(-2, s - CROP[i] + 3)) for i, s in enumerate(shape))
    return [ReadRequest(index, start, CROP), ReadRequest(index, start, CROP, array="label")]


def views_identity(crops, requests, rng):
    return {"image": crops[0][None], "label": crops[1][None],
            "start": np.array(requests[0].start, dtype=np.int64),
            "volume": np.int64(requests[0].volume), "noise": np.float32(rng.random())}


def test_plans_are_deterministic_and_resumable(tmp_path):
    volumes = load_volumes(make_store(str(tmp_path / "s.zarr")))
    a = Planner(volumes, plan_corner, seed=7, samples_per_volume=2)
    b = Planner(volumes, plan_corner, seed=7, samples_per_volume=2)
    c = Planner(volumes, plan_corner, seed=8, samples_per_volume=2)
    plans_a = [a.plan(i) for i in range(20)]
    plans_b = [b.plan(i) for i in reversed(range(20))][::-1]  # order of evaluation does not matter
    for pa, pb in zip(plans_a, plans_b):
        assert pa[:2] == pb[:2] and pa[3] == pb[3]
        np.testing.assert_array_equal(pa[2], pb[2])
    assert any(not np.array_equal(pa[2], pc[2]) for pa, pc in zip(plans_a, (c.plan(i) for i in range(20))))
    # Each epoch visits every volume samples_per_volume times.
    epoch0 = sorted(p[1] for p in plans_a[:6])
    assert epoch0 == [0, 0, 1, 1, 2, 2]


def test_actor_pool_streams_the_planned_voxels(ray_local, tmp_path):
    store = make_store(str(tmp_path / "s.zarr"))
    volumes = load_volumes(store)
    ds = build_dataset(volumes, plan_corner, views_identity, num_samples=12, start_sample=3, seed=1,
                       actors=(1, 2), actor_cpus=0.5)
    rows = ds.take_all()
    assert sorted(int(r["sample"]) for r in rows) == list(range(3, 15))
    planner = Planner(volumes, plan_corner, seed=1)
    for row in rows:
        _, volume, requests, _ = planner.plan(int(row["sample"]))
        assert int(row["volume"]) == volume
        start = requests[0, 1:4]
        np.testing.assert_array_equal(row["start"], start)
        x, y, z = np.meshgrid(*[np.arange(s, s + 8) for s in start], indexing="ij")
        inside = (x >= 0) & (x < 24) & (y >= 0) & (y < 20) & (z >= 0) & (z < 18)
        expected = np.where(inside, 1000 * volume + 30 * x + y, -1024).astype(np.float32)
        np.testing.assert_array_equal(row["image"][0], expected)
        np.testing.assert_array_equal(row["label"][0], np.where(inside, z % 7, 0))


def test_iter_samples_hands_out_views_of_the_blocks(ray_local, tmp_path):
    """Every sample once, equal to Ray's own rows; without a conversion the arrays are read-only
    views of the object-store block (no copy); with dtypes they are torch tensors that own their data."""
    import torch

    volumes = load_volumes(make_store(str(tmp_path / "s.zarr")))
    ds = build_dataset(volumes, plan_corner, views_identity, num_samples=24, seed=1, actors=(1, 2),
                       actor_cpus=0.5, samples_per_call=2, read_dtype=None)
    expected = {int(r["sample"]): r for r in ds.take_all()}

    samples = list(iter_samples(ds))
    assert sorted(int(s["sample"]) for s in samples) == list(range(24))
    for sample in samples:
        for key, value in expected[int(sample["sample"])].items():
            np.testing.assert_array_equal(sample[key], value)
        image = sample["image"]
        assert image.dtype == np.int16 and not image.flags.writeable
        # A row of the record batch's (rows, 1, 8, 8, 8) array, not an array of its own.
        assert isinstance(image.base, np.ndarray) and image.base.shape[1:] == image.shape
        assert image.base.shape[0] >= 2  # samples_per_call=2: two samples per piece of the block

    cast = list(iter_samples(ds, dtypes={"image": torch.float32}))
    assert sorted(int(s["sample"]) for s in cast) == list(range(24))
    for sample in cast:
        want = expected[int(sample["sample"])]
        assert sample["image"].dtype == torch.float32 and sample["label"].dtype == torch.uint8
        np.testing.assert_array_equal(sample["image"].numpy(), want["image"].astype(np.float32))
        np.testing.assert_array_equal(sample["label"].numpy(), want["label"])
        sample["label"] += 1  # owned memory: writing to it cannot touch the object store
    again = {int(s["sample"]): s for s in iter_samples(ds, dtypes=torch.float32)}
    np.testing.assert_array_equal(again[0]["label"].numpy(), expected[0]["label"])  # float32 for every array
    assert again[0]["start"].dtype == torch.float32 and isinstance(again[0]["sample"], np.integer)

    # Leaving early stops the iteration (no hang, no error at shutdown).
    stream = iter_samples(build_dataset(volumes, plan_corner, views_identity, num_samples=400, seed=1,
                                        actors=(1, 1), actor_cpus=0.5))
    assert next(stream)["image"].dtype == np.float32
    stream.close()


def _corrupt(store, volume):
    chunk = os.path.join(store, volume, "image", "c", "0", "0", "0")
    with open(chunk, "wb") as f:
        f.write(b"not a blosc frame" * 3)


def _plan_origin(volumes, index, rng):
    return [ReadRequest(index, (0, 0, 0), CROP)]


def _views_image(crops, requests, rng):
    return {"image": crops[0][None], "volume": np.int64(requests[0].volume)}


def test_on_error_skip_counts_and_keeps_batch_size(ray_local, tmp_path):
    store = make_store(str(tmp_path / "s.zarr"))
    _corrupt(store, "vol1")
    volumes = load_volumes(store)
    ledger = SkipLedger.remote()
    rows = build_dataset(volumes, _plan_origin, _views_image, num_samples=9, seed=0, actors=(1, 1),
                         actor_cpus=0.5, on_error="skip", ledger=ledger).take_all()
    assert len(rows) == 9  # every sample delivered, re-planned away from the bad volume
    assert all(int(r["volume"]) != 1 for r in rows)
    skipped = ray_local.get(ledger.summary.remote())
    assert list(skipped) == ["vol1"] and skipped["vol1"]["count"] >= 1
    assert "chunk" in skipped["vol1"]["reason"]


def test_on_error_raise_names_volume_and_chunk(ray_local, tmp_path):
    store = make_store(str(tmp_path / "s.zarr"))
    _corrupt(store, "vol0")
    volumes = load_volumes(store)
    with pytest.raises(Exception) as err:
        build_dataset(volumes, _plan_origin, _views_image, num_samples=6, seed=0, actors=(1, 1),
                      actor_cpus=0.5).take_all()
    assert "vol0" in str(err.value) and "image/c/0/0/0" in str(err.value)


def test_missing_store_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="rayssl convert"):
        load_volumes(str(tmp_path / "nowhere.zarr"))


def test_data_actors_keep_freed_memory_for_reuse():
    """glibc's mallopt accepts the settings (data actors call this at start; see keep_freed_memory).
    In a child process: the setting lasts for the life of the process that makes it."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    code = "from rayssl.data.pipeline import keep_freed_memory; print(keep_freed_memory())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"
