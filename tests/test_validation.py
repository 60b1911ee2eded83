"""Validation before Ray (issue 25, item 4): zero flags, inf/nan and bool numbers, YAML errors naming file and line,
and store, manifest, cache and MLflow problems found before Ray starts or a run folder is made.

`pretrain` is called with `address` set to a port nobody listens on: a check that ran after Ray would
surface as that address's ConnectionError instead of the error asserted here.
"""

import os
import shutil
import sys

import pytest

from rayssl.config import resolve_config

from helpers import MLSSCL_TINY, NOBODY_LISTENS



def _cfg(store, out, *extra):
    return resolve_config(method="mlsscl", profile="cpu",
                          overrides=[f"data.store={store}", f"out={out}", *MLSSCL_TINY, "train.steps=1", *extra])


def _pretrain_before_ray(cfg, **kwargs):
    """pretrain(cfg) that must fail before Ray: the error it raises, with Ray's state checked unchanged."""
    import ray

    from rayssl.train.trainer import pretrain

    was_up = ray.is_initialized()
    with pytest.raises(Exception) as info:
        pretrain(cfg, address=NOBODY_LISTENS, **kwargs)
    assert not isinstance(info.value, ConnectionError), f"the check ran after Ray was contacted: {info.value}"
    assert ray.is_initialized() == was_up
    return info.value


# ---- flags and numbers ---------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--steps", "--num-workers", "--probe-every"])
def test_zero_count_flags_are_refused_not_read_as_the_default(flag, capsys):
    from rayssl.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["pretrain", flag, "0"])
    assert info.value.code == 2
    assert f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", flag, "-3"])
    assert getattr(build_parser().parse_args(["pretrain", flag, "3"]), flag[2:].replace("-", "_")) == 3


@pytest.mark.parametrize("override, fragment", [
    ("train.lr=.inf", "train.lr: Input should be a finite number (got inf)"),
    ("train.lr=nan", "train.lr: Input should be a finite number"),
    ("train.grad_clip=.inf", "train.grad_clip: Input should be a finite number"),
    ("data.stores=[{uri: a.zarr, weight: .inf}, b.zarr]", "data.stores.0.weight: Input should be a finite number"),
    ("mlsscl.temperature=.inf", "mlsscl.temperature: must be a finite number (got inf)"),
    ("mlsscl.temperature=.nan", "mlsscl.temperature: must be a finite number"),
    ("mlsscl.temperature=inf", "mlsscl.temperature: must be a finite number"),
    ("train.steps=true", "train.steps: expected a number, not true/false (got True)"),
    ("train.batch_size=false", "train.batch_size: expected a number, not true/false"),
    ("seed=true", "seed: expected a number, not true/false"),
    ("mlsscl.queue_length=true", "mlsscl.queue_length: expected a number, not true/false"),
])
def test_numbers_refuse_inf_nan_and_true_false(override, fragment):
    with pytest.raises(ValueError) as info:
        resolve_config(method="mlsscl", profile="cpu", overrides=[override])
    assert fragment in str(info.value), str(info.value)


def test_real_bools_and_nulls_still_pass():
    cfg = resolve_config(method="mlsscl", profile="cpu", overrides=["train.amp=false", "train.grad_clip=null",
                                                                     "train.lr=3e-4", "train.steps=7"])
    assert cfg.train.amp is False and cfg.train.grad_clip is None and cfg.train.steps == 7


def test_infinite_value_in_a_config_file_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: mlsscl\ndata:\n  stores:\n    - {uri: a.zarr, weight: .inf}\n    - b.zarr\n")
    with pytest.raises(ValueError, match=r"data.stores.0.weight: Input should be a finite number"):
        resolve_config(profile="cpu", file=str(path))


# ---- YAML files ----------------------------------------------------------------------------


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: mlsscl\ntrain:\n  steps: 3\n   lr: 0.1\n")  # line 4 indented one space too far
    with pytest.raises(ValueError) as info:
        resolve_config(profile="cpu", file=str(bad))
    message = str(info.value)
    assert f"{bad}, line 4, column " in message and "not valid YAML" in message and "indentation" in message

    from rayssl.cli import main

    assert main(["recipe", "--config", str(bad)]) == 2  # the CLI prints the sentence, not a traceback
    err = capsys.readouterr().err
    assert f"{bad}, line 4" in err and "Traceback" not in err


