"""`rayssl pretrain` end to end for MLSSCL and GVSL (VoCo: test_train.py; DrasCLR: test_stores.py): Ray Data actors
build each method's views, Ray Train runs its loss, the export loads into the network it names."""

import pytest

from rayssl.config import resolve_config
from rayssl.train.trainer import pretrain

from helpers import assert_run_records_its_network_and_config

pytestmark = pytest.mark.slow


# DrasCLR's cpu profile end to end: tests/test_stores.py (two stores, the same assertions on its run folder).
@pytest.mark.parametrize("method", ["mlsscl", "gvsl"])
def test_pretrain_each_method_on_the_demo_data(method, ray_local, demo_store_path, tmp_path):
    cfg = resolve_config(method=method, profile="cpu", overrides=[
        f"data.store={demo_store_path}", f"out={tmp_path / 'runs'}", "data.split=all", "data.actors_max=1",
        "train.steps=2", "train.report_every=1", "train.checkpoint_every=2"])
    result = pretrain(cfg)
    assert result.status == "finished" and result.steps == 2
    assert_run_records_its_network_and_config(result.run_dir, method, steps=2)
