"""One intensity contract: how stored voxel values become network inputs, resolved per volume from the manifest.

A method's config names an `IntensityRule` (HU window, percentile window, fixed range or none, and
the output range); `IntensityRule.resolve(volume)` turns it into the `IntensityMapping` of one
volume through ONE rule for "stored in Hounsfield units" (`hu_offset`). Views (through the plan's
read requests), probes, fine-tuning, preview and the export's metadata all use that mapping.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from rayssl.data.types import VolumeInfo

MappingKind = Literal["hu_window", "percentile", "fixed", "none"]
RuleMode = Literal["hu_window", "percentile", "fixed", "none"]
Range = tuple[float, float]


def recorded_intensity(volume: VolumeInfo) -> dict[str, Any]:
    """What the store records about the meaning of `volume`'s values (its `intensity` attribute, e.g.
    {"unit": "HU"}, carried by the manifest's "intensity" column as JSON), or {} for a manifest without it."""
    recorded = volume.extra.get("intensity")
    if isinstance(recorded, str):
        recorded = json.loads(recorded) if recorded.strip() else {}
    return dict(recorded) if isinstance(recorded, Mapping) else {}


def stored_hu_offset(modality: str, recorded: Mapping[str, Any] | None, dtype: str = "") -> float | None:
    """The one rule for "stored in HU": stored value = HU + offset for a CT volume stored in Hounsfield
    units, None for anything else (MR, CT scaled at conversion).

    The store's record decides (`recorded` = the volume's `intensity` attribute: unit "HU", optional
    `offset`, e.g. 1024 for a uint16 CT stored as HU + 1024); without a record (a manifest that
    predates it) the dtype datasets_zarr writes does: integers (int16) for CT in HU, float32 for CT
    windowed at conversion.
    """
    if str(modality).upper() != "CT":
        return None
    if recorded:
        return float(recorded.get("offset", 0.0)) if recorded.get("unit") == "HU" else None
    return None if str(dtype or "int16").startswith("float") else 0.0


def hu_offset(volume: VolumeInfo) -> float | None:
    """`stored_hu_offset` of a manifest row."""
    return stored_hu_offset(volume.modality, recorded_intensity(volume), str(volume.extra.get("dtype", "")))


@dataclass(frozen=True)
class IntensityMapping:
    """Stored values of one volume -> network input, as resolved for that volume.

    kind "hu_window": HU [low, high] (stored = HU + `hu_offset`) to `out_range`, clipped;
    "percentile": the image's [low, high] percentiles to `out_range`, clipped (a flat image maps to
    out_range[0]); "fixed": stored [low, high] to `out_range`, clipped; "none": values unchanged.
    """

    kind: MappingKind
    low: float = 0.0
    high: float = 1.0
    out_range: Range = (0.0, 1.0)
    hu_offset: float = 0.0

    def __post_init__(self) -> None:  # config lists and ints -> floats, so equal mappings compare and hash equal
        for name in ("low", "high", "hu_offset"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "out_range", tuple(float(v) for v in self.out_range))

    def bounds(self, *images: np.ndarray) -> Range | None:
        """The stored values mapped to `out_range` (percentiles taken over all `images` together), or
        None for "none"."""
        if self.kind == "none":
            return None
        if self.kind == "percentile":
            values = images[0] if len(images) == 1 else np.concatenate([np.ravel(i) for i in images])
            low, high = (float(v) for v in np.percentile(values, (self.low, self.high)))
            return low, high
        shift = self.hu_offset if self.kind == "hu_window" else 0.0
        return self.low + shift, self.high + shift

    def apply(self, image: np.ndarray, bounds: Range | None = None, out_range: Range | None = None,
              inplace: bool = False) -> np.ndarray:
        """`image` mapped to `out_range` (default: the mapping's) as float32. `bounds` are stored values
        (default: `self.bounds(image)`); pass one volume's or one sample's bounds to map its pieces
        alike. `inplace` writes into `image` when it is a writable float32 array."""
        out = np.asarray(image)
        out = out if inplace and out.dtype == np.float32 and out.flags.writeable else out.astype(np.float32)
        if self.kind == "none":
            return out
        low, high = bounds if bounds is not None else self.bounds(out)  # type: ignore[misc]
        out_low, out_high = out_range if out_range is not None else self.out_range
        if high <= low:  # a flat image (percentiles): nothing to scale
            out[...] = out_low
            return out
        np.clip(out, low, high, out=out)
        out -= low
        out /= high - low
        if (out_low, out_high) != (0.0, 1.0):
            out *= out_high - out_low
            out += out_low
        # float32 rounding of (x - low) / (high - low) can land an ulp outside the range (1.0000001)
        np.clip(out, min(out_low, out_high), max(out_low, out_high), out=out)
        return out

    @property
    def value_range(self) -> list[float] | None:
        """The inputs' range, or None when values stay in stored units ("none")."""
        return None if self.kind == "none" else [float(v) for v in self.out_range]

    def describe(self) -> str:
        """One line for cards and recipes, e.g. "HU window [-175, 250] -> [0, 1]"."""
        out = f"[{self.out_range[0]:g}, {self.out_range[1]:g}]"
        if self.kind == "hu_window":
            offset = f" (stored = HU + {self.hu_offset:g})" if self.hu_offset else ""
            return f"HU window [{self.low:g}, {self.high:g}]{offset} -> {out}"
        if self.kind == "percentile":
            return f"percentiles [{self.low:g}, {self.high:g}] of each input -> {out}"
        if self.kind == "fixed":
            return f"stored values [{self.low:g}, {self.high:g}] -> {out}"
        return "stored values unchanged"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out_range": list(self.out_range), "description": self.describe()}


