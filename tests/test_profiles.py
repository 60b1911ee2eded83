"""Training recipes: every method x profile resolves and takes one optimizer step as the profile
sets it, the docs' recipe tables match `rayssl recipe`, accumulation equals one larger batch."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch
import yaml

from rayssl.config import resolve_config
from rayssl.methods import get_method_class
from rayssl.methods.base import VolumeInfo
from rayssl.recipe import recipe_rows
from rayssl.train.optim import (
    accumulate_gradients,
    build_optimizer,
    build_scheduler,
    effective_batch,
    lr_multiplier,
    resolve_epochs,
)

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "methods")
PROFILES = {"voco": ["cpu", "paper", "official"], "mlsscl": ["cpu", "paper"],
            "gvsl": ["cpu", "paper", "official"], "drasclr": ["cpu", "paper", "official"]}
CASES = [(m, p) for m, profiles in PROFILES.items() for p in profiles]

# Spatial sizes and widths made small; optimizer, schedule, loss form, batch size and accumulation
# stay as each profile sets them.
SMALL = {
    "voco": ["backbone=unet", "unet_features=[4,4,8,8,16,4]", "proj_hidden_dim=16", "proj_dim=16",
             "region_size=[64,64,32]", "n_x=2", "n_y=2", "input_size=32", "prepare_regions=false"],
    "mlsscl": ["clip_length=2", "plane_size=16", "image_size=8", "resnet_widen_factor=0.125",
               "proj_hidden_dim=16", "proj_dim=8", "queue_length=16", "augment=false"],
    "gvsl": ["input_size=[16,16,16]", "features=[4,4,8,8,16,4]", "num_groups=2", "shuffle_blocks=20"],
    "drasclr": ["patch_size=8", "landmark_step=8", "widths=[4,4,4,4,8]", "rep_dim=8", "proj_dim=8",
                "num_experts=2", "queue_size=16", "queue_dtype=float32"],
}
SHAPE = (64, 64, 48)


def _volumes() -> tuple[list[VolumeInfo], list[np.ndarray]]:
    """Two CT phantoms in memory (HU int16) and their manifest rows."""
    from datasets_zarr.demo import make_phantom

    arrays, volumes = [], []
    for i in range(2):
        image, _ = make_phantom(i, shape=SHAPE, spacing=(6.0, 6.0, 20.0 / 3.0))
        arrays.append(image)
        volumes.append(VolumeInfo(index=i, id=f"p{i}", shape=SHAPE, spacing=(6.0, 6.0, 20.0 / 3.0),
                                  bbox=(4, 4, 2, 60, 60, 46), background=-1024.0, modality="CT",
                                  extra={"dtype": "int16"}))
    return volumes, arrays


def _attach_landmarks(method, volumes: list[VolumeInfo]) -> list[VolumeInfo]:
    """DrasCLR without registration: a landmark grid in the shared (identity) atlas space."""
    from dataclasses import replace

    from datasets_zarr.landmarks import nearest_landmarks
    from rayssl.methods.drasclr import EXTRA_ATLAS_COORDS, EXTRA_NEIGHBORS, EXTRA_POSITIONS

    centres = np.array([(x, y, z) for x in (16, 32, 48) for y in (16, 32, 48) for z in (16, 32)], np.float32)
    extra = {EXTRA_POSITIONS: centres, EXTRA_NEIGHBORS: nearest_landmarks(centres, method.config.n_neighbors),
             EXTRA_ATLAS_COORDS: (centres / np.array(SHAPE, np.float32) * 2 - 1).astype(np.float32)}
    return [replace(v, has_mask=True, extra={**v.extra, **extra}) for v in volumes]


def _batch(method, volumes, arrays, size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """`size` samples built as the data actors build them (plan -> read boxes -> views -> stack), then the views'
    device part as the training loop applies it (`Method.device_views`, e.g. GVSL's paper `views_on: device`)."""
    from rayssl.data.read import read_box

    dtype = np.float32 if method.read_dtype == "float32" else None
    samples = []
    for i in range(size):
        requests = method.plan(volumes, i % len(volumes), rng)
        crops = [read_box(arrays[r.volume], r.start, r.size, volumes[r.volume].background, dtype=dtype)
                 for r in requests]
        samples.append(method.views(crops, requests, rng))
    batch = {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}
    return method.device_views(batch, torch.device("cpu"))


def _step_inputs(method_name: str, profile: str, overrides: list[str]):
    """(config, method, the micro-batches of one optimizer step at the profile's batch, a fresh model), seeded."""
    cfg = resolve_config(method=method_name, profile=profile, overrides=overrides)
    torch.manual_seed(0)
    method = get_method_class(method_name)(cfg.method_cfg())
    volumes, arrays = _volumes()
    if method_name == "drasclr":
        volumes = _attach_landmarks(method, volumes)
    rng = np.random.default_rng(0)
    micro_batches = [_batch(method, volumes, arrays, cfg.train.batch_size, rng) for _ in range(cfg.train.accumulate)]
    return cfg, method, micro_batches, method.build_model()


@pytest.mark.parametrize("method_name, profile", CASES)
def test_every_profile_takes_one_optimizer_step(method_name, profile):
    cfg, method, micro_batches, model = _step_inputs(method_name, profile, SMALL[method_name])
    tc = cfg.train
    method.setup(model, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = build_optimizer(params, tc)
    scheduler = build_scheduler(optimizer, tc)

    expected_cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[tc.optimizer]
    assert type(optimizer) is expected_cls
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == tc.weight_decay
    if tc.optimizer == "sgd":
        assert group["momentum"] == tc.momentum and group["nesterov"] == tc.nesterov
    else:
        assert group["amsgrad"] == tc.amsgrad
    factor = lr_multiplier(tc.schedule, tc.warmup_steps, tc.steps, tc.final_lr_fraction)
    assert group["lr"] == pytest.approx(tc.lr * factor(0))

    model.train()
    optimizer.zero_grad(set_to_none=True)
    losses, outputs = accumulate_gradients(model, method.loss, micro_batches)
    assert torch.isfinite(losses["loss"]), losses
    if tc.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
    optimizer.step()
    scheduler.step()
    method.after_step(model, outputs, 1, tc.steps)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(tc.lr * factor(1))
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, params))

    # The loss form the profile names is the one computed.
    mc = cfg.method_cfg()
    if method_name == "voco":
        assert ("pred" in losses) == (mc.loss_form == "paper") and ("pos" in losses) == (mc.loss_form == "official")
    if method_name == "mlsscl":
        assert mc.multiview_direction == "one_way"
    if profile != "cpu":
        assert tc.grad_clip is None  # no paper or official code clips gradients


