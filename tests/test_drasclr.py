"""Tests of the DrasCLR method: config, views, Loc-CondConv encoder, conditional memory bank, losses, export."""

from __future__ import annotations

import math
import pickle
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import load_export
from rayssl.config import resolve_config
from rayssl.methods import get_method_class
from rayssl.methods.base import ReadRequest, VolumeInfo
from rayssl.methods.drasclr import (
    EXTRA_ATLAS_COORDS,
    EXTRA_NEIGHBORS,
    EXTRA_POSITIONS,
    DrasCLR,
    DrasCLRConfig,
    DrasCLREncoder,
    embed_image,
    embed_landmarks,
    embed_volume,
    embed_voxels,
    neighbor_info_nce,
)
from rayssl.nn.contrastive import info_nce

TINY = dict(
    patch_size=8,
    landmark_step=4,
    widths=(2, 4, 4, 8, 8),
    rep_dim=8,
    proj_dim=6,
    num_experts=3,
    queue_size=4,
    queue_dtype="float32",
    n_neighbors=2,
)


def _method(**overrides) -> DrasCLR:
    return DrasCLR(DrasCLRConfig(**{**TINY, **overrides}))


def _batch(b: int = 3, n: int = 2, p: int = 8, landmarks=(0, 2, 0), n_landmarks: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "view_q": torch.randn(b, 1, p, p, p, generator=g),
        "view_k": torch.randn(b, 1, p, p, p, generator=g),
        "neighbors": torch.randn(b, n, 1, p, p, p, generator=g),
        "loc": torch.rand(b, 3, generator=g) * 2 - 1,
        "neighbor_loc": torch.rand(b, n, 3, generator=g) * 2 - 1,
        "landmark": torch.tensor(landmarks),
        "n_landmarks": torch.full((b,), n_landmarks),
    }


def _fill_bank(method: DrasCLR, n_landmarks: int = 3) -> None:
    """Fill every landmark queue with random unit keys (queues start empty, so a fresh bank has no negatives)."""
    bank = method._ensure_bank(n_landmarks)
    g = torch.Generator().manual_seed(1)
    for landmark in range(n_landmarks):
        keys = torch.nn.functional.normalize(torch.randn(bank.length, bank.buffer.shape[2], generator=g), dim=1)
        bank.enqueue(keys, torch.full((bank.length,), landmark))


def _volumes(n_landmarks: int = 5) -> list[VolumeInfo]:
    """Two prepared volumes with landmarks on a line (atlas coordinates and neighbours by hand)."""
    centres = np.stack([np.arange(n_landmarks) * 4 + 8, np.full(n_landmarks, 10), np.full(n_landmarks, 9)], 1)
    neighbors = np.array(
        [[1, 2]] + [[i - 1, i + 1] for i in range(1, n_landmarks - 1)] + [[n_landmarks - 2, n_landmarks - 3]]
    )
    coords = np.linspace(-1, 1, n_landmarks * 3, dtype=np.float32).reshape(n_landmarks, 3)
    volumes = []
    for i, shift in enumerate((0.0, 1.4)):
        extra = {
            "store": "/nowhere",
            "group": f"v{i}",
            "dtype": "int16",
            EXTRA_POSITIONS: (centres + shift).astype(np.float32),
            EXTRA_NEIGHBORS: neighbors,
            EXTRA_ATLAS_COORDS: coords,
        }
        volumes.append(
            VolumeInfo(
                index=i,
                id=f"v{i}",
                shape=(40, 24, 24),
                spacing=(1.0, 1.0, 1.0),
                bbox=(0, 0, 0, 40, 24, 24),
                background=-1024.0,
                modality="CT",
                extra=extra,
            )
        )
    return volumes


class TestConfig:
    def test_registered_and_profiles_validate(self):
        assert get_method_class("drasclr") is DrasCLR
        for profile in ("cpu", "paper"):
            cfg = resolve_config("drasclr", profile)
            assert isinstance(cfg.method_cfg(), DrasCLRConfig)
        assert resolve_config("drasclr", "cpu", overrides=["mask=foreground"]).method_cfg().mask == "foreground"

    @pytest.mark.parametrize(
        "override,field",
        [
            ("patch_size=15", "patch_size"),
            ("temperature=0", "temperature"),
            ("mask=liver", "mask"),
            ("queue_size=0", "queue_size"),
        ],
    )
    def test_bad_values_name_the_field(self, override, field):
        with pytest.raises(ValueError, match=field):
            resolve_config("drasclr", "cpu", overrides=[override])

    def test_paper_memory_bank_fits_one_gpu(self):
        cfg = resolve_config("drasclr", "paper").method_cfg()
        bytes_per_value = 2 if cfg.queue_dtype == "float16" else 4
        assert cfg.queue_size * cfg.proj_dim * 581 * bytes_per_value < 0.7e9  # 0.61 GB at 581 landmarks


