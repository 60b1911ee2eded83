"""The console of `rayssl pretrain` when a run fails on Ray's side: the error in rayssl's words, Ray's output in the
run folder's ray.log (the clean console of a finished run: tests/test_docs_commands.py runs the README's command)."""

import json
import os
import shutil

from helpers import MLSSCL_TINY, assert_clean_console, corrupt_volume, run_cli


def test_a_failed_run_says_why_in_rayssls_words_and_keeps_rays_output_in_the_run_folder(ray_local, tiny_store,
                                                                                      tmp_path):
    store = shutil.copytree(tiny_store, tmp_path / "bad.zarr")
    volumes = sorted(d for d in os.listdir(store) if d.startswith("phantom-"))
    for volume in volumes:  # every volume unreadable: the first batch fails, in a data actor
        corrupt_volume(store, volume)
    address = ray_local.get_runtime_context().gcs_address
    proc = run_cli(["pretrain", "--method", "mlsscl", "--data", str(store), "--steps", "2", "--out", "runs",
                    "--name", "bad", "--set", "train.max_failures=0", *[f"--set={o}" for o in MLSSCL_TINY]], cwd=tmp_path, ray_address=address)
    console = proc.stdout + proc.stderr
    run_dir = tmp_path / "runs" / "bad"
    assert proc.returncode == 1, console
    # rayssl's words: the volume and chunk, the fix, and where the full story is.
    error_line = next(line for line in proc.stderr.splitlines() if line.startswith("rayssl pretrain: error:"))
    assert "phantom-" in error_line and "data.on_error=skip" in error_line, console
    assert f"traceback and Ray's output: {run_dir / 'ray.log'}" in proc.stderr, console
    assert f"Ray's own output: {run_dir / 'ray.log'}" in proc.stdout.splitlines()[1], console
    assert_clean_console(console, str(run_dir / "ray.log"))
    with open(run_dir / "ray.log") as f:
        log = f.read()
    assert "Traceback" in log and "rayssl: the run failed:" in log, log[-3000:]
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["status"] == "failed" and summary["ray_log"] == str(run_dir / "ray.log")


def test_a_train_failure_is_summarised_by_its_workers_own_messages():
    """Ray Train's WorkerGroupError carries every rank's traceback; the console gets each distinct last line once."""
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from rayssl.runtime import error_summary

    nan = "NonFiniteLossError: non-finite loss at step 3; lower train.lr"
    # What Train puts in worker_failures: each rank's error, whose text ends with the exception's own line.
    rank_error = RuntimeError(f'Traceback (most recent call last):\n  File "loop.py", line 260, in train\n{nan}')
    err = WorkerGroupError("[Rank 0]\nTraceback ...\n" + nan, {0: rank_error, 1: rank_error})
    assert error_summary(err) == f"{nan} (rank 0, 1)"
    assert error_summary(ControllerError(ValueError("no placement\nfor 4 GPUs"))) == "for 4 GPUs"
    assert error_summary(ValueError("plain")) == "plain"


def test_rays_error_listener_lines_go_to_the_log_file(ray_local, tmp_path, capfd):
    """Ray's error listener prints the raylet's warnings (e.g. "8 PYTHON worker processes have been started",
    seen on the console of a run in CI) through `print_to_stdstream` directly, past the worker-line dispatcher:
    a real message published through the GCS reaches ray.log, not the console, and the printer is put back."""
    import time

    import ray._private.worker as ray_worker
    from ray._private.utils import publish_error_to_driver

    from rayssl.runtime import RayOutputToFile

    log = tmp_path / "ray.log"
    before = ray_worker.print_to_stdstream
    with RayOutputToFile(str(log)) as ray_output:
        ray_output.take_worker_output()
        publish_error_to_driver("rayssl_test", "WARNING: 8 PYTHON worker processes have been started (a test)",
                                gcs_client=ray_worker.global_worker.gcs_client)
        deadline = time.monotonic() + 30
        while "worker processes have been started" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    assert "(raylet) WARNING: 8 PYTHON worker processes have been started (a test)" in log.read_text()
    out, err = capfd.readouterr()
    assert "worker processes" not in out + err, out + err
    assert ray_worker.print_to_stdstream is before
