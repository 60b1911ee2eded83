"""benchmarks/actor_scaling.py counts a grouped convolution's backward per group (docs/scaling.md, `t`)."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import load_benchmark


def _counts(x: torch.Tensor, w: torch.Tensor, groups: int, mapping: dict) -> dict[str, int]:
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        torch.nn.functional.conv3d(x, w, padding=1, groups=groups).sum().backward()
    return {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}


def test_grouped_convolution_backward_counts_like_the_same_work_ungrouped():
    """DrasCLR's CondConv: B samples' own kernels as one convolution with groups=B. Its work equals an
    ungrouped convolution with the same channel pairs; the backward (input and weight gradients) is twice
    the forward. torch's own formula counts the grouped weight gradient B times too high."""
    count = load_benchmark("actor_scaling").grouped_conv_backward_flop
    mapping = {torch.ops.aten.convolution_backward: count}
    b, c_in, c_out = 8, 4, 6
    x = torch.randn(1, b * c_in, 6, 6, 6)
    grouped = _counts(x, torch.randn(b * c_out, c_in, 3, 3, 3), b, mapping)
    # One output channel per group's worth of pairs: c_out x (b * c_in) = b x c_out x c_in pairs, as grouped.
    plain = _counts(x, torch.randn(c_out, b * c_in, 3, 3, 3), 1, mapping)
    assert grouped["aten.convolution"] == plain["aten.convolution"]
    assert grouped["aten.convolution_backward"] == plain["aten.convolution_backward"] == 2 * plain["aten.convolution"]
    torchs_own = _counts(x, torch.randn(b * c_out, c_in, 3, 3, 3), b, {})
    # The error corrected; once torch counts groups itself, the correction would divide twice and must go.
    assert torchs_own["aten.convolution_backward"] > grouped["aten.convolution_backward"]
