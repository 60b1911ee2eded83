"""Tune sweeps: search-space files and their validation, and a 2-trial sweep end to end in its own Ray runtime."""

import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from rayssl.methods import available_methods
from rayssl.tune.space import format_override, load_space, validate_space
from rayssl.tune.sweep import probe_points

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VOCO = ["n_x=2", "n_y=2", "region_size=[64,64,32]", "input_size=32", "num_random_crops=2",
             "unet_features=[4,4,8,8,16,4]", "proj_hidden_dim=32", "proj_dim=32", "train.batch_size=1",
             "data.split=all", "data.actors_max=1"]


def _space(tmp_path, content):
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(content))
    return str(path)


class TestSearchSpaces:
    @pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "tune_spaces", "*.yaml"))))
    def test_shipped_space_is_valid_for_its_method(self, path):
        method = os.path.splitext(os.path.basename(path))[0]
        if method not in available_methods():
            pytest.skip(f"method {method} is not installed")
        space = load_space(method, path)
        assert space.params and all(p.path.split(".")[0] in (method, "train", "data") for p in space.params)
        assert validate_space(space, profile="cpu") >= 2

    def test_voco_space_covers_the_spec(self):
        space = load_space("voco", os.path.join(REPO, "tune_spaces", "voco.yaml"))
        params = {p.path: p for p in space.params}
        assert params["voco.n_xy"].args == (2, 3, 4, 5)
        assert params["voco.lambda_reg"].kind == "uniform" and params["voco.lambda_reg"].args == (0.5, 1.5)

    def test_value_rejected_by_the_method_config_names_field_and_file(self, tmp_path):
        path = _space(tmp_path, """
            voco.n_xy:
              choice: [2, 9]
            """)
        with pytest.raises(ValueError, match=r"(?s)space\.yaml.*voco\.n_xy=9.*n_xy"):
            validate_space(load_space("voco", path), profile="cpu")

    def test_values_are_checked_together(self, tmp_path):
        # Each alone is valid; n_xy=5 with a 16-voxel region is not (each base crop needs >= 4 voxels).
        path = _space(tmp_path, """
            voco.n_xy:
              choice: [2, 5]
            voco.region_size:
              choice: [[96, 96, 32], [16, 16, 32]]
            """)
        with pytest.raises(ValueError, match="region_size"):
            validate_space(load_space("voco", path), profile="cpu")

    @pytest.mark.parametrize("body, message", [
        ("voco.nope:\n  choice: [1]\n", "voco.nope: unknown field"),
        ("voco.lambda_reg:\n  normal: [0, 1]\n", "unknown distribution"),
        ("voco.lambda_reg:\n  uniform: [1.5, 0.5]\n", "lo < hi"),
        ("train.lr:\n  loguniform: [0, 1.0e-3]\n", "lo > 0"),
        ("voco.num_random_crops:\n  randint: [1, 2.5]\n", "integers"),
        ("voco.lambda_reg: 0.5\n", "one distribution"),
        ("- a\n", "mapping"),
    ])
    def test_malformed_spaces_fail_clearly(self, tmp_path, body, message):
        path = _space(tmp_path, body)
        with pytest.raises(ValueError, match=message):
            validate_space(load_space("voco", path), profile="cpu")

    def test_randint_is_inclusive_and_domains_sample_in_range(self, tmp_path):
        path = _space(tmp_path, """
            voco.num_random_crops:
              randint: [1, 3]
            voco.lambda_reg:
              loguniform: [0.1, 1.0]
            """)
        space = load_space("voco", path)
        domains = space.param_space()
        crops = {int(domains["voco.num_random_crops"].sample()) for _ in range(200)}
        assert crops == {1, 2, 3}
        lambdas = [float(domains["voco.lambda_reg"].sample()) for _ in range(200)]
        assert 0.1 <= min(lambdas) and max(lambdas) <= 1.0

    @pytest.mark.parametrize("value", [1e-5, 0.5, 3, True, "swin", [64, 64, 32], (0.5, 99.5)])
    def test_overrides_read_back_as_the_sampled_value(self, value):
        text = format_override("voco.x", value)
        assert text.startswith("voco.x=")
        expected = list(value) if isinstance(value, tuple) else value
        assert yaml.safe_load(text.split("=", 1)[1]) == expected

    def test_missing_space_file_says_where_it_looked(self):
        with pytest.raises(FileNotFoundError, match="no search space"):
            load_space("no_such_method")


def test_probe_points_are_evenly_spaced_and_end_at_the_last_step():
    assert probe_points(30, 3) == [10, 20, 30]
    assert probe_points(4, 2) == [2, 4]
    assert probe_points(5, 3) == [2, 3, 5]
    assert probe_points(2, 5) == [1, 2]


