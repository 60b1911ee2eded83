"""MLSSCL: multiview (axial/coronal/sagittal) and long-short spatial clip contrastive pretraining.

Cao, Wang, Zhang, Zhang, Kang, Xu, "Multiview Long-Short Spatial Contrastive Learning for 3D Medical
Image Analysis", ICASSP 2022. No official code is public; this module is the reference
implementation of rayssl and states every reading of the paper it had to make.

What the method does (paper Sec. 2, checked against its text in ../shared/papers/mlsscl.md: Eq. 1
the pair loss L_N, Eq. 4 the multiview sum, Eq. 5 the long-short loss, Eq. 6 the weighted total;
the recipe is Sec. 3.1, "Implementation Details"):

* Views. From each volume, three *long* spatial clips, one per anatomical view: C slices taken with
  spatial stride δL along the view's axis at a random position (axial = planes of constant z,
  coronal = constant y, sagittal = constant x; arrays are (x, y, z) RAS). The axial clip is also
  the *long* clip of the long-short strategy. A *short* clip: C axial slices with stride δS < δL.
  Each clip is augmented independently (random crop and resize, mirror flip, intensity scale,
  intensity shift, Gaussian blur).
* Model. An online encoder (backbone + projector + predictor, trained by backprop) and a target
  encoder of the same architecture without predictor, updated by momentum (BYOL's cosine schedule
  from 0.99 to 1: the paper states the "starting momentum" 0.99 and follows BYOL, Sec. 2.4 and
  3.1; the rise to 1 is our reading, not stated). One memory queue of past target embeddings per
  target view gives negatives.
* Loss. L = α·L_multiview + β·L_long_short with InfoNCE pair losses L_N.

Readings of the paper (where it is not explicit) -- also listed in docs/methods/mlsscl.md:

1. Clip tensor layout. Every clip is a tensor [1, C, H, W]: channel, then the clip axis, then the
   two in-plane axes in (x, y, z) order: axial [z, x, y], coronal [y, x, z], sagittal [x, y, z].
   One 3D backbone serves all views; the clip axis is its first spatial dimension.
2. No downsampling along the clip axis. After building the MONAI network, every downsampling
   convolution (ResNet) / max-pool (BasicUNet encoder) gets stride (1, 2, 2) (and pool kernel
   (1, 2, 2)). Strides and pool sizes are not weights, so the state_dict layout is MONAI's and the
   export loads into the standard network (whose strides are (2, 2, 2)).
3. Head sizes. "1024->128" (ResNet-18) and "512->128" (UNet encoder) are read as projector hidden
   dim -> output dim; both hidden dims equal 2x the backbone feature dim (512 and 256), so the
   default hidden dim is 2x the feature dim. The predictor is 128 -> same hidden -> 128 (BYOL).
4. Pair loss. ℓ(v1 → v2) = InfoNCE(query = online predictor output of v1, positive = target
   projection of v2, negatives = the queue of view v2). The paper's Eq. 1 is one-directional,
   L_N(v1, v2) = ℓ(v1 → v2), and Eq. 4 sums three of them: L_multiview = L_N(a, c) + L_N(a, s) +
   L_N(c, s) (`multiview_direction: one_way`, every profile). `symmetric` sums both directions as
   CMC's two-view loss (Tian et al. 2020), which doubles L_multiview against L_long_short.
   The long-short loss is one direction, short clip predicting the long clip (as in long-short
   temporal contrastive learning of video): L_long_short = ℓ(S → L), negatives = the axial (long)
   queue. So there are three queues (axial, coronal, sagittal) and the target never embeds S.
5. Short clip position (the paper only says "randomly sample C axial slices with spatial stride
   δS", Sec. 2.4). By default the short clip lies inside the long (axial) clip: same in-plane
   window, z-range inside the long clip's z-range (a local part matched to its global context;
   it is cut from the long clip's crop, so no extra read). `short_clip_placement: anywhere` samples
   it independently in the volume (one more read).
6. In-plane region. `plane_size` voxels square at a random in-plane position inside the foreground
   box, or (None) the whole foreground extent of the plane; then random crop and resize to
   `image_size`. No resampling to a common spacing here (the store's spacing is used as is).
7. Intensity. CT (HU): window `ct_window` (default [-1000, 1000]) -> [0, 1], clipped. MR:
   percentiles `mr_percentiles` (default 0.5, 99.5) of all clips of the sample jointly -> [0, 1].
   `intensity: auto` (= `ct`) picks per volume from the manifest (rayssl/data/intensity.py: CT stored
   in HU -> window, CT scaled at conversion -> unchanged, MR -> percentiles: a HU window flattens
   MR); the plan's read requests carry the volume's mapping to `views`.
   Augmentations then act on [0, 1] intensities.
8. Normalisation. The paper's ResNet-18 and BYOL-style heads use BatchNorm (`norm: batch`,
   `head_norm: batch`, the `paper` profile). All clips of a batch go through the backbone and heads
   concatenated (4·B rows online, 3·B rows target), so BN always sees >= 3 rows; but at the `cpu`
   profile's batch of 2 its statistics are those of two volumes, and a key normalised by one step's
   statistics is not comparable with the queue's keys from other steps: the InfoNCE terms sat at
   chance (issue 24). The `cpu` profile uses GroupNorm(4) in the ResNet (`norm: group`; the export
   names `rayssl.nn.backbones.monai_resnet_with_norm`, which rebuilds MONAI's ResNet with that norm)
   and LayerNorm in the heads (`head_norm: layer`). The BasicUNet encoder keeps MONAI's instance norm whatever `norm`.
9. Queues start empty (not MoCo's random unit vectors, which are easy negatives): a pair loss uses
   only the filled entries of its queue, so its chance level is ln(1 + filled). On the first step,
   with every queue empty, the other keys of the batch are the negatives (chance ln B; a batch of
   one gives 0 and no gradient). `valid_negatives(batch_size)` says which K holds.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    RandFlip,
    RandGaussianSmooth,
    RandScaleCrop,
    RandScaleIntensity,
    RandShiftIntensity,
    Resize,
)
from pydantic import Field, model_validator
from torch import nn

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
    other_rows,
    with_intensity,
)
from rayssl.nn.backbones import ResNetEncoder, UNetEncoder, global_pool
from rayssl.nn.contrastive import info_nce
from rayssl.nn.dist import gather_concat
from rayssl.nn.heads import mlp
from rayssl.nn.momentum import cosine_momentum, make_momentum_copy, momentum_update
from rayssl.nn.norm import ConvNorm, HeadNorm, RunningCentre, conv_norm_text, head_norm_text
from rayssl.nn.queue import MemoryQueue, NamedQueues

# Views keyed by name; the array axis that is constant on each slice of the view's clip.
VIEW_AXES: dict[str, int] = {"axial": 2, "coronal": 1, "sagittal": 0}
TARGET_VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")  # views with a target embedding and a queue
ONLINE_VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal", "short")
MULTIVIEW_PAIRS: tuple[tuple[str, str], ...] = (("axial", "coronal"), ("axial", "sagittal"), ("coronal", "sagittal"))


class MLSSCLConfig(MethodConfig):
    """MLSSCL settings; defaults are the paper's where it gives them (see the module docstring)."""

    # Clips (paper: C = 16, δL = 4, δS = 2).
    clip_length: int = Field(16, ge=1, description="C: slices per clip")
    long_stride: int = Field(4, ge=1, description="δL: spatial stride of the long (and view) clips")
    short_stride: int = Field(2, ge=1, description="δS: spatial stride of the short clip (δS < δL)")
    short_clip_placement: Literal["inside_long", "anywhere"] = "inside_long"
    plane_size: int | None = Field(None, ge=1, description="in-plane read window (voxels); None = foreground extent")
    image_size: int = Field(128, ge=4, description="in-plane size H = W of every clip after resize")

    # Intensity.
    intensity: Literal["auto", "ct", "mr", "none"] = "auto"
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)

    # Augmentation (paper: random crop and resize, mirror flip, intensity scale/shift, Gaussian blur).
    augment: bool = True
    crop_scale: tuple[float, float] = (0.7, 1.0)  # side-length fraction of the random crop, per in-plane axis
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    intensity_scale: float = Field(0.1, ge=0.0)
    intensity_shift: float = Field(0.1, ge=0.0)
    intensity_prob: float = Field(0.5, ge=0.0, le=1.0)
    blur_prob: float = Field(0.2, ge=0.0, le=1.0)
    blur_sigma: tuple[float, float] = (0.25, 1.0)

    # Model.
    backbone: Literal["resnet18", "unet"] = "resnet18"
    resnet_widen_factor: float = Field(1.0, gt=0.0)
    unet_features: tuple[int, int, int, int, int, int] = (32, 32, 64, 128, 256, 32)
    proj_hidden_dim: int | None = Field(None, ge=1, description="None = 2 x backbone feature dim (paper: 1024 / 512)")
    proj_dim: int = Field(128, ge=1)
    pred_hidden_dim: int | None = Field(None, ge=1, description="None = proj_hidden_dim")
    norm: ConvNorm = Field("batch", description="ResNet norm layers: batch (paper) needs a large batch; group / "
                           "layer / instance do not depend on the batch (docs/methods/mlsscl.md)")
    head_norm: HeadNorm = Field("batch", description="projector / predictor norm: batch (paper, BYOL) or the "
                                "batch-independent layer / group")
    centre_projection: bool = Field(False, description="subtract a running mean from the projector's and the "
                                    "predictor's output (rayssl.nn.norm.RunningCentre): keeps embeddings apart "
                                    "without BatchNorm")

    # Loss and momentum.
    temperature: float = Field(0.2, gt=0.0)
    queue_length: int = Field(320, ge=1)
    momentum: float = Field(0.99, ge=0.0, le=1.0, description="base momentum, cosine-scheduled to 1")
    alpha: float = Field(0.5, ge=0.0, description="weight of L_multiview")
    beta: float = Field(0.5, ge=0.0, description="weight of L_long_short")
    multiview_direction: Literal["one_way", "symmetric"] = Field(
        "one_way", description="pair loss L_N(v1, v2): one_way = ℓ(v1 → v2) as the paper's Eq. 1 (v1 anchors); "
        "symmetric = ℓ(v1 → v2) + ℓ(v2 → v1) as CMC (doubles L_multiview's weight against L_long_short)")

    @model_validator(mode="after")
    def _check_ranges(self) -> "MLSSCLConfig":
        if self.short_stride >= self.long_stride:
            raise ValueError(f"short_stride ({self.short_stride}) must be < long_stride ({self.long_stride})")
        if not self.ct_window[0] < self.ct_window[1]:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {self.ct_window}")
        if not 0.0 <= self.mr_percentiles[0] < self.mr_percentiles[1] <= 100.0:
            raise ValueError(f"mr_percentiles must satisfy 0 <= low < high <= 100, got {self.mr_percentiles}")
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")
        return self


