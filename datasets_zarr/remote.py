"""rayssl stores on object storage (any fsspec URL): a volume is uploaded from a local staging copy and becomes visible when its group zarr.json, written last, lands."""

from __future__ import annotations

import io
import json
import posixpath
from pathlib import Path

import fsspec

from .errors import ConversionError

# Object stores have no rename, so a volume cannot be built aside and moved into place as on a
# local disk. Instead its arrays are uploaded first and its group `zarr.json` (which holds the
# rayssl attributes and is what readers, the manifest scan and `convert`'s skip check look for)
# is uploaded last: a single PUT, atomic on S3-compatible stores. A replaced volume is hidden
# (its zarr.json deleted) before its old objects are removed.
GROUP_MARKER = "zarr.json"
# Default shard edge on object stores, in chunks per axis: 64^3 chunks in 256^3 shards make a
# 512x512x300 CT 8 objects instead of ~400, and a shard index of 64 entries (1 KiB).
CHUNKS_PER_SHARD = 4


def _fs(store: str):
    fs, root = fsspec.core.url_to_fs(store)
    return fs, root.rstrip("/")


def ensure_remote_store(store: str, root_attrs: dict, store_format: int) -> str:
    """Create the store's root group on the object store if missing; refuse a non-rayssl prefix."""
    fs, root = _fs(store)
    marker = posixpath.join(root, GROUP_MARKER)
    try:
        metadata = json.loads(fs.cat_file(marker))
    except FileNotFoundError:
        metadata = None
    except (OSError, ValueError) as error:
        raise ConversionError(f"{store}: cannot read zarr.json ({error}); check the URL, the endpoint "
                              "(AWS_ENDPOINT_URL) and the credentials.", path=store) from error
    if metadata is not None:
        fmt = metadata.get("attributes", {}).get("rayssl", {}).get("format")
        if metadata.get("node_type") != "group" or fmt is None:
            raise ConversionError(f"{store}: exists but is not a rayssl store (no rayssl attributes in "
                                  "zarr.json). Choose another output URL.", path=store)
        if fmt != store_format:
            raise ConversionError(f"{store}: store format {fmt} is not supported (this code writes "
                                  f"format {store_format}).", path=store)
        return store.rstrip("/")
    try:
        if fs.exists(root) and fs.ls(root):
            raise ConversionError(f"{store}: prefix exists, is not empty and is not a rayssl store. "
                                  "Choose a new or empty output URL.", path=store)
        fs.makedirs(root, exist_ok=True)  # creates the bucket when allowed; a no-op otherwise
    except (OSError, PermissionError) as error:
        raise ConversionError(f"{store}: cannot create the store ({error}); check the bucket exists and "
                              "the credentials may write to it.", path=store) from error
    group = {"zarr_format": 3, "node_type": "group", "attributes": root_attrs}
    fs.pipe_file(marker, json.dumps(group).encode())
    return store.rstrip("/")


def publish_volume(staged_group: Path, store: str, volume_id: str) -> str:
    """Upload a finished local volume group to `store/<volume_id>`, its zarr.json last; return its URL."""
    fs, root = _fs(store)
    final = posixpath.join(root, volume_id)
    marker = posixpath.join(final, GROUP_MARKER)
    if fs.exists(marker):
        fs.rm_file(marker)  # hidden first: never visible half replaced
    if fs.exists(final):
        fs.rm(final, recursive=True)
    files = sorted(p for p in staged_group.rglob("*") if p.is_file() and p != staged_group / GROUP_MARKER)
    if files:
        fs.put([str(p) for p in files], [posixpath.join(final, p.relative_to(staged_group).as_posix()) for p in files])
    fs.put_file(str(staged_group / GROUP_MARKER), marker)
    fs.invalidate_cache()
    return f"{store.rstrip('/')}/{volume_id}"


def read_remote_volume_attrs(store: str, volume_id: str) -> dict | None:
    """The `rayssl` attrs of a visible remote volume, or None."""
    fs, root = _fs(store)
    try:
        metadata = json.loads(fs.cat_file(posixpath.join(root, volume_id, GROUP_MARKER)))
    except (OSError, ValueError):
        return None
    attrs = metadata.get("attributes", {}).get("rayssl")
    return attrs if isinstance(attrs, dict) else None


def list_remote_volume_ids(store: str) -> list[str]:
    """Ids of the visible volumes (prefixes holding a group zarr.json) of a remote store, sorted."""
    fs, root = _fs(store)
    fs.invalidate_cache()
    found = fs.glob(posixpath.join(root, "*", GROUP_MARKER))
    names = (posixpath.basename(posixpath.dirname(p)) for p in found)
    return sorted(n for n in names if not n.startswith("."))


def write_remote_file(store: str, name: str, data: bytes) -> None:
    """Write `store/<name>` in one PUT (readers see the old or the new object, never a mix)."""
    fs, root = _fs(store)
    fs.pipe_file(posixpath.join(root, name), data)


def read_remote_bytes(store: str, name: str) -> bytes:
    fs, root = _fs(store)
    return fs.cat_file(posixpath.join(root, name))


def parquet_bytes(table) -> bytes:
    """A pyarrow table as Parquet bytes."""
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()
