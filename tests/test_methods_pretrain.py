"""`rayssl pretrain` end to end for MLSSCL, DrasCLR and GVSL (VoCo: test_train.py): Ray Data actors
build each method's views, Ray Train runs its loss, the export loads into the network it names."""

import importlib
import json
import os

import pytest
import torch

from rayssl.config import resolve_config
from rayssl.methods import get_method_class
from rayssl.train.trainer import pretrain

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["mlsscl", "drasclr", "gvsl"])
def test_pretrain_each_method_on_the_demo_data(method, ray_local, demo_store_path, tmp_path):
    cfg = resolve_config(method=method, profile="cpu", overrides=[
        f"data.store={demo_store_path}", f"out={tmp_path / 'runs'}", "data.split=all", "data.actors_max=1",
        "train.steps=2", "train.report_every=1", "train.checkpoint_every=2"])
    result = pretrain(cfg)
    assert result.status == "finished" and result.steps == 2
    run = result.run_dir
    with open(os.path.join(run, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)

    card = json.load(open(os.path.join(run, "export", "model_card.json")))
    assert card["method"] == method and card["steps"] == 2
    module, name = card["network"].rsplit(".", 1)
    net = getattr(importlib.import_module(module), name)(**card["network_kwargs"])
    state = torch.load(os.path.join(run, "export", "backbone.pt"), weights_only=True)
    net.load_state_dict(state, strict=True)  # the export holds every key of the network it names

    # The run folder records the config that was used, including choices prepare() made.
    resolved = resolve_config(file=os.path.join(run, "config.yaml"))
    assert resolved.method == method
    method_cfg = resolved.method_cfg()
    assert isinstance(method_cfg, get_method_class(method).config_cls)
    if method == "drasclr":
        assert method_cfg.atlas is not None and card["landmarks"]["atlas"] == method_cfg.atlas
        assert card["landmarks"]["count"] and card["landmarks"]["count"] > 0
