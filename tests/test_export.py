"""`rayssl export`: every method's backbone loads strictly into the network its card names, as a MONAI
state_dict, a MONAI bundle (read back with monai.bundle) and safetensors, and adapted to N input channels."""

import json
import os
import shutil

import pytest
import torch

from rayssl.config import resolve_config
from rayssl.export import export_run, import_network
from rayssl.methods import get_method_class

# Tiny settings per method (the shapes of the methods' own unit tests).
TINY = {
    "voco": ["n_x=2", "n_y=2", "region_size=[64,64,32]", "input_size=32", "unet_features=[4,4,8,8,16,4]",
             "proj_hidden_dim=32", "proj_dim=32"],
    "mlsscl": ["clip_length=4", "long_stride=3", "short_stride=2", "plane_size=12", "image_size=12",
               "resnet_widen_factor=0.125", "mlsscl.proj_dim=16", "queue_length=8"],
    "gvsl": ["gvsl.input_size=[32,32,32]", "features=[4,4,8,8,16,4]", "num_groups=2"],
    "drasclr": ["patch_size=8", "landmark_step=4", "widths=[4,4,8,8,8]", "rep_dim=8", "drasclr.proj_dim=6",
                "num_experts=3", "queue_size=4", "n_neighbors=2"],
    "mae": ["mae.input_size=[32,32,32]", "block_size=8", "features=[4,4,8,8,16,4]", "num_groups=2"],
}


# VoCo with the SwinUNETR encoder (the cpu profile's VoCo is the BasicUNet one); deepest pooling accepts 32^3.
VOCO_SWIN = ["backbone=swin", "feature_size=12", "input_size=32", "feature_pooling=deepest", "n_x=2", "n_y=2",
             "region_size=[64,64,32]", "proj_hidden_dim=32", "proj_dim=32"]


def make_run(root, method, step=2, overrides=None):
    """A finished run folder as the training loop leaves it (config.yaml, a checkpoint, export/), without Ray.
    `overrides` replace the method's TINY settings."""
    from rayssl.checkpoint import write_checkpoint_dir
    from rayssl.train.loop import _export
    from rayssl.train.runfolder import start_run_folder

    cfg = resolve_config(method=method, profile="cpu",
                         overrides=[f"out={root}", "name=run", *(TINY[method] if overrides is None else overrides)])
    run_dir = os.path.join(root, "run")
    start_run_folder(run_dir, cfg, stores=["demo"], volumes=4, resumed_from=None)
    impl = get_method_class(method)(cfg.method_cfg())
    torch.manual_seed(7)
    model = impl.build_model()
    state = {"model": model.state_dict(), "method": impl.state_dict(), "step": step}
    shutil.move(write_checkpoint_dir(state, {"step": step}), os.path.join(run_dir, f"checkpoint_{step:06d}"))
    _export(impl, model, run_dir, cfg, {}, step, {"loss": 1.0})
    return run_dir, impl.export(model)


def strict_net(card, state):
    net = import_network(card["network"])(**card["network_kwargs"])
    net.load_state_dict(state, strict=True)  # raises on any missing or unexpected key
    return net


@pytest.mark.parametrize("method", ["voco", "mlsscl", "gvsl", "drasclr", "mae"])
def test_every_format_loads_strictly_for_every_method(method, tmp_path, monkeypatch):
    from monai.bundle import ConfigParser
    from safetensors.torch import load_file

    run_dir, pretrained = make_run(str(tmp_path), method)

    # The training-time export: every key of the network, the pretrained ones unchanged.
    card = json.load(open(os.path.join(run_dir, "export", "model_card.json")))
    state = torch.load(os.path.join(run_dir, "export", "backbone.pt"), weights_only=True)
    net = strict_net(card, state)
    assert card["strict_load"] and "strict=True" in card["load_with"]
    for key, value in pretrained.state_dict.items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0)
    initialized = card["key_groups"]["initialized"]
    assert not any(k.startswith(tuple(initialized)) for k in pretrained.state_dict)
    assert all(k in pretrained.state_dict or k.startswith(tuple(initialized)) for k in state)
    assert card["num_pretrained_keys"] == len(pretrained.state_dict) and card["num_keys"] == len(state)

    # safetensors: same tensors, the network named in its metadata.
    st_dir = export_run(run_dir, "safetensors")
    st = load_file(os.path.join(st_dir, "model.safetensors"))
    assert set(st) == set(state) and all(torch.equal(st[k], state[k]) for k in state)
    strict_net(json.load(open(os.path.join(st_dir, "model_card.json"))), st)

    # MONAI bundle: MONAI's ConfigParser builds network_def and the bundle's load_weights step loads strictly.
    bundle = export_run(run_dir, "bundle", out=str(tmp_path / "bundle"))
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert os.path.exists(os.path.join(bundle, name)), name
    # From another working directory, without setting bundle_root: the bundle knows where it is.
    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "configs", "inference.json"))
    parser.read_meta(os.path.join(bundle, "configs", "metadata.json"))
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network")
    parser.get_parsed_content("load_weights")
    for key, value in state.items():
        torch.testing.assert_close(network.state_dict()[key], value, rtol=0, atol=0)
    assert parser.get("_meta_#network_data_format#inputs#image#num_channels") == 1
    # MONAI's own check of the declared shapes; DrasCLR's encoder also takes the patch's atlas coordinate.
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id="network_def", meta_file=os.path.join(bundle, "configs", "metadata.json"),
                      config_file=os.path.join(bundle, "configs", "inference.json"), device="cpu",
                      extra_forward_args={"loc": torch.zeros(1, 3)} if method == "drasclr" else None)
    card_text = json.load(open(os.path.join(bundle, "model_card.json")))["fine_tune_with"]
    assert f"load_pretrained({bundle!r}" in card_text and "load_pretrained" in open(os.path.join(bundle, "docs", "README.md")).read()
    # The export keeps its list of initialised keys when it is re-exported from export/.
    assert json.load(open(os.path.join(bundle, "model_card.json")))["key_groups"]["initialized"] == initialized


