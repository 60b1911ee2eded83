"""Issue #24 diagnosis: which setting keeps a contrastive method's held-out objective below chance to the end?

Trains one method in-process (benchmarks/heldout_objective.py's loop: the method's plan/views, the
optimizer and schedule of `rayssl pretrain`, no Ray) on the 256-phantom CT population for >= 300
steps, once per candidate, each candidate changing ONE thing against the method's `cpu` profile
(the baseline row), all from the same seed. Every `--every` steps the held-out samples are scored
against fixed negatives (the method's `heldout_reference`: K = 16 other held-out samples' target
keys, chance ln 17 per term), so the curves compare across steps and candidates; the embedding
spread (rayssl.nn.health) says whether the embedding collapsed. Losses depend on steps, not time:
other work on the machine changes only the wall time.

    python benchmarks/collapse_diagnosis.py --method drasclr --steps 300
    python benchmarks/collapse_diagnosis.py --method mlsscl --steps 300 --only baseline,centre
    python benchmarks/collapse_diagnosis.py --method mlsscl --steps 300 --only baseline --kind mr

Writes benchmarks/_work/collapse_diagnosis/<method>-<time>.json and .png (fixed-negative objective
and spread vs step, a line per candidate, the chance line dashed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK, fmt_table, machine_info, write_json  # noqa: E402
from heldout_objective import population_store, run_setting  # noqa: E402

# name -> overrides against the method's `cpu` profile; one change each (the list: learning
# rate, target-momentum schedule, temperature, queue length, predictor, weight decay, landmark hold,
# plus centring the projection, rayssl.nn.norm.RunningCentre).
CANDIDATES: dict[str, dict[str, list[str]]] = {
    "mlsscl": {
        "baseline": [],
        "centre": ["mlsscl.centre_projection=true"],
        "head_norm_batch": ["mlsscl.head_norm=batch"],
        "lr_1e-4": ["train.lr=1e-4"],
        "momentum_0.996": ["mlsscl.momentum=0.996"],
        "temperature_0.1": ["mlsscl.temperature=0.1"],
        "queue_16": ["mlsscl.queue_length=16"],
        "weight_decay_1e-4": ["train.weight_decay=1e-4"],
    },
    "drasclr": {
        "baseline": [],
        "centre": ["drasclr.centre_projection=true"],
        "lr_1e-4": ["train.lr=1e-4"],
        "momentum_0.999": ["drasclr.momentum=0.999"],
        "temperature_0.5": ["drasclr.temperature=0.5"],
        "queue_16": ["drasclr.queue_size=16"],
        "hold_1": ["drasclr.landmark_hold_steps=1"],
        "weight_decay_1e-5": ["train.weight_decay=1e-5"],
    },
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True, choices=sorted(CANDIDATES))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    p.add_argument("--set", dest="common", action="append", default=[], metavar="FIELD=VALUE",
                   help="override added to every candidate (e.g. to vary around a kept change)")
    p.add_argument("--kind", choices=("ct", "mr"), default="ct",
                   help="population to train on: 256 CT phantoms, or 256 MNI152 variants with random contrast (MR)")
    p.add_argument("--heldout-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(WORK / "collapse_diagnosis"))
    args = p.parse_args()
    if args.steps < 1 or args.every < 1:
        p.error("--steps and --every must be >= 1")

    import torch

    torch.set_num_threads(args.threads)
    candidates = CANDIDATES[args.method]
    names = [n for n in args.only.split(",") if n] or list(candidates)
    unknown = [n for n in names if n not in candidates]
    if unknown:
        p.error(f"unknown candidate(s) {unknown}; {args.method} has {', '.join(candidates)}")
    store = population_store(kind=args.kind)
    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "store": store, "settings": []}
    out = Path(args.out) / f"{args.method}-{args.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    for name in names:
        overrides = [*args.common, *candidates[name]]
        print(f"[bench] {args.method} {name} {overrides}: {args.steps} steps", flush=True)
        setting = run_setting(args.method, overrides, args.steps, args.every, args.heldout_batches, args.seed, store)
        results["settings"].append({"name": name, **setting})
        write_json(out.with_suffix(".json"), results)  # after every candidate: a long run keeps what it has
    print(fmt_table(table_rows(results), ["candidate", "chance", *(f"step {s}" for s in report_steps(results)),
                                          "end vs chance", "spread start -> end"]))
    plot(results, out.with_suffix(".png"))
    print(f"[bench] results {out.with_suffix('.json')}, plot {out.with_suffix('.png')}")
    return 0


def report_steps(results: dict[str, Any]) -> list[int]:
    return [c["step"] for c in results["settings"][0]["curve"]]


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for s in results["settings"]:
        curve = s["curve"]
        chance = curve[0].get("chance", float("nan"))
        end = curve[-1].get("fixed_total", float("nan"))
        rows.append([s["name"], f"{chance:.3f}", *(f"{c.get('fixed_total', float('nan')):.3f}" for c in curve),
                     f"{100 * (end / chance - 1):+.0f} %", f"{curve[0]['spread']:.3f} -> {curve[-1]['spread']:.3f}"])
    return rows


def plot(results: dict[str, Any], path: Path) -> None:
    """Fixed-negative held-out objective (with chance) and embedding spread vs step, a line per candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_spread) = plt.subplots(1, 2, figsize=(11, 4))
    for s in results["settings"]:
        steps = [c["step"] for c in s["curve"]]
        ax.plot(steps, [c.get("fixed_total", float("nan")) for c in s["curve"]], marker="o", label=s["name"])
        ax_spread.plot(steps, [c["spread"] for c in s["curve"]], marker="o", label=s["name"])
    chance = results["settings"][0]["curve"][0].get("chance")
    if chance is not None:
        ax.axhline(chance, color="k", linestyle="--", label=f"chance {chance:.2f}")
        ax.axhline(0.8 * chance, color="grey", linestyle=":", label="20 % below chance")
    ax.set(title="held-out objective vs fixed negatives", xlabel="step")
    ax_spread.set(title="embedding spread (0 = collapsed)", xlabel="step", ylim=(0, None))
    ax.legend(fontsize=7)
    fig.suptitle(f"{results['args']['method']} cpu profile, one change per candidate, seed {results['args']['seed']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
