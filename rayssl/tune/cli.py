"""`rayssl tune`: argument parsing for Ray Tune sweeps (rayssl.tune.sweep)."""

from __future__ import annotations

import argparse


def add_tune_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("tune", help="Ray Tune sweep over tune_spaces/<method>.yaml, trials scored by a probe",
                       description="Sample the method's search space, pretrain each trial (a TorchTrainer run) in "
                                   "segments, probe its backbone after each segment, stop weak trials with ASHA, and "
                                   "name a winner (its weights are copied to <out>/<sweep>/best).")
    p.add_argument("--method", required=True, help="SSL method (voco, mlsscl, gvsl, drasclr)")
    p.add_argument("--num-samples", type=int, default=4, help="trials (default 4)")
    p.add_argument("--steps", type=int, default=20,
                   help="pretraining steps per trial (default 20: a short sweep; pass the profile's count for a full one)")
    p.add_argument("--out", default="runs/tune", help="folder for sweep folders (default runs/tune)")
    p.add_argument("--space", help="search space YAML (default: tune_spaces/<method>.yaml)")
    p.add_argument("--name", help="sweep name (default: tune-<method>-<time>-<hex>)")
    p.add_argument("--data", help="pretraining Zarr store (default: embedded demo phantoms)")
    p.add_argument("--probe-data", help="labelled store for the probe (default: held-out demo phantoms)")
    p.add_argument("--probes", type=int, default=2, help="probe points per trial, evenly spaced (default 2)")
    p.add_argument("--grace-probes", type=int, default=1, help="probe points before ASHA may stop a trial")
    p.add_argument("--reduction-factor", type=float, default=2, help="ASHA reduction factor (default 2)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the CPUs fit)")
    p.add_argument("--probe-crops", type=int, default=8, help="probe crops per volume (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (sampled values)")
    p.add_argument("--profile", choices=["cpu", "paper", "official"], help="settings profile (default: paper with a GPU, else cpu)")
    p.add_argument("--config", help="YAML config file every trial starts from")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="fixed override for every trial (e.g. --set train.batch_size=1)")
    p.add_argument("--address", help="attach to a running Ray cluster (e.g. auto) instead of starting one")
    p.set_defaults(func=cmd_tune)
    return p


def cmd_tune(args: argparse.Namespace) -> int:
    from rayssl.tune.sweep import run_sweep

    overrides = [*([f"data.store={args.data}"] if args.data else []), *args.overrides]
    result = run_sweep(args.method, num_samples=args.num_samples, steps=args.steps, out=args.out, space=args.space,
                       overrides=overrides, profile=args.profile, config_file=args.config, address=args.address,
                       probes=args.probes, max_concurrent=args.max_concurrent, probe_store=args.probe_data,
                       probe={"crops_per_volume": args.probe_crops}, grace_probes=args.grace_probes,
                       reduction_factor=args.reduction_factor, seed=args.seed, name=args.name)
    return 0 if result.best is not None else 1
