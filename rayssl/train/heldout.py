"""The objective on fixed samples the run never trains on: a low-noise learning curve beside the per-step loss.

At batch 2 the per-step loss is mostly the noise of which crops a step drew (VoCo's overlap labels,
GVSL's pairs), so its smoothed curve can stay flat while the objective improves. The driver builds
`train.heldout_samples` samples once, from the training volumes but at sample indices no training
step reaches (other crops and views), and every rank evaluates the method's own loss on them every
`train.heldout_every` steps (at reports) in train mode (the loss is defined on batch statistics), without
gradients and without touching BatchNorm running statistics or method state (queues and momentum
targets change only in `after_step`). benchmarks/heldout_objective.py measured the same curve
offline (benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch

from rayssl.config import RunConfig, TrainSection
from rayssl.data.pipeline import ViewBuilder
from rayssl.data.types import VolumeInfo

# Far beyond any run's training stream (2^40 samples), so no training step ever draws these plans.
HELDOUT_FIRST_SAMPLE = 2**40
PREFIX = "heldout_"


def heldout_every(tc: TrainSection) -> int:
    """Steps between held-out evaluations: `train.heldout_every` (else about ten points per run),
    rounded up to a multiple of `train.report_every` (it is evaluated at reports)."""
    every = tc.heldout_every or max(1, tc.steps // 10)
    return math.ceil(every / tc.report_every) * tc.report_every


def heldout_due(step: int, stop: int, tc: TrainSection, first_report: bool) -> bool:
    """At a report: true at a worker group's first report, every `heldout_every` steps, and at the last step."""
    return tc.heldout_samples > 0 and (first_report or step % heldout_every(tc) == 0 or step >= stop)


def build_heldout_batches(volumes: Sequence[VolumeInfo], plan_fn: Callable, views_fn: Callable, cfg: RunConfig, *,
                          read_dtype: str | None, samples_per_step: int | None, global_batch: int,
                          repeats: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
    """`ceil(heldout_samples / batch_size)` micro-batches of views, built on the driver with the
    run's planner (step-shared plans: each batch is the first micro-batch of its own step group).
    Raises what the data path raises for unreadable volumes (the caller decides)."""
    tc = cfg.train
    if tc.heldout_samples <= 0:
        return []
    builder = ViewBuilder(volumes, plan_fn, views_fn, seed=cfg.seed, samples_per_volume=cfg.data.samples_per_volume,
                          on_error=cfg.data.on_error, read_dtype=read_dtype, repeats=repeats,
                          samples_per_step=samples_per_step)
    first = HELDOUT_FIRST_SAMPLE - HELDOUT_FIRST_SAMPLE % global_batch  # a whole step group
    batches = []
    for j in range(math.ceil(tc.heldout_samples / tc.batch_size)):
        samples = [builder.build_sample(first + j * global_batch + i) for i in range(tc.batch_size)]
        batches.append({key: np.stack([np.asarray(s[key]) for s in samples]) for key in samples[0]})
    return batches


def running_norm_stats(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) of every running statistic of the model's norm layers (BatchNorm and the like)."""
    saved = []
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked):
                if buffer is not None:
                    saved.append((buffer, buffer.detach().clone()))
    return saved


def restore_running_norm_stats(saved: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
    for buffer, copy in saved or []:
        buffer.copy_(copy)


def evaluate_heldout(model: torch.nn.Module, loss_fn: Callable[[dict, dict], dict[str, torch.Tensor]],
                     batches: Sequence[dict[str, Any]], device: torch.device,
                     autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> dict[str, float]:
    """{"heldout_<term>": mean over `batches`} of the method's loss terms; the model is left exactly
    as it was (train mode, running statistics and the RNG restored). Every rank must call it at the same step:
    a model may use collectives in its forward (DrasCLR's shuffled BatchNorm)."""
    saved = running_norm_stats(model)
    was_training = model.training
    model.train()
    totals: dict[str, float] = {}
    try:
        # fork_rng: a forward that draws random numbers (DrasCLR's BatchNorm shuffle) must not shift the
        # training stream, or a resumed run (which evaluates at its first report) would diverge.
        cuda = [device] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            for batch in batches:
                tensors = {k: torch.as_tensor(v).to(device) for k, v in batch.items()}
                with autocast():
                    losses = loss_fn(model(tensors), tensors)
                for key, value in losses.items():
                    totals[key] = totals.get(key, 0.0) + float(value.detach())
    finally:
        restore_running_norm_stats(saved)
        model.train(was_training)
    return {f"{PREFIX}{k}": v / len(batches) for k, v in totals.items()}
