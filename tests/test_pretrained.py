"""`rayssl.load_pretrained`: the README's fine-tuning snippet for every method (a task head of 14
outputs, 4 input channels, every pretrained encoder tensor loaded), every source a user may hold,
clear errors; and the run folder's re-run command (config.yaml without the run's name, resolved values)."""

import json
import os
import re
import shlex
import shutil

import pytest
import torch

from test_export import VOCO_SWIN, make_run
from test_mae import TINY as MAE_TINY

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

# (method, overrides of the tiny settings, input edge of the forward pass). The full SwinUNETR needs
# >= 64^3 (its encoder10 normalises the 1/32-scale map); DrasCLR's five stride-2 stages need 32^3.
CASES = {
    "voco-unet": ("voco", None, 32),
    "voco-swin": ("voco", VOCO_SWIN, 64),
    "mlsscl": ("mlsscl", None, 16),
    "gvsl": ("gvsl", None, 32),
    "drasclr": ("drasclr", None, 32),
    "mae": ("mae", MAE_TINY, 32),
}


def readme_snippet() -> str:
    """The README's fine-tuning snippet: the python block that calls load_pretrained."""
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)
    found = [b for b in blocks if "load_pretrained(" in b]
    assert len(found) == 1, "README.md should show one python block with load_pretrained"
    assert len(found[0].strip().splitlines()) <= 3, found[0]
    return found[0]


def exported(run_dir):
    """The export's pretrained tensors (every key not in the card's `initialized` group)."""
    card = json.load(open(os.path.join(run_dir, "export", "model_card.json")))
    state = torch.load(os.path.join(run_dir, "export", "backbone.pt"), weights_only=True)
    initialized = tuple(card["key_groups"]["initialized"])
    return {k: v for k, v in state.items() if not (initialized and k.startswith(initialized))}


@pytest.mark.parametrize("case", list(CASES))
def test_readme_snippet_fine_tunes_every_method(case, tmp_path):
    method, overrides, size = CASES[case]
    run_dir, _ = make_run(str(tmp_path), method, overrides=overrides)
    code = readme_snippet()
    assert "out_channels=14" in code and "in_channels=4" in code
    scope: dict = {}
    exec(code.replace("runs/<name>", run_dir), scope)  # the snippet as a user pastes it
    net, report = scope["net"], scope["report"]

    pretrained = exported(run_dir)
    state = net.state_dict()
    # Every pretrained tensor loaded: unchanged, or (the stem) repeated over 4 input channels and scaled 1/4.
    assert sorted(report.loaded) == sorted(report.prefix + k for k in pretrained)
    assert report.adapted and set(report.adapted) <= set(report.loaded)
    for key, value in pretrained.items():
        got = state[report.prefix + key]
        if report.prefix + key in report.adapted:
            axes = [i for i, (a, b) in enumerate(zip(got.shape, value.shape)) if a != b]
            assert len(axes) == 1 and value.shape[axes[0]] == 1 and got.shape[axes[0]] == 4, key
            for channel in range(4):
                torch.testing.assert_close(got.narrow(axes[0], channel, 1), value / 4, rtol=0, atol=0)
        else:
            torch.testing.assert_close(got, value, rtol=0, atol=0, msg=key)
    # Nothing pretrained was dropped; the task head is new.
    assert not report.reinitialized and report.initialized
    assert all(not k.startswith(tuple(report.initialized)) for k in report.loaded)
    assert "loaded" in str(report) and report.network in str(report)

    x = torch.rand(1, 4, size, size, size)
    args = (torch.zeros(1, 3),) if method == "drasclr" else ()  # DrasCLR's encoder takes the atlas location
    with torch.no_grad():
        out = net.eval()(x, *args)
    assert out.shape[:2] == (1, 14) and torch.isfinite(out).all()


