"""Shared helpers of the data benchmarks: CT-sized test volumes (NIfTI + Zarr store), memory and CPU sampling, reports."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
WORK = Path(__file__).resolve().parent / "_work"
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))

# CT-like volumes: 512 x 512 in-plane at 0.78 mm, ~300 slices at 1.25 mm (a typical abdominal CT).
CT_SPACING = (0.78, 0.78, 1.25)
CT_SHAPES = ((512, 512, 288), (512, 512, 300), (512, 512, 312), (512, 512, 320))
# Small volumes of the --quick smoke runs.
QUICK_SHAPES = ((192, 192, 128), (192, 192, 136))
# Bump when synth_ct changes: cached volume sets are keyed on it.
SYNTH_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Volumes
# ---------------------------------------------------------------------------------------------
def synth_ct(seed: int, shape: Sequence[int], spacing: Sequence[float] = CT_SPACING) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 HU volume (x, y, z RAS) and its affine, compressible like a real CT.

    The anatomy is `datasets_zarr.demo.make_phantom` (body, lungs with vessels, organs, spine,
    ribs) drawn on a 4x coarser grid covering the same field of view and upsampled trilinearly
    (the phantom at full 512^2 x 300 size takes minutes); on top goes full-resolution noise
    correlated over ~3 voxels (std ~14 HU), like reconstructed CT noise. blosc-zstd compresses
    64^3 chunks of it ~2.3x, in the range of real abdominal CT.
    """
    import torch
    import torch.nn.functional as F
    from datasets_zarr.demo import make_phantom, phantom_affine

    shape = tuple(int(s) for s in shape)
    coarse = tuple(max(16, s // 4) for s in shape)
    coarse_spacing = tuple(sp * s / c for sp, s, c in zip(spacing, shape, coarse))
    image, _ = make_phantom(seed, coarse, coarse_spacing)
    rng = np.random.default_rng(seed + 10_000)
    with torch.no_grad():
        up = F.interpolate(torch.from_numpy(image.astype(np.float32))[None, None], size=shape,
                           mode="trilinear", align_corners=False)
        noise = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))[None, None]
        # A 3x3x3 box filter correlates the noise; /sqrt(27)*... keeps its std ~14 HU.
        noise = F.avg_pool3d(noise, kernel_size=3, stride=1, padding=1) * (14.0 * np.sqrt(27.0))
        volume = (up + noise)[0, 0].round_().clamp_(-1024, 3071)
    return volume.numpy().astype(np.int16), phantom_affine(shape, spacing)


@dataclass
class VolumeSet:
    """The same volumes as .nii.gz files and as a rayssl Zarr store (64^3 blosc-zstd chunks)."""

    root: Path
    niftis: list[Path]
    store: Path
    shapes: list[tuple[int, int, int]]

    @property
    def voxels(self) -> int:
        return int(sum(np.prod(s) for s in self.shapes))


def ensure_volumes(shapes: Sequence[Sequence[int]], chunks: int = 64, seed: int = 0,
                   spacing: Sequence[float] = CT_SPACING, log=print) -> VolumeSet:
    """Build (once; cached under benchmarks/_work) CT-like volumes as NIfTI and as a Zarr store.

    NIfTI: nibabel's default gzip level (1). Store: `datasets_zarr.store.write_volume` (the writer
    `rayssl convert` uses), int16 HU, `chunks`^3 chunks, blosc zstd clevel 3 + shuffle, manifest
    with every volume in split "train".
    """
    import nibabel as nib
    from datasets_zarr.manifest import write_manifest
    from datasets_zarr.store import write_volume

    params = {"shapes": [list(map(int, s)) for s in shapes], "chunks": chunks, "seed": seed,
              "spacing": list(spacing), "version": SYNTH_VERSION}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = WORK / f"volumes-{key}"
    store = root / "store.zarr"
    niftis = [root / f"ct_{i:02d}.nii.gz" for i in range(len(shapes))]
    done = root / "done.json"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        for i, shape in enumerate(shapes):
            t0 = time.perf_counter()
            image, affine = synth_ct(seed + i, shape, spacing)
            nib.save(nib.Nifti1Image(image, affine), str(niftis[i]))
            write_volume(store, f"ct_{i:02d}", image, affine, modality="CT", chunks=chunks,
                         source=str(niftis[i]))
            log(f"  built volume {i} {tuple(shape)} in {time.perf_counter() - t0:.1f} s")
        write_manifest(store, splits={f"ct_{i:02d}": "train" for i in range(len(shapes))})
        done.write_text(json.dumps(params))
    return VolumeSet(root=root, niftis=niftis, store=store, shapes=[tuple(map(int, s)) for s in shapes])


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# Memory and CPU sampling of a process tree
# ---------------------------------------------------------------------------------------------
def process_tree(root: psutil.Process | None = None) -> list[psutil.Process]:
    """`root` (default: this process) and all its descendants (Ray's raylet, GCS, workers; DataLoader workers)."""
    root = root or psutil.Process()
    try:
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return [root]


