"""VoCo's two loss forms (Wu et al., CVPR 2024): the paper's and the official code's; tensors in, no MONAI transforms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, k, C] x [B, n, C] -> [B, k, n] cosine similarities."""
    return torch.einsum("bkc,bnc->bkn", F.normalize(a, dim=-1), F.normalize(b, dim=-1))


def _upper_pairs(sim: torch.Tensor) -> torch.Tensor:
    """[B, n, n] -> [B, n(n-1)/2]: the entries i < j."""
    n = sim.shape[-1]
    i, j = torch.triu_indices(n, n, offset=1, device=sim.device)
    return sim[:, i, j]


def voco_paper_loss(random_feats: torch.Tensor, base_feats: torch.Tensor, labels: torch.Tensor,
                    lambda_reg: float = 1.0, log_eps: float = 1e-6,
                    reg_reduction: str = "pair_mean") -> dict[str, torch.Tensor]:
    """VoCo loss as written in the paper (Wu et al., CVPR 2024, Sec. 3.2-3.3, Eq. 1-3, 5, 7).

    l_i = cos(p, sg(q_i)) (Eq. 1); L_pred = -(1/n) sum_i log(1 - |y_i - l_i|) (Eq. 2-3), averaged
    over random crops and samples; L_reg (Eq. 5) averaged over samples; L = L_pred + lambda * L_reg
    (Eq. 7). Eq. 5 is 2/(n(n-1)) sum_{i != j} |cos(q_i, q_j)|: `reg_reduction="pair_mean"` reads
    it as the mean over unordered pairs i<j (its factor's count), `"literal_sum"` as printed, over
    ordered pairs, which is twice the pair mean. 1 - |y - l| is clamped at `log_eps` inside the
    log: a raw cosine may be negative, which can make |y - l| >= 1 (the log would be -inf or NaN).

    Args:
        random_feats: [B, k, C] projections p of the random crops.
        base_feats: [B, n, C] projections q of the base crops.
        labels: [B, k, n] overlap fractions y (rows sum to 1).
        lambda_reg: weight of L_reg (lambda >= 0).
        log_eps: lower clamp of 1 - |y - l|.
        reg_reduction: "pair_mean" or "literal_sum" (see above).

    Returns:
        {"loss", "pred", "reg"} scalars.
    """
    logits = _cosine(random_feats, base_feats.detach())
    distance = (labels - logits).abs()
    pred = -torch.log((1.0 - distance).clamp_min(log_eps)).mean()
    similarity = _cosine(base_feats, base_feats)
    if reg_reduction == "pair_mean":
        reg = _upper_pairs(similarity).abs().mean()
    elif reg_reduction == "literal_sum":
        n = similarity.shape[-1]
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=similarity.device)
        reg = (similarity.abs() * off_diagonal).sum(dim=(1, 2)).mean() * (2.0 / (n * (n - 1)))
    else:
        raise ValueError(f"reg_reduction must be 'pair_mean' or 'literal_sum', got {reg_reduction!r}")
    return {"loss": pred + lambda_reg * reg, "pred": pred, "reg": reg}


def voco_official_loss(random_student: torch.Tensor, base_student: torch.Tensor, random_teacher: torch.Tensor,
                       base_teacher: torch.Tensor, labels: torch.Tensor, lambda_reg: float = 1.0) -> dict[str, torch.Tensor]:
    """VoCo loss as trained by the official code (Luffy03/VoCo `models/voco_head.py`).

    logits = (ReLU(cos(p_s, q_t)) + ReLU(cos(p_t, q_s))) / 2 with student (s) and EMA teacher (t)
    projections; per sample, pos = sum -y log(1 - |y - l| + 1e-6) / (sum y + 1e-6),
    neg = sum_{y=0} l^2 / (#{y=0} + 1e-6), reg = mean_{i<j} ReLU(cos(q_s,i, sg(q_s,j)))^2; each
    averaged over samples; L = pos + neg + lambda * reg.

    Args:
        random_student, random_teacher: [B, k, C] projections of the random crops.
        base_student, base_teacher: [B, n, C] projections of the base crops.
        labels: [B, k, n] overlap fractions.
        lambda_reg: weight of reg (the official code uses 1).

    Returns:
        {"loss", "pos", "neg", "reg"} scalars.
    """
    random_teacher, base_teacher = random_teacher.detach(), base_teacher.detach()
    logits = 0.5 * (F.relu(_cosine(random_student, base_teacher)) + F.relu(_cosine(random_teacher, base_student)))
    pos = (-labels * torch.log(1.0 - (labels - logits).abs() + 1e-6)).sum(dim=(1, 2)) / (labels.sum(dim=(1, 2)) + 1e-6)
    non_overlap = (labels == 0).to(logits.dtype)
    neg = (non_overlap * logits.pow(2)).sum(dim=(1, 2)) / (non_overlap.sum(dim=(1, 2)) + 1e-6)
    # cos(q_i, sg(q_j)) for i < j: gradient only through the first base of each pair, as the official code.
    pair_sim = torch.einsum("bic,bjc->bij", F.normalize(base_student, dim=-1), F.normalize(base_student.detach(), dim=-1))
    reg = F.relu(_upper_pairs(pair_sim)).pow(2).mean(dim=1)
    pos, neg, reg = pos.mean(), neg.mean(), reg.mean()
    return {"loss": pos + neg + lambda_reg * reg, "pos": pos, "neg": neg, "reg": reg}