def keep_clip_axis(module: nn.Module) -> nn.Module:
    """Make every downsampling conv / max-pool of a 3D network stride 1 along the first spatial axis.

    Changes attributes only (stride, pool kernel), never parameters, so the state_dict keeps the
    layout of the MONAI network it came from. Returns `module` for chaining.
    """
    for sub in module.modules():
        if isinstance(sub, nn.Conv3d) and sub.stride[0] > 1:
            sub.stride = (1, *sub.stride[1:])
        elif isinstance(sub, nn.MaxPool3d):
            kernel = _triple(sub.kernel_size)
            stride = _triple(sub.stride)
            if stride[0] > 1:
                sub.kernel_size = (1, *kernel[1:])
                sub.stride = (1, *stride[1:])
    return module


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    return tuple(value)  # type: ignore[return-value]


class MLSSCLModel(nn.Module):
    """Online encoder (backbone + projector) + predictor, and its momentum target (no predictor).

    `forward(batch)` embeds all four clips with the online branch and the three view clips with
    the target branch, each branch in one concatenated pass (so heads' BatchNorm1d sees >= 3 rows).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, proj_hidden_dim: int, proj_dim: int,
                 pred_hidden_dim: int, head_norm: HeadNorm = "batch", centre_projection: bool = False) -> None:
        super().__init__()
        projector = mlp(feature_dim, proj_hidden_dim, proj_dim, norm=head_norm)
        if centre_projection:
            projector.append(RunningCentre(proj_dim))
        self.online = nn.ModuleDict({"backbone": backbone, "projector": projector})
        self.predictor = mlp(proj_dim, pred_hidden_dim, proj_dim, norm=head_norm)
        if centre_projection:  # the queries too: the loss compares predictions with projections
            self.predictor.append(RunningCentre(proj_dim))
        self.target = make_momentum_copy(self.online)

    @staticmethod
    def _embed(branch: nn.ModuleDict, clips: torch.Tensor) -> torch.Tensor:
        return branch["projector"](global_pool(branch["backbone"](clips)))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch_size = batch["axial"].shape[0]
        online = self.predictor(self._embed(self.online, torch.cat([batch[v] for v in ONLINE_VIEWS])))
        with torch.no_grad():
            target = self._embed(self.target, torch.cat([batch[v] for v in TARGET_VIEWS]))
        outputs: dict[str, torch.Tensor] = {}
        for i, view in enumerate(ONLINE_VIEWS):
            outputs[f"online_{view}"] = online[i * batch_size:(i + 1) * batch_size]
        for i, view in enumerate(TARGET_VIEWS):
            outputs[f"target_{view}"] = target[i * batch_size:(i + 1) * batch_size].detach()
        return outputs


class MLSSCL(Method):
    """Multiview long-short spatial contrastive learning (Cao et al., ICASSP 2022)."""

    name: ClassVar[str] = "mlsscl"
    config_cls: ClassVar[type[MethodConfig]] = MLSSCLConfig
    # The optimizer recipe is in each profile's "train" section; docs/methods/mlsscl.md has the
    # table of sources that tests/test_profiles.py holds against `rayssl recipe`.
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        # Small enough for the 2-core demo run: 8 x 24 x 24 clips, ResNet-18 at quarter width.
        "cpu": {
            "clip_length": 8, "long_stride": 4, "short_stride": 2, "plane_size": 48, "image_size": 24,
            "resnet_widen_factor": 0.25, "proj_dim": 64, "queue_length": 64, "temperature": 0.2,
            # GroupNorm in the ResNet (batch-independent); BatchNorm in the heads, as the paper's, over
            # a batch of 6 volumes (24 online rows, 18 target rows: >= 16). LayerNorm heads collapsed the
            # embedding to one vector within 10 steps; BatchNorm heads standardise over samples and the
            # fixed-negative held-out objective falls below chance (issue 24, docs/methods/mlsscl.md).
            "norm": "group", "head_norm": "batch",
            "momentum": 0.99, "alpha": 0.5, "beta": 0.5, "multiview_direction": "one_way",
            "train": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-5, "schedule": "cosine",
                      "warmup_steps": 5, "final_lr_fraction": 0.0, "batch_size": 6, "accumulate": 1,
                      "steps": 40, "grad_clip": 1.0, "amp": True},
        },
        # Paper Sec. 3.1 ("Implementation Details"): C, δL, δS, α, β, B = 64, queue 320, starting
        # momentum 0.99, ResNet-18 with a 3x3x3 first conv, (1024, 128) heads, SGD lr 0.03 with cosine
        # decay, 100 epochs. Not in the paper, and no code to read, so rayssl's choices: τ = 0.2
        # (MoCo v2's value), SGD momentum 0.9 and weight decay 1e-4 (MoCo's), no warm-up, fp32, no
        # clipping, no stem max-pool, momentum rising to 1 (BYOL's), the short clip inside the long
        # clip, the whole foreground plane resized to 128 x 128.
        "paper": {
            "clip_length": 16, "long_stride": 4, "short_stride": 2, "plane_size": None, "image_size": 128,
            "backbone": "resnet18", "resnet_widen_factor": 1.0, "proj_dim": 128, "queue_length": 320,
            "norm": "batch", "head_norm": "batch",
            "temperature": 0.2, "momentum": 0.99, "alpha": 0.5, "beta": 0.5, "multiview_direction": "one_way",
            "train": {"optimizer": "sgd", "lr": 0.03, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4,
                      "schedule": "cosine", "warmup_steps": 0, "final_lr_fraction": 0.0, "batch_size": 64,
                      "accumulate": 1, "epochs": 100, "grad_clip": None, "amp": False},
        },
    }
    missing_profiles: ClassVar[dict[str, str]] = {
        "official": "MLSSCL has no public code, so there is no official recipe (use --profile paper)",
    }
    config: MLSSCLConfig

    def __init__(self, config: MLSSCLConfig) -> None:
        super().__init__(config)
        self._queues: NamedQueues | None = None

    # ---- CPU side -------------------------------------------------------------------------
    def check_volumes(self, volumes: Sequence[VolumeInfo]) -> None:
        if self.config.intensity != "auto":
            return
        for volume in volumes:
            if volume.modality.upper() not in ("CT", "MR"):
                raise ValueError(
                    f"volume {volume.id!r} has modality {volume.modality!r}; intensity='auto' knows CT and MR, "
                    "set intensity to 'ct', 'mr' or 'none'"
                )

    def _span(self, stride: int) -> int:
        """Slices a clip of `clip_length` slices at `stride` covers (first to last, inclusive)."""
        return (self.config.clip_length - 1) * stride + 1

    def plan(self, volumes: Sequence[VolumeInfo], index: int, rng: np.random.Generator,
             step: StepInfo | None = None) -> list[ReadRequest]:
        """One box per view clip (axial, coronal, sagittal), plus one for the short clip if placed anywhere.

        Each box spans the clip's slices along its axis (first to last slice; `views` takes every
        stride-th) and the in-plane window, so only what the clips need is read.
        """
        volume = volumes[index]
        long_span = self._span(self.config.long_stride)
        requests = [self._clip_request(volume, axis, long_span, rng) for axis in VIEW_AXES.values()]
        if self.config.short_clip_placement == "anywhere":
            requests.append(self._clip_request(volume, VIEW_AXES["axial"], self._span(self.config.short_stride), rng))
        return with_intensity(requests, volumes, self.intensity_rule())

    def _clip_request(self, volume: VolumeInfo, clip_axis: int, span: int, rng: np.random.Generator) -> ReadRequest:
        start, size = [], []
        for axis in range(3):
            lo, hi = volume.bbox[axis], volume.bbox[axis + 3]
            if hi <= lo:  # empty foreground box: fall back to the whole axis
                lo, hi = 0, volume.shape[axis]
            if axis == clip_axis:
                length = span
            else:
                length = self.config.plane_size if self.config.plane_size is not None else max(hi - lo, 1)
            start.append(_random_start(lo, hi, length, rng))
            size.append(length)
        return ReadRequest(volume=volume.index, start=tuple(start), size=tuple(size))  # type: ignore[arg-type]

    def views(self, crops: list[np.ndarray], requests: list[ReadRequest], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Four clips [1, C, H, W] float32: "axial" (= long), "coronal", "sagittal", "short"; and
        "short_offset" (int64): the short clip's first slice, counted from the start of its read box."""
        cfg = self.config
        expected = 4 if cfg.short_clip_placement == "anywhere" else 3
        if len(crops) != expected:
            raise ValueError(f"MLSSCL expects {expected} crops (from its plan), got {len(crops)}")
        crops = self._normalise_intensity(crops, requests)
        axial_crop, coronal_crop, sagittal_crop = crops[0], crops[1], crops[2]
        long_stride, short_stride = cfg.long_stride, cfg.short_stride
        clips = {
            # Layout: clip axis first, then the other two axes in (x, y, z) order.
            "axial": np.moveaxis(axial_crop[:, :, ::long_stride], 2, 0),  # [z, x, y]
            "coronal": np.moveaxis(coronal_crop[:, ::long_stride, :], 1, 0),  # [y, x, z]
            "sagittal": sagittal_crop[::long_stride],  # [x, y, z]
        }
        short_span = self._span(short_stride)
        if cfg.short_clip_placement == "inside_long":
            offset = int(rng.integers(0, self._span(long_stride) - short_span + 1))
            short = axial_crop[:, :, offset:offset + short_span:short_stride]
        else:
            offset = 0
            short = crops[3][:, :, ::short_stride]
        clips["short"] = np.moveaxis(short, 2, 0)
        out = {}
        for name in ONLINE_VIEWS:
            clip = clips[name]
            if clip.shape[0] != cfg.clip_length:
                raise ValueError(f"{name} clip has {clip.shape[0]} slices, expected {cfg.clip_length}")
            out[name] = self._augment(np.ascontiguousarray(clip, dtype=np.float32), rng)[None]
        # First slice of the short clip inside its box (the long clip's box when inside_long), in
        # slices along z: where the short clip sits, for `rayssl preview` and tests.
        out["short_offset"] = np.asarray(offset, dtype=np.int64)
        return out

    def preview_geometry(self, volumes: Sequence[VolumeInfo], requests: list[ReadRequest],
                         views: dict[str, np.ndarray], model: nn.Module | None = None) -> PreviewFigure:
        """The three view clips and the short clip on the volume: each read box, with the slices the
        clip takes drawn across it (stride δL for the view clips, δS for the short clip)."""
        cfg = self.config
        C, long_stride, short_stride = cfg.clip_length, cfg.long_stride, cfg.short_stride
        boxes = []
        for (view, axis), request in zip(VIEW_AXES.items(), requests):
            slices = tuple(float(request.start[axis] + i * long_stride) for i in range(C))
            boxes.append(PreviewBox(tuple(float(v) for v in request.start), tuple(float(v) for v in request.size),  # type: ignore[arg-type]
                                    f"{view} clip" + (" (= long clip)" if view == "axial" else ""), view,
                                    slices=(axis, slices)))
        offset = int(np.asarray(views["short_offset"]).reshape(-1)[0])
        base = requests[0] if cfg.short_clip_placement == "inside_long" else requests[3]
        short_start = (base.start[0], base.start[1], base.start[2] + offset)
        short_size = (base.size[0], base.size[1], self._span(short_stride))
        boxes.append(PreviewBox(tuple(float(v) for v in short_start), tuple(float(v) for v in short_size),  # type: ignore[arg-type]
                                "short clip", "short",
                                slices=(2, tuple(float(short_start[2] + i * short_stride) for i in range(C)))))
        volume = volumes[requests[0].volume]
        scene = PreviewScene(requests[0].volume, f"volume {volume.id}: {C}-slice clips, long stride δL={long_stride}, "
                             f"short stride δS={short_stride} (short clip {cfg.short_clip_placement})",
                             box_centre(requests[0].start, requests[0].size), boxes)
        images = [PreviewImage(f"{view} clip, slice {C // 2} of {C}\n(augmented, {cfg.image_size}^2)",
                               np.asarray(views[view], dtype=np.float32)[0, C // 2]) for view in ONLINE_VIEWS]
        notes = [f"Boxes are the voxels read for each clip; lines across a box are the {C} slices the clip takes. "
                 "In-plane, each clip is then randomly cropped and resized (augmentation), so a view shows part of its window.",
                 "The short clip (δS) predicts the long axial clip (δL): L_long_short; the three views contrast each other: L_multiview."]
        facts = {"clip_boxes": {view: {"start": list(r.start), "size": list(r.size)} for view, r in zip(VIEW_AXES, requests)},
                 "short_box": {"start": list(short_start), "size": list(short_size)}, "short_offset": offset,
                 "placement": cfg.short_clip_placement, "clip_length": C, "long_stride": long_stride,
                 "short_stride": short_stride}
        return PreviewFigure("MLSSCL: three view clips and the short clip", [scene], images, notes, facts)

    def _normalise_intensity(self, crops: list[np.ndarray], requests: list[ReadRequest]) -> list[np.ndarray]:
        """The sample's clips mapped alike by the volume's intensity mapping (percentiles of all the
        sample's clips together, so all views share one scale)."""
        mapping = self.request_intensity(requests[0])
        bounds = mapping.bounds(*crops)
        return [mapping.apply(c, bounds) for c in crops]

    def _augment(self, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augment a clip [C, h, w] -> [C, image_size, image_size].

        The clip axis is used as the channel axis of 2D transforms, so one draw of every random
        transform applies to all slices of the clip alike (as video augmentation does per clip).
        """
        cfg = self.config
        size = (cfg.image_size, cfg.image_size)
        resize = Resize(spatial_size=size, mode="bilinear", anti_aliasing=True)
        if not cfg.augment:
            return np.asarray(resize(clip), dtype=np.float32)
        transforms = Compose([
            RandScaleCrop(roi_scale=cfg.crop_scale[0], max_roi_scale=cfg.crop_scale[1], random_size=True),
            resize,
            RandFlip(prob=cfg.flip_prob, spatial_axis=0),
            RandFlip(prob=cfg.flip_prob, spatial_axis=1),
            RandScaleIntensity(factors=cfg.intensity_scale, prob=cfg.intensity_prob),
            RandShiftIntensity(offsets=cfg.intensity_shift, prob=cfg.intensity_prob),
            RandGaussianSmooth(sigma_x=cfg.blur_sigma, sigma_y=cfg.blur_sigma, prob=cfg.blur_prob),
        ])
        transforms.set_random_state(seed=int(rng.integers(0, 2**32 - 1)))
        return np.asarray(transforms(clip), dtype=np.float32)

    # ---- model side -----------------------------------------------------------------------
    def _build_backbone(self) -> nn.Module:
        cfg = self.config
        if cfg.backbone == "resnet18":
            backbone: nn.Module = ResNetEncoder(depth=18, in_channels=1, widen_factor=cfg.resnet_widen_factor,
                                                norm=cfg.norm)
        else:
            backbone = UNetEncoder(in_channels=1, features=cfg.unet_features)
        return keep_clip_axis(backbone)

    def build_model(self) -> nn.Module:
        cfg = self.config
        backbone = self._build_backbone()
        feature_dim = int(backbone.out_channels)
        proj_hidden = cfg.proj_hidden_dim or 2 * feature_dim
        pred_hidden = cfg.pred_hidden_dim or proj_hidden
        return MLSSCLModel(backbone, feature_dim, proj_hidden, cfg.proj_dim, pred_hidden, head_norm=cfg.head_norm,
                           centre_projection=cfg.centre_projection)

    def _ensure_queues(self, device: torch.device | str) -> NamedQueues:
        if self._queues is None:
            # Empty: every DDP rank starts from the same queues, and no random entry is ever a negative.
            self._queues = NamedQueues({
                view: MemoryQueue(self.config.queue_length, self.config.proj_dim, device=device)
                for view in TARGET_VIEWS
            })
        return self._queues

    def setup(self, model: nn.Module, device: torch.device) -> None:
        self._ensure_queues(device).to(device)

    def _pair_loss(self, outputs: dict[str, torch.Tensor], query_view: str, key_view: str) -> torch.Tensor:
        """ℓ(v1 → v2): InfoNCE of the online prediction of v1 against the target of v2, negatives = the
        filled entries of v2's queue, or while it is empty (first step) the batch's other v2 keys."""
        query = outputs[f"online_{query_view}"]
        queue = self._ensure_queues(query.device)[key_view]
        negatives = queue.negatives().to(query.device, query.dtype) if queue.filled else None
        return info_nce(query, outputs[f"target_{key_view}"], negatives, self.config.temperature)

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """L = α·L_multiview + β·L_long_short (Cao et al., ICASSP 2022, total loss).

        L_multiview = L_N(a, c) + L_N(a, s) + L_N(c, s) (paper Eq. 4) with the pair loss of Eq. 1,
        L_N(v1, v2) = ℓ(v1 → v2): v1 anchors, positive and negatives from v2
        (`multiview_direction: one_way`, default); `symmetric` adds ℓ(v2 → v1) as CMC (Tian et al.
        2020) does. L_long_short = ℓ(S → L), the short clip predicting the long (axial) clip. ℓ is
        InfoNCE (Oord et al. 2018) with the key view's queue as negatives and temperature τ.

        Args:
            outputs: the model's forward outputs (online_<view> [B, D], target_<view> [B, D]).
            batch: the batch (unused; the clips were consumed by forward).
        """
        terms: dict[str, torch.Tensor] = {}
        multiview = outputs["online_axial"].new_zeros(())
        for first, second in MULTIVIEW_PAIRS:
            pair = self._pair_loss(outputs, first, second)
            if self.config.multiview_direction == "symmetric":
                pair = pair + self._pair_loss(outputs, second, first)
            terms[f"{first}_{second}"] = pair.detach()
            multiview = multiview + pair
        long_short = self._pair_loss(outputs, "short", "axial")
        total = self.config.alpha * multiview + self.config.beta * long_short
        return {"loss": total, "multiview": multiview.detach(), "long_short": long_short.detach(), **terms}

    def after_step(self, model: nn.Module, outputs: dict[str, torch.Tensor], step: int, total_steps: int) -> dict[str, float]:
        """Momentum update of the target (BYOL cosine schedule), then enqueue this step's target keys.

        Keys are gathered from all ranks first (MoCo's concat_all_gather), so every rank's queues
        receive the same keys in the same order and stay identical.
        """
        momentum = cosine_momentum(self.config.momentum, step, total_steps)
        momentum_update(model.online, model.target, momentum)
        queues = self._ensure_queues(outputs["target_axial"].device)
        for view in TARGET_VIEWS:
            keys = gather_concat(outputs[f"target_{view}"].detach())
            queues[view].enqueue(F.normalize(keys, dim=1))
        return {"momentum": momentum}

    def valid_negatives(self, batch_size: int) -> dict[str, int]:
        """Negatives of the pair losses keyed by each target view, now: K of their chance level
        ln(1 + K). The queue's filled entries (queue_length once full), or while it is empty the
        other `batch_size - 1` keys of a batch (per rank)."""
        return {view: queue.valid_negatives() or batch_size - 1 for view, queue in self._ensure_queues("cpu").items()}

    def state_dict(self) -> dict[str, Any]:
        """The three queues, as "queue_<view>_<field>" (rayssl.nn.queue.NamedQueues)."""
        return self._ensure_queues("cpu").state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ensure_queues("cpu").load_state_dict(state)

    # ---- export ---------------------------------------------------------------------------
    def embeddings(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Online predictions of every view of every clip."""
        return torch.cat([v for k, v in outputs.items() if k.startswith("online_")])

    def backbone(self, model: nn.Module) -> nn.Module:
        return model.online["backbone"]

    def export(self, model: nn.Module) -> ExportedBackbone:
        encoder = self.backbone(model)
        cfg = self.config
        notes = (
            "MLSSCL online encoder. Pretrained on clips [1, C, H, W] (clip axis = first spatial dim) with "
            f"C={cfg.clip_length}, H=W={cfg.image_size}; during pretraining every downsampling conv/pool had "
            "stride (1, 2, 2) so the clip axis was not downsampled. Strides are not weights: the standard "
            "MONAI network (strides (2, 2, 2)) loads these weights as they are."
        )
        return ExportedBackbone.of(encoder, notes=notes)

    def recipe(self) -> dict[str, str]:
        c = self.config
        network = (f"ResNet-18, width x{c.resnet_widen_factor:g}" if c.backbone == "resnet18"
                   else f"BasicUNet encoder {tuple(c.unet_features)}")
        plane = "foreground plane" if c.plane_size is None else f"{c.plane_size}^2 window"
        return {
            "network": network,
            "clips": f"C = {c.clip_length}, δL = {c.long_stride}, δS = {c.short_stride}",
            "short clip": ("inside the long (axial) clip" if c.short_clip_placement == "inside_long"
                           else "anywhere in the volume"),
            "clip in-plane size": f"{plane} resized to {c.image_size}^2",
            "normalisation": (f"{conv_norm_text(c.norm)} (ResNet), " if c.backbone == "resnet18" else "") +
                             f"{head_norm_text(c.head_norm)} (heads)",
            "loss form": f"{c.multiview_direction} pair loss, α = {c.alpha:g}, β = {c.beta:g}",
            "temperature": f"{c.temperature:g}",
            "queue size": str(c.queue_length),
            "target momentum": f"{c.momentum:g} -> 1 (cosine)",
        }

    def card(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "paper": "Cao et al. Multiview long-short spatial contrastive learning (MLSSCL), ICASSP 2022",
            "backbone": cfg.backbone,
            "pretraining_patch_size": [cfg.clip_length, cfg.image_size, cfg.image_size],
            "pretraining_input_layout": "[1, clip axis, in-plane a, in-plane b]; axial [z,x,y], coronal [y,x,z], sagittal [x,y,z]",
            "clip_strides": {"long": cfg.long_stride, "short": cfg.short_stride},
            "pretraining_spacing": "native store spacing (no resampling)",
            "intensity": {"mode": cfg.intensity, **self.intensity_rule().as_dict()},
            "recommended_downstream_patch_size": [cfg.image_size] * 3,
        }

    # Held-out reference (rayssl/train/heldout.py): at least 17 fixed samples in whole batches (18 at batch 2 or 6),
    # so K = M - 1 >= 16 negatives per anchor and chance ln M per term.
    heldout_reference_samples: ClassVar[int] = 17

    def heldout_reference(self, model: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                          outputs: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Every InfoNCE term of the loss with the live queue replaced by fixed negatives: for
        ℓ(v1 → v2), the anchors are the held-out loss's samples and anchor i's negatives are the
        current target encoder's keys of view v2 of the other M - 1 held-out samples (K = M - 1;
        for the samples beyond the loss's, only the target branch runs). The chance level of one
        term is ln(1 + K) = ln M (every logit equal), so L's is (3α + β)·ln M one-way, (6α + β)·ln M
        symmetric. An untrained encoder sits near it, or above (spread logits: E[-log p] >= ln M)."""
        rows = {k: torch.cat([o[k] for o in outputs]).float() for k in outputs[0]
                if k.startswith(("online_", "target_"))}
        keys = {view: [rows[f"target_{view}"]] for view in TARGET_VIEWS}
        for batch in batches[len(outputs):]:
            b = batch["axial"].shape[0]
            target = MLSSCLModel._embed(model.target, torch.cat([batch[v] for v in TARGET_VIEWS])).float()
            for i, view in enumerate(TARGET_VIEWS):
                keys[view].append(target[i * b:(i + 1) * b])
        anchors, m = rows["online_axial"].shape[0], sum(k.shape[0] for k in keys["axial"])
        if m < 2:
            return {}
        tau, chance = self.config.temperature, float(np.log(m))
        negatives = {view: other_rows(torch.cat(k))[:anchors] for view, k in keys.items()}

        def term(query_view: str, key_view: str) -> float:
            return float(info_nce(rows[f"online_{query_view}"], rows[f"target_{key_view}"], negatives[key_view], tau))

        out: dict[str, float] = {}
        multiview = multiview_chance = 0.0
        for first, second in MULTIVIEW_PAIRS:
            value, n_terms = term(first, second), 1
            if self.config.multiview_direction == "symmetric":
                value, n_terms = value + term(second, first), 2
            out[f"fixed_{first}_{second}"], out[f"chance_{first}_{second}"] = value, n_terms * chance
            multiview, multiview_chance = multiview + value, multiview_chance + n_terms * chance
        long_short = term("short", "axial")
        alpha, beta = self.config.alpha, self.config.beta
        out.update({"fixed_multiview": multiview, "fixed_long_short": long_short,
                    "fixed_total": alpha * multiview + beta * long_short,
                    "chance_multiview": multiview_chance, "chance_long_short": chance,
                    "chance": alpha * multiview_chance + beta * chance})
        return out


def _random_start(lo: int, hi: int, length: int, rng: np.random.Generator) -> int:
    """Start of a window of `length` inside [lo, hi) at a random position, centred when it does not fit."""
    extent = hi - lo
    if extent >= length:
        return lo + int(rng.integers(0, extent - length + 1))
    return lo - (length - extent) // 2


METHOD = MLSSCL
