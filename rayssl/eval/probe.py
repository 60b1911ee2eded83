"""Linear probes on frozen features: voxel-level Dice (a 1x1x1 convolution) and patch-level logistic regression.

Data: a labelled Zarr store (default: held-out demo phantoms, seeds 1000+, never seen in the
default pretraining run). Labelled volumes are split once, with a seeded permutation of their ids,
into *fit* volumes (the probe trains on them) and *eval* volumes (it is scored on them). From each
volume a fixed, seeded pool of cubic crops is drawn, centred on voxels of classes chosen in turn
(so small organs are represented). Label fractions select a nested, seeded subset of the fit crops
(10% is inside 30% is inside 100%), or of the fit volumes with `fraction_unit="volumes"`.

* Voxel probe (segmentation backbones): every level's feature map is upsampled (trilinear) to the
  crop and concatenated; a 1x1x1 convolution is trained on class-balanced voxels of the fit crops
  (class-balanced cross-entropy, full batch, standardised features), then applied by sliding
  window to the whole eval volumes (or only to the eval crops, `eval_on="crops"`, which Tune uses
  for speed); score = mean Dice over the foreground classes present in an eval volume.
* Patch probe (encoders): the concatenated global averages of every level (DrasCLR: its
  representation) -> logistic regression (scikit-learn) on the class at the crop centre; score =
  balanced accuracy, with accuracy and macro one-vs-rest AUC.

Both run on the pretrained network and on the same network from a seeded random init (the baseline),
with identical crops, voxels and head initialisation. The whole probe is repeated `repeats` times
with different seeds of the crop pools, label subsets, heads and random init (the fit / eval
volume split stays fixed); every score is the mean over repeats with a 95 % confidence interval
(Student t over the repeats), and the gain's interval is taken over the paired per-repeat
differences, so the noise the pools and heads share cancels.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rayssl.data.read import read_box
from rayssl.eval.features import FeatureNet, IntensityFn, RunWeights, intensity_scaler, round_up, sample_levels
from rayssl.methods import VolumeInfo

# Phantom seeds of the default probe store: disjoint from the pretraining demo (seeds 0 .. n-1).
PROBE_DEMO_SEED = 1000
PROBE_DEMO_VOLUMES = 8
DEFAULT_FRACTIONS = (0.1, 0.3, 1.0)
# Probe crop edge when the model card gives no pretraining patch size.
DEFAULT_PATCH = 32
# Seed step between probe repeats (kept apart from the eval pool's `seed + 1`).
REPEAT_SEED_STEP = 101


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


# ---------------------------------------------------------------------------------------------
# Labelled data
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Crop pools
# ---------------------------------------------------------------------------------------------
@dataclass
class CropPool:
    """Fixed crops of some volumes: where they are, their centre class, and voxels for the voxel probe."""

    patch: int
    volume: np.ndarray  # [N] index into ProbeData.volumes
    starts: np.ndarray  # [N, 3]
    centre_class: np.ndarray  # [N]
    points: list[np.ndarray] = field(default_factory=list)  # per crop [n, 3] voxel indices inside the crop
    point_classes: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.volume)


def build_pool(data: ProbeData, indices: Sequence[int], per_volume: int, patch: int, voxels_per_class: int,
               seed: int) -> CropPool:
    """`per_volume` crops of `patch`^3 per volume, centred on voxels of classes taken in turn (seeded per volume).

    Crops may reach outside the volume (read as background; those voxels are never probe targets),
    so each crop's centre is exactly the drawn voxel.
    """
    vols, starts, centres, points, point_classes = [], [], [], [], []
    half = patch // 2
    for v in indices:
        label = data.volumes[v].label
        rng = np.random.default_rng([seed, int(v)])
        present = np.unique(label)
        where = {int(c): np.flatnonzero(label.ravel() == c) for c in present}
        order = rng.permutation(present)
        for i in range(per_volume):
            c = int(order[i % len(order)])
            centre = np.array(np.unravel_index(int(rng.choice(where[c])), label.shape))
            start = centre - half
            crop = read_box(label, start, (patch,) * 3, fill=-1)
            pts, cls = [], []
            for k in np.unique(crop[crop >= 0]):
                flat = np.flatnonzero(crop.ravel() == k)
                chosen = rng.choice(flat, size=min(voxels_per_class, len(flat)), replace=False)
                pts.append(np.stack(np.unravel_index(np.sort(chosen), crop.shape), axis=1))
                cls.append(np.full(len(chosen), int(k), dtype=np.int64))
            vols.append(v)
            starts.append(start)
            centres.append(c)
            points.append(np.concatenate(pts).astype(np.int64))
            point_classes.append(np.concatenate(cls))
    return CropPool(patch=patch, volume=np.array(vols, dtype=np.int64), starts=np.array(starts, dtype=np.int64).reshape(-1, 3),
                    centre_class=np.array(centres, dtype=np.int64), points=points, point_classes=point_classes)


def fraction_subset(pool: CropPool, fraction: float, seed: int, unit: str = "crops") -> np.ndarray:
    """Indices of the pool's crops in a label fraction: nested across fractions (one seeded permutation).

    unit="crops": ceil(fraction * N) crops. unit="volumes": every crop of ceil(fraction * V) volumes.
    """
    rng = np.random.default_rng([seed, 7919])
    if unit == "volumes":
        volumes = np.unique(pool.volume)
        keep = volumes[rng.permutation(len(volumes))[: max(1, math.ceil(fraction * len(volumes) - 1e-9))]]
        return np.flatnonzero(np.isin(pool.volume, keep))
    order = rng.permutation(len(pool))
    return np.sort(order[: max(1, math.ceil(fraction * len(pool) - 1e-9))])


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------
def scaled_volumes(data: ProbeData, scaler: IntensityFn) -> list[np.ndarray]:
    return [np.ascontiguousarray(scaler(v.image, v.info), dtype=np.float32) for v in data.volumes]


def _crop_loc(data: ProbeData, volume: int, start: np.ndarray, patch: int) -> np.ndarray:
    """Crop centre scaled to [-1, 1] per axis of its volume (stand-in for DrasCLR's atlas coordinate)."""
    shape = np.asarray(data.volumes[volume].label.shape, dtype=np.float64)
    centre = start + patch // 2
    return (2.0 * centre / np.maximum(shape - 1.0, 1.0) - 1.0).astype(np.float32)


@torch.no_grad()
def pool_features(net: FeatureNet, data: ProbeData, scaled: list[np.ndarray], pool: CropPool, batch_size: int,
                  voxels: bool = True) -> dict[str, Any]:
    """Frozen features of every crop: pooled [N, C] and (voxels=True) the voxel features [M, C] with their labels."""
    pooled, voxel_feats = [], []
    for lo in range(0, len(pool), batch_size):
        idx = range(lo, min(lo + batch_size, len(pool)))
        x = torch.from_numpy(np.stack([read_box(scaled[pool.volume[i]], pool.starts[i], (pool.patch,) * 3,
                                                fill=float(scaled[pool.volume[i]].min())) for i in idx])[:, None])
        loc = None
        if not net.dense:
            loc = torch.from_numpy(np.stack([_crop_loc(data, pool.volume[i], pool.starts[i], pool.patch) for i in idx]))
        levels = net.levels(x, loc)
        pooled.append(net.pool(levels))
        if voxels and net.dense:
            voxel_feats.extend(sample_levels(levels, (pool.patch,) * 3, [torch.from_numpy(pool.points[i]) for i in idx]))
    out: dict[str, Any] = {"pooled": torch.cat(pooled).double().numpy()}
    if voxels and net.dense:
        out["voxels"] = voxel_feats  # per crop [n_i, C] float32
        out["channels"] = [int(f.shape[1]) for f in levels]
    return out


# ---------------------------------------------------------------------------------------------
# Voxel probe
# ---------------------------------------------------------------------------------------------
def train_voxel_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int, lr: float,
                     weight_decay: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1x1x1 convolution trained on voxel features (standardised, class-balanced cross-entropy, full batch).

    Every class present weighs the same in the loss (the voxels were also sampled per class), so
    small organs count as much as the background. Returns (weight [K, C], bias [K]) acting on
    *unstandardised* features: the standardisation is folded into the convolution, so it runs on
    raw feature maps.
    """
    features = features.float()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    z = (features - mean) / std
    counts = torch.bincount(labels, minlength=num_classes).float()
    weight = torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))
    torch.manual_seed(seed)
    head = nn.Conv3d(features.shape[1], num_classes, kernel_size=1)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            # The 1x1x1 convolution applied to [N, C] voxel features is a matrix product.
            loss = F.cross_entropy(F.linear(z, head.weight.flatten(1), head.bias), labels, weight=weight)
            loss.backward()
            optimizer.step()
    w = head.weight.detach().flatten(1)
    return w / std, head.bias.detach() - (w * (mean / std)).sum(1)


def _level_logits(net: FeatureNet, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  channels: list[int]) -> torch.Tensor:
    """Logits of stacked 1x1x1 heads on the upsampled, concatenated levels of `x`.

    A 1x1x1 convolution commutes with trilinear upsampling, so each level is projected to the
    classes first and only those maps are upsampled (cheap, and the same result).
    """
    out = bias.view(1, -1, 1, 1, 1).expand(x.shape[0], -1, *x.shape[2:]).clone()
    for level, w in zip(net.levels(x), torch.split(weight, channels, dim=1)):
        logits = F.conv3d(level.float(), w[:, :, None, None, None])
        out += F.interpolate(logits, size=x.shape[2:], mode="trilinear", align_corners=False)
    return out


@torch.no_grad()
def predict_volume(net: FeatureNet, image: np.ndarray, heads: list[tuple[torch.Tensor, torch.Tensor]],
                   channels: list[int], patch: int, overlap: float, batch_size: int) -> np.ndarray:
    """Argmax label map of every head over a whole volume, by sliding window: [H, X, Y, Z]."""
    from monai.inferers import sliding_window_inference

    weight, bias = torch.cat([w for w, _ in heads]), torch.cat([b for _, b in heads])
    logits = sliding_window_inference(
        torch.from_numpy(image)[None, None], roi_size=(patch,) * 3, sw_batch_size=batch_size,
        predictor=lambda x: _level_logits(net, x, weight, bias, channels), overlap=overlap, mode="constant",
        padding_mode="constant", cval=float(image.min()))
    return logits[0].view(len(heads), heads[0][0].shape[0], *image.shape).argmax(1).numpy()


@torch.no_grad()
def predict_crops(net: FeatureNet, data: ProbeData, scaled: list[np.ndarray], pool: CropPool,
                  heads: list[tuple[torch.Tensor, torch.Tensor]], channels: list[int], batch_size: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Every head's argmax over the voxels of the pool's crops that lie inside their volume.

    Returns (predictions [H, M], truth [M]) over all those voxels of all crops.
    """
    weight, bias = torch.cat([w for w, _ in heads]), torch.cat([b for _, b in heads])
    predictions, truths = [], []
    size = (pool.patch,) * 3
    for lo in range(0, len(pool), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(pool))))
        x = torch.from_numpy(np.stack([read_box(scaled[pool.volume[i]], pool.starts[i], size,
                                                float(scaled[pool.volume[i]].min())) for i in idx])[:, None])
        logits = _level_logits(net, x, weight, bias, channels)
        argmax = logits.view(len(idx), len(heads), -1, *size).argmax(2).numpy()  # [B, H, P, P, P]
        for j, i in enumerate(idx):
            truth = read_box(data.volumes[pool.volume[i]].label, pool.starts[i], size, -1)
            inside = truth >= 0
            predictions.append(argmax[j][:, inside])
            truths.append(truth[inside])
    return np.concatenate(predictions, axis=1), np.concatenate(truths)


