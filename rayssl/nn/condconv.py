"""Location-conditioned 3D convolution (DrasCLR Loc-CondConv): per-sample kernels mixed from experts by position."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _triple(value: int | tuple[int, int, int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    if len(value) != 3:
        raise ValueError(f"expected an int or a 3-tuple, got {value!r}")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


class LocCondConv3d(nn.Module):
    """3D convolution whose kernel depends on the anatomical location of the input patch.

    DrasCLR's Loc-CondConv (Yu et al., MedIA 2024), after CondConv (Yang et al. 2019): with E
    expert kernels W_1..W_E and the patch's atlas coordinate `loc`,

        r(loc) = sigmoid(Linear(loc)) ∈ (0, 1)^E,      W(loc) = Σ_e r_e(loc) · W_e,
        y = W(loc) * x + b.

    Each layer has its own router. The bias is shared across experts (as in the official code).
    The batch is computed in one grouped convolution: the B per-sample kernels are stacked along
    the output-channel axis and the batch is folded into the channel axis with `groups=B`, so there
    is no per-sample Python loop.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size, stride, padding, dilation: as `nn.Conv3d`.
        num_experts: E, number of expert kernels.
        coord_dim: length of the location vector fed to the router (3 for an (x, y, z) atlas coordinate).
        bias: add a learnable bias shared by all experts.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
        dilation: int | tuple[int, int, int] = 1,
        num_experts: int = 8,
        coord_dim: int = 3,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _triple(kernel_size)
        self.stride = _triple(stride)
        self.padding = _triple(padding)
        self.dilation = _triple(dilation)
        self.num_experts = num_experts
        self.coord_dim = coord_dim
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.router = nn.Linear(coord_dim, num_experts)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert is initialised like a standalone nn.Conv3d kernel (fan-in = in·k³), so a
        # mixture with routing weights around 0.5 starts at the scale of an ordinary convolution.
        for expert in self.weight:
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * math.prod(self.kernel_size)
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def routing_weights(self, loc: torch.Tensor) -> torch.Tensor:
        """r(loc) = sigmoid(Linear(loc)): [B, coord_dim] -> [B, E] (the routing function)."""
        return torch.sigmoid(self.router(loc))

    def mixed_kernels(self, loc: torch.Tensor) -> torch.Tensor:
        """Σ_e r_e(loc)·W_e for each sample: [B, coord_dim] -> [B, out, in, kD, kH, kW] (the conditional kernel)."""
        routing = self.routing_weights(loc)
        return torch.einsum("be,eoidhw->boidhw", routing, self.weight)

    def forward(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        """x: [B, in, D, H, W], loc: [B, coord_dim] -> [B, out, D', H', W']."""
        if x.dim() != 5:
            raise ValueError(f"expected a 5D input [B, C, D, H, W], got shape {tuple(x.shape)}")
        batch = x.shape[0]
        if loc.shape != (batch, self.coord_dim):
            raise ValueError(f"loc must have shape ({batch}, {self.coord_dim}), got {tuple(loc.shape)}")
        kernels = self.mixed_kernels(loc.to(x.dtype))
        grouped_kernels = kernels.reshape(batch * self.out_channels, self.in_channels, *self.kernel_size)
        bias = self.bias.repeat(batch) if self.bias is not None else None
        out = F.conv3d(
            x.reshape(1, batch * self.in_channels, *x.shape[2:]),
            grouped_kernels,
            bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=batch,
        )
        return out.reshape(batch, self.out_channels, *out.shape[2:])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, num_experts={self.num_experts}, coord_dim={self.coord_dim}, "
            f"bias={self.bias is not None}"
        )
