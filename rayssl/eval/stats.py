"""Statistics over probe repeats: means with Student-t 95 % intervals, and paired gains over random init."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean of `values` and the half-width of its two-sided 95 % confidence interval (Student t).

    NaN values are left out; the half-width is NaN with fewer than two values.
    """
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) < 2:
        return float(x[0]), float("nan")
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return float(x.mean()), half


def summarise_repeats(repeat_rows: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (init, probe, fraction): means over the repeats with 95 % intervals.

    `score` becomes the mean (`scores`: each repeat's, `score_ci95`: the half-width); numeric
    fields and per-class Dice are averaged. Pretrained rows also get `gain` (pretrained - random)
    and `gain_ci95`, from the paired per-repeat differences.
    """
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for rows in repeat_rows:
        for row in rows:
            groups.setdefault((row["init"], row["probe"], row["fraction"]), []).append(row)
    out = []
    for (init, probe, fraction), rows in groups.items():
        merged = dict(rows[0])
        for key, value in rows[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("fraction", "n_train_crops"):
                merged[key] = float(np.nanmean([float(r.get(key, float("nan"))) for r in rows]))
        if isinstance(rows[0].get("dice"), dict):
            classes = dict.fromkeys(k for r in rows for k in r.get("dice", {}))
            merged["dice"] = {c: float(np.mean([r["dice"][c] for r in rows if c in r.get("dice", {})])) for c in classes}
        merged["scores"] = [float(r["score"]) for r in rows]
        merged["score"], merged["score_ci95"] = mean_ci95(merged["scores"])
        merged["repeats"] = len(rows)
        out.append(merged)
    by_key = {(r["init"], r["probe"], r["fraction"]): r for r in out}
    for row in out:
        random_row = by_key.get(("random", row["probe"], row["fraction"]))
        if row["init"] != "pretrained" or random_row is None:
            continue
        row["gain_scores"] = [p - q for p, q in zip(row["scores"], random_row["scores"])]
        row["gain"], row["gain_ci95"] = mean_ci95(row["gain_scores"])
    return out
