"""Data-stall accounting for the training loop: time waiting for batches vs computing, and advice when data starves training."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

# Data wait above this share of a window's time means the data actors cannot keep up.
STALL_THRESHOLD = 0.10
# Data wait the sizing advice aims for (the GPU check reports cores for this target too).
TARGET_WAIT = 0.05


def cores_needed(cpu_s_per_sample: float, samples_per_compute_s: float, target_wait: float = TARGET_WAIT) -> float:
    """Data-actor cores that deliver samples as fast as the trainer consumes them with at most `target_wait` waiting.

    With no waiting the trainer consumes `samples_per_compute_s`; allowing a share w of waiting it
    consumes (1 - w) of that, and each sample costs `cpu_s_per_sample` of an actor's CPU.
    """
    return cpu_s_per_sample * samples_per_compute_s * (1.0 - target_wait)


@dataclass
class DataWaitMeter:
    """Per-report window of one worker's batch-fetch wait, plus a rolling stall check.

    Iterate `meter.timed(batches)` instead of `batches`: it times each fetch and takes the data
    actors' per-sample CPU column out of the batch. At each report, `window(elapsed_s, samples)`
    returns the report's fields (the rest of the window's time was compute) and starts a new one.
    """

    world_size: int = 1
    stall_windows: int = 3  # windows the warning averages over, so one slow fetch does not trigger it
    cpu_column: str = "build_cpu_s"
    wait_s: float = 0.0
    build_cpu_s: float = 0.0
    built: int = 0
    windows: int = 0
    _warned_at: int = 0
    _recent: deque = field(default_factory=deque)

    def timed(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        iterator = iter(batches)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.wait_s += time.perf_counter() - started
            cpu = batch.pop(self.cpu_column, None)
            if cpu is not None:
                self.build_cpu_s += float(cpu.sum())
                self.built += int(cpu.numel()) if hasattr(cpu, "numel") else len(cpu)
            yield batch

    def window(self, elapsed_s: float, samples: int) -> dict[str, float]:
        """data_wait_pct, data_wait_s, compute_s of this worker's window of `elapsed_s` seconds in which
        `samples` samples were trained (all workers) and, when the actors measured it, the data CPU
        seconds per sample and the data-actor cores needed to keep data wait under 5 %."""
        wait = min(self.wait_s, elapsed_s)
        compute = max(elapsed_s - wait, 0.0)
        out = {"data_wait_pct": 100.0 * wait / elapsed_s if elapsed_s > 0 else 0.0,
               "data_wait_s": wait, "compute_s": compute}
        if self.built:
            per_sample = self.build_cpu_s / self.built
            out["data_cpu_s_per_sample"] = per_sample
            if compute > 0:
                out["data_cores_needed"] = cores_needed(per_sample, samples / compute)
        self.windows += 1
        if self.windows > 1:  # the first window holds the pipeline's start-up, not a steady stall
            self._recent.append((wait, elapsed_s))
            while len(self._recent) > self.stall_windows:
                self._recent.popleft()
        self.wait_s = self.build_cpu_s = 0.0
        self.built = 0
        return out

    def advice(self, fields: dict[str, float], data_cpus: float, actors_max: int) -> str | None:
        """The stall warning (see `stall_advice`) at most once every `stall_windows` windows."""
        if self.windows - self._warned_at < self.stall_windows and self._warned_at > 0:
            return None
        message = stall_advice(self.recent_wait_fraction(), fields, data_cpus, actors_max)
        if message:
            self._warned_at = self.windows
        return message

    def recent_wait_fraction(self) -> float:
        """Data-wait share over the last `stall_windows` windows after the first."""
        wait = sum(w for w, _ in self._recent)
        total = sum(t for _, t in self._recent)
        return wait / total if total > 0 else 0.0


class SteadyEta:
    """Remaining time from the steady-state step time: the clock starts after the first step
    (model build, worker start-up and the pipeline's first batch are not counted)."""

    def __init__(self) -> None:
        self.start_time: float | None = None
        self.start_step = 0

    def update(self, step: int, stop: int) -> float | None:
        now = time.perf_counter()
        if self.start_time is None:
            self.start_time, self.start_step = now, step
            return None
        per_step = (now - self.start_time) / max(step - self.start_step, 1)
        return (stop - step) * per_step


def stall_advice(wait_fraction: float, fields: dict[str, float], data_cpus: float, actors_max: int) -> str | None:
    """A warning with what to change when the trainer waited more than STALL_THRESHOLD for data, else None."""
    if wait_fraction <= STALL_THRESHOLD:
        return None
    message = (f"data wait {100 * wait_fraction:.0f} % of the last windows (> {100 * STALL_THRESHOLD:.0f} %): "
               f"the data actors cannot keep up with training.")
    per_sample = fields.get("data_cpu_s_per_sample")
    needed = fields.get("data_cores_needed")
    if per_sample is not None and needed is not None:
        message += (f" Building one sample costs {per_sample:.3f} CPU-s, so feeding training at full speed "
                    f"takes ~{needed:.1f} cores of data actors; this run reserves {data_cpus:g} "
                    f"(data.actors_max={actors_max}).")
    message += (" Raise data.actors_max (and data.actor_cpus) if this machine has idle cores, "
                "or add CPU nodes to the cluster (cluster.yaml's data node type).")
    return message
