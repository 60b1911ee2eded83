"""Representation-health metrics: known answers on synthetic embeddings, and every method's embeddings hook."""

import numpy as np
import pytest
import torch

from rayssl.methods import get_method_class
from rayssl.nn.health import collapse_warnings, representation_health


def test_spread_out_embeddings_are_healthy():
    z = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))
    health = representation_health(z)
    assert health["health_spread"] == pytest.approx(1.0, abs=0.05)
    assert health["health_rank_max"] == 32 and health["health_effective_rank"] > 25
    assert health["health_dead_fraction"] == 0.0
    assert collapse_warnings(health) == []


def test_complete_collapse_is_flagged():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 32, generator=g).repeat(64, 1) + 1e-4 * torch.randn(64, 32, generator=g)
    health = representation_health(z)
    assert health["health_spread"] < 0.01
    assert any("collapsing to one direction" in w for w in collapse_warnings(health))


def test_dimensional_collapse_and_dead_units_are_flagged():
    g = torch.Generator().manual_seed(2)
    # Rows on a 1-D line through 64-D space; half of the units are always 0 (dead ReLUs).
    direction = torch.cat([torch.randn(32, generator=g), torch.zeros(32)])
    z = torch.randn(128, 1, generator=g) * direction + torch.cat([torch.ones(32) * 5, torch.zeros(32)])
    health = representation_health(z)
    assert health["health_effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert health["health_dead_fraction"] == pytest.approx(0.5)
    warnings = collapse_warnings(health)
    assert any("few directions" in w for w in warnings)
    assert not any("constant across" in w for w in warnings)  # exactly half: at the limit, not over it
    health = representation_health(torch.cat([z[:, :16], torch.zeros(128, 48)], dim=1))
    assert health["health_dead_fraction"] == pytest.approx(0.75)
    assert any("75% of embedding units are constant" in w for w in collapse_warnings(health))


def test_a_single_row_has_no_health():
    assert representation_health(torch.randn(1, 8)) == {}
    assert collapse_warnings({}) == []


def _method_batch(name):
    if name == "voco":
        from test_voco import make_batch, tiny_config

        method = get_method_class(name)(tiny_config())
        return method, make_batch(method, 2)
    if name == "mlsscl":
        from test_mlsscl import TINY, make_batch

        method = get_method_class(name)(get_method_class(name).config_cls(**TINY))
        return method, make_batch(method, 2)
    if name == "drasclr":
        from test_drasclr import _batch, _method

        return _method(), _batch()
    from test_gvsl import TINY, _batch

    method = get_method_class(name)(get_method_class(name).config_cls(**TINY))
    return method, _batch(method, 2)


def _forward(name):
    """The method (set up) and its training forward's outputs on a tiny batch, seeded."""
    torch.manual_seed(0)
    method, batch = _method_batch(name)
    model = method.build_model()
    method.setup(model, torch.device("cpu"))
    return method, model(batch)


@pytest.mark.parametrize("name", ["voco", "mlsscl", "drasclr", "gvsl"])
def test_every_method_hands_its_embeddings_to_the_health_metrics(name):
    method, outputs = _forward(name)
    rows = method.embeddings(outputs)
    assert rows.dim() == 2 and rows.shape[0] >= 2 * 2 and rows.shape[1] >= 4
    assert not rows.requires_grad or name != "gvsl"
    health = representation_health(rows)
    assert set(health) == {"health_spread", "health_effective_rank", "health_rank_max", "health_dead_fraction"}
    assert all(np.isfinite(v) for v in health.values())
    assert health["health_effective_rank"] >= 1.0


# The tensor each method's loss compares, by output key, and its width: the health metrics must read
# it (a projection / prediction), not the backbone features before the heads (issue 24).
_COMPARED = {
    "voco": (("random", "bases"), "proj_dim"),  # cos(p, q_i) of student projections
    "mlsscl": (("online_axial", "online_coronal", "online_sagittal", "online_short"), "proj_dim"),  # predictions
    "drasclr": (("query", "neighbor_queries"), "proj_dim"),  # normalised online projections (queries)
}


@pytest.mark.parametrize("name", sorted(_COMPARED))
def test_contrastive_health_reads_the_embedding_the_loss_compares(name):
    method, outputs = _forward(name)
    keys, width = _COMPARED[name]
    rows = method.embeddings(outputs)
    expected = torch.cat([outputs[k].reshape(-1, outputs[k].shape[-1]) for k in keys])
    assert rows.shape == expected.shape and rows.shape[1] == getattr(method.config, width)
    assert torch.equal(rows.detach(), expected.detach())
