"""The held-out objective (rayssl/train/heldout.py): when it is due, what it builds, and that evaluating leaves no trace."""

import numpy as np
import pytest
import torch

from rayssl.config import resolve_config
from rayssl.train.heldout import build_heldout_batches, evaluate_heldout, heldout_due, heldout_every


def test_due_at_the_first_report_every_n_steps_and_at_the_end():
    tc = resolve_config(method="voco", profile="cpu", overrides=["train.steps=45"]).train
    assert heldout_every(tc) == 4  # about ten points per run
    assert [s for s in range(1, 46) if heldout_due(s, 45, tc, first_report=s == 1)] == [1, 4, 8, 12, 16, 20, 24, 28,
                                                                                       32, 36, 40, 44, 45]
    # Evaluated at reports only: the interval is rounded up to a multiple of report_every.
    tc = resolve_config(method="voco", profile="cpu", overrides=["train.steps=45", "train.report_every=3",
                                                                  "train.heldout_every=4"]).train
    assert heldout_every(tc) == 6
    off = resolve_config(method="voco", profile="cpu", overrides=["train.heldout_samples=0"]).train
    assert not heldout_due(20, 40, off, first_report=True)


class _Net(torch.nn.Module):
    def __init__(self, dropout: float = 0.5):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 3)
        self.bn = torch.nn.BatchNorm3d(4)
        self.drop = torch.nn.Dropout(dropout)  # draws random numbers in train mode

    def forward(self, batch):
        return {"z": self.drop(self.bn(self.conv(batch["image"]))).mean(dim=(2, 3, 4))}


def _loss(outputs, batch):
    z = outputs["z"]
    return {"loss": z.pow(2).mean() + batch["target"].float().mean(), "spread": z.std()}


def test_evaluation_leaves_weights_statistics_rng_and_mode_as_they_were():
    torch.manual_seed(0)
    net = _Net()
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(2, 1, 6, 6, 6)).astype(np.float32), "target": np.array([j, j])}
               for j in range(3)]
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng_before = torch.random.get_rng_state()
    result = evaluate_heldout(net, _loss, batches, torch.device("cpu"))
    assert not net.training
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key  # BatchNorm running statistics included
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    # The values: the loss terms in train mode (batch statistics), averaged over the batches.
    assert set(result) == {"heldout_loss", "heldout_spread"}
    plain = _Net(dropout=0.0)
    plain.load_state_dict(before)
    got = evaluate_heldout(plain, _loss, batches, torch.device("cpu"))
    plain.train()
    with torch.no_grad():
        expected = [_loss(plain(t), t) for t in ({k: torch.as_tensor(v) for k, v in b.items()} for b in batches)]
    assert got["heldout_loss"] == pytest.approx(np.mean([float(e["loss"]) for e in expected]), rel=1e-6)
    assert got["heldout_spread"] == pytest.approx(np.mean([float(e["spread"]) for e in expected]), rel=1e-6)


def test_heldout_samples_are_fixed_and_not_the_training_stream(demo_store_path):
    from rayssl.data.pipeline import ViewBuilder
    from rayssl.data.volumes import load_volumes
    from rayssl.methods import get_method_class

    cfg = resolve_config(method="gvsl", profile="cpu", overrides=[
        f"data.store={demo_store_path}", "train.batch_size=2", "train.heldout_samples=3", "data.split=all"])
    method = get_method_class("gvsl")(cfg.method_cfg())
    volumes = method.prepare(load_volumes(str(demo_store_path), "all"))
    kwargs = dict(read_dtype=method.read_dtype, samples_per_step=None, global_batch=2)
    first = build_heldout_batches(volumes, method.plan, method.views, cfg, **kwargs)
    again = build_heldout_batches(volumes, method.plan, method.views, cfg, **kwargs)
    assert len(first) == 2 and all(len(b["sample"]) == 2 for b in first)  # 3 samples -> 2 batches of 2
    for a, b in zip(first, again):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert min(int(s) for b in first for s in b["sample"]) >= 2**39  # far beyond any training stream
    training = ViewBuilder(volumes, method.plan, method.views, seed=cfg.seed, read_dtype=method.read_dtype)
    sample0 = training.build_sample(0)
    assert any(not np.array_equal(sample0[k], first[0][k][0]) for k in sample0 if k != "sample")
