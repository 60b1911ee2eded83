"""Linear probes during pretraining: checkpoints scored by Ray tasks beside the training step, against random init.

The driver watches the run folder for complete checkpoints at probe steps (`eval.probe_every`, and
the last step), reads each one's backbone into the object store (so a checkpoint that rotates out
later does not matter) and submits a probe task that reserves `eval.probe_cpus`; training never
waits for it. The probe is `probe_score`, the score Tune trials use: the voxel probe (Dice) or the
patch probe (balanced accuracy) on all fit crops, eval crops scored, one fixed seed, so every point
and the random-init baseline share the same crops, voxels and head initialisation. A single point
carries no interval; `rayssl probe` gives scores with 95 % intervals over repeats.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rayssl.checkpoint import complete_checkpoints, write_text_atomically
from rayssl.config import RunConfig
from rayssl.eval.features import RunWeights, initial_weights, load_run_weights
from rayssl.eval.probe import ProbeConfig, ProbeData, load_probe_data, probe_score, resolve_probe_store

POLL_S = 1.0
PROBE_FILE = "online_probe.json"


def online_probe_config(cfg: RunConfig) -> ProbeConfig:
    """The probe settings of an online probe (Tune's: eval crops, `eval.probe_crops` per volume)."""
    threads = max(1, math.floor(cfg.eval.probe_cpus))
    return ProbeConfig(eval_on="crops", crops_per_volume=cfg.eval.probe_crops, threads=threads, seed=cfg.seed)


def probe_steps_due(step: int, cfg: RunConfig) -> bool:
    """Whether the checkpoint of `step` is probed: every `eval.probe_every` steps (default every
    checkpoint) and the run's last step."""
    every = cfg.eval.probe_every or cfg.train.checkpoint_every
    last = min(cfg.train.stop_after or cfg.train.steps, cfg.train.steps)
    return step % every == 0 or step == last


def _score(weights: RunWeights, data: ProbeData, probe_cfg: dict[str, Any]) -> dict[str, float]:
    t0 = time.perf_counter()
    score = probe_score(weights, data, ProbeConfig(**probe_cfg))
    return {**score, "probe_time_s": round(time.perf_counter() - t0, 2)}


@dataclass
class ProbePoint:
    step: int
    score: float
    metric: str
    time_s: float


@dataclass
class OnlineProbe:
    """Started by the pretraining driver before `fit()`, finished after it (see the module docstring)."""

    run_dir: str
    cfg: RunConfig
    start_step: int = 0
    points: list[ProbePoint] = field(default_factory=list)
    random_score: float | None = None
    errors: list[str] = field(default_factory=list)

    def start(self) -> None:
        import ray

        if "://" in self.run_dir:
            raise ValueError(f"eval.probe_store: the online probe reads checkpoints from a local run folder; "
                             f"{self.run_dir} is remote. Probe afterwards with `rayssl probe` instead")
        self.store = resolve_probe_store(self.cfg.eval.probe_store)
        self.probe_cfg = online_probe_config(self.cfg)
        data = load_probe_data(self.store, fit_fraction=self.probe_cfg.fit_fraction, seed=self.probe_cfg.seed)
        self._data_ref = ray.put(data)
        self._task = ray.remote(_score).options(num_cpus=self.cfg.eval.probe_cpus, max_retries=0)
        self._pending: dict[Any, int] = {}  # object ref -> step (0 = the random-init baseline)
        self._seen: set[int] = set()  # checkpoints already scanned (those up to start_step belong to earlier segments)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._submit(initial_weights(self.cfg, seed=self.cfg.seed), 0)
        print(f"[rayssl] online probe: {self.store} ({len(data.fit)} fit / {len(data.eval)} eval volumes), "
              f"at steps divisible by {self.cfg.eval.probe_every or self.cfg.train.checkpoint_every} and the last, "
              f"{self.cfg.eval.probe_cpus:g} CPU per probe task", flush=True)
        self._thread = threading.Thread(target=self._watch, name="rayssl-online-probe", daemon=True)
        self._thread.start()

    def _submit(self, weights: RunWeights, step: int) -> None:
        ref = self._task.remote(weights, self._data_ref, asdict(self.probe_cfg))
        with self._lock:
            self._pending[ref] = step

    def _scan(self) -> None:
        """Submit a probe for every new complete checkpoint at a probe step."""
        for step, path in sorted(complete_checkpoints(self.run_dir)):
            if step in self._seen or step <= self.start_step:
                continue
            self._seen.add(step)
            if not probe_steps_due(step, self.cfg):
                continue
            try:
                weights = load_run_weights(self.run_dir, source="checkpoint", checkpoint=path)
            except (OSError, RuntimeError, ValueError) as err:  # rotated out or cut short: skip this point
                self.errors.append(f"step {step}: checkpoint {path} unreadable ({err})")
                continue
            self._submit(weights, step)

    def _collect(self, timeout: float) -> None:
        import ray

        with self._lock:
            refs = list(self._pending)
        if not refs:
            return
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for ref in done:
            with self._lock:
                step = self._pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a failed probe is reported, training goes on
                self.errors.append(f"step {step}: probe failed ({type(err).__name__}: {err})")
                print(f"[rayssl] online probe at step {step} failed: {err}", flush=True)
                continue
            metric = next(k for k in result if k.startswith("probe_") and k not in ("probe_score", "probe_time_s"))
            if step == 0:
                self.random_score = float(result["probe_score"])
                print(f"[rayssl] online probe: random init scores {metric.removeprefix('probe_')} "
                      f"{self.random_score:.4f}", flush=True)
                continue
            point = ProbePoint(step, float(result["probe_score"]), metric.removeprefix("probe_"), result["probe_time_s"])
            self.points.append(point)
            against = (f" (random init {self.random_score:.4f}, gain {point.score - self.random_score:+.4f})"
                       if self.random_score is not None else "")
            print(f"[rayssl] online probe at step {step}: {point.metric} {point.score:.4f}{against}, "
                  f"{point.time_s:.0f} s", flush=True)

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._scan()
                self._collect(timeout=0)
            except Exception as err:  # noqa: BLE001 - never take the run down with the probe
                self.errors.append(f"watcher: {type(err).__name__}: {err}")

    def finish(self, failed: bool = False, timeout_s: float = 1800.0) -> dict[str, Any]:
        """Probe the checkpoints written since the last scan, wait for every probe (or cancel them when
        the run failed), and return the summary that goes into summary.json and the model card."""
        import ray

        self._stop.set()
        self._thread.join()
        if failed:
            with self._lock:
                for ref in self._pending:
                    ray.cancel(ref, force=True)
                self._pending.clear()
        else:
            self._scan()
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            steps = sorted(s for s in self._pending.values())
            print(f"[rayssl] waiting for {len(steps)} online probe(s) (steps {steps}; 0 = random init)", flush=True)
            self._collect(timeout=30.0)
        if self._pending:
            self.errors.append(f"probes of steps {sorted(self._pending.values())} did not finish in {timeout_s:.0f} s")
        self.points.sort(key=lambda p: p.step)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        best = max(self.points, key=lambda p: p.score) if self.points else None
        return {
            "store": self.store, "metric": self.points[0].metric if self.points else None,
            "random_init": self.random_score,
            "points": [{"step": p.step, "score": p.score,
                        "gain": None if self.random_score is None else p.score - self.random_score,
                        "time_s": p.time_s} for p in self.points],
            "best_step": best.step if best else None,
            "settings": {"eval_on": self.probe_cfg.eval_on, "crops_per_volume": self.probe_cfg.crops_per_volume,
                         "seed": self.probe_cfg.seed, "fit_fraction": self.probe_cfg.fit_fraction},
            "errors": self.errors,
        }


def record(run_dir: str, summary: dict[str, Any]) -> None:
    """Write the online probe into the run folder: online_probe.json, the probe columns of its steps'
    rows in metrics.jsonl (`probe_score`, `probe_random`, `probe_gain`) and the model card."""
    import os

    write_text_atomically(os.path.join(run_dir, PROBE_FILE), json.dumps(summary, indent=2))
    by_step = {p["step"]: p for p in summary["points"]}
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if by_step and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for row in rows:
            point = by_step.get(row.get("step"))
            if point is not None:
                row.update(probe_score=point["score"], probe_random=summary["random_init"], probe_gain=point["gain"])
        write_text_atomically(metrics_path, "".join(json.dumps(row) + "\n" for row in rows))
    card_path = os.path.join(run_dir, "export", "model_card.json")
    if os.path.exists(card_path):
        with open(card_path) as f:
            card = json.load(f)
        card["online_probe"] = {k: summary[k] for k in ("store", "metric", "random_init", "points", "best_step")}
        write_text_atomically(card_path, json.dumps(card, indent=2, default=str))
