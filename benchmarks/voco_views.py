"""Issue #3 benchmark: VoCo training samples/s built by rayssl's CPU actors vs the official VoCo data path.

One run, on the same CT-sized volumes (512x512x~300 int16, see _common.synth_ct):

* rayssl: `rayssl.methods.voco` plan + views through the Ray Data pipeline (`--actors` CPU
  actors): a region read from the Zarr store, split into n base crops, k random crops, every crop
  resized and augmented. Profiles: "paper" (the official semantics resized per sample:
  foreground box read and resized to 384x384x96, 4x4 bases of 96^3, 2 random crops, 64^3 inputs;
  prepare_regions=false), "paper-prepared" (the paper profile as `rayssl pretrain --profile paper`
  runs it: `VoCo.prepare` resizes every foreground box once, then samples read a 384x384x96 region;
  what the official PersistentDataset caches), "paper-crop" (the paper sizes with
  region_mode=crop: a 384x384x96 region read at native spacing), "cpu" (96x96x32 region,
  24x24x32 bases, 32^3 inputs).
* official: the data path of Luffy03/VoCo (`utils/data_utils.py`, `get_loader`), re-created here
  with MONAI transforms: LoadImaged(.nii.gz, int16) -> EnsureChannelFirstd -> Orientationd(RAS) ->
  ScaleIntensityRanged(-175..250 -> 0..1, clip) -> CropForegroundd(value > 0.3) ->
  Resized(region, bilinear, align_corners) -> VoCo views (k random crops at random centres with
  their overlap labels, n base crops at grid centres; each SpatialCropd -> Resized(input) ->
  RandFlipd x3 (p 0.2) -> RandRotate90d (p 0.2) -> RandShiftIntensityd (0.1, p 0.1)), in a torch
  DataLoader with `--workers` workers, at the same sizes as the rayssl profile it is compared with.
  With `--official-cache` also the official training setting: a PersistentDataset caching
  everything before the views (the official get_loader's default).

    python benchmarks/voco_views.py --official-cache   # full run (~7 min + one-off volume build)
    python benchmarks/voco_views.py --quick            # smoke check, < 1 min
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (CT_SHAPES, QUICK_SHAPES, WORK, RateMeter, actors_settled,  # noqa: E402
                     build_views_dataset, close_iterator, ensure_volumes, fmt_table, machine_info,
                     measure_stream, ray_init, wait_for_quiet, write_json)

# rayssl VoCo profiles measured: name -> (method profile, overrides).
PROFILES = {
    # The official semantics, resized per sample (what VoCo does with prepare_regions=false).
    "paper": ("paper", {"prepare_regions": False}),
    "paper-crop": ("paper", {"region_mode": "crop"}),
    # The paper profile as `rayssl pretrain --profile paper` runs it: VoCo.prepare resizes every
    # foreground box to 384x384x96 once (what the official PersistentDataset caches).
    "paper-prepared": ("paper", {}),
    "cpu": ("cpu", {}),
}


def voco_method(profile: str, quick: bool):
    from rayssl.methods.voco import VoCo, VoCoConfig

    base, overrides = PROFILES[profile]
    values = {**VoCo.profiles[base], **overrides}
    if quick and base == "paper":
        # The quick volumes (192x192x128) are smaller than a paper region: keep the geometry, halve the sizes.
        values.update(region_size=(192, 192, 48), input_size=32, backbone="unet")
    return VoCo(VoCoConfig(**values))


# ---------------------------------------------------------------------------------------------
# The official data path, re-created with MONAI transforms
# ---------------------------------------------------------------------------------------------
def _above_threshold(x):
    """Foreground of the official CropForegroundd: scaled intensity > 0.3."""
    return x > 0.3


def official_deterministic(region_size, a_min: float = -175.0, a_max: float = 250.0):
    """Load + orientation + intensity window + foreground crop + resize to the region size."""
    from monai.transforms import (CropForegroundd, EnsureChannelFirstd, LoadImaged, Orientationd, Resized,
                                  ScaleIntensityRanged)

    return [
        LoadImaged(keys="image", image_only=True, dtype=np.int16),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS"),
        ScaleIntensityRanged(keys="image", a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys="image", source_key="image", select_fn=_above_threshold),
        Resized(keys="image", mode="bilinear", align_corners=True, spatial_size=tuple(region_size)),
    ]


class OfficialVoCoViews:
    """VoCo views as the official VoCoAugmentation builds them (not a MONAI Transform, like the official
    class, so a PersistentDataset caches everything before it).

    Per sample: k random crops of the base-crop size centred uniformly in [half, region - half) in
    x and y (z: the region's middle), each labelled with its overlap fraction with every base crop,
    then the n_x x n_y grid of base crops; every crop gets its own freshly built chain
    SpatialCropd -> Resized(input^3) -> flips / rot90 / intensity shift, as the official code does.
    """

    def __init__(self, region_size, grid, input_size: int, k: int) -> None:
        self.region = tuple(int(v) for v in region_size)
        self.grid = tuple(int(v) for v in grid)
        self.base = tuple(r // n for r, n in zip(self.region, self.grid))
        self.input_size = int(input_size)
        self.k = int(k)

    def _chain(self, center, extra_resize: bool):
        from monai.transforms import (Compose, RandFlipd, RandRotate90d, RandShiftIntensityd, Resized, SpatialCropd,
                                      ToTensord)

        size = (self.input_size,) * 3
        steps = [SpatialCropd(keys="image", roi_center=list(center), roi_size=list(self.base)),
                 Resized(keys="image", mode="bilinear", align_corners=True, spatial_size=size)]
        if extra_resize:  # the official base-crop chain resizes twice (the second is a no-op)
            steps.append(Resized(keys="image", mode="bilinear", align_corners=True, spatial_size=size))
        steps += [RandFlipd(keys="image", prob=0.2, spatial_axis=0), RandFlipd(keys="image", prob=0.2, spatial_axis=1),
                  RandFlipd(keys="image", prob=0.2, spatial_axis=2), RandRotate90d(keys="image", prob=0.2, max_k=3),
                  RandShiftIntensityd(keys="image", offsets=0.1, prob=0.1), ToTensord(keys="image")]
        return Compose(steps)

    def _label(self, cx: int, cy: int) -> np.ndarray:
        bx, by = self.base[0], self.base[1]
        x0, y0 = cx - bx // 2, cy - by // 2
        labels = []
        for i in range(self.grid[0]):
            for j in range(self.grid[1]):
                dx = min((i + 1) * bx, x0 + bx) - max(i * bx, x0)
                dy = min((j + 1) * by, y0 + by) - max(j * by, y0)
                labels.append(dx * dy / (bx * by) if dx > 0 and dy > 0 else 0.0)
        return np.asarray(labels, dtype=np.float32)

    def __call__(self, data: dict) -> dict:
        import torch

        randoms, labels = [], []
        zc = self.region[2] // 2
        for _ in range(self.k):
            cx = np.random.randint(self.base[0] // 2, self.region[0] - self.base[0] // 2)
            cy = np.random.randint(self.base[1] // 2, self.region[1] - self.base[1] // 2)
            randoms.append(self._chain((cx, cy, zc), False)(dict(data))["image"])
            labels.append(self._label(cx, cy))
        bases = []
        for i in range(self.grid[0]):
            for j in range(self.grid[1]):
                center = ((i + 0.5) * self.base[0], (j + 0.5) * self.base[1], zc)
                bases.append(self._chain(center, True)(dict(data))["image"])
        return {"randoms": torch.stack([torch.as_tensor(r) for r in randoms]),
                "bases": torch.stack([torch.as_tensor(b) for b in bases]),
                "labels": torch.from_numpy(np.stack(labels))}


def official_rate(niftis, method, workers: int, seconds: float, warmup_items: int, cache_dir: Path | None) -> dict:
    """Samples/s of the official chain (at `method`'s sizes) in a DataLoader with `workers` workers."""
    import torch
    from monai.data import DataLoader, Dataset, PersistentDataset
    from monai.transforms import Compose

    torch.set_num_threads(1)
    c = method.config
    views = OfficialVoCoViews(c.region_size, c.grid, c.input_size, c.num_random_crops)
    transform = Compose(official_deterministic(c.region_size, *c.ct_window) + [views])
    files = [{"image": str(p)} for p in niftis]
    if cache_dir is not None:
        dataset = PersistentDataset(files * 200, transform=transform, cache_dir=str(cache_dir))
        for item in files:  # fill the cache first: the official runs train for many epochs on it
            dataset._cachecheck(dict(item))
    else:
        dataset = Dataset(files * 200, transform=transform)
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=workers)
    n_crops = c.num_bases + c.num_random_crops

    def check(batch):
        assert batch["bases"].shape[1] + batch["randoms"].shape[1] == n_crops

    run = measure_stream(loader, RateMeter(warmup_items=warmup_items), seconds, count=lambda b: b["bases"].shape[0],
                         check=check)
    del loader
    return {**run.summary, "cpu_s_per_sample": run.cpu_per_item(), "phase": run.sampler.stats.summary()}


# ---------------------------------------------------------------------------------------------
# rayssl
# ---------------------------------------------------------------------------------------------
def rayssl_rate(volumes, method, args, seconds: float, warmup_items: int) -> dict:
    """Samples/s of VoCo views built by the actor pool (Ray Data), memory sampled over all Ray processes."""
    method.check_volumes(volumes)
    ds = build_views_dataset(volumes, method.plan, method.views, num_samples=int((seconds + 120) * 100), seed=0, actors=args.actors,
                             samples_per_call=args.samples_per_call, read_dtype=method.read_dtype)
    meter = RateMeter(warmup_items=max(warmup_items, 2 * args.actors * args.samples_per_call), warmup_seconds=2.0,
                      ready=actors_settled(args.actors))

    def check(batch):
        assert batch["bases"].shape[1] == method.config.num_bases

    batches = ds.iter_batches(batch_size=args.batch_size, batch_format="numpy", prefetch_batches=2)
    run = measure_stream(batches, meter, seconds, count=lambda b: len(b["sample"]), check=check,
                         close=lambda: close_iterator(batches))
    del ds
    return {**run.summary, "cpu_s_per_sample": run.cpu_per_item(), "phase": run.sampler.stats.summary()}


def views_in_process(volumes, method, n: int) -> dict:
    """Per-stage seconds of one sample's views on one thread, no Ray (where an actor's time goes)."""
    import torch
    from rayssl.data.pipeline import ViewBuilder

    torch.set_num_threads(1)
    builder = ViewBuilder(volumes, method.plan, method.views, read_dtype=method.read_dtype)
    rng = np.random.default_rng(0)
    read_s = views_s = 0.0
    for i in range(n + 1):
        requests = method.plan(volumes, i % len(volumes), rng)
        t0 = time.perf_counter()
        crops = builder.read(requests)
        t1 = time.perf_counter()
        method.views(crops, requests, np.random.default_rng(i))
        t2 = time.perf_counter()
        if i:  # the first sample warms caches
            read_s += t1 - t0
            views_s += t2 - t1
    reader = next(iter(builder.readers.values()))
    return {"read_s": read_s / n, "views_s": views_s / n, "samples_per_s_1thread": n / (read_s + views_s),
            "decoded_MB_per_sample": reader.stats.bytes_decoded / reader.stats.boxes / 1e6,
            "read_amplification": reader.stats.amplification}


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small volumes, short phases: a < 1 min smoke check")
    parser.add_argument("--profiles", default=None, help=f"comma list of {sorted(PROFILES)} (default: all; quick: cpu,paper)")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the official path")
    parser.add_argument("--samples-per-call", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2, help="iter_batches batch size (the cpu profile's train batch)")
    parser.add_argument("--object-store-mib", type=int, default=2048,
                        help="Ray object store; a paper-size sample is 19 MB of float32 views, and below ~2 GiB Ray "
                             "Data spills them (a local `rayssl pretrain` gets Ray's default, 30%% of RAM)")
    parser.add_argument("--tasks-in-flight", type=int, default=0,
                        help="DataContext.max_tasks_in_flight_per_actor (0: Ray's default, 4)")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds of each rayssl phase")
    parser.add_argument("--official-seconds", type=float, default=None)
    parser.add_argument("--official-cache", action="store_true", help="also time the official path with its PersistentDataset cache")
    parser.add_argument("--wait-quiet", type=float, default=0.0)
    parser.add_argument("--max-load", type=float, default=2.5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    quick = args.quick
    profiles = (args.profiles or ("cpu,paper" if quick else "paper,paper-crop,paper-prepared,cpu")).split(",")
    seconds = args.seconds or (5.0 if quick else 30.0)
    official_seconds = args.official_seconds or (4.0 if quick else 45.0)
    shapes = QUICK_SHAPES if quick else CT_SHAPES
    t_run = time.perf_counter()
    print(f"voco_views: {'quick' if quick else 'full'} run; volumes {shapes}; profiles {profiles}")
    vols = ensure_volumes(shapes)
    from rayssl.data.volumes import load_volumes

    volumes = load_volumes(str(vols.store), split="train")
    if args.wait_quiet:
        wait_for_quiet(args.max_load, args.wait_quiet)
    results: dict = {"mode": "quick" if quick else "full", "argv": sys.argv[1:], "machine": machine_info(),
                     "volumes": {"shapes": vols.shapes}, "profiles": {}}
    methods = {p: voco_method(p, quick) for p in profiles}
    volumes_of = {}
    for p, method in methods.items():
        volumes_of[p] = method.prepare(volumes)  # in this process (Ray is not running yet); written once and reused

    # Official path first (no Ray running), one per distinct size set.
    official: dict = {}
    for p, method in methods.items():
        c = method.config
        key = (tuple(c.region_size), c.grid, c.input_size, c.num_random_crops)
        if key not in official:
            print(f"[official] sizes of profile {p}: region {c.region_size}, grid {c.grid}, input {c.input_size}")
            official[key] = {"nifti": official_rate(vols.niftis, method, args.workers, official_seconds, 2 if quick else 3, None)}
            if args.official_cache and not quick:
                cache = WORK / f"voco_persistent_{'x'.join(map(str, c.region_size))}"
                official[key]["persistent"] = official_rate(vols.niftis, method, args.workers, official_seconds, 3, cache)
        results["profiles"][p] = {"official": official[key]}

    for p, method in methods.items():
        results["profiles"][p]["in_process"] = views_in_process(volumes_of[p], method, 2 if quick else 6)

    import ray

    ray_init(args.object_store_mib, tasks_in_flight=args.tasks_in_flight)
    try:
        for p, method in methods.items():
            print(f"[rayssl] profile {p}")
            results["profiles"][p]["rayssl"] = rayssl_rate(volumes_of[p], method, args, seconds, 2 if quick else 4)
    finally:
        ray.shutdown()

    rows = []
    for p, r in results["profiles"].items():
        c = methods[p].config
        ours = r["rayssl"]["rate"]
        off = r["official"]["nifti"]["rate"]
        r["ratio"] = ours / off
        # Load-independent ratio: CPU seconds the official path spends per sample (all its processes)
        # over what rayssl spends (driver, actors, Ray's own processes).
        r["cpu_ratio"] = r["official"]["nifti"]["cpu_s_per_sample"]["total"] / r["rayssl"]["cpu_s_per_sample"]["total"]
        mode = c.region_mode + (", prepared once" if c.region_mode == "foreground_resize" and c.prepare_regions else "")
        sizes = (f"region {'x'.join(map(str, c.region_size))} ({mode}), "
                 f"{c.num_bases}+{c.num_random_crops} crops -> {c.input_size}^3")
        rows.append([p, sizes, f"{ours:.2f}", f"{off:.3f}", f"{r['ratio']:.1f}x",
                     f"{r['rayssl']['cpu_s_per_sample']['total'] * 1e3:.0f} / {r['official']['nifti']['cpu_s_per_sample']['total'] * 1e3:.0f}",
                     f"{r['cpu_ratio']:.1f}x",
                     f"{r['rayssl']['phase']['load_start'][0]:.1f} / {r['rayssl']['phase']['others_busy_cores']:.2f}",
                     f"{r['official']['nifti']['phase']['load_start'][0]:.1f} / {r['official']['nifti']['phase']['others_busy_cores']:.2f}"])
        if "persistent" in r["official"]:
            r["ratio_vs_persistent"] = ours / r["official"]["persistent"]["rate"]
    print()
    print(fmt_table(rows, ["profile", "sizes", "rayssl samples/s", "official samples/s", "ratio",
                           "CPU ms/sample rayssl / official", "CPU ratio",
                           "load(1m) / others' cores, rayssl", "load(1m) / others' cores, official"]))
    for p, r in results["profiles"].items():
        ip = r["in_process"]
        extra = ""
        if "persistent" in r["official"]:
            extra = (f"; official with PersistentDataset cache {r['official']['persistent']['rate']:.2f}/s "
                     f"(ratio {r['ratio_vs_persistent']:.1f}x)")
        cpu = r["rayssl"]["cpu_s_per_sample"]
        print(f"{p}: one sample in-process = read {ip['read_s'] * 1e3:.0f} ms ({ip['decoded_MB_per_sample']:.0f} MB decoded) + "
              f"views {ip['views_s'] * 1e3:.0f} ms; rayssl CPU ms/sample "
              + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in cpu.items())
              + f"; peak PSS rayssl {r['rayssl']['phase']['pss_mb']['peak']:.0f} MB, "
              f"official {r['official']['nifti']['phase']['pss_mb']['peak']:.0f} MB{extra}")
    results["targets"] = {p: {"ratio>=20x": bool(r["ratio"] >= 20), "cpu_ratio>=20x": bool(r["cpu_ratio"] >= 20)}
                          for p, r in results["profiles"].items()}
    results["wall_seconds"] = time.perf_counter() - t_run
    print(f"target >= 20x: {results['targets']}")
    out = args.json or str(WORK / f"voco_views{'_quick' if quick else ''}.json")
    write_json(out, results)
    print(f"results: {out}  (wall {results['wall_seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
