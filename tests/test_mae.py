"""MAE: random-block masking (ratio, whole blocks), the loss on masked voxels only against a hand
computation, the crop-mean reference, a strict export into BasicUNet, one step per profile, and an
exact resume of the in-process stream."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from monai.networks.nets import BasicUNet

from rayssl.config import resolve_config
from rayssl.methods import get_method_class
from rayssl.methods.mae import MAE, MAEConfig, block_mask, masked_mse, normalise_crop

from helpers import resumed_losses_equal_uninterrupted
from test_export import make_run, strict_net
from test_profiles import DOCS, _step_inputs, _volumes

# Tiny sizes: 32^3 crops (InstanceNorm needs > 1 voxel at the 2^3 bottleneck), 8^3 blocks, narrow widths.
TINY = ["input_size=[32,32,32]", "block_size=8", "features=[4,4,8,8,16,4]", "num_groups=2"]


def _method(*overrides: str) -> MAE:
    return MAE(resolve_config(method="mae", profile="cpu", overrides=list(overrides)).method_cfg())


class TestMasking:
    def test_exactly_the_ratio_of_whole_blocks_is_masked(self):
        rng = np.random.default_rng(0)
        mask = block_mask((32, 48, 16), 8, 0.75, rng)
        assert mask.shape == (32, 48, 16) and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        blocks = mask.reshape(4, 8, 6, 8, 2, 8).transpose(0, 2, 4, 1, 3, 5).reshape(48, -1)
        assert (blocks.min(axis=1) == blocks.max(axis=1)).all()  # every 8^3 block all masked or all visible
        assert int((blocks[:, 0] == 0).sum()) == int(0.75 * 48) == 36
        other = block_mask((32, 48, 16), 8, 0.75, np.random.default_rng(1))
        assert not np.array_equal(mask, other)  # the draw follows the rng

    def test_views_give_a_z_scored_crop_and_its_mask(self):
        method = _method(*TINY, "mask_ratio=0.5")
        volumes, arrays = _volumes()
        rng = np.random.default_rng(3)
        requests = method.plan(volumes, 1, rng)
        (r,) = requests
        assert r.size == (32, 32, 32)
        assert all(0 <= s and s + n <= d for s, n, d in zip(r.start, r.size, volumes[1].shape))
        crop = arrays[1][tuple(slice(s, s + n) for s, n in zip(r.start, r.size))].astype(np.float32)
        views = method.views([crop], requests, rng)
        target, mask = views["target"], views["mask"]
        assert target.shape == mask.shape == (1, 32, 32, 32) and target.dtype == np.float32
        assert abs(float(target.mean())) < 1e-4 and abs(float(target.std()) - 1.0) < 1e-3
        # The base intensity helper, then the z-score: CT in HU -> window (-1000, 1000) -> [0, 1].
        expected = normalise_crop(np.clip((crop + 1000.0) / 2000.0, 0.0, 1.0))
        np.testing.assert_allclose(target[0], expected, rtol=1e-5, atol=1e-5)
        assert float(1 - mask.mean()) == 0.5  # 32 of 64 blocks

    def test_block_size_must_divide_the_crop_and_leave_blocks_on_both_sides(self):
        with pytest.raises(ValueError, match=r"block_size=12 must divide"):
            MAEConfig(input_size=(32, 32, 32), block_size=12)
        with pytest.raises(ValueError, match=r"at least one block must be masked and one visible"):
            MAEConfig(input_size=(32, 32, 32), block_size=32, mask_ratio=0.75)


class TestLoss:
    def test_loss_is_the_mse_over_masked_voxels_by_hand(self):
        method = _method(*TINY)
        rng = np.random.default_rng(0)
        target = rng.normal(size=(2, 1, 32, 32, 32)).astype(np.float32)
        mask = np.stack([block_mask((32, 32, 32), 8, 0.75, rng)[None] for _ in range(2)])
        prediction = rng.normal(size=target.shape).astype(np.float32)
        hand, count = 0.0, 0
        for index in zip(*np.nonzero(mask == 0)):  # every masked voxel of both samples, one by one
            hand += float(prediction[index] - target[index]) ** 2
            count += 1
        assert count == 2 * 48 * 8**3
        pred = torch.from_numpy(prediction).requires_grad_()
        batch = {"target": torch.from_numpy(target), "mask": torch.from_numpy(mask)}
        losses = method.loss({"reconstruction": pred}, batch)
        assert float(losses["loss"].detach()) == pytest.approx(hand / count, rel=1e-5)
        losses["loss"].backward()
        assert (pred.grad[torch.from_numpy(mask) == 1] == 0).all()  # visible voxels never enter the loss
        assert (pred.grad[torch.from_numpy(mask) == 0] != 0).all()

    def test_reference_is_the_crop_mean_prediction_and_about_one(self):
        method = _method(*TINY)
        volumes, arrays = _volumes()
        rng = np.random.default_rng(0)
        batches = []
        for i in range(2):
            requests = method.plan(volumes, i, rng)
            r = requests[0]
            crop = arrays[i][tuple(slice(s, s + n) for s, n in zip(r.start, r.size))].astype(np.float32)
            views = method.views([crop], requests, rng)
            batches.append({k: torch.from_numpy(v[None]) for k, v in views.items()})
        reference = method.heldout_reference(method.build_model(), batches, [{}, {}])
        by_hand = np.mean([float((b["target"][b["mask"] == 0] ** 2).mean()) for b in batches])
        assert reference["identity"] == pytest.approx(by_hand, rel=1e-5)
        assert 0.5 < reference["identity"] < 1.5  # the masked voxels' spread about the crop mean
        # The masked input holds 0 there: predicting the input is the same line.
        b = batches[0]
        same = float(masked_mse(b["target"] * b["mask"], b["target"], b["mask"]))
        assert same == pytest.approx(float(masked_mse(torch.zeros_like(b["target"]), b["target"], b["mask"])))


def test_export_loads_strictly_into_basicunet_and_reconstructs_as_the_model(tmp_path):
    method = _method(*TINY)
    torch.manual_seed(0)
    model = method.build_model()
    exported = method.export(model)
    assert exported.network == "monai.networks.nets.BasicUNet"
    assert not any(k.startswith("final_conv.") for k in exported.state_dict)  # the pretext head stays behind
    net = BasicUNet(**exported.network_kwargs)
    missing = net.load_state_dict(exported.state_dict, strict=False)
    assert not missing.unexpected_keys and set(missing.missing_keys) == {"final_conv.weight", "final_conv.bias"}
    # The whole U-Net (final_conv too) is MONAI's BasicUNet: it computes the model's reconstruction.
    net.load_state_dict(model.unet.state_dict(), strict=True)
    batch = {"target": torch.randn(1, 1, 32, 32, 32), "mask": torch.from_numpy(block_mask((32,) * 3, 8, 0.75,
                                                                                        np.random.default_rng(0)))[None, None]}
    model.eval(), net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(batch["target"] * batch["mask"]), model(batch)["reconstruction"])
    # The run's export folder: every key of the network, strict.
    run_dir, _ = make_run(str(tmp_path), "mae", overrides=TINY)
    import json

    card = json.load(open(os.path.join(run_dir, "export", "model_card.json")))
    state = torch.load(os.path.join(run_dir, "export", "backbone.pt"), weights_only=True)
    strict_net(card, state)
    assert card["key_groups"]["initialized"] == ["final_conv."]


@pytest.mark.parametrize("profile", ["cpu", "paper"])
def test_one_optimizer_step_per_profile(profile):
    from rayssl.train.optim import accumulate_gradients, build_optimizer, build_scheduler

    cfg, method, micro_batches, model = _step_inputs("mae", profile, TINY)
    tc = cfg.train
    kinds = {type(m) for m in model.modules()}
    assert not kinds & {torch.nn.BatchNorm3d, torch.nn.BatchNorm1d}
    assert (torch.nn.InstanceNorm3d in kinds) == (profile == "paper") and (torch.nn.GroupNorm in kinds) == (profile == "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = build_optimizer(params, tc)
    scheduler = build_scheduler(optimizer, tc)
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["nesterov"]  # nnssl's, both profiles
    model.train()
    losses, outputs = accumulate_gradients(model, method.loss, micro_batches)
    assert torch.isfinite(losses["loss"]) and 0.3 < float(losses["loss"]) < 10.0
    torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
    optimizer.step()
    scheduler.step()
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    assert method.embeddings(outputs).shape == (tc.batch_size, cfg.method_cfg().features[4])


def test_recipe_table_in_the_docs_matches_rayssl_recipe():
    """docs/methods/mae.md "Recipe": columns `paper` | `cpu` are what `rayssl recipe` prints."""
    from rayssl.recipe import recipe_rows

    text = open(os.path.join(DOCS, "mae.md"), encoding="utf-8").read()
    section = text[text.index("## Recipe"):]
    section = section[:section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header[-2:] == ["`paper`", "`cpu`"], header
    table = {cells[0]: cells[-2:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in rows[2:])}
    for column, profile in enumerate(("paper", "cpu")):
        recipe = recipe_rows(resolve_config(method="mae", profile=profile))
        assert list(table) == list(recipe)
        assert {k: v[column] for k, v in table.items()} == recipe, profile


def test_resume_replays_the_uninterrupted_run_exactly(tiny_store):
    """The data actors' ViewBuilder with the same seed gives the same crops and masks for a sample
    index, so 2 steps + checkpoint (the loop's own writer/reader) + 1 step equal 3 steps, bit for bit."""
    cfg = resolve_config(method="mae", profile="cpu", overrides=[
        "input_size=[16,16,16]", "block_size=4", "features=[4,4,8,8,16,4]", "num_groups=2", "train.steps=3"])

    def make_batch(method, samples):
        return {k: torch.as_tensor(np.stack([s[k] for s in samples])) for k in ("target", "mask")}

    full, resumed = resumed_losses_equal_uninterrupted(cfg, tiny_store, make_batch)
    assert resumed == full


def test_preview_shows_mask_and_reconstruction_and_renders(tiny_store, tmp_path):
    from rayssl.data.pipeline import ViewBuilder
    from rayssl.data.volumes import load_volumes
    from rayssl.preview import render_preview

    method = _method("input_size=[16,16,16]", "block_size=4", "features=[4,4,8,8,16,4]", "num_groups=2")
    volumes = method.prepare(load_volumes(str(tiny_store), "all"))
    builder = ViewBuilder(volumes, method.plan, method.views, seed=0)
    _, _, requests, _ = builder.planner.plan_requests(0)
    views = builder.build_sample(0)
    figure = method.preview_geometry(volumes, requests, views)
    assert figure.facts["model"] == "fresh" and figure.facts["masked_fraction"] == 0.75
    b = {k: torch.from_numpy(np.asarray(views[k])[None]) for k in ("target", "mask")}
    assert figure.facts["mean_prediction_mse"] == pytest.approx(method.heldout_reference(None, [b], [{}])["identity"])
    assert [i.title.split(":")[0] for i in figure.images][:2] == ["target", "mask"]
    assert any(i.title.startswith("reconstruction") for i in figure.images)
    mask_image = next(i.image for i in figure.images if i.title.startswith("mask"))
    np.testing.assert_array_equal(mask_image, views["mask"][0][:, :, 8].astype(np.float32))
    path = render_preview(figure, volumes, str(tmp_path / "mae.png"))
    assert os.path.getsize(path) > 10_000
