"""Downstream evaluation: backbone loading (export / checkpoint), frozen features, linear probes, fine-tuning, `rayssl probe`."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from rayssl.config import resolve_config
from rayssl.eval.features import FeatureNet, build_network, intensity_scaler, load_run_weights, sample_levels
from rayssl.eval.finetune import FinetuneConfig, segmentation_network
from rayssl.eval.probe import (CropPool, ProbeConfig, ProbeData, build_pool, dice_per_class, format_table,
                               fraction_subset, macro_auc, mean_ci95, patch_probe, pool_features, summarise_repeats,
                               train_voxel_head, voxel_probe)
from rayssl.methods import VolumeInfo, get_method_class
from rayssl.nn.backbones import Backbone

TINY_VOCO = ["n_x=2", "n_y=2", "region_size=[64,64,32]", "input_size=32", "num_random_crops=2",
             "unet_features=[4,4,8,8,16,4]", "proj_hidden_dim=32", "proj_dim=32"]


def make_run(root, step=3, export=True):
    """A run folder as the training loop leaves it (config.yaml, one checkpoint, export/), without Ray."""
    from rayssl.checkpoint import write_checkpoint_dir
    from rayssl.train.loop import _export
    from rayssl.train.runfolder import start_run_folder

    cfg = resolve_config(method="voco", profile="cpu", overrides=[f"out={root}", "name=run", *TINY_VOCO])
    run_dir = os.path.join(root, "run")
    start_run_folder(run_dir, cfg, stores=["demo"], volumes=4, resumed_from=None)
    method = get_method_class("voco")(cfg.method_cfg())
    torch.manual_seed(123)
    model = method.build_model()
    state = {"model": model.state_dict(), "method": method.state_dict(), "step": step}
    shutil.move(write_checkpoint_dir(state, {"step": step}), os.path.join(run_dir, f"checkpoint_{step:06d}"))
    if export:
        _export(method, model, run_dir, cfg, {}, step, {"loss": 1.0})
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(str(tmp_path_factory.mktemp("probe_run")))


class OneHotIntensity(nn.Module, Backbone):
    """Oracle features: one channel per intensity level (a perfect linear probe exists), at two scales."""

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.levels = levels
        self.network_kwargs, self.out_channels = {"levels": levels}, levels

    def network(self):
        return "tests.test_probe.OneHotIntensity"

    def key_groups(self):
        return {"encoder": [""]}

    def feature_levels(self, x, loc=None):
        onehot = torch.cat([(torch.round(x * (self.levels - 1)) == k).float() for k in range(self.levels)], dim=1)
        return [onehot, nn.functional.avg_pool3d(onehot, 2)]


def blocks_data(n=4, shape=(24, 24, 16), classes=3, seed=0):
    """Volumes of random axis-aligned blocks of classes 1..classes-1; image = label / (classes - 1)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        label = np.zeros(shape, dtype=np.int64)
        for c in range(1, classes):
            for _ in range(3):
                lo = [int(rng.integers(0, s - 6)) for s in shape]
                label[lo[0]:lo[0] + 6, lo[1]:lo[1] + 6, lo[2]:lo[2] + 5] = c
        labels.append(label)
        images.append(label.astype(np.float32) / (classes - 1))
    return ProbeData.from_arrays(images, labels, modality="MR", background=0.0)


