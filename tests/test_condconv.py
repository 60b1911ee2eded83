"""Tests of the location-conditioned convolution (rayssl.nn.condconv.LocCondConv3d)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rayssl.nn.condconv import LocCondConv3d


def _reference(layer: LocCondConv3d, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """Per-sample loop as in the official code: mix the experts, then an ordinary conv3d."""
    outputs = []
    for i in range(x.shape[0]):
        routing = torch.sigmoid(loc[i] @ layer.router.weight.T + layer.router.bias)
        kernel = (routing[:, None, None, None, None, None] * layer.weight).sum(0)
        outputs.append(F.conv3d(x[i : i + 1], kernel, layer.bias, stride=layer.stride, padding=layer.padding))
    return torch.cat(outputs)


class TestLocCondConv3d:
    def test_routing_matches_hand_computed_values(self):
        layer = LocCondConv3d(1, 1, kernel_size=1, num_experts=2, coord_dim=3)
        with torch.no_grad():
            layer.router.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, -1.0]]))
            layer.router.bias.copy_(torch.tensor([0.0, 0.5]))
        loc = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.25, 0.5]])
        # Row 0: logits (0, 0.5); row 1: logits (1, 2*0.25 - 0.5 + 0.5 = 0.5).
        sigmoid = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
        expected = torch.tensor([[0.5, sigmoid(0.5)], [sigmoid(1.0), sigmoid(0.5)]])
        torch.testing.assert_close(layer.routing_weights(loc), expected)

    def test_kernel_mixing_and_output_match_hand_computed_values(self):
        # Two 1x1x1 experts with weights 2 and -4, routing (0.5, 0.25) -> kernel 0.5*2 + 0.25*(-4) = 0;
        # routing (0.5, 0.5) -> 1 - 2 = -1. Bias 0.5 is added after mixing.
        layer = LocCondConv3d(1, 1, kernel_size=1, num_experts=2, coord_dim=1)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([2.0, -4.0]).view(2, 1, 1, 1, 1, 1))
            layer.bias.fill_(0.5)
            layer.router.weight.copy_(torch.tensor([[0.0], [1.0]]))
            layer.router.bias.copy_(torch.tensor([0.0, 0.0]))
        logit = torch.log(torch.tensor(1 / 3))  # sigmoid(log(1/3)) = 0.25
        loc = torch.tensor([[logit.item()], [0.0]])
        kernels = layer.mixed_kernels(loc)
        torch.testing.assert_close(kernels.flatten(), torch.tensor([0.0, -1.0]), atol=1e-6, rtol=0)
        x = torch.full((2, 1, 2, 2, 2), 3.0)
        y = layer(x, loc)
        torch.testing.assert_close(y[0], torch.full((1, 2, 2, 2), 0.5), atol=1e-6, rtol=0)
        torch.testing.assert_close(y[1], torch.full((1, 2, 2, 2), -2.5), atol=1e-6, rtol=0)

    @pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0)])
    def test_batched_equals_per_sample_reference(self, stride, padding):
        torch.manual_seed(0)
        layer = LocCondConv3d(3, 5, kernel_size=3, stride=stride, padding=padding, num_experts=4)
        x = torch.randn(4, 3, 9, 8, 7)
        loc = torch.rand(4, 3) * 2 - 1
        torch.testing.assert_close(layer(x, loc), _reference(layer, x, loc), atol=1e-5, rtol=1e-5)

    def test_different_locations_give_different_outputs(self):
        torch.manual_seed(0)
        layer = LocCondConv3d(1, 2, kernel_size=3, padding=1, num_experts=4)
        x = torch.randn(1, 1, 6, 6, 6).repeat(2, 1, 1, 1, 1)
        y = layer(x, torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
        assert not torch.allclose(y[0], y[1])

    def test_gradients_reach_every_expert_and_the_router(self):
        torch.manual_seed(0)
        layer = LocCondConv3d(2, 3, kernel_size=3, padding=1, num_experts=3)
        y = layer(torch.randn(3, 2, 5, 5, 5), torch.rand(3, 3) * 2 - 1)
        (y**2).mean().backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        for expert in range(3):
            assert layer.weight.grad[expert].abs().sum() > 0, f"expert {expert} got no gradient"

    def test_bad_location_shape_is_a_clear_error(self):
        layer = LocCondConv3d(1, 1, num_experts=2)
        with pytest.raises(ValueError, match="loc must have shape"):
            layer(torch.randn(2, 1, 4, 4, 4), torch.randn(3, 3))
