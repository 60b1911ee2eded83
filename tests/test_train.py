"""End-to-end pretraining on Ray Train V2 with VoCo: run folder, MONAI export, exact resume, 2-worker DDP."""

import json
import os

import pytest
import torch

from rayssl.config import resolve_config
from rayssl.train.trainer import pretrain

from helpers import VOCO_TINY

TINY = [*VOCO_TINY, "train.report_every=1"]


def _cfg(store, out, *extra):
    return resolve_config(method="voco", profile="cpu",
                          overrides=[f"data.store={store}", f"out={out}", *TINY, *extra])


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {m["step"]: m["loss"] for m in map(json.loads, f)}


def test_pretrain_writes_run_folder_and_monai_export(voco_resume_runs):
    from monai.networks.nets import BasicUNet

    result = voco_resume_runs.full  # 4 steps, checkpoints at 2 and 4
    run = result.run_dir
    assert result.status == "finished" and result.steps == 4
    for name in ("config.yaml", "README.md", "metrics.jsonl", "loss.png", "summary.json",
                 "export/backbone.pt", "export/model_card.json"):
        assert os.path.exists(os.path.join(run, name)), name
    assert sorted(_losses(run)) == [1, 2, 3, 4]
    assert len([d for d in os.listdir(run) if d.startswith("checkpoint_")]) >= 1
    card = json.load(open(os.path.join(run, "export", "model_card.json")))
    assert card["method"] == "voco" and card["steps"] == 4 and card["data"]["manifest_sha256"]
    assert card["network"] == "monai.networks.nets.BasicUNet"
    # The run's intensity as resolved on its volumes (the demo CT phantoms, int16 HU): VoCo's HU window.
    resolved = card["intensity_resolved"]["resolved"]
    assert [(r["kind"], r["low"], r["high"], r["modalities"]) for r in resolved] == [("hu_window", -175.0, 250.0, ["CT"])]
    net = BasicUNet(**card["network_kwargs"])
    state = torch.load(os.path.join(run, "export", "backbone.pt"), weights_only=True)
    net.load_state_dict(state, strict=True)  # every key of the network: the encoder pretrained, the decoder at init
    pretrained = {k for k in state if not k.startswith(tuple(card["key_groups"]["initialized"]))}
    assert pretrained == {k for k in net.state_dict() if k.startswith(("conv_0", "down_"))}


def test_resume_reproduces_the_uninterrupted_loss(voco_resume_runs):
    full, part, resumed = voco_resume_runs.full, voco_resume_runs.part, voco_resume_runs.resumed
    assert part.status == "stopped" and part.steps == 2
    assert resumed.status == "finished" and resumed.run_dir == part.run_dir
    a, b = _losses(full.run_dir), _losses(part.run_dir)
    assert b[1] == pytest.approx(a[1], rel=1e-6) and b[2] == pytest.approx(a[2], rel=1e-6)
    assert b[3] == pytest.approx(a[3], rel=1e-5), (a, b)
    assert b[4] == pytest.approx(a[4], rel=1e-5), (a, b)
    # The resumed segment evaluates the held-out objective at its first report (step 3) too; that
    # evaluation leaves no trace (BatchNorm statistics and RNG restored), so step 4 matches exactly.
    full_rows = {r["step"]: r for r in map(json.loads, open(os.path.join(full.run_dir, "metrics.jsonl")))}
    resumed_rows = {r["step"]: r for r in map(json.loads, open(os.path.join(part.run_dir, "metrics.jsonl")))}
    assert {s for s, r in resumed_rows.items() if "heldout_loss" in r} == {1, 2, 3, 4}
    assert resumed_rows[4]["heldout_loss"] == pytest.approx(full_rows[4]["heldout_loss"], rel=1e-5)


def test_fresh_run_refuses_existing_name(ray_local, demo_store_path, tmp_path):
    os.makedirs(tmp_path / "runs" / "taken")
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(_cfg(demo_store_path, tmp_path / "runs", "name=taken"))
