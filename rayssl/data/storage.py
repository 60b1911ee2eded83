"""Object-storage settings shared by the driver and Ray workers: fsspec defaults (passed as arguments) and the AWS / fsspec environment."""

from __future__ import annotations

import os
from typing import Any, Iterable

import fsspec
import fsspec.config

# Standard variables object-store clients read: botocore's AWS_* (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_PROFILE, ...) and fsspec's FSSPEC_<PROTOCOL>
# defaults (a JSON dict of storage options per protocol, read when fsspec is imported).
STORAGE_ENV_PREFIXES = ("AWS_", "FSSPEC_", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_")


def is_remote(store: str | os.PathLike) -> bool:
    """True for fsspec URLs other than local files (s3://, gs://, memory://, ...)."""
    text = str(store)
    return "://" in text and fsspec.utils.get_protocol(text) not in ("file", "local")


def storage_env() -> dict[str, str]:
    """The object-storage variables of this process's environment, to hand to Ray workers."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)}


def storage_runtime_env(stores: Iterable[str]) -> dict[str, Any] | None:
    """A Ray `runtime_env` passing `storage_env()` to workers when any store is remote, else None.

    Workers started by a local `ray.init` inherit the driver's environment anyway; workers of a
    cluster (or of a runtime started before the variables were set) do not, hence the forwarding.
    """
    env = storage_env()
    return {"env_vars": env} if env and any(is_remote(s) for s in stores) else None


def apply_storage_options(stores: Iterable[str], options: dict[str, Any] | None) -> None:
    """Make fsspec `options` (e.g. {"endpoint_url": ..., "key": ..., "secret": ...}) the defaults
    of the remote stores' protocols in this process (fsspec.config.conf, never os.environ: the
    options may hold credentials). Ray workers get them as an argument: `fsspec_defaults`."""
    if not options:
        return
    for protocol in sorted({fsspec.utils.get_protocol(str(s)) for s in stores if is_remote(s)}):
        fsspec.config.conf.setdefault(protocol, {}).update(options)


def fsspec_defaults(stores: Iterable[str]) -> dict[str, dict[str, Any]]:
    """This process's fsspec defaults (fsspec.config.conf) for the remote stores' protocols, to hand
    to Ray actors and tasks explicitly (`use_fsspec_defaults` there); {} for local stores."""
    protocols = {fsspec.utils.get_protocol(str(s)) for s in stores if is_remote(s)}
    return {p: dict(fsspec.config.conf[p]) for p in sorted(protocols) if fsspec.config.conf.get(p)}


def use_fsspec_defaults(defaults: dict[str, dict[str, Any]] | None) -> None:
    """Install `fsspec_defaults(...)` of the driver in this process (a Ray actor or task)."""
    for protocol, options in (defaults or {}).items():
        fsspec.config.conf.setdefault(protocol, {}).update(options)
