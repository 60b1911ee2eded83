"""`train_loop_per_worker`: the one training loop, knowing no method by name."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import random
import re
import resource
import sys
import time
from typing import Any

import fsspec
import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from rayssl.config import RunConfig
from rayssl.export import complete_state, export_card, write_export
from rayssl.methods import get_method_class
from rayssl.nn.health import collapse_warnings, representation_health
from rayssl.nn.norm import MIN_BATCHNORM_ROWS, count_batchnorm_rows, has_batchnorm
from rayssl.checkpoint import load_newest_state, rng_state, set_rng_state, write_checkpoint_dir
from rayssl.train.heldout import (
    FirstHeldout,
    HeldoutBatches,
    evaluate_heldout,
    heldout_due,
    progress_text,
    restore_running_norm_stats,
    running_norm_stats,
)
from rayssl.train.optim import accumulate_gradients, build_optimizer, build_scheduler, effective_batch
from rayssl.train.stall import DataWaitMeter, SteadyEta


def _say(message: str) -> None:
    """One progress line to the worker's stdout (forwarded to the driver by Ray).

    Train V2 patches `print` to also log through the root logger, which Ray forwards a second time;
    writing to the process's own stdout prints each line once.
    """
    print(message, file=sys.__stdout__, flush=True)


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
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _any_rank(flag: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _write_text(path: str, text: str) -> None:
    with fsspec.open(path, "w") as f:
        f.write(text)


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
    if heads and "head_norm" in method_fields:
        fixes.append(f"--set {method}.head_norm=layer")
    fixes += ["a larger train.batch_size", "train.sync_batchnorm=true across several GPU workers"]
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


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. `loop_config`: {"run": RunConfig dict, "run_dir", "data_start_step", "dataset", "card"}."""
    # Wall-clock start-up marks (benchmarks/startup.py): worker up, model and data ready, first batch, first step.
    startup = {"worker_started": time.time()}
    cfg = RunConfig.model_validate(loop_config["run"])
    run_dir: str = loop_config["run_dir"]
    tc = cfg.train
    _quiet_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(tc.torch_threads or max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    method_cfg = cfg.method_cfg()
    method = get_method_class(cfg.method)(method_cfg)
    device = ray.train.torch.get_device()
    model = method.build_model().to(device)
    if tc.sync_batchnorm and world > 1 and has_batchnorm(model):
        if device.type == "cuda":
            # One set of batch statistics over every worker's rows; parameters stay the same objects.
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif rank == 0:
            _say("[rayssl] warning: train.sync_batchnorm needs GPU workers (torch's SyncBatchNorm runs on CUDA "
                 "only); BatchNorm stays per worker")
    method.setup(model, device)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tc)
    scheduler = build_scheduler(optimizer, tc)

    step = 0
    # The newest complete checkpoint in the run folder, which may be newer than the one Train registered.
    state = load_newest_state(run_dir, registered=ray.train.get_checkpoint())
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        set_rng_state(state["rng"])
        step = int(state["step"])
        if rank == 0:
            _say(f"[rayssl] resumed from checkpoint at step {step}")

    ddp_model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": method.find_unused_parameters})
    use_amp = tc.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    stop = min(tc.stop_after or tc.steps, tc.steps)
    # "train" (split by Ray Train) or, for step-shared plans, this rank's own stream "train_{rank}".
    shard = ray.train.get_dataset_shard(str(loop_config.get("dataset", "train")).format(rank=rank))
    batches = shard.iter_torch_batches(batch_size=tc.batch_size, drop_last=True,
                                       prefetch_batches=cfg.data.prefetch_batches)
    # The driver starts the dataset at the step it resumes from; after an in-run restart (node
    # loss) the dataset restarts at its own beginning, so skip what the checkpoint already covered.
    to_skip = (step - int(loop_config.get("data_start_step", 0))) * tc.accumulate
    # Fixed samples never trained on (built by the driver): the objective's low-noise curve.
    heldout_batches = ray.get(loop_config["heldout"]) if loop_config.get("heldout") is not None else []
    device_part = DeviceViews(method, device)
    if heldout_batches and method.views_on == "device":
        # Fixed samples: their device part (a function of their parameters) once, here; they stay on the device.
        heldout_batches = HeldoutBatches(
            [method.device_views({k: torch.as_tensor(v) for k, v in b.items()}, device) for b in heldout_batches],
            live=getattr(heldout_batches, "live", None))
    heldout_reported = False

    metrics_path = posixpath.join(run_dir, "metrics.jsonl")
    history: list[str] = []
    if rank == 0 and step > 0:
        try:
            with fsspec.open(metrics_path, "r") as f:
                history = [line.rstrip("\n") for line in f if json.loads(line)["step"] <= step]
        except FileNotFoundError:
            history = []
    # The run's first held-out loss: the reference line of a method with none of its own (on resume, from metrics.jsonl).
    first_heldout = FirstHeldout([json.loads(line) for line in history])

    t_start = time.perf_counter()
    t_window, samples_window, crops_window, steps_window = time.perf_counter(), 0, 0, 0
    steps_done_here = 0
    last_metrics: dict[str, float] = {}
    micro_batches: list[dict[str, torch.Tensor]] = []
    data_wait, eta = DataWaitMeter(world_size=world), SteadyEta()
    last_warnings: list[str] = []
    batchnorm_checked = False
    reports_since_warning = 0
    startup["loop_ready"] = time.time()
    # The device part of the views runs inside the timed fetch: its time counts as data wait.
    for batch in data_wait.timed(device_part.stream(batches, skip=max(to_skip, 0))):
        startup.setdefault("first_batch", time.time())
        if to_skip > 0:
            to_skip -= 1
            continue
        if step >= stop:
            break
        # train.accumulate micro-batches make one optimizer step (see docs/methods/*.md, "recipe").
        micro_batches.append(batch)
        if len(micro_batches) < tc.accumulate:
            continue
        step_batches, micro_batches = micro_batches, []
        ddp_model.train()
        # nan_policy=skip: a skipped step must leave no trace, but a train-mode forward has already
        # folded the bad batch into BatchNorm running statistics; keep them to put back.
        norm_stats = running_norm_stats(model) if tc.nan_policy == "skip" else None
        optimizer.zero_grad(set_to_none=True)
        # The first step counts the rows every BatchNorm layer normalises over (forward pre-hooks).
        with count_batchnorm_rows(model) if not batchnorm_checked else contextlib.nullcontext({}) as batchnorm_rows:
            losses, outputs = accumulate_gradients(
                ddp_model, method.loss, step_batches, scale=scaler.scale,
                autocast=lambda: torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp),
                all_ranks_finite=lambda finite: not _any_rank(not finite))
        if not batchnorm_checked:
            batchnorm_checked = True
            warning = small_batchnorm_warning(model, batchnorm_rows, cfg.method, type(method_cfg).model_fields)
            if warning and rank == 0:
                _say(f"[rayssl] warning: {warning}")
                _write_text(posixpath.join(run_dir, "warnings.json"),
                            json.dumps({"step": step + 1, "warnings": [warning]}, indent=2) + "\n")
        loss = losses["loss"]
        if _any_rank(not bool(torch.isfinite(loss.detach()).all())):
            if tc.nan_policy == "stop":
                raise NonFiniteLossError(
                    f"non-finite loss at step {step + 1} ({ {k: float(v) for k, v in losses.items()} }); "
                    f"stopping. The last good checkpoint in {run_dir} is kept; lower train.lr, check the data, "
                    f"or set train.nan_policy=skip")
            optimizer.zero_grad(set_to_none=True)
            restore_running_norm_stats(norm_stats)
            if rank == 0:
                _say(f"[rayssl] step {step + 1}: non-finite loss, step skipped (nan_policy=skip)")
            continue
        grad_norm = float("nan")
        if tc.grad_clip is not None:
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.grad_clip))
        if _any_rank(not math.isfinite(grad_norm) and tc.grad_clip is not None):
            if tc.nan_policy == "stop":
                raise NonFiniteLossError(
                    f"non-finite gradient norm at step {step + 1}; stopping, the last good checkpoint is kept "
                    f"(lower train.lr or set train.nan_policy=skip)")
            optimizer.zero_grad(set_to_none=True)
            restore_running_norm_stats(norm_stats)
            scaler.update()
            continue
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        steps_done_here += 1
        startup.setdefault("first_step", time.time())
        extra = method.after_step(model, outputs, step, tc.steps)

        batch_size = sum(next(v.shape[0] for v in b.values() if isinstance(v, torch.Tensor)) for b in step_batches)
        samples_window += batch_size * world
        crops_window += sum(count_crops(b) for b in step_batches) * world
        steps_window += 1
        final = step >= stop
        due_ckpt = step % tc.checkpoint_every == 0 or final
        if step % tc.report_every == 0 or due_ckpt:
            elapsed = time.perf_counter() - t_window
            metrics = {k: float(v.detach()) for k, v in losses.items()}
            metrics.update({k: float(v) for k, v in extra.items()})
            metrics.update(data_wait.window(elapsed, samples_window))
            metrics.update(device_part.window())
            embeddings = method.embeddings(outputs)  # the same keys on every rank: same method, same batch size
            metrics.update(representation_health(embeddings) if embeddings is not None else {})
            # Every rank reports at the same steps, so all evaluate together (a forward may use collectives).
            if heldout_batches and heldout_due(step, stop, tc, first_report=not heldout_reported):
                heldout_reported = True
                metrics.update(evaluate_heldout(
                    model, method.loss, heldout_batches, device,
                    autocast=lambda: torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp),
                    reference_fn=method.heldout_reference))
            metrics = _mean_across_ranks(metrics)
            metrics.update({
                "step": step, "epoch": step * effective_batch(tc) // max(1, int(loop_config.get("samples_per_epoch", 1))),
                "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "samples_per_s": samples_window / max(elapsed, 1e-9),
                "crops_per_s": crops_window / max(elapsed, 1e-9),
                "step_time_s": elapsed / max(steps_window, 1),
                "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "time_s": time.perf_counter() - t_start,
                **({"gpu_peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20} if device.type == "cuda" else {}),
            })
            t_window, samples_window, crops_window, steps_window = time.perf_counter(), 0, 0, 0
            ckpt_obj = None
            if due_ckpt and rank == 0:
                state = {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "method": method.state_dict(),
                    "step": step, "epoch": metrics["epoch"], "rng": rng_state(),
                }
                ckpt_obj = ray.train.Checkpoint.from_directory(
                    write_checkpoint_dir(state, {"step": step, "method": cfg.method, "loss": metrics["loss"]}))
            if rank == 0 and "written" not in startup:
                _write_text(posixpath.join(run_dir, "startup_worker.json"), json.dumps(startup, indent=2) + "\n")
                startup["written"] = True
            if rank == 0:
                first_heldout.annotate(metrics)
                history.append(json.dumps(metrics))
                _write_text(metrics_path, "\n".join(history) + "\n")
                remaining = eta.update(step, stop)
                terms = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in losses and k != "loss")
                _say(f"[rayssl] step {step}/{stop} | loss {metrics['loss']:.4f} ({terms}) | "
                     f"{metrics['samples_per_s']:.2f} samples/s {metrics['crops_per_s']:.1f} crops/s | "
                     f"data wait {metrics['data_wait_pct']:.0f}% | lr {metrics['lr']:.2e} | "
                     f"ETA {_fmt_eta(remaining) if remaining is not None else '--'}"
                     + (f" | {progress_text(metrics)}" if "heldout_loss" in metrics else ""))
                advice = data_wait.advice(metrics, data_cpus=cfg.data.actors_max * cfg.data.actor_cpus,
                                          actors_max=cfg.data.actors_max)
                if advice and metrics.get("device_views_s", 0.0) > 0.25 * metrics.get("data_wait_s", 0.0):
                    advice += (f" Of the last window's {metrics['data_wait_s']:.1f} s of data wait, "
                               f"{metrics['device_views_s']:.1f} s was the views' device part on this worker "
                               f"({metrics['device_views_s_per_batch']:.3f} s per batch), which more actors do not "
                               f"shorten; the method's views_on=actors moves it back to the actors.")
                if advice:
                    _say(f"[rayssl] warning: {advice}")
                warnings = collapse_warnings({k: v for k, v in metrics.items() if k.startswith("health_")})
                # Said when it starts or changes kind (not value), and again every 10 reports while it lasts.
                kinds = [re.sub(r"[\d.]+", "#", w.split(" (")[0]) for w in warnings]
                if warnings and (kinds != last_warnings or reports_since_warning >= 10):
                    for warning in warnings:
                        _say(f"[rayssl] warning: step {step}: {warning}")
                    reports_since_warning = 0
                reports_since_warning += 1
                last_warnings = kinds
            # The local copy goes once uploaded: otherwise every checkpoint stays in the node's /tmp
            # (a paper-size model + AdamW state is ~0.75 GB each).
            ray.train.report(metrics, checkpoint=ckpt_obj, delete_local_checkpoint_after_upload=True)
            last_metrics = metrics
        if final:
            break

    if step < stop:
        raise RuntimeError(
            f"the data stream ended at step {step} before the target {stop}; this is a bug in the dataset "
            f"size computation, please report it")
    if rank == 0 and step >= tc.steps:
        _export(method, model, run_dir, cfg, loop_config.get("card", {}), step, last_metrics)


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
    _say(f"[rayssl] exported backbone ({len(exported.state_dict)} pretrained of {len(state)} tensors) to {export_dir}")