class TestLosses:
    def test_neighbor_loss_by_hand(self):
        # Neighbours (1,0) and (0,1): their sum (1,1) is the query; key (1,0) -> positive logit 1;
        # negative (-1,0) -> logit -1. L = -log(e^1 / (e^1 + e^-1)) = log(1 + e^-2).
        r = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        loss = neighbor_info_nce(r, torch.tensor([[2.0, 0.0]]), torch.tensor([[[-3.0, 0.0]]]), temperature=1.0)
        assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-5)
        # tau = 0.5 doubles every logit.
        loss = neighbor_info_nce(r, torch.tensor([[2.0, 0.0]]), torch.tensor([[[-3.0, 0.0]]]), temperature=0.5)
        assert loss.item() == pytest.approx(math.log(1 + math.exp(-4)), rel=1e-5)

    def test_negatives_come_from_each_sample_landmark_queue(self):
        method = _method()
        model = method.build_model()
        _fill_bank(method)
        batch = _batch()
        outputs = model(batch)
        losses = method.loss(outputs, batch)
        queue = method._bank.buffer  # [3 landmarks, K, D], full of random keys
        expected_local = info_nce(outputs["query"], outputs["key"], queue[batch["landmark"]], 0.2)
        expected_neighbor = neighbor_info_nce(
            outputs["neighbor_queries"], outputs["key"], queue[batch["landmark"]], 0.2
        )
        torch.testing.assert_close(losses["loss_local"], expected_local)
        torch.testing.assert_close(losses["loss_neighbor"], expected_neighbor)
        torch.testing.assert_close(losses["loss"], expected_local + expected_neighbor)
        # Another landmark's queue gives another loss: the bank really is conditional.
        other = info_nce(outputs["query"], outputs["key"], queue[torch.tensor([1, 1, 1])], 0.2)
        assert not torch.allclose(other, expected_local)


class TestModel:
    def test_gradients_reach_every_trainable_parameter_with_mixed_landmarks(self):
        torch.manual_seed(0)
        method = _method()
        model = method.build_model()
        _fill_bank(method)
        batch = _batch(b=3, landmarks=(0, 2, 1))
        method.loss(model(batch), batch)["loss"].backward()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(n.startswith("online.") for n, _ in trainable)
        for name, p in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        for name, p in model.named_parameters():
            if name.startswith("target."):
                assert not p.requires_grad and p.grad is None, name
        # Every expert of every Loc-CondConv layer and every router is trained.
        for name, p in model.online.encoder.named_parameters():
            if name.endswith("conv.weight"):
                assert all(p.grad[e].abs().sum() > 0 for e in range(p.shape[0])), name

    def test_batched_encoder_equals_one_sample_at_a_time(self):
        torch.manual_seed(0)
        encoder = DrasCLREncoder(1, (2, 4, 4, 8, 8), rep_dim=8, num_experts=3).eval()
        x, loc = torch.randn(4, 1, 8, 8, 8), torch.rand(4, 3) * 2 - 1
        together = encoder(x, loc)
        alone = torch.cat([encoder(x[i : i + 1], loc[i : i + 1]) for i in range(4)])
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)

    def test_after_step_enqueues_keys_only_into_their_own_landmark_queue(self):
        method = _method()
        model = method.build_model()
        batch = _batch(landmarks=(0, 2, 0))
        outputs = model(batch)
        method.loss(outputs, batch)
        initial = method._bank.buffer.clone()
        online = [p.detach().clone() for p in model.online.parameters()]
        target = [p.detach().clone() for p in model.target.parameters()]
        metrics = method.after_step(model, outputs, 1, 10)
        bank, keys = method._bank.buffer, outputs["key"]
        torch.testing.assert_close(bank[0, 0], keys[0])
        torch.testing.assert_close(bank[0, 1], keys[2])
        torch.testing.assert_close(bank[0, 2:], initial[0, 2:])
        torch.testing.assert_close(bank[2, 0], keys[1])
        torch.testing.assert_close(bank[2, 1:], initial[2, 1:])
        torch.testing.assert_close(bank[1], initial[1])  # landmark 1 was not in the batch
        assert method._bank.pointers.tolist() == [2, 0, 1]
        assert metrics["bank_fill"] == pytest.approx((2 / 4 + 0 + 1 / 4) / 3)
        # EMA: target <- 0.999 target + 0.001 online.
        for p_t, t0, o0 in zip(model.target.parameters(), target, online):
            torch.testing.assert_close(p_t, 0.999 * t0 + 0.001 * o0)

    def test_method_state_round_trip_and_float16_bank(self):
        method = _method(queue_dtype="float16")
        model = method.build_model()
        for step, landmarks in enumerate([(0, 1, 2), (2, 2, 1)]):
            batch = _batch(landmarks=landmarks)
            outputs = model(batch)
            assert torch.isfinite(method.loss(outputs, batch)["loss"])
            method.after_step(model, outputs, step + 1, 10)
        assert method._bank.buffer.dtype == torch.float16
        state = method.state_dict()
        restored = _method(queue_dtype="float16")
        restored.setup(model, torch.device("cpu"))
        restored.load_state_dict(state)
        torch.testing.assert_close(restored._bank.buffer, method._bank.buffer)
        assert restored._bank.pointers.tolist() == method._bank.pointers.tolist()
        assert restored._enqueued.tolist() == method._enqueued.tolist() == [1, 2, 3]
        with pytest.raises(ValueError, match="queue size"):
            _method(queue_size=8).load_state_dict(state)

    def test_export_loads_into_a_fresh_encoder(self):
        method = _method()
        model = method.build_model()
        exported = method.export(model)
        assert exported.network == "rayssl.methods.drasclr.DrasCLREncoder"
        fresh, result = load_export(exported, DrasCLREncoder)
        assert result.missing_keys == []
        assert set(exported.state_dict) == set(fresh.state_dict())
        routers = [k for k in exported.state_dict if ".router." in k]
        assert len(routers) == 2 * 13 and all(
            any(k.startswith(p) for p in exported.key_groups["router"]) for k in routers
        )
        x, loc = torch.randn(2, 1, 8, 8, 8), torch.rand(2, 3)
        model.eval(), fresh.eval()
        torch.testing.assert_close(fresh(x, loc), model.online.encoder(x, loc))


