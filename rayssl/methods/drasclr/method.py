"""DrasCLR (Yu et al., MedIA 2024): anatomy-conditioned MoCo on atlas landmarks of lung CT, Loc-CondConv encoder."""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from rayssl.data.intensity import IntensityRule
from rayssl.data.jobs import JobRunner, run_in_process
from rayssl.methods.base import (
    ExportedBackbone,
    Method,
    MethodConfig,
    PreviewBox,
    PreviewFigure,
    PreviewImage,
    PreviewPoint,
    PreviewScene,
    ReadRequest,
    StepInfo,
    VolumeInfo,
    mid_slice,
    other_rows,
    request_box,
    with_intensity,
)
from rayssl.nn import augment
from rayssl.nn.backbones import Backbone
from rayssl.nn.condconv import LocCondConv3d
from rayssl.nn.contrastive import info_nce
from rayssl.nn.dist import gather_concat, is_distributed
from rayssl.nn.heads import mlp
from rayssl.nn.losses.neighbor_info_nce import neighbor_info_nce
from rayssl.nn.momentum import make_momentum_copy, momentum_update
from rayssl.nn.norm import GROUPS as NORM_GROUPS, ConvNorm, RunningCentre, conv_norm, conv_norm_text
from rayssl.nn.queue import KeyedMemoryQueues, NamedQueues

# Keys of VolumeInfo.extra written by `DrasCLR.prepare` (small numpy arrays, see datasets_zarr.landmarks).
EXTRA_POSITIONS = "drasclr_landmarks"  # [L, 3] float32: landmark centres in this subject's voxel grid
EXTRA_NEIGHBORS = "drasclr_neighbors"  # [L, k] int64: k nearest landmarks of each landmark (atlas space)
EXTRA_ATLAS_COORDS = "drasclr_atlas_coords"  # [L, 3] float32: landmark centres in the atlas, scaled to [-1, 1]

