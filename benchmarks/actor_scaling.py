"""Issue #8 benchmark: view-building throughput vs number of data actors, on a multi-node Ray cluster simulated on this machine.

A `ray.cluster_utils.Cluster` with a 0-CPU head and one 1-CPU node per actor runs the real
`rayssl.data.pipeline.build_dataset` (plan -> Zarr read -> the method's `views`) with an actor pool
of exactly n actors (`actors=(n, n)`, `actor_cpus=1`, so each actor sits on its own node), for
n in --actors. Reference: the same plan/read/views loop in this process on one core, no Ray.

Reported per n: samples/s and crops/s after a warm-up (actor start-up excluded), speed-up over one
actor, and the cores this benchmark's processes used (the machine may be shared). The simulated nodes share this machine's physical
cores, so throughput grows until those are saturated; the flat part of the curve is this
machine, not Ray (docs/scaling.md turns the per-core rate into cluster sizes).

    python benchmarks/actor_scaling.py                  # VoCo cpu profile on the demo store, n = 1..4
    python benchmarks/actor_scaling.py --quick          # smoke check
    python benchmarks/actor_scaling.py --method mlsscl --actors 1 2
    python benchmarks/actor_scaling.py --method voco --profile paper --in-process-only --step-flops
    python benchmarks/actor_scaling.py --method gvsl --profile paper --in-process-only --step-flops --set views_on=actors

The in-process reference measures the actor part of the views only; a method with a device part
(`Method.device_views`, e.g. GVSL's `views_on: device`) gets it timed on this CPU per training batch
(`device_part`), and --step-flops counts the step on the finished views.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK, cpu_by_role, fmt_table, machine_info, tree_cpu, write_json  # noqa: E402


def crops_per_sample(views: dict[str, np.ndarray]) -> int:
    """Image crops in one sample's views: every float array [..., C, D, H, W] counts its leading dims."""
    crops = 0
    for value in views.values():
        if value.dtype.kind == "f" and value.ndim >= 4:
            crops += int(np.prod(value.shape[:-4])) if value.ndim > 4 else 1
    return crops


def in_process_rate(volumes, method, samples: int, seed: int) -> dict:
    """plan -> read -> views for `samples` samples on one core in this process (no Ray)."""
    import torch

    from rayssl.data.pipeline import ViewBuilder
    from rayssl.data.plan import Planner

    torch.set_num_threads(1)
    planner = Planner(volumes, method.plan, seed=seed)
    builder = ViewBuilder(volumes, method.plan, method.views, read_dtype=method.read_dtype)
    crops, t0 = 0, 0.0
    for i in range(samples + 2):
        if i == 2:  # the first samples open stores and warm caches
            t0, cpu0 = time.perf_counter(), time.process_time()
        _, _, requests, views_seed = planner.plan_requests(i)
        views = builder.build(requests, views_seed)
        if i >= 2:
            crops += crops_per_sample(views)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"samples": samples, "seconds": wall, "samples_per_s": samples / wall, "crops_per_s": crops / wall,
            "crops_per_sample": crops / samples, "cpu_seconds_per_sample": cpu / samples}


def grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                               output_padding, groups, output_mask, out_shape, **kwargs) -> int:
    """torch's count of a convolution's backward, with the weight gradient divided by `groups`.

    torch 2.13's formula ignores groups in the weight gradient: it counts a grouped convolution as if every
    input channel met every output channel, so a convolution with groups=B (DrasCLR's CondConv runs each
    sample's own kernel that way) is counted B times too high, growing with the batch squared.
    """
    from torch.utils.flop_counter import conv_backward_flop

    conv_backward_flop = conv_backward_flop.__wrapped__  # torch's formula on shapes (this one gets shapes too)
    grad_input = conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                                    output_padding, groups, [output_mask[0], False, False], out_shape)
    everything = conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                                    output_padding, groups, [output_mask[0], output_mask[1], False], out_shape)
    return grad_input + (everything - grad_input) // max(int(groups), 1)


