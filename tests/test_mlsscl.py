"""Tests of MLSSCL: views geometry, InfoNCE value, queues, momentum, gradients, export."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from monai.networks.nets import BasicUNet, resnet18
from pydantic import ValidationError

from helpers import load_export
from rayssl.data.read import read_box
from rayssl.methods import get_method_class
from rayssl.methods.base import ReadRequest, VolumeInfo
from rayssl.methods.mlsscl import ONLINE_VIEWS, MLSSCL, MLSSCLConfig, MLSSCLModel
from rayssl.nn.contrastive import info_nce
from rayssl.nn.momentum import cosine_momentum

torch.set_num_threads(2)

# Tiny settings: 4-slice clips of 12 x 12, ResNet-18 at 1/8 width.
TINY = dict(clip_length=4, long_stride=3, short_stride=2, plane_size=12, image_size=12,
            resnet_widen_factor=0.125, proj_dim=16, queue_length=8, intensity="none")


def make_method(**overrides) -> MLSSCL:
    return MLSSCL(MLSSCLConfig(**{**TINY, **overrides}))


def coordinate_volume(shape=(40, 44, 48)) -> np.ndarray:
    """Voxel value encodes its own index: x*10000 + y*100 + z."""
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (x * 10000 + y * 100 + z).astype(np.float32)


def volume_info(volume: np.ndarray, modality: str = "MR", background: float = 0.0) -> VolumeInfo:
    return VolumeInfo(index=0, id="v0", shape=volume.shape, spacing=(1.0, 1.0, 1.0),
                      bbox=(0, 0, 0, *volume.shape), background=background, modality=modality)


def sample_views(method: MLSSCL, volume: np.ndarray, info: VolumeInfo, seed: int):
    rng = np.random.default_rng(seed)
    requests = method.plan([info], 0, rng)
    crops = [read_box(volume, r.start, r.size, info.background, np.float32) for r in requests]
    return method.views(crops, requests, rng), requests


def make_batch(method: MLSSCL, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    volume = rng.normal(size=(30, 30, 30)).astype(np.float32)
    info = volume_info(volume)
    samples = [sample_views(method, volume, info, seed + i)[0] for i in range(batch_size)]
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


def decode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = values.astype(np.int64)
    return v // 10000, (v // 100) % 100, v % 100


class TestInfoNCE:
    def test_hand_computed_value_with_queue(self):
        # q and k+ are normalised inside: q -> (1, 0), k+ -> (0.6, 0.8); negatives (0, 1), (-1, 0).
        query = torch.tensor([[2.0, 0.0]])
        positive = torch.tensor([[3.0, 4.0]])
        negatives = torch.tensor([[0.0, 5.0], [-1.0, 0.0]])
        tau = 0.5
        expected = -math.log(math.exp(0.6 / tau) / (math.exp(0.6 / tau) + math.exp(0.0) + math.exp(-1.0 / tau)))
        assert info_nce(query, positive, negatives, tau).item() == pytest.approx(expected, rel=1e-6)

    def test_mean_over_batch(self):
        query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        positive = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        negatives = torch.tensor([[0.0, 1.0]])
        tau = 1.0
        first = -math.log(math.e / (math.e + 1.0))  # pos 1, neg 0
        second = -math.log(1.0 / (1.0 + math.e))  # pos 0, neg 1
        assert info_nce(query, positive, negatives, tau).item() == pytest.approx((first + second) / 2, rel=1e-6)


class TestConfig:
    def test_short_stride_must_be_below_long_stride(self):
        with pytest.raises(ValidationError, match="short_stride"):
            MLSSCLConfig(long_stride=2, short_stride=2)

    def test_unknown_field_and_bad_range_fail(self):
        with pytest.raises(ValidationError, match="queue_lenght"):
            MLSSCLConfig(queue_lenght=10)
        with pytest.raises(ValidationError, match="temperature"):
            MLSSCLConfig(temperature=0.0)

    def test_profiles_are_valid_and_registered(self):
        for profile in MLSSCL.profiles:
            MLSSCL.profile_config(profile)
        assert get_method_class("mlsscl") is MLSSCL
        paper = MLSSCL.profile_config("paper")
        assert (paper.clip_length, paper.long_stride, paper.short_stride, paper.queue_length) == (16, 4, 2, 320)
        assert (paper.temperature, paper.momentum, paper.alpha, paper.beta) == (0.2, 0.99, 0.5, 0.5)


class TestViews:
    def test_boxes_cover_just_the_clips(self):
        method = make_method()
        volume = coordinate_volume()
        requests = method.plan([volume_info(volume)], 0, np.random.default_rng(0))
        span = (4 - 1) * 3 + 1
        assert [r.size for r in requests] == [(12, 12, span), (12, span, 12), (span, 12, 12)]
        anywhere = make_method(short_clip_placement="anywhere")
        requests = anywhere.plan([volume_info(volume)], 0, np.random.default_rng(0))
        assert len(requests) == 4 and requests[3].size == (12, 12, (4 - 1) * 2 + 1)

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_views_are_orthogonal_planes_with_strides(self, seed):
        method = make_method(augment=False)
        volume = coordinate_volume()
        views, requests = sample_views(method, volume, volume_info(volume), seed)
        for name in ("axial", "coronal", "sagittal", "short"):
            assert views[name].shape == (1, 4, 12, 12) and views[name].dtype == np.float32
        k = np.arange(4)[:, None, None]
        i = np.arange(12)[None, :, None]
        j = np.arange(12)[None, None, :]

        x, y, z = decode(views["axial"][0])  # [z, x, y]: planes of constant z
        x0, y0, z0 = requests[0].start
        assert np.array_equal(z, np.broadcast_to(z0 + 3 * k, z.shape))
        assert np.array_equal(x, np.broadcast_to(x0 + i, x.shape))
        assert np.array_equal(y, np.broadcast_to(y0 + j, y.shape))

        x, y, z = decode(views["coronal"][0])  # [y, x, z]: planes of constant y
        x0, y0, z0 = requests[1].start
        assert np.array_equal(y, np.broadcast_to(y0 + 3 * k, y.shape))
        assert np.array_equal(x, np.broadcast_to(x0 + i, x.shape))
        assert np.array_equal(z, np.broadcast_to(z0 + j, z.shape))

        x, y, z = decode(views["sagittal"][0])  # [x, y, z]: planes of constant x
        x0, y0, z0 = requests[2].start
        assert np.array_equal(x, np.broadcast_to(x0 + 3 * k, x.shape))
        assert np.array_equal(y, np.broadcast_to(y0 + i, y.shape))
        assert np.array_equal(z, np.broadcast_to(z0 + j, z.shape))

        # Short clip: axial planes at stride δS inside the long clip's z-range and window.
        x, y, z = decode(views["short"][0])
        x0, y0, z0 = requests[0].start
        first = int(z[0, 0, 0])
        assert np.array_equal(z, np.broadcast_to(first + 2 * k, z.shape))
        assert z0 <= first and first + 2 * 3 <= z0 + 3 * 3
        assert int(views["short_offset"]) == first - z0  # what `rayssl preview` draws
        assert np.array_equal(x, np.broadcast_to(x0 + i, x.shape))
        assert np.array_equal(y, np.broadcast_to(y0 + j, y.shape))

    def test_short_clip_anywhere_uses_its_own_box(self):
        method = make_method(augment=False, short_clip_placement="anywhere")
        volume = coordinate_volume()
        views, requests = sample_views(method, volume, volume_info(volume), 3)
        x, y, z = decode(views["short"][0])
        x0, y0, z0 = requests[3].start
        assert np.array_equal(z[:, 0, 0], z0 + 2 * np.arange(4))
        assert int(views["short_offset"]) == 0
        assert np.array_equal(x[0, :, 0], x0 + np.arange(12))

    def test_intensity_ct_window_and_mr_percentiles(self):
        volume = np.full((20, 20, 20), 0.0, dtype=np.float32)
        volume[:10] = -1000.0
        volume[10:15] = 1000.0
        ct = make_method(augment=False, intensity="auto")
        views, _ = sample_views(ct, volume, volume_info(volume, modality="CT", background=-1024.0), 0)
        values = np.unique(np.concatenate([views[v].ravel() for v in ONLINE_VIEWS]))
        assert set(np.round(values, 6)) <= {0.0, 0.5, 1.0}
        mr = make_method(augment=False, intensity="mr")
        views, _ = sample_views(mr, coordinate_volume(), volume_info(coordinate_volume()), 0)
        stacked = np.concatenate([views[v].ravel() for v in ONLINE_VIEWS])
        assert stacked.min() >= 0.0 and stacked.max() <= 1.0 and stacked.max() > 0.9

    def test_ct_window_on_an_mr_volume_falls_back_to_percentiles(self):
        # MR stored in [0, 1] (like MNI152) under `intensity: ct`: the HU window would map it to ~0.5
        # everywhere; the views take its percentiles instead, as every probe does.
        mr_volume = coordinate_volume() / coordinate_volume().max()
        method = make_method(augment=False, intensity="ct")
        views, _ = sample_views(method, mr_volume, volume_info(mr_volume, modality="MR"), 0)
        stacked = np.concatenate([views[v].ravel() for v in ONLINE_VIEWS])
        assert stacked.max() - stacked.min() > 0.5, (stacked.min(), stacked.max())

    def test_auto_intensity_without_plan_uses_data_rule(self):
        method = make_method(augment=False, intensity="auto")  # this instance never ran `plan`
        crops = [np.full(s, -1000.0, np.float32) for s in [(12, 12, 10), (12, 10, 12), (10, 12, 12)]]
        requests = [ReadRequest(volume=5, start=(0, 0, 0), size=c.shape) for c in crops]
        views = method.views(crops, requests, np.random.default_rng(0))
        assert all(np.allclose(views[v], 0.0) for v in ONLINE_VIEWS)  # HU window: air -> 0

    def test_plan_carries_intensity_mapping_to_a_pickled_views(self):
        # The data actors run `views` of a pickled copy that never planned: the mapping travels in the requests.
        volume = np.full((20, 20, 20), 40.0, dtype=np.float32)  # soft tissue only: a data rule would say MR
        info = volume_info(volume, modality="CT", background=-1024.0)
        method = make_method(augment=False, intensity="auto")
        requests = make_method(intensity="auto").plan([info], 0, np.random.default_rng(0))
        views_fn = pickle.loads(pickle.dumps(method.views))
        crops = [read_box(volume, r.start, r.size, -1024.0, np.float32) for r in requests]
        views = views_fn(crops, requests, np.random.default_rng(0))
        assert np.allclose(views["axial"], (40.0 + 1000.0) / 2000.0)

    def test_augmented_views_are_seeded_and_fixed_shape(self):
        method = make_method(augment=True, plane_size=16, intensity="mr")
        volume = np.random.default_rng(0).normal(size=(30, 30, 30)).astype(np.float32)
        a, _ = sample_views(method, volume, volume_info(volume), 7)
        b, _ = sample_views(method, volume, volume_info(volume), 7)
        assert set(a) == {*ONLINE_VIEWS, "short_offset"}
        for name in a:
            if name in ONLINE_VIEWS:
                assert a[name].shape == (1, 4, 12, 12) and a[name].dtype == np.float32
            np.testing.assert_array_equal(a[name], b[name])


class TestModel:
    @pytest.mark.parametrize("backbone", ["resnet18", "unet"])
    def test_clip_axis_not_downsampled(self, backbone):
        method = make_method(backbone=backbone, unet_features=(4, 4, 8, 8, 16, 4))
        encoder = method.backbone(method.build_model())
        features = encoder(torch.zeros(2, 1, 4, 16, 16))
        factor = 8 if backbone == "resnet18" else 16
        assert tuple(features.shape[2:]) == (4, 16 // factor, 16 // factor)

    @pytest.mark.parametrize("batch_size", [1, 3])
    def test_gradients_reach_every_online_parameter_and_no_target(self, batch_size):
        method = make_method()
        model = method.build_model()
        method.setup(model, torch.device("cpu"))
        # Queues start empty; a batch of 1 with no queue has no negatives (loss 0), so fill them first.
        for queue in method._queues.values():
            queue.enqueue(torch.nn.functional.normalize(torch.randn(8, 16), dim=1))
        model.train()
        batch = make_batch(method, batch_size)
        outputs = model(batch)
        assert outputs["online_short"].shape == (batch_size, 16)
        losses = method.loss(outputs, batch)
        assert set(losses) >= {"loss", "multiview", "long_short"}
        assert all(v.dim() == 0 for v in losses.values())
        losses["loss"].backward()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(not n.startswith("target.") for n, _ in trainable)
        for name, param in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        for name, param in model.target.named_parameters():
            assert not param.requires_grad and param.grad is None, name

    @pytest.mark.parametrize("direction", ["one_way", "symmetric"])
    def test_loss_is_weighted_sum_of_pair_losses_with_key_view_queues(self, direction):
        """Eq. 1 one-directional (v1 anchors) by default; `symmetric` adds the reverse direction."""
        method = make_method(alpha=0.3, beta=0.7, temperature=0.1, multiview_direction=direction)
        torch.manual_seed(0)
        outputs = {f"online_{v}": torch.randn(2, 16) for v in ("axial", "coronal", "sagittal", "short")}
        outputs.update({f"target_{v}": torch.randn(2, 16) for v in ("axial", "coronal", "sagittal")})
        queues = {v: torch.randn(8, 16) for v in ("axial", "coronal", "sagittal")}
        method.load_state_dict({f"queue_{v}_{k}": (q if k == "buffer" else torch.tensor(0))
                                for v, q in queues.items() for k in ("buffer", "pointer")})
        losses = method.loss(outputs, {})

        def pair(q, k):
            return info_nce(outputs[f"online_{q}"], outputs[f"target_{k}"], queues[k], 0.1)

        multiview = sum(pair(a, b) + (pair(b, a) if direction == "symmetric" else 0) for a, b in
                        [("axial", "coronal"), ("axial", "sagittal"), ("coronal", "sagittal")])
        long_short = pair("short", "axial")
        assert losses["multiview"].item() == pytest.approx(multiview.item(), rel=1e-5)
        assert losses["long_short"].item() == pytest.approx(long_short.item(), rel=1e-5)
        assert losses["loss"].item() == pytest.approx(0.3 * multiview.item() + 0.7 * long_short.item(), rel=1e-5)


class TestMomentumAndQueues:
    def test_momentum_update_matches_formula(self):
        method = make_method(momentum=0.99)
        model = method.build_model()
        with torch.no_grad():
            for p in model.online.parameters():
                p.add_(torch.randn_like(p))
        online = [p.detach().clone() for p in model.online.parameters()]
        target = [p.detach().clone() for p in model.target.parameters()]
        outputs = {f"target_{v}": torch.randn(2, 16) for v in ("axial", "coronal", "sagittal")}
        metrics = method.after_step(model, outputs, step=5, total_steps=10)
        m = 1 - (1 - 0.99) * (math.cos(math.pi * 5 / 10) + 1) / 2
        assert metrics["momentum"] == pytest.approx(m) and m == pytest.approx(cosine_momentum(0.99, 5, 10))
        for p, t_old, o in zip(model.target.parameters(), target, online):
            torch.testing.assert_close(p, m * t_old + (1 - m) * o)
        # The target is a momentum copy of backbone + projector only (no predictor).
        assert sum(p.numel() for p in model.target.parameters()) == sum(p.numel() for p in model.online.parameters())

    def test_queues_fifo_and_state_round_trip(self):
        method = make_method(queue_length=3)
        model = method.build_model()
        method.setup(model, torch.device("cpu"))
        keys = [{f"target_{v}": torch.randn(2, 16) for v in ("axial", "coronal", "sagittal")} for _ in range(3)]
        for step, outputs in enumerate(keys[:2]):
            method.after_step(model, outputs, step, 10)
        normed = {v: torch.nn.functional.normalize(torch.cat([keys[0][f"target_{v}"], keys[1][f"target_{v}"]]), dim=1)
                  for v in ("axial", "coronal", "sagittal")}
        for view in ("axial", "coronal", "sagittal"):
            # 4 keys into a queue of 3: the oldest was overwritten, order oldest -> newest.
            torch.testing.assert_close(method._queues[view].ordered(), normed[view][1:])

        state = method.state_dict()
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        assert not any("queue" in k for k in model.state_dict())  # queues are method state, not buffers
        restored = make_method(queue_length=3)
        restored.load_state_dict(state)
        method.after_step(model, keys[2], 2, 10)
        restored.after_step(model, keys[2], 2, 10)
        for view in ("axial", "coronal", "sagittal"):
            torch.testing.assert_close(restored._queues[view].buffer, method._queues[view].buffer)
            assert restored._queues[view].pointer == method._queues[view].pointer

    def test_wrong_queue_length_on_resume_fails(self):
        state = make_method(queue_length=3).state_dict()
        with pytest.raises(ValueError, match="queue"):
            make_method(queue_length=4).load_state_dict(state)


class TestExport:
    def test_resnet_export_loads_into_monai_resnet18(self):
        method = make_method()
        model = method.build_model()
        exported = method.export(model)
        assert exported.network == "monai.networks.nets.resnet18"
        net, result = load_export(exported, resnet18)
        assert result.missing_keys == []
        net.eval()(torch.zeros(1, 1, 8, 16, 16))  # the standard (2, 2, 2)-stride network runs

    def test_unet_export_loads_into_basic_unet(self):
        method = make_method(backbone="unet", unet_features=(4, 4, 8, 8, 16, 4))
        model = method.build_model()
        exported = method.export(model)
        assert exported.network == "monai.networks.nets.BasicUNet"
        _, result = load_export(exported, BasicUNet)
        assert all(k.startswith(("upcat_", "final_conv")) for k in result.missing_keys)
        assert "C=4" in exported.notes and method.card()["pretraining_patch_size"] == [4, 12, 12]

    def test_model_type(self):
        assert isinstance(make_method().build_model(), MLSSCLModel)


def _ddp_rank(rank: int, out_dir: str) -> None:
    """One of two gloo ranks (helpers.run_gloo_ranks): a real DDP step on a rank-specific batch, then after_step's enqueue."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    method = make_method()
    model = method.build_model()
    method.setup(model, torch.device("cpu"))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = make_batch(method, batch_size=2, seed=100 * (rank + 1))  # different samples per rank
    outputs = ddp(batch)
    method.loss(outputs, batch)["loss"].backward()
    optimizer.step()
    method.after_step(model, outputs, 1, 10)
    torch.save({"queues": method.state_dict(), "keys": {k: v.detach() for k, v in outputs.items()
                                                     if k.startswith("target_")}},
               f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_queues_stay_identical_across_two_ddp_ranks(tmp_path):
    from helpers import run_gloo_ranks

    run_gloo_ranks(_ddp_rank, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    def flat(state):
        out = {}
        for key, value in state.items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in flat(value).items()})
            else:
                out[key] = value
        return out

    q0, q1 = flat(r0["queues"]), flat(r1["queues"])
    assert q0.keys() == q1.keys() and q0
    for key in q0:
        torch.testing.assert_close(torch.as_tensor(q0[key]), torch.as_tensor(q1[key]))
    # Each view's queue received both ranks' keys (2 per rank), in rank order.
    for view_key, keys0 in r0["keys"].items():
        view = view_key.removeprefix("target_")
        buffers = [v for k, v in q0.items() if view in k and torch.as_tensor(v).dim() == 2]
        assert buffers, f"no queue buffer for view {view} in {list(q0)}"
        gathered = torch.nn.functional.normalize(torch.cat([keys0, r1["keys"][view_key]]), dim=1)
        assert any(torch.allclose(torch.as_tensor(b)[:4], gathered, atol=1e-5) for b in buffers), view