def dice_per_class(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> dict[int, float]:
    """Dice of each foreground class present in `truth` (classes absent from the truth are skipped)."""
    out = {}
    for c in range(1, num_classes):
        t = truth == c
        if not t.any():
            continue
        p = prediction == c
        out[c] = float(2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))
    return out


def summarise_dice(per_volume: list[dict[int, float]], data: ProbeData) -> dict[str, Any]:
    """Mean Dice per class over eval volumes, and their mean over classes (the probe score)."""
    per_class = {}
    for c in range(1, data.num_classes):
        values = [d[c] for d in per_volume if c in d]
        if values:
            per_class[data.class_names[c]] = float(np.mean(values))
    return {"mean_dice": float(np.mean(list(per_class.values()))) if per_class else float("nan"), "dice": per_class}


def voxel_probe(net: FeatureNet, data: ProbeData, scaled: list[np.ndarray], fit_pool: CropPool,
                fit_features: dict[str, Any], cfg: ProbeConfig, eval_pool: CropPool | None = None
                ) -> list[dict[str, Any]]:
    """One row per label fraction: mean Dice of a 1x1x1 conv on frozen features.

    Scored on the whole eval volumes (sliding window; `cfg.eval_on="volumes"`) or, faster, on the
    voxels of the eval crops (`"crops"`, one Dice over all of them).
    """
    heads, sizes, times = [], [], []
    for fraction in cfg.fractions:
        t0 = time.perf_counter()
        subset = fraction_subset(fit_pool, fraction, cfg.seed, cfg.fraction_unit)
        feats = torch.cat([fit_features["voxels"][i] for i in subset])
        labels = torch.from_numpy(np.concatenate([fit_pool.point_classes[i] for i in subset]))
        heads.append(train_voxel_head(feats, labels, data.num_classes, cfg.head_steps, cfg.head_lr,
                                      cfg.head_weight_decay, cfg.seed))
        sizes.append(len(subset))
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    per_volume: list[list[dict[int, float]]] = [[] for _ in heads]
    if cfg.eval_on == "crops":
        if eval_pool is None:
            raise ValueError("eval_on='crops' needs the eval crop pool")
        predictions, truth = predict_crops(net, data, scaled, eval_pool, heads, fit_features["channels"],
                                           cfg.batch_size)
        for h, prediction in enumerate(predictions):
            per_volume[h].append(dice_per_class(prediction, truth, data.num_classes))
    else:
        for v in data.eval:
            predictions = predict_volume(net, scaled[v], heads, fit_features["channels"], fit_pool.patch,
                                         cfg.overlap, cfg.batch_size)
            for h, prediction in enumerate(predictions):
                per_volume[h].append(dice_per_class(prediction, data.volumes[v].label, data.num_classes))
    eval_time = (time.perf_counter() - t0) / len(heads)
    rows = []
    for fraction, size, seconds, dices in zip(cfg.fractions, sizes, times, per_volume):
        summary = summarise_dice(dices, data)
        rows.append({"probe": "voxel", "fraction": fraction, "n_train_crops": size, "metric": "mean_dice",
                     "score": summary["mean_dice"], **summary, "time_s": round(seconds + eval_time, 2)})
    return rows


