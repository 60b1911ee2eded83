"""Builds the Ray Dataset that streams a method's views: plans -> CPU actors (read + views)."""

from __future__ import annotations

import ctypes
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import ray

from rayssl.data.plan import Planner, PlanFn
from rayssl.data.read import StoreReader, decode_single_threaded
from rayssl.data.storage import fsspec_defaults, storage_runtime_env, use_fsspec_defaults
from rayssl.data.types import ReadRequest, StepInfo, VolumeInfo

if TYPE_CHECKING:
    import torch

# Per-sample data-actor CPU seconds (build_dataset(measure_cpu=True)); the training loop pops it.
BUILD_CPU_COLUMN = "build_cpu_s"

ViewsFn = Callable[[list[np.ndarray], list[ReadRequest], np.random.Generator], dict[str, np.ndarray]]


@ray.remote(num_cpus=0)
class SkipLedger:
    """Counts samples whose volume could not be read (on_error=skip), per volume, with the reason;
    with on_error=raise it keeps the first failure, which Train's error snippet would cut short."""

    def __init__(self) -> None:
        self.skips: dict[str, dict[str, Any]] = {}
        self.first_failure: str | None = None

    def fail(self, reason: str) -> None:
        if self.first_failure is None:
            self.first_failure = reason

    def failure(self) -> str | None:
        return self.first_failure

    def record(self, volume_id: str, reason: str) -> None:
        entry = self.skips.setdefault(volume_id, {"count": 0, "reason": reason})
        entry["count"] += 1

    def summary(self) -> dict[str, dict[str, Any]]:
        return self.skips


