"""The run folder a user reads: config, metrics, loss curves, summary, checkpoints, export, and a guide."""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
import posixpath
import shutil
import tempfile
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
| `config.yaml` | the resolved configuration of this run, without its name, so that it re-runs as a new run with a fresh name: `rayssl pretrain --config {run_dir}/config.yaml` |
| `rayssl_run.json` | marks the folder as a rayssl run (name, method, profile): `--resume` trains only into such folders |
| `metrics.jsonl` | one JSON line per reported step: loss terms, lr, samples/s, crops/s, step time, `data_wait_pct` (share of the window the worker waited for its next batch), `data_cpu_s_per_sample` and `data_cores_needed` (data-actor cores that keep data wait under 5 %), representation health (`health_spread`, `health_effective_rank`, `health_dead_fraction`), on held-out steps `heldout_loss` and `heldout_<term>` (`train.heldout_samples` fixed samples, every `train.heldout_every` steps) with the line to read them against: `heldout_fixed_total` / `heldout_fixed_<term>` against `heldout_chance` (queue methods: fixed negatives, chance ln(1 + K) per term), `heldout_identity` (the identity prediction's loss) or `heldout_first` (the run's first held-out loss), and on probed steps `probe_score` / `probe_random` / `probe_gain` |
| `loss.png` | loss curves (raw and smoothed, total and each term) and the held-out loss (the objective on fixed samples never trained on: the curve to read for a trend) with its labelled chance / reference line; throughput with data wait %; with `--probe`, the probe's gain over random init (pretrained minus random-init score, zero line = random init) against the step |
| `online_probe.json` | with `--probe`: the linear probe of each probed checkpoint and of the random-init network (store, metric, points, gains) |
| `summary.json` | status, wall time, peak memory, mean data wait, held-out loss first -> last and against its chance / reference line (`below_reference_pct`), final metrics, skipped volumes, the run's warnings (`warnings`) and where Ray's own output went (`ray_log`) |
| `warnings.json` | when the run warned about its setup (e.g. BatchNorm layers normalising over too few rows per step): the step and each warning with its fix, as printed on the console |
| `startup.json`, `startup_worker.json` | wall-clock marks of the start-up (driver: process start, checks, Ray up, volumes prepared, held-out samples, fit; rank 0: worker up, data stream ready, first batch, first step), read by `benchmarks/startup.py` |
| `ray.log` | Ray's own output during the run (its warnings, its workers' and actors' lines, tracebacks of a failure), kept off the console |
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


def rerun_config(cfg: RunConfig, run_dir: str) -> str:
    """config.yaml: the resolved config with `name: null`, so `rayssl pretrain --config` of it starts
    a new run (a fresh name) instead of stopping at this existing folder; `--resume` takes the name
    from the folder."""
    header = (f"# rayssl run {cfg.name}: the resolved configuration. Re-run as a new run (fresh name):\n"
              f"#   rayssl pretrain --config {run_path(run_dir, 'config.yaml')}\n"
              f"# Continue this run: rayssl pretrain --resume {run_dir}\n")
    return header + yaml.safe_dump({**cfg.to_yaml_dict(), "name": None}, sort_keys=False)


def start_run_folder(run_dir: str, cfg: RunConfig, stores: Sequence[str], volumes: int,
                     resumed_from: int | None) -> None:
    fs, path = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(path, exist_ok=True)
    write_run_file(run_dir, "config.yaml", rerun_config(cfg, run_dir))
    write_run_file(run_dir, "README.md", GUIDE.format(name=cfg.name, method=cfg.method, profile=cfg.profile,
                                                      steps=cfg.train.steps,
                                                      stores=", ".join(f"`{s}`" for s in stores), volumes=volumes,
                                                      run_dir=run_dir))
    # The first line a run prints says where Ray's own output went (rayssl/runtime.py RayOutputToFile).
    if resumed_from is not None:
        print(f"[rayssl] resuming {run_dir} from step {resumed_from} (Ray's own output: {ray_log_path(run_dir)})")
    else:
        print(f"[rayssl] run folder: {run_dir} (Ray's own output: {ray_log_path(run_dir)})")


