"""The contract every SSL method implements: CPU-side plans and views, model, loss, state, export."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from rayssl.data.types import ReadRequest, StepInfo, VolumeInfo  # noqa: F401 - StepInfo: plan()'s step argument


class MethodConfig(BaseModel):
    """Base of every method's typed config: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _window(image: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((image.astype(np.float32) - low) / (high - low), 0.0, 1.0)


def _percentile_window(image: np.ndarray, lower: float, upper: float) -> np.ndarray:
    low, high = (float(v) for v in np.percentile(image, (lower, upper)))
    if high <= low:
        return np.zeros(image.shape, dtype=np.float32)
    return _window(image, low, high)


def stored_in_hu(image: np.ndarray, volume: VolumeInfo) -> bool:
    """True for CT kept in HU (the store's integer dtype, or air far below -500 when the manifest has no dtype)."""
    dtype = str(volume.extra.get("dtype", ""))
    if dtype:
        return volume.modality.upper() == "CT" and not dtype.startswith("float")
    return volume.modality.upper() == "CT" and float(image.min()) <= -500.0


# Intensity rules that read stored values as CT HU (a window, GVSL's HU + 1024 clip).
CT_ONLY_INTENSITY = ("ct_window", "ct", "stored_2048")


def intensity_for_modality(mode: str, volume: VolumeInfo) -> str:
    """`mode`, or "percentile" when it is a CT-only rule and `volume` is not CT. A HU window flattens
    MR: VoCo's (-175, 250) squeezed MNI152's stored [0, 1] T1 into [0.412, 0.414]."""
    return "percentile" if mode in CT_ONLY_INTENSITY and volume.modality.upper() != "CT" else mode


def volume_intensity_mode(volume: VolumeInfo, configured: str) -> str:
    """One volume's intensity rule for a method's views, decided from the manifest on the driver: the
    configured rule (`intensity_for_modality`), or (auto) "ct" for CT stored in HU (int16), "none" for
    CT scaled at conversion (float32), "percentile" for anything else."""
    if configured != "auto":
        return intensity_for_modality(configured, volume)
    if volume.modality.upper() == "CT":
        return "none" if str(volume.extra.get("dtype", "int16")).startswith("float") else "ct"
    return "percentile"


def config_intensity(image: np.ndarray, volume: VolumeInfo, config: MethodConfig) -> np.ndarray:
    """Stored units -> network input by a config's `intensity` field ("ct_window"/"ct": its `ct_window`
    HU window to [0, 1], for CT only; "percentile"/"mr": its percentiles to [0, 1]; "none": unchanged;
    "auto": the window for CT in HU, unchanged for CT scaled at conversion, percentiles otherwise)."""
    mode = getattr(config, "intensity", "auto")
    if mode == "auto":
        mode = "ct" if stored_in_hu(image, volume) else ("none" if volume.modality.upper() == "CT" else "percentile")
    mode = intensity_for_modality(mode, volume)
    if mode in ("ct_window", "ct"):
        return _window(image, *tuple(getattr(config, "ct_window", (-1000.0, 1000.0))))
    if mode in ("percentile", "mr"):
        pct = getattr(config, "percentiles", None) or getattr(config, "mr_percentiles", None) or (0.5, 99.5)
        return _percentile_window(image, *tuple(pct))
    return image.astype(np.float32, copy=False)


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of `module`'s state dict (what an export holds, independent of training)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def other_rows(keys: torch.Tensor) -> torch.Tensor:
    """[M, M - 1, D] from keys [M, D]: row i holds every key but the i-th (the fixed negatives of
    anchor i in a held-out reference: the other held-out samples' keys)."""
    m = keys.shape[0]
    index = torch.arange(m, device=keys.device)
    others = index[None, :].expand(m, m)[index[:, None] != index[None, :]].view(m, m - 1)
    return keys[others]


@dataclass
class ExportedBackbone:
    """Backbone weights in the state_dict layout of a MONAI network, plus how to rebuild it."""

    state_dict: dict[str, torch.Tensor]
    network: str  # dotted import path, e.g. "monai.networks.nets.SwinUNETR"
    network_kwargs: dict[str, Any]
    key_groups: dict[str, list[str]]  # e.g. {"encoder": [...prefixes], "stem": [...], "input_projection": [...]}
    notes: str = ""


Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class PreviewBox:
    """A box to outline in a preview, in voxel coordinates of its scene's volume: [start, start+size).

    `group` names what the box is (legend entry, one colour per group), `label` tags it in a corner,
    `note` is written in its centre (e.g. overlap fractions). `slices` = (axis, positions): the
    planes along `axis` a clip actually takes (drawn as lines across the box).
    """

    start: Vec3
    size: Vec3
    group: str
    label: str = ""
    note: str = ""
    slices: tuple[int, tuple[float, ...]] | None = None
    linewidth: float = 1.4