def _cpu_step_batchnorm_rows(method_name: str, extra: list[str]) -> tuple[torch.nn.Module, dict[str, int]]:
    """Rows every BatchNorm layer normalised over in one `cpu`-profile step at the profile's batch size."""
    from rayssl.nn.norm import count_batchnorm_rows

    # VoCo at its real 4x4 grid: how many crops a volume gives decides its projector's rows.
    overrides = [o for o in SMALL[method_name] if o.split("=")[0] not in ("n_x", "n_y")] + extra
    cfg, method, micro_batches, model = _step_inputs(method_name, "cpu", overrides)
    method.setup(model, torch.device("cpu"))
    model.train()
    with count_batchnorm_rows(model) as rows:
        losses, _ = accumulate_gradients(model, method.loss, micro_batches)
    assert torch.isfinite(losses["loss"])
    return model, rows


@pytest.mark.parametrize("method_name", sorted(PROFILES))
def test_a_cpu_profile_step_never_meets_batchnorm_with_fewer_than_16_rows(method_name):
    """Issue 24: at the cpu batch of 2, BatchNorm statistics are those of two volumes; the cpu
    profiles use batch-independent norms, or BatchNorm only where a step gives it >= 16 rows."""
    from rayssl.nn.norm import MIN_BATCHNORM_ROWS
    from rayssl.train.loop import small_batchnorm_warning

    model, rows = _cpu_step_batchnorm_rows(method_name, [])
    assert all(n >= MIN_BATCHNORM_ROWS for n in rows.values()), rows
    assert small_batchnorm_warning(model, rows, method_name, ["norm", "head_norm"]) is None
    if method_name == "voco":
        assert rows and min(rows.values()) == 2 * 18  # the projector's BatchNorm: 2 volumes x 18 crops