class TestFeatures:
    def test_sample_levels_equals_upsample_then_index(self):
        torch.manual_seed(0)
        levels = [torch.randn(2, 3, 16, 16, 16), torch.randn(2, 5, 4, 4, 4), torch.randn(2, 2, 1, 1, 1)]
        points = [torch.tensor([[0, 0, 0], [15, 3, 7], [8, 15, 15]]), torch.tensor([[5, 6, 7]])]
        sampled = sample_levels(levels, (16, 16, 16), points)
        full = torch.cat([nn.functional.interpolate(f, size=(16, 16, 16), mode="trilinear", align_corners=False)
                          for f in levels], dim=1)
        for b, pts in enumerate(points):
            expected = full[b, :, pts[:, 0], pts[:, 1], pts[:, 2]].T
            assert sampled[b].shape == (len(pts), 10)
            torch.testing.assert_close(sampled[b], expected, atol=1e-5, rtol=1e-5)

    def test_export_and_checkpoint_give_the_same_backbone(self, run_dir):
        exported = load_run_weights(run_dir, source="export")
        from_ckpt = load_run_weights(run_dir, source="checkpoint")
        assert exported.network == from_ckpt.network == "monai.networks.nets.BasicUNet"
        assert from_ckpt.step == exported.step == 3 and from_ckpt.source.startswith("checkpoint_")
        assert exported.state_dict.keys() == from_ckpt.state_dict.keys()
        for key, value in exported.state_dict.items():
            assert torch.equal(value, from_ckpt.state_dict[key]), key
        assert load_run_weights(run_dir).source == "export"  # auto prefers the export
        assert exported.pretraining_patch() == 32

    def test_pretrained_weights_load_fully_and_random_init_differs(self, run_dir):
        weights = load_run_weights(run_dir)
        pretrained, random_init = build_network(weights, pretrained=True), build_network(weights, pretrained=False)
        state = pretrained.state_dict()
        for key, value in weights.state_dict.items():
            assert torch.equal(state[key], value), key
        differing = [k for k in weights.state_dict if "conv.weight" in k
                     and not torch.equal(random_init.state_dict()[k], weights.state_dict[k])]
        assert differing, "the random-init baseline must not carry the pretrained weights"

    def test_initial_weights_are_the_seeded_untrained_export(self, run_dir):
        from rayssl.eval.features import initial_weights

        trained = load_run_weights(run_dir)
        first, again = initial_weights(trained.run_config, seed=0), initial_weights(trained.run_config, seed=0)
        assert first.state_dict.keys() == trained.state_dict.keys() and first.step == 0
        assert all(torch.equal(first.state_dict[k], again.state_dict[k]) for k in first.state_dict)
        assert not torch.equal(first.state_dict["conv_0.conv_0.conv.weight"], trained.state_dict["conv_0.conv_0.conv.weight"])

    def test_missing_run_content_is_a_clear_error(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="neither export"):
            load_run_weights(str(tmp_path))
        with pytest.raises(FileNotFoundError, match="--source checkpoint"):
            load_run_weights(make_run(str(tmp_path), export=False), source="export")

    def test_feature_net_knows_every_exported_layout(self):
        from monai.networks.nets import SwinUNETR, resnet10

        from rayssl.methods.drasclr import DrasCLREncoder

        x = torch.zeros(2, 1, 32, 32, 32)
        swin = FeatureNet(SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=3), use_swin_skip=True)
        assert swin.kind == "swin" and len(swin.levels(x)) == 6 and swin.size_multiple == 32
        resnet = FeatureNet(resnet10(spatial_dims=3, n_input_channels=1, conv1_t_size=3, conv1_t_stride=1,
                                     no_max_pool=True, feed_forward=False))
        feats = resnet.levels(x)
        assert resnet.kind == "resnet" and [f.shape[1] for f in feats] == [64, 64, 128, 256, 512]
        dras = FeatureNet(DrasCLREncoder(widths=(2, 2, 4, 4, 8), rep_dim=8, num_experts=2))
        assert not dras.dense and dras.pooled(torch.zeros(2, 1, 16, 16, 16), torch.zeros(2, 3)).shape == (2, 8)
        with pytest.raises(ValueError, match="loc"):
            dras.levels(torch.zeros(1, 1, 16, 16, 16))

    def test_intensity_scaler_follows_each_method(self):
        ct = VolumeInfo(index=0, id="a", shape=(2, 1, 1), spacing=(1, 1, 1), bbox=(0, 0, 0, 2, 1, 1),
                        background=-1024.0, modality="CT", extra={"dtype": "int16"})
        image = np.array([-1024.0, 250.0], dtype=np.float32).reshape(2, 1, 1)
        voco = get_method_class("voco").config_cls()  # ct_window (-175, 250) -> [0, 1]
        np.testing.assert_allclose(intensity_scaler("voco", voco)(image, ct).ravel(), [0.0, 1.0])
        drasclr = get_method_class("drasclr").config_cls()  # HU [-1024, 240] -> [-1, 1]
        np.testing.assert_allclose(intensity_scaler("drasclr", drasclr)(image, ct).ravel(), [-1.0, 1.0])
        mlsscl = get_method_class("mlsscl").config_cls()  # auto: CT stored as float was scaled at conversion
        scaled_ct = VolumeInfo(**{**ct.__dict__, "extra": {"dtype": "float32"}})
        np.testing.assert_allclose(intensity_scaler("mlsscl", mlsscl)(image * 0 + 0.25, scaled_ct).ravel(), [0.25, 0.25])
        gvsl = get_method_class("gvsl").config_cls(intensity="stored_2048")  # the paper: stored [0, 2048] / 2048
        stored = np.array([-5.0, 1024.0, 4096.0], dtype=np.float32).reshape(3, 1, 1)
        np.testing.assert_allclose(intensity_scaler("gvsl", gvsl)(stored, ct).ravel(), [0.0, 0.5, 1.0])

    @pytest.mark.parametrize("method, intensity", [("voco", None), ("mlsscl", None), ("drasclr", None),
                                                   ("gvsl", None), ("gvsl", "stored_2048"), ("mlsscl", "ct")])
    def test_mr_probe_volume_keeps_its_contrast_under_every_method(self, method, intensity):
        # An MR volume stored in [0, 1] (like the MNI152 probe set): a CT-pretrained backbone must still
        # see its contrast. VoCo's HU window (-175, 250) used to squeeze it into [0.412, 0.414], GVSL's
        # paper mapping (stored [0, 2048] / 2048) into [0, 0.0005].
        mr = VolumeInfo(index=0, id="mni-left", shape=(40, 1, 1), spacing=(2, 2, 2), bbox=(0, 0, 0, 40, 1, 1),
                        background=0.0, modality="MR", extra={"dtype": "float32"})
        image = np.linspace(0.0, 1.0, 40, dtype=np.float32).reshape(40, 1, 1)
        config_cls = get_method_class(method).config_cls
        config = config_cls() if intensity is None else config_cls(intensity=intensity)
        mapped = intensity_scaler(method, config)(image, mr)
        assert float(mapped.max() - mapped.min()) > 0.5, (method, float(mapped.min()), float(mapped.max()))


