"""Training checkpoints: one atomic torch file per checkpoint, loaded with weights_only=True."""

from __future__ import annotations

import json
import os
import posixpath
import random
import tempfile
from typing import Any

import fsspec
import numpy as np
import torch

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def write_checkpoint_dir(state: dict[str, Any], meta: dict[str, Any]) -> str:
    """Write `state` into a fresh temp directory atomically (tmp file + rename); return the directory.

    Ray Train then copies the directory to run storage and registers it only once complete, so a
    crash mid-write never leaves a checkpoint that looks valid.
    """
    directory = tempfile.mkdtemp(prefix="rayssl-ckpt-")
    tmp = os.path.join(directory, STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f)
    return directory


def load_checkpoint_dir(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {directory} has no {STATE_FILE}: it is incomplete or not a rayssl checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors/ints only, so `weights_only=True` loading accepts them."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
        "python_version": int(random.getstate()[0]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint_step(run_dir: str) -> int | None:
    """Largest step among the run's complete checkpoints (their meta.json), or None.

    `run_dir` may be local or on object storage (any fsspec URI).
    """
    fs, root = fsspec.core.url_to_fs(run_dir)
    if not fs.isdir(root):
        return None
    steps = []
    for entry in fs.ls(root, detail=False):
        name = posixpath.basename(entry.rstrip("/"))
        meta = posixpath.join(entry, META_FILE)
        if name.startswith("checkpoint") and fs.exists(meta) and fs.exists(posixpath.join(entry, STATE_FILE)):
            with fs.open(meta, "r") as f:
                steps.append(int(json.load(f)["step"]))
    return max(steps) if steps else None
