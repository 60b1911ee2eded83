"""The run folder a user reads: config, metrics, loss curves, summary, checkpoints, export, and a guide."""

from __future__ import annotations

import io
import json
import platform
import posixpath
from dataclasses import dataclass, field
from typing import Any, Sequence

import yaml

import fsspec

from rayssl.config import RunConfig


def run_path(run_dir: str, *parts: str) -> str:
    """A path inside the run folder, which may be local or on object storage (s3://, gs://)."""
    return posixpath.join(run_dir, *parts)


def write_run_file(run_dir: str, name: str, data: str | bytes) -> None:
    with fsspec.open(run_path(run_dir, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def run_file_exists(run_dir: str, *parts: str) -> bool:
    fs, path = fsspec.core.url_to_fs(run_path(run_dir, *parts))
    return fs.exists(path)

GUIDE = """# rayssl run {name}

Method **{method}** (profile `{profile}`), {steps} steps, data: {stores} ({volumes} volumes).

| file | what it is |
|---|---|
| `config.yaml` | the resolved configuration of this run (re-run: `rayssl pretrain --config config.yaml`) |
| `metrics.jsonl` | one JSON line per reported step: loss terms, lr, samples/s, crops/s, step time, `data_wait_pct` (share of the window the worker waited for its next batch), `data_cpu_s_per_sample` and `data_cores_needed` (data-actor cores that keep data wait under 5 %), representation health (`health_spread`, `health_effective_rank`, `health_dead_fraction`), on held-out steps `heldout_loss` and `heldout_<term>` (`train.heldout_samples` fixed samples, every `train.heldout_every` steps), and on probed steps `probe_score` / `probe_random` / `probe_gain` |
| `loss.png` | loss curves (raw and smoothed, total and each term) and the held-out loss (the objective on fixed samples never trained on: the curve to read for a trend); throughput with data wait %; with `--probe`, the probe score against the step beside its random-init line |
| `online_probe.json` | with `--probe`: the linear probe of each probed checkpoint and of the random-init network (store, metric, points, gains) |
| `summary.json` | status, wall time, peak memory, mean data wait, held-out loss first -> last, final metrics, skipped volumes |
| `tensorboard/` | TensorBoard event files of the same metrics: `tensorboard --logdir {run_dir}` |
| `mlflow.json` | when the run logs to MLflow (`--mlflow URI` or `MLFLOW_TRACKING_URI`): tracking URI, experiment and run id; a resumed run continues that MLflow run |
| `checkpoint_*/` | Ray Train checkpoints (`state.pt`: model, optimizer, scheduler, step, RNG, method state such as queues) |
| `export/backbone.pt` | the pretrained backbone in the state_dict layout of the MONAI network named in the card |
| `export/model_card.json` | method, config, data manifest hash, steps, spacing/patch size, key groups, how to load |

Resume: `rayssl pretrain --resume {run_dir}`. Evaluate: `rayssl probe {run_dir}`.
"""


@dataclass
class RunResult:
    run_dir: str
    status: str
    steps: int
    wall_time_s: float
    peak_memory_mb: float
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def start_run_folder(run_dir: str, cfg: RunConfig, stores: Sequence[str], volumes: int,
                     resumed_from: int | None) -> None:
    fs, path = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(path, exist_ok=True)
    write_run_file(run_dir, "config.yaml", yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False))
    write_run_file(run_dir, "README.md", GUIDE.format(name=cfg.name, method=cfg.method, profile=cfg.profile,
                                                      steps=cfg.train.steps,
                                                      stores=", ".join(f"`{s}`" for s in stores), volumes=volumes,
                                                      run_dir=run_dir))
    if resumed_from is not None:
        print(f"[rayssl] resuming {run_dir} from step {resumed_from}")
    else:
        print(f"[rayssl] run folder: {run_dir}")


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    if not run_file_exists(run_dir, "metrics.jsonl"):
        return []
    with fsspec.open(run_path(run_dir, "metrics.jsonl"), "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def smooth(values: list[float], alpha: float = 0.2) -> list[float]:
    """Exponential moving average (bias-corrected, so the first points are not pulled towards 0)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = alpha * value + (1 - alpha) * average
        out.append(average / (1 - (1 - alpha) ** i))
    return out


def plot_losses(run_dir: str, metrics: list[dict[str, Any]], loss_keys: list[str],
                online_probe: dict[str, Any] | None = None) -> str | None:
    """loss.png: the loss (raw and smoothed) and each term against the step; throughput and data
    wait; and, with an online probe, the probe score against the step beside its random-init line."""
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probed = bool(online_probe and online_probe.get("points"))
    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 3 if probed else 2, figsize=(16 if probed else 11, 4))
    losses = [m["loss"] for m in metrics]
    axes[0].plot(steps, losses, color="black", alpha=0.25, linewidth=1, label="loss (raw)")
    axes[0].plot(steps, smooth(losses), color="black", linewidth=2, label="loss (smoothed)")
    for key in loss_keys:
        if key != "loss":
            axes[0].plot(steps, smooth([m.get(key, float("nan")) for m in metrics]), label=f"{key} (smoothed)", alpha=0.8)
    heldout = [(m["step"], m["heldout_loss"]) for m in metrics if "heldout_loss" in m]
    if heldout:  # the same objective on fixed samples never trained on (rayssl/train/heldout.py)
        axes[0].plot(*zip(*heldout), color="tab:purple", marker="o", linewidth=2, label="held-out loss (fixed samples)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].set_title("training loss")
    axes[0].legend(fontsize="small")
    axes[1].plot(steps, [m.get("crops_per_s", 0) for m in metrics], label="crops/s")
    axes[1].plot(steps, [m.get("samples_per_s", 0) for m in metrics], label="samples/s")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("per second")
    axes[1].set_title("throughput and data wait")
    handles, labels = axes[1].get_legend_handles_labels()
    if any("data_wait_pct" in m for m in metrics):
        wait_axis = axes[1].twinx()
        wait_axis.plot(steps, [m.get("data_wait_pct") for m in metrics], color="tab:red", linestyle="--",
                       label="data wait %")
        wait_axis.axhline(10, color="tab:red", alpha=0.3, linewidth=1)  # the stall-warning threshold
        wait_axis.set_ylim(0, 100)
        wait_axis.set_ylabel("data wait (% of step time)", color="tab:red")
        extra_handles, extra_labels = wait_axis.get_legend_handles_labels()
        handles, labels = handles + extra_handles, labels + extra_labels
    axes[1].legend(handles, labels)
    if probed:
        points = online_probe["points"]
        axes[2].plot([p["step"] for p in points], [p["score"] for p in points], "o-", color="tab:blue",
                     label="pretrained")
        if online_probe.get("random_init") is not None:
            axes[2].axhline(online_probe["random_init"], color="tab:gray", linestyle="--", label="random init")
        axes[2].set_xlabel("step")
        axes[2].set_ylabel(online_probe.get("metric") or "probe score")
        axes[2].set_title(f"linear probe on {posixpath.basename(str(online_probe.get('store', ''))).removesuffix('.zarr')}")
        axes[2].set_xlim(0, max(steps) * 1.05)
        axes[2].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_run_file(run_dir, "loss.png", buffer.getvalue())
    return run_path(run_dir, "loss.png")


_NON_LOSS = {"step", "epoch", "lr", "grad_norm", "samples_per_s", "crops_per_s", "step_time_s",
             "worker_peak_rss_mb", "time_s", "data_wait_pct", "data_wait_s", "compute_s", "data_cpu_s_per_sample",
             "data_cores_needed", "gpu_peak_mem_mb", "build_cpu_s"}
# Prefixes of reported values that are not training-loss terms (representation health, online probe, held-out objective).
_NON_LOSS_PREFIXES = ("health_", "probe_", "heldout_")


def finish_run_folder(run_dir: str, cfg: RunConfig, wall_time_s: float, peak_memory_mb: float,
                      skipped: dict[str, Any], error: BaseException | None = None,
                      data: dict[str, Any] | None = None, online_probe: dict[str, Any] | None = None) -> RunResult:
    metrics = read_metrics(run_dir)
    loss_keys = [k for k in (metrics[-1] if metrics else {}) if k not in _NON_LOSS and "momentum" not in k
                 and "fill" not in k and not k.startswith(_NON_LOSS_PREFIXES)]
    plot_losses(run_dir, metrics, loss_keys, online_probe)
    last = metrics[-1] if metrics else {}
    status = "failed" if error else ("finished" if last.get("step", 0) >= cfg.train.steps else "stopped")
    exported = run_file_exists(run_dir, "export", "backbone.pt")
    summary = {
        "status": status,
        "error": str(error) if error else None,
        "steps": last.get("step", 0),
        "target_steps": cfg.train.steps,
        "wall_time_s": round(wall_time_s, 2),
        "peak_memory_mb": round(peak_memory_mb, 1),
        "mean_samples_per_s": _mean(metrics, "samples_per_s"),
        "mean_crops_per_s": _mean(metrics, "crops_per_s"),
        "mean_step_time_s": _mean(metrics, "step_time_s"),
        "mean_data_wait_pct": _mean(metrics, "data_wait_pct"),
        "data_cpu_s_per_sample": _mean(metrics, "data_cpu_s_per_sample"),
        "data_cores_needed": _mean(metrics, "data_cores_needed"),
        "heldout": heldout_summary(metrics),
        "final_metrics": last,
        "skipped_volumes": skipped,
        "data": data or {},
        "online_probe": online_probe,
        "exported": exported,
        "host": platform.node(),
    }
    write_run_file(run_dir, "summary.json", json.dumps(summary, indent=2, default=str))
    if skipped:
        total = sum(v["count"] for v in skipped.values())
        print(f"[rayssl] on_error=skip: {total} samples re-planned away from {len(skipped)} unreadable volume(s):")
        for vid, info in skipped.items():
            print(f"  - {vid}: {info['count']}x {info['reason']}")
    if summary["heldout"]:
        h = summary["heldout"]
        print(f"[rayssl] held-out loss (the objective on {cfg.train.heldout_samples} fixed samples never trained on): "
              f"{h['first_loss']:.4f} at step {h['first_step']} -> {h['last_loss']:.4f} at step {h['last_step']} "
              f"({h['change']:+.4f})")
    print(f"[rayssl] {status}: {summary['steps']}/{cfg.train.steps} steps in {wall_time_s:.1f} s, "
          f"peak memory +{peak_memory_mb:.0f} MiB, {summary['mean_crops_per_s']:.1f} crops/s, "
          f"data wait {summary['mean_data_wait_pct']:.0f} %. Run folder: {run_dir}")
    return RunResult(run_dir=run_dir, status=status, steps=summary["steps"], wall_time_s=wall_time_s,
                     peak_memory_mb=peak_memory_mb, metrics=last, skipped=skipped,
                     error=str(error) if error else None)


def heldout_summary(metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """First and last held-out loss of a run (and their change), or None without held-out points."""
    points = [m for m in metrics if "heldout_loss" in m]
    if not points:
        return None
    first, last = points[0], points[-1]
    return {"first_step": first["step"], "first_loss": first["heldout_loss"], "last_step": last["step"],
            "last_loss": last["heldout_loss"], "change": last["heldout_loss"] - first["heldout_loss"],
            "points": len(points)}


def _mean(metrics: list[dict[str, Any]], key: str) -> float:
    values = [m[key] for m in metrics[1:] or metrics if key in m]  # first window includes start-up
    return round(sum(values) / len(values), 3) if values else 0.0
