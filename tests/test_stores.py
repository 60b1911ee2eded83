"""Several stores in one run: per-store sampling weights, unique ids across stores, `--data A --data B`, and per-store counts in summary.json and the model card."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rayssl.data.plan import Planner
from rayssl.data.stores import stores_summary, volume_repeats
from rayssl.methods.base import ReadRequest, VolumeInfo


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