def train_step_tflop(method, views: dict[str, np.ndarray], batch_size: int) -> float:
    """FLOPs (in TFLOP) of one training step (forward of every branch, loss, backward) at `batch_size`,
    counted with torch's FlopCounterMode on the meta device (no compute), on CPU if a model refuses meta;
    a grouped convolution's weight gradient counted per group (`grouped_conv_backward_flop`)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = method.build_model()
    method.setup(model, torch.device("cpu"))
    batch = {k: torch.from_numpy(np.stack([v] * batch_size)) for k, v in views.items()}
    for device in ("meta", "cpu"):
        try:
            model_d = model.to(device)
            batch_d = {k: v.to(device) for k, v in batch.items()}
            with FlopCounterMode(display=False, custom_mapping={
                    torch.ops.aten.convolution_backward: grouped_conv_backward_flop}) as counter:
                loss = method.loss(model_d(batch_d), batch_d)["loss"]
                if loss.requires_grad:
                    loss.backward()
            return counter.get_total_flops() / 1e12
        except (RuntimeError, NotImplementedError):
            if device == "cpu":
                raise
            model = method.build_model()  # the meta attempt may have left it half-moved
            method.setup(model, torch.device("cpu"))
    raise AssertionError("unreachable")


def device_part_cost(method, samples: list[dict[str, np.ndarray]], batch_size: int, repeats: int = 3) -> dict | None:
    """Seconds per training batch of the method's device part (`device_views`) on this CPU, at the
    torch threads this process has, and the FLOPs torch's counter sees in it (convolutions and matrix
    products; grid_sample, sorting and hashing are not counted). None when the method has none."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    rows = [samples[i % len(samples)] for i in range(batch_size)]
    batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0] if k != "sample"}
    cpu = torch.device("cpu")
    if method.device_views(batch, cpu) is batch:
        return None
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        method.device_views(batch, cpu)
        times.append(time.perf_counter() - t0)
    with FlopCounterMode(display=False) as counter:
        method.device_views(batch, cpu)
    return {"batch_size": batch_size, "seconds_per_batch": float(np.median(times)), "seconds_all": times,
            "torch_threads": torch.get_num_threads(), "counted_tflop": counter.get_total_flops() / 1e12}


