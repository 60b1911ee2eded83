"""Projection / prediction MLP heads shared by the contrastive methods."""

from __future__ import annotations

from torch import nn

from rayssl.nn.norm import HeadNorm, head_norm


def mlp(in_dim: int, hidden_dim: int, out_dim: int, norm: HeadNorm | None = "batch") -> nn.Sequential:
    """Two-layer MLP (Linear-norm-ReLU-Linear), the BYOL/MoCo v2 projector and predictor shape.

    `norm`: "batch" (BYOL / MoCo v2's BatchNorm1d), a batch-independent "layer" / "group"
    (rayssl.nn.norm.head_norm), or None for Linear-ReLU-Linear (MoCo v1 / DrasCLR's head).
    """
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
    if norm is not None:
        layers.append(head_norm(norm, hidden_dim))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
    return nn.Sequential(*layers)
