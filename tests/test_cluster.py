"""Cluster operation: cluster.yaml passes Ray's own autoscaler validation; `ray job submit` runs a pretraining job."""

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
import yaml

from helpers import free_ports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_YAML = os.path.join(REPO, "cluster.yaml")
CLUSTER_DOC = os.path.join(REPO, "docs", "cluster.md")


def _load_cluster_yaml() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def _validate(config: dict) -> dict:
    """What `ray up` does before it touches a cloud: fill defaults, then check the JSON schema and node types."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _commands(config: dict, *keys: str) -> str:
    return "\n".join(cmd for key in keys for cmd in config.get(key, []))


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class TestClusterYaml:
    def test_passes_ray_autoscaler_validation(self):
        prepared = _validate(_load_cluster_yaml())
        types = prepared["available_node_types"]
        head = types[prepared["head_node_type"]]
        assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
        gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
        cpu_types = [name for name, t in types.items()
                     if name != prepared["head_node_type"] and t["resources"].get("GPU", 0) == 0]
        assert len(gpu_types) == 1 and gpu_types[0]["resources"]["CPU"] > 0
        assert len(cpu_types) == 1 and types[cpu_types[0]]["resources"]["CPU"] > 0
        workers = [t for name, t in types.items() if name != prepared["head_node_type"]]
        assert all(0 <= t["min_workers"] <= t["max_workers"] for t in workers)
        assert sum(t["max_workers"] for t in workers) <= prepared["max_workers"]

    def test_validation_really_rejects_a_broken_config(self):
        broken = _load_cluster_yaml()
        broken["available_node_types"]["cpu_data"]["resources"]["CPU"] = 0.5  # schema: integers only
        with pytest.raises(Exception, match="0.5"):
            _validate(broken)
        broken = _load_cluster_yaml()
        broken["available_node_types"]["gpu_trainer"]["min_workers"] = 99  # > global max_workers
        with pytest.raises(ValueError, match="max_workers"):
            _validate(broken)

    def test_dashboard_is_loopback_only_and_auth_is_on(self):
        config = _load_cluster_yaml()
        start = _commands(config, "head_start_ray_commands")
        assert "--dashboard-host=127.0.0.1" in start
        assert "0.0.0.0" not in open(CLUSTER_YAML).read()
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            assert "RAY_AUTH_MODE=token" in _commands(config, key), key
        assert "disabled" not in open(CLUSTER_YAML).read()
        assert "~/.ray/auth_token" in config["file_mounts"]

    def test_setup_installs_the_project_and_keeps_cuda_torch_on_gpu_nodes(self):
        config = _load_cluster_yaml()
        setup = _commands(config, "setup_commands")
        assert "./setup.sh" in setup
        # The CPU index reaches pip only through setup.sh, which ignores it where nvidia-smi exists.
        cpu_index_uses = re.findall(r"\S*whl/cpu\S*", setup)
        assert cpu_index_uses and all(u.startswith("TORCH_INDEX_URL=") for u in cpu_index_uses)
        assert not re.search(r"install[^&;|]*\btorch\b", setup)  # no torch install outside setup.sh
        with open(os.path.join(REPO, "setup.sh")) as f:
            setup_sh = f.read()
        assert "nvidia-smi" in setup_sh and "TORCH_INDEX_URL" in setup_sh
        # Every node runs the same pinned Ray (nodes launched days apart must match).
        assert re.search(r'"ray==\d+\.\d+\.\d+"', setup)
        assert "PIP_CONSTRAINT" in setup
        assert config["file_mounts"]["~/rayssl"] == "."
        assert any(".venv" in pattern for pattern in config["rsync_exclude"])

    def test_shared_storage_is_mounted_on_every_node(self):
        config = _load_cluster_yaml()
        init = _commands(config, "initialization_commands")
        assert "mount -t nfs4" in init and "/mnt/rayssl" in init
        with open(CLUSTER_DOC) as f:
            doc = f.read()
        assert "--out /mnt/rayssl/runs" in doc

    def test_docker_variant_in_docs_validates_and_sizes_shm(self):
        """docs/cluster.md's Docker block, merged into cluster.yaml, passes validation; /dev/shm is set per node type."""
        with open(CLUSTER_DOC) as f:
            doc = f.read()
        blocks = re.findall(r"```yaml\n(# docker variant.*?)```", doc, flags=re.S)
        assert len(blocks) == 1, "docs/cluster.md must hold one ```yaml block starting with '# docker variant'"
        variant = _deep_merge(_load_cluster_yaml(), yaml.safe_load(blocks[0]))
        prepared = _validate(variant)
        docker = prepared["docker"]
        assert any("--shm-size" in o for o in docker["head_run_options"])
        assert any("/mnt/rayssl" in o for o in docker["run_options"])
        for name, node_type in prepared["available_node_types"].items():
            if name != prepared["head_node_type"]:
                assert any("--shm-size" in o for o in node_type["docker"]["worker_run_options"]), name


