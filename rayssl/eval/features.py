"""Load a run's pretrained backbone (from export/ or any checkpoint) and extract frozen multi-level features."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rayssl.config import RunConfig, resolve_config
from rayssl.methods import MethodConfig, VolumeInfo, get_method_class
from rayssl.nn.backbones import build_named, global_pool, level_reader
from rayssl.checkpoint import complete_checkpoints, load_checkpoint_dir, load_export_folder

# Networks that are whole segmentation networks (encoder + decoder) in MONAI.
SEGMENTATION_NETWORKS = ("monai.networks.nets.BasicUNet", "monai.networks.nets.SwinUNETR")


@dataclass
class RunWeights:
    """A run's backbone weights in the exported (MONAI) layout, and what is needed to use them."""

    method: str
    network: str  # dotted import path of the network class or factory
    network_kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    key_groups: dict[str, list[str]]
    source: str  # "export" or the checkpoint directory name
    step: int | None
    run_config: RunConfig | None
    card: dict[str, Any] = field(default_factory=dict)

    def method_config(self) -> MethodConfig:
        if self.run_config is None:
            return get_method_class(self.method).config_cls()
        return self.run_config.method_cfg()

    @property
    def has_decoder(self) -> bool:
        """True when pretrained decoder weights were exported too (GVSL pretrains the whole U-Net)."""
        return bool(self.key_groups.get("decoder"))

    def pretraining_patch(self) -> int | None:
        """Largest edge of the pretraining input, from the model card (None when the card does not say)."""
        for key in ("pretraining_patch_size", "pretraining_input_size"):
            value = self.card.get(key)
            if isinstance(value, (list, tuple)) and value:
                return int(max(value))
        return None


def _run_config(run_dir: str, card: dict[str, Any] | None = None) -> RunConfig | None:
    path = os.path.join(run_dir, "config.yaml")
    if os.path.exists(path):
        cfg = resolve_config(file=path)
    elif card and card.get("config"):
        cfg = resolve_config(base=card["config"])
    else:
        return None
    # A run stopped at a probe point keeps `stop_after` in its config; it says nothing about the weights.
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"stop_after": None})})


def export_folder(run_dir: str) -> str:
    """Where a run's export lives: `run_dir/export`, or `run_dir` itself when it is an export folder
    (backbone.pt + model_card.json, e.g. a sweep's `best/`)."""
    if os.path.exists(os.path.join(run_dir, "model_card.json")) and os.path.exists(os.path.join(run_dir, "backbone.pt")):
        return run_dir
    return os.path.join(run_dir, "export")


def load_run_weights(run_dir: str, source: str = "auto", checkpoint: str | None = None) -> RunWeights:
    """The backbone of a run folder: `export/` (source="export"), a checkpoint (source="checkpoint",
    the latest unless `checkpoint` names one), or "auto" (export when present, else the latest checkpoint).
    `run_dir` may also be an export folder itself (a sweep's `best/`).

    A checkpoint is turned into the exported layout by the method's own `build_model` + `export`,
    so probing a checkpoint and probing the export of the same step give the same features.
    """
    run_dir = os.path.abspath(run_dir)
    export_dir = export_folder(run_dir)
    has_export = os.path.exists(os.path.join(export_dir, "backbone.pt"))
    if source not in ("auto", "export", "checkpoint"):
        raise ValueError(f"source={source!r}: use auto, export or checkpoint")
    if checkpoint is None and (source == "export" or (source == "auto" and has_export)):
        if not has_export:
            raise FileNotFoundError(f"{export_dir} has no backbone.pt: the run did not finish; "
                                    f"use --source checkpoint to probe its latest checkpoint")
        # Only the pretrained keys (not the card's "initialized" group), as from a checkpoint.
        card, state, _ = load_export_folder(export_dir)
        return RunWeights(method=card["method"], network=card["network"], network_kwargs=dict(card["network_kwargs"]),
                          state_dict=state, key_groups=card.get("key_groups", {}), source="export",
                          step=card.get("steps"), run_config=_run_config(run_dir, card), card=card)

    if checkpoint is None:
        found = sorted(complete_checkpoints(run_dir))
        if not found:
            raise FileNotFoundError(f"{run_dir} has neither export/backbone.pt nor a complete checkpoint_*/ folder")
        step, checkpoint = found[-1]
    cfg = _run_config(run_dir)
    if cfg is None:
        raise FileNotFoundError(f"{run_dir} has no config.yaml: cannot rebuild the method's model for {checkpoint}")
    state = load_checkpoint_dir(checkpoint)
    method = get_method_class(cfg.method)(cfg.method_cfg())
    model = method.build_model()
    model.load_state_dict(state["model"])
    if state.get("method"):
        method.load_state_dict(state["method"])
    exported = method.export(model)
    card = {**method.card(), "method": cfg.method, "network": exported.network, "steps": int(state["step"])}
    return RunWeights(method=cfg.method, network=exported.network, network_kwargs=dict(exported.network_kwargs),
                      state_dict={k: v.detach().cpu() for k, v in exported.state_dict.items()},
                      key_groups=exported.key_groups, source=os.path.basename(checkpoint), step=int(state["step"]),
                      run_config=cfg, card=card)


