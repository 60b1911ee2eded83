"""Reliability on the local runtime: skipping several bad volumes, resuming from the newest complete checkpoint
(a worker killed mid-checkpoint: tests/test_checkpoint_kill.py)."""

import json
import os

import pytest

from rayssl.config import resolve_config
from rayssl.checkpoint import complete_checkpoints, latest_checkpoint_step, load_newest_state
from rayssl.train.trainer import pretrain

from helpers import MLSSCL_TINY, corrupt_volume


def _cfg(store, out, *extra):
    return resolve_config(method="mlsscl", profile="cpu",
                          overrides=[f"data.store={store}", f"out={out}", *MLSSCL_TINY, *extra])


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def ten_volume_store(tmp_path_factory):
    """10 small CT phantoms (32^3 voxels, chunks 16^3), 3 of them with every image chunk corrupt."""
    from datasets_zarr import demo_store

    store = demo_store(root=tmp_path_factory.mktemp("ten"), n=10, shape=(32, 32, 32), spacing=(6.0, 6.0, 6.0),
                       chunks=16)
    bad = ["phantom-002", "phantom-005", "phantom-007"]
    for group in bad:
        corrupt_volume(store, group)
    return str(store), bad


def test_skip_several_corrupt_volumes_keeps_steps_and_lists_each_once(ray_local, ten_volume_store, tmp_path):
    """3 of 10 volumes unreadable, on_error=skip, more than one epoch: every step runs on a full batch."""
    store, bad = ten_volume_store
    result = pretrain(_cfg(store, tmp_path / "runs", "name=skip3", "train.steps=14", "train.checkpoint_every=14",
                           "data.on_error=skip"))
    assert result.status == "finished" and result.steps == 14
    assert [m["step"] for m in _metrics(result.run_dir)] == list(range(1, 15))
    summary = json.load(open(os.path.join(result.run_dir, "summary.json")))
    assert sorted(summary["skipped_volumes"]) == bad, summary["skipped_volumes"]
    for volume_id, entry in summary["skipped_volumes"].items():
        assert entry["count"] >= 1 and f"chunk {volume_id}/image/c/" in entry["reason"], (volume_id, entry)


def test_resume_picks_the_newest_complete_checkpoint_never_a_partial_one(tmp_path):
    """Run folder as a kill leaves it: step 2 (registered by Train), step 4 (written within Train's poll
    window, never registered), step 6 cut short mid-copy (state.pt shorter than meta.json says)."""
    import shutil

    import torch

    from rayssl.checkpoint import write_checkpoint_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for step in (2, 4, 6):
        written = write_checkpoint_dir({"step": step, "w": torch.full((1000,), float(step))}, {"step": step})
        shutil.move(written, run_dir / f"checkpoint_2026-12-02_19-00-0{step}.000000")
    partial = run_dir / "checkpoint_2026-12-02_19-00-06.000000" / "state.pt"
    partial.write_bytes(partial.read_bytes()[: partial.stat().st_size // 2])
    (run_dir / "checkpoint_2026-12-02_19-00-08.000000").mkdir()  # a folder whose copy had not begun

    assert [step for step, _ in complete_checkpoints(str(run_dir))] == [4, 2]
    assert latest_checkpoint_step(str(run_dir)) == 4
    state = load_newest_state(str(run_dir))
    assert state["step"] == 4 and float(state["w"][0]) == 4.0
    # A folder whose size matches but whose bytes do not load is passed over for the next older one.
    newest = run_dir / "checkpoint_2026-12-02_19-00-04.000000" / "state.pt"
    newest.write_bytes(b"\0" * newest.stat().st_size)
    assert load_newest_state(str(run_dir))["step"] == 2


def test_too_few_volumes_names_the_split_counts_and_the_fix(demo_store_path):
    """GVSL needs 2 volumes; the demo store's `val` split holds 1 (of 4: train 2, val 1, test 1)."""
    from rayssl.data.volumes import check_volumes_in_split, load_volumes
    from rayssl.methods import get_method_class

    method = get_method_class("gvsl")(resolve_config(method="gvsl", profile="cpu").method_cfg())
    volumes = load_volumes(str(demo_store_path), "val")
    with pytest.raises(ValueError) as info:
        check_volumes_in_split(method.check_volumes, volumes, str(demo_store_path), "val")
    message = str(info.value)
    assert "needs at least 2 volumes, got 1" in message
    assert "data.split='val' holds 1 of the store's 4 volumes (per split: test 1, train 2, val 1)" in message, message
    assert "--set data.split=all" in message
    check_volumes_in_split(method.check_volumes, load_volumes(str(demo_store_path), "all"), str(demo_store_path), "all")
