"""Several stores in one run: which store each volume lives in, per-store sampling weights turned into per-volume sample counts, and the per-store summary a run records."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from rayssl.data.types import VolumeInfo


def store_key(store: str) -> str:
    """How a store is named in VolumeInfo.extra["store"]: the URL, or the absolute local path."""
    return str(store) if "://" in str(store) else os.path.abspath(store)


def volume_store(volume: VolumeInfo) -> str:
    """The store `volume` is read from (its `extra["store"]`, filled by rayssl.data.volumes.load_volumes).

    Volumes of one run may come from several stores: whatever is derived from a volume (masks,
    registrations, resized regions) belongs to this store, never to the run's first one.
    """
    store = volume.extra.get("store")
    if not store:
        raise ValueError(f"volume {volume.id!r} carries no store (VolumeInfo.extra['store']); load volumes with "
                         f"rayssl.data.volumes.load_volumes(stores) so each one knows where it lives")
    return str(store)


def group_by_store(volumes: Sequence[VolumeInfo]) -> dict[str, list[VolumeInfo]]:
    """`volumes` grouped by `volume_store`, stores and volumes in first-seen order."""
    groups: dict[str, list[VolumeInfo]] = {}
    for volume in volumes:
        groups.setdefault(volume_store(volume), []).append(volume)
    return groups


def _largest_remainder(total: int, shares: Sequence[float]) -> np.ndarray:
    """Integers summing to `total`, proportional to `shares` (Hamilton's method; ties to the first)."""
    exact = np.asarray(shares, dtype=np.float64) / np.sum(shares) * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts


def volume_repeats(volumes: Sequence[VolumeInfo], stores: Sequence[str], weights: Sequence[float | None],
                   samples_per_volume: int) -> np.ndarray | None:
    """Samples each volume gets per epoch so that store s gets a share weights[s] / sum(weights)
    of the epoch's len(volumes) * samples_per_volume samples, spread evenly over its volumes.

    None when the weights change nothing (one store, or weights proportional to store sizes), so
    single-store runs keep their exact sample order. With no weight set, every store is sampled in
    proportion to its volumes; once any weight is set, an unset one counts as 1.
    """
    if all(w is None for w in weights):
        return None
    weights = [1.0 if w is None else float(w) for w in weights]
    keys = [store_key(s) for s in stores]
    members = [[i for i, v in enumerate(volumes) if v.extra.get("store") == k] for k in keys]
    present = [i for i, m in enumerate(members) if m]
    sizes = np.array([len(members[i]) for i in present], dtype=np.float64)
    shares = np.array([weights[i] for i in present], dtype=np.float64)
    if len(present) <= 1 or np.allclose(shares / shares.sum(), sizes / sizes.sum()):
        return None
    total = len(volumes) * int(samples_per_volume)
    repeats = np.zeros(len(volumes), dtype=np.int64)
    for store_index, count in zip(present, _largest_remainder(total, shares)):
        repeats[members[store_index]] = _largest_remainder(int(count), [1.0] * len(members[store_index]))
    return repeats


def stores_summary(volumes: Sequence[VolumeInfo], stores: Sequence[str], weights: Sequence[float | None],
                   repeats: np.ndarray | None, samples_per_volume: int) -> list[dict]:
    """Per store: URL/path, volumes, weight and the share of samples it gets (summary.json, model card)."""
    per_volume = repeats if repeats is not None else np.full(len(volumes), int(samples_per_volume))
    total = max(int(per_volume.sum()), 1)
    rows = []
    for store, weight in zip(stores, weights):
        index = [i for i, v in enumerate(volumes) if v.extra.get("store") == store_key(store)]
        rows.append({"store": str(store), "volumes": len(index), "weight": weight,
                     "samples_per_epoch": int(per_volume[index].sum()),
                     "sample_share": round(float(per_volume[index].sum()) / total, 4),
                     "modalities": sorted({volumes[i].modality for i in index})})
    return rows