@pytest.mark.parametrize("text, fragment", [
    ("method: mlsscl\nseed: 1\ntrain: 5\n", "line 3: section 'train' must be a mapping"),
    ("method: mlsscl\ndata: [a.zarr]\n", "line 2: section 'data' must be a mapping"),
    ("method: mlsscl\nmlsscl: fast\n", "line 2: section 'mlsscl' must be a mapping"),
    ("- method: mlsscl\n", "a config file must be a YAML mapping, got list"),
])
def test_a_section_that_is_not_a_mapping_names_the_file_and_line(tmp_path, text, fragment):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        resolve_config(profile="cpu", file=str(path))
    assert str(path) in str(info.value) and fragment in str(info.value), str(info.value)


def test_an_empty_section_is_an_empty_mapping(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: mlsscl\ntrain:\neval:\n")
    assert resolve_config(profile="cpu", file=str(path)).train.steps >= 1


# ---- stores, manifests, cache and MLflow: before Ray and before a run folder ----------------


def test_truncated_manifest_is_named_before_ray(tiny_store, tmp_path):
    store = tmp_path / "truncated.zarr"
    shutil.copytree(tiny_store, store)
    manifest = store / "manifest.parquet"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    runs = tmp_path / "runs"
    error = _pretrain_before_ray(_cfg(store, runs, "name=t"))
    assert isinstance(error, ValueError)
    assert f"manifest {manifest} cannot be read" in str(error) and "truncated or corrupt" in str(error)
    assert "rayssl convert" in str(error)
    assert not runs.exists()


@pytest.mark.parametrize("case", ["missing", "split", "empty_split_for_method"])
def test_store_problems_are_found_before_ray(tiny_store, tmp_path, case):
    runs = tmp_path / "runs"
    if case == "missing":
        error = _pretrain_before_ray(_cfg(tmp_path / "nowhere.zarr", runs, "name=m"))
        assert isinstance(error, FileNotFoundError) and "is not a rayssl store" in str(error)
    elif case == "split":
        error = _pretrain_before_ray(_cfg(tiny_store, runs, "name=s", "data.split=holdout"))
        assert isinstance(error, ValueError) and "no volume has split='holdout'" in str(error)
    else:  # GVSL needs two volumes; the `val` split holds one
        cfg = resolve_config(method="gvsl", profile="cpu",
                             overrides=[f"data.store={tiny_store}", f"out={runs}", "data.split=val", "name=g"])
        error = _pretrain_before_ray(cfg)
        assert isinstance(error, ValueError) and "needs at least 2 volumes" in str(error)
    assert not runs.exists()


def test_unwritable_demo_cache_is_named_before_ray(tmp_path, monkeypatch):
    """The demo store is built in $RAYSSL_CACHE on first use; a cache that cannot be written is a sentence.
    Here a file is in the way; tests/test_run_ownership.py checks a read-only cache folder."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("RAYSSL_CACHE", str(blocker))
    runs = tmp_path / "runs"
    cfg = resolve_config(method="mlsscl", profile="cpu", overrides=[f"out={runs}", *MLSSCL_TINY, "name=c"])
    error = _pretrain_before_ray(cfg)
    assert isinstance(error, ValueError), repr(error)
    assert f"cannot build the demo store in the cache folder {blocker}/demo" in str(error)
    assert "RAYSSL_CACHE" in str(error) and "--data" in str(error)
    assert not runs.exists()


def test_mlflow_uri_without_mlflow_installed_fails_before_ray(tiny_store, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` sees when it is not installed
    runs = tmp_path / "runs"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    error = _pretrain_before_ray(_cfg(tiny_store, runs, "name=f"), mlflow_uri=uri)
    assert isinstance(error, ValueError) and f"MLflow tracking ({uri}) needs the mlflow package" in str(error)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the environment's URI is checked the same way
    error = _pretrain_before_ray(_cfg(tiny_store, runs, "name=g"))
    assert "needs the mlflow package" in str(error)
    assert not runs.exists() and not os.path.exists(tmp_path / "mlflow.db")
