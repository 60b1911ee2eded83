"""benchmarks/gpu_check.py runs its GPU code path on CPU with tiny sizes (`--device cpu --tiny`), so it cannot rot."""

import importlib.util
import json
import os

import pytest

# ~80 s for two pretrain runs of a benchmark script (README: Testing)
pytestmark = [pytest.mark.slow, pytest.mark.extended]


def test_gpu_check_tiny_on_cpu(ray_local, demo_store_path, tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.py")
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--steps", "2", "--actors", "1", "--methods", "voco,gvsl",
                           "--data", str(demo_store_path), "--out", str(tmp_path / "runs"), "--json", str(out)])
    assert code == 0
    rows = json.load(open(out))["methods"]
    assert [r["method"] for r in rows] == ["voco", "gvsl"]
    for r in rows:
        assert r["status"] == "finished" and r["steps"] == 2
        assert r["step_time_s"] > 0 and r["samples_per_s"] > 0 and 0 <= r["data_wait_pct"] <= 100
        assert r["data_cpu_s_per_sample"] > 0 and r["cpu_cores_per_gpu_for_5pct_wait"] > 0
        assert r["peak_gpu_mem_mb"] is None  # CPU run
    # GVSL's views run their device part on the worker (views_on=device, as its paper profile); VoCo has none.
    assert rows[1]["device_views_s_per_batch"] > 0 and rows[0]["device_views_s_per_batch"] is None
