"""Small test utilities shared by several test modules: free ports, 2-rank gloo process groups, a tiny MLSSCL, corrupt chunks."""

from __future__ import annotations

import glob
import importlib.util
import os
import socket
from types import ModuleType
from typing import Callable

# A tiny VoCo: 2x2 base crops of a 64x64x32 region, 32^3 inputs, a narrow UNet encoder.
VOCO_TINY = ["n_x=2", "n_y=2", "region_size=[64,64,32]", "input_size=32", "num_random_crops=2",
             "unet_features=[4,4,8,8,16,4]", "proj_hidden_dim=32", "proj_dim=32",
             "train.batch_size=1", "data.split=all", "data.actors_max=1"]

# A tiny MLSSCL (no driver-side preparation that would read the voxels of a corrupt volume).
MLSSCL_TINY = ["clip_length=4", "long_stride=3", "short_stride=2", "plane_size=12", "image_size=12",
               "resnet_widen_factor=0.125", "proj_dim=16", "queue_length=8", "intensity=none",
               "train.batch_size=1", "data.split=all", "data.actors_max=1", "train.report_every=1"]


# An address nobody listens on (the discard port): a connection is refused at once, so a check that ran
# after Ray started would show up as a connection error.
NOBODY_LISTENS = "127.0.0.1:9"


def corrupt_volume(store, group):
    """Overwrite every chunk of `group`'s image with bytes no codec can decode."""
    chunks = [p for p in glob.glob(os.path.join(str(store), group, "image", "c", "**"), recursive=True)
              if os.path.isfile(p)]
    assert chunks, group
    for chunk in chunks:
        with open(chunk, "wb") as f:
            f.write(b"not a blosc frame" * 3)
    return chunks


