"""The probes' settings: how they sample crops and voxels, fit their heads and repeat (ProbeConfig)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_FRACTIONS = (0.1, 0.3, 1.0)


@dataclass
class ProbeConfig:
    """How the probes sample data and fit their heads (defaults sized for 2 CPU cores)."""

    tasks: Literal["auto", "voxel", "patch", "both"] = "auto"
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    fraction_unit: Literal["crops", "volumes"] = "crops"
    patch: int | None = None  # crop edge; None = the pretraining patch from the model card
    crops_per_volume: int = 16
    voxels_per_class: int = 32  # sampled per class per fit crop for the voxel probe
    fit_fraction: float = 0.5  # share of labelled volumes the probes fit on
    seed: int = 0
    head_steps: int = 300
    head_lr: float = 0.01
    head_weight_decay: float = 1e-2
    eval_on: Literal["volumes", "crops"] = "volumes"  # voxel probe: whole eval volumes, or the eval crops (faster)
    overlap: float = 0.25  # sliding-window overlap on the eval volumes
    batch_size: int = 4
    baseline: bool = True  # also probe the randomly initialised network
    repeats: int = 5  # whole-probe repeats with other seeds of pools, subsets, heads and random init (for the CI)
    threads: int | None = None  # torch intra-op threads (None = leave as is)

    def __post_init__(self) -> None:
        self.fractions = tuple(float(f) for f in self.fractions)
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must lie in (0, 1], got {self.fractions}")
        if self.tasks not in ("auto", "voxel", "patch", "both"):
            raise ValueError(f"tasks={self.tasks!r}: use auto, voxel, patch or both")
        if self.eval_on not in ("volumes", "crops"):
            raise ValueError(f"eval_on={self.eval_on!r}: use volumes or crops")
        if self.fraction_unit not in ("crops", "volumes"):
            raise ValueError(f"fraction_unit={self.fraction_unit!r}: use crops or volumes")
        if not 0 < self.fit_fraction < 1:
            raise ValueError(f"fit_fraction must lie in (0, 1), got {self.fit_fraction}")
        for name in ("crops_per_volume", "voxels_per_class", "head_steps", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patch is not None and self.patch < 8:
            raise ValueError(f"patch must be >= 8 voxels, got {self.patch}")
