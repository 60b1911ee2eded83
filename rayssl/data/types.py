"""What the data path and the methods exchange: a volume's manifest facts and a box to read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from rayssl.data.intensity import IntensityMapping


@dataclass(frozen=True)
class VolumeInfo:
    """What a planner may know about a volume without reading it (one manifest row)."""

    index: int  # row in the manifest
    id: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    bbox: tuple[int, int, int, int, int, int]  # foreground box, half-open [x0,y0,z0,x1,y1,z1]
    background: float  # value of voxels read outside the volume
    modality: str
    has_label: bool = False
    has_mask: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)  # other manifest columns


@dataclass(frozen=True)
class ReadRequest:
    """One box to read: voxels [start, start+size) of `array` of volume `volume` (manifest row).

    Boxes may reach outside the volume; outside voxels read as the volume's background value.
    What `views` needs from the plan besides the box travels here, never on the method object (the
    data actors run `views` on a copy that never planned): `intensity`, the volume's resolved
    mapping of stored values to network input, and `context`, method facts of the sample (e.g.
    DrasCLR's landmark). Neither takes part in equality: the box is the plan.
    """

    volume: int
    start: tuple[int, int, int]
    size: tuple[int, int, int]
    array: str = "image"
    intensity: IntensityMapping | None = field(default=None, compare=False)
    context: Mapping[str, Any] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class StepInfo:
    """What every sample of one optimizer step shares, for plans that must agree across a step.

    `step` is the optimizer step the sample belongs to (global sample index // samples_per_step),
    `samples_per_step` the effective batch (batch x workers x accumulate), `seed` the run seed.
    Given to `Method.plan` as `step=` only when the method sets `step_shared_plans`.
    """

    step: int
    samples_per_step: int
    seed: int