@dataclass(frozen=True)
class IntensityRule:
    """A method's intensity setting, before it meets a volume.

    mode "hu_window": `hu_window` for CT stored in HU (`hu_offset`); any other volume as if "auto"
    had met it: CT scaled at conversion is used as stored (when `out_range` is [0, 1], the range such
    stores hold), everything else (MR) by `percentiles`. "percentile": `percentiles` for every
    volume. "fixed": stored `fixed_range` for every volume. "none": stored values unchanged.
    """

    mode: RuleMode
    hu_window: Range = (-1000.0, 1000.0)
    percentiles: Range = (0.5, 99.5)
    fixed_range: Range = (0.0, 1.0)
    out_range: Range = (0.0, 1.0)

    def _percentile(self) -> IntensityMapping:
        return IntensityMapping("percentile", *self.percentiles, out_range=self.out_range)

    def resolve(self, volume: VolumeInfo | None) -> IntensityMapping:
        """The mapping for `volume` (None: a volume not known here, taken as CT in HU for "hu_window")."""
        if volume is None:
            return self.resolve_stored("CT", 0.0)
        return self.resolve_stored(volume.modality, hu_offset(volume))

    def resolve_stored(self, modality: str, offset: float | None) -> IntensityMapping:
        """The mapping for a volume of `modality` whose `stored_hu_offset` is `offset` (from a store's
        attributes, where there is no manifest row)."""
        if self.mode == "none":
            return IntensityMapping("none", out_range=self.out_range)
        if self.mode == "percentile":
            return self._percentile()
        if self.mode == "fixed":
            return IntensityMapping("fixed", *self.fixed_range, out_range=self.out_range)
        if offset is not None:
            return IntensityMapping("hu_window", *self.hu_window, out_range=self.out_range, hu_offset=offset)
        if str(modality).upper() == "CT" and tuple(self.out_range) == (0.0, 1.0):
            return IntensityMapping("none", out_range=self.out_range)  # windowed to [0, 1] at conversion
        return self._percentile()

    def summary(self, volumes: Sequence[VolumeInfo]) -> dict[str, Any]:
        """The run's resolved mappings, for config records and cards: the rule, and each distinct
        mapping with the modalities and number of volumes it was resolved for."""
        groups: dict[IntensityMapping, dict[str, Any]] = {}
        for volume in volumes:
            entry = groups.setdefault(self.resolve(volume), {"modalities": set(), "volumes": 0})
            entry["modalities"].add(volume.modality.upper())
            entry["volumes"] += 1
        return {"rule": self.as_dict(),
                "resolved": [{**m.as_dict(), "modalities": sorted(e["modalities"]), "volumes": e["volumes"]}
                             for m, e in groups.items()]}

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def bundle_input_format(summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """MONAI bundle input facts (`format`, `modality`, `value_range`) from a run's `IntensityRule.summary`.

    value_range is the mappings' common output range ([] when a mapping leaves stored units);
    modality the volumes' modalities ("CT", "MR", or "CT+MR"; "unknown" when not recorded); format
    "hounsfield" when every mapping is a HU window, "magnitude" otherwise."""
    resolved = list((summary or {}).get("resolved", []))
    if not resolved:
        return {"format": "magnitude", "modality": "unknown", "value_range": []}
    modalities = sorted({m for r in resolved for m in r.get("modalities", [])})
    ranges = {tuple(r["out_range"]) if r["kind"] != "none" else None for r in resolved}
    value_range = list(next(iter(ranges))) if len(ranges) == 1 and None not in ranges else []
    hounsfield = all(r["kind"] == "hu_window" for r in resolved)
    return {"format": "hounsfield" if hounsfield else "magnitude",
            "modality": "+".join(modalities) if modalities else "unknown", "value_range": value_range}