def keep_freed_memory(max_block_mib: int = 32) -> bool:
    """Make glibc keep freed memory in this process for reuse instead of returning it to the OS.

    Data actors allocate and free the same large arrays (crops, views, output blocks) for every
    sample. By default glibc serves arrays above a threshold with fresh mmap pages and trims the
    heap when a block is freed, so each sample faults its memory in again; on VMs that hand freed
    pages back to the host that was ~10 % of an actor's CPU per crop (benchmarks/README.md).
    Allocations up to `max_block_mib` now come from the heap, which is never trimmed: the actor's
    memory grows to its working set and stays there. Returns False where the C library has no
    `mallopt` (not glibc) or refuses a setting.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    ok = mallopt(m_mmap_threshold, max_block_mib << 20) == 1
    ok &= mallopt(m_trim_threshold, 2**31 - 1) == 1
    ok &= mallopt(m_top_pad, 64 << 20) == 1
    return bool(ok)


class ViewBuilder:
    """Ray Data actor: plans its samples, opens each store once, reads the boxes, builds the views.

    Input rows are global sample indices; planning them here (microseconds per sample) rather than
    in a separate map stage saves a worker process per planning task: on 2 cores that separate stage
    delayed the first crop by ~25 s and added a dozen processes (benchmarks/README.md).

    With on_error="skip", a sample whose volume fails (corrupt chunk, missing array, a views error)
    is re-planned on the next volume in order, so batches keep their size (DDP shards stay equal);
    the failing volume is recorded in the SkipLedger and never used again by this actor.
    """

    def __init__(self, volumes: Sequence[VolumeInfo], plan_fn: PlanFn, views_fn: ViewsFn, seed: int = 0,
                 samples_per_volume: int = 1, on_error: str = "raise", ledger: Any = None,
                 read_dtype: str | None = "float32", measure_cpu: bool = False,
                 repeats: np.ndarray | None = None, samples_per_step: int | None = None,
                 storage_defaults: dict[str, dict[str, Any]] | None = None) -> None:
        use_fsspec_defaults(storage_defaults)  # the driver's object-store options (rayssl.data.storage)
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            keep_freed_memory()  # a data actor process of its own (not a driver building views in-process)
            decode_single_threaded()
        self.volumes = list(volumes)
        self.read_dtype = read_dtype
        self.measure_cpu = measure_cpu
        self.plan_fn = plan_fn
        self.views_fn = views_fn
        self.planner = Planner(self.volumes, plan_fn, seed=seed, samples_per_volume=samples_per_volume, repeats=repeats,
                               samples_per_step=samples_per_step)
        self.on_error = on_error
        self.ledger = ledger
        self.readers: dict[str, StoreReader] = {}
        self.bad_volumes: set[int] = set()

    def reader(self, store: str) -> StoreReader:
        if store not in self.readers:
            self.readers[store] = StoreReader(store)
        return self.readers[store]

    def read(self, requests: list[ReadRequest]) -> list[np.ndarray]:
        """Crops for `requests`, grouped per (volume, array) so shared chunks decode once."""
        crops: list[np.ndarray | None] = [None] * len(requests)
        groups: dict[tuple[int, str], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.volume, r.array), []).append(i)
        for (volume, array), idx in groups.items():
            info = self.volumes[volume]
            pad = info.background if array == "image" else 0
            boxes = [(requests[i].start, requests[i].size) for i in idx]
            out = self.reader(info.extra["store"]).read_boxes(info.extra["group"], boxes, array=array, pad_value=pad,
                                                               dtype=self.read_dtype)
            for i, crop in zip(idx, out):
                crops[i] = crop
        return crops  # type: ignore[return-value]

    def build(self, requests: list[ReadRequest], seed: int) -> dict[str, np.ndarray]:
        crops = self.read(requests)
        return self.views_fn(crops, requests, np.random.default_rng(seed))

    def build_sample(self, sample: int) -> dict[str, np.ndarray]:
        """Views of global sample index `sample` (planned here, deterministically)."""
        cpu_start = time.process_time()
        _, volume, requests, seed = self.planner.plan_requests(sample)
        views = self._build_or_skip(requests, seed, volume, self.planner.step_info(sample))
        views["sample"] = np.int64(sample)
        if self.measure_cpu:  # the trainer's data-stall report turns this into cores needed per worker
            views[BUILD_CPU_COLUMN] = np.float64(time.process_time() - cpu_start)
        return views

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples = [self.build_sample(int(s)) for s in batch["data"]]
        if len(samples) == 1:  # a view, not a copy: fresh memory is slow to touch on VMs
            return {k: np.asarray(v)[None] for k, v in samples[0].items()}
        return {k: np.stack([s[k] for s in samples]) for k in samples[0]}

    def _build_or_skip(self, requests: list[ReadRequest], seed: int, volume: int,
                       step: StepInfo | None = None) -> dict[str, np.ndarray]:
        last_error: Exception | None = None
        for attempt in range(len(self.volumes)):
            if volume not in self.bad_volumes:
                try:
                    return self.build(requests, seed)
                except Exception as err:  # noqa: BLE001 - the on_error policy decides
                    if self.on_error != "skip":
                        if self.ledger is not None:  # waited for: the driver reads it once the run fails
                            ray.get(self.ledger.fail.remote(f"{type(err).__name__}: {err}"))
                        raise
                    last_error = err
                    self.bad_volumes.add(volume)
                    if self.ledger is not None:
                        self.ledger.record.remote(self.volumes[volume].id, f"{type(err).__name__}: {err}")
            # Re-plan this sample on the next volume, deterministically.
            volume = (volume + 1) % len(self.volumes)
            rng = np.random.default_rng([seed, attempt + 1])
            requests = self.planner.call_plan(volume, rng, step)  # same step: a step-shared choice holds
            seed = int(rng.integers(0, 2**62))
        raise RuntimeError(f"on_error=skip: every volume failed; last error: {last_error}") from last_error


def build_dataset(
    volumes: Sequence[VolumeInfo],
    plan_fn: PlanFn,
    views_fn: ViewsFn,
    *,
    num_samples: int | None = None,
    start_sample: int = 0,
    sample_ids: "Sequence[int] | np.ndarray | None" = None,
    seed: int = 0,
    samples_per_volume: int = 1,
    actors: tuple[int, int] = (1, 2),
    actor_cpus: float = 1.0,
    samples_per_call: int = 1,
    on_error: str = "raise",
    ledger: Any = None,
    read_dtype: str | None = "float32",
    measure_cpu: bool = False,
    repeats: np.ndarray | None = None,
    samples_per_step: int | None = None,
) -> "ray.data.Dataset":
    """Ray Dataset of views for samples [start_sample, start_sample + num_samples), or for the global
    sample indices `sample_ids`, streamed in that order (with `preserve_order`).

    Rows are sample indices; planning, reading and view building run on an autoscaling actor pool
    (`ActorPoolStrategy(min_size, max_size)`), so a cluster grows the pool with CPU nodes.
    Consume it one sample at a time with `iter_samples` (views of the blocks, no copy) or in
    batches with Ray's `iter_torch_batches` (docs/streaming.md). `measure_cpu=True` adds a column
    `build_cpu_s`: the data actor's CPU seconds spent planning, reading and building each sample.

    Step-shared plans (`samples_per_step` G): sample i is planned as optimizer step i // G, whatever
    stream it is in, so several streams of interleaved `sample_ids` (one per DDP rank, built by
    rayssl.train.shards) plan the same step alike.
    """
    if (num_samples is None) == (sample_ids is None):
        raise ValueError("give either num_samples (with start_sample) or sample_ids")
    if sample_ids is not None:
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0 or (ids < 0).any():
            raise ValueError(f"sample_ids must be non-empty and >= 0, got {ids.size} ids (min {ids.min(initial=0)})")
        num_samples = int(ids.size)
    elif num_samples <= 0:
        raise ValueError(f"num_samples must be > 0, got {num_samples}")
    else:
        ids = np.arange(start_sample, start_sample + num_samples, dtype=np.int64)
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if not volumes:
        raise ValueError("no volumes to sample from: the manifest (or the chosen split) is empty")
    if samples_per_step is not None and samples_per_step < 1:
        raise ValueError(f"samples_per_step must be >= 1, got {samples_per_step}")
    # Sample indices live in the driver's object store (no read tasks, which would each want a CPU
    # next to the training workers); the actors plan them.
    # Blocks of ~16 samples, at most 4 per actor of the largest pool (and at least 64): an actor
    # task builds a whole input block, so the block count bounds how many actors work at once
    # (a flat cap of 64 idled larger pools); each block costs the driver one put (~4 ms).
    n_blocks = max(1, min(num_samples // 16, max(64, 4 * actors[1])))
    ds = ray.data.from_numpy(np.array_split(ids, n_blocks))  # column "data"
    # Object-store credentials and endpoint reach the actors even on a cluster whose nodes lack them.
    stores = {str(v.extra.get("store", "")) for v in volumes}
    runtime_env = storage_runtime_env(stores)
    ds = ds.map_batches(
        ViewBuilder,
        fn_constructor_kwargs=dict(volumes=list(volumes), plan_fn=plan_fn, views_fn=views_fn, seed=seed,
                                   samples_per_volume=samples_per_volume, on_error=on_error, ledger=ledger,
                                   read_dtype=read_dtype, measure_cpu=measure_cpu, repeats=repeats,
                                   samples_per_step=samples_per_step, storage_defaults=fsspec_defaults(stores)),
        compute=ray.data.ActorPoolStrategy(min_size=actors[0], max_size=actors[1]),
        num_cpus=actor_cpus,
        batch_size=samples_per_call,
        batch_format="numpy",
        **({"runtime_env": runtime_env} if runtime_env else {}),
    )
    return ds


def iter_samples(ds: "ray.data.Dataset", *, dtypes: "torch.dtype | Mapping[str, torch.dtype] | None" = None,
                 device: "str | torch.device | None" = None, prefetch_blocks: int = 2) -> Iterator[dict[str, Any]]:
    """Yield the rows of `ds` one sample at a time, read straight out of the object store.

    `ds.iter_batches(batch_size=1)` first combines every block's per-call pieces into one new
    array (a copy of every crop in the consumer, ~1 ms of consumer CPU per 3.5 MB float32 crop,
    plus per-batch formatting); this walks the blocks' Arrow record batches instead and hands out
    views of them (benchmarks/README.md). Blocks are prefetched in the background as Ray does.

    Without `dtypes` and `device`, arrays are read-only NumPy views of the block (no copy). With
    either, array columns become torch tensors that own their memory: moved to `device` first and
    cast there (so a GPU consumer casts on the GPU and copies the smaller stored dtype across), on
    the CPU cast in one pass from the block. `dtypes` is one dtype for every array column or a
    dict per column; scalar columns (the sample index) stay as they are. Streaming crops in the
    store's dtype (`build_dataset(read_dtype=None)`) and casting here moves half the bytes through
    Ray: the fastest way to get float32 crops.
    """
    blocks = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch_blocks))
    try:
        for block in blocks:
            for record_batch in block.to_batches():
                columns = {name: _column_values(column) for name, column in
                           zip(record_batch.schema.names, record_batch.columns)}
                for i in range(record_batch.num_rows):
                    sample = {name: values[i] for name, values in columns.items()}
                    if dtypes is not None or device is not None:
                        sample = {name: _to_torch(value, _dtype_for(dtypes, name), device)
                                  if isinstance(value, np.ndarray) and value.ndim else value
                                  for name, value in sample.items()}
                    yield sample
    finally:  # left early: shut Ray's executor down now, not at garbage collection
        close = getattr(blocks, "close", None)
        if close is not None:
            close()


def _column_values(column: Any) -> Any:
    """Zero-copy NumPy values of one Arrow column chunk (Ray's tensor extension or a primitive)."""
    import pyarrow as pa

    if isinstance(column.type, pa.ExtensionType):
        return column.to_numpy()  # Ray's tensor array: one (rows, *shape) view of the data buffer
    return column.to_numpy(zero_copy_only=False)


def _dtype_for(dtypes: Any, name: str) -> Any:
    if dtypes is None or not isinstance(dtypes, Mapping):
        return dtypes
    return dtypes.get(name)


def _to_torch(value: np.ndarray, dtype: Any, device: Any) -> "torch.Tensor":
    import torch

    with warnings.catch_warnings():
        # The view is read-only object-store memory; it is only read here (copied or cast).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(value)
    if device is not None and torch.device(device).type != "cpu":
        moved = source.to(device, non_blocking=False)  # the stored dtype crosses the bus
        return moved.to(dtype) if dtype is not None else moved
    if dtype is not None and dtype != source.dtype:
        return source.to(dtype)
    return source.clone()
