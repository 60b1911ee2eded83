"""GVSL: geometric visual similarity learning by registering pairs of different volumes (He et al., CVPR 2023)."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import BasicUNet
from monai.networks.nets.basic_unet import TwoConv
from monai.transforms import Resize
from monai.transforms.utils import create_rotate, create_scale, create_shear, create_translate
from pydantic import Field, model_validator
from torch import nn

from rayssl.data.genesis import CORRUPTIONS, _random_block
from rayssl.data.intensity import IntensityRule
from rayssl.methods.base import (
    ExportedBackbone,
    Method,
    MethodConfig,
    PreviewFigure,
    PreviewImage,
    PreviewScene,
    ReadRequest,
    StepInfo,
    VolumeInfo,
    box_centre,
    config_intensity_rule,
    mid_slice,
    request_box,
    with_intensity,
)
from rayssl.nn import augment
from rayssl.nn.backbones import UNET_DECODER_BLOCKS, UNET_ENCODER_BLOCKS, Backbone, global_pool, unet_key_groups, unet_levels
from rayssl.nn.spatial import (
    N_AFFINE_PARAMS,
    AffineRanges,
    affine_from_raw,
    affine_warp,
    fuse_affine_dvf,
    local_ncc_loss,
    smoothness_loss,
    warp,
)

# GVSL's activation (official code: LeakyReLU(0.2)); BasicUNet's default slope is 0.1.
_ACT = ("LeakyReLU", {"negative_slope": 0.2, "inplace": True})


class GVSLConfig(MethodConfig):
    """GVSL settings. Defaults are the paper's / official code's unless a field says otherwise."""

    # ---- views -------------------------------------------------------------------------------
    input_size: tuple[int, int, int] = (128, 128, 128)  # both images are resized to this (multiple of 16)
    crop_fraction: float = Field(1.0, gt=0.0, le=1.0)  # box = this fraction of the (margined) foreground box
    bbox_margin: float = Field(0.05, ge=0.0, le=1.0)  # margin added on each side, fraction of the bbox extent
    # auto: per volume from the manifest (CT int16 -> ct window; CT float32, scaled at conversion ->
    # none = clip to [0, 1]; other modalities -> percentiles).
    # Two readings of the paper's "clip to [0, 2048], divide by 2048" (official dataloader too):
    # stored_2048 applies it to the stored values as they are (literal: on a store of HU it keeps
    # only 0..2048 HU); ct with the default window (-1024, 1024) HU reads the paper's stored values
    # as HU + 1024, i.e. the same mapping for data stored in HU, as rayssl stores CT.
    intensity: Literal["auto", "ct", "percentile", "none", "stored_2048"] = "auto"
    ct_window: tuple[float, float] = (-1024.0, 1024.0)  # HU -> [0, 1]; = paper's [0, 2048] if stored = HU + 1024
    percentiles: tuple[float, float] = (0.5, 99.5)  # non-CT (MR) scaling to [0, 1]
    # Spatial augmentation, identical for x_A, corrupted x_A and x_B (official Train_GVSL.py values).
    spatial_aug_prob: float = Field(1.0, ge=0.0, le=1.0)
    aug_rotation: float = Field(math.pi / 9, ge=0.0, le=math.pi)  # radians, uniform ± per axis
    aug_scale: float = Field(0.25, ge=0.0, lt=1.0)  # scale factor 1 ± this per axis
    aug_translate: float = Field(0.05, ge=0.0, le=0.5)  # fraction of input_size per axis
    aug_shear: float = Field(math.pi / 18, ge=0.0, lt=math.pi / 2)  # radians; matrix entries tan(angle)
    elastic_sigma: tuple[float, float] = (10.0, 13.0)  # voxels (at 128^3)
    elastic_magnitude: tuple[float, float] = (0.0, 512.0)  # multiplier of the smoothed U(-1, 1) offsets
    # Models Genesis corruption of x_A. one_of: exactly one of in-painting, local shuffling and
    # non-linear intensity per image, drawn uniformly (the paper, Sec. 3.1.1: "one transformation
    # operation is sampled from a transformation set"); the *_prob fields below are then unused.
    # chain: shuffle (shuffle_prob) -> non-linear (nonlinear_prob) -> painting (paint_prob), the
    # official code's effective behaviour (AppearanceTransform.rand_aug).
    corruption: Literal["chain", "one_of"] = "chain"
    shuffle_prob: float = Field(0.8, ge=0.0, le=1.0)
    shuffle_blocks: int = Field(5000, ge=0)
    shuffle_block_fraction: float = Field(0.05, gt=0.0, le=0.5)  # block edge = max(2, n * this)
    nonlinear_prob: float = Field(0.9, ge=0.0, le=1.0)
    paint_prob: float = Field(1.0, ge=0.0, le=1.0)
    inpaint_prob: float = Field(1.0, ge=0.0, le=1.0)  # else out-painting
    # Where the spatial augmentation and the corruption run (issue 29). Both draw every random
    # parameter on the data actor from the sample's seed and apply one torch function
    # (rayssl.nn.augment): "actors" applies it there, on the CPU, one sample at a time; "device"
    # sends x_A, x_B and the parameters, and the training loop applies it batched on the worker's
    # device (Method.device_views) before the forward pass.
    views_on: Literal["actors", "device"] = "actors"

    # ---- model ---------------------------------------------------------------------------------
    features: tuple[int, int, int, int, int, int] = (32, 64, 128, 256, 512, 32)  # BasicUNet features
    num_groups: int = Field(4, ge=1)  # GroupNorm groups in every block
    affine: bool = True  # False = ablation "w/o affine head"
    restoration: bool = True  # False = ablation "w/o fundament"
    max_rotation: float = Field(math.pi / 9, gt=0.0, le=math.pi)
    max_translation: float = Field(0.25, gt=0.0, le=2.0)  # normalised units (1 = half the extent)
    max_scale: float = Field(0.25, gt=0.0, lt=1.0)
    max_shear: float = Field(math.pi / 18, gt=0.0, lt=math.pi / 2)

    # ---- loss ----------------------------------------------------------------------------------
    ncc_window: int = Field(9, ge=3)
    smooth_weight: float = Field(1.0, ge=0.0)
    restoration_weight: float = Field(1.0, ge=0.0)
    warmup_restoration_steps: int = Field(0, ge=0)  # first steps train the restoration term only

    @model_validator(mode="after")
    def _check(self) -> "GVSLConfig":
        if any(n < 16 or n % 16 for n in self.input_size):
            raise ValueError(f"input_size must be multiples of 16 (4 poolings), got {self.input_size}")
        if self.ncc_window % 2 == 0:
            raise ValueError(f"ncc_window must be odd, got {self.ncc_window}")
        for name in ("percentiles", "elastic_sigma", "elastic_magnitude"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {(lo, hi)}")
        if not self.ct_window[0] < self.ct_window[1]:
            raise ValueError(f"ct_window must be (low, high) HU with low < high, got {self.ct_window}")
        if self.percentiles[1] > 100.0 or self.percentiles[0] == self.percentiles[1]:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if self.elastic_sigma[0] <= 0 and self.elastic_magnitude[1] > 0:
            raise ValueError(f"elastic_sigma must be > 0, got {self.elastic_sigma}")
        g = self.num_groups
        widths = list(self.features) + [self.features[4] // 2, self.features[5] // 2]
        if any(w < 1 or w % g for w in widths):
            raise ValueError(
                f"num_groups={g} must divide every feature width and the head widths "
                f"features[4]//2, features[5]//2 (widths {widths})"
            )
        if self.warmup_restoration_steps > 0 and not self.restoration:
            raise ValueError("warmup_restoration_steps > 0 needs restoration=True "
                             "(the warm-up trains restoration only)")
        return self

    def affine_ranges(self) -> AffineRanges:
        return AffineRanges(rotation=self.max_rotation, translation=self.max_translation,
                            scale=self.max_scale, shear=self.max_shear)


# ---- model --------------------------------------------------------------------------------------


class GVSLUNet(nn.Module, Backbone):
    """MONAI BasicUNet without its final 1x1 conv, returning (global, local) features.

    global = bottleneck (`down_4` output), local = last decoder level (`upcat_1` output, full
    resolution), as GVSL's 3D U-Net (He et al. 2023, supplementary Fig. 12 a). Blocks keep
    BasicUNet's names, so `state_dict()` loads into `BasicUNet(**network_kwargs)` (strict=False;
    only `final_conv` is missing).
    """

    BLOCKS = UNET_ENCODER_BLOCKS + UNET_DECODER_BLOCKS

    def __init__(self, in_channels: int = 1, features: Sequence[int] = (32, 64, 128, 256, 512, 32),
                 num_groups: int = 4) -> None:
        super().__init__()
        self.network_kwargs: dict[str, Any] = dict(
            spatial_dims=3, in_channels=in_channels, out_channels=1, features=tuple(features),
            norm=("group", {"num_groups": num_groups}), act=_ACT,
        )
        full = BasicUNet(**self.network_kwargs)
        for name in self.BLOCKS:
            setattr(self, name, getattr(full, name))
        self.global_channels = int(features[4])
        self.local_channels = int(features[5])
        self.out_channels = self.global_channels

    def feature_levels(self, x: torch.Tensor, loc: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The five encoder levels and the last decoder level (`upcat_1`), shallow to deep."""
        return unet_levels(self, x, decoder=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = self.feature_levels(x)
        return levels[4], levels[5]

    def network(self) -> str:
        return "monai.networks.nets.BasicUNet"

    def key_groups(self) -> dict[str, list[str]]:
        return unet_key_groups(decoder=True)


def _norm(num_groups: int) -> tuple:
    return ("group", {"num_groups": num_groups})


class AffineHead(nn.Module):
    """Z-matching affine head (Sec. 3.2.1): concatenated global features -> 15 raw affine values.

    Two conv groups, global average pooling, one linear layer of 15 outputs (the paper's four
    linear layers of 3, 3, 3 and 6 outputs, as one). The linear layer starts small so the first
    predictions are near the identity transform while every weight still receives a gradient.
    """

    def __init__(self, in_channels: int, hidden: int, num_groups: int) -> None:
        super().__init__()
        self.convs = TwoConv(3, in_channels, hidden, _ACT, _norm(num_groups), True)
        self.linear = nn.Linear(hidden, N_AFFINE_PARAMS)
        nn.init.normal_(self.linear.weight, std=1e-3)
        nn.init.zeros_(self.linear.bias)

    def forward(self, moving_global: torch.Tensor, fixed_global: torch.Tensor) -> torch.Tensor:
        return self.linear(global_pool(self.convs(torch.cat([moving_global, fixed_global], dim=1))))


class DeformableHead(nn.Module):
    """Z-matching deformable head (Sec. 3.2.2): concatenated local features -> DVF in voxels.

    Two conv groups and a 3x3x3 convolution to 3 channels; the output convolution starts at
    N(0, 1e-5) (as VoxelMorph's flow layer) so the first fields are near zero.
    """

    def __init__(self, in_channels: int, hidden: int, num_groups: int) -> None:
        super().__init__()
        self.convs = TwoConv(3, in_channels, hidden, _ACT, _norm(num_groups), True)
        self.flow = nn.Conv3d(hidden, 3, kernel_size=3, padding=1)
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, moving_local: torch.Tensor, fixed_local: torch.Tensor) -> torch.Tensor:
        return self.flow(self.convs(torch.cat([moving_local, fixed_local], dim=1)))