class TestProbes:
    def test_dice_per_class_hand_computed(self):
        truth = np.array([0, 1, 1, 1, 2, 2, 0, 0])
        pred = np.array([0, 1, 1, 0, 2, 1, 2, 0])
        # class 1: |P|=3, |T|=3, overlap 2 -> 4/6; class 2: |P|=2, |T|=2, overlap 1 -> 2/4; class 3 absent: skipped
        assert dice_per_class(pred, truth, 4) == pytest.approx({1: 4 / 6, 2: 0.5})

    def test_fraction_subsets_are_nested_and_sized(self):
        pool = CropPool(patch=8, volume=np.repeat(np.arange(5), 4), starts=np.zeros((20, 3), dtype=np.int64),
                        centre_class=np.zeros(20, dtype=np.int64))
        subsets = [set(fraction_subset(pool, f, seed=3)) for f in (0.1, 0.3, 1.0)]
        assert [len(s) for s in subsets] == [2, 6, 20]
        assert subsets[0] <= subsets[1] <= subsets[2]
        by_volume = fraction_subset(pool, 0.4, seed=3, unit="volumes")
        assert len(by_volume) == 8 and len(set(pool.volume[by_volume])) == 2

    def test_crop_pool_is_seeded_and_covers_every_class(self):
        data = blocks_data()
        a = build_pool(data, data.fit, 6, 8, 4, seed=1)
        b = build_pool(data, data.fit, 6, 8, 4, seed=1)
        np.testing.assert_array_equal(a.starts, b.starts)
        assert set(a.centre_class.tolist()) == {0, 1, 2}
        for i in range(len(a)):  # the sampled voxels carry their true labels
            label = data.volumes[a.volume[i]].label
            coords = a.points[i] + a.starts[i]
            np.testing.assert_array_equal(label[coords[:, 0], coords[:, 1], coords[:, 2]], a.point_classes[i])

    def test_voxel_probe_reaches_dice_one_on_separable_features(self):
        data = blocks_data()
        cfg = ProbeConfig(fractions=(0.5, 1.0), crops_per_volume=6, voxels_per_class=16, head_steps=200,
                          head_lr=0.05, batch_size=2)
        pool = build_pool(data, data.fit, cfg.crops_per_volume, 8, cfg.voxels_per_class, cfg.seed)
        oracle = FeatureNet(OneHotIntensity(3)).eval()
        scaled = [v.image for v in data.volumes]
        rows = voxel_probe(oracle, data, scaled, pool, pool_features(oracle, data, scaled, pool, 2), cfg)
        assert [r["fraction"] for r in rows] == [0.5, 1.0]
        for row in rows:
            assert row["score"] > 0.99, row
            assert set(row["dice"]) == {"class_1", "class_2"}
        # Crop-level scoring (what Tune uses) agrees on separable features.
        eval_pool = build_pool(data, data.eval, 4, 8, 1, seed=1)
        crops_cfg = ProbeConfig(**{**cfg.__dict__, "eval_on": "crops"})
        rows = voxel_probe(oracle, data, scaled, pool, pool_features(oracle, data, scaled, pool, 2), crops_cfg, eval_pool)
        assert all(r["score"] > 0.99 for r in rows)

    def test_voxel_head_cannot_fit_uninformative_features(self):
        torch.manual_seed(0)
        features, labels = torch.randn(600, 4), torch.randint(0, 3, (600,))
        w, b = train_voxel_head(features, labels, 3, steps=200, lr=0.05, weight_decay=1e-2, seed=0)
        test, truth = torch.randn(600, 4), torch.randint(0, 3, (600,))
        accuracy = float(((test @ w.T + b).argmax(1) == truth).float().mean())
        assert accuracy < 0.45  # chance is 1/3

    def test_patch_probe_scores_and_auc(self):
        rng = np.random.default_rng(0)
        centres = np.repeat(np.arange(3), 10)
        pool = CropPool(patch=8, volume=np.zeros(30, dtype=np.int64), starts=np.zeros((30, 3), dtype=np.int64),
                        centre_class=centres)
        separable = np.eye(3)[centres] * 5 + rng.normal(0, 0.1, (30, 3))
        rows = patch_probe(pool, separable, pool, separable, ProbeConfig(fractions=(1.0,)))
        assert rows[0]["balanced_accuracy"] == 1.0 and rows[0]["auc"] == pytest.approx(1.0)
        assert macro_auc(np.array([0, 0, 1, 1]), np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.4, 0.6]]),
                         np.array([0, 1])) == pytest.approx(1.0)


