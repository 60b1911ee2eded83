"""Test-only fault injection for tests/test_checkpoint_kill.py, in every process of the run it kills.

With this folder on PYTHONPATH, Python's `site` imports this module at the start of each process (the
`rayssl pretrain` driver and the Ray workers it starts). With RAYSSL_TEST_CHECKPOINT_PAUSE="STEP:SECONDS"
it arms rayssl.checkpoint's injection point `before_state_commit` as soon as that module is imported:
checkpoint STEP is held half-written on disk for SECONDS (a "<path>.writing" marker with the pid
says when), so the test can kill the process mid-write; then the write completes.
"""

import importlib.abc
import importlib.util
import os
import sys
import time

PAUSE = os.environ.get("RAYSSL_TEST_CHECKPOINT_PAUSE")


def pause_mid_write(path: str, step: int) -> None:
    if int(PAUSE.split(":")[0]) != step:
        return
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with open(path + ".writing", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(float(PAUSE.split(":")[1]))
    with open(path, "wb") as f:
        f.write(data)
    os.remove(path + ".writing")


class _ArmCheckpoint(importlib.abc.MetaPathFinder):
    """Finds rayssl.checkpoint as usual, and sets its injection point once the module has run."""

    def find_spec(self, name, path, target=None):
        if name != "rayssl.checkpoint":
            return None
        sys.meta_path.remove(self)  # the ordinary finders locate the module
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            module.before_state_commit = pause_mid_write

        spec.loader.exec_module = exec_module
        return spec


if PAUSE:
    sys.meta_path.insert(0, _ArmCheckpoint())
