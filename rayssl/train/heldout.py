"""The objective on fixed samples the run never trains on: a low-noise learning curve beside the per-step loss.

At batch 2 the per-step loss is mostly the noise of which crops a step drew (VoCo's overlap labels,
GVSL's pairs), so its smoothed curve can stay flat while the objective improves. The driver builds
`train.heldout_samples` samples once, from the training volumes but at sample indices no training
step reaches (other crops and views), and every rank evaluates the method's own loss on them every
`train.heldout_every` steps (at reports) in train mode (the loss is defined on batch statistics), without
gradients and without touching BatchNorm running statistics or method state (queues and momentum
targets change only in `after_step`). benchmarks/heldout_objective.py measured the same curve
offline (benchmarks/README.md).

A queue method's held-out loss uses its LIVE queue as negatives, whose keys change as the queue fills
and ages, so its level is not comparable across steps. Beside it, the method's `heldout_reference`
hook (rayssl/methods/base.py) scores the same forward outputs against a reference that does not move:
each contrastive term against fixed negatives (the target keys of the other held-out samples, K =
samples - 1, chance ln(1 + K) per term; the method asks for enough samples with
`heldout_reference_samples`), or the loss of a trivial prediction. A method with no reference of its
own is read against its run's first held-out loss. `reference_line` says which curve is read against
which line; metrics.jsonl, TensorBoard, loss.png, summary.json and the progress line all use it.
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
# The run's first held-out loss, recorded on every held-out row of a method with no reference of its own.
FIRST_KEY = "heldout_first"
# (line key, curve read against it, kind, label): the first of these a metrics row holds is its reference line.
REFERENCE_LINES: tuple[tuple[str, str, str, str], ...] = (
    ("heldout_chance", "heldout_fixed_total", "chance", "chance: ln(1 + K) per term, K fixed held-out negatives"),
    ("heldout_identity", "heldout_loss", "identity", "identity prediction (the network does nothing)"),
    (FIRST_KEY, "heldout_loss", "first", "first held-out value (step-1 reference)"),
)


class HeldoutBatches(list):
    """The held-out micro-batches: the first `live` are the `train.heldout_samples` the held-out loss
    averages over; the rest are extra fixed samples a method's reference needs (its negatives)."""

    def __init__(self, batches: Sequence[dict[str, np.ndarray]] = (), live: int | None = None) -> None:
        super().__init__(batches)
        self.live = len(self) if live is None else live

    def __reduce__(self):  # pickles (ray.put) with its `live` count
        return (HeldoutBatches, (list(self), self.live))


