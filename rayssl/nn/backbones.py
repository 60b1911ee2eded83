"""3D encoders built from MONAI networks, keeping MONAI's state_dict layout so exports load back."""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import BasicUNet, SwinUNETR
from monai.networks.nets import resnet as monai_resnet
from torch import nn

from rayssl.nn.norm import ConvNorm, replace_batchnorm


class SwinViTEncoder(nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.swinViT(x, self.normalize)[-1]

    @staticmethod
    def network() -> str:
        return "monai.networks.nets.SwinUNETR"

    def key_groups(self) -> dict[str, list[str]]:
        return {"encoder": ["swinViT."], "stem": ["swinViT.patch_embed."], "input_projection": ["swinViT.patch_embed.proj."]}


class UNetEncoder(nn.Module):
    """The encoder half of MONAI's BasicUNet (conv_0, down_1..down_4) under BasicUNet's key names."""

    ENCODER_BLOCKS = ("conv_0", "down_1", "down_2", "down_3", "down_4")

    def __init__(self, in_channels: int = 1, features: tuple[int, ...] = (8, 16, 32, 64, 128, 8),
                 norm: str | tuple = ("instance", {"affine": True})) -> None:
        super().__init__()
        self.network_kwargs: dict[str, Any] = dict(spatial_dims=3, in_channels=in_channels, out_channels=1,
                                                   features=tuple(features), norm=norm)
        full = BasicUNet(**self.network_kwargs)
        for name in self.ENCODER_BLOCKS:
            setattr(self, name, getattr(full, name))
        self.out_channels = features[4]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of every encoder level, shallow to deep."""
        feats = []
        for name in self.ENCODER_BLOCKS:
            x = getattr(self, name)(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[-1]

    @staticmethod
    def network() -> str:
        return "monai.networks.nets.BasicUNet"

    def key_groups(self) -> dict[str, list[str]]:
        return {"encoder": [f"{b}." for b in self.ENCODER_BLOCKS], "stem": ["conv_0."], "input_projection": ["conv_0.conv_0.conv."]}


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


class ResNetEncoder(nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.resnet
        x = r.act(r.bn1(r.conv1(x)))
        for layer in (r.layer1, r.layer2, r.layer3, r.layer4):
            x = layer(x)
        return x

    def network(self) -> str:
        return self.factory

    def key_groups(self) -> dict[str, list[str]]:
        return {"encoder": [""], "stem": ["conv1.", "bn1."], "input_projection": ["conv1."]}


def global_pool(features: torch.Tensor) -> torch.Tensor:
    """[B, C, *spatial] -> [B, C] by global average pooling."""
    return features.flatten(2).mean(dim=2)
