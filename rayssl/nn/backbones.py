"""3D encoders built from MONAI networks, keeping MONAI's state_dict layout so exports load back,
and the backbone contract: what every exported network offers, and one level traversal per family."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ClassVar

import torch
from monai.networks.nets import BasicUNet, SwinUNETR
from monai.networks.nets import resnet as monai_resnet
from torch import nn

from rayssl.nn.norm import ConvNorm, replace_batchnorm


class Backbone(ABC):
    """The contract of every encoder a method exports (mixed into its nn.Module).

    An export is rebuilt from `network()` (dotted import path of a MONAI or rayssl class or
    factory) called with `network_kwargs`; `key_groups()` names its state_dict prefixes
    ("encoder", "stem", "input_projection", optionally "decoder", ...) for the model card and
    `load_pretrained`; `feature_levels` returns its feature maps shallow to deep for the probes.
    """

    network_kwargs: dict[str, Any]
    out_channels: int  # width of the deepest level (the representation a task head reads)
    # Input edges must be multiples of this for every level to exist (2 ** downsamplings).
    size_multiple: ClassVar[int] = 16
    # True when the levels need the patch's location `loc` (no location-free dense map).
    location_conditioned: ClassVar[bool] = False

    @abstractmethod
    def network(self) -> str:
        """Dotted import path of the network class or factory the export loads into."""

    @abstractmethod
    def key_groups(self) -> dict[str, list[str]]:
        """state_dict prefixes by role: "encoder", "stem", "input_projection", ..."""

    @abstractmethod
    def feature_levels(self, x: torch.Tensor, loc: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Feature maps of every level, shallow to deep (`loc` only for location-conditioned encoders)."""

    def network_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under `network()`'s own key names (what an export holds): the module's state_dict,
        unless it keeps the network under an attribute of its own."""
        return self.state_dict()  # type: ignore[attr-defined]  # mixed into an nn.Module


# Networks a model card may name: building one imports its module, so only these packages are trusted.
TRUSTED_PACKAGES = ("monai.", "rayssl.")


def import_network(path: str) -> Callable[..., nn.Module]:
    """The network class or factory a card names by dotted path (monai.* or rayssl.* only)."""
    if not path.startswith(TRUSTED_PACKAGES):
        raise ValueError(f"network {path!r}: only networks from monai and rayssl are rebuilt from a model card")
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def build_named(network: str, network_kwargs: dict[str, Any], seed: int = 0) -> nn.Module:
    """`network(**network_kwargs)` after `torch.manual_seed(seed)`: the one place an export's
    network is rebuilt from the name its card gives."""
    torch.manual_seed(seed)
    return import_network(network)(**network_kwargs)


# ---- one traversal per network family --------------------------------------------------------
UNET_ENCODER_BLOCKS = ("conv_0", "down_1", "down_2", "down_3", "down_4")
UNET_DECODER_BLOCKS = ("upcat_4", "upcat_3", "upcat_2", "upcat_1")


def unet_levels(net: nn.Module, x: torch.Tensor, decoder: bool = False) -> list[torch.Tensor]:
    """BasicUNet's encoder levels (conv_0, down_1..down_4), plus the last decoder level (upcat_1)
    when `decoder`; `net` is a BasicUNet or a module holding its blocks under the same names."""
    feats = []
    for name in UNET_ENCODER_BLOCKS:
        x = getattr(net, name)(x)
        feats.append(x)
    if decoder:
        x0, x1, x2, x3, x4 = feats
        u2 = net.upcat_2(net.upcat_3(net.upcat_4(x4, x3), x2), x1)
        feats.append(net.upcat_1(u2, x0))
    return feats


def unet_key_groups(decoder: bool = False) -> dict[str, list[str]]:
    """Key groups of BasicUNet's blocks: its encoder, stem and input projection (and its decoder)."""
    groups = {"encoder": [f"{b}." for b in UNET_ENCODER_BLOCKS], "stem": ["conv_0."],
              "input_projection": ["conv_0.conv_0.conv."]}
    return {**groups, "decoder": [f"{b}." for b in UNET_DECODER_BLOCKS]} if decoder else groups


def swin_levels(net: nn.Module, x: torch.Tensor, skip: bool = False) -> list[torch.Tensor]:
    """The Swin stages of a SwinUNETR (or a module holding its `swinViT` and `normalize`),
    preceded by `encoder1(x)` (the full-resolution skip) when `skip`."""
    hidden = list(net.swinViT(x, net.normalize))
    return ([net.encoder1(x)] if skip else []) + hidden


