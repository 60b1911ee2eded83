"""Issue #14 diagnostic: does a method's own objective improve on samples it never trains on?

A training loss at batch 2 is mostly sample noise, so a flat curve says little. This trains one
method in-process (no Ray: the method's `plan`/`views` run through rayssl's `ViewBuilder`, the
optimizer and schedule come from `rayssl/train/optim.py` as in `rayssl pretrain`) and every
`--every` steps evaluates the loss and its terms on a fixed held-out set of samples (sample indices
far beyond the training stream, the same for every setting, built and evaluated by
rayssl/train/heldout.py exactly as a `rayssl pretrain` run does). Several settings (`--lrs`, `--set`)
run from the same initialisation, so their curves compare directly. The result depends on steps,
not on time, so other work on the machine changes only the wall time.

    python benchmarks/heldout_objective.py --method voco --lrs 1e-4,1e-3 --steps 60
    python benchmarks/heldout_objective.py --method voco --lrs 1e-3 --set loss_form=paper

Writes benchmarks/_work/heldout_objective/<method>-<time>.json and .png (held-out terms vs step).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK, fmt_table, machine_info, write_json  # noqa: E402


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np
    import torch

    return {k: torch.as_tensor(np.stack([np.asarray(s[k]) for s in samples])) for k in samples[0]}


def run_setting(method_name: str, overrides: list[str], steps: int, every: int, heldout_batches: int,
                seed: int, store: str | None = None) -> dict[str, Any]:
    """Train `steps` steps with the method's `cpu` profile plus `overrides`; held-out terms every `every` steps.

    `store`: the Zarr store to train on (default: the demo store of the config's size). Besides the
    loss terms on the live queue, each evaluation holds the method's fixed reference (`fixed_*`
    against `chance*`, rayssl/train/heldout.py) and the embedding spread of the held-out outputs."""
    import torch

    from datasets_zarr.demo import demo_store
    from rayssl.config import resolve_config
    from rayssl.data.pipeline import ViewBuilder
    from rayssl.methods import get_method_class
    from rayssl.nn.health import representation_health
    from rayssl.train.heldout import PREFIX as HELDOUT_PREFIX
    from rayssl.train.heldout import build_heldout_batches, evaluate_heldout
    from rayssl.train.optim import build_optimizer, build_scheduler

    cfg = resolve_config(method=method_name, profile="cpu", overrides=[
        f"seed={seed}", f"train.steps={steps}", *overrides])
    tc = cfg.train
    # The held-out samples are the ones a `rayssl pretrain` run of this config evaluates on.
    cfg = cfg.model_copy(update={"train": tc.model_copy(update={"heldout_samples": heldout_batches * tc.batch_size})})
    method = get_method_class(cfg.method)(cfg.method_cfg())
    store = store or str(demo_store(n=cfg.data.demo_volumes))
    volumes = prepared_volumes(method, store, cfg.method_cfg())
    batch = tc.batch_size
    shared = batch if method.step_shared_plans else None
    builder = ViewBuilder(volumes=volumes, plan_fn=method.plan, views_fn=method.views, seed=seed,
                          read_dtype=method.read_dtype, samples_per_step=shared)
    heldout = build_heldout_batches(volumes, method.plan, method.views, cfg, read_dtype=method.read_dtype,
                                    samples_per_step=shared, global_batch=batch)
    cpu = torch.device("cpu")
    # The views' device part (GVSL views_on=device), as the training loop applies it; identity otherwise.
    heldout = type(heldout)([method.device_views({k: torch.as_tensor(v) for k, v in b.items()}, cpu) for b in heldout],
                            live=getattr(heldout, "live", None))
    torch.manual_seed(seed)
    model = method.build_model()
    method.setup(model, cpu)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], tc)
    scheduler = build_scheduler(optimizer, tc)

    def evaluate() -> dict[str, float]:
        # The method's state (queues, teachers) as training left it; nothing is updated here.
        outputs: list[dict[str, torch.Tensor]] = []

        def reference(model_, tensors, outs):  # keeps the held-out outputs for the spread
            outputs.extend(outs)
            return method.heldout_reference(model_, tensors, outs)

        values = evaluate_heldout(model, method.loss, heldout, torch.device("cpu"), reference_fn=reference)
        values = {k.removeprefix(HELDOUT_PREFIX): v for k, v in values.items()}
        health = representation_health(torch.cat([method.embeddings(o) for o in outputs])) if outputs else {}
        return {**values, "spread": health.get("health_spread", float("nan"))}

    curve, train_losses, t0 = [], [], time.time()
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            curve.append({"step": step, **evaluate()})
            shown = {k: v for k, v in curve[-1].items() if k in ("loss", "fixed_total", "chance", "spread")} \
                or {k: v for k, v in curve[-1].items() if k != "step"}
            print(f"[bench]   step {step}: held-out " + " ".join(f"{k} {v:.4f}" for k, v in shown.items())
                  + f" ({time.time() - t0:.0f} s)", flush=True)
        if step == steps:
            break
        model.train()
        sample = method.device_views(collate([builder.build_sample(step * batch + i) for i in range(batch)]), cpu)
        outputs = model(sample)
        losses = method.loss(outputs, sample)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        scheduler.step()
        method.after_step(model, outputs, step, steps)
        train_losses.append(float(losses["loss"].detach()))
    return {"overrides": overrides, "curve": curve, "train_loss": train_losses, "wall_s": round(time.time() - t0, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="voco")
    p.add_argument("--lrs", default="", help="comma-separated learning rates, one setting each (default: the profile's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override for every setting, e.g. loss_form=paper")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--heldout-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", default=None, help="store to train on (default: the demo store; "
                   "'population' = the 256-phantom CT population of pretrain_value.py)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(WORK / "heldout_objective"))
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    lrs = [s for s in args.lrs.split(",") if s] or [None]
    store = population_store() if args.store == "population" else args.store
    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "settings": []}
    for lr in lrs:
        overrides = list(args.overrides) + ([f"train.lr={lr}"] if lr else [])
        print(f"[bench] {args.method} {overrides or '(profile as is)'}: {args.steps} steps", flush=True)
        results["settings"].append(run_setting(args.method, overrides, args.steps, args.every,
                                               args.heldout_batches, args.seed, store))
    out = Path(args.out) / f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    write_json(out.with_suffix(".json"), results)
    rows = []
    for s in results["settings"]:
        first, last = s["curve"][0], s["curve"][-1]
        for key in (k for k in first if k != "step"):
            rows.append([" ".join(s["overrides"]) or "profile", key, f"{first[key]:.4f}", f"{last[key]:.4f}",
                         f"{last[key] - first[key]:+.4f}"])
    print(fmt_table(rows, ["setting", "term", "held-out at step 0", f"at step {args.steps}", "change"]))
    plot(results, out.with_suffix(".png"))
    print(f"[bench] results {out.with_suffix('.json')}, plot {out.with_suffix('.png')}")
    return 0


# The config fields a method's `prepare` reads (DrasCLR: its landmarks and atlas registration), so that
# settings differing only in views, model or loss share one cached preparation; others key on the whole config.
PREPARE_FIELDS = {"drasclr": ("mask", "atlas", "patch_size", "landmark_step", "landmark_min_fraction", "n_neighbors",
                              "spacing_mm")}


def prepared_volumes(method: Any, store: str, method_cfg: Any) -> list[Any]:
    """`method.prepare` of the store's train volumes, cached under benchmarks/_work/prepared/ by store and
    method config (DrasCLR's in-process atlas registration of 256 volumes takes minutes; every setting
    of a diagnosis shares it)."""
    import hashlib
    import pickle

    from rayssl.data.volumes import load_volumes

    fields = PREPARE_FIELDS.get(method.name)
    config = method_cfg.model_dump_json(include=set(fields)) if fields else method_cfg.model_dump_json()
    key = hashlib.sha256(f"{Path(store).resolve()}|{config}".encode()).hexdigest()[:12]
    path = WORK / "prepared" / f"{method.name}-{key}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    volumes = method.prepare(load_volumes(store, "train"))  # the default runner: in-process, no Ray
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(volumes))
    return volumes


def population_store(n: int = 256, kind: str = "ct") -> str:
    """The phantom population pretrain_value.py pretrains on (seeds disjoint from the probe sets'), cached."""
    from datasets_zarr.demo import demo_store
    from rayssl.cli import POPULATION_SEEDS

    return str(demo_store(n=n, kind=kind, seed=POPULATION_SEEDS[kind], progress=True))


def plot(results: dict[str, Any], path: Path) -> None:
    """One panel per loss term: held-out value vs step, a line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = [k for k in results["settings"][0]["curve"][0] if k != "step"]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.6 * len(terms), 3.2), squeeze=False)
    for ax, term in zip(axes[0], terms):
        for s in results["settings"]:
            ax.plot([c["step"] for c in s["curve"]], [c[term] for c in s["curve"]], marker="o",
                    label=" ".join(s["overrides"]) or "profile")
        ax.set_title(f"held-out {term}")
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{results['args']['method']}: the objective on held-out samples", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