def initial_weights(cfg: RunConfig, seed: int = 0) -> RunWeights:
    """The exported backbone of `cfg`'s method at a seeded random init (a reference point before any training)."""
    method = get_method_class(cfg.method)(cfg.method_cfg())
    torch.manual_seed(seed)
    exported = method.export(method.build_model())
    card = {**method.card(), "method": cfg.method, "network": exported.network, "steps": 0}
    return RunWeights(method=cfg.method, network=exported.network, network_kwargs=dict(exported.network_kwargs),
                      state_dict=exported.state_dict, key_groups=exported.key_groups, source="random init",
                      step=0, run_config=cfg, card=card)


def load_exported(network: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load exported weights with strict=False; raise unless every exported key is used. Returns the missing keys."""
    missing, unexpected = network.load_state_dict(state_dict, strict=False)
    if unexpected:
        raise ValueError(f"{len(unexpected)} exported keys do not exist in {type(network).__name__}, "
                         f"e.g. {sorted(unexpected)[:3]}: the export does not match its network")
    return list(missing)


def build_network(weights: RunWeights, pretrained: bool = True, seed: int = 0,
                  out_channels: int | None = None) -> nn.Module:
    """The export's network, with the pretrained weights or a seeded random init (the baseline)."""
    kwargs = dict(weights.network_kwargs)
    if out_channels is not None and "out_channels" in kwargs:
        kwargs["out_channels"] = int(out_channels)
    network = build_named(weights.network, kwargs, seed)
    if pretrained:
        load_exported(network, weights.state_dict)
    return network


# ---------------------------------------------------------------------------------------------
# Multi-level features of any backbone we export
# ---------------------------------------------------------------------------------------------
class FeatureNet(nn.Module):
    """Frozen-feature view of an exported network: `levels(x)` (feature maps, shallow to deep) and `pooled(x)`.

    The traversal is the network family's (rayssl.nn.backbones.level_reader): BasicUNet (encoder
    levels, plus the last decoder level when the decoder was pretrained), SwinUNETR (the Swin
    stages, plus `encoder1` when exported), MONAI ResNets (stem and the four layers), and any
    rayssl `Backbone`, which reads itself; a location-conditioned one (DrasCLR's Loc-CondConv
    encoder) needs the patch's atlas coordinate `loc` and has no location-free dense map (`dense = False`).
    """

    def __init__(self, network: nn.Module, use_decoder: bool = False, use_swin_skip: bool = False) -> None:
        super().__init__()
        self.network = network
        self.reader = level_reader(network, decoder=use_decoder, swin_skip=use_swin_skip)
        self.kind, self.size_multiple, self.dense = self.reader.family, self.reader.size_multiple, self.reader.dense

    @classmethod
    def from_weights(cls, weights: RunWeights, pretrained: bool = True, seed: int = 0) -> "FeatureNet":
        network = build_network(weights, pretrained=pretrained, seed=seed)
        exported = weights.state_dict
        net = cls(network, use_decoder=weights.has_decoder,
                  use_swin_skip=any(k.startswith("encoder1.") for k in exported))
        return net.eval().requires_grad_(False)

    def levels(self, x: torch.Tensor, loc: torch.Tensor | None = None) -> list[torch.Tensor]:
        return list(self.reader.levels(self.network, x, loc))

    def pool(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Global features from `levels(x)`: every level's global average, concatenated; for a
        location-conditioned encoder, its own representation (the deepest level's average)."""
        if not self.dense:
            return global_pool(levels[-1])
        return torch.cat([global_pool(f) for f in levels], dim=1)

    def pooled(self, x: torch.Tensor, loc: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C] global features of `x` (see `pool`)."""
        return self.pool(self.levels(x, loc))

    def forward(self, x: torch.Tensor, loc: torch.Tensor | None = None) -> list[torch.Tensor]:
        return self.levels(x, loc)


def sample_levels(levels: Sequence[torch.Tensor], size: Sequence[int], points: list[torch.Tensor]) -> list[torch.Tensor]:
    """Features of each crop at given voxels, as if every level were upsampled to `size` (trilinear).

    `points[b]` is a [N_b, 3] long tensor of voxel indices in crop b. Sampling with `grid_sample`
    (align_corners=False, border padding) at the voxel centres gives exactly what
    `F.interpolate(level, size, mode="trilinear", align_corners=False)` gives there, without
    materialising the upsampled maps. Returns one [N_b, C_total] tensor per crop.
    """
    size_t = torch.tensor([float(s) for s in size])
    out = []
    for b, pts in enumerate(points):
        # Normalised coordinates of voxel centres; grid_sample's last dim is ordered (W, H, D) = reversed axes.
        normalised = ((pts.float() + 0.5) / size_t) * 2.0 - 1.0
        grid = normalised.flip(-1).view(1, 1, 1, -1, 3)
        feats = [F.grid_sample(level[b:b + 1].float(), grid.to(level.device), mode="bilinear", padding_mode="border",
                               align_corners=False).view(level.shape[1], -1).T for level in levels]
        out.append(torch.cat(feats, dim=1))
    return out


# ---------------------------------------------------------------------------------------------
# Intensities as the method fed them to the network
# ---------------------------------------------------------------------------------------------
IntensityFn = Callable[[np.ndarray, VolumeInfo], np.ndarray]


def intensity_scaler(method: str, config: MethodConfig) -> IntensityFn:
    """The method's own mapping of a volume in stored units to its network input (`Method.input_intensity`)."""
    return get_method_class(method)(config).input_intensity


def round_up(value: int, multiple: int) -> int:
    return int(-(-int(value) // multiple) * multiple)
