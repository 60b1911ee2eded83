"""The contract every SSL method implements: CPU-side plans and views, model, loss, state, export."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from rayssl.data.intensity import IntensityMapping, IntensityRule, RuleMode
from rayssl.data.jobs import JobRunner, run_in_process
from rayssl.data.types import ReadRequest, StepInfo, VolumeInfo
from rayssl.nn.backbones import Backbone


class MethodConfig(BaseModel):
    """Base of every method's typed config: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# The names a method config's `intensity` field may take, as rules of the intensity contract
# (rayssl/data/intensity.py): "auto"/"ct"/"ct_window" = the HU window for CT stored in HU (other
# volumes: scaled CT as stored, anything else by percentiles), "percentile"/"mr" = percentiles.
CONFIG_INTENSITY_MODES: dict[str, RuleMode] = {"auto": "hu_window", "ct": "hu_window", "ct_window": "hu_window",
                                               "percentile": "percentile", "mr": "percentile", "none": "none"}


def config_intensity_rule(config: MethodConfig) -> IntensityRule:
    """The IntensityRule a config's `intensity` field names, with its `ct_window` and `percentiles`
    (or `mr_percentiles`)."""
    mode = getattr(config, "intensity", "auto")
    window = tuple(float(v) for v in getattr(config, "ct_window", (-1000.0, 1000.0)))
    pct = getattr(config, "percentiles", None) or getattr(config, "mr_percentiles", None) or (0.5, 99.5)
    return IntensityRule(CONFIG_INTENSITY_MODES[mode], hu_window=window, percentiles=tuple(float(v) for v in pct))  # type: ignore[arg-type]


# A sample's keys that carry the random parameters of its device part (`Method.device_views`).
AUGMENTATION_PREFIX = "aug_"


def with_intensity(requests: Sequence[ReadRequest], volumes: Sequence[VolumeInfo], rule: IntensityRule) -> list[ReadRequest]:
    """`requests` with each image box carrying its volume's resolved mapping (what `views` applies)."""
    return [replace(r, intensity=rule.resolve(volumes[r.volume])) if r.array == "image" else r for r in requests]


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of `module`'s state dict (what an export holds, independent of training)."""
    return cpu_copy(module.state_dict())


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state dict."""
    return {k: v.detach().cpu().clone() for k, v in state.items()}


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

    @classmethod
    def of(cls, backbone: Backbone, notes: str = "",
           state_dict: dict[str, torch.Tensor] | None = None) -> "ExportedBackbone":
        """The export of a `rayssl.nn.backbones.Backbone`: its weights on the CPU under the network's own
        key names (or `state_dict`, e.g. without a pretext head) with the network, arguments and key
        groups the backbone names."""
        return cls(state_dict=cpu_copy(backbone.network_state_dict()) if state_dict is None else state_dict,
                   network=backbone.network(), network_kwargs=dict(backbone.network_kwargs),
                   key_groups=backbone.key_groups(), notes=notes)


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
    def plan(self, volumes: Sequence[VolumeInfo], index: int, rng: np.random.Generator,
             step: StepInfo | None = None) -> list[ReadRequest]:
        """Boxes to read for one sample whose primary volume is `volumes[index]`, each image box with
        its volume's intensity mapping (`with_intensity`): whatever `views` needs travels in the
        requests, since `views` runs on a copy of the method that never planned.

        `step` is given only to methods with `step_shared_plans` (None outside training: preview,
        streaming); others ignore it."""

    @abstractmethod
    def views(self, crops: list[np.ndarray], requests: list[ReadRequest], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Build the sample's views from the crops read for `requests` (in `read_dtype`, same order)."""

    @property
    def views_on(self) -> str:
        """Where the device part of the views runs: "actors" (inside `views`, on the data actor's CPU)
        or "device" (`device_views`, applied by the training loop). The method config's `views_on`
        field where it has one; a method without a device part is "actors"."""
        return str(getattr(self.config, "views_on", "actors"))

    def device_views(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """The device part of the views, batched, in torch, on the worker's `device`: the training loop
        applies it to every batch (and the held-out batches) before the forward pass.

        `batch` is what `views` returned, stacked. The actor part (chunk reads, crops) draws every random
        parameter from the sample's seed, and they travel in the batch under `AUGMENTATION_PREFIX` keys,
        so the device part is a deterministic function of the batch: a run stays reproducible and resume
        exact. A batch with such keys goes through `apply_augmentation` on `device`; one without them (a
        method with no device part, or a batch already finished) passes unchanged."""
        if not any(k.startswith(AUGMENTATION_PREFIX) for k in batch):
            return batch
        return self.apply_augmentation({k: torch.as_tensor(v).to(device) for k, v in batch.items()})

    def apply_augmentation(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The views of a batch whose augmentation parameters (`AUGMENTATION_PREFIX` keys) travel with it,
        on the batch's device, the parameters dropped. Only a method whose `views` puts such keys in a
        sample has one."""
        raise NotImplementedError(f"{type(self).__name__}.views put {AUGMENTATION_PREFIX}* keys in a sample "
                                  f"but the method has no apply_augmentation")

    def views_for(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What `views` returns for a `sample` carrying its augmentation parameters: the sample itself with
        `views_on: device` (the training loop finishes it), else finished here on the actor's CPU by the
        same function on a batch of one, so both paths give the same views."""
        return sample if self.views_on == "device" else self.finish_views(sample)

    def finish_views(self, views: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One sample's `views` with the device part applied on the CPU (preview, benchmarks, probes
        of one sample): a batch of one through `device_views`."""
        batch = {k: torch.from_numpy(np.array(v))[None] for k, v in views.items()}
        done = self.device_views(batch, torch.device("cpu"))
        if done is batch:
            return views
        return {k: v[0].detach().cpu().numpy() for k, v in done.items()}

    def intensity_rule(self) -> IntensityRule:
        """How this method maps stored values to network inputs, before it meets a volume (the
        intensity contract, rayssl/data/intensity.py). Default: `config_intensity_rule`."""
        return config_intensity_rule(self.config)

    def request_intensity(self, request: ReadRequest) -> IntensityMapping:
        """The mapping a view applies to `request`'s crop: the one its plan resolved, or (a request
        made outside a plan) the rule's mapping for CT stored in HU."""
        return request.intensity if request.intensity is not None else self.intensity_rule().resolve(None)

    def input_intensity(self, image: np.ndarray, volume: VolumeInfo) -> np.ndarray:
        """`image` (a whole volume or a crop, in stored units) mapped to the network's input range as
        this method's views map it: `intensity_rule` resolved for `volume`. Every probe (`rayssl
        probe`, the online probe, Tune) uses it, so a backbone is evaluated on the intensities it was
        pretrained on. Percentile rules take their percentiles over `image` (views take them over a crop)."""
        return self.intensity_rule().resolve(volume).apply(image)

    def check_volumes(self, volumes: Sequence[VolumeInfo]) -> None:
        """Raise ValueError naming a volume this method cannot use (before any worker starts)."""

    def prepare(self, volumes: Sequence[VolumeInfo], *, runner: JobRunner = run_in_process) -> list[VolumeInfo]:
        """Driver-side data preparation before streaming (e.g. DrasCLR's atlas registration).

        Work per volume (masks, registrations, resized regions) goes to `runner` as one job per
        volume, never to code that starts Ray: rayssl.train passes a runner of Ray tasks
        (rayssl.train.jobs), the default runs the jobs in this process (tests, notebooks).
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