def test_the_cpu_profile_heads_see_24_and_18_rows_and_batch_2_would_warn():
    """MLSSCL's cpu heads keep the paper's BatchNorm1d over a batch of 6: 4 views x 6 clips online,
    3 x 6 target. At batch 2 with the paper's norms, BatchNorm sees 4 x 2 (online) and 3 x 2 (target);
    the start-up warning names the layers and both fixes."""
    from rayssl.train.loop import small_batchnorm_warning

    _, rows = _cpu_step_batchnorm_rows("mlsscl", [])
    assert rows["online.projector.1"] == 24 and rows["predictor.1"] == 24 and rows["target.projector.1"] == 18
    assert not any(name.startswith(("online.backbone", "target.backbone")) for name in rows)  # GroupNorm there
    model, rows = _cpu_step_batchnorm_rows("mlsscl", ["mlsscl.norm=batch", "mlsscl.head_norm=batch",
                                                      "train.batch_size=2"])
    assert rows["online.backbone.resnet.bn1"] == 8 and rows["target.backbone.resnet.bn1"] == 6
    assert rows["online.projector.1"] == 8 and rows["predictor.1"] == 8
    warning = small_batchnorm_warning(model, rows, "mlsscl", ["norm", "head_norm"])
    assert warning is not None and "online.backbone.resnet.bn1 (8 rows)" in warning
    assert "--set mlsscl.norm=group" in warning and "--set mlsscl.head_norm=layer" in warning
    assert f"{len(rows)} BatchNorm layer(s)" in warning


@pytest.mark.parametrize("method_name, profile", [(m, p) for m, p in CASES if p != "cpu" and m != "gvsl"])
def test_paper_and_official_profiles_keep_the_papers_batchnorm(method_name, profile):
    cfg = resolve_config(method=method_name, profile=profile, overrides=SMALL[method_name])
    model = get_method_class(method_name)(cfg.method_cfg()).build_model()
    kinds = {type(m) for m in model.modules()}
    assert kinds & {torch.nn.BatchNorm1d, torch.nn.BatchNorm3d}
    assert torch.nn.GroupNorm not in kinds and torch.nn.LayerNorm not in kinds


