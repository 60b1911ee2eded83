"""`rayssl` command line: parses arguments and delegates (convert | pretrain | preview | recipe | export | probe | tune)."""

from __future__ import annotations

import argparse
import os
import sys

# Quiet, reproducible defaults for a CLI process; users can still override them.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", help="SSL method (voco, mlsscl, gvsl, drasclr); default voco")
    p.add_argument("--data", action="append", help="Zarr store made by `rayssl convert` (default: embedded demo "
                   "phantoms); repeat for several stores in one run (weights: --set data.stores=...)")
    p.add_argument("--profile", choices=["cpu", "paper", "official"], help="settings profile: cpu (small), paper (the paper's "
                   "recipe), official (the official code's); default: paper when this machine has a GPU or --use-gpu is given, else cpu")
    p.add_argument("--config", help="YAML config file (e.g. a run folder's config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field (dotted paths, e.g. --set voco.lambda_reg=0.5 --set train.lr=3e-4)")
    p.add_argument("--address", help="attach to a running Ray cluster (e.g. auto) instead of starting one")


def _positive_int(text: str) -> int:
    """argparse type of counts that must be >= 1 (`--steps 0` is refused, not read as "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value} (leave the flag out for the default)")
    return value


def _data_overrides(stores: list[str] | None) -> list[str]:
    """`--data A` -> data.store=A; `--data A --data B` -> data.stores=[A, B]."""
    if not stores:
        return []
    import json

    return [f"data.store={stores[0]}"] if len(stores) == 1 else [f"data.stores={json.dumps(stores)}"]


def _resolve(args: argparse.Namespace, extra: list[str]):
    from rayssl.config import resolve_config

    profile = args.profile
    if profile is None and getattr(args, "use_gpu", False):
        # A driver on a CPU head sees no GPU; asking for GPU workers means the GPU-sized settings.
        profile = "paper"
    return resolve_config(method=args.method, profile=profile, file=args.config, overrides=extra + args.overrides)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from rayssl.train.trainer import pretrain

    extra = _data_overrides(args.data)
    if args.steps is not None:  # 0 is refused by the parser, never silently the default
        extra.append(f"train.steps={args.steps}")
    if args.out:
        extra.append(f"out={args.out}")
    if args.num_workers is not None:
        extra.append(f"train.num_workers={args.num_workers}")
    if args.use_gpu:
        extra.append("train.use_gpu=true")
    if args.name:
        extra.append(f"name={args.name}")
    if args.probe:
        extra.append(f"eval.probe_store={args.probe}")
    if args.probe_every is not None:
        extra.append(f"eval.probe_every={args.probe_every}")
    if args.resume:
        run_dir = args.resume if os.path.isdir(args.resume) else os.path.join(args.out or "runs", args.resume)
        if os.path.isdir(run_dir):
            from rayssl.train.runfolder import check_resume

            # Before the run's config.yaml is read: not a rayssl run, or another --method/--profile, is refused.
            check_resume(run_dir, method=args.method, profile=args.profile)
            if not args.config and os.path.exists(os.path.join(run_dir, "config.yaml")):
                args.config = os.path.join(run_dir, "config.yaml")
    cfg = _resolve(args, extra)
    result = pretrain(cfg, resume=args.resume, address=args.address, mlflow_uri=args.mlflow)
    return 0 if result.status in ("finished", "stopped") else 1


def cmd_preview(args: argparse.Namespace) -> int:
    from rayssl.preview import preview

    if args.run and not args.config and os.path.exists(os.path.join(args.run, "config.yaml")):
        args.config = os.path.join(args.run, "config.yaml")  # the model must be built as the run built it
    cfg = _resolve(args, _data_overrides(args.data))
    paths = preview(cfg, samples=args.samples, out=args.out, address=args.address, run=args.run)
    print(f"[rayssl] preview written to {', '.join(paths)} (geometry as numbers: "
          f"{os.path.splitext(args.out)[0]}.json)")
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    from rayssl.recipe import format_recipe

    print(format_recipe(_resolve(args, [])))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rayssl.export import export_run

    export_run(args.run, fmt=args.format, in_channels=args.in_channels, out=args.out, source=args.source,
               out_channels=args.out_channels)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from datasets_zarr import ConversionFailed, convert
    from datasets_zarr.recipes import RECIPES

    options = dict(
        spacing=(args.spacing[0] if args.spacing and len(args.spacing) == 1 else args.spacing),
        modality=args.modality, chunks=args.chunks, shards=args.shards,
        window=tuple(args.window) if args.window else None, normalize=args.normalize or None,
        on_error=args.on_error, address=args.address,
    )
    try:
        if args.recipe:
            if len(args.inputs) != 1:
                raise ValueError(f"--recipe {args.recipe} takes one dataset folder, got {len(args.inputs)} inputs")
            # Only what the user set: the recipe's own defaults (e.g. BTCV spacing) stay otherwise.
            manifest = RECIPES[args.recipe](args.inputs[0], args.out,
                                            **{k: v for k, v in options.items() if v is not None})
        else:
            manifest = convert(args.inputs, args.out, labels=args.label or None, masks=args.mask or None,
                               npy_spacing=args.npy_spacing, **options)
    except ConversionFailed as err:
        print(f"rayssl convert: {err}", file=sys.stderr)
        return 1
    print(f"[rayssl] store {args.out}: {len(manifest)} volumes in the manifest")
    return 0


# Default first seed of a `rayssl demo` population: CT phantoms 5000.. stay clear of the pretraining demo (0..7)
# and of the probe phantoms (rayssl.eval.probe.PROBE_DEMO_SEED, 1000..1007); synthetic MR subjects are all
# deformed and re-contrasted, never the MNI152 template the mni152 probe set is cut from.
POPULATION_SEEDS = {"ct": 5000, "mr": 0}


def cmd_demo(args: argparse.Namespace) -> int:
    from datasets_zarr.demo import demo_store
    from rayssl.eval.probe import PROBE_DEMO_SEED, PROBE_DEMO_VOLUMES

    if args.n < 1:
        raise ValueError(f"--n {args.n}: a population needs at least one volume")
    seed = POPULATION_SEEDS[args.kind] if args.seed is None else args.seed
    if args.kind == "ct" and seed < PROBE_DEMO_SEED + PROBE_DEMO_VOLUMES and seed + args.n > PROBE_DEMO_SEED:
        raise ValueError(f"--seed {seed} --n {args.n}: phantom seeds {seed}..{seed + args.n - 1} overlap the demo probe "
                         f"set's ({PROBE_DEMO_SEED}..{PROBE_DEMO_SEED + PROBE_DEMO_VOLUMES - 1}), so probes would score "
                         f"volumes the encoder was pretrained on; pick another --seed (default {POPULATION_SEEDS['ct']})")
    store = demo_store(n=args.n, kind=args.kind, seed=seed, out=args.out, rebuild=args.rebuild, progress=True)
    print(f"[rayssl] demo {args.kind} store {store}: {args.n} volumes (seeds {seed}..{seed + args.n - 1}); "
          f"pretrain on it with: rayssl pretrain --data {store}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from datasets_zarr.verify import verify_store

    report = verify_store(args.store, fix=args.fix, workers=args.workers)
    print(report.summary())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayssl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain an encoder with an SSL method on Ray Train")
    _add_run_options(p)
    p.add_argument("--steps", type=_positive_int, help="optimizer steps")
    p.add_argument("--out", help="folder for run folders (default runs/)")
    p.add_argument("--name", help="run name (default: unique <method>-<time>-<hex>)")
    p.add_argument("--num-workers", type=_positive_int, help="Ray Train workers")
    p.add_argument("--use-gpu", action="store_true", help="train on GPUs")
    p.add_argument("--resume", metavar="RUN", help="resume a run folder from its last checkpoint")
    p.add_argument("--probe", nargs="?", const="demo", metavar="STORE",
                   help="linear-probe checkpoints during pretraining, beside the training step, against random init: "
                        "a named probe set (demo, the default; mni152) or a labelled Zarr store (eval.probe_store)")
    p.add_argument("--probe-every", type=_positive_int, metavar="N",
                   help="probe every N steps, a multiple of train.checkpoint_every (default: every checkpoint)")
    p.add_argument("--mlflow", metavar="URI", help="also log to this MLflow tracking URI (default: MLFLOW_TRACKING_URI "
                                                   "when set; a resumed run continues its MLflow run)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("preview", help="PNG of each streamed sample's geometry: the method's boxes and points "
                       "on the volume (orthogonal planes) and its views")
    _add_run_options(p)
    p.add_argument("--samples", type=int, default=1, help="samples to draw (one PNG each: OUT, OUT-1, ...)")
    p.add_argument("--run", metavar="RUN", help="run folder whose newest checkpoint's model the preview uses "
                   "(GVSL warps the moving image with it; default: a freshly initialised model); its config.yaml "
                   "is the default --config")
    p.add_argument("--out", default="preview.png")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("recipe", help="print the resolved training recipe of a method and profile "
                       "(optimizer, schedule, batch, length, crops, loss, temperatures, queues, precision)")
    _add_run_options(p)
    p.set_defaults(func=cmd_recipe)

    p = sub.add_parser("export", help="export a run's backbone: MONAI state_dict, MONAI bundle or safetensors",
                       description="Write the run's backbone (export/, or its latest checkpoint) so that it loads strictly "
                                   "into the network its model card names.")
    p.add_argument("run", help="run folder (runs/<name>)")
    p.add_argument("--format", choices=["monai", "bundle", "safetensors"], default="monai",
                   help="monai: backbone.pt + model_card.json; bundle: a MONAI bundle (configs/, models/model.pt, docs/); "
                        "safetensors: model.safetensors + model_card.json")
    p.add_argument("--in-channels", type=int, metavar="N",
                   help="adapt the stem to N input channels (1-channel weights repeated, scaled by 1/N)")
    p.add_argument("--out-channels", type=int, metavar="N",
                   help="a task head of N outputs at a fresh initialisation (BasicUNet final_conv, SwinUNETR out, "
                        "ResNet fc, a Linear head on other encoders); the card names the new network")
    p.add_argument("--out", help="output folder (default RUN/export, RUN/export_bundle, RUN/export_safetensors; "
                                 "_<N>ch appended with --in-channels, _<N>out with --out-channels)")
    p.add_argument("--source", choices=["auto", "export", "checkpoint"], default="auto",
                   help="weights: export/ (auto when present) or the latest checkpoint")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="convert NIfTI / DICOM series / .npy scans into a Zarr store + manifest")
    p.add_argument("inputs", nargs="+", help="files, DICOM series folders, or folders of scans")
    p.add_argument("--out", required=True, help="output store (e.g. data/ct.zarr)")
    p.add_argument("--label", action="append", help="label map for the input at the same position (repeatable)")
    p.add_argument("--mask", action="append", help="mask (e.g. lung) for the input at the same position (repeatable)")
    p.add_argument("--recipe", choices=["btcv", "msd", "luna16", "tcia-covid19", "brain-mri"],
                   help="INPUT is a public dataset's folder as it ships; use its layout and defaults")
    p.add_argument("--npy-spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("SX", "SY", "SZ"),
                   help="voxel size (mm) of .npy inputs, which carry none (default 1 1 1)")
    p.add_argument("--spacing", type=float, nargs="+", help="resample to this spacing in mm (one value or three)")
    p.add_argument("--modality", choices=["CT", "MR"], help="override modality detection")
    p.add_argument("--chunks", type=int, default=64, help="chunk edge in voxels (default 64)")
    p.add_argument("--shards", type=int, help="shard edge in voxels (for object stores); default unsharded")
    p.add_argument("--window", type=float, nargs=2, metavar=("LO", "HI"), help="CT window in HU, scaled to [0, 1]")
    p.add_argument("--normalize", action="store_true", help="MRI percentile normalisation to [0, 1]")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="a bad input: stop (default) or skip it and report at the end")
    p.add_argument("--address", help="Ray cluster address (default: local runtime)")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("verify", help="check a store: every chunk present (per its chunk record) and decodable, "
                       "zarr.json against the manifest; exit code 1 when something is wrong")
    p.add_argument("store", help="the store to check (local path or URL)")
    p.add_argument("--fix", action="store_true", help="re-convert bad volumes from their recorded sources "
                   "(where a source still exists with its recorded hash), atomically")
    p.add_argument("--workers", type=int, help="threads (default: CPU count, at most 8)")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("demo", help="build a synthetic pretraining population store (CT phantoms or brain MR)",
                       description="Write N synthetic volumes through the normal store writer: 'ct' torso phantoms "
                                   "(organ labels, lung masks) or 'mr' brain MR subjects made from nilearn's MNI152 "
                                   "tissue maps with random smooth deformations, per-tissue contrast, bias field and "
                                   "noise (SynthSeg-style). Seeds never overlap the probe sets.")
    p.add_argument("--kind", choices=sorted(POPULATION_SEEDS), default="ct")
    p.add_argument("--n", type=int, default=256, help="volumes (default 256)")
    p.add_argument("--out", help="store path (default: the demo cache, $RAYSSL_CACHE/demo or ~/.cache/rayssl/demo)")
    p.add_argument("--seed", type=int, help="first volume's seed (default: ct 5000, mr 0)")
    p.add_argument("--rebuild", action="store_true", help="replace an existing store at --out")
    p.set_defaults(func=cmd_demo)
    from rayssl.eval.cli import add_eval_parsers
    from rayssl.tune.cli import add_tune_parser
    add_eval_parsers(sub)
    add_tune_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ConnectionError) as err:
        print(f"rayssl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a failed run: its traceback is in the run's ray.log already
        log = getattr(err, "rayssl_log", None)
        if log is None:
            raise
        from rayssl.runtime import error_summary

        print(f"rayssl {args.command}: error: {error_summary(err)}\n(traceback and Ray's output: {log})",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
