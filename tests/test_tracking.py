"""Tracking and data-stall reporting of one short `rayssl pretrain` run, stopped and resumed: TensorBoard
event files, the MLflow run read back with MlflowClient (same run after resume), data-wait fields."""

import glob
import json
import os

import pytest

from rayssl.train.stall import DataWaitMeter, cores_needed, stall_advice


@pytest.fixture(scope="module")
def tracked_run(voco_resume_runs):
    """The session's tiny VoCo run of 4 steps, stopped after step 2 while logging to a local MLflow
    database, then resumed with no URI given (tests/conftest.py::voco_resume_runs)."""
    runs = voco_resume_runs
    return runs.resumed, runs.mlflow_uri, runs.mlflow_run_id


@pytest.mark.slow
def test_tensorboard_events_in_the_run_folder(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _, _ = tracked_run
    events = glob.glob(os.path.join(result.run_dir, "tensorboard", "events.out.tfevents.*"))
    assert len(events) == 2  # one writer before, one after the resume
    acc = EventAccumulator(os.path.join(result.run_dir, "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/loss", "optim/lr", "throughput/samples_per_s", "data/wait_pct"} <= tags
    assert sorted({e.step for e in acc.Scalars("loss/loss")}) == [1, 2, 3, 4]
    with open(os.path.join(result.run_dir, "README.md")) as f:
        assert "tensorboard/" in f.read()


@pytest.mark.slow
def test_mlflow_run_is_continued_after_resume(tracked_run):
    from mlflow import MlflowClient

    result, uri, first_id = tracked_run
    client = MlflowClient(tracking_uri=uri)
    with open(os.path.join(result.run_dir, "mlflow.json")) as f:
        assert json.load(f)["run_id"] == first_id
    run = client.get_run(first_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "voco" and run.data.params["train.steps"] == "4"
    assert [m.step for m in client.get_metric_history(first_id, "loss")] == [1, 2, 3, 4]
    assert "data_wait_pct" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(first_id)}
    assert {"loss.png", "summary.json", "config.yaml", "export"} <= artifacts
    assert {a.path for a in client.list_artifacts(first_id, "export")} == {"export/backbone.pt", "export/model_card.json"}
    assert len(client.search_runs([run.info.experiment_id])) == 1
    # Artifacts sit beside the local database, never in ./mlruns of whatever folder the run started from.
    root = os.path.dirname(uri.removeprefix("sqlite:///"))
    assert client.get_experiment(run.info.experiment_id).artifact_location.startswith(f"file://{root}/mlartifacts")
    assert os.path.exists(os.path.join(root, "mlartifacts"))


@pytest.mark.slow
def test_data_wait_in_metrics_and_summary(tracked_run):
    result, _, _ = tracked_run
    with open(os.path.join(result.run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    for m in metrics:
        assert 0 <= m["data_wait_pct"] <= 100 and m["data_cpu_s_per_sample"] > 0 and m["data_cores_needed"] > 0
    summary = json.load(open(os.path.join(result.run_dir, "summary.json")))
    assert 0 <= summary["mean_data_wait_pct"] <= 100 and summary["data_cpu_s_per_sample"] > 0


def test_stall_warning_and_cores_needed():
    import time

    import torch

    meter = DataWaitMeter(stall_windows=2)

    def slow_batches(n, delay):
        for _ in range(n):
            time.sleep(delay)
            yield {"x": torch.zeros(1), "build_cpu_s": torch.tensor([0.2])}

    for batch in meter.timed(slow_batches(1, 0.0)):
        assert "build_cpu_s" not in batch  # the CPU column never reaches the model
    meter.window(1.0, 1)  # the first window (start-up) does not count towards the warning
    for _ in meter.timed(slow_batches(2, 0.05)):
        pass
    fields = meter.window(0.2, 2)
    assert fields["data_wait_pct"] == pytest.approx(50, abs=10)
    assert fields["data_cpu_s_per_sample"] == pytest.approx(0.2)
    # 2 samples in ~0.1 s of compute = 20 samples/s at 0.2 CPU-s each: ~4 cores (95 % of that for 5 % wait).
    assert fields["data_cores_needed"] == pytest.approx(cores_needed(0.2, 2 / fields["compute_s"]))
    advice = meter.advice(fields, data_cpus=0.5, actors_max=1)
    assert advice and "data.actors_max" in advice and "CPU-s" in advice
    assert meter.advice(fields, data_cpus=0.5, actors_max=1) is None  # not repeated every report
    assert stall_advice(0.05, fields, 0.5, 1) is None