def free_ports(n: int = 1) -> list[int]:
    """n distinct loopback ports free right now (all bound at once, so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _gloo_rank(rank: int, worker: Callable[[int, str], None], port: int, out_dir: str, world_size: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        worker(rank, out_dir)
    finally:
        dist.destroy_process_group()


def run_gloo_ranks(worker: Callable[[int, str], None], out_dir: str, world_size: int = 2) -> None:
    """Run `worker(rank, out_dir)` in `world_size` spawned processes joined in one gloo process group.

    `worker` must be importable by name (a module-level function) and writes its results to out_dir.
    """
    import torch.multiprocessing as mp

    mp.spawn(_gloo_rank, args=(worker, free_ports(1)[0], str(out_dir), world_size), nprocs=world_size, join=True)


def load_export(exported, network_cls):
    """Build `network_cls(**exported.network_kwargs)` and load the export into it (strict=False):
    no unexpected key, every exported key lands in the network with its exact value, and every
    declared key group matches some key. Returns (network, load result) for further checks."""
    import torch

    net = network_cls(**exported.network_kwargs)
    result = net.load_state_dict(exported.state_dict, strict=False)
    assert result.unexpected_keys == []
    loaded = set(exported.state_dict)
    assert not loaded & set(result.missing_keys)
    assert loaded <= set(net.state_dict())
    net_state = net.state_dict()
    for key, value in exported.state_dict.items():
        torch.testing.assert_close(net_state[key], value, rtol=0, atol=0, msg=key)
    for prefixes in exported.key_groups.values():
        for prefix in prefixes:
            assert any(k.startswith(prefix) for k in loaded), prefix
    return net, result


class MotoServer:
    """moto's standalone S3-compatible server on 127.0.0.1 (a real HTTP server in its own process).

    `start()` waits until it answers (about 2 s); `env` holds the standard AWS variables that point
    boto/s3fs at it; `stop()` kills it (used to simulate an object store going away).
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        self.process = None

    def start(self, timeout: float = 30.0) -> "MotoServer":
        import subprocess
        import sys
        import time
        import urllib.request

        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self.process.returncode} (is moto[server] installed?)")
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def limit_file_size() -> None:
    """Ray `worker_process_setup_hook`: cap this worker's file writes at RAYSSL_TEST_FSIZE bytes.

    RLIMIT_FSIZE stands in for a full disk: a write past it fails with EFBIG (Python ignores SIGXFSZ).
    Set per worker because a Ray runtime itself cannot start under the limit (its object store file is larger).
    """
    import resource

    limit = int(os.environ["RAYSSL_TEST_FSIZE"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def assert_run_records_its_network_and_config(run_dir, method: str, steps: int) -> None:
    """A finished `steps`-step run of `method`: a finite loss at every step, an export that loads
    strictly into the network its model card names, and a config.yaml that resolves to the method's
    config class, with the choices prepare() made (DrasCLR's atlas and landmarks)."""
    import importlib
    import json

    import torch

    from rayssl.config import resolve_config
    from rayssl.methods import get_method_class

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)

    card = json.load(open(os.path.join(run_dir, "export", "model_card.json")))
    assert card["method"] == method and card["steps"] == steps
    module, name = card["network"].rsplit(".", 1)
    net = getattr(importlib.import_module(module), name)(**card["network_kwargs"])
    state = torch.load(os.path.join(run_dir, "export", "backbone.pt"), weights_only=True)
    net.load_state_dict(state, strict=True)  # the export holds every key of the network it names

    resolved = resolve_config(file=os.path.join(run_dir, "config.yaml"))
    assert resolved.method == method
    method_cfg = resolved.method_cfg()
    assert isinstance(method_cfg, get_method_class(method).config_cls)
    if method == "drasclr":
        assert method_cfg.atlas is not None and card["landmarks"]["atlas"] == method_cfg.atlas
        assert card["landmarks"]["count"] and card["landmarks"]["count"] > 0


def run_cli(args: list[str], cwd, ray_address: str | None = None, timeout: float = 600):
    """`rayssl ARGS` as a user runs it: a subprocess whose stdout and stderr are pipes (not a terminal),
    attached to `ray_address` (the session's runtime) through RAY_ADDRESS when given. Returns the
    CompletedProcess (text)."""
    import subprocess
    import sys

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run([sys.executable, "-m", "rayssl.cli", *args], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_clean_console(text: str, ray_log: str) -> None:
    """A run's console holds rayssl's lines only: no Ray worker prefixes, colour codes or Ray's C++ log lines;
    Ray's own output went to `ray_log` instead."""
    assert "\x1b[" not in text, text
    assert "pid=" not in text and "core_worker" not in text and "Token authentication" not in text, text
    assert "Traceback" not in text, text
    assert os.path.isfile(ray_log), ray_log
    with open(ray_log) as f:
        assert "pid=" in f.read(), ray_log  # Ray's workers and actors did say things: here, not on the console


def resumed_losses_equal_uninterrupted(cfg, store, make_batch) -> tuple[list[float], list[float]]:
    """In-process exact-resume check of a method's `cpu` path: 3 steps in one go, and 2 steps + checkpoint (the
    loop's own writer and reader) + 1 step from a fresh method, builder, model and optimizer (a new process: new
    actors, new model). `make_batch(method, samples)` turns two ViewBuilder samples into the model's batch.
    Returns (uninterrupted losses, resumed losses); equal bit for bit when resume is exact."""
    import torch

    from rayssl.checkpoint import load_checkpoint_dir, write_checkpoint_dir
    from rayssl.data.pipeline import ViewBuilder
    from rayssl.data.volumes import load_volumes
    from rayssl.methods import get_method_class
    from rayssl.train.optim import build_optimizer, build_scheduler

    def fresh():
        method = get_method_class(cfg.method)(cfg.method_cfg())
        volumes = method.prepare(load_volumes(str(store), "all"))
        builder = ViewBuilder(volumes=volumes, plan_fn=method.plan, views_fn=method.views, seed=5)
        torch.manual_seed(0)
        model = method.build_model()
        optimizer = build_optimizer(list(model.parameters()), cfg.train)
        return method, builder, model, optimizer, build_scheduler(optimizer, cfg.train)

    def train(method, builder, model, optimizer, scheduler, steps):
        losses = []
        for step in steps:
            batch = make_batch(method, [builder.build_sample(2 * step + i) for i in range(2)])
            outputs = model(batch)
            loss = method.loss(outputs, batch)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            method.after_step(model, outputs, step + 1, 3)  # e.g. DrasCLR enqueues the step's keys
            losses.append(float(loss.detach()))
        return losses

    full = train(*fresh(), range(3))
    method, builder, model, optimizer, scheduler = fresh()
    first = train(method, builder, model, optimizer, scheduler, range(2))
    path = write_checkpoint_dir({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(), "method": method.state_dict()}, {"step": 2})
    state = load_checkpoint_dir(path)
    method, builder, model, optimizer, scheduler = fresh()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    method.load_state_dict(state["method"])
    return full, first + train(method, builder, model, optimizer, scheduler, range(2, 3))


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
