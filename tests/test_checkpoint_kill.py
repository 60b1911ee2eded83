"""kill -9 of the driver, and separately of the training worker, while a checkpoint is being written: `--resume` continues from the last complete checkpoint."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from rayssl.checkpoint import complete_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny VoCo of tests/test_train.py.
TINY = ["n_x=2", "n_y=2", "region_size=[64,64,32]", "input_size=32", "num_random_crops=2",
        "unet_features=[4,4,8,8,16,4]", "proj_hidden_dim=32", "proj_dim=32",
        "train.batch_size=1", "data.split=all", "data.actors_max=1", "train.report_every=1",
        "train.checkpoint_every=2"]


@pytest.fixture()
def private_tmp():
    """A private TMPDIR for the run's processes (where the worker stages checkpoints) and RAY_TMPDIR
    (short: socket paths must fit 107 bytes)."""
    path = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(tmp, **extra):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TMPDIR=tmp, RAY_TMPDIR=tmp, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=REPO, **extra)
    return env


def _pretrain(args, env):
    return subprocess.Popen([sys.executable, "-m", "rayssl.cli", "pretrain", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split(")")[-1].split()[0] != "Z"


def _wait_for_marker(proc, tmp, timeout=300):
    """The pid of the process holding checkpoint step 4 half-written (the hook's ".writing" marker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        markers = glob.glob(os.path.join(tmp, "rayssl-ckpt-*", "state.pt.tmp.writing"))
        if markers:
            text = open(markers[0]).read().strip()
            if text:
                return int(text)
        time.sleep(0.05)
    out = proc.communicate(timeout=60)[0] if proc.poll() is not None else ""
    raise AssertionError(f"no checkpoint write was paused (exit {proc.poll()}):\n{out[-3000:]}")


def _metrics_steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


@pytest.mark.slow  # two pretrain subprocesses per case, each starting its own Ray runtime
# 2-4.5 min per case; the choice of checkpoint is also checked without a kill in tests/test_reliability.py (README: Testing)
@pytest.mark.extended
@pytest.mark.parametrize("victim", ["driver", "worker"])
def test_kill_during_checkpoint_write_resumes_from_last_complete(victim, private_tmp, demo_store_path, tmp_path):
    out, run_dir = tmp_path / "runs", str(tmp_path / "runs" / "run")
    sets = [a for s in TINY for a in ("--set", s)]
    common = ["--method", "voco", "--profile", "cpu", "--data", str(demo_store_path), "--out", str(out), *sets]
    # Step 4's checkpoint is held half-written for up to 5 min (the kill lands well within), by
    # tests/faults/sitecustomize.py, which every process of this run imports from PYTHONPATH.
    env = _env(private_tmp, RAYSSL_TEST_CHECKPOINT_PAUSE="4:300")
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests", "faults")])
    proc = _pretrain([*common, "--name", "run", "--steps", "6", "--set", "train.max_failures=0"], env)
    writer = None
    try:
        writer = _wait_for_marker(proc, private_tmp)
        assert writer != proc.pid  # the training worker writes checkpoints, not the driver
        os.kill(proc.pid if victim == "driver" else writer, signal.SIGKILL)
        output = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode != 0, output[-3000:]
    # The driver's Ray runtime goes with it (fate sharing); a lost worker fails the run (max_failures=0).
    deadline = time.monotonic() + 60
    while _pid_alive(writer) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(writer):
        os.kill(writer, signal.SIGKILL)
        pytest.fail(f"the training worker {writer} outlived the {victim} kill by 60 s")

    # Step 2 is complete; step 4 was never published as complete: the half-written file is not chosen.
    assert [step for step, _ in complete_checkpoints(run_dir)] == [2], os.listdir(run_dir)
    assert max(_metrics_steps(run_dir)) in (3, 4)  # killed during step 4's save

    resumed = subprocess.run([sys.executable, "-m", "rayssl.cli", "pretrain", "--resume", run_dir, "--steps", "6"],
                             env=_env(private_tmp), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming {run_dir} from step 2" in resumed.stdout, resumed.stdout[-3000:]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["status"] == "finished" and summary["steps"] == 6, summary
    assert [step for step, _ in complete_checkpoints(run_dir)][0] == 6
    steps = _metrics_steps(run_dir)
    assert steps[-4:] == [3, 4, 5, 6], steps  # steps 3.. redone after step 2's checkpoint