def test_every_source_gives_the_same_network(tmp_path):
    """A run folder, its export/, a bundle, safetensors, the weights files, and a run with only a checkpoint."""
    from rayssl import load_pretrained
    from rayssl.export import export_run

    run_dir, _ = make_run(str(tmp_path), "gvsl")
    bundle = export_run(run_dir, "bundle", out=str(tmp_path / "bundle"))
    st = export_run(run_dir, "safetensors", out=str(tmp_path / "st"))
    reference, ref_report = load_pretrained(run_dir, out_channels=3)
    sources = [os.path.join(run_dir, "export"), os.path.join(run_dir, "export", "backbone.pt"), bundle,
               os.path.join(bundle, "models", "model.pt"), st, os.path.join(st, "model.safetensors")]
    shutil.copytree(run_dir, tmp_path / "ckpt_only")
    shutil.rmtree(tmp_path / "ckpt_only" / "export")
    sources.append(str(tmp_path / "ckpt_only"))
    for source in sources:
        net, report = load_pretrained(source, out_channels=3)
        assert report.loaded == ref_report.loaded, source
        for key in report.loaded:
            torch.testing.assert_close(net.state_dict()[key], reference.state_dict()[key], rtol=0, atol=0)
    assert "checkpoint_000002" in report.source and report.step == 2


def test_clear_errors(tmp_path):
    from rayssl import load_pretrained

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_card.json"):
        load_pretrained(str(tmp_path / "empty"))
    torch.save({}, tmp_path / "lonely.pt")
    with pytest.raises(FileNotFoundError, match="no model_card.json beside it"):
        load_pretrained(str(tmp_path / "lonely.pt"))
    run_dir, _ = make_run(str(tmp_path), "voco")
    # An argument that changes an encoder tensor's shape is refused, naming the tensor.
    with pytest.raises(ValueError, match=r"encoder tensor conv_0\..*does not fit"):
        load_pretrained(run_dir, features=[8, 8, 16, 16, 32, 8])
    with pytest.raises(ValueError, match="out_channels=0"):
        load_pretrained(run_dir, out_channels=0)
    # Other arguments pass through (the decoder is not pretrained by VoCo).
    net, report = load_pretrained(run_dir, out_channels=2, dropout=0.1)
    assert report.network_kwargs["dropout"] == 0.1 and report.network_kwargs["out_channels"] == 2


def test_import_rayssl_does_not_import_ray():
    import subprocess
    import sys

    code = "import sys, rayssl; rayssl.load_pretrained; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_run_folder_rerun_command_starts_a_new_run(voco_resume_runs):
    """The run folder's README re-run command resolves to a new run (no name: pretrain picks a fresh
    one) with the run's settings, and config.yaml holds the values the run resolved."""
    import yaml

    from rayssl.cli import _resolve, build_parser

    for result in (voco_resume_runs.full, voco_resume_runs.part):
        run_dir = result.run_dir
        config = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
        assert config["train"]["heldout_every"] == 2 and config["train"]["use_gpu"] is False
        assert config["name"] is None
        guide = open(os.path.join(run_dir, "README.md")).read()
        command = re.search(r"`(rayssl pretrain --config [^`]+)`", guide).group(1)
        args = build_parser().parse_args(shlex.split(command)[1:])
        assert os.path.exists(args.config)
        cfg = _resolve(args, [])
        assert cfg.name is None and cfg.method == "voco" and cfg.train.steps == 4
        assert cfg.data.store == config["data"]["store"]