# ---------------------------------------------------------------------------------------------
# Patch probe
# ---------------------------------------------------------------------------------------------
def macro_auc(truth: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Mean one-vs-rest ROC AUC over the classes that occur (and not only) in `truth`."""
    from sklearn.metrics import roc_auc_score

    scores = []
    for j, c in enumerate(classes):
        positive = truth == c
        if positive.any() and not positive.all():
            scores.append(roc_auc_score(positive, proba[:, j]))
    return float(np.mean(scores)) if scores else float("nan")


def patch_probe(fit_pool: CropPool, fit_pooled: np.ndarray, eval_pool: CropPool, eval_pooled: np.ndarray,
                cfg: ProbeConfig) -> list[dict[str, Any]]:
    """One row per label fraction: logistic regression on pooled features predicting the crop-centre class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = []
    for fraction in cfg.fractions:
        t0 = time.perf_counter()
        subset = fraction_subset(fit_pool, fraction, cfg.seed, cfg.fraction_unit)
        y = fit_pool.centre_class[subset]
        row: dict[str, Any] = {"probe": "patch", "fraction": fraction, "n_train_crops": len(subset),
                               "metric": "balanced_accuracy"}
        if len(np.unique(y)) < 2:
            rows.append({**row, "score": float("nan"), "note": "fewer than 2 classes in this fraction"})
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=cfg.seed))
        clf.fit(fit_pooled[subset], y)
        truth = eval_pool.centre_class
        predicted = clf.predict(eval_pooled)
        with warnings.catch_warnings():  # predicting a class absent from the eval crops is not an error here
            warnings.simplefilter("ignore", UserWarning)
            balanced = float(balanced_accuracy_score(truth, predicted))
        rows.append({**row, "score": balanced, "balanced_accuracy": balanced,
                     "accuracy": float(accuracy_score(truth, predicted)),
                     "auc": macro_auc(truth, clf.predict_proba(eval_pooled), clf.classes_),
                     "time_s": round(time.perf_counter() - t0, 2)})
    return rows


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def probe_patch_size(weights: RunWeights, net: FeatureNet, requested: int | None) -> int:
    """Crop edge: requested, else the pretraining patch (model card), rounded up to what the network accepts."""
    patch = requested or weights.pretraining_patch() or DEFAULT_PATCH
    return round_up(patch, net.size_multiple)