def heldout_every(tc: TrainSection) -> int:
    """Steps between held-out evaluations: `train.heldout_every` (else about ten points per run),
    rounded up to a multiple of `train.report_every` (it is evaluated at reports)."""
    every = tc.heldout_every or max(1, tc.steps // 10)
    return math.ceil(every / tc.report_every) * tc.report_every


def heldout_due(step: int, stop: int, tc: TrainSection, first_report: bool) -> bool:
    """At a report: true at a worker group's first report, every `heldout_every` steps, and at the last step."""
    return tc.heldout_samples > 0 and (first_report or step % heldout_every(tc) == 0 or step >= stop)


def reference_samples(method_name: str) -> int:
    """Fixed held-out samples the method's `heldout_reference` needs (0: the configured ones suffice)."""
    from rayssl.methods import get_method_class

    return int(getattr(get_method_class(method_name), "heldout_reference_samples", 0))


def build_heldout_batches(volumes: Sequence[VolumeInfo], plan_fn: Callable, views_fn: Callable, cfg: RunConfig, *,
                          read_dtype: str | None, samples_per_step: int | None, global_batch: int,
                          repeats: np.ndarray | None = None, extra_samples: int | None = None) -> HeldoutBatches:
    """`ceil(heldout_samples / batch_size)` micro-batches of views (the held-out loss's), then as many
    more as make `extra_samples` samples in all (default: what the method's reference needs,
    `reference_samples`), built on the driver with the run's planner (step-shared plans: each batch is
    the first micro-batch of its own step group). The first batches do not depend on the extra ones.
    Raises what the data path raises for unreadable volumes (the caller decides)."""
    tc = cfg.train
    if tc.heldout_samples <= 0:
        return HeldoutBatches()
    live = math.ceil(tc.heldout_samples / tc.batch_size)
    wanted = reference_samples(cfg.method) if extra_samples is None else extra_samples
    total = max(live, math.ceil(wanted / tc.batch_size))
    builder = ViewBuilder(volumes, plan_fn, views_fn, seed=cfg.seed, samples_per_volume=cfg.data.samples_per_volume,
                          on_error=cfg.data.on_error, read_dtype=read_dtype, repeats=repeats,
                          samples_per_step=samples_per_step)
    first = HELDOUT_FIRST_SAMPLE - HELDOUT_FIRST_SAMPLE % global_batch  # a whole step group
    batches = []
    for j in range(total):
        samples = [builder.build_sample(first + j * global_batch + i) for i in range(tc.batch_size)]
        batches.append({key: np.stack([np.asarray(s[key]) for s in samples]) for key in samples[0]})
    return HeldoutBatches(batches, live=live)


def running_norm_stats(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) of every buffer of the model: the running statistics of its norm layers
    (BatchNorm's, rayssl.nn.norm.RunningCentre's) and anything else a training-mode forward updates."""
    return [(buffer, buffer.detach().clone()) for buffer in model.buffers()]


def restore_running_norm_stats(saved: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
    for buffer, copy in saved or []:
        buffer.copy_(copy)


# The method's `heldout_reference(model, batches, outputs)` (rayssl/methods/base.py).
ReferenceFn = Callable[[torch.nn.Module, Sequence[dict[str, torch.Tensor]], Sequence[dict[str, torch.Tensor]]],
                       dict[str, float]]


def evaluate_heldout(model: torch.nn.Module, loss_fn: Callable[[dict, dict], dict[str, torch.Tensor]],
                     batches: Sequence[dict[str, Any]], device: torch.device,
                     autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
                     reference_fn: ReferenceFn | None = None) -> dict[str, float]:
    """{"heldout_<term>": mean over the live batches (`HeldoutBatches.live`, else all)} of the method's
    loss terms, plus, with `reference_fn` (the method's `heldout_reference`), {"heldout_<key>"} of what
    it returns given every batch and the live batches' outputs (it forwards what else it needs). The
    model is left exactly as it was (train mode, running statistics and the RNG restored). Every rank
    must call it at the same step: a model may use collectives in its forward (DrasCLR's shuffled BatchNorm)."""
    live = getattr(batches, "live", len(batches))
    saved = running_norm_stats(model)
    was_training = model.training
    model.train()
    totals: dict[str, float] = {}
    reference: dict[str, float] = {}
    try:
        # fork_rng: a forward that draws random numbers (DrasCLR's BatchNorm shuffle) must not shift the
        # training stream, or a resumed run (which evaluates at its first report) would diverge.
        cuda = [device] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            tensors = [{k: torch.as_tensor(v).to(device) for k, v in batch.items()}
                       for batch in (batches if reference_fn is not None else batches[:live])]
            outputs = []
            for batch in tensors[:live]:
                with autocast():
                    outputs.append(model(batch))
                    losses = loss_fn(outputs[-1], batch)
                for key, value in losses.items():
                    totals[key] = totals.get(key, 0.0) + float(value.detach())
            if reference_fn is not None:
                with autocast():
                    reference = {f"{PREFIX}{k}": float(v) for k, v in reference_fn(model, tensors, outputs).items()}
    finally:
        restore_running_norm_stats(saved)
        model.train(was_training)
    return {**{f"{PREFIX}{k}": v / live for k, v in totals.items()}, **reference}


def reference_line(row: dict[str, Any]) -> tuple[str, str, str, str] | None:
    """(line key, curve key, kind, label) of the reference a metrics row holds, or None."""
    for line, curve, kind, label in REFERENCE_LINES:
        if line in row and curve in row:
            return line, curve, kind, label
    return None


class FirstHeldout:
    """The run's first held-out loss (read back from metrics.jsonl on resume): the reference line of a
    method whose `heldout_reference` gives none, added to its held-out rows as `heldout_first`."""

    def __init__(self, history: Sequence[dict[str, Any]] = ()) -> None:
        self.value = next((float(row["heldout_loss"]) for row in history if "heldout_loss" in row), None)

    def annotate(self, metrics: dict[str, Any]) -> None:
        if "heldout_loss" not in metrics or any(line in metrics for line, *_ in REFERENCE_LINES[:-1]):
            return
        if self.value is None:
            self.value = float(metrics["heldout_loss"])
        metrics[FIRST_KEY] = self.value


def progress_text(metrics: dict[str, Any]) -> str:
    """The progress line's held-out part: "held-out 5.21, chance 8.35" (with the live-queue loss
    beside a fixed-negative curve), "" on rows without a held-out evaluation."""
    if "heldout_loss" not in metrics:
        return ""
    found = reference_line(metrics)
    if found is None:
        return f"held-out loss {metrics['heldout_loss']:.4f}"
    line, curve, kind, _ = found
    name = {"chance": "chance", "identity": "identity prediction", "first": "first"}[kind]
    text = f"held-out {metrics[curve]:.4f}, {name} {metrics[line]:.4f}"
    if curve != "heldout_loss":
        text += f" (fixed negatives; live-queue loss {metrics['heldout_loss']:.4f})"
    return text


def reference_summary(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's reference fields for the held-out rows `points`: which curve is read against
    which line, its first and last value, the line, and how far below the line the curve ends (%)."""
    found = reference_line(points[-1]) if points else None
    if found is None:
        return {}
    line, curve, kind, label = found
    rows = [p for p in points if curve in p and line in p]
    first, last = rows[0], rows[-1]
    reference = float(last[line])
    below = 100.0 * (reference - float(last[curve])) / abs(reference) if reference else None
    return {"curve": curve, "curve_first": first[curve], "curve_last": last[curve], "reference_kind": kind,
            "reference_label": label, "reference": reference, "below_reference_pct": below}
