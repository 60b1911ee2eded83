"""Config resolution: profiles, --set routing, and errors that name the field (no Ray involved)."""

import time

import pytest

from rayssl.config import RunConfig, resolve_config


def test_defaults_and_profile_are_recorded():
    cfg = resolve_config(method="voco", profile="cpu")
    assert cfg.method == "voco" and cfg.profile == "cpu"
    assert cfg.to_yaml_dict()["voco"] == cfg.method_config or "voco" in cfg.to_yaml_dict()


def test_set_routes_dotted_and_bare_names():
    cfg = resolve_config(method="voco", profile="cpu",
                         overrides=["train.steps=7", "data.on_error=skip", "seed=3", "train.lr=3e-4"])
    assert cfg.train.steps == 7 and cfg.data.on_error == "skip" and cfg.seed == 3 and cfg.train.lr == 3e-4
    cfg = resolve_config(method="voco", profile="cpu", overrides=["batch_size=3"])  # unique bare name
    assert cfg.train.batch_size == 3


def test_yaml_round_trip(tmp_path):
    import yaml

    cfg = resolve_config(method="voco", profile="cpu", overrides=["train.steps=5"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_yaml_dict()))
    again = resolve_config(file=str(path))
    assert again == cfg


@pytest.mark.parametrize("override, field", [
    ("train.steps=0", "train.steps"),
    ("train.lr=-1", "train.lr"),
    ("data.on_error=ignore", "data.on_error"),
    ("data.actors_min=3", "data"),
])
def test_invalid_values_name_the_field_fast(override, field):
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as err:
        resolve_config(method="voco", profile="cpu", overrides=[override])
    assert field in str(err.value)
    assert time.perf_counter() - t0 < 5


def test_unknown_field_lists_choices():
    with pytest.raises(ValueError, match="unknown field"):
        resolve_config(method="voco", profile="cpu", overrides=["no_such_field=1"])
    with pytest.raises(ValueError, match="unknown method"):
        resolve_config(method="nope")


def test_run_config_rejects_unknown_keys():
    with pytest.raises(Exception):
        RunConfig.model_validate({"method": "voco", "trian": {}})


def test_use_gpu_selects_the_paper_profile_unless_a_profile_is_given():
    """A driver on a CPU head sees no GPU: `--use-gpu` must still get the GPU-sized settings."""
    import argparse

    from rayssl.cli import _resolve

    base = dict(method="voco", config=None, overrides=[])
    cfg = _resolve(argparse.Namespace(**base, profile=None, use_gpu=True), ["train.use_gpu=true"])
    assert cfg.profile == "paper" and cfg.train.use_gpu is True
    cfg = _resolve(argparse.Namespace(**base, profile="cpu", use_gpu=True), [])
    assert cfg.profile == "cpu"


def test_text_fields_keep_the_text_as_written():
    """A Tune trial id such as 20942_00000 is valid YAML for an integer; a run name must stay text."""
    cfg = resolve_config(method="voco", profile="cpu",
                         overrides=["name=20942_00000", "data.store=007.zarr", "voco.lambda_reg=0.5"])
    assert cfg.name == "20942_00000" and cfg.data.store == "007.zarr"
    assert cfg.method_cfg().lambda_reg == 0.5


def test_a_choice_made_by_prepare_is_written_into_the_run_config():
    """DrasCLR.prepare picks the atlas when none is given; the run records it (model card, resume)."""
    cfg = resolve_config(method="drasclr", profile="cpu", overrides=["drasclr.temperature=0.3"])
    assert cfg.method_cfg().atlas is None
    assert cfg.with_method_cfg(cfg.method_cfg()) is cfg  # nothing resolved: the same config
    resolved = cfg.with_method_cfg(cfg.method_cfg().model_copy(update={"atlas": "demo_003"}))
    assert resolved.method_cfg().atlas == "demo_003" and resolved.method_cfg().temperature == 0.3
    assert resolved.to_yaml_dict()["drasclr"]["atlas"] == "demo_003"
    assert cfg.method_cfg().atlas is None  # the original is unchanged
