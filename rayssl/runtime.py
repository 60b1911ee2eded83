"""Start a private local Ray runtime or attach to a cluster that answers: the one way every command gets Ray."""

from __future__ import annotations

import os
import socket
from typing import Any

# How long the cluster's GCS port may take to accept a TCP connection before we give up.
CONNECT_TIMEOUT_S = 10.0


class ClusterUnreachable(ConnectionError):
    """The Ray address to attach to does not answer (a dead head, a stale address file, a typo)."""


def attach_address(address: str | None) -> str | None:
    """The cluster to attach to: `--address`, else RAY_ADDRESS (set inside a Ray job), else None.

    None means "start a private local runtime". Ray's own `ray.init()` without an address would
    attach to the cluster named in its "latest cluster on this machine" file, even a dead one, and
    retry "Failed to connect to GCS" for ever (/work/shared/NOTES.md, checked 2026-12-02).
    """
    if address:
        return address
    return os.environ.get("RAY_ADDRESS") or None


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a GCS address ("auto" resolved through Ray's address file); None if it has no port."""
    from ray._private import services

    target = address
    if target == "auto":
        try:
            target = services.canonicalize_bootstrap_address("auto") or ""
        except ConnectionError as err:
            raise ClusterUnreachable(
                f"--address auto: no running Ray cluster found on this machine ({err}); start one with "
                f"`ray start --head`, pass its address (host:6379), or omit --address for a local runtime") from err
    for scheme in ("ray://", "http://", "https://"):
        if target.startswith(scheme):
            target = target[len(scheme):]
    target = target.split("/", 1)[0]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host or "127.0.0.1", int(port)


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ClusterUnreachable, naming `address` and what to do, unless its port accepts a connection."""
    endpoint = _host_port(address)
    if endpoint is None:
        return  # nothing to probe (e.g. a bare host name): leave it to Ray
    host, port = endpoint
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as err:
        source = "" if address != os.environ.get("RAY_ADDRESS") else " (from RAY_ADDRESS)"
        raise ClusterUnreachable(
            f"Ray cluster at {address}{source} is not reachable: {host}:{port} did not accept a connection "
            f"within {timeout_s:.0f} s ({err}). Check that the head is running (`ray status --address {host}:{port}`) "
            f"and that this machine can reach it, or omit --address (and unset RAY_ADDRESS) to start a "
            f"local runtime") from err


def check_address(address: str | None) -> None:
    """Fail now, before slower preparation, if an address to attach to (`address` / RAY_ADDRESS) does not answer."""
    target = attach_address(address)
    if target is not None:
        check_reachable(target)


def start_or_attach(address: str | None = None, **init_kwargs: Any) -> str | None:
    """Attach to `address` / RAY_ADDRESS after checking it answers, or start a private local runtime.

    Does nothing when Ray is already initialised in this process. Returns the address attached to,
    or None for a local runtime.
    """
    import ray

    if ray.is_initialized():
        return None
    init_kwargs.setdefault("logging_level", "WARNING")
    target = attach_address(address)
    if target is None:
        ray.init(address="local", **init_kwargs)
        return None
    check_reachable(target)
    ray.init(address=target, **init_kwargs)
    return target