@dataclass(frozen=True)
class PreviewPoint:
    """A point to mark in a preview, in voxel coordinates of its scene's volume."""

    position: Vec3
    group: str
    label: str = ""


@dataclass
class PreviewScene:
    """A volume (manifest row `volume`) drawn in orthogonal planes through `focus`, with boxes and points."""

    volume: int
    title: str
    focus: Vec3
    boxes: list[PreviewBox] = field(default_factory=list)
    points: list[PreviewPoint] = field(default_factory=list)
    planes: tuple[str, ...] = ("axial", "coronal", "sagittal")


@dataclass
class PreviewImage:
    """A 2D image beside the scenes (a view, a mosaic): indexed [horizontal, vertical] like the planes."""

    title: str
    image: np.ndarray
    display_range: tuple[float, float] | None = None  # grey-level range; None = the image's own percentiles


@dataclass
class PreviewFigure:
    """What `Method.preview_geometry` returns for one sample: scenes on volumes, images, notes, and
    JSON-able `facts` (the numbers behind the drawing, written beside the PNG for checking)."""

    title: str
    scenes: list[PreviewScene] = field(default_factory=list)
    images: list[PreviewImage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


def mid_slice(array: np.ndarray, axis: int = -1) -> np.ndarray:
    """The middle 2D slice of the last three dims of `array` (leading dims of size 1 dropped) across `axis`."""
    vol = np.asarray(array, dtype=np.float32).reshape(array.shape[-3:])
    return np.take(vol, vol.shape[axis] // 2, axis=axis)


def request_box(request: ReadRequest, group: str, label: str = "", note: str = "") -> PreviewBox:
    """A read request as a preview box."""
    return PreviewBox(tuple(float(v) for v in request.start), tuple(float(v) for v in request.size),  # type: ignore[arg-type]
                      group, label, note)


def box_centre(start: Sequence[float], size: Sequence[float]) -> Vec3:
    return tuple(float(a) + float(b) / 2.0 for a, b in zip(start, size))  # type: ignore[return-value]


class Method(ABC):
    """A self-supervised method: one module owns its views, model and loss.

    CPU side (runs in Ray Data actors): `plan` says which boxes to read for a sample, `views`
    turns the crops into the numeric arrays the model consumes. Model side (Ray Train workers):
    `build_model` returns a module whose `forward(batch)` computes everything the loss needs (so
    DDP sees one forward), `loss` returns the total under "loss" plus each term, `after_step`
    runs momentum updates and queue enqueues. Methods never import Ray.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]]
    # Profiles: named partial configs (method fields, plus "train"/"data" sections: the optimizer
    # recipe lives in "train"); "cpu" must finish the demo run in minutes on 2 cores, "paper" holds
    # the published settings (GPU-sized), "official" the official code's training.
    profiles: ClassVar[dict[str, dict[str, Any]]] = {"cpu": {}, "paper": {}}
    # Profiles a method cannot offer, with the reason (e.g. no public code for "official").
    missing_profiles: ClassVar[dict[str, str]] = {}
    # DDP flag for models whose forward leaves some parameters unused in a step.
    find_unused_parameters: ClassVar[bool] = False
    # dtype of the crops `views` receives: "float32", or None for the store's own dtype (e.g. int16
    # HU), for methods that convert per piece and would otherwise copy a whole region twice.
    read_dtype: ClassVar[str | None] = "float32"

    @property
    def step_shared_plans(self) -> bool:
        """True when `plan` takes `step: StepInfo` and every sample of one optimizer step, on every
        rank, must share what it draws from it (DrasCLR's landmark per batch). The trainer then
        plans with the step and streams micro-batch blocks that Ray Train deals to ranks in turn."""
        return False

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    @classmethod
    def profile_config(cls, profile: str) -> MethodConfig:
        """The method config `profile` sets (its method fields over the defaults; its "train" and
        "data" sections are run settings, resolved by rayssl.config.resolve_config)."""
        return cls.config_cls(**{k: v for k, v in cls.profiles[profile].items() if k not in ("train", "data")})

    # ---- CPU side -------------------------------------------------------------------------
    @abstractmethod
    def plan(self, volumes: Sequence[VolumeInfo], index: int, rng: np.random.Generator) -> list[ReadRequest]:
        """Boxes to read for one sample whose primary volume is `volumes[index]`.

        Methods with `step_shared_plans` also take `step: StepInfo | None` (None outside training:
        preview, streaming)."""

    @abstractmethod
    def views(self, crops: list[np.ndarray], requests: list[ReadRequest], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Build the sample's views from the crops read for `requests` (in `read_dtype`, same order)."""

    def input_intensity(self, image: np.ndarray, volume: VolumeInfo) -> np.ndarray:
        """`image` (a whole volume or a crop, in stored units) mapped to the network's input range as
        this method's views map it. Every probe (`rayssl probe`, the online probe, Tune) uses it, so a
        backbone is evaluated on the intensities it was pretrained on. Percentile rules take their
        percentiles over `image` (views take them over a crop). Default: `config_intensity`."""
        return config_intensity(image, volume, self.config)

    def check_volumes(self, volumes: Sequence[VolumeInfo]) -> None:
        """Raise ValueError naming a volume this method cannot use (before any worker starts)."""

    def prepare(self, volumes: Sequence[VolumeInfo]) -> list[VolumeInfo]:
        """Driver-side data preparation before streaming (e.g. DrasCLR's atlas registration).

        `volumes` may come from several stores (`--data A --data B`): each volume's own store is
        `rayssl.data.stores.volume_store(volume)` (its `extra["store"]`), and whatever is derived
        from a volume (arrays, attributes, manifest columns) is written there. Returns one
        VolumeInfo per input volume, in the same order, with extra per-volume facts in
        `VolumeInfo.extra` (they travel to the data actors with the plans). May also replace
        `self.config` to pin an automatic choice (DrasCLR's atlas): the run records the resolved
        config, so its model card and a resumed run use the same choice.
        """
        return list(volumes)

    def preview_geometry(self, volumes: Sequence[VolumeInfo], requests: list[ReadRequest],
                         views: dict[str, np.ndarray], model: nn.Module | None = None) -> PreviewFigure:
        """What `rayssl preview` draws for one streamed sample: `requests` is the sample's plan and
        `views` what `views` built from it; `model` (if given) may be run on the views.

        The default outlines the read boxes on the primary volume and shows the middle slice of
        every 3D float view; methods override it to show their own geometry.
        """
        first = requests[0]
        scene = PreviewScene(first.volume, f"volume {volumes[first.volume].id}: boxes read for this sample",
                             box_centre(first.start, first.size),
                             boxes=[request_box(r, "read box", f"{i}") for i, r in enumerate(requests)])
        images = []
        for key in sorted(views):
            value = np.asarray(views[key])
            if value.ndim >= 3 and np.issubdtype(value.dtype, np.floating):
                for idx in list(np.ndindex(*value.shape[:-3]))[:4]:
                    images.append(PreviewImage(f"{key}{list(idx) if idx else ''} (middle slice)", mid_slice(value[idx])))
        return PreviewFigure(f"{self.name}: read boxes and views", [scene], images[:12])

    # ---- model side -----------------------------------------------------------------------
    @abstractmethod
    def build_model(self) -> nn.Module:
        """Backbone + heads + target encoders; `forward(batch: dict[str, Tensor]) -> dict[str, Tensor]`."""

    @abstractmethod
    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"loss": total, <term>: value, ...}; every value a scalar tensor."""

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Called once on each worker after the model is on its device (create queues here)."""

    def embeddings(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The batch's representations as rows [N, D] (for representation-health metrics), or None."""
        return None

    def after_step(self, model: nn.Module, outputs: dict[str, torch.Tensor], step: int, total_steps: int) -> dict[str, float]:
        """Momentum updates, queue enqueues. `model` is unwrapped (no DDP). Returns extra metrics."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Method state outside the model (queues, counters): checkpointed, tensors only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    @abstractmethod
    def backbone(self, model: nn.Module) -> nn.Module:
        """The exportable encoder sub-module of `model` (unwrapped)."""

    @abstractmethod
    def export(self, model: nn.Module) -> ExportedBackbone:
        """Backbone weights in the layout of the matching MONAI network."""

    def card(self) -> dict[str, Any]:
        """Model-card facts: pretraining patch size, recommended downstream patch size, ..."""
        return {}

    def recipe(self) -> dict[str, str]:
        """The method's part of `rayssl recipe`: setting -> value as text (crop sizes, loss form,
        temperatures, queue sizes, ...), in the order docs/methods/<name>.md lists them."""
        return {}

    # ---- held-out reference (rayssl/train/heldout.py) ----------------------------------------
    # Fixed held-out samples `heldout_reference` needs at least (the trainer builds
    # max(train.heldout_samples, this)); the held-out loss still averages over the configured ones.
    heldout_reference_samples: ClassVar[int] = 0

    def heldout_reference(self, model: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                          outputs: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
        """A line to read the held-out curve against, on the fixed held-out batches: `outputs[j]` is
        the forward of `batches[j]` for the held-out loss's batches (the first `len(outputs)`); the
        method forwards what else it needs of the rest (e.g. target keys only). Called with no
        gradients, in train mode, with running statistics and the RNG restored afterwards.

        Contrastive methods score each term against negatives that do not change across the run
        and return {"fixed_<term>", "fixed_total", "chance_<term>", "chance"} (chance = ln(1 + K)
        per InfoNCE term, weighted as the loss weights its terms); a method with a trivial prediction
        returns {"identity": its loss, "identity_<term>": ...}. The default, {}, leaves the run's
        first held-out loss as the reference (`heldout_first`)."""
        return {}