def ray_log_path(run_dir: str) -> str:
    """The local file that holds Ray's own output for this run: `ray.log` in a local run folder; for a
    run folder in object storage, a file of that name in the local temp folder (a log is appended to)."""
    from rayssl.runtime import RAY_LOG_NAME

    if _is_local(run_dir):
        return os.path.join(fsspec.core.url_to_fs(run_dir)[1], RAY_LOG_NAME)
    return os.path.join(tempfile.gettempdir(), f"rayssl-{posixpath.basename(run_dir.rstrip('/'))}-{RAY_LOG_NAME}")


# Written when rayssl creates a run folder: `--resume` trains only into folders that hold it
# (or, for runs made before it existed, a rayssl config.yaml beside complete checkpoints).
RUN_MARKER = "rayssl_run.json"


def _is_local(run_dir: str) -> bool:
    return "://" not in run_dir or run_dir.startswith("file://")


def claim_run_folder(run_dir: str, cfg: RunConfig) -> None:
    """Create the run folder atomically (os.mkdir fails when it exists) with its ownership marker.

    A second run with the same name gets FileExistsError at once; a parent that cannot be written
    is a ValueError naming it. On object storage there is no atomic create: the folder is checked
    and the marker written (a narrow race remains there).
    """
    marker = json.dumps({"rayssl_run": 1, "name": cfg.name, "method": cfg.method, "profile": cfg.profile,
                         "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
                        indent=2)
    taken = FileExistsError(f"run folder {run_dir} already exists; resume it with `rayssl pretrain --resume "
                            f"{run_dir}` or choose another --name")
    if not _is_local(run_dir):
        if run_file_exists(run_dir):
            raise taken
        write_run_file(run_dir, RUN_MARKER, marker)
        return
    path = run_dir.removeprefix("file://")
    parent = os.path.dirname(path.rstrip("/")) or "."
    try:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(path)
    except (FileExistsError, NotADirectoryError):
        if os.path.isdir(path):
            raise taken from None
        raise ValueError(f"cannot create run folder {path}: {_first_file(path)} is a file, not a folder; "
                         f"choose another --out") from None
    except OSError as err:
        raise ValueError(f"cannot create run folder {path}: {err.strerror} (is {parent} writable?); choose a "
                         f"writable --out (or train.storage_path) or fix its permissions") from None
    try:
        write_run_file(path, RUN_MARKER, marker)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def _first_file(path: str) -> str:
    """The first existing non-folder on the way to `path` (what blocks creating it)."""
    probe = os.path.abspath(path)
    parts = []
    while probe and not os.path.exists(probe):
        probe, tail = os.path.split(probe)
        parts.append(tail)
    return probe


def release_run_folder(run_dir: str) -> None:
    """Remove a run folder this process claimed, when the run fails before training starts
    (it then holds only the marker, config.yaml, README.md and mlflow.json: nothing of value)."""
    fs, path = fsspec.core.url_to_fs(run_dir)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def run_owner(run_dir: str) -> dict[str, Any]:
    """Method and profile of the rayssl run in `run_dir`; ValueError when rayssl did not make it.

    The marker (RUN_MARKER) decides. A folder without it (made before the marker existed) counts as
    a run when its config.yaml names a method and profile and it holds a complete checkpoint
    (`checkpoint_*/state.pt` of the size its meta.json records).
    """
    if run_file_exists(run_dir, RUN_MARKER):
        try:
            with fsspec.open(run_path(run_dir, RUN_MARKER), "r") as f:
                owner = json.load(f)
            if not (isinstance(owner, dict) and owner.get("rayssl_run") and owner.get("method") and owner.get("profile")):
                raise ValueError("method or profile missing")
        except ValueError as err:
            raise ValueError(f"--resume {run_dir}: its {RUN_MARKER} is damaged ({err}); restore it (fields "
                             f"rayssl_run, name, method, profile) or start a new run") from None
        return owner
    from rayssl.checkpoint import latest_checkpoint_step

    legacy: Any = None
    if run_file_exists(run_dir, "config.yaml"):
        try:
            with fsspec.open(run_path(run_dir, "config.yaml"), "r") as f:
                legacy = yaml.safe_load(f)
        except yaml.YAMLError:
            legacy = None
    if (isinstance(legacy, dict) and isinstance(legacy.get("method"), str) and isinstance(legacy.get("profile"), str)
            and isinstance(legacy.get("train"), dict) and latest_checkpoint_step(run_dir) is not None):
        return {"rayssl_run": 1, "name": posixpath.basename(run_dir.rstrip("/")), "method": legacy["method"],
                "profile": legacy["profile"], "legacy": True}
    raise ValueError(f"--resume {run_dir}: not a rayssl run folder (no {RUN_MARKER}, and no config.yaml with "
                     f"complete checkpoints); rayssl resumes only folders it made and leaves this one untouched. "
                     f"Start a new run instead (`rayssl pretrain --name NAME`, or --out for another parent folder)")


def check_resume(run_dir: str, method: str | None, profile: str | None) -> dict[str, Any]:
    """The run's owner record, after refusing a `--method` / `--profile` other than the run's own."""
    owner = run_owner(run_dir)
    for flag, asked, own in (("--method", method, owner["method"]), ("--profile", profile, owner["profile"])):
        if asked is not None and asked != own:
            raise ValueError(f"--resume {run_dir}: this run was made with {flag} {own}, not {asked}; a resumed run "
                             f"keeps its own recipe. Resume without {flag} (or with {flag} {own}), or start a new "
                             f"run with {flag} {asked}")
    return owner


def existing_result(run_dir: str) -> RunResult:
    """The result recorded in a run folder's summary.json, read without writing anything."""
    summary: dict[str, Any] = {}
    if run_file_exists(run_dir, "summary.json"):
        with fsspec.open(run_path(run_dir, "summary.json"), "r") as f:
            summary = json.load(f)
    return RunResult(run_dir=run_dir, status=summary.get("status", "finished"), steps=summary.get("steps", 0),
                     wall_time_s=summary.get("wall_time_s", 0.0), peak_memory_mb=summary.get("peak_memory_mb", 0.0),
                     metrics=summary.get("final_metrics") or {}, skipped=summary.get("skipped_volumes") or {},
                     error=summary.get("error"))


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
    wait; and, with an online probe, its gain over random init against the step (`draw_probe`)."""
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
    draw_heldout(axes[0], metrics)
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
        draw_probe(axes[2], online_probe, max(steps))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_run_file(run_dir, "loss.png", buffer.getvalue())
    return run_path(run_dir, "loss.png")


# Half the smallest y-span of the probe panel: a gain of -0.0015 must not fill the axis as a trend.
PROBE_MIN_HALF_SPAN = 0.02


def probe_set_name(online_probe: dict[str, Any]) -> str:
    """The probe set as the user named it (`demo`, `mni152`, a store's file name), not the cache's hashed path."""
    named = {"demo": "demo phantoms", "mni152": "MNI152 tissue"}
    given = online_probe.get("probe_set")
    if given:
        return named.get(str(given), posixpath.basename(str(given).rstrip("/")).removesuffix(".zarr"))
    return posixpath.basename(str(online_probe.get("store", "")).rstrip("/")).removesuffix(".zarr") or "probe store"


def draw_probe(ax: Any, online_probe: dict[str, Any], last_step: int) -> None:
    """The online probe's gain over random init (pretrained minus random-init score) against the step,
    with a zero line (random init) and a y-range of at least +-PROBE_MIN_HALF_SPAN, so the sign and
    size of the gain read right; without a random-init score, the raw score on the same minimum span."""
    points = online_probe["points"]
    metric = online_probe.get("metric") or "probe score"
    random_init = online_probe.get("random_init")
    steps = [p["step"] for p in points]
    if random_init is not None:
        values = [p["score"] - random_init for p in points]
        ax.axhline(0.0, color="tab:gray", linestyle="--", label=f"random init ({metric} {random_init:.4f})")
        ax.plot(steps, values, "o-", color="tab:blue", label=f"pretrained - random init (last {values[-1]:+.4f})")
        ax.set_ylabel(f"{metric}: gain over random init")
        centre = 0.0
        title = f"gain {values[-1]:+.4f} at step {steps[-1]}"
    else:
        values = [p["score"] for p in points]
        ax.plot(steps, values, "o-", color="tab:blue", label="pretrained")
        ax.set_ylabel(metric)
        centre = (max(values) + min(values)) / 2
        title = f"{metric} {values[-1]:.4f} at step {steps[-1]}"
    half = max(PROBE_MIN_HALF_SPAN, *(abs(v - centre) * 1.15 for v in values))
    ax.set_ylim(centre - half, centre + half)
    ax.set_xlabel("step")
    ax.set_title(f"linear probe on {probe_set_name(online_probe)}:\n{title}", fontsize="medium")
    ax.set_xlim(0, last_step * 1.05)
    ax.legend(fontsize="small")


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
    plot_losses(run_dir, metrics, loss_keys, online_probe and {**online_probe, "probe_set": cfg.eval.probe_store})
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
        # warnings.json (written by the training loop) and Ray's log, named where a reader of the summary looks.
        "warnings": _read_warnings(run_dir),
        "ray_log": ray_log_path(run_dir),
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
        if h.get("reference_kind"):
            below = h["below_reference_pct"]
            print(f"[rayssl] held-out {h['curve_first']:.4f} -> {h['curve_last']:.4f} against {h['reference_label']} "
                  f"{h['reference']:.4f}" + (f": {abs(below):.0f} % {'below' if below >= 0 else 'above'} it at the end"
                                             if below is not None else ""))
    print(f"[rayssl] {status}: {summary['steps']}/{cfg.train.steps} steps in {wall_time_s:.1f} s, "
          f"peak memory +{peak_memory_mb:.0f} MiB, {summary['mean_crops_per_s']:.1f} crops/s, "
          f"data wait {summary['mean_data_wait_pct']:.0f} %. Run folder: {run_dir}")
    return RunResult(run_dir=run_dir, status=status, steps=summary["steps"], wall_time_s=wall_time_s,
                     peak_memory_mb=peak_memory_mb, metrics=last, skipped=skipped,
                     error=str(error) if error else None)


def _read_warnings(run_dir: str) -> dict[str, Any] | None:
    """warnings.json of the run ({"file", "step", "warnings"}), or None when the run gave no such warning."""
    if not run_file_exists(run_dir, "warnings.json"):
        return None
    with fsspec.open(run_path(run_dir, "warnings.json"), "r") as f:
        return {"file": "warnings.json", **json.load(f)}


def heldout_summary(metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """First and last held-out loss of a run (and their change), and the curve read against its
    reference line (rayssl/train/heldout.py `reference_summary`), or None without held-out points."""
    from rayssl.train.heldout import reference_summary  # torch and Ray: not for `rayssl pretrain --resume`'s checks

    points = [m for m in metrics if "heldout_loss" in m]
    if not points:
        return None
    first, last = points[0], points[-1]
    return {"first_step": first["step"], "first_loss": first["heldout_loss"], "last_step": last["step"],
            "last_loss": last["heldout_loss"], "change": last["heldout_loss"] - first["heldout_loss"],
            "points": len(points), **reference_summary(points)}


def draw_heldout(ax: Any, metrics: list[dict[str, Any]]) -> list[str]:
    """The held-out loss, the fixed-negative curve where the method has one, and the reference line
    (chance, identity prediction or the first held-out value), labelled, on `ax`; returns the labels."""
    from rayssl.train.heldout import reference_line

    heldout = [(m["step"], m["heldout_loss"]) for m in metrics if "heldout_loss" in m]
    if not heldout:
        return []
    found = reference_line([m for m in metrics if "heldout_loss" in m][-1])
    live = "held-out loss (fixed samples" + (", live queue)" if found and found[1] != "heldout_loss" else ")")
    labels = [live]
    ax.plot(*zip(*heldout), color="tab:purple", marker="o", linewidth=2, label=live)
    if found is None:
        return labels
    line, curve, _, label = found
    if curve != "heldout_loss":
        points = [(m["step"], m[curve]) for m in metrics if curve in m]
        labels.append("held-out, fixed negatives")
        ax.plot(*zip(*points), color="tab:green", marker="s", linewidth=2, label=labels[-1])
    value = [m[line] for m in metrics if line in m][-1]
    labels.append(f"{label} = {value:.3f}")
    ax.axhline(value, color="tab:green" if curve != "heldout_loss" else "tab:purple", linestyle=":", linewidth=1.5,
               label=labels[-1])
    return labels


def _mean(metrics: list[dict[str, Any]], key: str) -> float:
    values = [m[key] for m in metrics[1:] or metrics if key in m]  # first window includes start-up
    return round(sum(values) / len(values), 3) if values else 0.0