def resnet_levels(resnet: monai_resnet.ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    """A MONAI ResNet's stem output and its four layers, without the classifier."""
    x = resnet.act(resnet.bn1(resnet.conv1(x)))
    feats = [x]
    if not resnet.no_max_pool:
        x = resnet.maxpool(x)
    for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        x = layer(x)
        feats.append(x)
    return feats


@dataclass(frozen=True)
class LevelReader:
    """How the probes read one built network's feature levels: `levels(network, x, loc)`."""

    family: str  # "unet", "swin", "resnet" or "backbone" (a rayssl Backbone)
    size_multiple: int
    dense: bool  # False for a location-conditioned encoder (no location-free dense map)
    read: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], list[torch.Tensor]]

    def levels(self, network: nn.Module, x: torch.Tensor, loc: torch.Tensor | None = None) -> list[torch.Tensor]:
        return self.read(network, x, loc)


def _read_backbone(network: nn.Module, x: torch.Tensor, loc: torch.Tensor | None) -> list[torch.Tensor]:
    return network.feature_levels(x, loc)


def _read_unet(decoder: bool, network: nn.Module, x: torch.Tensor, loc: torch.Tensor | None) -> list[torch.Tensor]:
    return unet_levels(network, x, decoder)


def _read_swin(skip: bool, network: nn.Module, x: torch.Tensor, loc: torch.Tensor | None) -> list[torch.Tensor]:
    return swin_levels(network, x, skip)


def _read_resnet(network: nn.Module, x: torch.Tensor, loc: torch.Tensor | None) -> list[torch.Tensor]:
    return resnet_levels(network, x)  # type: ignore[arg-type]


def level_reader(network: nn.Module, decoder: bool = False, swin_skip: bool = False) -> LevelReader:
    """The level traversal of `network`: a rayssl `Backbone` reads itself; the MONAI networks an
    export names (BasicUNet, SwinUNETR, ResNet) by their family's traversal. `decoder` adds
    BasicUNet's last decoder level (when the decoder was pretrained), `swin_skip` SwinUNETR's `encoder1`.
    (Readers are module-level functions, so a module holding one still pickles.)"""
    if isinstance(network, Backbone):
        return LevelReader("backbone", network.size_multiple, not network.location_conditioned, _read_backbone)
    if isinstance(network, BasicUNet):
        return LevelReader("unet", 16, True, partial(_read_unet, decoder))
    if isinstance(network, SwinUNETR):
        return LevelReader("swin", 32, True, partial(_read_swin, swin_skip))
    if isinstance(network, monai_resnet.ResNet):
        return LevelReader("resnet", 8, True, _read_resnet)
    raise ValueError(f"no feature levels for {type(network).__name__}: expected MONAI's BasicUNet, SwinUNETR or "
                     f"ResNet, or a module implementing rayssl.nn.backbones.Backbone")


class SwinViTEncoder(nn.Module, Backbone):
    """The Swin transformer encoder of MONAI's SwinUNETR (`swinViT`), returning the deepest features.

    Parameters live under `swinViT.` exactly as in `SwinUNETR`, so `state_dict()` loads into a
    `SwinUNETR(**network_kwargs)` with `strict=False` and every key matched.
    """

    def __init__(self, in_channels: int = 1, feature_size: int = 12, use_v2: bool = True,
                 depths: tuple[int, ...] = (2, 2, 2, 2), num_heads: tuple[int, ...] = (3, 6, 12, 24)) -> None:
        super().__init__()
        self.network_kwargs: dict[str, Any] = dict(
            in_channels=in_channels, out_channels=1, feature_size=feature_size, use_v2=use_v2,
            depths=tuple(depths), num_heads=tuple(num_heads), spatial_dims=3,
        )
        full = SwinUNETR(**self.network_kwargs)
        self.swinViT = full.swinViT
        self.normalize = full.normalize
        self.out_channels = feature_size * 16

    size_multiple: ClassVar[int] = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.swinViT(x, self.normalize)[-1]

    def feature_levels(self, x: torch.Tensor, loc: torch.Tensor | None = None) -> list[torch.Tensor]:
        return swin_levels(self, x)

    def network(self) -> str:
        return "monai.networks.nets.SwinUNETR"

    def key_groups(self) -> dict[str, list[str]]:
        return {"encoder": ["swinViT."], "stem": ["swinViT.patch_embed."], "input_projection": ["swinViT.patch_embed.proj."]}