def process_role(p: psutil.Process) -> str:
    """driver (this process), actors (Ray Data map workers), loader workers (torch DataLoader), or system."""
    if p.pid == os.getpid():
        return "driver"
    try:
        cmd = " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "system"
    if "MapWorker" in cmd:
        return "actors"
    if "SpillWorker" in cmd or "RestoreWorker" in cmd:
        return "spill/restore"
    if "multiprocessing" in cmd or p.ppid() == os.getpid() and "python" in cmd and "ray" not in cmd:
        return "loader workers"
    return "system"


def actors_settled(expected: int, min_age_s: float = 8.0):
    """A `RateMeter.ready` check: `expected` Ray Data actor processes exist and each has run for
    `min_age_s` (past its imports), so the measured window holds no actor start-up."""
    def ready() -> bool:
        now = time.time()
        actors = [p for p in process_tree() if process_role(p) == "actors"]
        try:
            return len(actors) >= expected and all(now - p.create_time() >= min_age_s for p in actors)
        except psutil.NoSuchProcess:
            return False
    return ready


def tree_cpu() -> dict[int, tuple[str, float]]:
    """{pid: (role, user+system CPU seconds)} over this process tree."""
    out = {}
    for p in process_tree():
        try:
            t = p.cpu_times()
            out[p.pid] = (process_role(p), t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each role used between two `tree_cpu` snapshots (processes born in between count from 0)."""
    roles: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        roles[role] = roles.get(role, 0.0) + cpu - (before[pid][1] if pid in before else 0.0)
    roles["total"] = sum(roles.values())
    return roles


def _busy_cpu_seconds() -> float:
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


@dataclass
class MemorySample:
    t: float
    pss_mb: float  # proportional set size summed over the tree (shared object-store pages counted once)
    rss_mb: float  # resident set size summed over the tree (shared pages counted per process)
    processes: int


@dataclass
class PhaseStats:
    """What a `Sampler` saw during one phase."""

    seconds: float
    samples: list[MemorySample] = field(default_factory=list)
    load_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    machine_busy_cores: float = 0.0  # all processes, averaged over the phase
    own_busy_cores: float = 0.0  # this process tree
    cpu_count: int = 0

    @property
    def others_busy_cores(self) -> float:
        """Cores used by processes outside this benchmark (other engineers' jobs) during the phase."""
        return max(0.0, self.machine_busy_cores - self.own_busy_cores)

    def memory(self, key: str = "pss_mb") -> dict[str, float]:
        values = [getattr(s, key) for s in self.samples] or [0.0]
        return {"start": values[0], "peak": max(values), "end": values[-1]}

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 2),
            "load_start": [round(v, 2) for v in self.load_start],
            "load_end": [round(v, 2) for v in self.load_end],
            "machine_busy_cores": round(self.machine_busy_cores, 2),
            "own_busy_cores": round(self.own_busy_cores, 2),
            "others_busy_cores": round(self.others_busy_cores, 2),
            "pss_mb": {k: round(v, 1) for k, v in self.memory("pss_mb").items()},
            "rss_mb": {k: round(v, 1) for k, v in self.memory("rss_mb").items()},
        }


