"""VoCo: volume contrast by predicting where random crops sit among a grid of base crops.

Wu, Zhuang, Chen, "VoCo: A Simple-yet-Effective Volume Contrastive Learning Framework for 3D
Medical Image Analysis", CVPR 2024 (official code: github.com/Luffy03/VoCo, read for facts).

Views (CPU, `plan` + `views`): one region of `region_size` voxels per volume (default 384x384x96,
as the official code) is read at a random position inside/around the volume's foreground box.
It is split into `n_x x n_y x n_z` non-overlapping *base crops* (default 4x4x1) and `k` *random
crops* of the base-crop size are taken at random positions inside the region; every crop is
resized to `input_size`^3. The label of a random crop is the fraction of its voxels lying in each
base crop (a row per random crop, summing to 1). A region larger than the volume (or reaching
outside it) is *padded*: the reader returns the volume's background value outside the volume,
which the CT window maps to 0 -- the official code pads with 0 after windowing (SpatialPad), so
this matches it; nothing is shrunk and nothing crashes.

Model: a MONAI SwinUNETR Swin encoder (`backbone="swin"`) or the BasicUNet encoder
(`backbone="unet"`), global-average pooling, and the official 3-layer projector. With
`loss_form="official"` an EMA teacher (a frozen copy of encoder + projector, momentum 0.9) lives
in the model and is updated in `after_step`.

Loss, two forms (`loss_form`):

* ``paper`` (CVPR paper, Sec. 3.2-3.3): l_i = cos(p, sg(q_i)) for a random crop's projection p
  and the base crops' projections q_i (Eq. 1); L_pred = -(1/n) sum_i log(1 - |y_i - l_i|)
  (Eq. 2-3); L_reg (Eq. 5) and L = L_pred + lambda * L_reg (Eq. 7). Eq. 5 writes
  L_reg = 2/(n(n-1)) sum over i != j of |cos(q_i, q_j)|, which is ambiguous: its factor counts
  unordered pairs, its sum runs over ordered ones. `reg_reduction="pair_mean"` (default, and the
  official code's normalisation) reads it as the mean over unordered pairs i<j;
  ``"literal_sum"`` takes the formula as printed, twice that mean (= pair_mean with lambda x 2).
* ``official`` (what `models/voco_head.py` trains): an EMA teacher sees the same crops;
  logits = (ReLU(cos(p_student, q_teacher)) + ReLU(cos(p_teacher, q_student))) / 2;
  pos = sum_i -y_i log(1 - |y_i - l_i| + 1e-6) / sum_i y_i (only bases the crop overlaps count);
  neg = mean over bases with y_i = 0 of l_i^2; reg = mean over pairs i<j of
  ReLU(cos(q_i, sg(q_j)))^2 on the student's bases; L = pos + neg + lambda * reg.

Where the two forms differ (also in docs/methods/voco.md):

1. Teacher: none in ``paper`` (the bases are the same network's features with stop-gradient);
   ``official`` uses an EMA teacher and averages the student->teacher-bases and
   teacher->student-bases logits, so gradients reach the student's bases through L_pred too.
2. Logits: raw cosine in ``paper``; ReLU'd in ``official``.
3. Prediction term: ``paper`` averages -log(1 - |y - l|) over all n bases with equal weight;
   ``official`` weights it by y (non-overlapping bases drop out) and adds a separate squared
   penalty l^2 on the non-overlapping bases.
4. Regulariser: mean |cos| with gradients to both bases in ``paper``; mean ReLU(cos)^2 with the
   second base of each pair detached in ``official``.
5. Log safety: ``paper`` clamps 1 - |y - l| at `log_eps` (1e-6) inside the log, because a raw
   cosine can be negative and make |y - l| >= 1 (the clamped terms then pass no gradient);
   ``official`` adds 1e-6 as the official code does, which is safe there because ReLU'd logits
   and labels both lie in [0, 1].

Other departures from the official code, all deliberate:

* Regions are crops of the stored volume at its own spacing (``region_mode="crop"``); the
  official pipeline resizes the whole foreground box to 384x384x96, which
  ``region_mode="foreground_resize"`` reproduces (the "paper" profile uses it). The paper's Table 9
  pre-processing spacing (1.5 mm) is a requirement on the stores (`spacing_mm`, set by the "paper"
  profile; `check_volumes` refuses other spacings); the official get_loader resamples nothing.
* The teacher starts as a copy of the student (official: an independent random init, pulled to the
  student by EMA). The official code updates the teacher at the start of each forward with the
  current student weights; updating right after the optimizer step with the same weights gives
  the same teacher at every forward.
* Linear layers followed by BatchNorm(affine=False) have no bias: BatchNorm removes it, so it
  could never train (the function is unchanged).
* Random crop positions are uniform over every position inside the region (official: the last
  position along x and y is never drawn); with `n_z > 1` z is random too (official: n_z = 1).
* `lambda_reg` weights the official regulariser too (official weight 1 = our default).
* BatchNorm statistics in the projector are per rank (official converts to SyncBatchNorm; here
  `train.sync_batchnorm=true` does, on GPUs). `head_norm: layer` / `group` replace it.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from monai.transforms import (
    Compose,
    RandFlip,
    RandRotate90,
    RandShiftIntensity,
)
from pydantic import Field, model_validator
from torch import nn

from rayssl.data.jobs import JobRunner, run_in_process
from rayssl.data.stores import volume_store
from rayssl.methods.base import (
    ExportedBackbone,
    Method,
    MethodConfig,
    PreviewBox,
    PreviewFigure,
    PreviewImage,
    PreviewScene,
    ReadRequest,
    StepInfo,
    VolumeInfo,
    box_centre,
    mid_slice,
    with_intensity,
)
from rayssl.nn.backbones import SwinViTEncoder, UNetEncoder, global_pool
from rayssl.nn.losses.voco import voco_official_loss, voco_paper_loss
from rayssl.nn.momentum import make_momentum_copy, momentum_update
from rayssl.nn.norm import HeadNorm, head_norm, head_norm_text

Triple = tuple[int, int, int]

# SwinUNETR's skip blocks that the official VoCo pools for its multi-scale feature (hs[3] is unused).
_SWIN_SKIP_BLOCKS = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10")


class VoCoConfig(MethodConfig):
    """Settings of VoCo. Defaults follow the official code (Luffy03/VoCo) unless noted."""

    # --- network ---
    backbone: Literal["swin", "unet"] = "swin"
    feature_size: int = Field(48, ge=12, le=192, description="SwinUNETR feature_size (multiple of 12)")
    unet_features: tuple[int, int, int, int, int, int] = (32, 32, 64, 128, 256, 32)
    feature_pooling: Literal["multiscale", "deepest"] = Field(
        "multiscale",
        description="multiscale: concat of pooled encoder levels (official: SwinUNETR encoder1-4 + encoder10); "
        "deepest: pooled deepest feature map only",
    )
    proj_hidden_dim: int = Field(2048, ge=8)
    proj_dim: int = Field(2048, ge=8)
    head_norm: HeadNorm = Field("batch", description="projector norm: batch (official, affine-free, batch statistics "
                                "over every crop of the step) or the batch-independent layer / group")
    # --- loss ---
    loss_form: Literal["paper", "official"] = "official"
    lambda_reg: float = Field(1.0, ge=0.0, description="weight of the base-crop regulariser (paper's lambda)")
    reg_reduction: Literal["pair_mean", "literal_sum"] = Field(
        "pair_mean",
        description="paper form's L_reg (Eq. 5): pair_mean = mean |cos| over unordered pairs i<j (the official "
        "code's normalisation); literal_sum = 2/(n(n-1)) x the sum over ordered pairs i != j, as printed (2x)",
    )
    teacher_momentum: float = Field(0.9, ge=0.0, le=1.0, description="EMA momentum of the official form's teacher")
    log_eps: float = Field(1e-6, gt=0.0, lt=0.1, description="clamp inside the paper form's log")
    export_weights: Literal["student", "teacher"] = "student"
    # --- views ---
    region_size: tuple[int, int, int] = (384, 384, 96)
    region_mode: Literal["crop", "foreground_resize"] = Field(
        "crop",
        description="crop: read region_size voxels around the foreground box; foreground_resize: read the "
        "whole foreground box and resize it to region_size (the official pipeline)",
    )
    prepare_regions: bool = Field(
        True,
        description="foreground_resize only: resize each volume's foreground box to region_size once before "
        "training (Ray tasks, into prepared_store; what the official PersistentDataset caches) instead of for "
        "every sample (~4x the data CPU); the stored int16 HU rounding (+-0.5 HU) is the only difference",
    )
    prepared_store: str | None = Field(
        None,
        description="where prepared regions are written: a filesystem path every data actor can read "
        "(default: <store>.fg-XxYxZ.zarr beside a local source store)",
    )
    spacing_mm: float | None = Field(
        None, gt=0.0,
        description="isotropic voxel spacing (mm) of the paper's pre-processing (Table 9: 1.5): prepared "
        "foreground regions are resampled to it before the resize; in crop mode the stores must be at it "
        "(check_volumes refuses others); None = the store's own spacing",
    )
    n_x: int = Field(4, ge=2, le=5, description="base crops along x")
    n_y: int = Field(4, ge=2, le=5, description="base crops along y")
    n_z: int = Field(1, ge=1, le=5, description="base crops along z (official: 1)")
    n_xy: int | None = Field(None, ge=2, le=5, description="if set, overrides n_x and n_y: an n_xy x n_xy grid (what tune_spaces/voco.yaml samples)")
    num_random_crops: int = Field(2, ge=1, le=16, description="k random crops per volume (official sw_batch_size)")
    input_size: int = Field(64, ge=32, le=256, description="edge of the cube every crop is resized to")
    intensity: Literal["ct_window", "percentile", "none"] = "ct_window"
    ct_window: tuple[float, float] = (-175.0, 250.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    flip_prob: float = Field(0.2, ge=0.0, le=1.0)
    rot90_prob: float = Field(0.2, ge=0.0, le=1.0)
    shift_intensity_prob: float = Field(0.1, ge=0.0, le=1.0)
    shift_intensity_offset: float = Field(0.1, ge=0.0, le=1.0)

    @property
    def grid(self) -> Triple:
        """Base crops per axis (x, y, z)."""
        if self.n_xy is not None:
            return (self.n_xy, self.n_xy, self.n_z)
        return (self.n_x, self.n_y, self.n_z)

    @property
    def num_bases(self) -> int:
        return int(np.prod(self.grid))

    @property
    def base_size(self) -> Triple:
        """Size (voxels) of a random crop: the base-crop size, rounded when the grid does not divide the region."""
        return tuple(max(1, round(r / n)) for r, n in zip(self.region_size, self.grid))  # type: ignore[return-value]

    @model_validator(mode="after")
    def _check_consistency(self) -> "VoCoConfig":
        for axis, (size, n) in enumerate(zip(self.region_size, self.grid)):
            if size < 4 * n:
                raise ValueError(
                    f"region_size[{axis}]={size} is too small for {n} base crops along that axis "
                    f"(each base crop needs >= 4 voxels): raise region_size or lower n_{'xyz'[axis]}"
                )
        if self.backbone == "swin":
            if self.input_size % 32:
                raise ValueError(f"input_size={self.input_size} must be a multiple of 32 for backbone=swin (SwinUNETR)")
            if self.feature_pooling == "multiscale" and self.input_size < 64:
                # encoder10 instance-normalises the 1/32-scale map, which needs more than one voxel.
                raise ValueError(f"input_size={self.input_size} must be >= 64 for backbone=swin with "
                                 f"feature_pooling=multiscale (or use feature_pooling=deepest)")
            if self.feature_size % 12:
                raise ValueError(f"feature_size={self.feature_size} must be a multiple of 12 for backbone=swin")
        elif self.input_size % 16 or self.input_size < 32:
            # 4 poolings; the deepest level is instance-normalised and needs more than one voxel.
            raise ValueError(f"input_size={self.input_size} must be a multiple of 16 and >= 32 for backbone=unet")
        if not self.ct_window[0] < self.ct_window[1]:
            raise ValueError(f"ct_window={self.ct_window} must be (low, high) with low < high")
        if not 0.0 <= self.percentiles[0] < self.percentiles[1] <= 100.0:
            raise ValueError(f"percentiles={self.percentiles} must satisfy 0 <= low < high <= 100")
        if self.reg_reduction != "pair_mean" and self.loss_form != "paper":
            raise ValueError(f"reg_reduction={self.reg_reduction!r} reads the paper's Eq. 5 and needs loss_form='paper' "
                             f"(the official form's regulariser is the official code's mean over pairs)")
        if self.export_weights == "teacher" and self.loss_form != "official":
            raise ValueError("export_weights='teacher' needs loss_form='official' (the paper form has no teacher)")
        return self


# ---------------------------------------------------------------------------------------------
# Geometry: base-crop grid and position labels (pure numpy, tested against voxel counts)
# ---------------------------------------------------------------------------------------------
def base_edges(region_size: Sequence[int], grid: Sequence[int]) -> list[np.ndarray]:
    """Integer boundaries of the base crops along each axis: edges[a][i]..edges[a][i+1] is base i.

    When n does not divide the region, floor(i * R / n) spreads the remainder so base crops differ
    by at most one voxel and still tile the region exactly.
    """
    return [np.array([(i * r) // n for i in range(n + 1)], dtype=np.int64) for r, n in zip(region_size, grid)]


def base_boxes(region_size: Sequence[int], grid: Sequence[int]) -> list[tuple[Triple, Triple]]:
    """(start, size) of every base crop, x-major then y then z (the official order: x outer, y inner)."""
    edges = base_edges(region_size, grid)
    boxes = []
    for i, j, k in itertools.product(*(range(n) for n in grid)):
        start = (int(edges[0][i]), int(edges[1][j]), int(edges[2][k]))
        stop = (int(edges[0][i + 1]), int(edges[1][j + 1]), int(edges[2][k + 1]))
        boxes.append((start, tuple(b - a for a, b in zip(start, stop))))
    return boxes  # type: ignore[return-value]


def position_labels(starts: np.ndarray, crop_size: Sequence[int], region_size: Sequence[int], grid: Sequence[int]) -> np.ndarray:
    """[k, n_bases] fraction of each random crop's voxels that lie in each base crop (paper Sec. 3.2, Fig. 4).

    The overlap of two axis-aligned boxes is the product of the per-axis interval overlaps, so the
    voxel count is exact without visiting voxels. Rows sum to 1 for crops inside the region.
    """
    starts = np.asarray(starts, dtype=np.int64).reshape(-1, 3)
    edges = base_edges(region_size, grid)
    per_axis = []
    for axis in range(3):
        lo = starts[:, axis:axis + 1]  # [k, 1]
        hi = lo + int(crop_size[axis])
        overlap = np.minimum(hi, edges[axis][None, 1:]) - np.maximum(lo, edges[axis][None, :-1])
        per_axis.append(np.clip(overlap, 0, None))  # [k, n_axis]
    counts = per_axis[0][:, :, None, None] * per_axis[1][:, None, :, None] * per_axis[2][:, None, None, :]
    counts = counts.reshape(len(starts), -1).astype(np.float64)
    return (counts / float(np.prod(crop_size))).astype(np.float32)


def region_start(bbox: Sequence[int], shape: Sequence[int], region: Sequence[int], rng: np.random.Generator) -> Triple:
    """Random start of a region box: inside the foreground box when it fits, else covering it.

    Per axis: a region no larger than the box is placed uniformly inside it; a larger region is
    placed uniformly among the positions that contain the whole box (it then reaches past the box,
    possibly outside the volume, where reads return background). An empty box means the whole volume.
    """
    lo, hi = list(bbox[:3]), list(bbox[3:])
    if any(h <= l for l, h in zip(lo, hi)):
        lo, hi = [0, 0, 0], list(shape)
    start = []
    for l, h, r in zip(lo, hi, region):
        a, b = (l, h - r) if r <= h - l else (h - r, l)
        start.append(int(rng.integers(a, b + 1)))
    return tuple(start)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------
class VoCoSwinEncoder(SwinViTEncoder):
    """SwinUNETR's Swin encoder plus, for multi-scale pooling, its encoder1-4 and encoder10 blocks.

    The official VoCo pools [encoder1(x), encoder2(hs0), encoder3(hs1), encoder4(hs2),
    encoder10(hs4)] (24 x feature_size channels). These blocks are SwinUNETR's own, kept under
    SwinUNETR's names, so they export with the Swin weights. `forward` returns the deepest feature
    map, like `SwinViTEncoder`.
    """

    def __init__(self, feature_size: int, multiscale: bool, in_channels: int = 1) -> None:
        super().__init__(in_channels=in_channels, feature_size=feature_size)
        self.multiscale = multiscale
        if multiscale:
            donor = SwinUNETR(**self.network_kwargs)
            for name in _SWIN_SKIP_BLOCKS:
                setattr(self, name, getattr(donor, name))
        self.pooled_dim = 24 * feature_size if multiscale else 16 * feature_size

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.swinViT(x, self.normalize)
        if not self.multiscale:
            return global_pool(hidden[-1])
        levels = [self.encoder1(x), self.encoder2(hidden[0]), self.encoder3(hidden[1]),
                  self.encoder4(hidden[2]), self.encoder10(hidden[4])]
        return torch.cat([global_pool(f) for f in levels], dim=1)

    def key_groups(self) -> dict[str, list[str]]:
        groups = super().key_groups()
        if self.multiscale:
            groups["encoder"] = groups["encoder"] + [f"{b}." for b in _SWIN_SKIP_BLOCKS]
            # encoder1 convolves the raw input, so it is part of the stem and the input projection.
            groups["stem"] = groups["stem"] + ["encoder1."]
            groups["input_projection"] = groups["input_projection"] + ["encoder1.layer.conv1.conv.", "encoder1.layer.conv3.conv."]
        return groups


class VoCoUNetEncoder(UNetEncoder):
    """MONAI BasicUNet's encoder; multi-scale pooling concatenates every level (not in the official code)."""

    def __init__(self, features: Sequence[int], multiscale: bool, in_channels: int = 1) -> None:
        super().__init__(in_channels=in_channels, features=tuple(features))
        self.multiscale = multiscale
        self.pooled_dim = int(sum(features[:5])) if multiscale else int(features[4])

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.feature_levels(x)
        if not self.multiscale:
            return global_pool(levels[-1])
        return torch.cat([global_pool(f) for f in levels], dim=1)