class TestViews:
    def test_plan_and_views_shapes_and_landmark_identity(self):
        method = _method()
        volumes = _volumes()
        rng = np.random.default_rng(7)
        expected_j = int(np.random.default_rng(7).integers(5))
        requests = method.plan(volumes, 1, rng)
        assert len(requests) == 3 and all(r.volume == 1 and r.size == (8, 8, 8) for r in requests)
        centre = np.rint(volumes[1].extra[EXTRA_POSITIONS][expected_j]).astype(int)
        assert requests[0].start == tuple(int(v) for v in centre - 4)
        crops = [np.random.default_rng(i).uniform(-1100, 400, (8, 8, 8)).astype(np.float32) for i in range(3)]
        views = method.views(crops, requests, np.random.default_rng(0))
        assert views["view_q"].shape == views["view_k"].shape == (1, 8, 8, 8)
        assert views["neighbors"].shape == (2, 1, 8, 8, 8)
        assert views["neighbor_loc"].shape == (2, 3) and views["loc"].shape == (3,)
        assert int(views["landmark"]) == expected_j and int(views["n_landmarks"]) == 5
        coords, neighbors = volumes[0].extra[EXTRA_ATLAS_COORDS], volumes[0].extra[EXTRA_NEIGHBORS]
        np.testing.assert_array_equal(views["loc"], coords[expected_j])
        np.testing.assert_array_equal(views["neighbor_loc"], coords[neighbors[expected_j]])
        for key in ("view_q", "view_k", "neighbors", "loc", "neighbor_loc"):
            assert views[key].dtype == np.float32
        assert views["landmark"].dtype == np.int64
        # HU window [-1024, 240] -> [-1, 1]; noise may step slightly outside.
        assert -1.5 < views["view_q"].min() and views["view_q"].max() < 1.5
        assert not np.allclose(views["view_q"], views["view_k"])
        again = method.views(crops, requests, np.random.default_rng(0))
        np.testing.assert_array_equal(again["view_q"], views["view_q"])

    def test_views_of_a_copy_that_never_planned(self):
        # The data actors run `views` on a pickled copy: the landmark travels in the plan's requests.
        requests = _method().plan(_volumes(), 0, np.random.default_rng(0))
        views = pickle.loads(pickle.dumps(_method().views))([np.zeros((8, 8, 8), np.float32)] * 3, requests,
                                                             np.random.default_rng(0))
        assert int(views["landmark"]) == requests[0].context["landmark"]
        bare = [ReadRequest(r.volume, r.start, r.size) for r in requests]  # boxes without the plan's context
        with pytest.raises(ValueError, match="DrasCLR.plan"):
            _method().views([np.zeros((8, 8, 8), np.float32)] * 3, bare, np.random.default_rng(0))


