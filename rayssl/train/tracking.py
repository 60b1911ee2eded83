"""Run tracking in the tools users already run: TensorBoard event files in every run folder, MLflow when asked.

Logging happens on the Ray Train controller (a `UserCallback`, on the driver's node) from the
metrics rank 0 reports, so a worker restart or a node loss does not lose or duplicate the logger:
TensorBoard's writer purges steps past the resumed checkpoint, and a resumed run continues the same
MLflow run (its id is kept in the run folder's `mlflow.json`). The driver opens the MLflow run
(config as params) before training and attaches the run folder's files as artifacts after it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import posixpath
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import ray.train

from rayssl.config import RunConfig

TENSORBOARD_DIR = "tensorboard"
MLFLOW_FILE = "mlflow.json"
# Run-folder files attached to the MLflow run when training ends (those that exist).
MLFLOW_ARTIFACTS = ("README.md", "config.yaml", "loss.png", "summary.json", "metrics.jsonl", "online_probe.json")
_MLFLOW_PARAM_BATCH = 100  # MLflow accepts at most 100 params per log_batch call
_MLFLOW_PARAM_CHARS = 6000  # and at most 6000 characters per value

# Metric name -> TensorBoard tag: grouped so TensorBoard shows one section per kind.
_TB_GROUPS = {"lr": "optim/lr", "grad_norm": "optim/grad_norm", "samples_per_s": "throughput/samples_per_s",
              "crops_per_s": "throughput/crops_per_s", "step_time_s": "throughput/step_time_s",
              "data_wait_pct": "data/wait_pct", "data_wait_s": "data/wait_s", "compute_s": "data/compute_s",
              "data_cpu_s_per_sample": "data/cpu_s_per_sample", "data_cores_needed": "data/cores_needed",
              "worker_peak_rss_mb": "health/worker_peak_rss_mb", "gpu_peak_mem_mb": "health/gpu_peak_mem_mb"}
_NOT_LOGGED = {"step", "epoch", "time_s"}


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numeric metrics of one report (NaN grad norms when clipping is off are dropped)."""
    out = {}
    for key, value in metrics.items():
        if key in _NOT_LOGGED or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


def tensorboard_tag(key: str) -> str:
    """loss terms under loss/, the rest grouped by kind (optim/, throughput/, data/, health/, heldout/, probe/, method/)."""
    if key in _TB_GROUPS:
        return _TB_GROUPS[key]
    if key.startswith("probe"):
        return f"probe/{key}"
    if key.startswith("heldout_"):
        return f"heldout/{key.removeprefix('heldout_')}"
    if key.startswith("health_"):
        return f"health/{key.removeprefix('health_')}"
    if key == "loss" or "loss" in key or key in ("pred", "reg", "local", "neighbor", "ncc", "smooth", "restore"):
        return f"loss/{key}"
    return f"method/{key}"


