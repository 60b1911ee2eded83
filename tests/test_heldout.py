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
    assert first.live == 2  # GVSL needs no more samples for its reference
    for a, b in zip(first, again):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert min(int(s) for b in first for s in b["sample"]) >= 2**39  # far beyond any training stream
    training = ViewBuilder(volumes, method.plan, method.views, seed=cfg.seed, read_dtype=method.read_dtype)
    sample0 = training.build_sample(0)
    assert any(not np.array_equal(sample0[k], first[0][k][0]) for k in sample0 if k != "sample")
    # Samples for a reference's negatives come after the held-out loss's, which stay as they were.
    more = build_heldout_batches(volumes, method.plan, method.views, cfg, extra_samples=5, **kwargs)
    assert len(more) == 3 and more.live == 2
    for key in first[0]:
        np.testing.assert_array_equal(more[1][key], first[1][key])


# ---- the reference line: fixed negatives and their chance level, identity prediction, first value ----

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from rayssl.train.heldout import (  # noqa: E402
    FirstHeldout,
    HeldoutBatches,
    progress_text,
    reference_line,
)
from rayssl.train.runfolder import draw_heldout, heldout_summary, plot_losses  # noqa: E402


def _mlsscl(n_batches: int, live: int, **overrides):
    from test_mlsscl import make_batch, make_method

    torch.manual_seed(0)
    method = make_method(**overrides)
    model = method.build_model()
    method.setup(model, torch.device("cpu"))
    batches = HeldoutBatches([{k: v.numpy() for k, v in make_batch(method, 2, seed=7 * j).items()}
                              for j in range(n_batches)], live=live)
    return method, model, batches


def _constant_heads(*heads: torch.nn.Module) -> None:
    """Every row out of these heads the same vector: no information, so every logit is equal."""
    for head in heads:
        last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.ones_(last.bias)


