"""Normalisation layers by name (batch, group, instance, layer), and counting the rows BatchNorm sees."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Conv feature maps [B, C, *spatial]: `batch` = BatchNorm (the papers'; its statistics are those of
# the step's batch), `group` = GroupNorm(GROUPS), `instance` = InstanceNorm (affine), `layer` =
# GroupNorm(1) (one group: all channels and voxels of a sample). Only `batch` depends on the batch.
ConvNorm = Literal["batch", "group", "instance", "layer"]
# 1-D head rows [B, C]: `batch` = BatchNorm1d, `layer` = LayerNorm, `group` = GroupNorm(GROUPS) over
# the features of a row. (Instance norm of a [B, C] row has nothing to normalise over.)
HeadNorm = Literal["batch", "layer", "group"]

# Groups of GroupNorm: 4, as measured in issue 24 (MLSSCL ResNet at width x0.25, channels 16..128).
GROUPS = 4
# Fewer rows than this per BatchNorm call and its batch statistics are mostly noise (issue 24).
MIN_BATCHNORM_ROWS = 16


def conv_norm_text(name: ConvNorm) -> str:
    """What `conv_norm(name)` builds, in words (recipe tables)."""
    return {"batch": "BatchNorm", "group": f"GroupNorm({GROUPS})", "layer": "GroupNorm(1)",
            "instance": "InstanceNorm"}[name]


def head_norm_text(name: HeadNorm | None) -> str:
    """What `head_norm(name)` builds, in words (recipe tables)."""
    return {"batch": "BatchNorm1d", "layer": "LayerNorm", "group": f"GroupNorm({GROUPS})", None: "none"}[name]


def _groups(channels: int, name: str) -> int:
    if channels % GROUPS:
        raise ValueError(f"norm '{name}' uses GroupNorm({GROUPS}), which needs channels divisible by {GROUPS}, "
                         f"got a layer with {channels} channels: change the network width or use norm 'layer'")
    return GROUPS


def conv_norm(name: ConvNorm, channels: int, spatial_dims: int = 3) -> nn.Module:
    """The norm layer `name` for conv features of `channels` channels ([B, C, *spatial])."""
    if name == "batch":
        return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims](channels)
    if name == "group":
        return nn.GroupNorm(_groups(channels, name), channels)
    if name == "layer":
        return nn.GroupNorm(1, channels)
    if name == "instance":
        return {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial_dims](channels, affine=True)
    raise ValueError(f"unknown conv norm {name!r}: use one of batch, group, instance, layer")


def head_norm(name: HeadNorm, features: int, affine: bool = True) -> nn.Module:
    """The norm layer `name` for MLP rows [B, features].

    `affine=False` (VoCo's projector): BatchNorm without affine parameters or running statistics
    (batch statistics in training and evaluation alike), LayerNorm / GroupNorm without affine.
    """
    if name == "batch":
        if affine:
            return nn.BatchNorm1d(features)
        return nn.BatchNorm1d(features, affine=False, track_running_stats=False)
    if name == "layer":
        return nn.LayerNorm(features, elementwise_affine=affine)
    if name == "group":
        return nn.GroupNorm(_groups(features, name), features, affine=affine)
    raise ValueError(f"unknown head norm {name!r}: use one of batch, layer, group")


class RunningCentre(nn.Module):
    """Subtracts a running mean of the rows [B, features] seen in training: BatchNorm's centring
    across samples without its batch statistics, so a row's output does not depend on the other rows
    of its step.

    Why: an embedding head without BatchNorm (batch-independent norms, issue 24) starts with every
    row pointing nearly the same way (post-ReLU features share a large mean), and a momentum-target
    InfoNCE loss whose keys all coincide has no gradient, so the embedding collapses. Removing the
    running mean keeps the rows' differences. The mean is updated after use (momentum `momentum`,
    DINO's centring: Caron et al., 2021); the first training call initialises it with that call's mean.
    """

    def __init__(self, features: int, momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"RunningCentre momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("centre", torch.zeros(features))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if self.training and rows.shape[0] > 0:
            with torch.no_grad():
                mean = rows.detach().float().mean(dim=0).to(self.centre.dtype)
                if not bool(self.initialised):
                    self.centre.copy_(mean)
                    self.initialised.fill_(True)
                used = self.centre.clone()
                self.centre.mul_(self.momentum).add_(mean, alpha=1.0 - self.momentum)
            return rows - used.to(rows.dtype)
        return rows - self.centre.to(rows.dtype)

    def extra_repr(self) -> str:
        return f"{self.centre.shape[0]}, momentum={self.momentum}"


def replace_batchnorm(module: nn.Module, name: ConvNorm) -> nn.Module:
    """Replace every BatchNorm layer inside `module` by `conv_norm(name)` of the same width, in place
    (module names stay, so a state_dict keeps its layout). For networks whose constructor cannot
    set every norm layer. Returns `module`."""
    if name == "batch":
        return module
    dims = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm):
                setattr(parent, child_name, conv_norm(name, child.num_features, dims.get(type(child), 3)))
    return module


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def _uses_batch_statistics(module: _BatchNorm) -> bool:
    return module.training or not module.track_running_stats


@contextlib.contextmanager
def count_batchnorm_rows(model: nn.Module) -> Iterator[dict[str, int]]:
    """Within the block, records for every BatchNorm layer of `model` the fewest rows (input.shape[0])
    it normalised over with batch statistics, by module name; SyncBatchNorm rows count x world size.

    Forward pre-hooks, removed on exit; layers in eval mode with running statistics are not counted.
    """
    rows: dict[str, int] = {}

    def record(name: str, module: _BatchNorm, args: tuple[Any, ...]) -> None:
        if not args or not isinstance(args[0], torch.Tensor) or not _uses_batch_statistics(module):
            return
        n = int(args[0].shape[0])
        if isinstance(module, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized():
            n *= dist.get_world_size()
        rows[name] = min(rows.get(name, n), n)

    hooks = [m.register_forward_pre_hook(lambda mod, args, _name=name: record(_name, mod, args))
             for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    try:
        yield rows
    finally:
        for hook in hooks:
            hook.remove()
