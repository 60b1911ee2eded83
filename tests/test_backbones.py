"""The backbone contract (rayssl.nn.backbones.Backbone): every method's exported encoder implements it,
its export names what it says, and its own levels are the levels the probes read from the export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rayssl.eval.features import FeatureNet
from rayssl.methods import available_methods, get_method_class
from rayssl.nn.backbones import (Backbone, BasicUNetBackbone, ResNetEncoder, UNetEncoder, build_named,
                                  level_reader)

TINY = {  # the cpu profile, shrunk so that building every method's model takes a second
    "voco": {"backbone": "unet", "unet_features": (4, 4, 8, 8, 16, 4), "proj_hidden_dim": 16, "proj_dim": 8},
    "mlsscl": {"backbone": "unet", "unet_features": (4, 4, 8, 8, 16, 4), "proj_dim": 8, "queue_length": 4},
    "gvsl": {"features": (4, 4, 8, 8, 16, 4), "num_groups": 2},
    "drasclr": {"widths": (4, 4, 8, 8, 8), "rep_dim": 8, "num_experts": 2, "proj_dim": 8},
}


@pytest.mark.parametrize("name", sorted(available_methods()))
def test_every_method_exports_a_backbone_that_states_its_export(name):
    cls = get_method_class(name)
    base = cls.profile_config("cpu").model_dump()
    method = cls(cls.config_cls(**{**base, **TINY.get(name, {})}))
    model = method.build_model()
    backbone = method.backbone(model)
    assert isinstance(backbone, Backbone), f"{name}: {type(backbone).__name__} does not implement Backbone"
    exported = method.export(model)
    assert exported.network == backbone.network()
    assert exported.network_kwargs == backbone.network_kwargs
    assert exported.key_groups == backbone.key_groups()
    assert {"encoder", "stem", "input_projection"} <= set(exported.key_groups)


def _same_levels(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert [tuple(f.shape) for f in ours] == [tuple(f.shape) for f in theirs]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("encoder, decoder", [
    (UNetEncoder(features=(4, 4, 8, 8, 16, 4)), False),
    (ResNetEncoder(depth=10, widen_factor=0.125, norm="group"), False),
    ("gvsl", True),
    (BasicUNetBackbone(spatial_dims=3, in_channels=1, out_channels=1, features=(4, 4, 8, 8, 16, 4)), True),
])
def test_a_backbones_levels_are_the_levels_read_from_its_export(encoder, decoder):
    """The probe rebuilds the network the card names (MONAI's BasicUNet, a MONAI ResNet) and reads it
    with its family's traversal: the same maps as the pretrained encoder's own `feature_levels`."""
    if encoder == "gvsl":
        from rayssl.methods.gvsl import GVSLUNet

        encoder = GVSLUNet(1, (4, 4, 8, 8, 16, 4), 2)
    encoder.eval()
    network = build_named(encoder.network(), encoder.network_kwargs)
    state = {k.removeprefix("resnet."): v for k, v in encoder.state_dict().items()}
    network.load_state_dict(state, strict=False)
    reader = FeatureNet(network.eval(), use_decoder=decoder)
    assert reader.kind != "backbone" and reader.dense
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        _same_levels(encoder.feature_levels(x), reader.levels(x))


def test_a_module_outside_the_contract_is_refused_by_name():
    with pytest.raises(ValueError, match="Conv3d.*Backbone"):
        level_reader(nn.Conv3d(1, 1, 1))
