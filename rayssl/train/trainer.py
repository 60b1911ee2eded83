"""Driver side of `rayssl pretrain`: resolve data, build the stream, run TorchTrainer, finish the run folder."""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import posixpath
import secrets
import threading
import time
import traceback
from typing import Any

import fsspec
import psutil
import ray
import ray.train
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayssl.config import RunConfig
from rayssl.data.pipeline import SkipLedger, build_dataset
from rayssl.data.storage import apply_storage_options, fsspec_defaults
from rayssl.data.stores import stores_summary, volume_repeats
from rayssl.data.types import VolumeInfo
from rayssl.data.volumes import (check_volumes_in_split, load_volumes, manifest_digest, read_manifest_table,
                                 spacing_summary)
from rayssl.eval.online import OnlineProbe
from rayssl.eval.online import record as record_online_probe
from rayssl.methods import get_method_class
from rayssl.methods.base import Method
from rayssl.runtime import RayOutputToFile, attach_address, start_or_attach
from rayssl.checkpoint import latest_checkpoint_step
from rayssl.train.heldout import build_heldout_batches, heldout_every
from rayssl.train.jobs import ray_job_runner
from rayssl.train.loop import train_loop_per_worker
from rayssl.train.optim import describe_batch, effective_batch, resolve_epochs
from rayssl.train.runfolder import (RunResult, check_resume, claim_run_folder, existing_result, finish_run_folder,
                                    ray_log_path, release_run_folder, start_run_folder, write_run_file)
from rayssl.train.shards import RANK_DATASET, rank_data_config, rank_datasets
from rayssl.train.tracking import (TrackingCallback, check_tracking, finish_mlflow_run, log_online_probe,
                                  start_tracking)


def ensure_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """Attach to `address` / RAY_ADDRESS (checked to answer) or start a private local runtime, unless one is up."""
    start_or_attach(address, **init_kwargs)


def _absolute(path: str) -> str:
    """Local paths made absolute (workers may run elsewhere); URIs (s3://...) kept as they are."""
    return path if "://" in str(path) else os.path.abspath(path)


def _exists(path: str) -> bool:
    fs, fs_path = fsspec.core.url_to_fs(str(path))
    return fs.exists(fs_path)


def new_run_name(method: str) -> str:
    """Unique per run: Ray Train silently resumes a re-used (storage, name), even a finished run."""
    return f"{method}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def resolve_stores(cfg: RunConfig) -> tuple[list[str], list[float | None]]:
    """The run's stores and their sampling weights (`data.stores`, or `data.store`, or the demo
    store, built on first use)."""
    entries = cfg.data.store_entries()
    if entries:
        return [e.uri for e in entries], [e.weight for e in entries]
    from datasets_zarr.demo import default_cache_dir, demo_store

    try:
        return [str(demo_store(n=cfg.data.demo_volumes))], [None]
    except OSError as err:  # built on first use in the cache: a read-only cache must not be a traceback
        raise ValueError(f"cannot build the demo store in the cache folder {default_cache_dir()}: {err.strerror or err} "
                         f"({err.filename or ''}); set RAYSSL_CACHE to a writable folder, or train on your own store "
                         f"with --data STORE") from None


def load_store_volumes(stores: list[str], split: str | None) -> list[VolumeInfo]:
    """`load_volumes`, with a manifest that cannot be read (truncated, corrupt) named instead of pyarrow's
    bare message; checked before Ray starts."""
    for store in stores:
        try:
            read_manifest_table(store)
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - pyarrow/fsspec errors name neither the file nor the fix
            path = posixpath.join(str(store).rstrip("/"), "manifest.parquet")
            raise ValueError(f"manifest {path} cannot be read ({type(err).__name__}: {err}): the file is truncated or "
                             f"corrupt. Restore it from a copy of the store, or convert the scans again into a new "
                             f"store (`rayssl convert SCANS... --out NEW_STORE`)") from None
    return load_volumes(stores, split)


def prepare_volumes(method: Method, volumes: list[VolumeInfo]) -> list[VolumeInfo]:
    """`method.prepare(volumes)` with its per-volume jobs as Ray tasks, checked to return one
    VolumeInfo per volume in the same order (sample plans, store shares and resumed runs index
    volumes by their manifest row)."""
    stores = {str(v.extra.get("store", "")) for v in volumes}
    prepared = method.prepare(volumes, runner=ray_job_runner(storage_defaults=fsspec_defaults(stores)))
    if [v.id for v in prepared] != [v.id for v in volumes]:
        raise RuntimeError(f"{type(method).__name__}.prepare returned volumes {[v.id for v in prepared][:5]}... for "
                           f"{[v.id for v in volumes][:5]}...: it must return one VolumeInfo per volume, same order")
    return prepared


