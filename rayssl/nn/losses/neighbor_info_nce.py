"""DrasCLR's neighbouring contrastive loss L_neighbor (Yu et al., MedIA 2024, Eq. 8); tensors in."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def neighbor_info_nce(
    neighbor_queries: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor, temperature: float,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """DrasCLR's neighbouring contrastive loss L_neighbor (Yu et al., MedIA 2024, Eq. 8).

    Read as the official code computes it: the query is the sum of the L2-normalised embeddings
    of the anchor's n neighbouring patches, r = Σ_j r_j (not re-normalised, so each neighbour
    contributes its own similarity), the positive is the anchor patch's momentum key k, and the
    negatives are the memory-bank queue of the anchor's landmark:

        L = -log( exp(Σ_j r_j·k / τ) / (exp(Σ_j r_j·k / τ) + Σ_m exp(Σ_j r_j·n_m / τ)) ).

    Args:
        neighbor_queries: [B, n, D] neighbour embeddings, already L2-normalised (gradients flow).
        key: [B, D] anchor keys (normalised here; no gradient expected).
        negatives: [B, K, D] the queue of each anchor's landmark (normalised here).
        temperature: τ > 0.
        negative_mask: [B, K] bool, True for the queue entries that are filled (the rest are left out).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    summed = neighbor_queries.sum(dim=1)  # [B, D]
    k = F.normalize(key, dim=-1)
    n = F.normalize(negatives, dim=-1)
    positive = (summed * k).sum(dim=-1, keepdim=True)
    negative = torch.einsum("bd,bkd->bk", summed, n)
    if negative_mask is not None:
        negative = negative.masked_fill(~negative_mask.to(negative.device), float("-inf"))
    logits = torch.cat([positive, negative], dim=1) / temperature
    labels = torch.zeros(summed.shape[0], dtype=torch.long, device=summed.device)
    return F.cross_entropy(logits, labels)