@pytest.mark.parametrize("direction,n_multiview", [("one_way", 3), ("symmetric", 6)])
def test_mlsscl_chance_is_the_hand_formula_and_an_uninformative_encoder_sits_on_it(direction, n_multiview):
    alpha, beta = 0.3, 0.7
    method, model, batches = _mlsscl(3, live=1, alpha=alpha, beta=beta, multiview_direction=direction)
    _constant_heads(model.predictor, model.target["projector"])
    got = evaluate_heldout(model, method.loss, batches, torch.device("cpu"), reference_fn=method.heldout_reference)
    m = 6  # 3 batches of 2 held-out samples: K = 5 fixed negatives per anchor
    assert got["heldout_chance"] == pytest.approx((n_multiview * alpha + beta) * math.log(1 + (m - 1)), rel=1e-9)
    assert got["heldout_chance_long_short"] == pytest.approx(math.log(m), rel=1e-9)
    assert got["heldout_chance_axial_coronal"] == pytest.approx((n_multiview // 3) * math.log(m), rel=1e-9)
    # All logits equal: -log(1 / (1 + K)) exactly, in every term and in the weighted total.
    for term in ("axial_coronal", "axial_sagittal", "coronal_sagittal", "long_short", "total"):
        assert got[f"heldout_fixed_{term}"] == pytest.approx(got[f"heldout_chance_{term}" if term != "total"
                                                                 else "heldout_chance"], rel=1e-5), term


def test_mlsscl_random_encoder_sits_near_chance_and_the_negatives_are_the_other_samples():
    # Untrained, at τ = 1 (logits within ±1, so Jensen's gap E[-log p] - ln(1 + K) is small).
    method, model, batches = _mlsscl(5, live=2, temperature=1.0)
    got = evaluate_heldout(model, method.loss, batches, torch.device("cpu"), reference_fn=method.heldout_reference)
    assert got["heldout_chance"] == pytest.approx(2 * math.log(10))  # α = β = 0.5: (3α + β) ln(1 + 9)
    assert got["heldout_fixed_total"] == pytest.approx(got["heldout_chance"], rel=0.05)


def test_fixed_negative_infonce_by_hand():
    """The hook's terms against an explicit computation: anchor i's positive is its own target key,
    its negatives the target keys of the other held-out samples (K = M - 1)."""
    from test_mlsscl import make_method

    method = make_method(temperature=0.2)
    g = torch.Generator().manual_seed(3)
    m, tau = 6, 0.2
    identity = torch.randn(m, 8, generator=g)  # every view of sample i shares it, plus noise
    keys = {v: identity + 0.3 * torch.randn(m, 8, generator=g) for v in ("axial", "coronal", "sagittal")}
    online = {v: identity + 0.3 * torch.randn(m, 8, generator=g) for v in ("axial", "coronal", "sagittal", "short")}
    outputs = [{**{f"online_{v}": q[i:i + 2] for v, q in online.items()},
                **{f"target_{v}": k[i:i + 2] for v, k in keys.items()}} for i in range(0, m, 2)]
    got = method.heldout_reference(None, [{}] * 3, outputs)  # no samples beyond the anchors: no forward

    def hand(query_view, key_view):
        q, k = F.normalize(online[query_view], dim=1), F.normalize(keys[key_view], dim=1)
        return float(np.mean([float(torch.logsumexp(q[i] @ k.T / tau, 0) - q[i] @ k[i] / tau) for i in range(m)]))

    assert got["fixed_axial_coronal"] == pytest.approx(hand("axial", "coronal"), rel=1e-5)
    assert got["fixed_long_short"] == pytest.approx(hand("short", "axial"), rel=1e-5)
    assert got["chance"] == pytest.approx(2 * math.log(m))
    assert got["fixed_total"] < 0.5 * got["chance"]  # queries near their own keys: well below chance


def test_drasclr_chance_is_the_hand_formula_with_its_neighbour_weight():
    from test_drasclr import _batch, _method

    torch.manual_seed(0)
    method = _method(neighbor_weight=0.5)
    model = method.build_model()
    method.setup(model, torch.device("cpu"))
    batches = HeldoutBatches([{k: v.numpy() for k, v in _batch(b=2, landmarks=(j % 3, j % 3)).items()}
                              for j in range(4)], live=2)
    got = evaluate_heldout(model, method.loss, batches, torch.device("cpu"), reference_fn=method.heldout_reference)
    m = 8  # 4 batches of 2: K = 7 momentum keys of the other held-out patches (2 batches' only by the key branch)
    assert got["heldout_chance_local"] == got["heldout_chance_neighbor"] == pytest.approx(math.log(m))
    assert got["heldout_chance"] == pytest.approx((1 + 0.5) * math.log(m))
    assert got["heldout_fixed_total"] == pytest.approx(got["heldout_fixed_local"] + 0.5 * got["heldout_fixed_neighbor"])
    # No information (every query, neighbour and key the same unit vector): exactly ln(1 + K) per term.
    same = F.normalize(torch.ones(4, 16), dim=1)
    flat = [{"query": same, "key": same, "neighbor_queries": same[:, None].expand(4, 2, 16)}]
    collapsed = method.heldout_reference(None, [{}], flat)
    assert collapsed["fixed_local"] == pytest.approx(math.log(4), rel=1e-6)
    assert collapsed["fixed_neighbor"] == pytest.approx(math.log(4), rel=1e-6)
    assert collapsed["fixed_total"] == pytest.approx(collapsed["chance"], rel=1e-6)


def test_gvsl_reference_is_the_loss_of_the_identity_prediction():
    from test_gvsl import TINY, _batch

    from rayssl.methods import get_method_class
    from rayssl.nn.spatial import local_ncc_loss

    cls = get_method_class("gvsl")
    method = cls(cls.config_cls(**TINY))
    torch.manual_seed(0)
    model = method.build_model()
    batch = _batch(method, 2)
    batches = HeldoutBatches([{k: v.numpy() for k, v in batch.items()}], live=1)
    got = evaluate_heldout(model, method.loss, batches, torch.device("cpu"), reference_fn=method.heldout_reference)
    restoration = float(F.mse_loss(batch["image_a_corrupted"], batch["image_a"]))  # restored = the corrupted input
    ncc = float(local_ncc_loss(batch["image_b"], batch["image_a"], window=method.config.ncc_window))  # no warp
    assert got["heldout_identity_restoration"] == pytest.approx(restoration, rel=1e-5)
    assert got["heldout_identity_ncc"] == pytest.approx(ncc, rel=1e-5)
    assert got["heldout_identity_smooth"] == 0.0
    weight = 0.0 if method.in_restoration_warmup else 1.0
    assert got["heldout_identity"] == pytest.approx(weight * ncc + method.config.restoration_weight * restoration,
                                                    rel=1e-5)
    assert reference_line(got)[2] == "identity"


def test_live_batches_alone_make_the_heldout_loss_and_survive_pickling():
    torch.manual_seed(0)
    net = _Net(dropout=0.0)
    rng = np.random.default_rng(0)
    batches = HeldoutBatches([{"image": rng.normal(size=(2, 1, 6, 6, 6)).astype(np.float32),
                               "target": np.array([j, j])} for j in range(3)], live=1)
    again = pickle.loads(pickle.dumps(batches))  # as ray.put ships it to the workers
    assert again.live == 1 and len(again) == 3
    only_first = evaluate_heldout(net, _loss, batches[:1], torch.device("cpu"))
    assert evaluate_heldout(net, _loss, again, torch.device("cpu")) == pytest.approx(only_first)


def _rows(curve_key, line_key, line, curve):
    """Metrics rows as a run writes them: a held-out point every other step."""
    rows = []
    for i, (step, value) in enumerate(zip(range(1, 2 * len(curve), 2), curve)):
        rows.append({"step": step, "loss": 9.0 - i, "heldout_loss": 8.3 + 0.01 * i, curve_key: value, line_key: line})
        rows.append({"step": step + 1, "loss": 8.9 - i})
    return rows


def test_summary_plot_and_progress_line_read_the_curve_against_its_line(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows("heldout_fixed_total", "heldout_chance", 5.67, [5.9, 5.0, 4.2])
    summary = heldout_summary(rows)
    assert summary["curve"] == "heldout_fixed_total" and summary["reference_kind"] == "chance"
    assert (summary["curve_first"], summary["curve_last"], summary["reference"]) == (5.9, 4.2, 5.67)
    assert summary["below_reference_pct"] == pytest.approx(100 * (5.67 - 4.2) / 5.67)
    assert summary["first_loss"] == 8.3 and summary["last_loss"] == pytest.approx(8.32)  # the live-queue value stays
    fig, ax = plt.subplots()
    labels = draw_heldout(ax, rows)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert labels[1] == "held-out, fixed negatives" and labels[2].startswith("chance")
    assert list(lines[labels[2]].get_ydata()) == [5.67, 5.67]  # a horizontal line at the chance level
    assert list(lines[labels[1]].get_ydata()) == [5.9, 5.0, 4.2]
    plt.close(fig)
    assert plot_losses(str(tmp_path), rows, ["loss"]) and (tmp_path / "loss.png").stat().st_size > 1000
    assert progress_text(rows[-2]) == "held-out 4.2000, chance 5.6700 (fixed negatives; live-queue loss 8.3200)"
    assert progress_text({"heldout_loss": 1.5}) == "held-out loss 1.5000"

    # A method without a reference of its own: its first held-out value, carried through a resume.
    first = FirstHeldout()
    plain = [{"step": s, "loss": 1.0, "heldout_loss": v} for s, v in ((1, 1.23), (4, 1.1), (8, 0.92))]
    for row in plain:
        first.annotate(row)
    assert [row["heldout_first"] for row in plain] == [1.23, 1.23, 1.23]
    resumed = FirstHeldout(plain[:2])
    later = {"step": 12, "heldout_loss": 0.9}
    resumed.annotate(later)
    assert later["heldout_first"] == 1.23
    summary = heldout_summary(plain)
    assert summary["reference_kind"] == "first" and summary["below_reference_pct"] == pytest.approx(100 * 0.31 / 1.23)
    assert progress_text(plain[-1]) == "held-out 0.9200, first 1.2300"
    chance_row = {"heldout_loss": 8.0, "heldout_fixed_total": 5.0, "heldout_chance": 5.67}
    first.annotate(chance_row)
    assert "heldout_first" not in chance_row  # the method's own line wins


def test_shared_voco_runs_record_the_reference_line(voco_resume_runs):
    """VoCo has no reference of its own: every held-out row carries the run's first held-out loss,
    read back from metrics.jsonl after a resume, and summary.json reads the curve against it."""
    for run in (voco_resume_runs.full, voco_resume_runs.resumed):
        rows = [json.loads(line) for line in open(os.path.join(run.run_dir, "metrics.jsonl"))]
        points = [r for r in rows if "heldout_loss" in r]
        assert points[0]["step"] == 1 and points[-1]["step"] == 4  # resumed: also at its first report (3)
        assert all(r["heldout_first"] == points[0]["heldout_loss"] for r in points)
        summary = json.load(open(os.path.join(run.run_dir, "summary.json")))["heldout"]
        assert summary["reference_kind"] == "first" and summary["reference"] == points[0]["heldout_loss"]
        assert summary["curve_last"] == points[-1]["heldout_loss"]