class TestFinetune:
    def test_segmentation_network_carries_the_export(self, run_dir):
        weights = load_run_weights(run_dir)
        net = segmentation_network(weights, num_classes=5, pretrained=True, seed=0, patch=32)
        state = net.state_dict()
        assert all(torch.equal(state[k], v) for k, v in weights.state_dict.items())
        assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 5, 32, 32, 32)
        baseline = segmentation_network(weights, num_classes=5, pretrained=False, seed=0, patch=32)
        # Same seed: the head (decoder and final conv) starts identical; only the encoder differs.
        assert torch.equal(baseline.state_dict()["final_conv.weight"], state["final_conv.weight"])
        assert not torch.equal(baseline.state_dict()["conv_0.conv_0.conv.weight"], state["conv_0.conv_0.conv.weight"])

    def test_config_is_validated(self):
        with pytest.raises(ValueError, match="fractions"):
            FinetuneConfig(fractions=(0.0,))
        with pytest.raises(ValueError, match="tasks"):
            ProbeConfig(tasks="segment")


def test_rayssl_probe_cli_writes_table_json_png_and_card(run_dir, demo_store_path, capsys):
    from rayssl.cli import main

    out = main(["probe", run_dir, "--data", str(demo_store_path), "--fractions", "100", "--crops-per-volume", "2",
                "--finetune", "--finetune-steps", "2", "--threads", "2", "--repeats", "2"])
    assert out == 0
    printed = capsys.readouterr().out
    assert "pretrained" in printed and "voxel" in printed and "gain" in printed
    report = json.load(open(os.path.join(run_dir, "probe.json")))
    assert os.path.getsize(os.path.join(run_dir, "probe.png")) > 0
    assert report["method"] == "voco" and len(report["fit_volumes"]) == 2 and len(report["eval_volumes"]) == 2
    assert not set(report["fit_volumes"]) & set(report["eval_volumes"])
    kinds = {(r["probe"], r["init"], r["fraction"]) for r in report["rows"]}
    assert kinds == {(p, i, 1.0) for p in ("voxel", "finetune") for i in ("pretrained", "random")}
    for row in report["rows"]:
        assert 0.0 <= row["score"] <= 1.0 and row["dice"]
        assert len(row["scores"]) == 2 and row["score"] == pytest.approx(np.mean(row["scores"]))
        assert row["score_ci95"] >= 0
    assert "±" in printed and "2 repeats" in printed
    card = json.load(open(os.path.join(run_dir, "export", "model_card.json")))
    assert {s["init"] for s in card["probe"]["scores"]} == {"pretrained", "random"}
    assert all("gain_ci95" in s for s in card["probe"]["scores"] if s["init"] == "pretrained")