class UNetEncoder(nn.Module, Backbone):
    """The encoder half of MONAI's BasicUNet (conv_0, down_1..down_4) under BasicUNet's key names."""

    ENCODER_BLOCKS = UNET_ENCODER_BLOCKS

    def __init__(self, in_channels: int = 1, features: tuple[int, ...] = (8, 16, 32, 64, 128, 8),
                 norm: str | tuple = ("instance", {"affine": True})) -> None:
        super().__init__()
        self.network_kwargs: dict[str, Any] = dict(spatial_dims=3, in_channels=in_channels, out_channels=1,
                                                   features=tuple(features), norm=norm)
        full = BasicUNet(**self.network_kwargs)
        for name in self.ENCODER_BLOCKS:
            setattr(self, name, getattr(full, name))
        self.out_channels = features[4]

    def feature_levels(self, x: torch.Tensor, loc: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Features of every encoder level, shallow to deep."""
        return unet_levels(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_levels(x)[-1]

    def network(self) -> str:
        return "monai.networks.nets.BasicUNet"

    def key_groups(self) -> dict[str, list[str]]:
        return unet_key_groups()


class BasicUNetBackbone(BasicUNet, Backbone):
    """MONAI's whole BasicUNet (encoder, decoder, final_conv: its own modules and forward) under the
    backbone contract, for methods that pretrain encoder and decoder (MAE). Levels: the encoder's and
    the last decoder level."""

    def __init__(self, **network_kwargs: Any) -> None:
        super().__init__(**network_kwargs)
        self.network_kwargs: dict[str, Any] = dict(network_kwargs)
        self.out_channels = int(self.network_kwargs.get("features", (32, 32, 64, 128, 256, 32))[4])

    def feature_levels(self, x: torch.Tensor, loc: torch.Tensor | None = None) -> list[torch.Tensor]:
        return unet_levels(self, x, decoder=True)

    def network(self) -> str:
        return "monai.networks.nets.BasicUNet"

    def key_groups(self) -> dict[str, list[str]]:
        return unet_key_groups(decoder=True)


_RESNETS = {10: monai_resnet.resnet10, 18: monai_resnet.resnet18, 34: monai_resnet.resnet34}


def monai_resnet_with_norm(depth: int = 18, norm: ConvNorm = "batch", **kwargs: Any) -> monai_resnet.ResNet:
    """MONAI's `resnet{depth}(**kwargs)` with every norm layer `norm` (rayssl.nn.norm.ConvNorm).

    MONAI 1.6's ResNet hands its own `norm=` argument to the stem only (its residual layers keep
    BatchNorm), so the layers are replaced after construction; module names and the state_dict
    layout stay MONAI's. A model card names this builder for a ResNet pretrained with another norm.
    """
    if depth not in _RESNETS:
        raise ValueError(f"ResNet depth must be one of {sorted(_RESNETS)}, got {depth}")
    return replace_batchnorm(_RESNETS[depth](**kwargs), norm)  # type: ignore[return-value]


class ResNetEncoder(nn.Module, Backbone):
    """MONAI's 3D ResNet (3x3x3 first convolution, stride 1, no max-pool), without the classifier.

    `norm` picks every norm layer. With BatchNorm (MONAI's default) the export names
    `monai.networks.nets.resnet{depth}`; with another norm it names `monai_resnet_with_norm`, which
    builds the same MONAI ResNet with that norm, so the weights load strictly either way.
    """

    def __init__(self, depth: int = 18, in_channels: int = 1, widen_factor: float = 1.0,
                 norm: ConvNorm = "batch") -> None:
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"ResNet depth must be one of {sorted(_RESNETS)}, got {depth}")
        monai_kwargs: dict[str, Any] = dict(
            spatial_dims=3, n_input_channels=in_channels, conv1_t_size=3, conv1_t_stride=1,
            no_max_pool=True, widen_factor=widen_factor, feed_forward=False,
        )
        if norm == "batch":
            self.factory = f"monai.networks.nets.resnet{depth}"
            self.network_kwargs: dict[str, Any] = monai_kwargs
        else:
            self.factory = "rayssl.nn.backbones.monai_resnet_with_norm"
            self.network_kwargs = dict(depth=depth, norm=norm, **monai_kwargs)
        self.resnet = monai_resnet_with_norm(depth, norm, **monai_kwargs)
        self.out_channels = int(512 * widen_factor)

    size_multiple: ClassVar[int] = 8

    def feature_levels(self, x: torch.Tensor, loc: torch.Tensor | None = None) -> list[torch.Tensor]:
        return resnet_levels(self.resnet, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_levels(x)[-1]

    def network(self) -> str:
        return self.factory

    def network_state_dict(self) -> dict[str, torch.Tensor]:
        """MONAI's ResNet's own keys, without this wrapper's `resnet.`."""
        return self.resnet.state_dict()

    def key_groups(self) -> dict[str, list[str]]:
        return {"encoder": [""], "stem": ["conv1.", "bn1."], "input_projection": ["conv1."]}


def global_pool(features: torch.Tensor) -> torch.Tensor:
    """[B, C, *spatial] -> [B, C] by global average pooling."""
    return features.flatten(2).mean(dim=2)
