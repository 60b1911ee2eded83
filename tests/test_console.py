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
