"""Where the time before step 1 of the README's default `rayssl pretrain --probe` goes, from the run's own marks.

Runs the command as a user does (a subprocess, local Ray runtime) at `--steps` steps and reads the wall-clock
marks the run writes: startup.json (driver: process start, checks, Ray up, volumes prepared, held-out samples,
fit called) and startup_worker.json (rank 0: worker up, model and data stream ready, first batch, first step).

    .venv/bin/python benchmarks/startup.py                 # the default command at 2 steps, on the demo store
    .venv/bin/python benchmarks/startup.py --quick          # smoke run: a 4-volume 64x64x48 store, tiny VoCo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import REPO

# (label, from mark, to mark): the phases of the time before step 1, in order.
PHASES = [
    ("python start, CLI import and parsing", "process_started", "pretrain_called"),
    ("config, store and tracking checks (no Ray)", "pretrain_called", "checks_done"),
    ("Ray init (local runtime)", "checks_done", "ray_ready"),
    ("volume preparation (driver)", "ray_ready", "volumes_prepared"),
    ("held-out samples and dataset planning", "volumes_prepared", "heldout_built"),
    ("trainer built, run folder, tracking", "heldout_built", "fit_called"),
    ("Train controller + worker group start", "fit_called", "worker_started"),
    ("worker: model, optimizer, data stream", "worker_started", "loop_ready"),
    ("first batch (data actors start, first views)", "loop_ready", "first_batch"),
    ("first step (forward, backward)", "first_batch", "first_step"),
]

TINY = ["--set", "n_x=2", "--set", "n_y=2", "--set", "region_size=[64,64,32]", "--set", "input_size=32",
        "--set", "num_random_crops=2", "--set", "unet_features=[4,4,8,8,16,4]", "--set", "proj_hidden_dim=32",
        "--set", "proj_dim=32", "--set", "train.batch_size=1", "--set", "data.split=all",
        "--set", "data.actors_max=1", "--set", "eval.probe_crops=4"]


def run(steps: int, quick: bool, work: str) -> dict:
    argv = [sys.executable, "-m", "rayssl.cli", "pretrain", "--probe", "--steps", str(steps), "--out",
            os.path.join(work, "runs")]
    if quick:
        from datasets_zarr import demo_store

        store = str(demo_store(root=os.path.join(work, "demo"), n=4, shape=(64, 64, 48),
                               spacing=(6.0, 6.0, 20.0 / 3.0), chunks=32))
        argv[argv.index("--probe") + 1:argv.index("--probe") + 1] = [store]
        argv += ["--data", store, *TINY]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # a private local runtime, as the README's command starts
    t0 = time.time()
    proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    (name,) = os.listdir(os.path.join(work, "runs"))
    run_dir = os.path.join(work, "runs", name)
    marks = {}
    for file in ("startup.json", "startup_worker.json"):
        with open(os.path.join(run_dir, file)) as f:
            marks.update(json.load(f))
    return {"command": " ".join(argv[1:]), "wall_s": wall, "marks": marks, "console_lines": len(proc.stdout.splitlines())
            + len(proc.stderr.splitlines())}


def report(result: dict) -> str:
    marks = result["marks"]
    rows = [(label, marks[b] - marks[a]) for label, a, b in PHASES if a in marks and b in marks]
    before_step1 = marks["first_step"] - marks["process_started"]
    lines = [f"command: {result['command']}", f"{'phase':<48} {'s':>7} {'%':>5}"]
    lines += [f"{label:<48} {seconds:7.1f} {100 * seconds / before_step1:5.0f}" for label, seconds in rows]
    lines += [f"{'process start -> step 1 done':<48} {before_step1:7.1f}",
              f"{'whole command (wall)':<48} {result['wall_s']:7.1f}",
              f"console lines: {result['console_lines']}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="steps of the run (default 2)")
    parser.add_argument("--quick", action="store_true", help="a tiny store and VoCo (smoke run)")
    parser.add_argument("--json", help="also write the marks and phases here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rayssl-startup-") as work:
        result = run(args.steps, args.quick, work)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
