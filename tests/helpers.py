"""Small test utilities shared by several test modules: free ports and 2-rank gloo process groups."""

from __future__ import annotations

import socket
from typing import Callable


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