def resolve_tasks(tasks: str, net: FeatureNet, network: str) -> list[str]:
    """auto: voxel probe for segmentation networks (BasicUNet, SwinUNETR), patch probe for encoders."""
    from rayssl.eval.features import SEGMENTATION_NETWORKS

    if tasks == "both":
        chosen = ["voxel", "patch"]
    elif tasks == "auto":
        chosen = ["voxel"] if network in SEGMENTATION_NETWORKS and net.dense else ["patch"]
    else:
        chosen = [tasks]
    if "voxel" in chosen and not net.dense:
        raise ValueError(f"{network} is conditioned on each patch's atlas location and has no dense feature map: "
                         f"use the patch probe (--task patch)")
    return chosen


@dataclass
class ProbeSetup:
    """Everything shared by the probes of one backbone on one data set."""

    weights: RunWeights
    data: ProbeData
    cfg: ProbeConfig
    scaled: list[np.ndarray]
    patch: int
    tasks: list[str]
    fit_pool: CropPool
    eval_pool: CropPool


def prepare(weights: RunWeights, data: ProbeData, cfg: ProbeConfig) -> ProbeSetup:
    probe_net = FeatureNet.from_weights(weights, pretrained=True, seed=cfg.seed)
    patch = probe_patch_size(weights, probe_net, cfg.patch)
    tasks = resolve_tasks(cfg.tasks, probe_net, weights.network)
    scaled = scaled_volumes(data, intensity_scaler(weights.method, weights.method_config()))
    fit_pool = build_pool(data, data.fit, cfg.crops_per_volume, patch, cfg.voxels_per_class, cfg.seed)
    eval_pool = build_pool(data, data.eval, cfg.crops_per_volume, patch, 1, cfg.seed + 1)
    return ProbeSetup(weights, data, cfg, scaled, patch, tasks, fit_pool, eval_pool)