class Sampler:
    """Samples memory (PSS and RSS summed over this process tree) and CPU use in a thread.

    CPU: machine-wide busy time from /proc/stat, and this tree's user+system time from each
    process's counters (tracked per pid, so processes that exit mid-phase still count up to their
    last sample). The difference is what other users of the machine took.
    """

    def __init__(self, interval: float = 0.5, root: psutil.Process | None = None) -> None:
        self.interval = interval
        self.root = root or psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu_first: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self.stats: PhaseStats | None = None

    def _sample(self) -> MemorySample:
        pss = rss = 0.0
        procs = process_tree(self.root)
        for p in procs:
            try:
                with p.oneshot():
                    info = p.memory_full_info()
                    cpu = p.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            pss += getattr(info, "pss", info.rss)
            rss += info.rss
            total = cpu.user + cpu.system
            key = p.pid
            if key not in self._cpu_first:
                # A process born during the phase started from 0 CPU seconds.
                self._cpu_first[key] = 0.0 if self._started_processes is not None and key not in self._started_processes else total
            self._cpu_last[key] = total
        return MemorySample(time.perf_counter() - self._t0, pss / 2**20, rss / 2**20, len(procs))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.stats.samples.append(self._sample())

    def __enter__(self) -> "Sampler":
        self._t0 = time.perf_counter()
        self._started_processes = None
        self.stats = PhaseStats(seconds=0.0, load_start=os.getloadavg(), cpu_count=psutil.cpu_count())
        self._busy0 = _busy_cpu_seconds()
        self.stats.samples.append(self._sample())
        self._started_processes = set(self._cpu_first)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.stats.samples.append(self._sample())
        self.stats.seconds = time.perf_counter() - self._t0
        self.stats.load_end = os.getloadavg()
        elapsed = max(self.stats.seconds, 1e-9)
        self.stats.machine_busy_cores = (_busy_cpu_seconds() - self._busy0) / elapsed
        own = sum(self._cpu_last[p] - self._cpu_first.get(p, 0.0) for p in self._cpu_last)
        self.stats.own_busy_cores = own / elapsed


# ---------------------------------------------------------------------------------------------
# Timing and reporting
# ---------------------------------------------------------------------------------------------
class RateMeter:
    """Counts items over time; the rate excludes a warm-up (worker start-up, first reads)."""

    def __init__(self, warmup_items: int = 0, warmup_seconds: float = 0.0, ready=None) -> None:
        self.warmup_items = warmup_items
        self.warmup_seconds = warmup_seconds
        self.ready = ready  # optional callable: the warm-up also waits until it returns True
        self.t_start = time.perf_counter()
        self.items = 0
        self.t_first: float | None = None  # end of the warm-up
        self.items_first = 0
        self.t_last = self.t_start

    def add(self, n: int) -> None:
        now = time.perf_counter()
        self.items += n
        self.t_last = now
        if (self.t_first is None and self.items >= self.warmup_items and now - self.t_start >= self.warmup_seconds
                and (self.ready is None or self.ready())):
            self.t_first, self.items_first = now, self.items

    @property
    def measured_seconds(self) -> float:
        return 0.0 if self.t_first is None else self.t_last - self.t_first

    @property
    def measured_items(self) -> int:
        return self.items - self.items_first

    @property
    def rate(self) -> float:
        return self.measured_items / self.measured_seconds if self.measured_seconds > 0 else float("nan")

    def summary(self) -> dict[str, float]:
        return {"items_total": self.items, "items_measured": self.measured_items,
                "seconds_measured": round(self.measured_seconds, 2),
                "warmup_seconds": round((self.t_first or self.t_last) - self.t_start, 2),
                "rate": round(self.rate, 3)}


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 60.0, log=print) -> tuple[float, float, float]:
    """Poll the 1-minute load average until it drops below `max_load` or `max_wait_s` passes."""
    t0 = time.time()
    load = os.getloadavg()
    while load[0] >= max_load and time.time() - t0 < max_wait_s:
        log(f"  load {load[0]:.2f} >= {max_load}: waiting ({time.time() - t0:.0f}/{max_wait_s:.0f} s)")
        time.sleep(poll_s)
        load = os.getloadavg()
    return load


def machine_info() -> dict[str, Any]:
    import numcodecs
    import ray
    import torch
    import zarr

    try:
        import monai
        monai_version = monai.__version__
    except ImportError:
        monai_version = None
    return {
        "cpus": psutil.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
        "monai": monai_version, "zarr": zarr.__version__, "numcodecs": numcodecs.__version__,
    }


