"""GPU check: each method's `paper` profile at full size, mixed precision, a fixed number of steps; does data keep up?

    ./setup.sh && .venv/bin/python benchmarks/gpu_check.py                  # on a machine with NVIDIA GPUs
    .venv/bin/python benchmarks/gpu_check.py --data data/ct.zarr --steps 50  # your own store
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny            # the same code path on CPU: every paper profile at tiny sizes (CI)

For every method it runs `rayssl pretrain` (the normal config resolution, so `--profile` picks up
any profile the methods define) and prints the steady-state step time (the first report, which
holds start-up, is left out), samples/s, data-wait %, peak GPU memory, and the data-actor CPU cores
per GPU that keep data wait under 5 %, measured from the actors' own CPU time per sample.
Results also go to benchmarks/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/gpu_check.py` from anywhere
    sys.path.insert(0, str(REPO))

METHODS = ("voco", "mlsscl", "gvsl", "drasclr", "mae")
# Methods whose paper profile refuses stores at another spacing (lifted on the demo phantoms, see check_method);
# VoCo's paper profile resamples its prepared regions to 1.5 mm itself.
SPACING_REQUIRED = ("drasclr",)
# --tiny: the methods' unit-test sizes over `--profile` (paper by default: its optimizer, schedule, loss form,
# norms, precision and `views_on` stay), so every method's paper code path runs in CI on 2 CPU cores.
TINY = {
    "voco": ["n_x=2", "n_y=2", "region_size=[64,64,32]", "input_size=32", "backbone=unet",
             "unet_features=[4,4,8,8,16,4]", "proj_hidden_dim=32", "proj_dim=32"],
    "mlsscl": ["clip_length=4", "long_stride=3", "short_stride=2", "plane_size=12", "image_size=12",
               "resnet_widen_factor=0.125", "mlsscl.proj_dim=16", "queue_length=8"],
    "gvsl": ["gvsl.input_size=[32,32,32]", "features=[4,4,8,8,16,4]", "num_groups=2"],
    "drasclr": ["patch_size=8", "landmark_step=4", "widths=[4,4,4,8,8]", "rep_dim=8", "drasclr.proj_dim=6",
                "num_experts=3", "queue_size=4", "n_neighbors=2"],
    "mae": ["mae.input_size=[32,32,32]", "block_size=4", "features=[4,4,8,8,16,4]"],
}
# --tiny's batch: the smallest that BatchNorm (VoCo's and MLSSCL's paper heads, DrasCLR's encoder) normalises.
TINY_BATCH = 2


def check_method(method: str, args: argparse.Namespace, out: str) -> dict:
    """Pretrain `method` for args.steps steps and summarise its steady-state reports."""
    from rayssl.config import resolve_config
    from rayssl.train.trainer import pretrain

    gpu = args.device == "cuda"
    overrides = [f"out={out}", f"train.steps={args.steps}", "train.report_every=1",
                 f"train.checkpoint_every={args.steps}", "train.amp=true", f"train.use_gpu={str(gpu).lower()}",
                 f"train.num_workers={args.num_workers}", f"data.actors_max={args.actors}", "data.split=all"]
    if args.data:
        overrides.append(f"data.store={args.data}")
    if method in SPACING_REQUIRED and (args.tiny or not args.data):
        # The demo phantoms are 4 x 4 x 5 mm; DrasCLR's paper profile requires 1 mm stores. Step cost does
        # not depend on it, so this throughput check (and --tiny's code-path check on any store) lifts it.
        overrides.append(f"{method}.spacing_mm=null")
    if args.tiny:
        overrides += [*TINY[method], f"train.batch_size={TINY_BATCH}"]
    cfg = resolve_config(method=method, profile=args.profile, overrides=overrides)
    result = pretrain(cfg, address=args.address)
    with open(os.path.join(result.run_dir, "metrics.jsonl")) as f:
        reports = [json.loads(line) for line in f]
    steady = reports[1:] or reports  # the first report holds worker start-up and the pipeline's first batch

    def mean(key: str) -> float | None:
        values = [r[key] for r in steady if key in r]
        return sum(values) / len(values) if values else None

    return {
        "method": method, "profile": cfg.profile, "status": result.status, "steps": result.steps,
        "batch_size": cfg.train.batch_size, "workers": cfg.train.num_workers,
        "step_time_s": mean("step_time_s"), "samples_per_s": mean("samples_per_s"),
        "data_wait_pct": mean("data_wait_pct"),
        # The views' device part (Method.device_views) on the worker, inside the data wait; None without one.
        "device_views_s_per_batch": mean("device_views_s_per_batch"),
        "peak_gpu_mem_mb": max((r.get("gpu_peak_mem_mb", 0.0) for r in reports), default=None) if gpu else None,
        "data_cpu_s_per_sample": mean("data_cpu_s_per_sample"),
        # data_cores_needed covers all workers' consumption: per GPU it is divided by the workers.
        "cpu_cores_per_gpu_for_5pct_wait": (mean("data_cores_needed") or 0.0) / max(cfg.train.num_workers, 1),
        "run_dir": result.run_dir,
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke run of the same code path)")
    parser.add_argument("--profile", default="paper", help="settings profile of every method (default paper)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per method (default 30)")
    parser.add_argument("--num-workers", type=int, default=1, help="Ray Train workers = GPUs (default 1)")
    parser.add_argument("--actors", type=int, default=4, help="data actors (data.actors_max, default 4)")
    parser.add_argument("--data", help="Zarr store (default: the embedded demo phantoms)")
    parser.add_argument("--address", help="attach to a running Ray cluster")
    parser.add_argument("--out", help="folder for the run folders (default: a temporary folder)")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "gpu_check.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device visible; run on a GPU machine or pass --device cpu --tiny", file=sys.stderr)
            return 2
    from rayssl.methods import get_method_class

    methods, skipped = [], {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        cls = get_method_class(method)
        if args.profile in cls.profiles:
            methods.append(method)
        else:  # e.g. --profile official: MLSSCL and MAE have none; say why before any run starts
            skipped[method] = cls.missing_profiles.get(args.profile, f"no {args.profile!r} profile")
            print(f"[gpu_check] skipping {method}: no {args.profile!r} profile ({skipped[method]})", file=sys.stderr)
    if not methods:
        print(f"gpu_check: none of the methods has a {args.profile!r} profile", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out = args.out or tempfile.mkdtemp(prefix="rayssl-gpu-check-")
    rows = []
    t0 = time.perf_counter()
    for method in methods:
        rows.append(check_method(method, args, out))
    print(f"\n{'method':8} {'profile':7} {'step s':>8} {'samples/s':>10} {'data wait':>9} {'GPU MiB':>8} "
          f"{'CPU-s/sample':>12} {'cores/GPU (<5% wait)':>21} {'device views s/batch':>20}")
    for r in rows:
        print(f"{r['method']:8} {r['profile']:7} {_fmt(r['step_time_s'], '8.3f')} {_fmt(r['samples_per_s'], '10.2f')} "
              f"{_fmt(r['data_wait_pct'], '8.1f')}% {_fmt(r['peak_gpu_mem_mb'], '8.0f')} "
              f"{_fmt(r['data_cpu_s_per_sample'], '12.4f')} {_fmt(r['cpu_cores_per_gpu_for_5pct_wait'], '21.2f')} "
              f"{_fmt(r['device_views_s_per_batch'], '20.4f')}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"device": args.device, "tiny": args.tiny, "profile": args.profile,
                   "wall_time_s": time.perf_counter() - t0, "methods": rows, "skipped": skipped}, f, indent=2)
    print(f"\n[gpu_check] {len(rows)} methods in {time.perf_counter() - t0:.0f} s; results in {args.json}")
    return 0 if all(r["status"] == "finished" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
