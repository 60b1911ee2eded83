"""What the data path and the methods exchange: a volume's manifest facts and a box to read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


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
    """

    volume: int
    start: tuple[int, int, int]
    size: tuple[int, int, int]
    array: str = "image"