def absolute_tracking_uri(uri: str) -> str:
    """A local MLflow store named relative to the working directory (sqlite:///mlflow.db, ./mlruns)
    made absolute, so mlflow.json and a resume from another folder point at the same store."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:") and not uri.startswith("file://"):
        return pathlib.Path(os.path.abspath(uri.removeprefix("file:"))).as_uri()
    if ":" not in uri:  # a plain folder: MLflow's file store
        return os.path.abspath(uri)
    return uri


def mlflow_experiment_name(cfg: RunConfig) -> str:
    """MLFLOW_EXPERIMENT_NAME when set (MLflow's own variable), else rayssl-<method>."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"rayssl-{cfg.method}"


def resolve_mlflow_uri(uri: str | None, run_dir: str | None = None) -> str | None:
    """--mlflow URI, else the URI a resumed run logged to, else MLFLOW_TRACKING_URI, else None (MLflow off).
    Local stores come back absolute (`absolute_tracking_uri`)."""
    if uri:
        return absolute_tracking_uri(uri)
    if run_dir is not None:
        recorded = read_mlflow_record(run_dir)
        if recorded:
            return absolute_tracking_uri(recorded["tracking_uri"])
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return absolute_tracking_uri(uri) if uri else None


def read_mlflow_record(run_dir: str) -> dict[str, Any] | None:
    fs, path = fsspec.core.url_to_fs(posixpath.join(run_dir, MLFLOW_FILE))
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def _flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_params(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)[:_MLFLOW_PARAM_CHARS]
    return flat


def _mlflow_client(uri: str):
    try:
        from mlflow import MlflowClient
    except ImportError as err:
        raise ValueError(f"MLflow tracking ({uri}) needs the mlflow package: pip install 'rayssl[mlflow]' "
                         f"(or unset MLFLOW_TRACKING_URI)") from err
    return MlflowClient(tracking_uri=uri)


@dataclass
class MlflowRun:
    """The MLflow run a rayssl run logs to."""

    tracking_uri: str
    experiment_id: str
    run_id: str


def _artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts. A local database (sqlite:///path/mlflow.db) would
    default to ./mlruns in whatever folder the run starts from; keep them beside the database
    instead (<db folder>/mlartifacts). Servers and file stores keep their own default (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    database = uri.removeprefix("sqlite:///")
    folder = os.path.dirname(os.path.abspath(database))
    return pathlib.Path(folder, "mlartifacts").as_uri()


def start_mlflow_run(run_dir: str, cfg: RunConfig, uri: str) -> MlflowRun:
    """Open (or, for a resumed run, reopen) the run's MLflow run and log the resolved config as params."""
    from mlflow.entities import Param

    uri = absolute_tracking_uri(uri)
    client = _mlflow_client(uri)
    record = read_mlflow_record(run_dir)
    if record and absolute_tracking_uri(record.get("tracking_uri") or "") == uri:
        run = MlflowRun(uri, record["experiment_id"], record["run_id"])
        client.update_run(run.run_id, status="RUNNING")
        logged = client.get_run(run.run_id).data.params
    else:
        experiment_name = mlflow_experiment_name(cfg)
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = (experiment.experiment_id if experiment else
                         client.create_experiment(experiment_name, artifact_location=_artifact_location(uri)))
        created = client.create_run(experiment_id, run_name=cfg.name,
                                    tags={"rayssl.run_dir": run_dir, "rayssl.method": cfg.method,
                                          "rayssl.profile": str(cfg.profile)})
        run = MlflowRun(uri, experiment_id, created.info.run_id)
        logged = {}
        with fsspec.open(posixpath.join(run_dir, MLFLOW_FILE), "w") as f:
            json.dump({"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run.run_id}, f, indent=2)
    # A resumed run may change a value (e.g. a longer train.steps); MLflow params are immutable, so
    # the first value stays and the run folder's config.yaml (an artifact) holds the new one.
    params = [Param(k, v) for k, v in _flat_params(cfg.to_yaml_dict()).items() if k not in logged]
    for i in range(0, len(params), _MLFLOW_PARAM_BATCH):
        client.log_batch(run.run_id, params=params[i:i + _MLFLOW_PARAM_BATCH])
    experiment_name = client.get_experiment(run.experiment_id).name
    print(f"[rayssl] MLflow: logging to run {run.run_id} of experiment {experiment_name} at {uri}")
    return run


def check_tracking(run_dir: str, mlflow_uri: str | None, resumed: bool) -> str | None:
    """The MLflow URI the run will log to (None = off), checked before Ray starts: a URI without the
    mlflow package installed is a ValueError now, not after the cluster and the run folder are up."""
    uri = resolve_mlflow_uri(mlflow_uri, run_dir if resumed else None)
    if uri and importlib.util.find_spec("mlflow") is None:
        raise ValueError(f"MLflow tracking ({uri}) needs the mlflow package: pip install 'rayssl[mlflow]' "
                         f"(or drop --mlflow / unset MLFLOW_TRACKING_URI)")
    return uri


def start_tracking(run_dir: str, cfg: RunConfig, mlflow_uri: str | None, resumed: bool) -> MlflowRun | None:
    """The MLflow run this run logs to (opened or reopened), or None when MLflow is off."""
    uri = resolve_mlflow_uri(mlflow_uri, run_dir if resumed else None)
    return start_mlflow_run(run_dir, cfg, uri) if uri else None


def finish_mlflow_run(run_dir: str, run: MlflowRun, status: str) -> None:
    """Attach the run folder's plot, summary, config and export (weights + model card) and close the MLflow run."""
    client = _mlflow_client(run.tracking_uri)
    with tempfile.TemporaryDirectory() as scratch:
        local = run_dir
        if not _is_local(run_dir):  # MLflow uploads local files: fetch the small ones first
            fs, path = fsspec.core.url_to_fs(run_dir)
            for name in (*MLFLOW_ARTIFACTS, "export"):
                if fs.exists(posixpath.join(path, name)):
                    fs.get(posixpath.join(path, name), os.path.join(scratch, name), recursive=True)
            local = scratch
        for name in MLFLOW_ARTIFACTS:
            if os.path.exists(os.path.join(local, name)):
                client.log_artifact(run.run_id, os.path.join(local, name))
        if os.path.isdir(os.path.join(local, "export")):
            client.log_artifacts(run.run_id, os.path.join(local, "export"), artifact_path="export")
    mlflow_status = {"finished": "FINISHED", "failed": "FAILED"}.get(status, "KILLED")
    client.set_terminated(run.run_id, status=mlflow_status)


def log_online_probe(run_dir: str, summary: dict[str, Any], mlflow_run: MlflowRun | None) -> None:
    """The online probe's points (scored after their steps were reported) to TensorBoard and MLflow."""
    if not summary.get("points"):
        return
    tracker = TrackingCallback(run_dir, start_step=0, mlflow_run=mlflow_run, hparams=False)  # no purge: earlier files stay
    for point in summary["points"]:
        tracker.log({"step": point["step"], "probe_score": point["score"], "probe_random": summary["random_init"],
                     "probe_gain": point["gain"]})
    tracker.close()


def _hparam_values(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flattened config values TensorBoard's hparams accept (numbers, text, bools; the rest as text)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_hparam_values(value, prefix=f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def write_hparams(writer: Any, run_dir: str) -> None:
    """The run's config.yaml into TensorBoard: the HPARAMS tab (every resolved value, beside the loss
    and held-out loss) and a `config` text entry with the file as written."""
    import yaml
    from torch.utils.tensorboard.summary import hparams

    fs, path = fsspec.core.url_to_fs(posixpath.join(run_dir, "config.yaml"))
    if not fs.exists(path):
        return
    with fs.open(path, "r") as f:
        text = f.read()
    config = yaml.safe_load(text) or {}
    metrics = {tensorboard_tag("loss"): float("nan"), tensorboard_tag("heldout_loss"): float("nan")}
    # The three summaries add_hparams writes, but into this run's own event file (add_hparams would
    # open a second run in a sub-folder); the metrics are the scalars this run logs under those tags.
    for summary in hparams(_hparam_values(config), metrics):
        writer.file_writer.add_summary(summary)
    writer.add_text("config", "```yaml\n" + text + "\n```", global_step=0)


class TrackingCallback(ray.train.UserCallback):
    """Ray Train callback (runs on the controller): each report of rank 0 goes to TensorBoard and MLflow."""

    def __init__(self, run_dir: str, start_step: int, mlflow_run: MlflowRun | None = None, hparams: bool = True) -> None:
        self.run_dir = run_dir
        self.start_step = start_step
        self.mlflow_run = mlflow_run
        self.hparams = hparams and not start_step  # a resumed run's event files hold them already
        self._writer = None
        self._scratch: str | None = None
        self._client = None
        self._heldout_layout = False

    def _tensorboard(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            if _is_local(self.run_dir):
                log_dir = posixpath.join(self.run_dir.removeprefix("file://"), TENSORBOARD_DIR)
            else:  # written locally, copied to the run folder after each report
                self._scratch = tempfile.mkdtemp(prefix="rayssl-tb-")
                log_dir = self._scratch
            # purge_step: after a resume, TensorBoard hides the steps logged past the checkpoint.
            self._writer = SummaryWriter(log_dir=log_dir, purge_step=self.start_step + 1 if self.start_step else None)
            if self.hparams:
                write_hparams(self._writer, self.run_dir)
        return self._writer

    def log(self, metrics: dict[str, Any]) -> None:
        step = int(metrics.get("step", 0))
        values = numeric_metrics(metrics)
        writer = self._tensorboard()
        for key, value in values.items():
            writer.add_scalar(tensorboard_tag(key), value, global_step=step)
        self._layout_heldout(metrics)
        writer.flush()
        if self._scratch is not None:
            fs, path = fsspec.core.url_to_fs(posixpath.join(self.run_dir, TENSORBOARD_DIR))
            fs.put(self._scratch + "/", path, recursive=True)
        if self.mlflow_run is not None:
            from mlflow.entities import Metric

            if self._client is None:
                self._client = _mlflow_client(self.mlflow_run.tracking_uri)
            timestamp = int(time.time() * 1000)
            self._client.log_batch(self.mlflow_run.run_id,
                                   metrics=[Metric(k, v, timestamp, step) for k, v in values.items()])

    def _layout_heldout(self, metrics: dict[str, Any]) -> None:
        """Once a report holds a held-out reference line: one Custom Scalars chart with the held-out
        curve and its line (chance, identity prediction or the first value), so they read together."""
        from rayssl.train.heldout import reference_line

        found = None if self._heldout_layout else reference_line(metrics)
        if found is None:
            return
        line, curve, kind, label = found
        tags = [tensorboard_tag(curve), tensorboard_tag(line)]
        if curve != "heldout_loss":
            tags.insert(0, tensorboard_tag("heldout_loss"))
        self._tensorboard().add_custom_scalars(
            {"held-out": {f"held-out objective against {kind}": ["Multiline", tags]}})
        self._heldout_layout = True

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics:
            self.log(metrics[0])  # rank 0's report already holds the mean over ranks

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