def probe_network(setup: ProbeSetup, pretrained: bool) -> list[dict[str, Any]]:
    """Rows of every probe task for the pretrained network, or its seeded random-init twin."""
    cfg = setup.cfg
    net = FeatureNet.from_weights(setup.weights, pretrained=pretrained, seed=cfg.seed)
    init = "pretrained" if pretrained else "random"
    rows = []
    fit = pool_features(net, setup.data, setup.scaled, setup.fit_pool, cfg.batch_size, voxels="voxel" in setup.tasks)
    if "voxel" in setup.tasks:
        rows += voxel_probe(net, setup.data, setup.scaled, setup.fit_pool, fit, cfg, setup.eval_pool)
    if "patch" in setup.tasks:
        evaluated = pool_features(net, setup.data, setup.scaled, setup.eval_pool, cfg.batch_size, voxels=False)
        rows += patch_probe(setup.fit_pool, fit["pooled"], setup.eval_pool, evaluated["pooled"], cfg)
    return [{"init": init, **row} for row in rows]


class _Threads:
    """Temporarily set torch's intra-op threads."""

    def __init__(self, threads: int | None) -> None:
        self.threads, self.before = threads, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.before)


def probe_score(weights: RunWeights, data: ProbeData, cfg: ProbeConfig | None = None) -> dict[str, float]:
    """The Tune objective: the pretrained network's probe score with all fit crops (no baseline).

    Returns {"probe_score", and "probe_dice" (voxel probe) or "probe_balanced_accuracy" (patch probe)}.
    """
    cfg = cfg or ProbeConfig()
    cfg = ProbeConfig(**{**asdict(cfg), "fractions": (1.0,), "baseline": False})
    with _Threads(cfg.threads):
        setup = prepare(weights, data, cfg)
        setup.tasks = setup.tasks[:1]
        row = probe_network(setup, pretrained=True)[0]
    key = "probe_dice" if row["probe"] == "voxel" else "probe_balanced_accuracy"
    return {"probe_score": float(row["score"]), key: float(row["score"])}


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean of `values` and the half-width of its two-sided 95 % confidence interval (Student t).

    NaN values are left out; the half-width is NaN with fewer than two values.
    """
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) < 2:
        return float(x[0]), float("nan")
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return float(x.mean()), half


def summarise_repeats(repeat_rows: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (init, probe, fraction): means over the repeats with 95 % intervals.

    `score` becomes the mean (`scores`: each repeat's, `score_ci95`: the half-width); numeric
    fields and per-class Dice are averaged. Pretrained rows also get `gain` (pretrained - random)
    and `gain_ci95`, from the paired per-repeat differences.
    """
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for rows in repeat_rows:
        for row in rows:
            groups.setdefault((row["init"], row["probe"], row["fraction"]), []).append(row)
    out = []
    for (init, probe, fraction), rows in groups.items():
        merged = dict(rows[0])
        for key, value in rows[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("fraction", "n_train_crops"):
                merged[key] = float(np.nanmean([float(r.get(key, float("nan"))) for r in rows]))
        if isinstance(rows[0].get("dice"), dict):
            classes = dict.fromkeys(k for r in rows for k in r.get("dice", {}))
            merged["dice"] = {c: float(np.mean([r["dice"][c] for r in rows if c in r.get("dice", {})])) for c in classes}
        merged["scores"] = [float(r["score"]) for r in rows]
        merged["score"], merged["score_ci95"] = mean_ci95(merged["scores"])
        merged["repeats"] = len(rows)
        out.append(merged)
    by_key = {(r["init"], r["probe"], r["fraction"]): r for r in out}
    for row in out:
        random_row = by_key.get(("random", row["probe"], row["fraction"]))
        if row["init"] != "pretrained" or random_row is None:
            continue
        row["gain_scores"] = [p - q for p, q in zip(row["scores"], random_row["scores"])]
        row["gain"], row["gain_ci95"] = mean_ci95(row["gain_scores"])
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """Pretrained vs random score per probe and label fraction, each `mean ± 95 % CI`, as an aligned text table."""
    keyed: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for row in rows:
        keyed.setdefault((row["probe"], row["fraction"]), {})[row["init"]] = row
    repeats = max((int(r.get("repeats", 1)) for r in rows), default=1)
    lines = [f"{'probe':<9}{'metric':<19}{'labels':>7}{'crops':>7}{'pretrained':>16}{'random':>16}{'gain':>17}"
             f"   (mean ± 95 % CI over {repeats} repeats)"]
    for (probe, fraction), pair in keyed.items():
        first = next(iter(pair.values()))
        pre, rnd = pair.get("pretrained", {}), pair.get("random", {})
        gain = pre.get("gain")
        if gain is None and pre.get("score") is not None and rnd.get("score") is not None:
            gain = pre["score"] - rnd["score"]
        lines.append(f"{probe:<9}{first['metric']:<19}{fraction:>6.0%} {first['n_train_crops']:>6}"
                     f"{_fmt_ci(pre.get('score'), pre.get('score_ci95')):>16}"
                     f"{_fmt_ci(rnd.get('score'), rnd.get('score_ci95')):>16}"
                     f"{_fmt_ci(gain, pre.get('gain_ci95'), signed=True):>17}")
    dice_rows = [r for r in rows if "dice" in r and r["fraction"] == max(x["fraction"] for x in rows)]
    for row in dice_rows:
        per_class = ", ".join(f"{k} {v:.2f}" for k, v in row["dice"].items())
        lines.append(f"  {row['probe']} {row['init']} Dice per class @ {row['fraction']:.0%}: {per_class}")
    return "\n".join(lines)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _fmt_ci(value: float | None, half: float | None, signed: bool = False) -> str:
    """`0.123 ± 0.004`; the value alone when there is no interval."""
    if half is None or (isinstance(half, float) and math.isnan(half)) or _fmt(value) == "-":
        return _fmt(value, signed)
    return f"{_fmt(value, signed)} ± {half:.3f}"


def plot_rows(rows: list[dict[str, Any]], path: str, title: str = "") -> str:
    """Bar chart: one panel per probe, bars per label fraction, pretrained vs random, 95 % intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = list(dict.fromkeys(r["probe"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(probes)), figsize=(4.5 * max(1, len(probes)), 3.8), squeeze=False)
    for ax, probe in zip(axes[0], probes):
        mine = [r for r in rows if r["probe"] == probe]
        fractions = sorted({r["fraction"] for r in mine})
        inits = list(dict.fromkeys(r["init"] for r in mine))
        width = 0.8 / max(1, len(inits))
        for j, init in enumerate(inits):
            picked = [next((r for r in mine if r["fraction"] == f and r["init"] == init), {}) for f in fractions]
            scores = [r.get("score", np.nan) for r in picked]
            errors = [r.get("score_ci95", np.nan) for r in picked]
            xs = np.arange(len(fractions)) + (j - (len(inits) - 1) / 2) * width
            bars = ax.bar(xs, scores, width, label=init, color="tab:blue" if init == "pretrained" else "tab:gray",
                          yerr=np.nan_to_num(np.asarray(errors, dtype=float)), capsize=3)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(np.arange(len(fractions)), [f"{f:.0%}" for f in fractions])
        ax.set_xlabel("labelled fraction")
        ax.set_ylabel(mine[0]["metric"])
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{probe} probe" if probe != "finetune" else "fine-tuning")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
