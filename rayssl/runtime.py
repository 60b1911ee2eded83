"""Start a private local Ray runtime or attach to a cluster that answers: the one way every command gets Ray."""

from __future__ import annotations

import os
import socket
import sys
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


# Where a run keeps Ray's own output (its loggers, Python warnings, the forwarded lines of Ray's workers and
# actors), so the console holds rayssl's lines only.
RAY_LOG_NAME = "ray.log"
# The marker of rayssl's own lines, which workers print to stdout and the driver shows as they are.
RAYSSL_LINE = "[rayssl]"


def _worker_prefix(data: dict[str, Any]) -> str:
    """Ray's "(ActorName pid=N, ip=...)" prefix of a forwarded line, without its colour codes."""
    if data.get("pid") == "raylet":
        return "(raylet)"
    who = data.get("actor_name") or data.get("task_name") or ""
    ip = data.get("ip")
    where = "" if not ip or ip == data.get("localhost") else f", ip={ip}"
    return f"({who + ' ' if who else ''}pid={data.get('pid')}{where})"


class RayOutputToFile:
    """For the duration of a run, Ray's own output goes to `path` and only rayssl's lines reach the console.

    On entering, Ray's Python loggers (`ray`, `ray.data`, ... whose handlers write to the terminal) and
    Python warnings write to the file; after `ray.init`, `take_worker_output()` replaces Ray's printer of
    forwarded worker lines (which adds a coloured `(RayTrainWorker pid=...)` prefix) with one that prints
    rayssl's lines as they are and appends every other line, prefixed, to the file. Everything is put
    back on exit. Ray's printer is private API (`ray._private.ray_logging`); without it, worker lines
    stay as Ray prints them.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: Any = None
        self._streams: list[tuple[Any, Any]] = []
        self._showwarning: Any = None
        self._ray_printers: list[tuple[str, Any]] = []
        self._dispatcher: Any = None
        self._ray_error_printer: Any = None

    def __enter__(self) -> "RayOutputToFile":
        import logging
        import warnings

        import ray

        self._ray_was_running = ray.is_initialized()
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        terminals = {sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__}
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if not isinstance(logger, logging.Logger) or not (name == "ray" or name.startswith("ray.")):
                continue
            for handler in logger.handlers:
                if type(handler) is not logging.FileHandler and getattr(handler, "stream", None) in terminals:
                    self._streams.append((handler, handler.setStream(self._file)))
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._warning
        return self

    def _warning(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
        import warnings

        self._file.write(warnings.formatwarning(message, category, filename, lineno, line))

    def write(self, text: str) -> None:
        """Append `text` (e.g. a traceback) to the log file."""
        if self._file is not None:
            self._file.write(text if text.endswith("\n") else text + "\n")

    def take_worker_output(self) -> None:
        """Route the lines Ray forwards to this driver (call after `ray.init`): its workers' and actors' lines,
        and the messages of its error listener (e.g. the raylet's "N worker processes have been started"
        warning), which Ray prints through `print_to_stdstream` directly, not through the dispatcher."""
        try:
            import ray._private.worker as ray_worker
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return
        self._ray_error_printer = ray_worker.print_to_stdstream
        ray_worker.print_to_stdstream = self._error_lines
        with dispatcher._lock:
            self._ray_printers = [pair for pair in dispatcher.handlers if pair[0] == "ray_print_logs"]
        if not self._ray_printers:
            return  # log_to_driver=False (e.g. a test's runtime): no worker lines are forwarded
        self._dispatcher = dispatcher
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("rayssl_print_logs", self._worker_lines)

    def _error_lines(self, data: dict[str, Any], ignore_prefix: bool = False) -> None:
        if self._file is None:
            self._late_lines(data)
        else:
            self._worker_lines(data)

    def _worker_lines(self, data: dict[str, Any]) -> None:
        if data.get("pid") == "autoscaler":
            self._autoscaler_lines(data)
            return
        prefix = None
        for line in data.get("lines", []):
            if line.startswith(RAYSSL_LINE):
                print(line, flush=True)
            else:
                if data.get("pid") == "raylet" and "memory" in line.lower():
                    # e.g. a worker killed by Ray's memory monitor: the user needs to see it
                    print(f"{RAYSSL_LINE} Ray says: {line.strip().splitlines()[0]} (the rest in {self.path})", flush=True)
                prefix = prefix or _worker_prefix(data)
                self._file.write(f"{prefix} {line}\n")

    def _late_lines(self, data: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as self._file:
            self._worker_lines(data)
        self._file = None

    def _autoscaler_lines(self, data: dict[str, Any]) -> None:
        """The autoscaler's events (its status tables are noise): a warning or error (e.g. a resource request
        no node type can meet) also to the console, in rayssl's words; the rest to the file."""
        from ray._private.worker import filter_autoscaler_events

        for event in filter_autoscaler_events(data.get("lines", [])):
            if "Warning:" in event or "Error:" in event:
                print(f"{RAYSSL_LINE} Ray's autoscaler says: {event.strip()}", flush=True)
            self._file.write(f"(autoscaler) {event}\n")

    def __exit__(self, *exc: Any) -> None:
        import warnings

        import ray

        if self._dispatcher is not None:
            self._dispatcher.remove_handler("rayssl_print_logs")
            if ray.is_initialized() and self._ray_was_running:  # a runtime the caller started: as it was
                for name, handler in self._ray_printers:
                    self._dispatcher.add_handler(name, handler)
            elif ray.is_initialized():
                # The runtime this run started lives until the process ends (the CLI): Ray's late lines (actors
                # shutting down) still go to the file, reopened for each batch.
                self._dispatcher.add_handler("rayssl_print_logs", self._late_lines)
        if self._ray_error_printer is not None and self._ray_was_running:
            import ray._private.worker as ray_worker

            ray_worker.print_to_stdstream = self._ray_error_printer
        for handler, stream in self._streams:
            handler.setStream(stream)
        warnings.showwarning = self._showwarning
        self._file.close()
        self._file = None


def error_summary(err: BaseException) -> str:
    """A failure in a few lines: a Ray Train failure as its workers' (or controller's) own error messages
    (the last line of each, one per distinct message), not Ray's wrapper with every rank's traceback."""
    failures = getattr(err, "worker_failures", None) or {}
    if not failures and getattr(err, "controller_failure", None) is not None:
        failures = {"controller": err.controller_failure}
    if not failures:
        return str(err)
    messages: dict[str, list[str]] = {}
    for who, failure in failures.items():
        lines = [line for line in str(failure).strip().splitlines() if line.strip()]
        messages.setdefault(lines[-1] if lines else type(failure).__name__, []).append(str(who))
    return "; ".join(f"{message} (rank {', '.join(who)})" if who != ["controller"] else message
                     for message, who in messages.items())
