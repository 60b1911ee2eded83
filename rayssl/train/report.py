"""Rank 0's side of a report: metrics.jsonl, the console line with its ETA, and the warnings a report carries."""

from __future__ import annotations

import json
import os
import posixpath
import re
import sys
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from rayssl.checkpoint import write_text_atomically
from rayssl.config import DataSection
from rayssl.nn.health import collapse_warnings
from rayssl.train.heldout import FirstHeldout, progress_text
from rayssl.train.stall import DataWaitMeter, SteadyEta


def say(message: str) -> None:
    """One progress line to the worker's stdout (forwarded to the driver by Ray).

    Train V2 patches `print` to also log through the root logger, which Ray forwards a second time;
    writing to the process's own stdout prints each line once.
    """
    print(message, file=sys.__stdout__, flush=True)


def write_text(path: str, text: str) -> None:
    """`text` as the whole of the file at `path` (local or any fsspec URL)."""
    with fsspec.open(path, "w") as f:
        f.write(text)


def fmt_eta(seconds: float) -> str:
    """A remaining time as minutes and seconds, e.g. 3m07s."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _read_history(metrics_path: str, step: int) -> list[str]:
    """The lines of metrics.jsonl up to `step`: a resumed run continues the file, dropping what it redoes.

    A last line cut short (the worker killed while appending it) is dropped too: its step comes after
    the checkpoint the run resumes from, so it is redone."""
    try:
        with fsspec.open(metrics_path, "r") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except FileNotFoundError:
        return []
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()
    return [line for line in lines if json.loads(line)["step"] <= step]


class Reporter:
    """What rank 0 writes and says at each report, so the loop only hands it the step's metrics."""

    def __init__(self, run_dir: str, step: int, rank: int, stop: int, data: DataSection,
                 data_wait: DataWaitMeter) -> None:
        self.metrics_path = posixpath.join(run_dir, "metrics.jsonl")
        self.history = _read_history(self.metrics_path, step) if rank == 0 and step > 0 else []
        # A local file grows by one appended line per report; an object store cannot append, so there the
        # whole file is put again (each put replaces the object at once).
        fs, self.local_path = fsspec.core.url_to_fs(self.metrics_path)
        self.appends = isinstance(fs, LocalFileSystem)
        if rank == 0 and self.appends and (self.history or os.path.exists(self.local_path)):
            # Start from what this attempt keeps: the lines up to the resumed step (none for a restart
            # from scratch), written whole before the first append.
            write_text_atomically(self.local_path, "".join(line + "\n" for line in self.history))
        # The run's first held-out loss: the reference line of a method with none of its own (on resume, from metrics.jsonl).
        self.first_heldout = FirstHeldout([json.loads(line) for line in self.history])
        self.stop, self.data, self.data_wait = stop, data, data_wait
        self.eta = SteadyEta()
        self.last_warnings: list[str] = []
        self.reports_since_warning = 0

    def record(self, metrics: dict[str, Any], losses: dict[str, torch.Tensor], step: int) -> None:
        """Adds the first held-out reference to `metrics` (in place: Train reports them so), appends them to
        metrics.jsonl, and says the console line and any stall or collapse warning."""
        self.first_heldout.annotate(metrics)
        line = json.dumps(metrics)
        self.history.append(line)
        if self.appends:
            with open(self.local_path, "a") as f:
                f.write(line + "\n")
        else:
            write_text(self.metrics_path, "\n".join(self.history) + "\n")
        say(self.console_line(metrics, losses, step))
        advice = self.stall_advice(metrics)
        if advice:
            say(f"[rayssl] warning: {advice}")
        self.say_collapse(metrics, step)

    def console_line(self, metrics: dict[str, Any], losses: dict[str, torch.Tensor], step: int) -> str:
        """The report's progress line: loss and its terms, throughput, data wait, lr, ETA, held-out progress."""
        remaining = self.eta.update(step, self.stop)
        terms = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in losses and k != "loss")
        return (f"[rayssl] step {step}/{self.stop} | loss {metrics['loss']:.4f} ({terms}) | "
                f"{metrics['samples_per_s']:.2f} samples/s {metrics['crops_per_s']:.1f} crops/s | "
                f"data wait {metrics['data_wait_pct']:.0f}% | lr {metrics['lr']:.2e} | "
                f"ETA {fmt_eta(remaining) if remaining is not None else '--'}"
                + (f" | {progress_text(metrics)}" if "heldout_loss" in metrics else ""))

    def stall_advice(self, metrics: dict[str, Any]) -> str | None:
        """The data-stall warning, naming the views' device part when it took a good share of the wait."""
        advice = self.data_wait.advice(metrics, data_cpus=self.data.actors_max * self.data.actor_cpus,
                                       actors_max=self.data.actors_max)
        if advice and metrics.get("device_views_s", 0.0) > 0.25 * metrics.get("data_wait_s", 0.0):
            advice += (f" Of the last window's {metrics['data_wait_s']:.1f} s of data wait, "
                       f"{metrics['device_views_s']:.1f} s was the views' device part on this worker "
                       f"({metrics['device_views_s_per_batch']:.3f} s per batch), which more actors do not "
                       f"shorten; the method's views_on=actors moves it back to the actors.")
        return advice

    def say_collapse(self, metrics: dict[str, Any], step: int) -> None:
        """Collapse warnings, said when they start or change kind (not value), and again every 10 reports while they last."""
        warnings = collapse_warnings({k: v for k, v in metrics.items() if k.startswith("health_")})
        kinds = [re.sub(r"[\d.]+", "#", w.split(" (")[0]) for w in warnings]
        if warnings and (kinds != self.last_warnings or self.reports_since_warning >= 10):
            for warning in warnings:
                say(f"[rayssl] warning: step {step}: {warning}")
            self.reports_since_warning = 0
        self.reports_since_warning += 1
        self.last_warnings = kinds