def measure(ds, warmup_rows: int) -> dict:
    """Rows/s of iterating `ds` after the first `warmup_rows` rows, and the cores this benchmark's
    processes used meanwhile (the machine is shared: other users' load is excluded)."""
    rows, crops, t0, cpu0 = 0, 0, None, {}
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=4):
        rows += 1
        if rows == warmup_rows:
            t0, cpu0 = time.perf_counter(), tree_cpu()
        elif t0 is not None:
            crops += crops_per_sample({k: v[0] for k, v in batch.items()})
    wall = time.perf_counter() - t0
    # This process tree: the simulated nodes' raylets and every Ray worker are its children.
    used = cpu_by_role(cpu0, tree_cpu())["total"]
    timed = rows - warmup_rows
    return {"rows": timed, "seconds": wall, "samples_per_s": timed / wall, "crops_per_s": crops / wall,
            "cores_used": used / wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="voco")
    parser.add_argument("--profile", default="cpu", choices=["cpu", "paper"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--samples", type=int, default=160, help="samples streamed per actor count")
    parser.add_argument("--warmup", type=int, default=32, help="rows before the timer starts")
    parser.add_argument("--quick", action="store_true", help="smoke check: n = 1, 2 and fewer samples")
    parser.add_argument("--in-process-only", action="store_true", help="only the one-core reference (no cluster)")
    parser.add_argument("--step-flops", action="store_true",
                        help="also count the FLOPs of one training step at train.batch_size (for docs/scaling.md)")
    parser.add_argument("--device-threads", type=int, default=max(1, (os.cpu_count() or 1)),
                        help="torch threads for timing the device part of the views on this CPU")
    parser.add_argument("--json", default=None, help="results file (default benchmarks/_work/actor_scaling[_quick].json)")
    args = parser.parse_args()
    if args.quick:
        args.actors, args.samples, args.warmup = [1, 2], 48, 16

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from datasets_zarr import demo_store
    from rayssl.config import resolve_config
    from rayssl.data.volumes import load_volumes
    from rayssl.methods import get_method_class

    cfg = resolve_config(method=args.method, profile=args.profile, overrides=["data.split=all", *args.overrides])
    store = str(demo_store(n=cfg.data.demo_volumes)) if not cfg.data.store else cfg.data.store
    method = get_method_class(cfg.method)(cfg.method_cfg())
    volumes = method.prepare(load_volumes(store, "all"))
    results: dict = {"method": cfg.method, "profile": cfg.profile, "overrides": args.overrides, "store": store,
                     "machine": machine_info(), "load_before": os.getloadavg()}
    print(f"[actor_scaling] {cfg.method}/{cfg.profile} on {store} ({len(volumes)} volumes); "
          f"load {results['load_before'][0]:.1f} on {psutil.cpu_count()} cores")

    results["in_process"] = base = in_process_rate(volumes, method, samples=min(args.samples, 48), seed=cfg.seed)
    print(f"  in-process, 1 core: {base['samples_per_s']:.2f} samples/s, {base['crops_per_s']:.1f} crops/s "
          f"({base['crops_per_sample']:.0f} crops/sample, {base['cpu_seconds_per_sample'] * 1e3:.0f} ms CPU/sample)")

    if args.step_flops:
        from rayssl.data.pipeline import ViewBuilder
        from rayssl.data.plan import Planner

        _, _, requests, views_seed = Planner(volumes, method.plan, seed=cfg.seed).plan_requests(0)
        views = ViewBuilder(volumes, method.plan, method.views, read_dtype=method.read_dtype).build(requests, views_seed)
        views = method.finish_views(views)  # the step's inputs: with the device part applied
        results["train_step_tflop"] = train_step_tflop(method, views, cfg.train.batch_size)
        results["batch_size"] = cfg.train.batch_size
        print(f"  one training step at batch {cfg.train.batch_size}: {results['train_step_tflop']:.2f} TFLOP")
    if method.views_on == "device":
        import torch

        from rayssl.data.pipeline import ViewBuilder
        from rayssl.data.plan import Planner

        torch.set_num_threads(args.device_threads)
        planner = Planner(volumes, method.plan, seed=cfg.seed)
        builder = ViewBuilder(volumes, method.plan, method.views, read_dtype=method.read_dtype)
        samples = [builder.build(*planner.plan_requests(i)[2:]) for i in range(cfg.train.batch_size)]
        part = device_part_cost(method, samples, cfg.train.batch_size)
        if part is not None:
            results["device_part"] = part
            print(f"  device part of the views on this CPU ({part['torch_threads']} torch threads): "
                  f"{part['seconds_per_batch']:.2f} s per batch of {part['batch_size']} "
                  f"({part['counted_tflop'] * 1e3:.1f} GFLOP counted)")
    if args.in_process_only:
        write_json(args.json or WORK / f"actor_scaling_{cfg.method}_{cfg.profile}_in_process.json", results)
        return 0
    import ray
    from ray.cluster_utils import Cluster

    from rayssl.data.pipeline import build_dataset

    # A private temp dir: the cluster's address file must not redirect other users' ray.init().
    temp_dir = tempfile.mkdtemp(prefix="ra", dir="/tmp")
    os.environ["RAY_TMPDIR"] = temp_dir
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, object_store_memory=256 * 2**20,
                                                                include_dashboard=False))
    results["ray"] = []
    try:
        for _ in range(max(args.actors)):
            cluster.add_node(num_cpus=1, object_store_memory=192 * 2**20)
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        for n in args.actors:
            ds = build_dataset(volumes, method.plan, method.views, num_samples=args.samples + args.warmup,
                               seed=cfg.seed, actors=(n, n), actor_cpus=1, read_dtype=method.read_dtype)
            row = {"actors": n, **measure(ds, args.warmup), "load": os.getloadavg()[0]}
            results["ray"].append(row)
            print(f"  {n} actor(s): {row['samples_per_s']:.2f} samples/s, {row['crops_per_s']:.1f} crops/s, "
                  f"{row['cores_used']:.2f} cores used (load {row['load']:.1f})")
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

    one = results["ray"][0]["samples_per_s"] if results["ray"] and results["ray"][0]["actors"] == 1 else None
    table = [[r["actors"], f"{r['samples_per_s']:.2f}", f"{r['crops_per_s']:.1f}",
              f"{r['samples_per_s'] / one:.2f}x" if one else "-", f"{r['cores_used']:.2f}", f"{r['load']:.1f}"]
             for r in results["ray"]]
    print()
    print(fmt_table(table, ["actors (1 CPU node each)", "samples/s", "crops/s", "vs 1 actor", "cores used", "machine load"]))
    path = args.json or WORK / f"actor_scaling{'_quick' if args.quick else ''}.json"
    write_json(path, results)
    print(f"\n[actor_scaling] results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