# ---------------------------------------------------------------------------------------------
# `ray job submit` against a head started with `ray start --head`
# ---------------------------------------------------------------------------------------------

TINY = ["n_x=2", "n_y=2", "region_size=[64,64,32]", "input_size=32", "num_random_crops=2",
        "unet_features=[4,4,8,8,16,4]", "proj_hidden_dim=32", "proj_dim=32",
        "train.batch_size=1", "data.split=all", "data.actors_max=1", "train.report_every=1"]


def _stop_head(leader: subprocess.Popen) -> None:
    """Stop every process of this head (the `ray start --block` process and its descendants), by pid.

    Never `ray stop`: that ends every Ray process of the user on the machine.
    """
    try:
        procs = [psutil.Process(leader.pid), *psutil.Process(leader.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    # The leader drains for up to 30 s after SIGTERM; its children are gone within seconds.
    _, alive = psutil.wait_procs(procs[1:], timeout=5)
    for proc in [*alive, *procs[:1]]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    leader.wait(timeout=30)


@pytest.fixture
def ray_head():
    """A separate head: `ray start --head` on loopback, its own temp dir and ports, stopped on teardown.

    Its own RAY_TMPDIR keeps its address file away from /tmp/ray, so no other `ray.init()` on this
    machine (the session's `ray_local` included) attaches to it by accident.
    """
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # Every port of its own: Ray's defaults (agent 52365, client server 10001, ...) may already be
    # held by another Ray instance on this machine, e.g. the session's `ray_local`.
    gcs, dashboard, agent_http, agent_grpc, runtime_env_agent, metrics, client = free_ports(7)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=temp_dir)
    env.pop("RAY_ADDRESS", None)
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    log = open(os.path.join(temp_dir, "ray_start.log"), "w")
    leader = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
         f"--ray-client-server-port={client}",
         "--num-cpus=2", "--object-store-memory=314572800", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 90
        while True:
            if leader.poll() is not None:
                raise RuntimeError(f"ray start exited with {leader.returncode}: {open(log.name).read()[-2000:]}")
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:  # noqa: BLE001 - the job API is not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield {"address": address, "env": env, "temp_dir": temp_dir, "ray_cli": ray_cli}
    finally:
        _stop_head(leader)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_pretrain_on_a_running_head(ray_head, demo_store_path, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "runs"
    # The job runs with the head's PATH: name the interpreter absolutely, not an activated `rayssl`.
    entrypoint = [sys.executable, "-m", "rayssl.cli", "pretrain", "--address", "auto",
                  "--data", str(demo_store_path), "--out", str(out), "--name", "jobrun", "--steps", "2",
                  *[arg for item in [*TINY, "train.checkpoint_every=1"] for arg in ("--set", item)]]
    deadline = time.monotonic() + 120
    while True:
        submit = subprocess.run(
            [ray_head["ray_cli"], "job", "submit", "--address", ray_head["address"], "--working-dir", REPO,
             "--no-wait", "--", *entrypoint],
            env=ray_head["env"], capture_output=True, text=True, timeout=120)
        # The job API answers before the head's job agent has registered (slow on a loaded machine).
        if "No available agent" not in submit.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)

    client = JobSubmissionClient(ray_head["address"])
    deadline = time.monotonic() + 300
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id}: {status}\n{logs[-4000:]}"

    run = out / "jobrun"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 2, summary
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (run / "export" / "backbone.pt").exists() and (run / "config.yaml").exists()
    assert "[rayssl] finished: 2/2 steps" in logs
    # `--address auto` attached to this head: the job started no Ray instance of its own, which
    # would have made a second session under the head's RAY_TMPDIR.
    sessions = [d for d in os.listdir(ray_head["temp_dir"]) if d.startswith("session_2")]
    assert len(sessions) == 1, sessions
