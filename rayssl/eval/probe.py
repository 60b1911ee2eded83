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

The pieces live in their own modules and are re-exported here: settings (probe_config), labelled
data (probe_data), crop pools and their features (crops), the voxel probe (probe_voxel), the patch
probe (probe_patch), repeat statistics (stats), the table (tables) and the chart (plots); this
module drives them for one backbone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from rayssl.eval.crops import CropPool, build_pool, fraction_subset, pool_features, scaled_volumes
from rayssl.eval.features import FeatureNet, RunWeights, intensity_scaler, round_up
from rayssl.eval.plots import plot_rows
from rayssl.eval.probe_config import DEFAULT_FRACTIONS, ProbeConfig
from rayssl.eval.probe_data import (
    PROBE_DEMO_SEED,
    PROBE_DEMO_VOLUMES,
    PROBE_SETS,
    LabelledVolume,
    ProbeData,
    default_probe_store,
    load_probe_data,
    mni152_probe_store,
    resolve_probe_store,
)
from rayssl.eval.probe_patch import macro_auc, patch_probe
from rayssl.eval.probe_voxel import (
    dice_per_class,
    predict_crops,
    predict_volume,
    summarise_dice,
    train_voxel_head,
    voxel_probe,
)
from rayssl.eval.stats import mean_ci95, summarise_repeats
from rayssl.eval.tables import format_table

# The names callers import from rayssl.eval.probe (its pieces' public names and the driver's).
__all__ = [
    "DEFAULT_FRACTIONS", "DEFAULT_PATCH", "PROBE_DEMO_SEED", "PROBE_DEMO_VOLUMES", "PROBE_SETS", "REPEAT_SEED_STEP",
    "CropPool", "LabelledVolume", "ProbeConfig", "ProbeData", "ProbeSetup",
    "build_pool", "default_probe_store", "dice_per_class", "format_table", "fraction_subset", "load_probe_data",
    "macro_auc", "mean_ci95", "mni152_probe_store", "patch_probe", "plot_rows", "pool_features", "predict_crops",
    "predict_volume", "prepare", "probe_network", "probe_patch_size", "probe_score", "resolve_probe_store",
    "resolve_tasks", "scaled_volumes", "summarise_dice", "summarise_repeats", "train_voxel_head", "voxel_probe",
]

# Probe crop edge when the model card gives no pretraining patch size.
DEFAULT_PATCH = 32
# Seed step between probe repeats (kept apart from the eval pool's `seed + 1`).
REPEAT_SEED_STEP = 101


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