def test_recipe_tables_in_the_docs_match_rayssl_recipe():
    """docs/methods/<m>.md, section "Recipe": columns `paper` | `official` | `cpu` are what
    `rayssl recipe` prints for that profile, row by row; "—" where the profile does not exist."""
    for method_name in PROFILES:
        with open(os.path.join(DOCS, f"{method_name}.md"), encoding="utf-8") as f:
            text = f.read()
        section = text[text.index("## Recipe"):]
        section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
        rows = [line for line in section.splitlines() if line.startswith("|")]
        header = [c.strip() for c in rows[0].strip("|").split("|")]
        assert header[3:] == ["`paper`", "`official`", "`cpu`"], (method_name, header)
        table = {}
        for line in rows[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            table[cells[0]] = dict(zip(("paper", "official", "cpu"), cells[3:6]))
        for profile in ("paper", "official", "cpu"):
            if profile not in PROFILES[method_name]:
                assert all(row[profile] == "—" for row in table.values()), (method_name, profile)
                continue
            recipe = recipe_rows(resolve_config(method=method_name, profile=profile))
            assert list(table) == list(recipe), f"{method_name}.md recipe rows differ from `rayssl recipe`"
            for setting, value in recipe.items():
                assert table[setting][profile] == value, (
                    f"docs/methods/{method_name}.md recipe table, {setting!r} under `{profile}`: "
                    f"{table[setting][profile]!r} but `rayssl recipe` says {value!r}")


def test_recipe_command_prints_the_resolved_recipe(capsys):
    from rayssl.cli import main

    assert main(["recipe", "--method", "drasclr", "--profile", "official", "--set", "train.accumulate=4"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"optimizer\s+SGD, momentum 0.9", out) and re.search(r"effective batch\s+512", out)
    assert re.search(r"queue size\s+4096 per landmark", out) and re.search(r"mixed precision\s+off", out)
    assert main(["recipe", "--method", "mlsscl", "--profile", "official"]) == 2
    assert "no public code" in capsys.readouterr().err


def test_issue_27_readings_are_profile_fields_that_rayssl_recipe_prints():
    """The paper-vs-rayssl readings of issue 27 are config fields: the `paper` profile follows the
    paper, the other behaviour is one --set away, and `rayssl recipe` prints whichever is in force."""
    def rows(method, profile, *overrides):
        return recipe_rows(resolve_config(method=method, profile=profile, overrides=list(overrides)))

    # GVSL: one corruption per image in the paper profile; the official chain elsewhere.
    assert rows("gvsl", "paper")["corruption of x_A"].startswith("one_of")
    assert rows("gvsl", "official")["corruption of x_A"].startswith("chain")
    assert rows("gvsl", "cpu")["corruption of x_A"] == rows("gvsl", "official")["corruption of x_A"]
    assert rows("gvsl", "paper", "gvsl.corruption=chain")["corruption of x_A"].startswith("chain")
    # VoCo: Eq. 5's reduction, Table 9's spacing and augmentation.
    paper = rows("voco", "paper")
    assert paper["L_reg (Eq. 5) reduction"] == "mean over pairs i<j"
    assert paper["voxel spacing"].startswith("1.5 mm") and "intensity shift" not in paper["augmentation"]
    literal = rows("voco", "paper", "voco.reg_reduction=literal_sum", "voco.spacing_mm=null")
    assert literal["L_reg (Eq. 5) reduction"].startswith("2/(n(n-1))") and literal["voxel spacing"] == "the store's own"
    assert "intensity shift" in rows("voco", "cpu")["augmentation"]
    with pytest.raises(ValueError, match="reg_reduction"):
        resolve_config(method="voco", profile="official", overrides=["voco.reg_reduction=literal_sum"])
    # MLSSCL: the short clip's placement is a labelled reading.
    assert rows("mlsscl", "paper")["short clip"] == "inside the long (axial) clip"
    assert rows("mlsscl", "paper", "mlsscl.short_clip_placement=anywhere")["short clip"] == "anywhere in the volume"


def test_official_profile_of_mlsscl_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="no public code"):
        resolve_config(method="mlsscl", profile="official")


def test_set_overrides_the_profile_recipe_and_epochs_become_steps(tmp_path):
    cfg = resolve_config(method="drasclr", profile="paper", overrides=["train.lr=0.05", "train.accumulate=2",
                                                                        "train.num_workers=2"])
    assert cfg.train.lr == 0.05 and cfg.train.optimizer == "sgd" and cfg.train.epochs == 20
    assert effective_batch(cfg.train) == 128 * 2 * 2
    fixed = resolve_epochs(cfg, samples_per_epoch=3 * 581)
    assert fixed.train.epochs is None and fixed.train.steps == math.ceil(20 * 3 * 581 / 512)
    # An explicit step count replaces the profile's epochs.
    assert resolve_config(method="drasclr", profile="paper", overrides=["train.steps=2"]).train.epochs is None
    # config.yaml records the effective batch and reads back to the same config.
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_yaml_dict()))
    assert yaml.safe_load(path.read_text())["train"]["effective_batch"] == 512
    again = resolve_config(file=str(path))
    assert again.train == cfg.train.model_copy(update={"epochs": None})


