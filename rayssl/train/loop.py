"""`train_loop_per_worker`: the one training loop, knowing no method by name."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import random
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from rayssl.config import RunConfig
from rayssl.export import complete_state, export_card, write_export
from rayssl.methods import get_method_class
from rayssl.nn.health import representation_health
from rayssl.nn.norm import MIN_BATCHNORM_ROWS, count_batchnorm_rows, has_batchnorm
from rayssl.checkpoint import load_newest_state, rng_state, set_rng_state, write_checkpoint_dir
from rayssl.train.heldout import (
    HeldoutBatches,
    evaluate_heldout,
    heldout_due,
    restore_running_norm_stats,
    running_norm_stats,
)
from rayssl.train.optim import accumulate_gradients, build_optimizer, build_scheduler, effective_batch
from rayssl.train.report import Reporter, say, write_text
from rayssl.train.stall import DataWaitMeter


def _quiet_train_reports() -> None:
    """Train V2 logs every report at INFO under a logger named by file path, which its LoggingConfig
    level does not cover; our own progress line already says the same, so keep only warnings."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


def count_crops(batch: dict[str, torch.Tensor]) -> int:
    """Image crops in a batch: every [B, ..., C, D, H, W] tensor counts prod of its middle dims per sample."""
    crops = 0
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 5 and value.is_floating_point():
            crops += int(np.prod(value.shape[:-4])) if value.dim() > 5 else value.shape[0]
    return crops


def _mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks: a collective, so every rank calls it at the same reports."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank: a collective, so every rank calls it at the same points of a step."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def small_batchnorm_warning(model: torch.nn.Module, rows: dict[str, int], method: str, method_fields: Any,
                            minimum: int = MIN_BATCHNORM_ROWS) -> str | None:
    """The warning for BatchNorm layers that saw fewer than `minimum` rows in a step (`rows`: layer name
    -> fewest rows, from rayssl.nn.norm.count_batchnorm_rows), naming them and the fix; None if none.

    `method_fields`: the method config's field names; a `norm` / `head_norm` field is offered as the fix
    for conv / 1-D BatchNorm layers (the methods' convention), so the loop needs no method by name.
    """
    small = {name: n for name, n in rows.items() if n < minimum}
    if not small:
        return None
    modules = dict(model.named_modules())
    names = list(small)
    shown = ", ".join(f"{name} ({small[name]} rows)" for name in names[:3])
    if len(names) > 3:
        shown += f" and {len(names) - 3} more"
    fixes = []
    heads = any(isinstance(modules.get(name), torch.nn.BatchNorm1d) for name in names)
    convs = any(not isinstance(modules.get(name), torch.nn.BatchNorm1d) for name in names)
    if convs and "norm" in method_fields:
        fixes.append(f"--set {method}.norm=group")
    # For heads a larger batch comes first: per-row LayerNorm does not standardise over samples, and
    # MLSSCL's embedding collapsed with it (issue 24); smaller crops can pay for the batch.
    fixes.append(f"a larger train.batch_size (>= {minimum} rows per layer; smaller crops pay for it)")
    if heads and "head_norm" in method_fields:
        fixes.append(f"--set {method}.head_norm=layer")
    fixes.append("train.sync_batchnorm=true across several GPU workers")
    return (f"{len(names)} BatchNorm layer(s) normalise over fewer than {minimum} rows per step: {shown}. Batch "
            f"statistics of so few samples are noise, and embeddings normalised by different steps' statistics "
            f"are not comparable (a queue of negatives then holds incomparable keys). Fix: {', or '.join(fixes)}")


