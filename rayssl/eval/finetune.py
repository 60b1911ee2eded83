"""Fine-tuning: exported weights in the matching MONAI network, a segmentation head, a fixed small budget, Dice.

The pretrained network and the same network from a seeded random init are trained on identical
crops in identical order (same seeds) for each label fraction, then scored by sliding-window Dice
on the eval volumes of the probe data (`rayssl.eval.probe`).

Networks: BasicUNet and SwinUNETR exports are rebuilt as the full MONAI segmentation network with
`out_channels` = number of classes (the exported encoder -- and decoder, for GVSL -- loaded; the
rest, including the final convolution, is the head and starts from the seeded init). Encoders
without a decoder (MONAI ResNets) get a light head: a 1x1x1 convolution per feature level,
upsampled to the input and summed. DrasCLR's location-conditioned encoder is not fine-tuned here
(it needs an atlas coordinate per patch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rayssl.eval.features import SEGMENTATION_NETWORKS, FeatureNet, RunWeights, build_network
from rayssl.eval.probe import ProbeSetup, dice_per_class, fraction_subset, summarise_dice


@dataclass
class FinetuneConfig:
    """Fixed fine-tuning budget (the same for pretrained and random init)."""

    steps: int = 40
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-5
    fractions: tuple[float, ...] | None = None  # None = the probe's fractions
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"finetune steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"finetune lr must be > 0, got {self.lr}")
        if self.fractions is not None:
            self.fractions = tuple(float(f) for f in self.fractions)
            if any(not 0 < f <= 1 for f in self.fractions):
                raise ValueError(f"finetune fractions must lie in (0, 1], got {self.fractions}")


class LevelSumHead(nn.Module):
    """Segmentation from an encoder without decoder: per level a 1x1x1 conv, upsampled to the input, summed."""

    def __init__(self, features: FeatureNet, channels: list[int], num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.heads = nn.ModuleList(nn.Conv3d(c, num_classes, kernel_size=1) for c in channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        for level, head in zip(self.features.levels(x), self.heads):
            out = out + F.interpolate(head(level), size=x.shape[2:], mode="trilinear", align_corners=False)
        return out


def segmentation_network(weights: RunWeights, num_classes: int, pretrained: bool, seed: int,
                         patch: int) -> nn.Module:
    """The network fine-tuned for `num_classes`: MONAI's own segmentation net when there is one."""
    if weights.network in SEGMENTATION_NETWORKS:
        return build_network(weights, pretrained=pretrained, seed=seed, out_channels=num_classes)
    network = build_network(weights, pretrained=pretrained, seed=seed)
    features = FeatureNet(network)
    if not features.dense:
        raise ValueError(f"{weights.network} is conditioned on each patch's atlas location; fine-tuning it for "
                         f"segmentation is not supported (use the patch probe)")
    with torch.no_grad():
        channels = [int(f.shape[1]) for f in features.levels(torch.zeros(1, 1, patch, patch, patch))]
    torch.manual_seed(seed + 1)
    return LevelSumHead(features, channels, num_classes)


def _crops(setup: ProbeSetup, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    from rayssl.data.read import read_box

    pool, size = setup.fit_pool, (setup.patch,) * 3
    images = [read_box(setup.scaled[pool.volume[i]], pool.starts[i], size, float(setup.scaled[pool.volume[i]].min()))
              for i in indices]
    # Outside the volume is air: background (class 0) for training.
    labels = [read_box(setup.data.volumes[pool.volume[i]].label, pool.starts[i], size, 0) for i in indices]
    return torch.from_numpy(np.stack(images)[:, None]), torch.from_numpy(np.stack(labels)[:, None])


def finetune_once(setup: ProbeSetup, cfg: FinetuneConfig, fraction: float, pretrained: bool) -> dict[str, Any]:
    """Train one network on one label fraction, then score it on the eval volumes."""
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss

    t0 = time.perf_counter()
    data = setup.data
    subset = fraction_subset(setup.fit_pool, fraction, setup.cfg.seed, setup.cfg.fraction_unit)
    images, labels = _crops(setup, subset)
    model = segmentation_network(setup.weights, data.num_classes, pretrained, cfg.seed, setup.patch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    # Same batches and flips for pretrained and random init.
    rng = np.random.default_rng([cfg.seed, int(round(fraction * 1000))])
    model.train()
    losses = []
    for _ in range(cfg.steps):
        idx = rng.choice(len(subset), size=cfg.batch_size, replace=len(subset) < cfg.batch_size)
        x, y = images[idx], labels[idx]
        for axis in (2, 3, 4):
            if rng.random() < 0.5:
                x, y = x.flip(axis), y.flip(axis)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    per_volume = []
    with torch.no_grad():
        for v in data.eval:
            image = setup.scaled[v]
            logits = sliding_window_inference(torch.from_numpy(image)[None, None], roi_size=(setup.patch,) * 3,
                                              sw_batch_size=setup.cfg.batch_size, predictor=model,
                                              overlap=setup.cfg.overlap, padding_mode="constant",
                                              cval=float(image.min()))
            per_volume.append(dice_per_class(logits[0].argmax(0).numpy(), data.volumes[v].label, data.num_classes))
    summary = summarise_dice(per_volume, data)
    return {"probe": "finetune", "init": "pretrained" if pretrained else "random", "fraction": fraction,
            "n_train_crops": len(subset), "metric": "mean_dice", "score": summary["mean_dice"], **summary,
            "steps": cfg.steps, "first_loss": losses[0], "final_loss": float(np.mean(losses[-5:])),
            "time_s": round(time.perf_counter() - t0, 2)}


def run_finetune(setup: ProbeSetup, cfg: FinetuneConfig, baseline: bool = True) -> list[dict[str, Any]]:
    """Rows for every label fraction: pretrained, and (baseline=True) random init."""
    rows = []
    for fraction in cfg.fractions or setup.cfg.fractions:
        for pretrained in ([True, False] if baseline else [True]):
            row = finetune_once(setup, cfg, fraction, pretrained)
            print(f"[rayssl] fine-tune {row['init']:<10} {fraction:>4.0%} labels: Dice {row['score']:.3f} "
                  f"({row['time_s']:.0f} s)", flush=True)
            rows.append(row)
    return rows
