"""Optimizer, learning-rate schedule and gradient accumulation of the training loop, built from `train.*`."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import nn

from rayssl.config import RunConfig, TrainSection


def effective_batch(tc: TrainSection) -> int:
    """Samples per optimizer step over the whole run: batch per worker x workers x accumulated micro-batches."""
    return tc.batch_size * tc.num_workers * tc.accumulate


def build_optimizer(params: Iterable[nn.Parameter], tc: TrainSection) -> torch.optim.Optimizer:
    """`train.optimizer` with the settings it uses (the others are ignored, see docs/methods/*.md)."""
    params = list(params)
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, nesterov=tc.nesterov,
                               weight_decay=tc.weight_decay)
    optimizer_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    return optimizer_cls(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                         amsgrad=tc.amsgrad)


def lr_multiplier(schedule: str, warmup_steps: int, total_steps: int,
                  final_fraction: float = 0.0) -> Callable[[int], float]:
    """LR factor per optimizer step: linear warm-up over `warmup_steps` (from 1/warmup to 1), then
    `cosine` decay to `final_fraction` at `total_steps` or `constant` 1."""
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, tc: TrainSection) -> torch.optim.lr_scheduler.LambdaLR:
    """The `train.schedule` LR scheduler, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(tc.schedule, tc.warmup_steps, tc.steps, tc.final_lr_fraction))


def gradient_sync(model: nn.Module, sync: bool) -> ContextManager[Any]:
    """DDP's `no_sync()` for a micro-batch that is not the last of an optimizer step (gradients
    then only accumulate locally and are all-reduced once, with the last micro-batch)."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def concat_outputs(outputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One detached outputs dict for `Method.after_step` from the micro-batches of an optimizer step.

    Per-sample tensors (same trailing shape in every micro-batch) are concatenated along the batch
    axis, so a queue receives every micro-batch's keys once, after the step, as it would from one
    large batch; anything else (scalars) keeps the last micro-batch's value.
    """
    if len(outputs) == 1:
        return outputs[0]
    merged: dict[str, torch.Tensor] = {}
    for key, last in outputs[-1].items():
        values = [o.get(key) for o in outputs]
        if (isinstance(last, torch.Tensor) and last.dim() >= 1
                and all(isinstance(v, torch.Tensor) and v.shape[1:] == last.shape[1:] for v in values)):
            merged[key] = torch.cat([v.detach() for v in values], dim=0)
        else:
            merged[key] = last
    return merged


def resolve_epochs(cfg: RunConfig, samples_per_epoch: int) -> RunConfig:
    """`cfg` with `train.epochs` turned into `train.steps` (ceil(epochs x samples / effective batch)),
    fixed once when a run starts so that the schedule, checkpoints and a resume agree."""
    tc = cfg.train
    if tc.epochs is None:
        return cfg
    steps = max(1, math.ceil(tc.epochs * samples_per_epoch / effective_batch(tc)))
    return cfg.model_copy(update={"train": tc.model_copy(update={"steps": steps, "epochs": None})})


def describe_batch(tc: TrainSection) -> str:
    """The line printed when a run starts: how many samples each optimizer step averages over."""
    return (f"[rayssl] effective batch {effective_batch(tc)} = {tc.batch_size} per worker x {tc.num_workers} "
            f"worker(s) x {tc.accumulate} accumulated micro-batch(es); {tc.steps} optimizer steps, "
            f"{tc.optimizer} lr {tc.lr:g}, {tc.schedule} schedule")


def accumulate_gradients(
    model: nn.Module,
    loss_fn: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    micro_batches: list[dict[str, torch.Tensor]],
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
    autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
    all_ranks_finite: Callable[[bool], bool] = lambda finite: finite,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Forward + backward of the micro-batches of one optimizer step into `.grad`.

    Each micro-batch's loss is divided by their number, so the gradient is that of the mean loss
    over the step, as one batch of all the samples would give for mean-reduced losses (BatchNorm
    statistics stay per micro-batch). DDP all-reduces once, at the last micro-batch. A non-finite
    loss (on any rank: `all_ranks_finite` is the collective check) stops the backward passes; the
    returned mean loss is then non-finite and the caller skips or stops. Returns (mean of each loss
    term, outputs for `Method.after_step`: per-sample tensors concatenated over micro-batches).
    """
    outputs_seen, losses_seen = [], []
    for i, batch in enumerate(micro_batches):
        with gradient_sync(model, sync=i == len(micro_batches) - 1):
            with autocast():
                outputs = model(batch)
                losses = loss_fn(outputs, batch)
            outputs_seen.append(outputs)
            losses_seen.append(losses)
            if not all_ranks_finite(bool(torch.isfinite(losses["loss"].detach()).all())):
                break
            scale(losses["loss"] / len(micro_batches)).backward()
    mean_losses = {k: sum(m[k].detach() for m in losses_seen) / len(losses_seen) for k in losses_seen[-1]}
    return mean_losses, concat_outputs(outputs_seen)
