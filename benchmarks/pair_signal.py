"""Issue #24: do MLSSCL's positive pairs carry anything that tells one volume from another, before any network?

MLSSCL contrasts an axial clip with a coronal and a sagittal clip (and a short clip with the long one) of
the same volume, each placed at its own random position. If nothing in a clip says which volume it came
from, the InfoNCE terms have no signal, and the best an encoder can do is map every clip to one output
(the collapse collapse_diagnosis.py measured). This scores a hand-made embedding, no network: each clip's
intensity histogram (24 bins over the clip's [0, 1] range) with its mean and std, standardised over the
samples, as the query and key of every term of the loss, M held-out samples each other's negatives
(chance ln M, top-1 chance 1/M). Well below chance means the pairs are learnable from intensity alone.

    python benchmarks/pair_signal.py --kind ct                       # the 256-phantom CT population
    python benchmarks/pair_signal.py --kind mr                       # the 256 MNI152 variants (MR)
    python benchmarks/pair_signal.py --kind ct --set plane_size=null # whole foreground planes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK, fmt_table, machine_info, write_json  # noqa: E402
from heldout_objective import collate, population_store, prepared_volumes  # noqa: E402

TERMS = (("axial", "coronal"), ("axial", "sagittal"), ("coronal", "sagittal"), ("short", "axial"))


def histogram_embedding(clips: Any, bins: int = 24) -> Any:
    """[M, ...] clips in [0, 1] -> [M, bins + 2] unit rows: histogram, mean and std, standardised over the M rows."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(clips).float().flatten(1)
    hist = torch.stack([torch.histc(row, bins=bins, min=0.0, max=1.0) for row in x]) / x.shape[1]
    features = torch.cat([hist, x.mean(1, keepdim=True), x.std(1, keepdim=True)], dim=1)
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    return F.normalize(features, dim=1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("ct", "mr"), default="ct")
    p.add_argument("--samples", type=int, default=64, help="held-out samples M (each other's negatives)")
    p.add_argument("--temperature", type=float, default=0.2, help="MLSSCL's tau")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    from rayssl.config import resolve_config
    from rayssl.data.pipeline import ViewBuilder
    from rayssl.methods import get_method_class

    cfg = resolve_config(method="mlsscl", profile="cpu", overrides=[f"seed={args.seed}", *args.overrides])
    method = get_method_class("mlsscl")(cfg.method_cfg())
    store = population_store(kind=args.kind)
    volumes = prepared_volumes(method, store, cfg.method_cfg())
    builder = ViewBuilder(volumes=volumes, plan_fn=method.plan, views_fn=method.views, seed=args.seed,
                          read_dtype=method.read_dtype)
    m = args.samples
    batch = collate([builder.build_sample(10_000 + i) for i in range(m)])
    embedded = {view: histogram_embedding(batch[view]) for view in ("axial", "coronal", "sagittal", "short")}
    chance = float(np.log(m))
    rows, results = [], []
    for query, key in TERMS:
        logits = embedded[query] @ embedded[key].T / args.temperature
        loss = float(F.cross_entropy(logits, torch.arange(m)))
        top1 = float((logits.argmax(1) == torch.arange(m)).float().mean())
        results.append({"term": f"{query}->{key}", "infonce": loss, "chance": chance, "top1": top1})
        rows.append([f"{query} -> {key}", f"{loss:.3f}", f"{chance:.3f}", f"{100 * (loss / chance - 1):+.0f} %",
                     f"{top1:.2f}", f"{1 / m:.2f}"])
    print(f"[bench] MLSSCL cpu profile {args.overrides or ''} on {store}: {m} samples, tau {args.temperature}")
    print(fmt_table(rows, ["term", "InfoNCE", "chance ln M", "vs chance", "top-1", "top-1 chance"]))
    tag = "".join(c if c.isalnum() else "_" for c in "-".join(args.overrides))
    out = WORK / "pair_signal" / f"mlsscl-{args.kind}{'-' + tag if tag else ''}.json"
    write_json(out, {"machine": machine_info(), "args": vars(args), "store": store, "terms": results})
    print(f"[bench] results {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
