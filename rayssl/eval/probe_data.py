"""Labelled probe data: the named probe sets, reading a labelled store, and its seeded fit / eval split."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rayssl.methods import VolumeInfo

# Phantom seeds of the default probe store: disjoint from the pretraining demo (seeds 0 .. n-1).
PROBE_DEMO_SEED = 1000
PROBE_DEMO_VOLUMES = 8


@dataclass
class LabelledVolume:
    info: VolumeInfo
    image: np.ndarray  # float32, stored units
    label: np.ndarray  # int64 class index 0..K-1 (0 = background)


@dataclass
class ProbeData:
    """Labelled volumes in memory, their fixed fit / eval split, and the class names."""

    store: str
    volumes: list[LabelledVolume]
    fit: list[int]
    eval: list[int]
    class_values: list[int]  # stored label value of each class index
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_values)

    @classmethod
    def from_arrays(cls, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], fit_fraction: float = 0.5,
                    seed: int = 0, modality: str = "CT", background: float = -1024.0,
                    class_names: dict[int, str] | None = None, store: str = "<arrays>") -> "ProbeData":
        """Probe data from in-memory arrays (label maps of stored class values)."""
        infos = []
        for i, image in enumerate(images):
            infos.append(VolumeInfo(index=i, id=f"volume-{i:03d}", shape=tuple(image.shape), spacing=(1.0, 1.0, 1.0),
                                    bbox=(0, 0, 0, *image.shape), background=float(background), modality=modality,
                                    has_label=True, extra={"dtype": str(np.asarray(image).dtype)}))
        return cls._build(store, infos, list(images), list(labels), fit_fraction, seed, class_names)

    @classmethod
    def _build(cls, store: str, infos: list[VolumeInfo], images: list[np.ndarray], labels: list[np.ndarray],
               fit_fraction: float, seed: int, class_names: dict[int, str] | None) -> "ProbeData":
        if len(infos) < 2:
            raise ValueError(f"{store}: the probe needs at least 2 labelled volumes (one to fit, one to evaluate), "
                             f"found {len(infos)}")
        values = sorted({0, *(int(v) for label in labels for v in np.unique(label))})
        lookup = np.zeros(max(values) + 1, dtype=np.int64)
        lookup[values] = np.arange(len(values))
        volumes = [LabelledVolume(info, np.asarray(img, dtype=np.float32), lookup[np.asarray(lab, dtype=np.int64)])
                   for info, img, lab in zip(infos, images, labels)]
        order = sorted(range(len(volumes)), key=lambda i: volumes[i].info.id)
        permuted = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
        n_fit = min(max(1, round(fit_fraction * len(volumes))), len(volumes) - 1)
        names = [(class_names or {}).get(v, "background" if v == 0 else f"class_{v}") for v in values]
        return cls(store=store, volumes=volumes, fit=sorted(permuted[:n_fit]), eval=sorted(permuted[n_fit:]),
                   class_values=values, class_names=names)


def default_probe_store() -> str:
    """Held-out demo phantoms with organ labels (built on first use, then cached)."""
    from datasets_zarr import demo_store

    return str(demo_store(n=PROBE_DEMO_VOLUMES, seed=PROBE_DEMO_SEED))


def mni152_probe_store() -> str:
    """Two MNI152 hemispheres (T1, 2 mm) with CSF / grey / white matter labels, from nilearn's wheel."""
    from datasets_zarr import demo_store

    return str(demo_store(n=2, kind="mni-tissue"))


# `--data NAME`: labelled probe sets built on first use from data shipped inside installed packages.
PROBE_SETS = {"demo": default_probe_store, "mni152": mni152_probe_store}


def resolve_probe_store(store: str | None) -> str:
    """A store path or URL as given, a named probe set's path (`PROBE_SETS`), or the default demo set."""
    if store is None:
        return default_probe_store()
    if store in PROBE_SETS and not os.path.exists(store):
        return PROBE_SETS[store]()
    return store


def _class_names(volumes: Sequence[VolumeInfo]) -> dict[int, str] | None:
    """Class names of the embedded probe sets, recognised by their volumes' source."""
    from datasets_zarr import DEMO_LABELS, MNI_TISSUE_LABELS

    sources = [str(v.extra.get("source", "")) for v in volumes]
    for prefix, names in (("demo:phantom", DEMO_LABELS), ("demo:mni152-tissue", MNI_TISSUE_LABELS)):
        if all(source.startswith(prefix) for source in sources):
            return dict(names)
    return None


def load_probe_data(store: str | None = None, fit_fraction: float = 0.5, seed: int = 0,
                    max_volumes: int | None = None) -> ProbeData:
    """Read every labelled volume of `store` (image + `label`) into memory and split it fit / eval."""
    from rayssl.data.read import StoreReader
    from rayssl.data.volumes import load_volumes

    store = resolve_probe_store(store)
    volumes = [v for v in load_volumes(store, split="all") if v.has_label]
    if not volumes:
        raise ValueError(f"{store}: no volume has a `label` array; the probe needs labelled volumes "
                         f"(convert scans with `rayssl convert ... --label LABELMAP`)")
    volumes = sorted(volumes, key=lambda v: v.id)[: max_volumes or None]
    reader = StoreReader(store)
    images, labels = [], []
    for v in volumes:
        group = str(v.extra.get("group", v.id))
        images.append(reader.read(group, (0, 0, 0), v.shape, array="image", pad_value=v.background, dtype=np.float32))
        labels.append(reader.read(group, (0, 0, 0), v.shape, array="label", pad_value=0, dtype=np.int64))
    return ProbeData._build(store, volumes, images, labels, fit_fraction, seed, _class_names(volumes))
