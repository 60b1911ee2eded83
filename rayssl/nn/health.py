"""Representation health of a batch of embeddings: spread, effective rank and dead units, to catch collapse early."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Limits of `collapse_warnings`. Spread is low but not ~0 for non-contrastive features at init
# (GVSL's pooled bottleneck, all in the positive orthant: ~0.07), so the limit sits below that.
MIN_SPREAD = 0.02
MAX_DEAD_FRACTION = 0.5
MIN_RANK_SHARE = 0.05


@torch.no_grad()
def representation_health(embeddings: torch.Tensor) -> dict[str, float]:
    """Collapse indicators of `embeddings` [N, D] (one row per sample or view).

    - `health_spread`: the per-unit standard deviation across rows of the L2-normalised embeddings,
      averaged over units and times sqrt(D): ~1 for directions spread over the sphere, 0 when every
      row points the same way (complete collapse; Chen & He, SimSiam, 2021, Sec. 4.1).
    - `health_effective_rank`: exp of the entropy of the normalised singular values of the centred
      embeddings (Roy & Vetterli, 2007), between 1 and `health_rank_max` = min(N - 1, D): low values
      mean the rows span few directions (dimensional collapse).
    - `health_dead_fraction`: share of units that do not vary across the rows.
    """
    z = embeddings.detach().float().flatten(1)
    n, d = z.shape
    if n < 2:
        return {}
    unit_std = z.std(dim=0)
    scale = float(z.abs().max().clamp_min(1e-12))
    dead = float((unit_std <= 1e-6 * scale).float().mean())
    spread = float(F.normalize(z, dim=1).std(dim=0).mean() * math.sqrt(d))
    singular = torch.linalg.svdvals(z - z.mean(dim=0, keepdim=True))
    total = float(singular.sum())
    if total <= 1e-12 * max(scale, 1.0):
        rank = 0.0
    else:
        p = singular / total
        p = p[p > 0]
        rank = float(torch.exp(-(p * p.log()).sum()))
    return {"health_spread": spread, "health_effective_rank": rank, "health_rank_max": float(min(n - 1, d)),
            "health_dead_fraction": dead}


def collapse_warnings(health: dict[str, float]) -> list[str]:
    """Plain-language warnings for the indicators of `representation_health` that signal collapse."""
    if not health:
        return []
    out = []
    if health["health_spread"] < MIN_SPREAD:
        out.append(f"embeddings are collapsing to one direction (spread {health['health_spread']:.3f}, "
                   f"healthy ~1, warn below {MIN_SPREAD})")
    if health["health_dead_fraction"] > MAX_DEAD_FRACTION:
        out.append(f"{health['health_dead_fraction']:.0%} of embedding units are constant across the batch")
    rank_max = health["health_rank_max"]
    if rank_max >= 8 and health["health_effective_rank"] < MIN_RANK_SHARE * rank_max:
        out.append(f"embeddings span few directions (effective rank {health['health_effective_rank']:.1f} "
                   f"of at most {rank_max:.0f})")
    return out
