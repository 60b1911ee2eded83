"""Tests of rayssl.nn.norm: the norm options build and train, only `batch` depends on the batch, BatchNorm
rows are counted, exports with a batch-independent norm load strictly, and the small-batch warning."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from rayssl.export import build, complete_state
from rayssl.methods.drasclr import DrasCLR, DrasCLRConfig, DrasCLREncoder
from rayssl.methods.mlsscl import MLSSCL, MLSSCLConfig
from rayssl.methods.voco import voco_projector
from rayssl.nn.backbones import ResNetEncoder
from rayssl.nn.heads import mlp
from rayssl.nn.health import representation_health
from rayssl.nn.norm import RunningCentre, conv_norm, count_batchnorm_rows, head_norm, replace_batchnorm
from rayssl.train.loop import small_batchnorm_warning

torch.set_num_threads(2)

MLSSCL_TINY = dict(clip_length=4, long_stride=3, short_stride=2, plane_size=12, image_size=12,
                   resnet_widen_factor=0.125, proj_dim=16, queue_length=8, intensity="none")


def _first_row_alone_and_in_batch(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    layer.train()
    return layer(x[:2])[0], layer(torch.cat([x[:1], x[2:]]))[0]


class TestLayers:
    @pytest.mark.parametrize("name", ["batch", "group", "layer", "instance"])
    def test_conv_norm_options_forward_backward_and_batch_dependence(self, name):
        torch.manual_seed(0)
        layer = conv_norm(name, 8, 3)
        x = torch.randn(4, 8, 3, 4, 4, requires_grad=True)
        y = layer(x)
        assert y.shape == x.shape
        (y * torch.randn_like(y)).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        # A sample's output with one batch-mate or another: the same unless the norm is BatchNorm.
        a, b = _first_row_alone_and_in_batch(layer, x.detach() * torch.arange(1, 5).view(4, 1, 1, 1, 1))
        assert torch.allclose(a, b, atol=1e-5) == (name != "batch")

    @pytest.mark.parametrize("name", ["batch", "layer", "group"])
    def test_head_norm_options_forward_backward_and_batch_dependence(self, name):
        torch.manual_seed(0)
        head = mlp(12, 16, 8, norm=name)
        x = torch.randn(4, 12, requires_grad=True)
        head(x).sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
        a, b = _first_row_alone_and_in_batch(head, x.detach() * torch.arange(1, 5).view(4, 1))
        assert torch.allclose(a, b, atol=1e-5) == (name != "batch")
        assert mlp(12, 16, 8, norm=None)[1].__class__ is nn.ReLU

    @pytest.mark.parametrize("name", ["batch", "layer", "group"])
    def test_voco_projector_norms_have_no_affine_and_train(self, name):
        projector = voco_projector(12, 16, 8, norm=name)
        norms = [m for m in projector if not isinstance(m, (nn.Linear, nn.ReLU))]
        assert len(norms) == 2 and all(not list(m.parameters()) for m in norms)
        projector(torch.randn(5, 12)).sum().backward()
        assert all(p.grad is not None for p in projector.parameters())

    def test_group_norm_of_a_width_it_cannot_divide_fails_naming_the_width(self):
        with pytest.raises(ValueError, match="6 channels"):
            conv_norm("group", 6)
        with pytest.raises(ValueError, match="6 channels"):
            ResNetEncoder(18, 1, widen_factor=0.1, norm="group")
        with pytest.raises(ValueError, match="6 channels"):
            head_norm("group", 6)

    def test_unknown_norm_fails_in_the_config_naming_the_field(self):
        with pytest.raises(ValidationError, match="norm"):
            MLSSCLConfig(norm="batchnorm")
        with pytest.raises(ValidationError, match="head_norm"):
            MLSSCLConfig(head_norm="instance")
        with pytest.raises(ValidationError, match="norm"):
            DrasCLRConfig(norm="weight")

    def test_replace_batchnorm_keeps_names_and_swaps_every_layer(self):
        net = nn.Sequential(nn.Conv3d(1, 8, 3), nn.BatchNorm3d(8), nn.Sequential(nn.Conv3d(8, 8, 1), nn.BatchNorm3d(8)))
        replace_batchnorm(net, "group")
        assert isinstance(net[1], nn.GroupNorm) and isinstance(net[2][1], nn.GroupNorm)
        assert set(net.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias", "2.0.weight", "2.0.bias",
                                         "2.1.weight", "2.1.bias"}


class TestResNetAndExport:
    @pytest.mark.parametrize("name", ["group", "layer", "instance"])
    def test_resnet_has_no_batchnorm_left(self, name):
        encoder = ResNetEncoder(18, 1, widen_factor=0.125, norm=name)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules())
        encoder(torch.randn(2, 1, 16, 16, 16)).sum().backward()  # instance norm needs > 1 voxel at 1/8

    def test_mlsscl_group_norm_export_loads_strictly_into_the_network_the_card_names(self):
        method = MLSSCL(MLSSCLConfig(**MLSSCL_TINY, norm="group", head_norm="layer"))
        model = method.build_model()
        with torch.no_grad():
            for p in model.online["backbone"].parameters():
                p.add_(0.1)  # pretrained weights differ from any fresh init
        exported = method.export(model)
        state, initialized = complete_state(exported.network, exported.network_kwargs, exported.state_dict)
        assert initialized == []  # every key of the network was pretrained
        # The card goes through JSON: the kwargs must rebuild the norm from there.
        kwargs = json.loads(json.dumps(exported.network_kwargs))
        network = build(exported.network, kwargs)
        network.load_state_dict(state, strict=True)
        assert isinstance(network.layer1[0].bn1, nn.GroupNorm) and isinstance(network.bn1, nn.GroupNorm)
        x = torch.randn(1, 1, 8, 16, 16)
        network.eval()
        encoder = model.online["backbone"].eval()
        # Same weights and layers: the loaded network computes what the pretrained encoder computed
        # (strides differ along the clip axis, so compare on the layers before any stride).
        torch.testing.assert_close(network.act(network.bn1(network.conv1(x))),
                                   encoder.resnet.act(encoder.resnet.bn1(encoder.resnet.conv1(x))))
        torch.testing.assert_close(network.layer1(network.bn1(network.conv1(x))),
                                   encoder.resnet.layer1(encoder.resnet.bn1(encoder.resnet.conv1(x))))

    def test_mlsscl_batch_norm_export_still_names_monai_resnet18(self):
        exported = MLSSCL(MLSSCLConfig(**MLSSCL_TINY)).export(MLSSCL(MLSSCLConfig(**MLSSCL_TINY)).build_model())
        assert exported.network == "monai.networks.nets.resnet18" and "norm" not in exported.network_kwargs

    def test_drasclr_group_norm_export_loads_strictly(self):
        encoder = DrasCLREncoder(1, (4, 4, 8, 8, 8), rep_dim=8, num_experts=2, norm="group")
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules())
        kwargs = json.loads(json.dumps(encoder.network_kwargs))
        state, _ = complete_state("rayssl.methods.drasclr.DrasCLREncoder", kwargs, encoder.state_dict())
        rebuilt = DrasCLREncoder(**kwargs)
        rebuilt.load_state_dict(state, strict=True)
        x, loc = torch.randn(2, 1, 8, 8, 8), torch.rand(2, 3) * 2 - 1
        torch.testing.assert_close(rebuilt.eval()(x, loc), encoder.eval()(x, loc))

    def test_drasclr_cpu_profile_model_has_group_norm(self):
        method = DrasCLR(DrasCLRConfig(norm="group", widths=(4, 4, 8, 8, 8), rep_dim=8, proj_dim=8, num_experts=2))
        model = method.build_model()
        kinds = {type(m) for m in model.modules()}
        assert nn.GroupNorm in kinds and nn.BatchNorm3d not in kinds


def _mlsscl_batch(batch_size: int) -> dict[str, torch.Tensor]:
    return {v: torch.randn(batch_size, 1, 4, 12, 12) for v in ("axial", "coronal", "sagittal", "short")}


class TestRowsAndWarning:
    def test_rows_are_counted_in_training_and_hooks_removed(self):
        net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.BatchNorm1d(8, track_running_stats=False))
        net.train()
        with count_batchnorm_rows(net) as rows:
            net(torch.randn(5, 4))
            net(torch.randn(3, 4))
        assert rows == {"1": 3, "3": 3}  # the fewest rows each layer saw
        net(torch.randn(2, 4))
        assert rows == {"1": 3, "3": 3}  # hooks removed on exit
        net.eval()
        with count_batchnorm_rows(net) as rows:
            net(torch.randn(2, 4))
        assert rows == {"3": 2}  # running statistics in eval: only the layer without them uses the batch

    def test_warning_names_the_layer_and_the_fix_for_a_batch_2_batchnorm_model(self):
        method = MLSSCL(MLSSCLConfig(**MLSSCL_TINY))  # norm / head_norm: batch, the paper's
        model = method.build_model().train()
        with count_batchnorm_rows(model) as rows:
            model(_mlsscl_batch(2))
        assert rows["online.backbone.resnet.bn1"] == 8 and rows["target.backbone.resnet.bn1"] == 6
        warning = small_batchnorm_warning(model, rows, "mlsscl", MLSSCLConfig.model_fields)
        assert warning is not None
        assert "online.backbone.resnet.bn1 (8 rows)" in warning and "fewer than 16 rows" in warning
        assert "--set mlsscl.norm=group" in warning and "--set mlsscl.head_norm=layer" in warning
        assert "train.sync_batchnorm=true" in warning and "train.batch_size" in warning

    def test_warning_offers_only_the_fix_that_applies(self):
        method = MLSSCL(MLSSCLConfig(**MLSSCL_TINY, norm="group"))  # heads keep BatchNorm1d
        model = method.build_model().train()
        with count_batchnorm_rows(model) as rows:
            model(_mlsscl_batch(2))
        assert rows and all(not name.startswith(("online.backbone", "target.backbone")) for name in rows)
        warning = small_batchnorm_warning(model, rows, "mlsscl", MLSSCLConfig.model_fields)
        assert "head_norm=layer" in warning and "mlsscl.norm=group" not in warning

    def test_no_warning_for_batch_independent_norms_or_enough_rows(self):
        model = MLSSCL(MLSSCLConfig(**MLSSCL_TINY, norm="group", head_norm="layer")).build_model().train()
        with count_batchnorm_rows(model) as rows:
            model(_mlsscl_batch(2))
        assert rows == {}
        assert small_batchnorm_warning(model, rows, "mlsscl", MLSSCLConfig.model_fields) is None
        assert small_batchnorm_warning(model, {"online.projector.1": 16}, "mlsscl", MLSSCLConfig.model_fields) is None


def test_drasclr_widths_that_group_norm_cannot_divide_are_refused_by_the_config():
    """Before Ray starts (config validation), not when a worker builds the encoder."""
    from rayssl.config import resolve_config

    with pytest.raises(ValueError, match=r"widths \[2, 4, 4, 8, 8\]: norm 'group' is GroupNorm\(4\)"):
        resolve_config(method="drasclr", profile="cpu", overrides=["widths=[2,4,4,8,8]"])
    resolve_config(method="drasclr", profile="cpu", overrides=["widths=[2,4,4,8,8]", "drasclr.norm=layer"])
    resolve_config(method="drasclr", profile="paper", overrides=["widths=[2,4,4,8,8]"])  # BatchNorm: any width


class TestRunningCentre:
    def test_first_call_centres_on_its_own_mean_then_the_running_mean_is_used(self):
        centre = RunningCentre(3, momentum=0.5)
        x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
        assert torch.allclose(centre(x), x - x.mean(dim=0))
        # Second call: the output uses the centre before this call's update (2, 3, 4) ...
        y = torch.tensor([[10.0, 10.0, 10.0]])
        assert torch.allclose(centre(y), y - torch.tensor([2.0, 3.0, 4.0]))
        # ... and the centre moves half-way (momentum 0.5) to the new mean: by hand.
        assert torch.allclose(centre.centre, torch.tensor([6.0, 6.5, 7.0]))

    def test_a_row_does_not_depend_on_its_batch_mates_and_gradients_pass(self):
        torch.manual_seed(0)
        centre = RunningCentre(4)
        centre(torch.randn(6, 4))  # initialised
        saved = {k: v.clone() for k, v in centre.state_dict().items()}
        x = torch.randn(3, 4, requires_grad=True)
        alone = centre(x[:1])
        centre.load_state_dict(saved)
        in_batch = centre(x)[:1]
        assert torch.allclose(alone, in_batch)
        in_batch.sum().backward()
        assert torch.equal(x.grad[0], torch.ones(4)) and torch.equal(x.grad[1:], torch.zeros(2, 4))

    def test_eval_does_not_update_and_state_resumes(self):
        centre = RunningCentre(2)
        centre(torch.tensor([[1.0, -1.0]]))
        centre.eval()
        before = centre.centre.clone()
        out = centre(torch.tensor([[5.0, 5.0]]))
        assert torch.equal(centre.centre, before) and torch.allclose(out, torch.tensor([[4.0, 6.0]]))
        copy = RunningCentre(2)
        copy.load_state_dict(centre.state_dict())
        assert torch.equal(copy.centre, before) and bool(copy.initialised)

    def test_near_parallel_rows_come_out_spread(self):
        # Post-ReLU features share a large mean: as rows they all point one way (the collapse of issue 24).
        torch.manual_seed(0)
        rows = 10.0 + 0.1 * torch.randn(32, 16)
        before = representation_health(rows)["health_spread"]
        after = representation_health(RunningCentre(16)(rows))["health_spread"]
        assert before < 0.05 and after > 0.8
