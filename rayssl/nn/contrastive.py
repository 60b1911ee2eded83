"""InfoNCE with a memory queue of negatives (MoCo / MLSSCL / DrasCLR)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    query: torch.Tensor,
    positive_key: torch.Tensor,
    negatives: torch.Tensor | None,
    temperature: float,
    reduction: str = "mean",
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE loss, Oord et al. 2018 / MoCo (He et al. 2020, Eq. 1).

    L = -log( exp(q·k+/τ) / (exp(q·k+/τ) + Σ_n exp(q·k_n/τ)) ), with q, k+ and the negatives
    L2-normalised here.

    Args:
        query: [B, D] queries (gradients flow through them).
        positive_key: [B, D] the positive key for each query (usually detached momentum features).
        negatives: [K, D] negatives shared by the batch (a queue), [B, K, D] per-query negatives,
            or None (then only the other keys of the batch are negatives).
        temperature: τ > 0.
        reduction: "mean" or "none".
        negative_mask: [B, K] bool, True for the negatives that count (a partly filled queue);
            the others are left out of the sum. A row with none left gives exactly 0 (chance ln 1).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    q = F.normalize(query, dim=-1)
    k = F.normalize(positive_key, dim=-1)
    positive_logit = (q * k).sum(dim=-1, keepdim=True)  # [B, 1]
    if negatives is None:
        # In-batch negatives: every other key in the batch.
        all_logits = q @ k.t()  # [B, B], diagonal = positives
        labels = torch.arange(q.shape[0], device=q.device)
        loss = F.cross_entropy(all_logits / temperature, labels, reduction=reduction)
        return loss
    n = F.normalize(negatives, dim=-1)
    if n.dim() == 2:
        negative_logits = q @ n.t()  # [B, K]
    elif n.dim() == 3:
        negative_logits = torch.einsum("bd,bkd->bk", q, n)
    else:
        raise ValueError(f"negatives must be [K, D] or [B, K, D], got shape {tuple(n.shape)}")
    if negative_mask is not None:
        negative_logits = negative_logits.masked_fill(~negative_mask.to(negative_logits.device), float("-inf"))
    logits = torch.cat([positive_logit, negative_logits], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels, reduction=reduction)