def write_json(path: Path | str, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))


def fmt_table(rows: list[list[Any]], header: list[str]) -> str:
    """A Markdown table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


@dataclass
class StreamRun:
    """What `measure_stream` saw: the rate summary, CPU seconds per process role over the measured
    window, the memory/CPU sampler, and the sampler indices bounding the measured window."""

    summary: dict[str, Any]
    cpu: dict[str, float]
    sampler: "Sampler"
    window: slice

    def cpu_per_item(self, scale: float = 1.0) -> dict[str, float]:
        """CPU per measured item by role (scale 1e3: milliseconds): independent of other users' load."""
        return {k: scale * v / max(self.summary["items_measured"], 1) for k, v in self.cpu.items()}


def measure_stream(batches, meter: "RateMeter", seconds: float, count=len, check=None,
                   interval: float = 0.5, close=None) -> StreamRun:
    """Consume `batches` until `meter` has measured `seconds` after its warm-up, sampling memory and
    CPU throughout. `count(batch)` is the batch's item count; `check(batch)` may assert its shape;
    `close()` runs before the sampler stops (stop DataLoader workers, close a Ray iterator)."""
    marks: list[int] = []
    cpu_start = cpu_end = None
    with Sampler(interval=interval) as sampler:
        for batch in batches:
            if check is not None:
                check(batch)
            meter.add(count(batch))
            if meter.t_first is not None and cpu_start is None:
                marks.append(len(sampler.stats.samples))  # first steady-state memory sample
                cpu_start = tree_cpu()
            if meter.measured_seconds >= seconds:
                cpu_end = tree_cpu()  # before leaving the loop: that stops DataLoader workers
                marks.append(len(sampler.stats.samples))  # end of the measured window
                break
        cpu = cpu_by_role(cpu_start or {}, cpu_end or tree_cpu())
        if close is not None:
            close()
    window = slice(marks[0], marks[1] if len(marks) > 1 else None) if marks else slice(None)
    return StreamRun(summary=meter.summary(), cpu=cpu, sampler=sampler, window=window)


def close_iterator(batches, threads_before: set | None = None, timeout_s: float = 30.0) -> None:
    """Stop a Ray Data iteration left early, and let its prefetch threads end before Ray shuts down
    (a thread still talking to a stopped raylet makes the driver exit). With `threads_before` (the
    threads alive before the iteration started), wait until every thread started since has ended."""
    import gc

    close = getattr(batches, "close", None)
    if close is not None:
        close()
    gc.collect()
    time.sleep(1.0)
    deadline = time.time() + timeout_s
    while threads_before is not None and time.time() < deadline:
        # Ray Data's "Prefetcher" thread parks on a condition until its iterator is collected and
        # touches nothing meanwhile; the block-formatting threads are the ones to wait for.
        new = [t for t in threading.enumerate()
               if t not in threads_before and t.is_alive() and t.name != "Prefetcher"]
        if not new:
            break
        time.sleep(0.2)


def ray_init(object_store_mib: int, num_cpus: int = 2, tasks_in_flight: int = 0) -> None:
    """A fresh local Ray instance (address="local": never attach to another user's cluster), quiet."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_mib * 2**20,
             include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}})
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the bars cost driver CPU on a 2-core machine
    if tasks_in_flight:
        # Each queued actor task's output block lands in the object store: fewer in flight, less spilling.
        ctx.max_tasks_in_flight_per_actor = tasks_in_flight


# ---------------------------------------------------------------------------------------------
# Pipelines under test
# ---------------------------------------------------------------------------------------------
def build_views_dataset(volumes, plan_fn, views_fn, *, num_samples: int, seed: int = 0,
                        actors: int = 2, actor_cpus: float = 1.0, samples_per_call: int = 1,
                        read_dtype: str | None = "float32"):
    """rayssl's own `build_dataset` with a fixed-size pool of `actors` actors."""
    from rayssl.data.pipeline import build_dataset

    return build_dataset(volumes, plan_fn, views_fn, num_samples=num_samples, seed=seed,
                         actors=(actors, actors), actor_cpus=actor_cpus, samples_per_call=samples_per_call,
                         read_dtype=read_dtype)