class RestorationHead(nn.Module):
    """Self-restoration head (Sec. 3.3): one conv group and a 1x1x1 convolution to the image."""

    def __init__(self, in_channels: int, hidden: int, num_groups: int) -> None:
        super().__init__()
        self.conv = Convolution(3, in_channels, hidden, kernel_size=3, act=_ACT, norm=_norm(num_groups))
        self.out = nn.Conv3d(hidden, 1, kernel_size=1)

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(local))


class GVSLModel(nn.Module):
    """Backbone + Z-matching head (+ restoration head); one forward computes every output.

    As in the official code, x_B is the moving image and x_A the fixed one: the backbone sees the
    corrupted x_A and the clean x_B, the heads predict a transform that warps x_B onto x_A, and
    the loss compares the warped x_B with the clean x_A.
    """

    def __init__(self, config: GVSLConfig) -> None:
        super().__init__()
        f, g = config.features, config.num_groups
        self.unet = GVSLUNet(1, f, g)
        self.ranges = config.affine_ranges()
        self.affine_head = AffineHead(2 * f[4], f[4] // 2, g) if config.affine else None
        self.deformable_head = DeformableHead(2 * f[5], f[5] // 2, g)
        self.restoration_head = RestorationHead(f[5], f[5] // 2, g) if config.restoration else None

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fixed_input, moving = batch["image_a_corrupted"], batch["image_b"]
        n = fixed_input.shape[0]
        # One backbone pass over both images (GroupNorm is per sample, so this equals two passes).
        global_features, local_features = self.unet(torch.cat([fixed_input, moving], dim=0))
        global_a, global_b = global_features[:n], global_features[n:]
        local_a, local_b = local_features[:n], local_features[n:]
        # Detached: representation-health metrics only, no gradient path.
        outputs: dict[str, torch.Tensor] = {"embedding": global_features.detach().mean(dim=(2, 3, 4))}
        matrix = None
        if self.affine_head is not None:
            matrix = affine_from_raw(self.affine_head(global_b, global_a), self.ranges)
            local_b = affine_warp(local_b, matrix)  # globally align B's local features to A's grid
            outputs["affine_matrix"] = matrix
        flow = self.deformable_head(local_b, local_a)
        outputs["flow"] = flow
        outputs["warped"] = warp(moving, fuse_affine_dvf(matrix, flow))
        if self.restoration_head is not None:
            outputs["restored"] = self.restoration_head(local_a)
        return outputs


# ---- views helpers -------------------------------------------------------------------------------


def _resize(volume: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize a 3D volume: area averaging on shrinking axes (no aliasing), then trilinear."""
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None]
    shrunk = tuple(min(a, b) for a, b in zip(volume.shape, size))
    if shrunk != tuple(volume.shape):
        x = Resize(shrunk, mode="area")(x)
    if shrunk != tuple(size):
        x = Resize(tuple(size), mode="trilinear", align_corners=False)(x)
    return np.asarray(torch.as_tensor(x)[0], dtype=np.float32)


def _pair_box(info: VolumeInfo, fraction: float, margin: float, position: np.ndarray) -> ReadRequest:
    """Box of `fraction` of the volume's margined foreground box, at relative `position` in [0, 1]^3."""
    bbox = np.array(info.bbox, dtype=np.int64)
    lo, hi = bbox[:3], bbox[3:]
    if (hi <= lo).any():  # empty foreground box: use the whole volume
        lo, hi = np.zeros(3, dtype=np.int64), np.array(info.shape, dtype=np.int64)
    extent = hi - lo
    pad = np.ceil(extent * margin).astype(np.int64)
    lo, extent = lo - pad, extent + 2 * pad
    size = np.maximum(1, np.round(extent * fraction)).astype(np.int64)
    start = lo + np.floor((extent - size) * position).astype(np.int64)
    return ReadRequest(volume=info.index, start=tuple(int(v) for v in start), size=tuple(int(v) for v in size))


_MAX_PAINT_BOXES = 30  # Models Genesis in-painting: at most 30 boxes (out-painting keeps at most 5)


def _box_row(box: tuple[slice, slice, slice]) -> np.ndarray:
    """(start, size) per axis of a box of slices, as one row of `aug_paint_boxes`."""
    return np.array([s.start for s in box] + [s.stop - s.start for s in box], dtype=np.int32)


def elastic_settings(edge: int) -> dict[str, tuple[float, float]]:
    """Elastic sigma/magnitude for `edge`-voxel inputs giving the official 128^3 deformation, scaled.

    The official values (sigma 10-13, magnitude 0-512) are for 128-voxel edges. Smoothing U(-1, 1)
    noise with a 3D Gaussian of width sigma leaves a standard deviation ∝ sigma^-1.5, so keeping
    the displacement the same fraction of the image needs sigma ∝ s and magnitude ∝ s^2.5, s = edge/128.
    """
    s = edge / 128.0
    return {"elastic_sigma": (10.0 * s, 13.0 * s), "elastic_magnitude": (0.0, round(512.0 * s**2.5, 2))}


def _corruption_text(c: GVSLConfig) -> str:
    """The corruption of x_A as `rayssl recipe` prints it."""
    if c.corruption == "one_of":
        return "one_of: in-painting, local shuffling or non-linear, 1/3 each"
    paint = (f"in-painting p {c.paint_prob:g}" if c.inpaint_prob == 1.0 else
             f"painting p {c.paint_prob:g} (in-painting {c.inpaint_prob:g}, else out-painting)")
    return f"chain: local shuffling p {c.shuffle_prob:g} -> non-linear p {c.nonlinear_prob:g} -> {paint}"


# ---- method ---------------------------------------------------------------------------------------


class GVSL(Method):
    """GVSL (He et al., CVPR 2023): Z-matching registration of two different volumes + self-restoration.

    Loss (Sec. 3.1-3.3): L = L_NCC(warp(x_B), x_A) + w_smooth · L_smooth(u) + w_res · MSE(R(f_A), x_A),
    where u is the deformable part of the transform (the official code's `L_smooth(flow_BA)`; the
    paper's Eq. 2 names the fused DVF of Appendix D.3, Eq. 15). For the first `warmup_restoration_steps`
    optimizer steps only the restoration term counts (the registration terms are multiplied by 0,
    so every parameter still gets a gradient and DDP needs no unused-parameter search). The step
    count comes from `after_step(step=...)` (steps completed), is checkpointed in `state_dict`,
    and `set_step` sets it for loops that do not call `after_step`.
    """

    name: ClassVar[str] = "gvsl"
    config_cls: ClassVar[type[MethodConfig]] = GVSLConfig
    # The optimizer recipe is in each profile's "train" section; docs/methods/gvsl.md has the table
    # of sources that tests/test_profiles.py holds against `rayssl recipe`.
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        # 2 cores: 48^3 inputs, narrow U-Net; elastic deformation scaled from the 128^3 values. CT
        # intensity by the HU + 1024 reading (auto), which keeps lung and fat on rayssl's HU stores.
        # Corruption: the official chain, kept because the cpu profile's measured gain
        # (benchmarks/README.md) was with it; the paper's one-per-image is --set gvsl.corruption=one_of.
        "cpu": {"input_size": (48, 48, 48), "features": (8, 16, 32, 64, 128, 16), "num_groups": 4,
                "intensity": "auto", "corruption": "chain", **elastic_settings(48),
                "train": {"optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0, "schedule": "cosine",
                          "warmup_steps": 5, "final_lr_fraction": 0.0, "batch_size": 2, "accumulate": 1,
                          "steps": 40, "grad_clip": 1.0, "amp": True}},
        # Paper: Adam (Sec. 4.1 "Implementation"; its lr 1e-4 and 2 x 10^5 iterations are read from the
        # PDF: the numbers are lost in the text copy), batch 2 and GroupNorm (Appendix D.2),
        # [0, 2048] / 2048 (Appendix E.1), one corruption per image (Sec. 3.1.1). Not stated, official
        # code's value: constant LR (no scheduler), no warm-up, fp32, no clipping, elastic deformation.
        "paper": {"input_size": (128, 128, 128), "features": (32, 64, 128, 256, 512, 32), "num_groups": 4,
                  "intensity": "stored_2048", "corruption": "one_of", **elastic_settings(128),
                  "views_on": "device",  # augmentation on the GPU (issue 29; actors: 4 CPU-s per sample)
                  "train": {"optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0, "schedule": "constant",
                            "warmup_steps": 0, "final_lr_fraction": 0.0, "batch_size": 2, "accumulate": 1,
                            "steps": 200_000, "grad_clip": None, "amp": False}},
        # Official PyTorch/Train_GVSL.py: Adam(lr 1e-4) with no scheduler, batch_size 1, 1000 epochs
        # x 200 iterations, fp32, no clipping; dataloader_heart_self_train.py clips to [0, 2048] / 2048;
        # utils/Transform_self.py AppearanceTransform.rand_aug chains the corruptions.
        "official": {"input_size": (128, 128, 128), "features": (32, 64, 128, 256, 512, 32), "num_groups": 4,
                     "intensity": "stored_2048", "corruption": "chain", **elastic_settings(128),
                     "views_on": "device",
                     "train": {"optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0, "schedule": "constant",
                               "warmup_steps": 0, "final_lr_fraction": 0.0, "batch_size": 1, "accumulate": 1,
                               "steps": 200_000, "grad_clip": None, "amp": False}},
    }

    def __init__(self, config: GVSLConfig) -> None:
        super().__init__(config)
        self.config: GVSLConfig = config
        self.steps_done = 0  # optimizer steps taken (drives the restoration warm-up)

    # ---- CPU side -------------------------------------------------------------------------
    def check_volumes(self, volumes: Sequence[VolumeInfo]) -> None:
        if len(volumes) < 2:
            raise ValueError(
                f"GVSL registers pairs of different volumes and needs at least 2 volumes, got {len(volumes)}"
            )

    def plan(self, volumes: Sequence[VolumeInfo], index: int, rng: np.random.Generator,
             step: StepInfo | None = None) -> list[ReadRequest]:
        """x_A = volume `index`, x_B = another volume drawn uniformly; both boxes at the same relative position."""
        self.check_volumes(volumes)
        other = int(rng.integers(0, len(volumes) - 1))
        other += int(other >= index)
        position = rng.random(3)
        cfg = self.config
        boxes = [_pair_box(volumes[i], cfg.crop_fraction, cfg.bbox_margin, position) for i in (index, other)]
        return with_intensity(boxes, volumes, self.intensity_rule())

    def intensity_rule(self) -> IntensityRule:
        """`intensity` as a rule: "stored_2048" (paper, official code: stored values clipped to [0, 2048]
        / 2048, on rayssl's HU stores the HU window [0, 2048]), "none" (stored values clipped to [0, 1]),
        else the config's HU window or percentiles."""
        cfg = self.config
        if cfg.intensity == "stored_2048":
            return IntensityRule("hu_window", hu_window=(0.0, 2048.0), percentiles=tuple(cfg.percentiles))
        if cfg.intensity == "none":
            return IntensityRule("fixed", fixed_range=(0.0, 1.0))
        return config_intensity_rule(cfg)

    def views(self, crops: list[np.ndarray], requests: list[ReadRequest],
              rng: np.random.Generator) -> dict[str, np.ndarray]:
        """image_a (clean x_A), image_a_corrupted (Models Genesis), image_b: each [1, *input_size] in [0, 1].

        With `views_on: device` the sample is image_a and image_b before augmentation plus the
        augmentation's parameters (`draw_augmentation`); `device_views` finishes it on the device."""
        cfg = self.config
        if len(crops) != 2:
            raise ValueError(f"GVSL views need 2 crops (x_A, x_B), got {len(crops)}")
        a, b = (_resize(self.request_intensity(request).apply(crop), cfg.input_size)
                for crop, request in zip(crops, requests))
        sample = {"image_a": a[None], "image_b": b[None], **self.draw_augmentation(rng)}
        return self.views_for(sample)

    def _shuffle_block(self) -> tuple[int, int, int]:
        cfg = self.config
        return tuple(max(2, int(n * cfg.shuffle_block_fraction)) for n in cfg.input_size)  # type: ignore[return-value]

    def _elastic_tail(self) -> int:
        """Kernel half-width of the elastic smoothing: MONAI's int(3 sigma + 0.5) at the largest sigma."""
        return int(max(self.config.elastic_sigma[1] * 3.0, 0.5) + 0.5)

    def draw_augmentation(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One sample's random augmentation parameters, fixed-size arrays (they travel in the batch).

        The draws follow the reference implementations' distributions: Models Genesis (rayssl.data.genesis:
        one_of / chain, in-painting boxes while U < 0.95 up to 30, out-painting 1 + up to 4 boxes, 
        `shuffle_blocks` block starts, two Bezier control points) and MONAI's Rand3DElastic / RandAffine
        (rotation, shear, translation, scale per axis, composed as MONAI's AffineGrid; sigma and
        magnitude uniform in their ranges). Dense noise is drawn on the device from three seeds.
        """
        cfg = self.config
        shape = tuple(int(n) for n in cfg.input_size)
        block = self._shuffle_block()
        if cfg.corruption == "one_of":
            kind = CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))]
            shuffle, nonlinear, paint_mode = kind == "local_shuffling", kind == "nonlinear", int(kind == "in_painting")
        else:
            shuffle = bool(rng.random() < cfg.shuffle_prob)
            nonlinear = bool(rng.random() < cfg.nonlinear_prob)
            paint_mode = 0
            if rng.random() < cfg.paint_prob:
                paint_mode = 1 if rng.random() < cfg.inpaint_prob else 2
        starts = np.zeros((cfg.shuffle_blocks, 3), dtype=np.int32)
        if shuffle:
            starts = np.stack([rng.integers(0, n - e + 1, size=cfg.shuffle_blocks) for n, e in zip(shape, block)],
                              axis=1).astype(np.int32)
        bezier = rng.random(4).astype(np.float32) if nonlinear else np.zeros(4, dtype=np.float32)
        boxes = np.zeros((_MAX_PAINT_BOXES, 6), dtype=np.int32)
        count = 0
        if paint_mode == 1:  # genesis.in_painting: up to 30 boxes, each while U < 0.95
            low, high = [n // 10 for n in shape], [n // 5 for n in shape]
            while count < _MAX_PAINT_BOXES and rng.random() < 0.95:
                boxes[count] = _box_row(_random_block(shape, rng, low, high, 3))
                count += 1
        elif paint_mode == 2:  # genesis.out_painting: one box kept, then up to 4 more while U < 0.95
            low, high = [n - 4 * n // 7 + 1 for n in shape], [n - 3 * n // 7 + 1 for n in shape]
            while count < 5 and (count == 0 or rng.random() < 0.95):
                boxes[count] = _box_row(_random_block(shape, rng, low, high, 3))
                count += 1
        affine, sigma, magnitude = np.eye(4), float(cfg.elastic_sigma[0]), 0.0
        if rng.random() < cfg.spatial_aug_prob:
            rotate = rng.uniform(-cfg.aug_rotation, cfg.aug_rotation, 3)
            shear = rng.uniform(-math.tan(cfg.aug_shear), math.tan(cfg.aug_shear), 6)
            translate = np.array([rng.uniform(-cfg.aug_translate * n, cfg.aug_translate * n) for n in shape])
            scale = 1.0 + rng.uniform(-cfg.aug_scale, cfg.aug_scale, 3)
            affine = (create_rotate(3, list(rotate)) @ create_shear(3, list(shear))
                      @ create_translate(3, list(translate)) @ create_scale(3, list(scale)))
            sigma = float(rng.uniform(*cfg.elastic_sigma))
            magnitude = float(rng.uniform(*cfg.elastic_magnitude))
        return {
            "aug_flags": np.array([shuffle, nonlinear, paint_mode, count], dtype=np.int64),
            "aug_seeds": rng.integers(0, 2**62, size=3, dtype=np.int64),  # elastic noise, permutations, paint noise
            "aug_shuffle_starts": starts, "aug_bezier": bezier, "aug_paint_boxes": boxes,
            "aug_affine": np.asarray(affine, dtype=np.float32),
            "aug_elastic": np.array([sigma, magnitude], dtype=np.float32),
        }

    def apply_augmentation(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The augmentation of a batch of image_a, image_b [B, 1, *input_size] and the parameters of
        `draw_augmentation` (stacked, on one device): the Models Genesis corruption of x_A, then one
        elastic + affine warp of x_A, corrupted x_A and x_B alike (the official order), clipped to
        [0, 1]. Returns the batch's other entries and the three images; the parameters are dropped."""
        cfg = self.config
        a, b = batch["image_a"].float(), batch["image_b"].float()
        flags, seeds = batch["aug_flags"].to(a.device), batch["aug_seeds"].to(a.device)
        corrupted = augment.local_shuffle(a[:, 0], flags[:, 0], batch["aug_shuffle_starts"], self._shuffle_block(),
                                          seeds[:, 1])
        corrupted = augment.nonlinear_intensity(corrupted, flags[:, 1], batch["aug_bezier"])
        corrupted = augment.paint(corrupted, flags[:, 2], batch["aug_paint_boxes"], flags[:, 3], seeds[:, 2])
        elastic = batch["aug_elastic"].to(a.device)
        dvf = augment.elastic_affine_dvf(a.shape[2:], batch["aug_affine"].to(a.device), elastic[:, 0], elastic[:, 1],
                                         seeds[:, 0], self._elastic_tail())
        stacked = augment.warp_stack(torch.cat([a, corrupted[:, None], b], dim=1), dvf).clamp(0.0, 1.0)
        rest = {k: v for k, v in batch.items() if not k.startswith("aug_") and k not in ("image_a", "image_b")}
        return {**rest, "image_a": stacked[:, 0:1], "image_a_corrupted": stacked[:, 1:2], "image_b": stacked[:, 2:3]}

    def preview_geometry(self, volumes: Sequence[VolumeInfo], requests: list[ReadRequest],
                         views: dict[str, np.ndarray], model: nn.Module | None = None) -> PreviewFigure:
        """The pair's boxes on both volumes; x_A, its Models Genesis corruption, x_B, and x_B warped
        onto x_A by `model` (a freshly initialised GVSLModel when none is given)."""
        cfg = self.config
        views = self.finish_views(views)
        a, b = (volumes[r.volume] for r in requests)
        scenes = [PreviewScene(r.volume, f"{name}: volume {v.id}, box read (same relative position "
                               f"in its foreground box{', whole box' if cfg.crop_fraction == 1 else ''})",
                               box_centre(r.start, r.size), [request_box(r, group)], planes=("axial", "coronal"))
                  for name, group, v, r in (("x_A (fixed)", "box of x_A", a, requests[0]),
                                            ("x_B (moving)", "box of x_B", b, requests[1]))]
        trained = model is not None
        if model is None:
            torch.manual_seed(0)
            model = self.build_model()
        model.eval()
        batch = {k: torch.from_numpy(np.array(views[k], dtype=np.float32))[None]
                 for k in ("image_a", "image_a_corrupted", "image_b")}
        with torch.no_grad():
            outputs = model(batch)
        warped = outputs["warped"][0].numpy()
        flow = outputs["flow"][0].numpy()
        ncc = lambda x, y: float(np.corrcoef(x.ravel(), y.ravel())[0, 1])  # noqa: E731 - global NCC, for the title
        a_img, b_img = views["image_a"], views["image_b"]
        who = "the given model" if trained else "a freshly initialised model (untrained: near identity)"
        unit = (0.0, 1.0)  # every view is in [0, 1]: one grey scale for all, so they compare
        images = [PreviewImage("x_A (fixed)\nafter the shared spatial augmentation", mid_slice(a_img), unit),
                  PreviewImage("x_A corrupted (Models Genesis)\nbackbone input; restoration target: x_A",
                               mid_slice(views["image_a_corrupted"]), unit),
                  PreviewImage(f"x_B (moving), same spatial augmentation\nNCC(x_B, x_A) = {ncc(b_img, a_img):.3f}",
                               mid_slice(b_img), unit),
                  PreviewImage(f"x_B warped onto x_A by\n{who}\nNCC(warped, x_A) = {ncc(warped, a_img):.3f}, "
                               f"max |DVF| = {np.abs(flow).max():.2f} voxels", mid_slice(warped), unit)]
        notes = ["Images: middle axial slice of each view ({} voxels after resize). The loss: NCC(warped x_B, x_A) + "
                 "smoothness of the DVF + restoration of x_A from its corruption.".format("x".join(map(str, cfg.input_size)))]
        facts = {"pair": [a.id, b.id], "boxes": [{"start": list(r.start), "size": list(r.size)} for r in requests],
                 "model": "given" if trained else "fresh", "max_abs_flow_voxels": float(np.abs(flow).max())}
        return PreviewFigure("GVSL: a pair of different volumes, the corrupted input and the warped moving image",
                             scenes, images, notes, facts)

    # ---- model side -----------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return GVSLModel(self.config)

    @property
    def in_restoration_warmup(self) -> bool:
        return self.steps_done < self.config.warmup_restoration_steps

    def set_step(self, step: int) -> None:
        """Number of optimizer steps already taken (for loops that track the step themselves)."""
        self.steps_done = int(step)

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """L = L_NCC + w_smooth · L_smooth + w_res · L_MSE (He et al. 2023, Eq. 1, Eq. 2, Sec. 3.3).

        L_NCC = 1 - local NCC(warped x_B, clean x_A) over ncc_window^3 windows; L_smooth = mean
        squared spatial gradient of the deformable DVF (the affine part is not penalised, as in
        the official code); L_MSE = mean squared error of the restored x_A against the clean x_A.
        """
        cfg = self.config
        target = batch["image_a"]
        ncc = local_ncc_loss(outputs["warped"], target, window=cfg.ncc_window)
        smooth = smoothness_loss(outputs["flow"])
        registration_weight = 0.0 if self.in_restoration_warmup else 1.0
        total = registration_weight * (ncc + cfg.smooth_weight * smooth)
        terms = {"ncc": ncc.detach(), "smooth": smooth.detach()}
        if cfg.restoration:
            restoration = F.mse_loss(outputs["restored"], target)
            total = total + cfg.restoration_weight * restoration
            terms["restoration"] = restoration.detach()
        return {"loss": total, **terms}

    def after_step(self, model: nn.Module, outputs: dict[str, torch.Tensor], step: int,
                   total_steps: int) -> dict[str, float]:
        """`step` = optimizer steps completed so far (the loop calls this after incrementing it)."""
        warmup = self.in_restoration_warmup  # the step just taken
        self.steps_done = int(step)
        return {"restoration_warmup": float(warmup)}

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": torch.tensor(self.steps_done, dtype=torch.long)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])

    # ---- export ---------------------------------------------------------------------------
    def embeddings(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Spatially averaged bottleneck features of both images of every pair."""
        return outputs["embedding"]

    def backbone(self, model: nn.Module) -> nn.Module:
        return model.unet

    def export(self, model: nn.Module) -> ExportedBackbone:
        unet: GVSLUNet = self.backbone(model)  # type: ignore[assignment]
        return ExportedBackbone.of(
            unet,
            notes=("Whole BasicUNet except final_conv (GVSL pretrains encoder and decoder). Global features = "
                   "down_4 output, local features = upcat_1 output. Inputs were intensities in [0, 1]."),
        )

    def recipe(self) -> dict[str, str]:
        c = self.config
        return {
            "network": f"BasicUNet {tuple(c.features)}, GroupNorm {c.num_groups}",
            "input size": "x".join(str(v) for v in c.input_size),
            "intensity": c.intensity,
            "corruption of x_A": _corruption_text(c),
            "loss form": (f"NCC (window {c.ncc_window}) + {c.smooth_weight:g} smooth + "
                          f"{c.restoration_weight:g} restoration"),
        }

    def card(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "corruption": _corruption_text(cfg),
            "paper": "He et al. Geometric Visual Similarity Learning (GVSL), CVPR 2023",
            "pretraining_input_size": list(cfg.input_size),
            "recommended_downstream_input_size": list(cfg.input_size),
            "intensity": {"mode": cfg.intensity, **self.intensity_rule().as_dict()},
            "input_resampling": "foreground box resized to input_size (not isotropic)",
            "network": "monai.networks.nets.BasicUNet",
            "features": list(cfg.features),
            "norm": f"group ({cfg.num_groups} groups)",
            "heads": {"affine": cfg.affine, "restoration": cfg.restoration},
        }

    def heldout_reference(self, model: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                          outputs: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
        """The loss of the identity prediction on the held-out loss's batches: no warp (warped = the
        moving image, zero flow) and restored = the corrupted input, weighted as `loss` weights its
        terms now. Below it, the network registers and restores better than doing nothing; it needs
        no forward, and it is constant across steps (the samples are fixed) except where the
        restoration warm-up changes the weights."""
        totals: dict[str, float] = {}
        batches = batches[:len(outputs)]
        for batch in batches:
            moving = batch["image_b"].float()
            identity = {"warped": moving, "flow": moving.new_zeros((moving.shape[0], 3, *moving.shape[2:])),
                        "restored": batch["image_a_corrupted"].float()}
            clean = {**batch, "image_a": batch["image_a"].float()}
            for key, value in self.loss(identity, clean).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        return {("identity" if key == "loss" else f"identity_{key}"): value / len(batches)
                for key, value in totals.items()} if batches else {}


METHOD = GVSL