def _heldout_samples(volumes, method, cfg: RunConfig, global_batch: int, repeats) -> "ray.ObjectRef | None":
    """The held-out samples (rayssl/train/heldout.py) in the object store, or None when off or unbuildable:
    an unreadable volume is the data path's to report (with on_error), not this curve's."""
    if cfg.train.heldout_samples <= 0:
        return None
    try:
        batches = build_heldout_batches(volumes, method.plan, method.views, cfg, read_dtype=method.read_dtype,
                                        samples_per_step=global_batch if method.step_shared_plans else None,
                                        global_batch=global_batch, repeats=repeats)
    except Exception as err:  # noqa: BLE001 - the curve is optional; training reports bad data itself
        print(f"[rayssl] warning: no held-out objective for this run: its samples could not be built ({err})")
        return None
    return ray.put(batches)


class _MemoryWatcher(threading.Thread):
    """Samples machine memory in use during the run; the peak above the starting level is reported."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.base = psutil.virtual_memory().used
        self.peak = self.base
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, psutil.virtual_memory().used)

    def stop(self) -> float:
        self._stop_event.set()
        return (self.peak - self.base) / 2**20


class DataReadError(RuntimeError):
    """A sample's volume could not be read with data.on_error=raise; the message names the volume and chunk."""


class PlacementError(RuntimeError):
    """The Train worker group could not be placed on the cluster within the bounded retries."""


def explain_placement_failure(err: BaseException, tc: Any, use_gpu: bool) -> PlacementError | None:
    """Ray's worker-group start-up timeout, restated in rayssl's terms (what was asked, what exists, what to change).

    Train V2 waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (default 60 s) for the placement group,
    then retries up to `train.controller_failure_limit` times; its message names neither the
    resources asked for nor the config fields that set them.
    """
    failure = getattr(err, "controller_failure", None)
    if failure is None or type(failure).__name__ not in (
            "WorkerGroupStartupTimeoutError", "InsufficientClusterResourcesError"):
        return None
    per_worker = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    try:
        total = {k: v for k, v in ray.cluster_resources().items() if k in per_worker}
    except Exception:  # noqa: BLE001 - the message is still useful without it
        total = "unknown"
    timeout = os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    explained = PlacementError(
        f"could not place {tc.num_workers} training workers x {per_worker} "
        f"(train.num_workers={tc.num_workers}, train.cpus_per_worker={tc.cpus_per_worker}, use_gpu={use_gpu}) "
        f"in {tc.controller_failure_limit + 1} attempt(s) of {timeout} s; the cluster has {total} in total "
        f"(data actors need data.actor_cpus each on top). Lower train.num_workers or train.cpus_per_worker, "
        f"or add nodes; if an autoscaler is still starting nodes, raise RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S "
        f"or train.controller_failure_limit. Ray: {failure}")
    explained.__cause__ = err
    return explained


def _finished(run_dir: str, cfg: RunConfig) -> bool:
    """True (and says so) when the run's newest complete checkpoint is at or past where `cfg` stops.
    A finished run stays as it is: no file of it is rewritten and Ray is not started."""
    start_step = latest_checkpoint_step(run_dir) or 0
    stop = min(cfg.train.stop_after or cfg.train.steps, cfg.train.steps)
    if start_step < stop:
        return False
    print(f"[rayssl] {run_dir} is already at step {start_step} >= {stop}: nothing to do, nothing written "
          f"(raise train.steps with --set train.steps=N to continue training)")
    return True


