"""Several stores in one run: per-store sampling weights, unique ids across stores, `--data A --data B`, per-store counts in summary.json and the model card, and `Method.prepare` writing into each volume's own store."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from rayssl.data.plan import Planner
from rayssl.data.stores import stores_summary, volume_repeats
from rayssl.methods.base import ReadRequest, VolumeInfo

from helpers import assert_run_records_its_network_and_config


def _volumes(counts: dict[str, int]) -> list[VolumeInfo]:
    volumes = []
    for store, n in counts.items():
        for i in range(n):
            volumes.append(VolumeInfo(index=len(volumes), id=f"{store.strip('/').split('/')[-1]}-{i}",
                                      shape=(8, 8, 8), spacing=(1.0, 1.0, 1.0), bbox=(0, 0, 0, 8, 8, 8),
                                      background=0.0, modality="CT", extra={"store": store}))
    return volumes


def _first_volume(volumes, index, rng):
    return [ReadRequest(volume=index, start=(0, 0, 0), size=(1, 1, 1))]


def test_weights_set_each_stores_share_of_an_epoch():
    volumes = _volumes({"s3://a/big.zarr": 6, "s3://b/small.zarr": 2})
    stores = ["s3://a/big.zarr", "s3://b/small.zarr"]
    # No weights: proportional to volumes, the single-store order is kept exactly.
    assert volume_repeats(volumes, stores, [None, None], 2) is None
    repeats = volume_repeats(volumes, stores, [1.0, 1.0], 2)  # equal shares of 16 samples per epoch
    assert sorted(repeats[:6].tolist()) == [1, 1, 1, 1, 2, 2] and repeats[6:].tolist() == [4, 4]
    planner = Planner(volumes, _first_volume, seed=3, samples_per_volume=2, repeats=repeats)
    firsts = [planner.plan_requests(i)[1] for i in range(planner.samples_per_epoch * 3)]
    from_small = np.isin(firsts, [6, 7]).mean()
    assert planner.samples_per_epoch == 16 and from_small == pytest.approx(0.5)
    rows = stores_summary(volumes, stores, [1.0, 1.0], repeats, 2)
    assert [(r["volumes"], r["samples_per_epoch"], r["sample_share"]) for r in rows] == [(6, 8, 0.5), (2, 8, 0.5)]
    # An unset weight counts as 1 once another store sets one; weights matching the sizes change nothing.
    repeats = volume_repeats(volumes, stores, [None, 1.0], 1)
    assert repeats[:6].sum() == 4 and repeats[6:].sum() == 4
    assert volume_repeats(volumes, stores, [3.0, 1.0], 1) is None


def test_cli_repeated_data_and_config_stores():
    from rayssl.cli import _data_overrides
    from rayssl.config import resolve_config

    cfg = resolve_config(method="voco", profile="cpu", overrides=_data_overrides(["a.zarr", "s3://b/c.zarr"]))
    assert [(e.uri, e.weight) for e in cfg.data.store_entries()] == [("a.zarr", None), ("s3://b/c.zarr", None)]
    cfg = resolve_config(method="voco", profile="cpu",
                         overrides=['data.stores=[{uri: a.zarr, weight: 2}, {uri: b.zarr}]'])
    assert [(e.uri, e.weight) for e in cfg.data.store_entries()] == [("a.zarr", 2.0), ("b.zarr", None)]
    assert resolve_config(method="voco", profile="cpu", overrides=_data_overrides(["a.zarr"])).data.store == "a.zarr"
    with pytest.raises(ValueError, match="not both"):
        resolve_config(method="voco", profile="cpu", overrides=["data.store=a.zarr", "data.stores=[b.zarr]"])
    with pytest.raises(ValueError, match="weight"):
        resolve_config(method="voco", profile="cpu", overrides=["data.stores=[{uri: a.zarr, weight: 0}]"])


def _mr_store(root):
    """Two small MR volumes (ids mr0, mr1, values in [0, 1]) written by the store writer + manifest."""
    from datasets_zarr.manifest import write_manifest
    from datasets_zarr.store import write_volume

    rng = np.random.default_rng(0)
    for i in range(2):
        image = rng.random((64, 64, 48), dtype=np.float32)
        write_volume(root, f"mr{i}", image, np.diag([6.0, 6.0, 20.0 / 3.0, 1.0]), modality="MR", chunks=32)
    write_manifest(root)
    return str(root)


def test_volume_ids_must_be_unique_across_stores(demo_store_path, tmp_path):
    from rayssl.data.volumes import load_volumes

    with pytest.raises(ValueError, match="appears in several stores"):
        load_volumes([str(demo_store_path), str(demo_store_path)], split="all")
    mixed = load_volumes([str(demo_store_path), _mr_store(tmp_path / "mr.zarr")], split="all")
    # Each volume keeps its own store's modality and background (what intensity mappings use).
    assert {v.modality for v in mixed if v.id.startswith("mr")} == {"MR"}
    assert {v.background for v in mixed if v.id.startswith("mr")} == {0.0}
    assert {v.background for v in mixed if not v.id.startswith("mr")} == {-1024.0}


@pytest.mark.slow
def test_pretrain_on_two_stores_records_per_store_counts(ray_local, demo_store_path, tmp_path):
    """Two stores weighted 1:3 (24 samples an epoch: 6 + 18), a 2-step run; summary.json and the model card
    list each store with its volumes, weight, share of samples and modality."""
    from rayssl.cli import main

    mr = _mr_store(tmp_path / "mr.zarr")
    tiny = ["n_x=2", "n_y=2", "region_size=[64,64,32]", "input_size=32", "num_random_crops=2",
            "unet_features=[4,4,8,8,16,4]", "proj_hidden_dim=32", "proj_dim=32", "intensity=none",
            "train.batch_size=1", "data.split=all", "data.actors_max=1", "data.samples_per_volume=4",
            f'data.stores=[{{uri: "{demo_store_path}", weight: 1}}, {{uri: "{mr}", weight: 3}}]']
    assert main(["pretrain", "--method", "voco", "--steps", "2", "--out", str(tmp_path), "--name", "two",
                 *[a for o in tiny for a in ("--set", o)]]) == 0
    summary = json.load(open(tmp_path / "two" / "summary.json"))
    card = json.load(open(tmp_path / "two" / "export" / "model_card.json"))
    for rows in (summary["data"]["stores"], card["data"]["stores"]):
        assert [(r["volumes"], r["weight"], r["sample_share"], r["modalities"]) for r in rows] == [
            (4, 1.0, 0.25, ["CT"]), (2, 3.0, 0.75, ["MR"])]


def _ct_store_without_masks(root, ids=("b-000", "b-001"), seed=20) -> str:
    """CT phantoms of the demo fixture's size and spacing (chunks 32^3) under other ids, converted
    without masks, so a method that needs lung masks must generate them into this store."""
    import hashlib

    from datasets_zarr.convert import ConversionOptions, prepare_and_write
    from datasets_zarr.demo import make_phantom, phantom_affine
    from datasets_zarr.io import ScanVolume
    from datasets_zarr.manifest import write_manifest
    from datasets_zarr.store import ensure_store

    ensure_store(root)
    shape, spacing = (64, 64, 48), (6.0, 6.0, 20.0 / 3.0)
    options = ConversionOptions.build(modality="CT", chunks=32)
    for i, volume_id in enumerate(ids):
        image, _ = make_phantom(seed + i, shape, spacing)
        prepare_and_write(root, volume_id, ScanVolume(image, phantom_affine(shape, spacing), f"test:{volume_id}", "CT"),
                          options, source_sha256=hashlib.sha256(image.tobytes()).hexdigest())
    write_manifest(root)
    return str(root)


def _two_ct_stores(demo_store_path, tmp_path) -> tuple[str, str]:
    """A: a copy of the demo store (4 phantoms with their own lung masks); B: 2 phantoms without masks."""
    import shutil

    from datasets_zarr.manifest import read_manifest, write_manifest

    a = tmp_path / "a.zarr"
    shutil.copytree(demo_store_path, a)
    old = read_manifest(demo_store_path)
    write_manifest(a, splits=dict(zip(old["id"], old["split"])))
    return str(a), _ct_store_without_masks(tmp_path / "b.zarr")


def _assert_prepared_in_own_store(store: str, ids: list[str], atlas: str) -> None:
    """Every volume of `store` carries its registration, mask and manifest columns there, and
    the store holds no other volume."""
    from datasets_zarr.manifest import read_manifest
    from datasets_zarr.register import ATTRS_KEY
    from datasets_zarr.store import list_volume_ids, read_volume_attrs

    assert list_volume_ids(store) == sorted(ids)
    manifest = read_manifest(store).set_index("id")
    for volume_id in ids:
        entry = read_volume_attrs(store, volume_id)[ATTRS_KEY]
        assert entry["atlas"] == atlas and len(entry["atlas_to_subject_voxel"]) == 4
        assert os.path.isdir(os.path.join(store, volume_id, "mask"))
        row = manifest.loc[volume_id]
        assert row["atlas"] == atlas and bool(row["has_mask"]) and len(row["atlas_to_subject_voxel"]) == 16


def test_drasclr_prepares_each_volume_in_its_own_store(demo_store_path, tmp_path):
    """`Method.prepare(volumes)` over two stores: DrasCLR's lung masks, atlas registrations and
    manifest columns land in each volume's own store (store B's masks are generated there)."""
    from rayssl.data.volumes import load_volumes
    from rayssl.methods.drasclr import EXTRA_POSITIONS, DrasCLR, DrasCLRConfig

    a, b = _two_ct_stores(demo_store_path, tmp_path)
    volumes = load_volumes([a, b], split="all")
    method = DrasCLR(DrasCLRConfig(patch_size=8, landmark_step=4, widths=(2, 4, 4, 8, 8), rep_dim=8, proj_dim=6,
                                   num_experts=3, queue_size=4, queue_dtype="float32", spacing_mm=None))
    with pytest.raises(TypeError):  # the old prepare(store, volumes) cannot name a store any more
        method.prepare(a, volumes)
    prepared = method.prepare(volumes)
    assert [v.id for v in prepared] == [v.id for v in volumes]
    assert [v.extra["store"] for v in prepared] == [v.extra["store"] for v in volumes]
    assert all(EXTRA_POSITIONS in v.extra for v in prepared)
    atlas = method.config.atlas
    a_ids = [v.id for v in volumes if v.extra["store"] == a]
    b_ids = [v.id for v in volumes if v.extra["store"] == b]
    assert len(a_ids) == 4 and b_ids == ["b-000", "b-001"]
    _assert_prepared_in_own_store(a, a_ids, atlas)
    _assert_prepared_in_own_store(b, b_ids, atlas)


def test_voco_prepares_regions_beside_each_volumes_store(demo_store_path, tmp_path):
    """VoCo's resized foreground regions go beside each volume's own store, one regions store per store."""
    from datasets_zarr.store import list_volume_ids
    from rayssl.data.volumes import load_volumes
    from rayssl.methods.voco import VoCo, VoCoConfig

    a, b = _two_ct_stores(demo_store_path, tmp_path)
    volumes = load_volumes([a, b], split="all")
    method = VoCo(VoCoConfig(backbone="unet", region_mode="foreground_resize", region_size=(64, 64, 32), n_x=2, n_y=2, n_z=1,
                             input_size=32))
    prepared = method.prepare(volumes)
    assert [v.id for v in prepared] == [v.id for v in volumes]
    for store in (a, b):
        own = [v.id for v in volumes if v.extra["store"] == store]
        assert list_volume_ids(f"{store}.fg-64x64x32.zarr") == sorted(own)
    for v, p in zip(volumes, prepared):
        assert p.extra["store"] == f"{v.extra['store']}.fg-64x64x32.zarr" and p.extra["resized_from_store"] == v.extra["store"]


@pytest.mark.slow
def test_drasclr_pretrains_over_two_stores(ray_local, demo_store_path, tmp_path):
    """`--data A --data B` with DrasCLR: prepare (Ray tasks) writes into each store, 2 steps train
    over both, and the run's README, summary and model card name both stores."""
    from rayssl.cli import main

    a, b = _two_ct_stores(demo_store_path, tmp_path)
    tiny = ["data.split=all", "data.actors_max=1", "train.report_every=1", "train.checkpoint_every=2"]
    assert main(["pretrain", "--method", "drasclr", "--profile", "cpu", "--data", a, "--data", b, "--steps", "2",
                 "--out", str(tmp_path / "runs"), "--name", "two", *[x for o in tiny for x in ("--set", o)]]) == 0
    run = tmp_path / "runs" / "two"
    card = json.load(open(run / "export" / "model_card.json"))
    summary = json.load(open(run / "summary.json"))
    atlas = card["landmarks"]["atlas"]
    _assert_prepared_in_own_store(a, ["phantom-000", "phantom-001", "phantom-002", "phantom-003"], atlas)
    _assert_prepared_in_own_store(b, ["b-000", "b-001"], atlas)
    assert summary["status"] == "finished" and summary["steps"] == 2
    assert [(r["store"], r["volumes"]) for r in summary["data"]["stores"]] == [(a, 4), (b, 2)]
    assert card["data"]["store"] is None and [r["store"] for r in card["data"]["stores"]] == [a, b]
    readme = (run / "README.md").read_text()
    assert f"`{a}`, `{b}` (6 volumes)" in readme
    # DrasCLR's cpu profile end to end (test_methods_pretrain.py has the other methods on one store).
    assert_run_records_its_network_and_config(str(run), "drasclr", steps=2)