def test_end_to_end_on_demo_phantoms(demo_store_path, tmp_path):
    """prepare (masks, registration, landmarks) -> plan -> chunked reads -> views -> one training step."""
    from datasets_zarr.manifest import read_manifest, write_manifest
    from rayssl.data.read import StoreReader
    from rayssl.data.volumes import load_volumes

    store = tmp_path / "copy.zarr"
    shutil.copytree(demo_store_path, store)
    old = read_manifest(demo_store_path)
    write_manifest(store, splits=dict(zip(old["id"], old["split"])))
    method = _method(queue_size=8)
    volumes = method.prepare(load_volumes(str(store), "train"))
    assert all(v.has_mask and EXTRA_POSITIONS in v.extra for v in volumes)
    assert method.config.atlas == volumes[0].extra["atlas"]  # the automatic choice is pinned
    assert method.card()["landmarks"]["atlas"] == volumes[0].extra["atlas"]
    n_landmarks = len(volumes[0].extra[EXTRA_ATLAS_COORDS])
    reader = StoreReader(str(store))
    rng = np.random.default_rng(0)
    samples = []
    for index in (0, 1, 1):
        requests = method.plan(volumes, index, rng)
        crops = reader.read_boxes(
            volumes[index].extra["group"], [(r.start, r.size) for r in requests], pad_value=volumes[index].background
        )
        samples.append(method.views(crops, requests, rng))
    batch = {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}
    assert int(batch["n_landmarks"][0]) == n_landmarks
    model = method.build_model()
    method.setup(model, torch.device("cpu"))
    outputs = model(batch)
    losses = method.loss(outputs, batch)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    method.after_step(model, outputs, 1, 1)
    assert int(method._enqueued.sum()) == 3
    assert volumes[0].extra["atlas_dice"] == 1.0 and 0.8 < volumes[1].extra["atlas_dice"] < 1.0

    # Downstream features: landmark, image-level (mean of landmarks) and sliding-window voxel-level.
    import zarr

    encoder = method.backbone(model)
    volume = volumes[1]
    image = zarr.open_array(str(store / volume.id / "image"), mode="r")[...]
    positions, coords = volume.extra[EXTRA_POSITIONS], volume.extra[EXTRA_ATLAS_COORDS]
    landmarks = embed_landmarks(encoder, image, positions, coords, 8)
    assert landmarks.shape == (n_landmarks, 8)
    np.testing.assert_allclose(
        embed_image(encoder, image, positions, coords, 8), landmarks.mean(0), rtol=1e-5, atol=1e-6
    )
    to_atlas = np.asarray(volume.extra["subject_to_atlas_voxel"]).reshape(4, 4)
    grid, centres = embed_voxels(encoder, image, to_atlas, (64, 64, 48), patch_size=8, stride=16)
    assert grid.shape == (8, 4, 4, 3) and centres.shape == (4, 4, 3, 3)
    assert np.isfinite(grid).all()
    stored = embed_volume(encoder, str(store), volume.id, patch_size=8, landmark_step=4, level="image")
    np.testing.assert_allclose(stored, landmarks.mean(0), rtol=1e-4, atol=1e-5)


def test_replace_keeps_volume_info_frozen_contract():
    volume = _volumes()[0]
    assert replace(volume, has_mask=True).extra is volume.extra


def _ddp_worker(rank: int, out_dir: str) -> None:
    """One rank (of helpers.run_gloo_ranks) of the 2-process check of shuffle BN and cross-rank key gathering."""
    torch.manual_seed(0)
    method = _method()
    model = method.build_model()
    batch = _batch(b=2, landmarks=(rank, 2), n_landmarks=3)
    batch["view_k"] = batch["view_k"] + rank  # different keys on each rank
    model.eval()  # BN on running statistics: a key no longer depends on its batch companions
    shuffled = model._keys(batch["view_k"], batch["loc"])
    model.shuffle_bn = False
    local = model._keys(batch["view_k"], batch["loc"])
    model.shuffle_bn = True
    outputs = model(batch)
    method.loss(outputs, batch)
    method.after_step(model, outputs, 1, 1)
    torch.save(
        {
            "shuffled": shuffled,
            "local": local,
            "bank": method._bank.buffer,
            "pointers": method._bank.pointers,
            "keys": outputs["key"],
        },
        f"{out_dir}/rank{rank}.pt",
    )


@pytest.mark.slow
def test_shuffle_bn_and_key_gathering_across_two_ranks(tmp_path):
    from helpers import run_gloo_ranks

    run_gloo_ranks(_ddp_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for r in (r0, r1):
        torch.testing.assert_close(r["shuffled"], r["local"], atol=1e-5, rtol=1e-5)  # each rank gets its own keys back
    # Both ranks enqueued all 4 keys (gathered in rank order) and hold identical banks.
    torch.testing.assert_close(r0["bank"], r1["bank"])
    assert r0["pointers"].tolist() == [1, 1, 2]  # landmark ids: rank 0 (0, 2), rank 1 (1, 2)
    torch.testing.assert_close(r0["bank"][2, :2], torch.stack([r0["keys"][1], r1["keys"][1]]))