class TestConfidenceIntervals:
    def test_mean_ci95_known_answer(self):
        # mean 3, sample sd sqrt(2.5), t(0.975, 4) = 2.776445: half-width 2.776445 * sqrt(2.5) / sqrt(5)
        mean, half = mean_ci95([1.0, 2.0, 3.0, 4.0, 5.0])
        assert mean == 3.0 and half == pytest.approx(2.776445 * np.sqrt(2.5) / np.sqrt(5), rel=1e-5)
        assert mean_ci95([0.4, float("nan"), 0.6]) == pytest.approx((0.5, 12.706205 * np.sqrt(0.02) / np.sqrt(2)), rel=1e-5)
        assert np.isnan(mean_ci95([0.7])[1]) and mean_ci95([0.7])[0] == 0.7

    def test_mean_ci95_covers_the_true_mean_95_percent_of_the_time(self):
        rng = np.random.default_rng(0)
        covered = 0
        for _ in range(4000):
            mean, half = mean_ci95(rng.normal(1.0, 0.3, size=5))
            covered += abs(mean - 1.0) <= half
        assert 0.94 <= covered / 4000 <= 0.96

    def test_gain_interval_is_paired_over_repeats(self):
        # A shared per-repeat offset (pool / head noise) cancels in the paired gain: the gain's interval is
        # far narrower than either score's.
        offsets = [0.0, 0.2, -0.1, 0.15]
        repeats = [[{"init": "pretrained", "probe": "voxel", "fraction": 0.1, "metric": "mean_dice",
                     "n_train_crops": 3, "score": 0.5 + o + 0.01 * (i % 2), "dice": {"a": 0.5 + o}},
                    {"init": "random", "probe": "voxel", "fraction": 0.1, "metric": "mean_dice",
                     "n_train_crops": 3, "score": 0.4 + o, "dice": {"a": 0.4 + o}}]
                   for i, o in enumerate(offsets)]
        rows = {r["init"]: r for r in summarise_repeats(repeats)}
        pre, rnd = rows["pretrained"], rows["random"]
        assert pre["repeats"] == 4 and pre["score"] == pytest.approx(0.5 + np.mean(offsets) + 0.005)
        assert pre["gain"] == pytest.approx(0.105) and pre["gain_scores"] == pytest.approx([0.1, 0.11, 0.1, 0.11])
        assert pre["gain_ci95"] < 0.02 < pre["score_ci95"] and rnd["score_ci95"] > 0.1
        assert "gain" not in rnd and pre["dice"]["a"] == pytest.approx(0.5 + np.mean(offsets))
        table = format_table(list(rows.values()))
        assert "+0.105 ± 0.009" in table and "4 repeats" in table


def test_probes_with_different_seeds_agree_within_their_intervals(run_dir, demo_store_path):
    """The default repeat count is large enough that the same probe under two seeds gives overlapping
    intervals for the pretrained score, the random score and the gain."""
    from rayssl.eval.report import run_probe

    reports = [run_probe(run_dir, store=str(demo_store_path), write=False,
                         cfg=ProbeConfig(fractions=(0.3,), crops_per_volume=6, seed=seed, eval_on="crops",
                                         head_steps=100, threads=2)) for seed in (0, 1)]
    assert ProbeConfig().repeats == 5 and all(r.info["repeats"] == 5 for r in reports)
    first, second = ({row["init"]: row for row in report.rows} for report in reports)
    assert first["pretrained"]["scores"] != second["pretrained"]["scores"]  # really other crops and heads
    for init, score, half in (("pretrained", "score", "score_ci95"), ("random", "score", "score_ci95"),
                              ("pretrained", "gain", "gain_ci95")):
        a, b = first[init], second[init]
        assert abs(a[score] - b[score]) <= a[half] + b[half], (init, score, a[score], a[half], b[score], b[half])


def test_mni152_probe_set_is_a_named_labelled_store(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSSL_CACHE", str(tmp_path))
    from rayssl.eval.probe import load_probe_data

    data = load_probe_data("mni152")
    assert data.class_names == ["background", "csf", "grey_matter", "white_matter"]
    assert sorted(v.info.id for v in data.volumes) == ["mni-left", "mni-right"]
    assert len(data.fit) == 1 and len(data.eval) == 1
    left, right = (v for v in sorted(data.volumes, key=lambda v: v.info.id))
    assert left.image.shape == right.image.shape and left.info.modality == "MR"
    # One template, mirrored: the label maps match exactly, the MR appearance (bias, noise) does not.
    assert np.array_equal(left.label, right.label) and not np.allclose(left.image, right.image)
    counts = np.bincount(left.label.ravel(), minlength=4)
    assert (counts > 1000).all() and counts[2] > counts[1]  # grey matter outweighs CSF