CT_WINDOW = (-1024.0, 240.0)  # the paper's HU window
# The paper's mapping: HU [-1024, 240] -> [-1, 1]; data not stored in HU by 0.5-99.5 percentiles of each patch.
DRASCLR_INTENSITY = IntensityRule("hu_window", hu_window=CT_WINDOW, percentiles=(0.5, 99.5), out_range=(-1.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


class DrasCLRConfig(MethodConfig):
    """DrasCLR settings. Defaults follow the official code (batmanlab/DrasCLR, run_train.sh)."""

    # Anatomy (datasets_zarr.lungmask / register / landmarks, run by `prepare`).
    mask: Literal["lung", "foreground"] = Field(
        "lung", description="region the landmarks cover: the lung mask (CT) or the body/head outline"
    )
    atlas: str | None = Field(
        None, description="volume id of the atlas; None = first volume with a plausible lung mask"
    )
    patch_size: int = Field(32, ge=8, le=256, description="landmark patch edge in voxels (paper: 32)")
    landmark_step: int = Field(26, ge=1, description="grid step between landmark patches in the atlas (official: 26)")
    landmark_min_fraction: float = Field(
        0.1,
        gt=0.0,
        le=1.0,
        description="a grid patch becomes a landmark when more than this fraction lies in the atlas mask",
    )
    n_neighbors: int = Field(2, ge=1, le=26, description="neighbouring landmarks per sample (paper: 2)")
    landmark_sampling: Literal["per_batch", "per_sample"] = Field(
        "per_batch", description="per_batch: every sample of an optimizer step, on every rank, shares one landmark, "
        "kept for landmark_hold_steps steps (official: one landmark at a time); per_sample: each sample draws its own")
    landmark_hold_steps: int | None = Field(
        None, ge=1, description="per_batch: consecutive optimizer steps on one landmark before the next; None = "
        "one pass over the volumes, ceil(volumes / effective batch) (the official sub-epoch)")
    spacing_mm: float | None = Field(
        None, gt=0.0, description="voxel size every volume must have (paper: 1 mm isotropic), so a patch covers "
        "the same tissue everywhere; None = any spacing, but one shared by all volumes")
    # Views (official: augmentation 'agc' = RandAffine, RandGaussianNoise, RandAdjustContrast).
    affine_translate: float = Field(
        0.375, ge=0.0, le=1.0, description="max translation as a fraction of the patch (official: 12/32)"
    )
    affine_rotate_deg: float = Field(
        10.0, ge=0.0, le=180.0, description="max rotation per axis in degrees (official: pi/18)"
    )
    affine_scale: float = Field(0.1, ge=0.0, lt=1.0, description="max relative scaling per axis")
    noise_prob: float = Field(0.25, ge=0.0, le=1.0)
    noise_std: float = Field(50.0, ge=0.0, description="Gaussian noise std in HU (MONAI samples std in [0, noise_std])")
    contrast_prob: float = Field(0.25, ge=0.0, le=1.0)
    contrast_gamma: tuple[float, float] = Field((0.5, 4.5), description="gamma range of RandAdjustContrast")
    # Where the three augmentations run (issue 29). The data actor draws every parameter from the sample's
    # seed as MONAI's RandAffine (rotate/translate/scale ranges above, AffineGrid's composition, bilinear,
    # border padding), RandGaussianNoise (std uniform in [0, noise_std]) and RandAdjustContrast would, and
    # one torch function applies them (rayssl.nn.augment): "actors" applies it there, one sample at a
    # time; "device" sends the patches and the parameters, and the training loop applies it batched on
    # the worker's device (Method.device_views) before the forward pass.
    views_on: Literal["actors", "device"] = Field(
        "actors", description="where the augmentations run: actors (data actor CPU) or device (training loop)")
    # Encoder (official cnn3d.Encoder: widths 8-16-32-64-128, rep 128, 8 experts).
    widths: tuple[int, int, int, int, int] = Field(
        (8, 16, 32, 64, 128), description="channels of stem, 3 blocks, last conv"
    )
    rep_dim: int = Field(128, ge=1, description="representation size (encoder output)")
    proj_dim: int = Field(128, ge=1, description="MoCo embedding size (projection head output)")
    num_experts: int = Field(8, ge=1, le=64, description="experts per Loc-CondConv layer")
    norm: ConvNorm = Field("batch", description="norm after every Loc-CondConv: batch (official) needs a large "
                           "batch; group / layer / instance do not depend on the batch (docs/methods/drasclr.md)")
    centre_projection: bool = Field(False, description="subtract a running mean from the projection head's output "
                                    "(rayssl.nn.norm.RunningCentre): keeps embeddings apart without BatchNorm")
    # MoCo with a conditional memory bank.
    momentum: float = Field(0.999, ge=0.0, le=1.0, description="key-encoder EMA momentum")
    temperature: float = Field(0.2, gt=0.0, description="InfoNCE temperature")
    queue_size: int = Field(4096, ge=1, description="negatives per landmark queue (K)")
    queue_dtype: Literal["float16", "float32"] = Field(
        "float16", description="storage of the memory bank; float16 halves it (4096 x 128 x 581 landmarks = 0.61 GB)"
    )
    neighbor_weight: float = Field(
        1.0, ge=0.0, description="beta: weight of L_neighbor in L = L_local + beta L_neighbor (paper Eq. 9; "
        "beta = 1 is the official value)"
    )
    shuffle_bn: bool = Field(True, description="shuffle keys across DDP ranks for the key encoder's BatchNorm (MoCo)")

    @field_validator("contrast_gamma")
    @classmethod
    def _gamma_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"contrast_gamma must satisfy 0 < low <= high, got {value}")
        return value

    @field_validator("widths")
    @classmethod
    def _positive_widths(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if min(value) < 1:
            raise ValueError(f"widths must be positive, got {value}")
        return value

    @field_validator("patch_size")
    @classmethod
    def _patch_even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"patch_size must be even (the landmark sits at the patch centre), got {value}")
        return value

    @model_validator(mode="after")
    def _widths_fit_the_norm(self) -> "DrasCLRConfig":
        # Found here, before Ray starts, instead of when a worker builds the encoder.
        if self.norm == "group" and any(w % NORM_GROUPS for w in self.widths):
            raise ValueError(f"widths {list(self.widths)}: norm 'group' is GroupNorm({NORM_GROUPS}), which needs every "
                             f"width divisible by {NORM_GROUPS}; change the widths or set drasclr.norm=layer")
        return self


# ---------------------------------------------------------------------------------------------
# Encoder (official models/cnn3d.py, with batched Loc-CondConv)
# ---------------------------------------------------------------------------------------------


class _ConvBlock(nn.Module):
    """Loc-CondConv -> norm (BatchNorm in the official code) -> ELU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, num_experts: int, coord_dim: int,
                 norm: ConvNorm = "batch") -> None:
        super().__init__()
        self.conv = LocCondConv3d(
            in_channels,
            out_channels,
            kernel_size=3,
            stride=stride,
            padding=1,
            num_experts=num_experts,
            coord_dim=coord_dim,
        )
        self.bn = conv_norm(norm, out_channels, 3)  # `bn` for any norm: the official key names
        self.act = nn.ELU(inplace=True)

    def forward(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x, loc)))


class _DownBlock(nn.Module):
    """Two stride-1 conv blocks and a stride-2 conv block (the official `Block`)."""

    def __init__(self, in_channels: int, out_channels: int, num_experts: int, coord_dim: int,
                 norm: ConvNorm = "batch") -> None:
        super().__init__()
        self.conv1 = _ConvBlock(in_channels, out_channels, 1, num_experts, coord_dim, norm)
        self.conv2 = _ConvBlock(out_channels, out_channels, 1, num_experts, coord_dim, norm)
        self.conv3 = _ConvBlock(out_channels, out_channels, 2, num_experts, coord_dim, norm)

    def forward(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x, loc), loc), loc)


class DrasCLREncoder(nn.Module, Backbone):
    """The DrasCLR patch encoder: 13 Loc-CondConv layers, each with a norm (`norm`; official: BatchNorm)
    and ELU; 5 stride-2 stages.

    Layout of the official `cnn3d.Encoder`: stem (conv w0 s1, conv w0 s2), three down blocks
    (w1, w2, w3), conv w4 s1, conv rep_dim s2, then global average pooling (equal to the official
    flatten for 32^3 patches, whose last map is 1^3). Every convolution takes the patch's atlas
    coordinate `loc` ([B, 3], scaled to [-1, 1]) to mix its expert kernels.

    There is no MONAI equivalent (MONAI has no location-conditioned convolution), so exported
    weights load back into this class (`network = "rayssl.methods.drasclr.DrasCLREncoder"`).
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (8, 16, 32, 64, 128),
        rep_dim: int = 128,
        num_experts: int = 8,
        coord_dim: int = 3,
        norm: ConvNorm = "batch",
    ) -> None:
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"widths must have 5 entries (stem, 3 blocks, last conv), got {tuple(widths)}")
        w0, w1, w2, w3, w4 = (int(w) for w in widths)
        self.network_kwargs: dict[str, Any] = dict(
            in_channels=in_channels,
            widths=[w0, w1, w2, w3, w4],
            rep_dim=rep_dim,
            num_experts=num_experts,
            coord_dim=coord_dim,
            norm=norm,
        )
        self.stem1 = _ConvBlock(in_channels, w0, 1, num_experts, coord_dim, norm)
        self.stem2 = _ConvBlock(w0, w0, 2, num_experts, coord_dim, norm)
        self.down1 = _DownBlock(w0, w1, num_experts, coord_dim, norm)
        self.down2 = _DownBlock(w1, w2, num_experts, coord_dim, norm)
        self.down3 = _DownBlock(w2, w3, num_experts, coord_dim, norm)
        self.head1 = _ConvBlock(w3, w4, 1, num_experts, coord_dim, norm)
        self.head2 = _ConvBlock(w4, rep_dim, 2, num_experts, coord_dim, norm)
        self.out_channels = rep_dim

    STAGES: ClassVar[tuple[str, ...]] = ("stem1", "stem2", "down1", "down2", "down3", "head1", "head2")
    size_multiple: ClassVar[int] = 2 ** 5
    location_conditioned: ClassVar[bool] = True

    def feature_levels(self, x: torch.Tensor, loc: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Feature maps after every stage, shallow to deep; `loc` [B, 3] is the patch's atlas coordinate."""
        if loc is None:
            raise ValueError(f"{type(self).__name__} is conditioned on the patch location: pass loc [B, 3]")
        features = []
        for name in self.STAGES:
            x = getattr(self, name)(x, loc)
            features.append(x)
        return features

    def forward(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        """x [B, C, P, P, P], loc [B, 3] -> representation [B, rep_dim]."""
        return self.feature_levels(x, loc)[-1].flatten(2).mean(dim=2)

    def network(self) -> str:
        return "rayssl.methods.drasclr.DrasCLREncoder"

    def key_groups(self) -> dict[str, list[str]]:
        return {"encoder": [""], "stem": ["stem1.", "stem2."], "input_projection": ["stem1.conv."],
                "router": self.router_prefixes()}

    def router_prefixes(self) -> list[str]:
        """state_dict prefixes of every routing layer (the location -> expert-weight maps)."""
        return [f"{name}.router." for name, module in self.named_modules() if isinstance(module, LocCondConv3d)]


class _Branch(nn.Module):
    """Encoder + MoCo projection head (official: Linear-ReLU-Linear on the representation)."""

    def __init__(self, encoder: DrasCLREncoder, proj_dim: int, centre: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = mlp(encoder.out_channels, encoder.out_channels, proj_dim, norm=None)
        if centre:
            self.head.append(RunningCentre(proj_dim))

    def forward(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x, loc))


class DrasCLRModel(nn.Module):
    """Online (query) branch + momentum (key) branch; one forward computes q, neighbour queries and k."""

    def __init__(self, config: DrasCLRConfig) -> None:
        super().__init__()
        encoder = DrasCLREncoder(1, config.widths, config.rep_dim, config.num_experts, coord_dim=3, norm=config.norm)
        self.online = _Branch(encoder, config.proj_dim, centre=config.centre_projection)
        self.target = make_momentum_copy(self.online)
        self.shuffle_bn = config.shuffle_bn

    @torch.no_grad()
    def _keys(self, view: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        if not (self.shuffle_bn and is_distributed()):
            return F.normalize(self.target(view, loc), dim=1)
        # MoCo's shuffle BN: the key encoder sees a random mix of all ranks' samples, so its batch
        # statistics cannot leak which key belongs to which query on this rank.
        world, rank = dist.get_world_size(), dist.get_rank()
        views_all, loc_all = gather_concat(view), gather_concat(loc)
        permutation = torch.randperm(views_all.shape[0], device=view.device)
        dist.broadcast(permutation, src=0)
        mine = permutation.view(world, -1)[rank]
        keys_all = gather_concat(F.normalize(self.target(views_all[mine], loc_all[mine]), dim=1))
        restore = torch.argsort(permutation).view(world, -1)[rank]
        return keys_all[restore]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        view_q, neighbors = batch["view_q"], batch["neighbors"]
        b, n = neighbors.shape[:2]
        # Anchor and neighbour patches go through the online branch in one pass.
        x = torch.cat([view_q, neighbors.flatten(0, 1)], dim=0)
        loc = torch.cat([batch["loc"], batch["neighbor_loc"].flatten(0, 1)], dim=0).to(x.dtype)
        z = F.normalize(self.online(x, loc), dim=1)
        return {
            "query": z[:b],
            "neighbor_queries": z[b:].reshape(b, n, -1),
            "key": self._keys(batch["view_k"], batch["loc"].to(x.dtype)),
            "landmark": batch["landmark"].long(),
        }


# ---------------------------------------------------------------------------------------------
# CPU-side views
# ---------------------------------------------------------------------------------------------


def landmark_starts(positions: np.ndarray, patch_size: int) -> np.ndarray:
    """Patch starts (int voxel) of landmark centres `positions` [L, 3]: round(centre) - P // 2."""
    return np.rint(np.asarray(positions, dtype=np.float64)).astype(np.int64) - patch_size // 2


def _shuffled_landmarks(seed: int, cycle: int, n_landmarks: int) -> np.ndarray:
    return np.random.default_rng([seed, cycle, 0x1A4D]).permutation(n_landmarks)


@functools.lru_cache(maxsize=4)
def _landmark_cycle(seed: int, cycle: int, n_landmarks: int) -> np.ndarray:
    """Landmark order of one cycle (a seeded permutation); its first landmark is never the previous
    cycle's last, so no landmark gets two turns in a row."""
    if n_landmarks <= 2:
        return np.arange(n_landmarks)
    order = _shuffled_landmarks(seed, cycle, n_landmarks)
    # The swap below only touches positions 0 and 1, so the previous cycle's last is its shuffle's last.
    if cycle > 0 and order[0] == _shuffled_landmarks(seed, cycle - 1, n_landmarks)[-1]:
        order[[0, 1]] = order[[1, 0]]
    order.flags.writeable = False
    return order


class DrasCLR(Method):
    """DrasCLR: local (same landmark, two augmentations) and neighbouring contrast, per-landmark queues.

    Data: `prepare` computes lung masks, registers every volume to an atlas (affine, mask to mask)
    and places landmarks on a grid of overlapping patches inside the atlas lung; each sample is a
    landmark j of a subject (by default one j per optimizer step, shared by every rank, as the
    official training; `landmark_sampling`): two augmented views of the patch at j, the patches at j's
    nearest landmarks, and the atlas coordinates that condition the Loc-CondConv encoder.
    Loss (paper Eq. 9): L = L_local (Eq. 6) + β L_neighbor (Eq. 8), negatives from the memory-bank
    queue of landmark j only.
    """

    name = "drasclr"
    config_cls = DrasCLRConfig
    # The optimizer recipe is in each profile's "train" section; docs/methods/drasclr.md has the
    # table of sources that tests/test_profiles.py holds against `rayssl recipe`.
    _published: ClassVar[dict[str, Any]] = {
        "patch_size": 32, "landmark_step": 26, "n_neighbors": 2, "spacing_mm": 1.0, "widths": (8, 16, 32, 64, 128),
        "rep_dim": 128, "proj_dim": 128, "num_experts": 8, "queue_size": 4096, "momentum": 0.999,
        "temperature": 0.2, "neighbor_weight": 1.0, "norm": "batch",
        # The augmentations on the GPU (issue 29): on the actors they were most of the CPU time per sample.
        "views_on": "device",
        # train.py trains one landmark at a time: num_iter_sub_epoch = iterations / num_patch steps of
        # all subjects at patch_idx, then the next (data/copd_patch.py set_patch_idx).
        "landmark_sampling": "per_batch", "landmark_hold_steps": None,
        # One official epoch visits every landmark of every subject (581 on the official atlas).
        "data": {"samples_per_volume": 581},
        # SGD(lr 0.01, momentum 0.9, weight decay 1e-4), cosine over 20 epochs, no warm-up, batch 128
        # (4 GPUs x 32), fp32, no clipping (train.py, run_train.sh).
        "train": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4,
                  "schedule": "cosine", "warmup_steps": 0, "final_lr_fraction": 0.0, "batch_size": 128,
                  "accumulate": 1, "epochs": 20, "grad_clip": None, "amp": False},
    }
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        # Forward + backward of a batch of 2 samples: 0.15-0.4 s alone on 2 cores, 1-2 s per step
        # inside `rayssl pretrain` next to the data actors (measured, see docs/methods/drasclr.md).
        "cpu": {
            "patch_size": 16, "landmark_step": 8, "n_neighbors": 2, "spacing_mm": None, "widths": (4, 8, 16, 32, 64),
            "rep_dim": 64, "proj_dim": 64, "num_experts": 4, "queue_size": 32, "queue_dtype": "float32",
            # Batch-independent norm: BatchNorm3d over 2 key patches a step makes keys of different
            # steps incomparable in a queue (issue 24, docs/methods/drasclr.md).
            "norm": "group",
            "momentum": 0.99, "temperature": 0.2, "neighbor_weight": 1.0,
            "landmark_sampling": "per_batch", "landmark_hold_steps": None,
            "train": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "schedule": "cosine",
                      "warmup_steps": 5, "final_lr_fraction": 0.0, "batch_size": 2, "accumulate": 1,
                      "steps": 40, "grad_clip": 1.0, "amp": True},
        },
        # The paper (Sec. 3, "Implementation Details"; 1 mm spacing in Sec. 4.1) states the official
        # run's values: 581 landmarks of 32^3 patches, BatchNorm + ELU, 2 neighbours, K = 4096 per
        # landmark, m = 0.999, tau = 0.2, SGD (momentum 0.9, weight decay 1e-4) lr 0.01 with cosine,
        # batch 128, 20 epochs, looping over landmarks (Sec. 2.5). Not stated, the official values:
        # 8 experts, widths (8, 16, 32, 64, 128), beta = 1, the landmark grid step 26.
        "paper": _published,
        "official": _published,
    }

    def __init__(self, config: DrasCLRConfig) -> None:
        super().__init__(config)
        self.config: DrasCLRConfig = config
        self._bank: KeyedMemoryQueues | None = None
        self._enqueued: torch.Tensor | None = None  # keys received per landmark (for the fill metric)
        self._device: torch.device = torch.device("cpu")

    # ---- data preparation (driver) ------------------------------------------------------------
    def check_volumes(self, volumes: Sequence[VolumeInfo]) -> None:
        """Patches are counted in voxels: refuse volumes whose spacing would make a patch cover other
        tissue (not `spacing_mm`, or, with spacing_mm None, not the spacing of the first volume)."""
        if not volumes:
            return
        wanted = self.config.spacing_mm
        reference = (wanted,) * 3 if wanted is not None else tuple(volumes[0].spacing)
        for v in volumes:
            if not np.allclose(v.spacing, reference, rtol=0.02, atol=1e-3):
                what = (f"DrasCLR patches assume {wanted:g} mm isotropic voxels (drasclr.spacing_mm)"
                        if wanted is not None else
                        f"DrasCLR patches need one spacing for all volumes; {volumes[0].id!r} has "
                        f"{tuple(round(float(x), 3) for x in reference)} mm")
                raise ValueError(
                    f"volume {v.id!r} has spacing {tuple(round(float(x), 3) for x in v.spacing)} mm, but {what}. "
                    f"Resample the store (`rayssl convert ... --spacing {wanted or reference[0]:g}`) or set "
                    f"drasclr.spacing_mm to the store's spacing (null = any spacing shared by all volumes)")

    def prepare(self, volumes: Sequence[VolumeInfo], *, runner: JobRunner = run_in_process) -> list[VolumeInfo]:
        """Spacing check, lung masks, atlas registration (`runner` jobs: Ray tasks under rayssl.train)
        and landmarks, each written into the volume's own store (one atlas for all stores); see
        datasets_zarr.landmarks. Imports datasets_zarr lazily: it runs on the driver only.
        """
        from datasets_zarr.landmarks import prepare_anatomy

        self.check_volumes(volumes)
        cfg = self.config
        table = prepare_anatomy(
            volumes,
            mask=cfg.mask,
            atlas=cfg.atlas,
            patch_size=cfg.patch_size,
            step=cfg.landmark_step,
            min_fraction=cfg.landmark_min_fraction,
            n_neighbors=cfg.n_neighbors,
            runner=runner,
        )
        prepared = []
        for volume in volumes:
            extra = dict(volume.extra)
            extra[EXTRA_POSITIONS] = table.subject_positions[volume.id]
            extra[EXTRA_NEIGHBORS] = table.neighbors
            extra[EXTRA_ATLAS_COORDS] = table.atlas_coords
            # As the manifest columns written by prepare_anatomy (4x4 row-major, flattened).
            atlas_to_subject = table.atlas_to_subject[volume.id]
            extra["atlas"] = table.atlas_id
            extra["atlas_dice"] = table.dice[volume.id]
            extra["atlas_to_subject_voxel"] = atlas_to_subject.ravel()
            extra["subject_to_atlas_voxel"] = np.linalg.inv(atlas_to_subject).ravel()
            prepared.append(replace(volume, has_mask=True, extra=extra))
        if cfg.atlas is None:  # pin the automatic choice (see Method.prepare)
            self.config = cfg.model_copy(update={"atlas": table.atlas_id})
        return prepared

    # ---- CPU side -------------------------------------------------------------------------
    @property
    def step_shared_plans(self) -> bool:
        return self.config.landmark_sampling == "per_batch"

    def landmark_hold(self, n_volumes: int, samples_per_step: int) -> int:
        """Optimizer steps one landmark is kept for (per_batch): the configured value, or one pass over
        the volumes, as the official sub-epoch (all subjects at one landmark, then the next)."""
        if self.config.landmark_hold_steps is not None:
            return self.config.landmark_hold_steps
        return max(1, math.ceil(n_volumes / samples_per_step))

    def step_landmark(self, step: StepInfo, n_landmarks: int, n_volumes: int) -> int:
        """The landmark of every sample of optimizer step `step` (per_batch).

        Steps go in runs of `landmark_hold` steps; run g takes landmark perm_c[g mod L] with
        c = g // L and perm_c a permutation of the L landmarks seeded by (run seed, c): every
        landmark one turn per cycle, in a shuffled order (the official code goes through 0..L-1).
        """
        run = step.step // self.landmark_hold(n_volumes, step.samples_per_step)
        cycle, position = divmod(run, n_landmarks)
        return int(_landmark_cycle(step.seed, cycle, n_landmarks)[position])

    def plan(
        self, volumes: Sequence[VolumeInfo], index: int, rng: np.random.Generator, step: StepInfo | None = None
    ) -> list[ReadRequest]:
        """Patch at landmark j of `volumes[index]`, then the patches at j's nearest landmarks.

        j is the step's landmark (`step_landmark`) when landmarks are drawn per batch and the
        trainer gives the step; otherwise (per_sample, or outside training: preview, streaming)
        a random landmark of this sample.
        """
        volume = volumes[index]
        if EXTRA_POSITIONS not in volume.extra:
            raise ValueError(
                f"volume {volume.id!r} has no DrasCLR landmarks: DrasCLR.prepare(volumes) must run first"
            )
        positions = np.asarray(volume.extra[EXTRA_POSITIONS])
        neighbors = np.asarray(volume.extra[EXTRA_NEIGHBORS])
        j = int(rng.integers(len(positions)))  # drawn in both modes: the rng stream stays the same
        if step is not None and self.step_shared_plans:
            j = self.step_landmark(step, len(positions), len(volumes))
        starts = landmark_starts(positions[[j, *neighbors[j]]], self.config.patch_size)
        size = (self.config.patch_size,) * 3
        coords = np.asarray(volume.extra[EXTRA_ATLAS_COORDS], dtype=np.float32)
        # What `views` needs of the landmark travels with the anchor box (views runs on a copy that never planned).
        context = {"landmark": j, "neighbors": np.asarray(neighbors[j], dtype=np.int64), "loc": coords[j],
                   "neighbor_loc": coords[neighbors[j]], "n_landmarks": len(coords)}
        requests = [ReadRequest(volume=volume.index, start=tuple(int(s) for s in start), size=size)  # type: ignore[arg-type]
                    for start in starts]
        requests[0] = replace(requests[0], context=context)
        return with_intensity(requests, volumes, self.intensity_rule())

    def intensity_rule(self) -> IntensityRule:
        return DRASCLR_INTENSITY

    def draw_augmentation(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The parameters of one sample's three augmentations (view_q, view_k, the neighbours jointly), as
        MONAI's RandAffine, RandGaussianNoise and RandAdjustContrast (the official 'agc') draw them: rotation
        U(-r, r), translation U(-t, t) voxels and scale 1 + U(-s, s) per axis, composed as MONAI's AffineGrid
        (rotate @ translate @ scale); noise with probability noise_prob, std U(0, noise_std), its values from
        a seed; contrast with probability contrast_prob, gamma U(contrast_gamma). Every draw is made whether
        used or not, so the stream has a fixed length. Fixed-size arrays: they travel in the batch."""
        from monai.transforms.utils import create_rotate, create_scale, create_translate

        cfg = self.config
        rotate, translate = math.radians(cfg.affine_rotate_deg), cfg.affine_translate * cfg.patch_size
        affines, flags, values = [], [], []
        for _ in range(3):
            r = rng.uniform(-rotate, rotate, 3)
            t = rng.uniform(-translate, translate, 3)
            scale = 1.0 + rng.uniform(-cfg.affine_scale, cfg.affine_scale, 3)
            affines.append(create_rotate(3, list(r)) @ create_translate(3, list(t)) @ create_scale(3, list(scale)))
            noise, std = rng.random() < cfg.noise_prob, rng.uniform(0.0, cfg.noise_std)
            contrast, gamma = rng.random() < cfg.contrast_prob, rng.uniform(*cfg.contrast_gamma)
            flags.append((noise, contrast))
            values.append((std, gamma))
        return {"aug_affine": np.asarray(affines, dtype=np.float32), "aug_flags": np.asarray(flags, dtype=np.int64),
                "aug_values": np.asarray(values, dtype=np.float32),
                "aug_seeds": rng.integers(0, 2**62, size=3, dtype=np.int64)}

    def apply_augmentation(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The views of a batch of raw patches (view_q: the anchor shifted to [0, width], neighbors [B, n, 1, P,
        P, P]), the parameters of `draw_augmentation` and `aug_half` (width / 2), on one device: for each of
        view_q, view_k (both from the anchor) and the neighbours (one multi-channel image), the affine warp
        (trilinear, border padding), the noise, the contrast; then x / half - 1. The parameters are dropped."""
        anchor, neighbors = batch["view_q"].float(), batch["neighbors"].float()
        b, n = neighbors.shape[:2]
        affine, flags = batch["aug_affine"].to(anchor.device), batch["aug_flags"].to(anchor.device)
        values, seeds = batch["aug_values"].to(anchor.device), batch["aug_seeds"].to(anchor.device)
        half = batch["aug_half"].to(anchor).view(b, 1, 1, 1, 1)

        def augmented(x: torch.Tensor, i: int) -> torch.Tensor:
            x = augment.warp_stack(x, augment.affine_dvf(x.shape[2:], affine[:, i]), padding_mode="border")
            x = augment.gaussian_noise(x, flags[:, i, 0], values[:, i, 0], seeds[:, i])
            return augment.adjust_contrast(x, flags[:, i, 1], values[:, i, 1]) / half - 1.0

        rest = {k: v for k, v in batch.items() if not k.startswith("aug_") and k not in ("view_q", "neighbors")}
        return {**rest, "view_q": augmented(anchor, 0), "view_k": augmented(anchor, 1),
                "neighbors": augmented(neighbors[:, :, 0], 2)[:, :, None]}

    def views(
        self, crops: list[np.ndarray], requests: list[ReadRequest], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """Two augmented views of the anchor patch, the (jointly augmented) neighbour patches, coordinates.

        As the official code: intensities are clipped to the HU window and shifted to [0, hi - lo]
        (so the noise std is in HU), augmented, then scaled to [-1, 1]. The neighbours share one
        random transform (the official code augments them as one multi-channel image).
        With `views_on: device` the sample is the shifted patches (view_q: the anchor, neighbors) plus the
        augmentations' parameters (`draw_augmentation`); `device_views` finishes it on the device.
        """
        landmark = requests[0].context
        if landmark is None:
            raise ValueError("DrasCLR.views needs the requests of DrasCLR.plan: the landmark travels in the anchor "
                             "request's context")
        ids = landmark["neighbors"]
        if len(crops) != 1 + len(ids):
            raise ValueError(f"DrasCLR.views expects {1 + len(ids)} crops (anchor + neighbours), got {len(crops)}")
        # The anchor's bounds (HU window, or its percentiles) for every patch; width > 0: a flat patch maps to -1.
        mapping = self.request_intensity(requests[0])
        lo, hi = mapping.bounds(crops[0])  # type: ignore[misc]
        width = max(hi - lo, 1e-6)
        shifted = [mapping.apply(c, (lo, lo + width), out_range=(0.0, width)).astype(np.float32) for c in crops]
        sample = {
            "view_q": shifted[0][None],
            "neighbors": np.stack(shifted[1:])[:, None],
            "loc": np.asarray(landmark["loc"], dtype=np.float32),
            "neighbor_loc": np.asarray(landmark["neighbor_loc"], dtype=np.float32),
            "landmark": np.asarray(landmark["landmark"], dtype=np.int64),
            "n_landmarks": np.asarray(landmark["n_landmarks"], dtype=np.int64),
            "aug_half": np.asarray([width / 2.0], dtype=np.float32),
            **self.draw_augmentation(rng),
        }
        return self.views_for(sample)

    def preview_geometry(self, volumes: Sequence[VolumeInfo], requests: list[ReadRequest],
                         views: dict[str, np.ndarray], model: nn.Module | None = None) -> PreviewFigure:
        """The sample's landmark patch and its neighbours' patches on the subject, and the same
        landmarks among all landmarks of the atlas (where the Loc-CondConv coordinates come from)."""
        cfg = self.config
        views = self.finish_views(views)
        j = int(np.asarray(views["landmark"]).reshape(-1)[0])
        subject = volumes[requests[0].volume]
        neighbors = [int(n) for n in np.asarray(subject.extra[EXTRA_NEIGHBORS])[j]]
        positions = np.asarray(subject.extra[EXTRA_POSITIONS], dtype=np.float64)
        coords = np.asarray(subject.extra[EXTRA_ATLAS_COORDS], dtype=np.float64)
        # Neighbours first, so the landmark's patch is drawn on top where they overlap.
        boxes = [request_box(r, "neighbour patches", f"n={n}") for n, r in zip(neighbors, requests[1:])]
        boxes.append(request_box(requests[0], "landmark patch", f"j={j}"))
        # Centres as the patches are cut (landmark_starts rounds), so points sit in their boxes.
        def centre(i: int) -> tuple[float, float, float]:
            return tuple(float(v) for v in np.rint(positions[i]))  # type: ignore[return-value]

        points = [PreviewPoint(centre(n), "neighbour patches") for n in neighbors]
        points.append(PreviewPoint(centre(j), "landmark patch"))
        scenes = [PreviewScene(subject.index, f"subject {subject.id}: landmark {j} of {len(positions)} and its "
                               f"{len(neighbors)} nearest landmarks (atlas distance), {cfg.patch_size}^3 patches",
                               centre(j), boxes, points)]
        atlas_id = str(subject.extra.get("atlas", cfg.atlas))
        atlas = next((v for v in volumes if v.id == atlas_id), None)
        notes = [f"Atlas coordinates (Loc-CondConv input, [-1, 1]): landmark {j} at "
                 f"({', '.join(f'{v:+.2f}' for v in coords[j])}). Landmarks come from a grid of step {cfg.landmark_step} "
                 f"in the atlas {cfg.mask} mask, mapped to each subject by its affine registration "
                 f"(Dice {float(subject.extra.get('atlas_dice', float('nan'))):.2f})."]
        atlas_points: list[list[float]] = []
        if atlas is not None:
            # Atlas voxel centres from the scaled coordinates: c = (coord + 1) (shape - 1) / 2.
            centres = (coords + 1.0) * (np.maximum(np.asarray(atlas.shape, dtype=np.float64) - 1.0, 1.0)) / 2.0
            atlas_points = centres.tolist()
            pts = [PreviewPoint(tuple(float(v) for v in c), "atlas landmarks") for i, c in enumerate(centres)
                   if i != j and i not in neighbors]
            pts += [PreviewPoint(tuple(float(v) for v in centres[n]), "neighbour patches", f"{n}") for n in neighbors]
            pts += [PreviewPoint(tuple(float(v) for v in centres[j]), "landmark patch", f"{j}")]
            half = cfg.patch_size / 2.0
            atlas_boxes = [PreviewBox(tuple(float(v) - half for v in centres[i]), (float(cfg.patch_size),) * 3,  # type: ignore[arg-type]
                                      "landmark patch" if i == j else "neighbour patches") for i in [*neighbors, j]]
            scenes.append(PreviewScene(atlas.index, f"atlas {atlas.id}: all {len(centres)} landmarks (small dots), "
                                       f"landmark {j} and its neighbours", tuple(float(v) for v in centres[j]),  # type: ignore[arg-type]
                                       atlas_boxes, pts))
        else:
            notes.append(f"The atlas {atlas_id!r} is not in this split, so it is not drawn.")
        unit = (-1.0, 1.0)  # views are scaled to [-1, 1]: one grey scale for all
        images = [PreviewImage("view_q: landmark patch, augmentation 1\n(middle axial slice)", mid_slice(views["view_q"]), unit),
                  PreviewImage("view_k: landmark patch, augmentation 2\n(middle axial slice)", mid_slice(views["view_k"]), unit)]
        for i, n in enumerate(neighbors):
            images.append(PreviewImage(f"neighbour patch {n} (jointly augmented)\n(middle axial slice)",
                                       mid_slice(np.asarray(views["neighbors"])[i]), unit))
        facts = {"landmark": j, "neighbors": neighbors, "n_landmarks": int(len(positions)),
                 "subject_centres": {str(i): list(centre(i)) for i in [j, *neighbors]},
                 "atlas": atlas_id, "atlas_centres": atlas_points, "patch_size": cfg.patch_size}
        return PreviewFigure("DrasCLR: a landmark, its neighbours and the atlas", scenes, images, notes, facts)

    # ---- model side -------------------------------------------------------------------------
    def build_model(self) -> DrasCLRModel:
        return DrasCLRModel(self.config)

    def setup(self, model: nn.Module, device: torch.device) -> None:
        self._device = torch.device(device)
        if self._bank is not None:
            self._bank.to(self._device)
            self._enqueued = self._enqueued.to(self._device)

    def _ensure_bank(self, n_landmarks: int) -> KeyedMemoryQueues:
        """The memory bank, created on first use: the landmark count is known from the data only."""
        if self._bank is None:
            cfg = self.config
            self._bank = KeyedMemoryQueues(n_landmarks, cfg.queue_size, cfg.proj_dim, device=self._device,
                                           dtype=getattr(torch, cfg.queue_dtype))
            self._enqueued = torch.zeros(n_landmarks, dtype=torch.long, device=self._device)
        elif self._bank.buffer.shape[0] != n_landmarks:
            raise ValueError(
                f"the batch has {n_landmarks} landmarks but the memory bank has {self._bank.buffer.shape[0]}: "
                f"the atlas landmarks changed since the bank was created (same atlas, patch_size and step "
                f"are needed to resume)"
            )
        return self._bank

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """L = L_local + β·L_neighbor; negatives are the filled entries of each sample's landmark queue,
        or, while that queue is empty (the landmark's first step), the batch's other keys."""
        bank = self._ensure_bank(int(batch["n_landmarks"].reshape(-1)[0]))
        query = outputs["query"]
        negatives, valid = bank.negatives_with_batch_fallback(outputs["landmark"], outputs["key"])
        negatives, valid = negatives.to(device=query.device, dtype=query.dtype), valid.to(query.device)
        local = info_nce(query, outputs["key"], negatives, self.config.temperature, negative_mask=valid)
        neighbor = neighbor_info_nce(outputs["neighbor_queries"], outputs["key"], negatives, self.config.temperature,
                                     negative_mask=valid)
        return {"loss": local + self.config.neighbor_weight * neighbor, "loss_local": local, "loss_neighbor": neighbor}

    def valid_negatives(self, landmarks: torch.Tensor) -> torch.Tensor:
        """[B] long: negatives of each sample of a batch with these landmark ids, now: K of its chance
        level ln(1 + K) for L_local and L_neighbor (its landmark queue's filled entries, or while that
        is empty the batch's other B - 1 keys)."""
        if self._bank is None:
            return torch.full((landmarks.shape[0],), landmarks.shape[0] - 1, dtype=torch.long)
        return self._bank.valid_negatives(landmarks)

    def after_step(
        self, model: nn.Module, outputs: dict[str, torch.Tensor], step: int, total_steps: int
    ) -> dict[str, float]:
        """EMA update of the key branch, then enqueue every rank's keys into their landmarks' queues."""
        momentum_update(model.online, model.target, self.config.momentum)
        keys = gather_concat(outputs["key"].detach().float().contiguous())
        ids = gather_concat(outputs["landmark"].detach().contiguous())
        if self._bank is None:
            raise RuntimeError("after_step before loss: the memory bank does not exist yet")
        self._bank.enqueue(keys, ids)
        assert self._enqueued is not None
        self._enqueued.index_add_(0, ids.to(self._enqueued.device), torch.ones_like(ids, device=self._enqueued.device))
        filled = self._enqueued.clamp(max=self._bank.length).float().mean() / self._bank.length
        # Distinct landmarks in this optimizer step over all ranks and micro-batches: 1 with per_batch.
        return {"bank_fill": float(filled), "step_landmarks": float(ids.unique().numel())}

    def state_dict(self) -> dict[str, Any]:
        """The landmark bank as "queue_bank_<field>" (rayssl.nn.queue.NamedQueues) and the keys
        received per landmark ("enqueued"); {} before the first step created the bank."""
        if self._bank is None:
            return {}
        assert self._enqueued is not None
        return {**NamedQueues({"bank": self._bank}).state_dict(), "enqueued": self._enqueued.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if "bank" in state:  # checkpoints before NamedQueues nested the bank's fields under "bank"
            state = {**{f"queue_bank_{k}": v for k, v in state["bank"].items()}, "enqueued": state["enqueued"]}
        saved = NamedQueues().saved_fields(state, "bank")
        self._ensure_bank(int(saved["buffer"].shape[0]))
        assert self._bank is not None
        NamedQueues({"bank": self._bank}).load_state_dict(state)
        self._enqueued = state["enqueued"].to(self._device).clone()
        if "filled" not in saved:  # a checkpoint from before the fill count: keys received per landmark
            self._bank.filled = self._enqueued.clamp(max=self._bank.length).to(self._bank.pointers.device)

    def embeddings(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Online embeddings of the anchor patches and their neighbours."""
        return torch.cat([outputs["query"], outputs["neighbor_queries"].flatten(0, 1)])

    def backbone(self, model: nn.Module) -> DrasCLREncoder:
        return model.online.encoder

    def export(self, model: nn.Module) -> ExportedBackbone:
        encoder = self.backbone(model)
        return ExportedBackbone.of(
            encoder,
            notes=(
                "DrasCLR Loc-CondConv encoder (no MONAI equivalent: every convolution mixes expert kernels "
                "by the patch's atlas coordinate). Call encoder(x, loc): x [B,1,P,P,P] = HU clipped to "
                "[-1024, 240] scaled to [-1, 1]; loc [B,3] = atlas voxel coordinate of the patch centre "
                "scaled by 2*c/(atlas_shape-1)-1. Image-level features: mean over landmarks "
                "(rayssl.methods.drasclr.embed_image); dense features: embed_voxels."
            ),
        )

    def recipe(self) -> dict[str, str]:
        c = self.config
        return {
            "network": f"Loc-CondConv encoder {tuple(c.widths)}, {c.num_experts} experts",
            "patch size": f"{c.patch_size}^3 voxels",
            "voxel spacing": f"{c.spacing_mm:g} mm isotropic" if c.spacing_mm is not None else "any, shared by all volumes",
            "landmark grid step": str(c.landmark_step),
            "neighbours": str(c.n_neighbors),
            "landmark sampling": "one per sample" if c.landmark_sampling == "per_sample" else (
                "one per optimizer step, kept ceil(volumes / effective batch) steps" if c.landmark_hold_steps is None
                else f"one per optimizer step, kept {c.landmark_hold_steps} steps"),
            "loss form": f"L_local + {c.neighbor_weight:g} L_neighbor",
            "temperature": f"{c.temperature:g}",
            "normalisation": conv_norm_text(c.norm),
            "queue size": f"{c.queue_size} per landmark",
            "key momentum": f"{c.momentum:g}",
        }

    def card(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "paper": "Yu et al. DrasCLR: anatomy-aware self-supervised learning for 3D lung CT, MedIA 2024",
            "pretraining_patch_size": [cfg.patch_size] * 3,
            "recommended_downstream_patch_size": [cfg.patch_size] * 3,
            "input_intensity": DRASCLR_INTENSITY.as_dict(),
            "conditioning": "atlas coordinate of the patch centre, 2*c/(atlas_shape-1)-1 per axis",
            "landmarks": {
                "mask": cfg.mask,
                "atlas": cfg.atlas,
                "patch_size": cfg.patch_size,
                "step": cfg.landmark_step,
                "min_fraction": cfg.landmark_min_fraction,
                "n_neighbors": cfg.n_neighbors,
                "count": int(self._bank.buffer.shape[0]) if self._bank is not None else None,
            },
            "memory_bank": {"queue_size": cfg.queue_size, "dim": cfg.proj_dim, "dtype": cfg.queue_dtype},
        }

    # Held-out reference (rayssl/train/heldout.py): at least 17 fixed samples in whole batches (18 at batch 2),
    # so K = M - 1 >= 16 negatives per anchor and chance ln M per term.
    heldout_reference_samples: ClassVar[int] = 17

    def heldout_reference(self, model: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                          outputs: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
        """L_local and L_neighbor with the landmark queue replaced by fixed negatives: the anchors are
        the held-out loss's samples and anchor i's negatives the current momentum keys of the other
        M - 1 held-out patches (K = M - 1; beyond the loss's samples only the key branch runs). They
        lie mostly at other landmarks (each held-out batch has its own), so the set is easier than
        the per-landmark queue; it measures whether a key finds its own patch among fixed ones,
        comparably across steps. Chance ln(1 + K) = ln M per term, (1 + β)·ln M for L."""
        query, key = (torch.cat([o[k] for o in outputs]).float() for k in ("query", "key"))
        neighbors = torch.cat([o["neighbor_queries"] for o in outputs]).float()
        keys = [key] + [model._keys(b["view_k"], b["loc"].to(b["view_k"].dtype)).float()
                        for b in batches[len(outputs):]]
        all_keys = torch.cat(keys)
        m = all_keys.shape[0]
        if m < 2:
            return {}
        tau, weight, chance = self.config.temperature, self.config.neighbor_weight, float(np.log(m))
        negatives = other_rows(all_keys)[:key.shape[0]]
        local = float(info_nce(query, key, negatives, tau))
        neighbor = float(neighbor_info_nce(neighbors, key, negatives, tau))
        return {"fixed_local": local, "fixed_neighbor": neighbor, "fixed_total": local + weight * neighbor,
                "chance_local": chance, "chance_neighbor": chance, "chance": (1.0 + weight) * chance}


METHOD = DrasCLR