@pytest.mark.parametrize("method", ["voco", "mlsscl", "gvsl", "drasclr"])
def test_in_channels_repeats_the_stem_scaled(method, tmp_path):
    run_dir, _ = make_run(str(tmp_path), method)
    out = export_run(run_dir, "monai", in_channels=3)
    card = json.load(open(os.path.join(out, "model_card.json")))
    state = torch.load(os.path.join(out, "backbone.pt"), weights_only=True)
    net = strict_net(card, state)
    assert card["in_channels_adapted"]["in_channels"] == 3 and card["in_channels_adapted"]["keys"]
    one = torch.load(os.path.join(run_dir, "export", "backbone.pt"), weights_only=True)
    for key in card["in_channels_adapted"]["keys"]:
        assert state[key].sum().item() == pytest.approx(one[key].sum().item(), rel=1e-4, abs=1e-6)
    # Three equal channels give what the 1-channel network gives on one (the point of the 1/N scaling).
    one_net = strict_net(json.load(open(os.path.join(run_dir, "export", "model_card.json"))), one).eval()
    net.eval()
    size = {"voco": 32, "gvsl": 32, "mlsscl": 12, "drasclr": 32}[method]  # DrasCLR: 5 stride-2 stages
    x = torch.rand(1, 1, size, size, size)
    args = (torch.zeros(1, 3),) if method == "drasclr" else ()
    with torch.no_grad():
        torch.testing.assert_close(net(x.repeat(1, 3, 1, 1, 1), *args), one_net(x, *args), rtol=1e-4, atol=1e-5)


def test_export_rejects_bad_requests(tmp_path):
    run_dir, _ = make_run(str(tmp_path), "voco")
    with pytest.raises(ValueError, match="--format"):
        export_run(run_dir, "onnx")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        export_run(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither export"):
        export_run(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="--out-channels 0"):
        export_run(run_dir, out_channels=0)


def test_swin_bundle_declares_a_shape_the_whole_network_accepts(tmp_path):
    """VoCo's Swin encoder trains on 32^3 crops (deepest pooling), but the whole SwinUNETR needs >= 64^3:
    the bundle declares 64^3, and MONAI's verify_net_in_out runs the network at it."""
    from monai.bundle import verify_net_in_out

    run_dir, _ = make_run(str(tmp_path), "voco", overrides=VOCO_SWIN)
    bundle = export_run(run_dir, "bundle", out=str(tmp_path / "bundle"))
    meta = json.load(open(os.path.join(bundle, "configs", "metadata.json")))
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [64, 64, 64]
    verify_net_in_out(net_id="network_def", meta_file=os.path.join(bundle, "configs", "metadata.json"),
                      config_file=os.path.join(bundle, "configs", "inference.json"), device="cpu")


@pytest.mark.parametrize("method", ["gvsl", "mlsscl", "drasclr"])
def test_out_channels_gives_a_fresh_head_of_n_outputs(method, tmp_path):
    """`rayssl export RUN --out-channels 14`: the network's task layer has 14 outputs (BasicUNet's
    final_conv, a ResNet's fc, a Linear head on DrasCLR's encoder), the pretrained tensors unchanged,
    the card names the new network, which loads strictly."""
    from rayssl.cli import main

    run_dir, pretrained = make_run(str(tmp_path), method)
    assert main(["export", run_dir, "--out-channels", "14"]) == 0
    out = os.path.join(run_dir, "export_14out")
    card = json.load(open(os.path.join(out, "model_card.json")))
    state = torch.load(os.path.join(out, "backbone.pt"), weights_only=True)
    net = strict_net(card, state)
    prefix = "backbone." if method == "drasclr" else ""
    for key, value in pretrained.state_dict.items():
        torch.testing.assert_close(state[prefix + key], value, rtol=0, atol=0)
    head = {"gvsl": "final_conv.", "mlsscl": "fc.", "drasclr": "head."}[method]
    assert card["out_channels_adapted"]["out_channels"] == 14 and head in card["key_groups"]["initialized"]
    assert card["num_keys"] == len(state)
    size = {"gvsl": 32, "mlsscl": 12, "drasclr": 32}[method]
    args = (torch.zeros(1, 3),) if method == "drasclr" else ()
    with torch.no_grad():
        assert net.eval()(torch.rand(1, 1, size, size, size), *args).shape[:2] == (1, 14)