def voco_projector(in_dim: int, hidden_dim: int, out_dim: int, norm: HeadNorm = "batch") -> nn.Sequential:
    """The official VoCo projection head: (Linear-norm-ReLU) x 2 then Linear.

    `norm="batch"` (official): BatchNorm without affine parameters or running statistics (always
    batch statistics, also for the teacher); the Linear layers before it drop their bias, which the
    normalisation would cancel anyway. `layer` / `group`: the same without affine, per crop; these
    keep the bias (a per-feature bias is not cancelled by normalising over a row's features).
    """
    bias = norm != "batch"
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=bias),
        head_norm(norm, hidden_dim, affine=False),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=bias),
        head_norm(norm, hidden_dim, affine=False),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class VoCoEncoder(nn.Module):
    """Backbone + pooling + projector: crops [M, 1, D, D, D] -> projections [M, proj_dim]."""

    def __init__(self, backbone: VoCoSwinEncoder | VoCoUNetEncoder, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone.pooled_features(x))


class VoCoModel(nn.Module):
    """Student encoder (trained) and, for the official loss, its EMA teacher (frozen parameters).

    `forward(batch)` runs every crop of the batch through the student in one call, so BatchNorm
    normalises over all random and base crops together ("norm on all instances" in the official
    code), and through the teacher under no_grad.
    """

    def __init__(self, student: VoCoEncoder, with_teacher: bool) -> None:
        super().__init__()
        self.student = student
        self.teacher = make_momentum_copy(student) if with_teacher else None

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        randoms, bases = batch["randoms"], batch["bases"]  # [B, k, 1, D, D, D], [B, n, 1, D, D, D]
        b, k, n = randoms.shape[0], randoms.shape[1], bases.shape[1]
        crops = torch.cat([randoms.flatten(0, 1), bases.flatten(0, 1)], dim=0).float()
        student = self.student(crops)
        outputs = {"random": student[: b * k].unflatten(0, (b, k)), "bases": student[b * k:].unflatten(0, (b, n))}
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(crops)
            outputs["random_teacher"] = teacher[: b * k].unflatten(0, (b, k))
            outputs["bases_teacher"] = teacher[b * k:].unflatten(0, (b, n))
        return outputs


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------
class VoCo(Method):
    """VoCo (Wu et al., CVPR 2024): predict random crops' positions among base crops of a region."""

    name: ClassVar[str] = "voco"
    config_cls: ClassVar[type[MethodConfig]] = VoCoConfig
    # The optimizer recipe is in each profile's "train" section; docs/methods/voco.md has the table
    # of sources (paper section / official file) that tests/test_profiles.py holds against it.
    # What the paper and the official code share: Swin-B encoder, 2048-d projector, the whole
    # foreground box resized, a 4x4x1 grid of base crops, every crop resized to 64^3.
    _SWIN_B_4X4: ClassVar[dict[str, Any]] = {
        "backbone": "swin", "feature_size": 48, "feature_pooling": "multiscale", "proj_hidden_dim": 2048,
        "proj_dim": 2048, "region_mode": "foreground_resize", "n_x": 4, "n_y": 4, "n_z": 1, "input_size": 64,
        "head_norm": "batch",
    }
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        # Paper (Sec. 4.2 and Appendix B, Table 9): AdamW, lr 1e-3, warm-up cosine with 100 warm-up
        # steps, "regularization weight" (weight decay) 1e-2, batch 4, sw batch 4 (random crops),
        # 100k steps, 1.5 mm spacing, resize to 384x384x64, crops resized to 64^3, 4x4 bases,
        # λ = 1 (Eq. 7), augmentation "random rotate and flip" (no intensity shift); the paper's loss
        # (Sec. 3.2-3.3), Eq. 5 read as the mean over unordered pairs (reg_reduction; its factor
        # 2/(n(n-1)) counts those pairs, and the official code normalises so). Not stated, the
        # official code's value: amsgrad, flip/rot90 probabilities 0.2, AMP, no clipping.
        "paper": {
            **_SWIN_B_4X4, "loss_form": "paper", "lambda_reg": 1.0, "reg_reduction": "pair_mean",
            "spacing_mm": 1.5, "shift_intensity_prob": 0.0,
            "region_size": (384, 384, 64), "num_random_crops": 4,
            "train": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-2, "amsgrad": True,
                      "schedule": "cosine", "warmup_steps": 100, "final_lr_fraction": 0.0,
                      "batch_size": 4, "accumulate": 1, "steps": 100_000, "grad_clip": None, "amp": True},
        },
        # Official code (Luffy03/VoCo voco_train.py, utils/data_utils.py, models/voco_head.py):
        # SwinUNETR feature_size 48, foreground box resized to 384x384x96, 4x4 base crops of 96^3,
        # 2 random crops (sw_batch_size 2), crops resized to 64^3 (roi 64), projector 2048-2048,
        # EMA teacher 0.9; AdamW(lr 1e-4, amsgrad=True, default weight decay 0.01), WarmupCosine
        # with 5000 warm-up steps over num_steps 250000, batch 2, AMP on (args.amp = True), and no
        # clipping (clip_grad_norm_ is only in the non-AMP branch, behind --grad_clip). get_loader has
        # no Spacingd (the --space_x/y/z arguments are unused); RandShiftIntensityd(0.1, p 0.1).
        "official": {
            **_SWIN_B_4X4, "loss_form": "official", "lambda_reg": 1.0, "teacher_momentum": 0.9,
            "region_size": (384, 384, 96), "num_random_crops": 2,
            "train": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-2, "amsgrad": True,
                      "schedule": "cosine", "warmup_steps": 5000, "final_lr_fraction": 0.0,
                      "batch_size": 2, "accumulate": 1, "steps": 250_000, "grad_clip": None, "amp": True},
        },
        # Small CPU settings: BasicUNet encoder (8..128 channels), the paper's 4x4 grid of 24x24x32
        # base crops in a 96x96x32 region (the demo phantoms are 96x96x64 voxels), 2 random crops,
        # every crop resized to 32^3 (18 crops a volume). Measured here (torch 2.13 CPU, shared
        # 2-core machine): one step on a batch of 2 volumes (36 crops: student forward + backward,
        # teacher forward, AdamW, EMA) costs 1.8 s of CPU time on one thread; 1.8-2.4 s wall per
        # step inside `rayssl pretrain` with 2 threads on the loaded machine. views() ~16 ms of CPU
        # a sample (paper profile: ~0.2-0.26 s).
        # The paper's loss form, not the official one: at this scale the official form's positive
        # term (the position prediction) rises for the first 40-60 steps while its negative and
        # regularisation terms fall, so a short run's held-out objective went up (0.51 -> 0.61 in the
        # README's 40-step run); the paper form's falls (1.23 -> 0.92), benchmarks/README.md, issue 14.
        # It also needs no teacher forward.
        "cpu": {
            "backbone": "unet", "unet_features": (8, 16, 32, 64, 128, 8), "feature_pooling": "multiscale",
            "proj_hidden_dim": 256, "proj_dim": 256, "loss_form": "paper", "lambda_reg": 1.0,
            # The official BatchNorm stays: it normalises over every crop of the step (2 volumes x 18
            # crops = 36 rows >= 16), and the loss compares crops of one step only (no queue).
            "head_norm": "batch",
            "reg_reduction": "pair_mean",
            "region_size": (96, 96, 32), "region_mode": "crop", "n_x": 4, "n_y": 4, "n_z": 1,
            "num_random_crops": 2, "input_size": 32,
            "train": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-2, "amsgrad": False,
                      "schedule": "cosine", "warmup_steps": 5, "final_lr_fraction": 0.0,
                      "batch_size": 2, "accumulate": 1, "steps": 40, "grad_clip": 1.0, "amp": True},
        },
    }
    find_unused_parameters: ClassVar[bool] = False
    # Regions arrive in the store's dtype (int16 HU): each piece is converted and scaled on its own,
    # so no region-sized float copy is made (~25% of a paper-size sample's CPU, benchmarks/README.md).
    read_dtype: ClassVar[str | None] = None

    config: VoCoConfig

    def __init__(self, config: VoCoConfig) -> None:
        super().__init__(config)
        self._augment: Compose | None = None

    # ---- CPU side ---------------------------------------------------------------------------
    def prepare(self, volumes: Sequence[VolumeInfo], *, runner: JobRunner = run_in_process) -> list[VolumeInfo]:
        """foreground_resize with prepare_regions: write every foreground box resized to region_size
        once (datasets_zarr.resized; reused by later runs) and stream from those regions.

        The regions go to `prepared_store` when set, else beside each volume's own store
        (`<store>.fg-XxYxZ.zarr`), so a run over several stores derives one regions store per store."""
        c = self.config
        if c.region_mode != "foreground_resize" or not c.prepare_regions:
            return list(volumes)
        from datasets_zarr.resized import default_resized_store, resize_foreground_boxes

        targets: dict[str, list[int]] = {}
        for i, volume in enumerate(volumes):
            out = c.prepared_store or default_resized_store(volume_store(volume), c.region_size)
            targets.setdefault(out, []).append(i)
        prepared: dict[int, VolumeInfo] = {}
        for out, members in targets.items():
            resized = resize_foreground_boxes([volumes[i] for i in members], c.region_size, out,
                                              runner=runner, via_spacing=c.spacing_mm)
            prepared.update(zip(members, resized))
        return [prepared[i] for i in range(len(volumes))]

    def check_volumes(self, volumes: Sequence[VolumeInfo]) -> None:
        wanted = self.config.spacing_mm
        # Prepared foreground regions are resampled to spacing_mm on the way to region_size (prepare), so
        # any store serves; other region modes cut the stored grid, which must then be at spacing_mm.
        resampled = self.config.region_mode == "foreground_resize" and self.config.prepare_regions
        if wanted is not None and not resampled:
            for v in volumes:
                if not np.allclose(v.spacing, (wanted,) * 3, rtol=0.02, atol=1e-3):
                    raise ValueError(
                        f"volume {v.id!r} has spacing {tuple(round(float(x), 3) for x in v.spacing)} mm, but "
                        f"voco.spacing_mm={wanted:g} asks for {wanted:g} mm isotropic voxels (the paper's Table 9 "
                        f"pre-processing) and region_mode={self.config.region_mode!r} cuts regions from the stored "
                        f"grid. Resample the store (`rayssl convert ... --spacing {wanted:g}`), use "
                        f"region_mode=foreground_resize with prepare_regions (which resamples each region), or set "
                        f"--set voco.spacing_mm=null to train at the store's spacing")
        if self.config.intensity == "ct_window":
            for v in volumes:
                if v.modality.upper() != "CT":
                    raise ValueError(
                        f"volume {v.id!r} has modality {v.modality!r} but VoCo's intensity='ct_window' expects CT in HU; "
                        f"use --set intensity=percentile for MR (or intensity=none for pre-scaled stores)"
                    )

    def plan(self, volumes: Sequence[VolumeInfo], index: int, rng: np.random.Generator,
             step: StepInfo | None = None) -> list[ReadRequest]:
        info = volumes[index]
        if self.config.region_mode == "foreground_resize":
            x0, y0, z0, x1, y1, z1 = info.bbox
            if x1 <= x0 or y1 <= y0 or z1 <= z0:
                box = ReadRequest(volume=index, start=(0, 0, 0), size=tuple(info.shape))
            else:
                box = ReadRequest(volume=index, start=(x0, y0, z0), size=(x1 - x0, y1 - y0, z1 - z0))
        else:
            box = ReadRequest(volume=index, start=region_start(info.bbox, info.shape, self.config.region_size, rng),
                              size=tuple(self.config.region_size))
        return with_intensity([box], volumes, self.intensity_rule())

    def _augmentation(self) -> Compose:
        # Built lazily: the method object is pickled to the data actors before views() runs there.
        if self._augment is None:
            c = self.config
            self._augment = Compose([
                RandFlip(prob=c.flip_prob, spatial_axis=0),
                RandFlip(prob=c.flip_prob, spatial_axis=1),
                RandFlip(prob=c.flip_prob, spatial_axis=2),
                RandRotate90(prob=c.rot90_prob, max_k=3),
                RandShiftIntensity(offsets=c.shift_intensity_offset, prob=c.shift_intensity_prob),
            ])
        return self._augment

    def _intensity_scaler(self, region: torch.Tensor, request: ReadRequest):
        """In-place map of a float piece by the request's intensity mapping, with bounds taken from the
        whole region, so every crop of the region shares one scaling (as when the official code scales
        the volume first: MONAI ScaleIntensityRange(a_min, a_max, 0, 1, clip=True), or its percentile form)."""
        mapping = self.request_intensity(request)
        bounds = mapping.bounds(region.numpy())
        return lambda piece: torch.from_numpy(mapping.apply(piece.numpy(), bounds, inplace=True))

    def views(self, crops: list[np.ndarray], requests: list[ReadRequest], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Base crops, random crops and their position labels from one region.

        Returns:
            "bases" [n, 1, D, D, D] float32, "randoms" [k, 1, D, D, D] float32,
            "labels" [k, n] float32 (rows sum to 1), "random_starts" [k, 3] int64 (each random
            crop's start inside the region, voxels; for inspection and tests).
        """
        c = self.config
        region_size = tuple(c.region_size)
        region = torch.from_numpy(np.ascontiguousarray(crops[0]))  # store dtype (int16 HU) or float32
        if tuple(region.shape) != region_size:
            if c.region_mode == "crop":
                raise ValueError(f"VoCo views: got a crop of shape {tuple(region.shape)} for a region of {region_size}; "
                                 f"the reader must return exactly the planned box")
            # foreground_resize: the official pipeline resizes the foreground box to the region size.
            region = F.interpolate(region.to(torch.float32)[None, None], size=region_size, mode="trilinear",
                                   align_corners=True)[0, 0]
        scale = self._intensity_scaler(region, requests[0])

        crop_size = c.base_size
        starts = np.stack([rng.integers(0, r - s + 1, size=c.num_random_crops) for r, s in zip(region_size, crop_size)], axis=1)
        labels = position_labels(starts, crop_size, region_size, c.grid)

        boxes = base_boxes(region_size, c.grid) + [(tuple(int(v) for v in s), crop_size) for s in starts]
        pieces = [region[s[0]:s[0] + z[0], s[1]:s[1] + z[1], s[2]:s[2] + z[2]] for s, z in boxes]
        resized = _scaled_and_resized(pieces, scale, c.input_size)  # [n + k, 1, D, D, D]

        # As the official code, every crop (base and random) draws its own flips / rotation / shift.
        # One seed per sample keeps views a function of `rng`; the crops then consume the stream in order.
        augment = self._augmentation()
        augment.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
        out = np.empty(tuple(resized.shape), dtype=np.float32)
        for i in range(len(resized)):
            out[i] = np.asarray(torch.as_tensor(augment(resized[i])))
        n = c.num_bases
        return {
            "bases": out[:n],
            "randoms": out[n:],
            "labels": labels,
            "random_starts": starts.astype(np.int64),
        }

    def preview_geometry(self, volumes: Sequence[VolumeInfo], requests: list[ReadRequest],
                         views: dict[str, np.ndarray], model: nn.Module | None = None) -> PreviewFigure:
        """The region on its volume with the base grid and the random crops, each base crop noting
        the overlap labels (fraction of random crop r inside it) that `views` computed."""
        c = self.config
        region = requests[0]
        # Region voxels -> volume voxels (foreground_resize: the read box was resized to region_size).
        scale = np.asarray(region.size, dtype=np.float64) / np.asarray(c.region_size, dtype=np.float64)
        origin = np.asarray(region.start, dtype=np.float64)

        def to_volume(start: Sequence[int], size: Sequence[int]) -> tuple[tuple[float, ...], tuple[float, ...]]:
            return (tuple(float(v) for v in origin + np.asarray(start) * scale),
                    tuple(float(v) for v in np.asarray(size) * scale))

        labels = np.asarray(views["labels"], dtype=np.float64)
        starts = np.asarray(views["random_starts"], dtype=np.int64)
        boxes = []
        for i, (start, size) in enumerate(base_boxes(c.region_size, c.grid)):
            note = "\n".join(f"r{r} {labels[r, i]:.2f}" for r in range(len(labels)) if labels[r, i] > 0)
            boxes.append(PreviewBox(*to_volume(start, size), "base crop", f"b{i}", note))  # type: ignore[arg-type]
        # The region's outline over the grid's outer edges, the random crops on top.
        boxes.append(PreviewBox(*to_volume((0, 0, 0), c.region_size), "region", linewidth=2.5))  # type: ignore[arg-type]
        for r, start in enumerate(starts):
            boxes.append(PreviewBox(*to_volume(start, c.base_size), "random crop", f"r{r}"))  # type: ignore[arg-type]
        volume = volumes[region.volume]
        scene = PreviewScene(region.volume, f"volume {volume.id}: region {tuple(c.region_size)} ({c.region_mode}), "
                             f"{'x'.join(map(str, c.grid))} base crops, {len(starts)} random crops",
                             box_centre(*to_volume((0, 0, 0), c.region_size)), boxes, planes=("axial", "coronal"))
        images = []
        nx, ny, nz = c.grid
        d = c.input_size
        mosaic = np.zeros((nx * d, ny * d), dtype=np.float32)
        for i in range(nx):
            for j in range(ny):
                mosaic[i * d:(i + 1) * d, j * d:(j + 1) * d] = mid_slice(views["bases"][(i * ny + j) * nz + nz // 2])
        images.append(PreviewImage(f"base crops as streamed, z layer {nz // 2} (each resized to {d}^3\n"
                                   f"and augmented on its own: flips, rot90)", mosaic))
        for r in range(len(starts)):
            top = np.argsort(-labels[r])[:3]
            text = ", ".join(f"b{i} {labels[r, i]:.2f}" for i in top if labels[r, i] > 0)
            images.append(PreviewImage(f"random crop r{r} (middle slice)\nlabels: {text}", mid_slice(views["randoms"][r])))
        notes = [f"Overlap label of random crop r with base crop b = fraction of r's voxels inside b (rows sum to 1); "
                 f"written inside each base crop. Crops of {c.base_size} region voxels, resized to {d}^3.",
                 "Parts of the region outside the volume read as the volume's background value (padding)."]
        facts = {"region": {"start": list(origin), "size": [float(v) for v in np.asarray(region.size, dtype=float)]},
                 "region_size": list(c.region_size), "grid": list(c.grid), "base_size": list(c.base_size),
                 "random_starts_in_region": starts.tolist(), "labels": labels.tolist()}
        return PreviewFigure("VoCo: base crops and random crops of one region", [scene], images, notes, facts)

    # ---- model side ---------------------------------------------------------------------------
    def build_model(self) -> VoCoModel:
        c = self.config
        multiscale = c.feature_pooling == "multiscale"
        if c.backbone == "swin":
            backbone: VoCoSwinEncoder | VoCoUNetEncoder = VoCoSwinEncoder(c.feature_size, multiscale)
        else:
            backbone = VoCoUNetEncoder(c.unet_features, multiscale)
        student = VoCoEncoder(backbone, voco_projector(backbone.pooled_dim, c.proj_hidden_dim, c.proj_dim, c.head_norm))
        return VoCoModel(student, with_teacher=c.loss_form == "official")

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # float32 even under autocast: labels like 0.7257 and the +1e-6 inside the log do not survive bf16.
        out = {k: v.float() for k, v in outputs.items()}
        labels = batch["labels"].float()
        if self.config.loss_form == "paper":
            return voco_paper_loss(out["random"], out["bases"], labels, self.config.lambda_reg, self.config.log_eps,
                                   self.config.reg_reduction)
        return voco_official_loss(out["random"], out["bases"], out["random_teacher"], out["bases_teacher"],
                                  labels, self.config.lambda_reg)

    def after_step(self, model: nn.Module, outputs: dict[str, torch.Tensor], step: int, total_steps: int) -> dict[str, float]:
        if getattr(model, "teacher", None) is None:
            return {}
        momentum_update(model.student, model.teacher, self.config.teacher_momentum)
        return {"teacher_momentum": float(self.config.teacher_momentum)}

    def embeddings(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Student projections of every random and base crop."""
        return torch.cat([outputs["random"].flatten(0, 1), outputs["bases"].flatten(0, 1)])

    def backbone(self, model: nn.Module) -> nn.Module:
        if self.config.export_weights == "teacher":
            return model.teacher.backbone
        return model.student.backbone

    def export(self, model: nn.Module) -> ExportedBackbone:
        encoder = self.backbone(model)
        return ExportedBackbone.of(
            encoder,
            notes=(f"VoCo ({self.config.loss_form} loss), {self.config.export_weights} weights, pretrained on "
                   f"{self.config.input_size}^3 crops; set out_channels for the downstream task"),
        )

    def recipe(self) -> dict[str, str]:
        c = self.config
        network = (f"SwinUNETR encoder, feature_size {c.feature_size}" if c.backbone == "swin"
                   else f"BasicUNet encoder {tuple(c.unet_features)}")
        teacher = f"EMA {c.teacher_momentum:g}" if c.loss_form == "official" else "none"
        return {
            "network": network,
            "region": f"{_dims(c.region_size)} ({c.region_mode})",
            "base crops": f"{_dims(c.grid)} of {_dims(c.base_size)}",
            "crop input size": f"{c.input_size}^3",
            "random crops per volume": str(c.num_random_crops),
            "voxel spacing": (f"{c.spacing_mm:g} mm isotropic (each prepared region resampled to it before the resize; "
                              f"`crop` mode: stores converted at it)") if c.spacing_mm is not None
            else "the store's own",
            "augmentation": (f"flip p {c.flip_prob:g} per axis, rot90 p {c.rot90_prob:g}"
                             + (f", intensity shift ±{c.shift_intensity_offset:g} p {c.shift_intensity_prob:g}"
                                if c.shift_intensity_prob > 0 else "")),
            "loss form": c.loss_form,
            "L_reg (Eq. 5) reduction": (("mean over pairs i<j" if c.reg_reduction == "pair_mean"
                                         else "2/(n(n-1)) x sum over i≠j (2x the pair mean)")
                                        if c.loss_form == "paper" else "official: mean ReLU(cos)^2 over pairs i<j"),
            "λ": f"{c.lambda_reg:g}",
            "teacher": teacher,
            "projector normalisation": head_norm_text(c.head_norm),
        }

    def card(self) -> dict[str, Any]:
        c = self.config
        d = c.input_size
        return {
            "paper": "Wu, Zhuang, Chen. VoCo, CVPR 2024",
            "backbone": c.backbone,
            "pretraining_patch_size": [d, d, d],
            "region_size": list(c.region_size),
            "region_mode": c.region_mode,
            "base_grid": list(c.grid),
            "base_crop_size": list(c.base_size),
            "intensity": self.intensity_rule().as_dict(),
            "input_range": self.intensity_rule().resolve(None).value_range or "stored units",
            # VoCo fine-tunes SwinUNETR at 96^3 (official BTCV fine-tuning); a multiple of 32 for Swin.
            "recommended_downstream_patch_size": [96, 96, 96],
            "downstream_note": ("crops were resized by input_size / base_crop_size during pretraining; "
                                "fine-tune at the store's spacing with the same intensity scaling"),
        }


def _dims(values: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in values)


def _scaled_and_resized(pieces: list[torch.Tensor], scale, size: int) -> torch.Tensor:
    """Each piece as a float32 copy, intensity-scaled in place by `scale`, resized to size^3 with
    trilinear interpolation (align_corners, as the official Resized).

    One piece at a time: a stack of all pieces would be a fresh region-sized allocation per sample.
    Scaling before resizing equals scaling the region first (the map is elementwise).
    """
    target = (size, size, size)
    out = torch.empty((len(pieces), 1, *target), dtype=torch.float32)
    for i, piece in enumerate(pieces):
        piece = scale(piece.to(torch.float32, copy=True))
        if tuple(piece.shape) != target:
            piece = F.interpolate(piece[None, None], size=target, mode="trilinear", align_corners=True)[0, 0]
        out[i, 0] = piece
    return out


METHOD = VoCo