def pretrain(cfg: RunConfig, resume: str | None = None, address: str | None = None,
             ray_init: dict[str, Any] | None = None, callbacks: list[Any] | None = None,
             mlflow_uri: str | None = None) -> RunResult:
    """Run (or resume) one pretraining run; returns where it went and what it measured.

    Metrics go to TensorBoard event files in the run folder, and to MLflow when `mlflow_uri` (or
    MLFLOW_TRACKING_URI, or the URI a resumed run logged to) is set.

    `callbacks` are Ray Train `UserCallback`s (e.g. Tune's `TuneReportCallback` when a Tune trial
    launches this run).
    """
    t0 = time.perf_counter()
    # Wall-clock start-up marks, written to the run folder's startup.json (benchmarks/startup.py reads them).
    startup = {"process_started": psutil.Process().create_time(), "pretrain_called": time.time()}
    if resume:
        run_dir = _absolute(resume if _exists(resume) else posixpath.join(cfg.train.storage_path or cfg.out, resume))
        if not _exists(run_dir):
            raise FileNotFoundError(f"--resume {resume}: no run folder at {run_dir}")
        check_resume(run_dir, cfg.method, cfg.profile)  # a folder rayssl made, with this method and profile
        name = posixpath.basename(run_dir.rstrip("/"))
        storage = posixpath.dirname(run_dir.rstrip("/"))
    else:
        name = cfg.name or new_run_name(cfg.method)
        storage = _absolute(cfg.train.storage_path or cfg.out)
        run_dir = posixpath.join(storage, name)
        if _exists(run_dir):
            raise FileExistsError(
                f"run folder {run_dir} already exists; resume it with `rayssl pretrain --resume {run_dir}` "
                f"or choose another --name")
    cfg = cfg.model_copy(update={"name": name})

    if resume and cfg.train.epochs is None and _finished(run_dir, cfg):
        return existing_result(run_dir)  # decided without the stores: they may have moved since

    # Everything that can be checked without Ray is checked before it starts (seconds, not the
    # 30-45 s of a Ray start) and before a run folder is made: stores, manifests, splits, tracking.
    method = get_method_class(cfg.method)(cfg.method_cfg())
    stores, weights = resolve_stores(cfg)
    apply_storage_options(stores, cfg.data.storage_options)
    loaded = load_store_volumes(stores, cfg.data.split)
    check_volumes_in_split(method.check_volumes, loaded, stores, cfg.data.split)
    # Store shares are taken from the loaded volumes: prepare may point a volume's reads at a derived
    # store (VoCo's resized regions), but it still counts for the store it came from.
    repeats = volume_repeats(loaded, stores, weights, cfg.data.samples_per_volume)
    per_store = stores_summary(loaded, stores, weights, repeats, cfg.data.samples_per_volume)
    samples_per_epoch = len(loaded) * cfg.data.samples_per_volume if repeats is None else int(repeats.sum())
    cfg = resolve_epochs(cfg, samples_per_epoch)
    if resume and _finished(run_dir, cfg):
        return existing_result(run_dir)
    start_step = (latest_checkpoint_step(run_dir) or 0) if resume else 0
    stop = min(cfg.train.stop_after or cfg.train.steps, cfg.train.steps)
    check_tracking(run_dir, mlflow_uri, resumed=bool(resume))
    print(describe_batch(cfg.train))
    if not resume:
        claim_run_folder(run_dir, cfg)  # atomic: a second run with this name fails here, before Ray

    # Ray's own output (its warnings, its workers' lines) goes to the run folder's ray.log; the console
    # keeps rayssl's lines (rayssl/runtime.py RayOutputToFile).
    with RayOutputToFile(ray_log_path(run_dir)) as ray_output:
        try:
            startup["checks_done"] = time.time()
            ray_init = dict(ray_init or {})
            if cfg.eval.probe_store and not attach_address(address) and not ray.is_initialized():
                # The online probe's task reserves its own CPUs; on a private local runtime they are logical
                # CPUs on top of the cores, so the probe shares the cores with training instead of waiting for it.
                ray_init.setdefault("num_cpus", (os.cpu_count() or 1) + math.ceil(cfg.eval.probe_cpus))
            ensure_ray(address, **ray_init)
            ray_output.take_worker_output()
            startup["ray_ready"] = time.time()
            # Each volume is prepared in its own store (VolumeInfo.extra["store"]).
            volumes = prepare_volumes(method, loaded)
            startup["volumes_prepared"] = time.time()
            cfg = cfg.with_method_cfg(method.config)
            tc = cfg.train
            use_gpu = tc.use_gpu if tc.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
            # config.yaml records the values this run resolved (GPU or not, the held-out cadence), not null.
            tc = tc.model_copy(update={"use_gpu": use_gpu, "heldout_every": heldout_every(tc)})
            cfg = cfg.model_copy(update={"train": tc})
            start_run_folder(run_dir, cfg, stores=stores, volumes=len(volumes),
                             resumed_from=start_step if resume else None)

            # On a cluster, nodes come and go (spot preemption, node loss): restart from the last checkpoint.
            # Locally a lost worker (OOM kill) is worth one restart; a bug or bad input only repeats once.
            max_failures = tc.max_failures if tc.max_failures is not None else (3 if attach_address(address) else 1)
            global_batch = effective_batch(tc)  # samples per optimizer step (micro-batches included)
            # Progress is the loop's per-step line (step, loss terms, crops/s, ETA); Ray Data's operator
            # bars would interleave with it on every refresh.
            ray.data.DataContext.get_current().enable_progress_bars = False
            # On the driver's node: a 0-CPU actor may otherwise land on any worker node, and losing that
            # node would fail a run that Train itself recovered (cluster work, see docs/cluster.md).
            mlflow_run = start_tracking(run_dir, cfg, mlflow_uri, resumed=bool(resume))
            ledger = SkipLedger.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False)).remote()
            # Enough samples for the remaining steps, plus one batch per worker so drop_last never starves.
            build = functools.partial(
                build_dataset, volumes, method.plan, method.views,
                seed=cfg.seed, samples_per_volume=cfg.data.samples_per_volume,
                on_error=cfg.data.on_error, ledger=ledger, read_dtype=method.read_dtype, measure_cpu=True,
                repeats=repeats,
            )
            heldout_ref = _heldout_samples(volumes, method, cfg, global_batch, repeats)
            startup["heldout_built"] = time.time()
            start_sample, num_samples = start_step * global_batch, (stop - start_step) * global_batch + global_batch
            ingest = ray.train.DataConfig.default_ingest_options()
            ingest.preserve_order = True  # reproducible sample order => exact resume
            if method.step_shared_plans:
                # Step-shared plans (DrasCLR's landmark per batch): samples [k*G, (k+1)*G) are step k, so
                # every rank streams exactly its own micro-batches of them (rayssl/train/shards.py).
                datasets = rank_datasets(functools.partial(build, samples_per_step=global_batch),
                                         start_sample=start_sample, num_samples=num_samples, micro_batch=tc.batch_size,
                                         world=tc.num_workers, actors=(cfg.data.actors_min, cfg.data.actors_max),
                                         actor_cpus=cfg.data.actor_cpus)
                data_config, dataset_name = rank_data_config(ingest), RANK_DATASET
            else:
                datasets = {"train": build(num_samples=num_samples, start_sample=start_sample,
                                           actors=(cfg.data.actors_min, cfg.data.actors_max), actor_cpus=cfg.data.actor_cpus)}
                data_config, dataset_name = ray.train.DataConfig(datasets_to_split=["train"], execution_options=ingest), "train"
            card = {
                # "store": the store of a single-store run; "stores" lists every store of the run.
                "data": {"store": stores[0] if len(stores) == 1 else None, "manifest_sha256": manifest_digest(stores),
                         "volumes": len(volumes), "split": cfg.data.split, "stores": per_store},
                "pretraining_spacing_mm": spacing_summary(volumes),
                # The method's intensity rule and what it resolved to on this run's volumes (the
                # export's bundle metadata reads it: value_range, modality, format).
                "intensity_resolved": method.intensity_rule().summary(volumes),
            }
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"run": cfg.model_dump(mode="json"), "run_dir": run_dir, "data_start_step": start_step,
                                   "dataset": dataset_name, "card": card, "samples_per_epoch": samples_per_epoch,
                                   "heldout": heldout_ref},
                scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu,
                                                       resources_per_worker={"CPU": tc.cpus_per_worker}),
                run_config=ray.train.RunConfig(
                    name=name, storage_path=storage,
                    failure_config=ray.train.FailureConfig(max_failures=max_failures,
                                                           controller_failure_limit=tc.controller_failure_limit),
                    checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
                    callbacks=[*(callbacks or []), TrackingCallback(run_dir, start_step, mlflow_run)],
                    # Our loop prints one progress line per report; Train's own INFO lines would repeat it.
                    logging_config=ray.train.LoggingConfig(log_level="WARNING"),
                ),
                datasets=datasets,
                dataset_config=data_config,
            )
        except BaseException:
            if not resume:  # failed before training: remove the folder this run made (nothing of value in it)
                release_run_folder(run_dir)
            raise
        online = OnlineProbe(run_dir, cfg, start_step=start_step) if cfg.eval.probe_store else None
        if online is not None:
            online.start()
        watcher = _MemoryWatcher()
        watcher.start()
        startup["fit_called"] = time.time()
        write_run_file(run_dir, "startup.json", json.dumps(startup, indent=2) + "\n")
        error = failure = None
        try:
            trainer.fit()
        except Exception as err:  # noqa: BLE001 - recorded in the run folder, then re-raised
            failure = err
            error = explain_placement_failure(err, tc, use_gpu) or err
        peak = watcher.stop()
        probe_summary = None
        if online is not None:
            probe_summary = online.finish(failed=error is not None)
            record_online_probe(run_dir, probe_summary)
            log_online_probe(run_dir, probe_summary, mlflow_run)
        skipped = ray.get(ledger.summary.remote())
        data_failure = ray.get(ledger.failure.remote()) if error is not None else None
        if data_failure is not None:  # the volume and chunk, not Train's truncated traceback of the data actor
            error = DataReadError(f"{data_failure} (data.on_error=raise; --set data.on_error=skip trains on the other "
                                  f"volumes and lists the unreadable ones in summary.json)")
        result = finish_run_folder(run_dir, cfg, wall_time_s=time.perf_counter() - t0, peak_memory_mb=peak,
                                   skipped=skipped, error=error, data={"stores": per_store}, online_probe=probe_summary)
        if mlflow_run is not None:
            finish_mlflow_run(run_dir, mlflow_run, result.status)
        if error is not None:
            ray_output.write("".join(traceback.format_exception(failure)) + f"rayssl: the run failed: {error}\n")
            error.rayssl_log = ray_output.path  # the CLI names it beside the error in rayssl's words
    if error is not None:
        raise error
    return result
