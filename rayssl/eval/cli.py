"""`rayssl probe`: its argument parser and the command it runs (wired into rayssl/cli.py)."""

from __future__ import annotations

import argparse


def _fractions(text: str) -> tuple[float, ...]:
    """'10,30,100' or '0.1,0.3,1' -> (0.1, 0.3, 1.0)."""
    values = [float(v.rstrip("%")) for v in text.split(",") if v.strip()]
    if values and max(values) > 1:
        values = [v / 100 for v in values]
    return tuple(values)


def add_probe_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("probe", help="linear probe (and fine-tuning) of a run's backbone against random init",
                       description="Probe a run's pretrained backbone on a labelled store: voxel-level Dice of a 1x1x1 "
                                   "conv on frozen features (segmentation networks) or logistic regression on pooled "
                                   "features (encoders), at several label fractions, against the same network from "
                                   "random init. Writes probe.json and probe.png into the run folder.")
    p.add_argument("run", help="run folder (runs/<name>)")
    p.add_argument("--data", help="labelled Zarr store, or a named probe set built from packaged data: 'demo' "
                                  "(default: 8 held-out CT phantoms with organ labels) or 'mni152' (two MNI152 T1 "
                                  "hemispheres with CSF / grey / white matter labels, from nilearn)")
    p.add_argument("--task", choices=["auto", "voxel", "patch", "both"], default="auto",
                   help="auto: voxel probe for BasicUNet/SwinUNETR backbones, patch probe for encoders")
    p.add_argument("--fractions", type=_fractions, default=(0.1, 0.3, 1.0), metavar="F,F,...",
                   help="label fractions, e.g. 10,30,100 (default) or 0.1,1")
    p.add_argument("--fraction-unit", choices=["crops", "volumes"], default="crops",
                   help="a fraction counts labelled crops (default) or labelled volumes")
    p.add_argument("--source", choices=["auto", "export", "checkpoint"], default="auto",
                   help="weights: export/ (auto when present) or the latest checkpoint")
    p.add_argument("--checkpoint", help="a specific checkpoint folder of the run")
    p.add_argument("--patch", type=int, help="crop edge in voxels (default: the pretraining patch size)")
    p.add_argument("--crops-per-volume", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of the fit/eval split, crops and heads")
    p.add_argument("--repeats", type=int, default=5,
                   help="repeat the probe with other seeds of crops, label subsets, heads and random init; scores "
                        "are means with 95 %% confidence intervals over the repeats (default 5)")
    p.add_argument("--finetune", action="store_true",
                   help="also fine-tune the network with a segmentation head (pretrained vs random init)")
    p.add_argument("--finetune-steps", type=int, default=40)
    p.add_argument("--finetune-batch", type=int, default=2)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--no-baseline", action="store_true", help="skip the random-init baseline")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--out", help="folder for probe.json / probe.png (default: the run folder)")
    p.set_defaults(func=cmd_probe)
    return p


def cmd_probe(args: argparse.Namespace) -> int:
    from rayssl.eval.finetune import FinetuneConfig
    from rayssl.eval.probe import ProbeConfig
    from rayssl.eval.report import run_probe

    cfg = ProbeConfig(tasks=args.task, fractions=args.fractions, fraction_unit=args.fraction_unit, patch=args.patch,
                      crops_per_volume=args.crops_per_volume, seed=args.seed, repeats=args.repeats,
                      baseline=not args.no_baseline,
                      threads=args.threads)
    finetune = (FinetuneConfig(steps=args.finetune_steps, batch_size=args.finetune_batch, lr=args.finetune_lr,
                               seed=args.seed) if args.finetune else None)
    run_probe(args.run, store=args.data, cfg=cfg, source=args.source, checkpoint=args.checkpoint,
              finetune=finetune, out_dir=args.out)
    return 0


def add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `rayssl probe` on the main parser's subcommands."""
    add_probe_parser(sub)
