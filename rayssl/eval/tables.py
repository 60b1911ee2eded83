"""The probe table: pretrained vs random score per probe and label fraction, as aligned text."""

from __future__ import annotations

import math
from typing import Any


def format_table(rows: list[dict[str, Any]]) -> str:
    """Pretrained vs random score per probe and label fraction, each `mean ± 95 % CI`, as an aligned text table."""
    keyed: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for row in rows:
        keyed.setdefault((row["probe"], row["fraction"]), {})[row["init"]] = row
    repeats = max((int(r.get("repeats", 1)) for r in rows), default=1)
    lines = [f"{'probe':<9}{'metric':<19}{'labels':>7}{'crops':>7}{'pretrained':>16}{'random':>16}{'gain':>17}"
             f"   (mean ± 95 % CI over {repeats} repeats)"]
    for (probe, fraction), pair in keyed.items():
        first = next(iter(pair.values()))
        pre, rnd = pair.get("pretrained", {}), pair.get("random", {})
        gain = pre.get("gain")
        if gain is None and pre.get("score") is not None and rnd.get("score") is not None:
            gain = pre["score"] - rnd["score"]
        lines.append(f"{probe:<9}{first['metric']:<19}{fraction:>6.0%} {first['n_train_crops']:>6}"
                     f"{_fmt_ci(pre.get('score'), pre.get('score_ci95')):>16}"
                     f"{_fmt_ci(rnd.get('score'), rnd.get('score_ci95')):>16}"
                     f"{_fmt_ci(gain, pre.get('gain_ci95'), signed=True):>17}")
    dice_rows = [r for r in rows if "dice" in r and r["fraction"] == max(x["fraction"] for x in rows)]
    for row in dice_rows:
        per_class = ", ".join(f"{k} {v:.2f}" for k, v in row["dice"].items())
        lines.append(f"  {row['probe']} {row['init']} Dice per class @ {row['fraction']:.0%}: {per_class}")
    return "\n".join(lines)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _fmt_ci(value: float | None, half: float | None, signed: bool = False) -> str:
    """`0.123 ± 0.004`; the value alone when there is no interval."""
    if half is None or (isinstance(half, float) and math.isnan(half)) or _fmt(value) == "-":
        return _fmt(value, signed)
    return f"{_fmt(value, signed)} ± {half:.3f}"