def test_an_old_config_yaml_with_the_recipe_in_the_method_section_still_resolves(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"method": "voco", "profile": "cpu", "voco": {"lr": 3e-4, "warmup_steps": 2},
                                    "train": {"lr": None, "weight_decay": None, "warmup_steps": None}}))
    cfg = resolve_config(file=str(path))
    assert cfg.train.lr == 3e-4 and cfg.train.warmup_steps == 2 and cfg.train.weight_decay == 1e-2


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch(optimizer):
    """BatchNorm-free model: the same gradient, and the same weights after the optimizer step."""
    tc = resolve_config(method="voco", profile="cpu", overrides=[f"train.optimizer={optimizer}", "train.lr=0.1",
                                                                  "train.warmup_steps=0"]).train
    torch.manual_seed(0)
    x, y = torch.randn(12, 5), torch.randn(12, 1)

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))

        def forward(self, batch):
            return {"prediction": self.net(batch["x"]), "x": batch["x"]}

    def loss(outputs, batch):
        mse = torch.nn.functional.mse_loss(outputs["prediction"], batch["y"])
        return {"loss": mse, "mse": mse}

    models = [Regression() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    results = []
    for model, splits in ((models[0], 1), (models[1], 3)):
        optimizer = build_optimizer(model.parameters(), tc)
        optimizer.zero_grad(set_to_none=True)
        micro = [{"x": xs, "y": ys} for xs, ys in zip(x.chunk(splits), y.chunk(splits))]
        losses, outputs = accumulate_gradients(model, loss, micro)
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        results.append((losses["loss"], outputs, grads, [p.detach().clone() for p in model.parameters()]))
    (loss_one, out_one, grads_one, params_one), (loss_acc, out_acc, grads_acc, params_acc) = results
    torch.testing.assert_close(loss_acc, loss_one)
    torch.testing.assert_close(out_acc["x"], x)  # after_step sees every micro-batch's samples, in order
    for a, b in zip(grads_acc, grads_one):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(params_acc, params_one):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_rayssl_pretrain_paper_profile_end_to_end_with_accumulation(ray_local, demo_store_path, tmp_path):
    """`rayssl pretrain --profile paper --steps 2` (GVSL: Adam, constant LR, fp32, stored_2048) through
    Ray Data and Ray Train, with 2 accumulated micro-batches per optimizer step."""
    from rayssl.cli import main

    out = tmp_path / "runs"
    code = main(["pretrain", "--method", "gvsl", "--profile", "paper", "--data", str(demo_store_path), "--steps", "2",
                 "--out", str(out), "--name", "paper-run", "--set", "data.split=all", "--set", "data.actors_max=1",
                 "--set", "train.accumulate=2", "--set", "train.batch_size=1",
                 *[item for s in SMALL["gvsl"] for item in ("--set", s)]])
    assert code == 0
    run = out / "paper-run"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["profile"] == "paper" and config["train"]["optimizer"] == "adam"
    assert config["train"]["effective_batch"] == 2 and config["gvsl"]["intensity"] == "stored_2048"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    assert all(m["lr"] == pytest.approx(1e-4) for m in metrics)  # constant schedule
    card = json.loads((run / "export" / "model_card.json").read_text())
    assert card["effective_batch"] == 2 and card["profile"] == "paper"


def test_drasclr_refuses_volumes_whose_spacing_breaks_its_patches():
    """A 32-voxel patch must cover the same tissue everywhere: the paper profile wants 1 mm, the cpu
    profile one spacing shared by all volumes; the message names the volume and its spacing."""
    from dataclasses import replace

    volumes, _ = _volumes()  # 6 x 6 x 6.667 mm
    paper = get_method_class("drasclr")(resolve_config(method="drasclr", profile="paper").method_cfg())
    with pytest.raises(ValueError, match=r"volume 'p0' has spacing \(6.0, 6.0, 6.667\) mm.*1 mm isotropic"):
        paper.check_volumes(volumes)
    iso = [replace(v, spacing=(1.0, 1.0, 1.0)) for v in volumes]
    paper.check_volumes(iso)
    cpu = get_method_class("drasclr")(resolve_config(method="drasclr", profile="cpu").method_cfg())
    cpu.check_volumes(volumes)
    with pytest.raises(ValueError, match=r"volume 'p1' has spacing \(1.0, 1.0, 1.0\) mm.*one spacing"):
        cpu.check_volumes([volumes[0], iso[1]])
    with pytest.raises(ValueError, match="'p0'"):  # prepare checks before any registration starts
        paper.prepare(volumes)
