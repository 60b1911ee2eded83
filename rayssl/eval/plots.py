"""The probe chart: pretrained vs random bars per probe and label fraction, with 95 % intervals."""

from __future__ import annotations

from typing import Any

import numpy as np


def plot_rows(rows: list[dict[str, Any]], path: str, title: str = "") -> str:
    """Bar chart: one panel per probe, bars per label fraction, pretrained vs random, 95 % intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = list(dict.fromkeys(r["probe"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(probes)), figsize=(4.5 * max(1, len(probes)), 3.8), squeeze=False)
    for ax, probe in zip(axes[0], probes):
        mine = [r for r in rows if r["probe"] == probe]
        fractions = sorted({r["fraction"] for r in mine})
        inits = list(dict.fromkeys(r["init"] for r in mine))
        width = 0.8 / max(1, len(inits))
        for j, init in enumerate(inits):
            picked = [next((r for r in mine if r["fraction"] == f and r["init"] == init), {}) for f in fractions]
            scores = [r.get("score", np.nan) for r in picked]
            errors = [r.get("score_ci95", np.nan) for r in picked]
            xs = np.arange(len(fractions)) + (j - (len(inits) - 1) / 2) * width
            bars = ax.bar(xs, scores, width, label=init, color="tab:blue" if init == "pretrained" else "tab:gray",
                          yerr=np.nan_to_num(np.asarray(errors, dtype=float)), capsize=3)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(np.arange(len(fractions)), [f"{f:.0%}" for f in fractions])
        ax.set_xlabel("labelled fraction")
        ax.set_ylabel(mine[0]["metric"])
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{probe} probe" if probe != "finetune" else "fine-tuning")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