# ---------------------------------------------------------------------------------------------
# The smaller items of issue 28: loss.png's probe panel, MLflow's experiment and URI, TensorBoard's config
# ---------------------------------------------------------------------------------------------
def test_probe_panel_shows_the_gain_on_a_fixed_span(tmp_path):
    """A gain of -0.0015 reads as a small loss against a zero line, not as a curve filling the axis;
    the title names the probe set as the user did, not the cache's hashed store name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rayssl.train.runfolder import PROBE_MIN_HALF_SPAN, draw_probe, plot_losses

    probe = {"store": "/home/u/.cache/rayssl/demo-n6-s9137f2a1.zarr", "probe_set": "demo", "metric": "dice",
             "random_init": 0.2641, "points": [{"step": 20, "score": 0.2636}, {"step": 40, "score": 0.2626}]}
    fig, ax = plt.subplots()
    draw_probe(ax, probe, 40)
    low, high = ax.get_ylim()
    assert high - low >= 2 * PROBE_MIN_HALF_SPAN - 1e-12 and low < 0 < high
    gains = [line for line in ax.lines if list(line.get_xdata()) == [20, 40]]
    assert len(gains) == 1
    assert [round(v, 6) for v in gains[0].get_ydata()] == [-0.0005, -0.0015]
    title = ax.get_title()
    assert "demo phantoms" in title and "-0.0015" in title and "9137f2a1" not in title
    labels = ax.get_legend_handles_labels()[1]
    assert any("random init" in label and "0.2641" in label for label in labels)
    plt.close(fig)

    # A large gain widens the axis; a store path given by the user is named by its file name.
    fig, ax = plt.subplots()
    draw_probe(ax, {**probe, "probe_set": "/data/my_probe.zarr", "points": [{"step": 40, "score": 0.61}]}, 40)
    assert ax.get_ylim()[1] > 0.61 - 0.2641 and "on my_probe:" in ax.get_title()
    plt.close(fig)

    metrics = [{"step": s, "loss": 1.0 / s, "crops_per_s": 1.0, "samples_per_s": 1.0} for s in range(1, 41)]
    path = plot_losses(str(tmp_path), metrics, ["loss"], probe)
    assert os.path.getsize(path) > 10_000


def test_mlflow_experiment_name_from_the_environment_and_an_absolute_uri(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from rayssl.config import resolve_config
    from rayssl.train.tracking import read_mlflow_record, start_mlflow_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "my-study")
    cfg = resolve_config(method="voco", profile="cpu", overrides=["name=r1"])
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    run = start_mlflow_run(str(run_dir), cfg, "sqlite:///mlflow.db")
    record = read_mlflow_record(str(run_dir))
    assert record["tracking_uri"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert MlflowClient(record["tracking_uri"]).get_experiment(record["experiment_id"]).name == "my-study"
    # From another folder the recorded URI still finds the same store and run.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert start_mlflow_run(str(run_dir), cfg, record["tracking_uri"]).run_id == run.run_id
    assert not (tmp_path / "elsewhere" / "mlflow.db").exists()


def test_tensorboard_gets_the_resolved_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from rayssl.config import resolve_config
    from rayssl.train.runfolder import rerun_config
    from rayssl.train.tracking import TrackingCallback

    cfg = resolve_config(method="voco", profile="cpu", overrides=["name=r1", "train.steps=7"])
    text = rerun_config(cfg, str(tmp_path))
    assert text.startswith("# rayssl run r1") and f"rayssl pretrain --config {tmp_path}/config.yaml" in text
    (tmp_path / "config.yaml").write_text(text)
    tracker = TrackingCallback(str(tmp_path), start_step=0)
    tracker.log({"step": 1, "loss": 1.0})
    tracker.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(content)
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    assert hparams["train.steps"].number_value == 7 and hparams["method"].string_value == "voco"
    assert hparams["name"].string_value == "None"  # config.yaml leaves the name out (re-runs get a fresh one)
    assert any(tag.startswith("config") for tag in events.Tags()["tensors"])


def test_truncated_weights_are_named_not_a_traceback(tmp_path):
    """A truncated export/backbone.pt (or .safetensors): load_pretrained and the probe's loader name the file."""
    from rayssl import load_pretrained
    from rayssl.eval.features import load_run_weights
    from rayssl.export import export_run

    run_dir, _ = make_run(str(tmp_path), "gvsl")
    st = export_run(run_dir, "safetensors", out=str(tmp_path / "st"))
    for weights in (os.path.join(run_dir, "export", "backbone.pt"), os.path.join(st, "model.safetensors")):
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)
        with pytest.raises(ValueError, match=re.escape(weights) + r": cannot read the weights .*truncated or corrupt"):
            load_pretrained(os.path.dirname(weights))
    with pytest.raises(ValueError, match=r"backbone.pt: cannot read the weights"):
        load_run_weights(run_dir)