class DeviceViews:
    """Applies the method's device part of the views (`Method.device_views`) to a stream of batches on
    the worker's device, timing it: iterated inside the data-wait meter, its time counts as data wait
    (the step waits for it as for the actors). On CUDA the time is taken after a synchronisation, so
    it is the device part's own time (plus whatever of the previous step was still queued)."""

    def __init__(self, method: Any, device: torch.device) -> None:
        self.method, self.device = method, device
        self.seconds = 0.0
        self.batches = 0

    def apply(self, batch: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        done = self.method.device_views(batch, self.device)
        if done is not batch:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds += time.perf_counter() - started
            self.batches += 1
        return done

    def stream(self, batches: Any, skip: int = 0) -> Any:
        """`batches` with the device part applied, except to the first `skip` (dropped by a resume)."""
        for i, batch in enumerate(batches):
            yield batch if i < skip else self.apply(batch)

    def window(self) -> dict[str, float]:
        """device_views_s (this worker's seconds in the device part since the last window) and per batch."""
        if not self.batches:
            return {}
        out = {"device_views_s": self.seconds, "device_views_s_per_batch": self.seconds / self.batches}
        self.seconds, self.batches = 0.0, 0
        return out


@dataclass(frozen=True)
class _Worker:
    """What stays fixed on this worker for the whole run, so the loop's pieces take one argument for it."""

    cfg: RunConfig
    run_dir: str
    rank: int
    world: int
    method: Any
    device: torch.device
    samples_per_epoch: int

    @property
    def stop(self) -> int:
        """The step this session ends at: train.steps, or train.stop_after when that comes first."""
        return min(self.cfg.train.stop_after or self.cfg.train.steps, self.cfg.train.steps)


@dataclass
class TrainState:
    """What the optimizer steps advance and a checkpoint keeps, with the DDP wrapper and precision they run under."""

    model: torch.nn.Module
    ddp_model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    autocast: Callable[[], ContextManager[Any]]
    step: int = 0
    grad_norm: float = math.nan  # the last counted step's (nan without train.grad_clip)


class _Meters:
    """This worker's measurements between two reports (data wait, the views' device part, throughput) and the run's clock."""

    def __init__(self, data_wait: DataWaitMeter, device_part: DeviceViews, world: int) -> None:
        self.data_wait, self.device_part, self.world = data_wait, device_part, world
        self.started = time.perf_counter()
        self.restart()

    def restart(self) -> None:
        """Opens the next report's window."""
        self.window_started, self.samples, self.crops, self.steps = time.perf_counter(), 0, 0, 0

    def add(self, step_batches: list[dict[str, torch.Tensor]]) -> None:
        """Counts an optimizer step's samples and crops, all workers' (every worker steps on the same batch size)."""
        batch_size = sum(next(v.shape[0] for v in b.values() if isinstance(v, torch.Tensor)) for b in step_batches)
        self.samples += batch_size * self.world
        self.crops += sum(count_crops(b) for b in step_batches) * self.world
        self.steps += 1

    def waits(self, elapsed: float) -> dict[str, float]:
        """The window's data wait and the views' device part (this worker's)."""
        return {**self.data_wait.window(elapsed, self.samples), **self.device_part.window()}

    def rates(self, elapsed: float) -> dict[str, float]:
        """The window's throughput: samples and crops per second (all workers), seconds per step."""
        return {"samples_per_s": self.samples / max(elapsed, 1e-9), "crops_per_s": self.crops / max(elapsed, 1e-9),
                "step_time_s": elapsed / max(self.steps, 1)}


class _Heldout:
    """Fixed samples never trained on (built by the driver): the objective's low-noise curve."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches
        self.reported = False

    def metrics(self, w: _Worker, train: TrainState) -> dict[str, float]:
        """The held-out loss when heldout_due says so (the first report always), else nothing."""
        if not (self.batches and heldout_due(train.step, w.stop, w.cfg.train, first_report=not self.reported)):
            return {}
        self.reported = True
        return evaluate_heldout(train.model, w.method.loss, self.batches, w.device, autocast=train.autocast,
                                reference_fn=w.method.heldout_reference)


class _BatchnormCheck:
    """The first step's check that every BatchNorm layer normalises over enough rows, warned of once."""

    def __init__(self, w: _Worker) -> None:
        self.w = w
        self.done = False

    def counting(self, model: torch.nn.Module) -> ContextManager[dict[str, int]]:
        """Counts, during the first step only, the rows every BatchNorm layer normalises over (forward pre-hooks)."""
        return count_batchnorm_rows(model) if not self.done else contextlib.nullcontext({})

    def check(self, model: torch.nn.Module, rows: dict[str, int], step: int) -> None:
        """After the first step: rank 0 says and writes (warnings.json) which layers saw too few rows."""
        if self.done:
            return
        self.done = True
        w = self.w
        warning = small_batchnorm_warning(model, rows, w.cfg.method, type(w.method.config).model_fields)
        if warning and w.rank == 0:
            say(f"[rayssl] warning: {warning}")
            write_text(posixpath.join(w.run_dir, "warnings.json"),
                       json.dumps({"step": step, "warnings": [warning]}, indent=2) + "\n")


def _seed_everything(seed: int) -> None:
    """The same seed in torch, NumPy and random on every rank: the model starts identical everywhere."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _set_up(loop_config: dict[str, Any]) -> tuple[_Worker, torch.nn.Module]:
    """The worker's facts and the method's model on its device, seeded, with BatchNorm synced if asked."""
    cfg = RunConfig.model_validate(loop_config["run"])
    tc = cfg.train
    _quiet_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(tc.torch_threads or max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))

    _seed_everything(cfg.seed)
    method_cfg = cfg.method_cfg()
    method = get_method_class(cfg.method)(method_cfg)
    device = ray.train.torch.get_device()
    model = method.build_model().to(device)
    if tc.sync_batchnorm and world > 1 and has_batchnorm(model):
        if device.type == "cuda":
            # One set of batch statistics over every worker's rows; parameters stay the same objects.
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif rank == 0:
            say("[rayssl] warning: train.sync_batchnorm needs GPU workers (torch's SyncBatchNorm runs on CUDA "
                "only); BatchNorm stays per worker")
    method.setup(model, device)
    w = _Worker(cfg, loop_config["run_dir"], rank, world, method, device,
                int(loop_config.get("samples_per_epoch", 1)))
    return w, model


def _checkpoint_state(train: TrainState, method: Any, epoch: int) -> dict[str, Any]:
    """Everything `_resume` restores, so that a resumed run continues exactly: weights, optimizer, schedule,
    the method's own state (queues, momentum encoders), step and RNG."""
    return {
        "model": train.model.state_dict(), "optimizer": train.optimizer.state_dict(),
        "scheduler": train.scheduler.state_dict(), "method": method.state_dict(),
        "step": train.step, "epoch": epoch, "rng": rng_state(),
    }


def _resume(w: _Worker, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> int:
    """The step of the newest complete checkpoint in the run folder, its state loaded (0, nothing loaded, if none);
    it may be newer than the one Train registered."""
    state = load_newest_state(w.run_dir, registered=ray.train.get_checkpoint())
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    w.method.load_state_dict(state["method"])
    set_rng_state(state["rng"])
    step = int(state["step"])
    if w.rank == 0:
        say(f"[rayssl] resumed from checkpoint at step {step}")
    return step


def _train_state(w: _Worker, model: torch.nn.Module) -> TrainState:
    """Optimizer and schedule over the trainable parameters, resumed from the newest checkpoint, then the
    model wrapped for DDP and the mixed precision chosen (the wrap comes after the resume, as it always has)."""
    tc = w.cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tc)
    scheduler = build_scheduler(optimizer, tc)
    step = _resume(w, model, optimizer, scheduler)
    ddp_model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": w.method.find_unused_parameters})
    use_amp = tc.amp and w.device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    return TrainState(model, ddp_model, params, optimizer, scheduler, scaler, step=step,
                      autocast=lambda: torch.autocast(device_type=w.device.type, dtype=amp_dtype, enabled=use_amp))


def _batches(w: _Worker, loop_config: dict[str, Any]) -> Iterable[dict[str, torch.Tensor]]:
    """This worker's batches: of "train" (split by Ray Train) or, for step-shared plans, its own stream "train_{rank}"."""
    shard = ray.train.get_dataset_shard(str(loop_config.get("dataset", "train")).format(rank=w.rank))
    return shard.iter_torch_batches(batch_size=w.cfg.train.batch_size, drop_last=True,
                                    prefetch_batches=w.cfg.data.prefetch_batches)


def _heldout_batches(w: _Worker, loop_config: dict[str, Any]) -> list[Any]:
    """The driver's held-out batches, with their device part applied once here (a function of their fixed
    parameters), so they stay on the device."""
    batches = ray.get(loop_config["heldout"]) if loop_config.get("heldout") is not None else []
    if batches and w.method.views_on == "device":
        batches = HeldoutBatches(
            [w.method.device_views({k: torch.as_tensor(v) for k, v in b.items()}, w.device) for b in batches],
            live=getattr(batches, "live", None))
    return batches


def _accumulate(w: _Worker, train: TrainState, step_batches: list[dict[str, torch.Tensor]],
                batchnorm: _BatchnormCheck) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Forward and backward of one step's micro-batches into `.grad`: (mean loss terms, outputs for after_step)."""
    train.optimizer.zero_grad(set_to_none=True)
    with batchnorm.counting(train.model) as rows:
        losses, outputs = accumulate_gradients(
            train.ddp_model, w.method.loss, step_batches, scale=train.scaler.scale, autocast=train.autocast,
            all_ranks_finite=lambda finite: not _any_rank(not finite))
    batchnorm.check(train.model, rows, train.step + 1)
    return losses, outputs


def _optimizer_step(w: _Worker, train: TrainState, losses: dict[str, torch.Tensor],
                    norm_stats: list[tuple[torch.Tensor, torch.Tensor]] | None) -> bool:
    """The optimizer step from the accumulated gradients, unless any rank's loss or clipped gradient norm is
    non-finite (nan_policy=stop raises, skip leaves no trace). Returns whether the step counted."""
    tc = w.cfg.train
    if _any_rank(not bool(torch.isfinite(losses["loss"].detach()).all())):
        if tc.nan_policy == "stop":
            raise NonFiniteLossError(
                f"non-finite loss at step {train.step + 1} ({ {k: float(v) for k, v in losses.items()} }); "
                f"stopping. The last good checkpoint in {w.run_dir} is kept; lower train.lr, check the data, "
                f"or set train.nan_policy=skip")
        train.optimizer.zero_grad(set_to_none=True)
        restore_running_norm_stats(norm_stats)
        if w.rank == 0:
            say(f"[rayssl] step {train.step + 1}: non-finite loss, step skipped (nan_policy=skip)")
        return False
    grad_norm = float("nan")
    if tc.grad_clip is not None:
        train.scaler.unscale_(train.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(train.params, tc.grad_clip))
    if _any_rank(not math.isfinite(grad_norm) and tc.grad_clip is not None):
        if tc.nan_policy == "stop":
            raise NonFiniteLossError(
                f"non-finite gradient norm at step {train.step + 1}; stopping, the last good checkpoint is kept "
                f"(lower train.lr or set train.nan_policy=skip)")
        train.optimizer.zero_grad(set_to_none=True)
        restore_running_norm_stats(norm_stats)
        train.scaler.update()
        return False
    train.scaler.step(train.optimizer)
    train.scaler.update()
    train.scheduler.step()
    train.step += 1
    train.grad_norm = grad_norm
    return True


def _metrics(w: _Worker, train: TrainState, losses: dict[str, torch.Tensor], extra: dict[str, float],
             outputs: dict[str, torch.Tensor], meters: _Meters, heldout: _Heldout) -> dict[str, float]:
    """A report's metrics, the same keys on every rank and averaged over them, then the step's own columns."""
    elapsed = time.perf_counter() - meters.window_started
    metrics = {k: float(v.detach()) for k, v in losses.items()}
    metrics.update({k: float(v) for k, v in extra.items()})
    metrics.update(meters.waits(elapsed))
    embeddings = w.method.embeddings(outputs)  # the same keys on every rank: same method, same batch size
    metrics.update(representation_health(embeddings) if embeddings is not None else {})
    # Every rank reports at the same steps, so all evaluate together (a forward may use collectives).
    metrics.update(heldout.metrics(w, train))
    metrics = _mean_across_ranks(metrics)
    metrics.update({
        "step": train.step, "epoch": train.step * effective_batch(w.cfg.train) // max(1, w.samples_per_epoch),
        "lr": train.scheduler.get_last_lr()[0], "grad_norm": train.grad_norm,
        **meters.rates(elapsed),
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "time_s": time.perf_counter() - meters.started,
        **({"gpu_peak_mem_mb": torch.cuda.max_memory_allocated(w.device) / 2**20} if w.device.type == "cuda" else {}),
    })
    meters.restart()
    return metrics


def _checkpoint(w: _Worker, train: TrainState, metrics: dict[str, float]) -> ray.train.Checkpoint:
    """This step's checkpoint, written to a local directory for Train to upload (rank 0 only)."""
    return ray.train.Checkpoint.from_directory(write_checkpoint_dir(
        _checkpoint_state(train, w.method, metrics["epoch"]),
        {"step": train.step, "method": w.cfg.method, "loss": metrics["loss"]}))


def _write_startup(startup: dict[str, Any], run_dir: str) -> None:
    """Rank 0's start-up marks, written once, at the first report (benchmarks/startup.py reads them)."""
    if "written" not in startup:
        write_text(posixpath.join(run_dir, "startup_worker.json"), json.dumps(startup, indent=2) + "\n")
        startup["written"] = True


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. `loop_config`: {"run": RunConfig dict, "run_dir", "data_start_step", "dataset", "card"}."""
    # Wall-clock start-up marks (benchmarks/startup.py): worker up, model and data ready, first batch, first step.
    startup = {"worker_started": time.time()}
    w, model = _set_up(loop_config)
    tc = w.cfg.train
    train = _train_state(w, model)  # resumed from the newest state in the run folder

    batches = _batches(w, loop_config)
    # The driver starts the dataset at the step it resumes from; after an in-run restart (node
    # loss) the dataset restarts at its own beginning, so skip what the checkpoint already covered.
    to_skip = (train.step - int(loop_config.get("data_start_step", 0))) * tc.accumulate
    heldout = _Heldout(_heldout_batches(w, loop_config))
    device_part = DeviceViews(w.method, w.device)
    data_wait = DataWaitMeter(world_size=w.world)
    reporter = Reporter(w.run_dir, train.step, w.rank, w.stop, w.cfg.data, data_wait)
    meters = _Meters(data_wait, device_part, w.world)
    batchnorm = _BatchnormCheck(w)
    last_metrics: dict[str, float] = {}
    micro_batches: list[dict[str, torch.Tensor]] = []
    startup["loop_ready"] = time.time()
    # The device part of the views runs inside the timed fetch: its time counts as data wait.
    for batch in data_wait.timed(device_part.stream(batches, skip=max(to_skip, 0))):
        startup.setdefault("first_batch", time.time())
        if to_skip > 0:
            to_skip -= 1
            continue
        if train.step >= w.stop:
            break
        # train.accumulate micro-batches make one optimizer step (see docs/methods/*.md, "recipe").
        micro_batches.append(batch)
        if len(micro_batches) < tc.accumulate:
            continue
        step_batches, micro_batches = micro_batches, []
        train.ddp_model.train()
        # nan_policy=skip: a skipped step must leave no trace, but a train-mode forward has already
        # folded the bad batch into BatchNorm running statistics; keep them to put back.
        norm_stats = running_norm_stats(train.model) if tc.nan_policy == "skip" else None
        losses, outputs = _accumulate(w, train, step_batches, batchnorm)
        if not _optimizer_step(w, train, losses, norm_stats):
            continue
        startup.setdefault("first_step", time.time())
        extra = w.method.after_step(train.model, outputs, train.step, tc.steps)
        meters.add(step_batches)

        final = train.step >= w.stop
        due_ckpt = train.step % tc.checkpoint_every == 0 or final
        if train.step % tc.report_every == 0 or due_ckpt:
            metrics = _metrics(w, train, losses, extra, outputs, meters, heldout)
            checkpoint = _checkpoint(w, train, metrics) if due_ckpt and w.rank == 0 else None
            if w.rank == 0:
                _write_startup(startup, w.run_dir)
                reporter.record(metrics, losses, train.step)
            # The local copy goes once uploaded: otherwise every checkpoint stays in the node's /tmp
            # (a paper-size model + AdamW state is ~0.75 GB each).
            ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=True)
            last_metrics = metrics
        if final:
            break

    if train.step < w.stop:
        raise RuntimeError(
            f"the data stream ended at step {train.step} before the target {w.stop}; this is a bug in the dataset "
            f"size computation, please report it")
    if w.rank == 0 and train.step >= tc.steps:
        _export(w.method, train.model, w.run_dir, w.cfg, loop_config.get("card", {}), train.step, last_metrics)


def _export(method, model, run_dir: str, cfg: RunConfig, card_context: dict[str, Any], step: int,
            last_metrics: dict[str, float]) -> None:
    """export/backbone.pt (every key of the MONAI network the card names) + export/model_card.json."""
    exported = method.export(model)
    state, initialized = complete_state(exported.network, exported.network_kwargs, exported.state_dict)
    facts = {"profile": cfg.profile, "effective_batch": effective_batch(cfg.train), "steps": step, "final_loss": last_metrics.get("loss"), "num_keys": len(state),
             "num_pretrained_keys": len(exported.state_dict), "notes": exported.notes, "config": cfg.to_yaml_dict(),
             **card_context, **method.card(),
             "method": cfg.method}  # the registry name, which `rayssl probe` and Tune look the method up by
    card = export_card(exported.network, exported.network_kwargs, exported.key_groups, initialized, facts)
    export_dir = posixpath.join(run_dir, "export")
    write_export(export_dir, state, card, "monai")
    say(f"[rayssl] exported backbone ({len(exported.state_dict)} pretrained of {len(state)} tensors) to {export_dir}")
