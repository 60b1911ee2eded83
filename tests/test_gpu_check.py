"""benchmarks/gpu_check.py runs its GPU code path on CPU with tiny sizes (`--device cpu --tiny`), so it cannot rot:
every method's `paper` profile (optimizer, schedule, norms, loss form, `views_on`) at its unit-test sizes."""

import json

import pytest

from helpers import load_benchmark


# ~4.5 min for five pretrain runs of a benchmark script, mostly Ray worker start-up (README: Testing)
@pytest.mark.slow
@pytest.mark.extended
def test_gpu_check_tiny_on_cpu_runs_every_paper_profile(ray_local, demo_store_path, tmp_path):
    gpu_check = load_benchmark("gpu_check")
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--steps", "2", "--actors", "1",
                           "--data", str(demo_store_path), "--out", str(tmp_path / "runs"), "--json", str(out)])
    assert code == 0
    rows = {r["method"]: r for r in json.load(open(out))["methods"]}
    assert sorted(rows) == sorted(gpu_check.METHODS) and set(gpu_check.METHODS) == set(gpu_check.TINY)
    for r in rows.values():
        assert r["profile"] == "paper", r["method"]
        assert r["status"] == "finished" and r["steps"] == 2, r["method"]
        assert r["batch_size"] == gpu_check.TINY_BATCH and r["workers"] == 1
        assert r["step_time_s"] > 0 and r["samples_per_s"] > 0 and 0 <= r["data_wait_pct"] <= 100
        assert r["data_cpu_s_per_sample"] > 0 and r["cpu_cores_per_gpu_for_5pct_wait"] > 0
        assert r["peak_gpu_mem_mb"] is None  # CPU run
    # Methods whose paper profile puts views on the device run that part on the worker (issue 29); others have none.
    from rayssl.methods import get_method_class

    for name, r in rows.items():
        on_device = get_method_class(name).profiles["paper"].get("views_on") == "device"
        assert (r["device_views_s_per_batch"] is not None and r["device_views_s_per_batch"] > 0) == on_device, name
    assert rows["gvsl"]["device_views_s_per_batch"] > 0


def test_gpu_check_says_which_methods_lack_the_profile_before_running_any(tmp_path, capsys):
    """`--profile official`: MLSSCL and MAE have none; the check names them and why, and runs nothing."""
    code = load_benchmark("gpu_check").main(["--device", "cpu", "--tiny", "--profile", "official", "--methods", "mlsscl,mae",
                           "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "gpu_check.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert "skipping mlsscl: no 'official' profile" in err and "skipping mae: no 'official' profile" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "gpu_check.json").exists()
