"""The voxel probe: a 1x1x1 convolution on frozen feature maps, scored by Dice on eval volumes or crops."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rayssl.data.read import read_box
from rayssl.eval.crops import CropPool, fraction_subset
from rayssl.eval.features import FeatureNet
from rayssl.eval.probe_config import ProbeConfig
from rayssl.eval.probe_data import ProbeData


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