def test_rayssl_tune_cli_validates_then_delegates(monkeypatch, tmp_path):
    import rayssl.tune.sweep as sweep
    from rayssl.cli import main

    seen = {}

    def fake_run_sweep(method, **kwargs):
        seen.update(method=method, **kwargs)
        return sweep.SweepResult(sweep_dir=str(tmp_path), trials=[], best={"trial": "t"}, best_dir=None, wall_time_s=0)

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    code = main(["tune", "--method", "voco", "--num-samples", "3", "--steps", "6", "--out", str(tmp_path),
                 "--set", "train.batch_size=1", "--data", "/some/store", "--address", "auto", "--probes", "2"])
    assert code == 0
    assert seen["method"] == "voco" and seen["num_samples"] == 3 and seen["steps"] == 6 and seen["probes"] == 2
    assert seen["overrides"] == ["data.store=/some/store", "train.batch_size=1"] and seen["address"] == "auto"
    # A space value the method rejects stops `rayssl tune` before Ray starts (exit code 2, field named).
    bad = _space(tmp_path, "voco.n_xy:\n  choice: [7]\n")
    monkeypatch.undo()
    assert main(["tune", "--method", "voco", "--space", bad, "--out", str(tmp_path)]) == 2


# ---------------------------------------------------------------------------------------------
# End to end: 2 trials, the first stopped while its TorchTrainer runs; the second must start and finish.
# ---------------------------------------------------------------------------------------------
class StopFirstTrialMidTraining(FIFOScheduler):
    """Stops trial 0 at its first training report, while its TorchTrainer is still running.

    Module-level so the sweep's subprocess can import it. Stopping a live Train V2 run is the case in
    which the trial's resources must be released through the State API.
    """

    def on_trial_result(self, tune_controller, trial, result):
        if trial.trial_id.endswith("_00000") and "probe_score" not in result and result.get("step", 0) >= 1:
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


SWEEP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from test_tune import StopFirstTrialMidTraining
from rayssl.tune.sweep import run_sweep
result = run_sweep("voco", num_samples=2, steps=4, out={out!r}, name="sweep", overrides={overrides!r}, profile="cpu",
                   probes=2, max_concurrent=1, probe_store={store!r}, scheduler=StopFirstTrialMidTraining(),
                   probe={{"crops_per_volume": 2, "head_steps": 50}},
                   ray_init={{"num_cpus": 2, "object_store_memory": 512 * 1024 ** 2, "log_to_driver": False}})
print("RESULT", json.dumps({{"best_dir": result.best_dir, "wall": result.wall_time_s}}))
"""


@pytest.mark.slow
@pytest.mark.extended  # ~5 min: 3 pretrain segments + 4 probes in its own Ray runtime (README: Testing)
def test_two_trial_sweep_stops_one_and_runs_the_next(demo_store_path, tmp_path):
    from monai.networks.nets import BasicUNet

    out = str(tmp_path / "tune")
    script = SWEEP_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), out=out,
                                 overrides=[f"data.store={demo_store_path}", *TINY_VOCO], store=str(demo_store_path))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=840, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep_dir = os.path.join(out, "sweep")
    trials = {t["trial"]: t for t in json.load(open(os.path.join(sweep_dir, "trials.json")))}
    assert len(trials) == 2, trials
    first, second = (trials[k] for k in sorted(trials))
    # Trial 0 was stopped during its first segment: no probe, fewer steps than planned.
    assert first["status"] == "stopped early" and first["trained_steps"] < 4 and first["probe_score"] is None
    # Trial 1 got the freed CPUs, trained both segments and was probed after each.
    assert second["status"] == "completed" and second["trained_steps"] == 4 and second["probes"] == 2
    assert 0.0 <= second["probe_score"] <= 1.0
    for name in ("trials.csv", "scores.png", "sweep.json", "best/backbone.pt", "best/model_card.json", "best/config.yaml"):
        assert os.path.exists(os.path.join(sweep_dir, name)), name
    assert json.load(open(os.path.join(sweep_dir, "best", "trial.json")))["trial"] == second["trial"]
    assert 0.0 <= json.load(open(os.path.join(sweep_dir, "sweep.json")))["extra"]["untrained_probe_score"] <= 1.0
    card = json.load(open(os.path.join(sweep_dir, "best", "model_card.json")))
    net = BasicUNet(**card["network_kwargs"])
    missing, unexpected = net.load_state_dict(torch.load(os.path.join(sweep_dir, "best", "backbone.pt"),
                                                         weights_only=True), strict=False)
    assert not unexpected
    # The second trial resumed its own run exactly: its metrics cover steps 1..4 once each.
    steps = [json.loads(line)["step"] for line in open(os.path.join(second["run_dir"], "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]
