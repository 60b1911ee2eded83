"""Training checkpoints: one atomic torch file per checkpoint, loaded with weights_only=True."""

from __future__ import annotations

import json
import os
import posixpath
import random
import tempfile
from typing import Any, Callable

import fsspec
import numpy as np
import torch

STATE_FILE = "state.pt"
META_FILE = "meta.json"

# Fault-injection point, None in production (one comparison per checkpoint): called with the state
# file, written but not yet renamed into place, and the step. tests/faults/sitecustomize.py sets it
# in the processes of a run that tests/test_checkpoint_kill.py kills mid-write.
before_state_commit: Callable[[str, int], None] | None = None


def write_text_atomically(path: str, text: str) -> None:
    """`text` as the whole of the local file at `path`, swapped in at once (tmp file + rename), so a
    reader or a kill never meets a half-written file."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_checkpoint_dir(state: dict[str, Any], meta: dict[str, Any]) -> str:
    """Write `state` into a fresh temp directory atomically (tmp file + rename); return the directory.

    Ray Train then copies the directory to run storage and registers it only once complete, so a
    crash mid-write never leaves a checkpoint that looks valid.
    """
    directory = tempfile.mkdtemp(prefix="rayssl-ckpt-")
    tmp = os.path.join(directory, STATE_FILE + ".tmp")
    torch.save(state, tmp)
    if before_state_commit is not None:
        before_state_commit(tmp, int(meta.get("step", -1)))
    os.replace(tmp, os.path.join(directory, STATE_FILE))
    # The state's size lets a reader tell a complete copy on run storage from one cut short by a
    # kill during Train's upload (the directory appears there before every byte has arrived).
    meta = {**meta, "state_bytes": os.path.getsize(os.path.join(directory, STATE_FILE))}
    with open(os.path.join(directory, META_FILE + ".tmp"), "w") as f:
        json.dump(meta, f)
    os.replace(os.path.join(directory, META_FILE + ".tmp"), os.path.join(directory, META_FILE))
    return directory


def load_weights_file(path: str) -> dict[str, Any]:
    """A state_dict from a weights file (`.safetensors`, else torch's format with `weights_only=True`);
    a truncated or corrupt file is a ValueError naming it, not a zip/pickle traceback."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - zip, pickle and safetensors each raise their own kinds
        raise ValueError(f"{path}: cannot read the weights ({type(err).__name__}: {err}); the file is truncated or "
                         f"corrupt: export it again from its run (rayssl export RUN) or copy it again") from None


def load_export_folder(folder: str, weights: str | None = None) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(model card, pretrained tensors, weights path) of an export folder: the weights file its card names
    (or `weights`), without the card's "initialized" key group. An export holds every key of its network;
    those the method did not pretrain are at a seeded init, not weights worth keeping."""
    card_path = os.path.join(folder, "model_card.json")
    with open(card_path) as f:
        card = json.load(f)
    path = weights or os.path.join(folder, card.get("weights", "backbone.pt"))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: the weights named by {card_path} are missing")
    initialized = tuple(card.get("key_groups", {}).get("initialized", []))
    state = {k: v for k, v in load_weights_file(path).items() if not (initialized and k.startswith(initialized))}
    return card, state, path


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


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, URI) of the run's complete checkpoint folders, newest step first.

    Complete = meta.json parses and state.pt has the size meta.json recorded: a folder cut short
    by a kill during the copy to run storage is never chosen. `run_dir` may be local or any
    fsspec URI (s3://...). Checkpoints are read from the run folder itself rather than from what
    Train's controller registered, which lags a report by up to its poll interval (2 s).
    """
    fs, root = fsspec.core.url_to_fs(run_dir)
    if not fs.isdir(root):
        return []
    protocol = run_dir.split("://", 1)[0] + "://" if "://" in run_dir else ""
    found = []
    for entry in fs.ls(root, detail=False):
        if not posixpath.basename(entry.rstrip("/")).startswith("checkpoint_"):
            continue
        try:
            with fs.open(posixpath.join(entry, META_FILE), "r") as f:
                meta = json.load(f)
            size = fs.size(posixpath.join(entry, STATE_FILE))
        except (OSError, ValueError):  # missing or half-copied files
            continue
        if "state_bytes" in meta and size != meta["state_bytes"]:
            continue
        found.append((int(meta["step"]), protocol + entry if protocol and "://" not in entry else entry))
    return sorted(found, key=lambda item: item[0], reverse=True)


def latest_checkpoint_step(run_dir: str) -> int | None:
    """Largest step among the run's complete checkpoints, or None."""
    found = complete_checkpoints(run_dir)
    return found[0][0] if found else None


def load_newest_state(run_dir: str, registered: Any = None) -> dict[str, Any] | None:
    """State of the newest complete checkpoint: the run folder's or `registered` (Train's), whichever is newer.

    A folder that fails to load (corrupt despite its size) is reported and the next older one is
    tried. Returns None when there is none (a fresh run).
    """
    candidates = complete_checkpoints(run_dir)
    for step, uri in candidates:
        try:
            with fsspec.open(posixpath.join(uri, STATE_FILE), "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - fall back to an older checkpoint, say so
            print(f"[rayssl] checkpoint {uri} (step {step}) does not load ({type(err).__name__}: {err}); "
                  f"trying an older one", flush=True)
    if registered is not None:
        with registered.as_directory() as directory:
            return load_checkpoint_dir(directory)
    return None
