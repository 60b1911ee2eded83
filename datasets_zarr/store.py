"""Writing volumes into a rayssl Zarr v3 store: arrays, rayssl + OME attributes, atomic publication."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rayssl.data.storage import is_remote

from . import remote
from .errors import ConversionError
from .preprocess import CT_BACKGROUND_HU, axcodes, direction_of, foreground_bbox, spacing_of

STORE_FORMAT = 1
INCOMING = ".incoming"
VOLUME_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
ROOT_ATTRS = {"rayssl": {"format": STORE_FORMAT, "axis_order": "xyz", "orientation": "RAS"}}
# An .incoming entry whose writer note names another host is only removed after this long.
FOREIGN_STALE_SECONDS = 24 * 3600


def blosc_codecs():
    """(serializer, compressors) of every rayssl array: little-endian bytes + blosc zstd level 3."""
    from zarr.codecs import BloscCodec, BytesCodec

    return BytesCodec(endian="little"), [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")]


def chunk_shape(chunks: int | Sequence[int]) -> tuple[int, int, int]:
    """Normalise `chunks` (an int or three ints, all > 0) to a 3-tuple."""
    values = (chunks,) * 3 if np.ndim(chunks) == 0 else tuple(chunks)
    if len(values) != 3 or any(int(v) != v or int(v) <= 0 for v in values):
        raise ConversionError(f"chunks={chunks!r}: give a positive int or three positive ints.")
    return tuple(int(v) for v in values)


def shard_shape(shards: int | Sequence[int] | None, chunks: tuple[int, int, int]
                ) -> tuple[int, int, int] | None:
    """Normalise `shards`; each side must be a multiple of the chunk side (Zarr sharding rule)."""
    if shards is None:
        return None
    values = chunk_shape(shards)
    if any(s % c for s, c in zip(values, chunks)):
        raise ConversionError(f"shards={shards!r} must be a multiple of chunks={chunks} along "
                              "every axis, e.g. chunks=64, shards=256.")
    return values


def validate_volume_id(volume_id: str) -> str:
    if not isinstance(volume_id, str) or not VOLUME_ID_PATTERN.match(volume_id) or volume_id in (
            ".", "..") or volume_id.startswith("."):
        raise ConversionError(
            f"volume id {volume_id!r} is invalid: use letters, digits, '.', '_' or '-' "
            "(and do not start with '.').", volume_id=str(volume_id))
    return volume_id


def ensure_store(store: str | os.PathLike) -> Path | str:
    """Create the store root group (with its rayssl attrs) if missing; refuse a non-rayssl folder.
    Returns the local path, or the URL of a store on object storage."""
    import zarr

    if is_remote(store):
        return remote.ensure_remote_store(str(store), ROOT_ATTRS, STORE_FORMAT)
    root = Path(store).expanduser().absolute()
    marker = root / "zarr.json"
    if marker.exists():
        try:
            metadata = json.loads(marker.read_text())
        except (OSError, ValueError) as error:
            raise ConversionError(f"{root}: zarr.json is unreadable ({error}); this is not a "
                                  "valid store.", path=str(root)) from error
        fmt = metadata.get("attributes", {}).get("rayssl", {}).get("format")
        if metadata.get("node_type") != "group" or fmt is None:
            raise ConversionError(
                f"{root}: exists but is not a rayssl store (no rayssl attributes in zarr.json). "
                "Choose another output path.", path=str(root))
        if fmt != STORE_FORMAT:
            raise ConversionError(f"{root}: store format {fmt} is not supported (this code "
                                  f"writes format {STORE_FORMAT}).", path=str(root))
        return root
    if root.exists() and any(p.name not in (INCOMING,) for p in root.iterdir()):
        raise ConversionError(
            f"{root}: folder exists, is not empty and is not a rayssl store. Choose a new or "
            "empty output path.", path=str(root))
    root.mkdir(parents=True, exist_ok=True)
    zarr.open_group(str(root), mode="a", zarr_format=3, attributes=ROOT_ATTRS)
    return root


def ome_multiscales(volume_id: str, spacing: Sequence[float]) -> dict:
    """OME-Zarr 0.5 `ome` attribute: one scale level (`image`), axes x/y/z in millimetre."""
    return {
        "version": "0.5",
        "multiscales": [{
            "name": volume_id,
            "axes": [{"name": axis, "type": "space", "unit": "millimeter"} for axis in "xyz"],
            "datasets": [{"path": "image", "coordinateTransformations": [
                {"type": "scale", "scale": [float(s) for s in spacing]}]}],
        }],
    }


def volume_attrs(volume_id: str, image: np.ndarray, affine: np.ndarray, *, modality: str,
                 source: str, source_sha256: str, preprocessing: Sequence[dict],
                 bbox: Sequence[int], background: float, intensity: dict, has_label: bool,
                 has_mask: bool, orientation: str = "RAS", extra: dict | None = None) -> dict:
    """The `rayssl` attribute dict of a volume group (see docs/store_format.md)."""
    attrs = {
        "id": volume_id,
        "shape": [int(s) for s in image.shape],
        "spacing": [float(s) for s in spacing_of(affine)],
        "origin": [float(v) for v in np.asarray(affine)[:3, 3]],
        "direction": [[float(v) for v in row] for row in direction_of(affine)],
        "axis_order": "xyz",
        "orientation": orientation,
        "modality": modality,
        "dtype": str(image.dtype),
        "source": str(source),
        "source_sha256": str(source_sha256),
        "preprocessing": list(preprocessing),
        "bbox": [int(v) for v in bbox],
        "background": float(background),
        "intensity": dict(intensity),
        "has_label": bool(has_label),
        "has_mask": bool(has_mask),
    }
    if extra:
        attrs.update(extra)
    return attrs


def write_volume(store: str | os.PathLike, volume_id: str, image: np.ndarray,
                 affine: np.ndarray, *, modality: str, label: np.ndarray | None = None,
                 mask: np.ndarray | None = None, source: str = "", source_sha256: str = "",
                 preprocessing: Sequence[dict] = (), bbox: Sequence[int] | None = None,
                 background: float | None = None, intensity: dict | None = None,
                 chunks: int | Sequence[int] = 64, shards: int | Sequence[int] | None = None,
                 orientation: str | None = None, extra_attrs: dict | None = None) -> Path | str:
    """Write one volume group atomically and return its path `STORE/<volume_id>`.

    The group is built under `STORE/.incoming/<id>-<random>` and renamed into place only when every
    array and attribute is written; an existing volume of the same id is swapped out. On object
    storage (`STORE` an fsspec URL) it is built in a local staging folder the same way, then
    uploaded with its group zarr.json last (datasets_zarr/remote.py). Arrays must be
    3D (x, y, z) and, unless `orientation` says otherwise, RAS+ (`affine` is checked). Defaults:
    `bbox` is computed, `background` is -1024 for CT int16 HU and 0 otherwise, `intensity` HU for
    int16 CT.
    """
    import zarr

    validate_volume_id(volume_id)
    if is_remote(store):
        import tempfile

        url = ensure_store(store)
        with tempfile.TemporaryDirectory(prefix="rayssl-staging-") as staging:
            staged = write_volume(
                staging, volume_id, image, affine, modality=modality, label=label, mask=mask,
                source=source, source_sha256=source_sha256, preprocessing=preprocessing, bbox=bbox,
                background=background, intensity=intensity, chunks=chunks, shards=shards,
                orientation=orientation, extra_attrs=extra_attrs)
            return remote.publish_volume(Path(staged), str(url), volume_id)
    root = ensure_store(store)
    image = np.asarray(image)
    affine = np.asarray(affine, dtype=np.float64)
    if image.ndim != 3:
        raise ConversionError(f"{volume_id}: image has shape {image.shape}; (x, y, z) needed.",
                              volume_id=volume_id)
    if modality not in ("CT", "MR"):
        raise ConversionError(f"{volume_id}: modality must be 'CT' or 'MR', not {modality!r}.",
                              volume_id=volume_id)
    actual_orientation = axcodes(affine)
    if orientation is None:
        orientation = "RAS"
    if actual_orientation != orientation:
        raise ConversionError(
            f"{volume_id}: affine orientation is {actual_orientation}, not {orientation}. "
            "Reorient with datasets_zarr.preprocess.reorient_to_ras first.", volume_id=volume_id)
    for name, extra in (("label", label), ("mask", mask)):
        if extra is not None and np.shape(extra) != image.shape:
            raise ConversionError(f"{volume_id}: {name} shape {np.shape(extra)} differs from the "
                                  f"image shape {image.shape}.", volume_id=volume_id)
    chunks_3 = chunk_shape(chunks)
    shards_3 = shard_shape(shards, chunks_3)
    if bbox is None:
        bbox = foreground_bbox(image, modality)
    if intensity is None:
        intensity = {"unit": "HU"} if modality == "CT" and image.dtype == np.int16 else {
            "unit": "arbitrary"}
    if background is None:
        background = CT_BACKGROUND_HU if intensity.get("unit") == "HU" else 0.0

    incoming = root / INCOMING
    incoming.mkdir(exist_ok=True)
    token = secrets.token_hex(4)
    temporary = incoming / f"{volume_id}-{token}"
    note = _write_writer_note(incoming, temporary.name)
    try:
        group = zarr.open_group(str(temporary), mode="w", zarr_format=3)
        serializer, compressors = blosc_codecs()
        for name, data in (("image", image), ("label", label), ("mask", mask)):
            if data is None:
                continue
            data = np.ascontiguousarray(data)
            array = group.create_array(
                name, shape=data.shape, dtype=data.dtype, chunks=chunks_3, shards=shards_3,
                fill_value=0, serializer=serializer, compressors=compressors,
                dimension_names=("x", "y", "z"))
            array[...] = data
            record_written_chunks(incoming, temporary.name, name, array)
        attrs = volume_attrs(
            volume_id, image, affine, modality=modality, source=source,
            source_sha256=source_sha256, preprocessing=preprocessing, bbox=bbox,
            background=background, intensity=intensity, has_label=label is not None,
            has_mask=mask is not None, orientation=orientation, extra=extra_attrs)
        group.attrs.update({"rayssl": attrs, "ome": ome_multiscales(volume_id, attrs["spacing"])})
        final = root / volume_id
        _publish(temporary, final, incoming)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    finally:
        note.unlink(missing_ok=True)
    return final


def record_written_chunks(parent: Path, group: str, name: str, array) -> dict:
    """Record in `array`'s attributes which of its chunks zarr wrote (it leaves all-fill chunks out), so a
    reader can tell a lost chunk from an all-fill one (docs/store_format.md, "Chunk record").

    Taken from what is on disk (chunk objects listed, shard indexes read), not re-derived from the
    data, so the record matches zarr's own rule for skipping a chunk. Returns the record.
    """
    from rayssl.data.read import CHUNK_RECORD_KEY, StoreReader, encode_chunk_record

    written = StoreReader(str(parent)).written_chunks(group, name)
    if written is None:  # a layout the reader cannot index: no record (missing chunks read as fill)
        return {}
    record = encode_chunk_record(written)
    array.attrs.update({"rayssl": {**dict(array.attrs.get("rayssl") or {}), CHUNK_RECORD_KEY: record}})
    return record


def _publish(temporary: Path, final: Path, incoming: Path) -> None:
    """Rename the finished group into place; swap out (then delete) a previous version."""
    for _ in range(5):
        try:
            os.rename(temporary, final)
            return
        except OSError:
            if not final.exists():
                raise
        # A previous version is visible: move it aside, then move the new one in. Between the two
        # renames the id is briefly absent, never half-written.
        retired = incoming / f"{final.name}-old-{secrets.token_hex(4)}"
        retired_note = _write_writer_note(incoming, retired.name)
        try:
            os.rename(final, retired)
        except FileNotFoundError:
            retired_note.unlink(missing_ok=True)
            continue  # another writer moved it first: retry the plain rename
        try:
            os.rename(temporary, final)
        finally:
            shutil.rmtree(retired, ignore_errors=True)
            retired_note.unlink(missing_ok=True)
        return
    raise ConversionError(f"{final}: could not publish the volume (another writer keeps "
                          "replacing it).", path=str(final))


def _write_writer_note(incoming: Path, entry: str) -> Path:
    """`.incoming/<entry>.writer.json` names the writing process, so stale entries can be told
    apart from ones still being written (see clean_incoming)."""
    note = incoming / f"{entry}.writer.json"
    note.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                "started": time.time()}))
    return note


def _pid_alive(pid: int) -> bool:
    """True when process `pid` runs on this host (a killed, not yet reaped zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            # Format: "pid (comm) state ..."; comm may hold spaces, so split after the last ')'.
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def clean_incoming(store: str | os.PathLike) -> list[str]:
    """Delete leftovers of interrupted writes under `STORE/.incoming`; return what was removed.

    An entry is stale when its writer note names a dead process on this host, names another host
    and is older than a day, or is missing (the note is written before the entry). Entries of
    live writers (e.g. a parallel conversion) are kept.
    """
    if is_remote(store):
        return []  # remote volumes are never visible unfinished; a rewrite replaces leftovers
    incoming = Path(store) / INCOMING
    if not incoming.is_dir():
        return []
    host = socket.gethostname()
    removed = []
    notes = {p.name[: -len(".writer.json")]: p for p in incoming.glob("*.writer.json")}
    for entry in incoming.iterdir():
        if entry.name.endswith(".writer.json"):
            continue
        note = notes.get(entry.name)
        stale = True
        if note is not None:
            try:
                writer: dict[str, Any] = json.loads(note.read_text())
            except (OSError, ValueError):
                writer = {}
            if writer.get("host") == host:
                stale = not _pid_alive(int(writer.get("pid", -1)))
            elif writer:
                stale = time.time() - float(writer.get("started", 0)) > FOREIGN_STALE_SECONDS
        if stale:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            if note is not None:
                note.unlink(missing_ok=True)
            removed.append(entry.name)
    # Manifest temp files of a writer killed between write and rename (see write_manifest).
    for temporary in Path(store).glob(".manifest.parquet.tmp-*"):
        if time.time() - temporary.stat().st_mtime > 3600:
            temporary.unlink(missing_ok=True)
            removed.append(temporary.name)
    # Notes whose entry is gone (writer killed between note and mkdir, or after cleanup).
    for name, note in notes.items():
        if not (incoming / name).exists() and note.exists():
            try:
                writer = json.loads(note.read_text())
                alive = writer.get("host") == host and _pid_alive(int(writer.get("pid", -1)))
            except (OSError, ValueError):
                alive = False
            if not alive:
                note.unlink(missing_ok=True)
    return removed


def read_volume_attrs(store: str | os.PathLike, volume_id: str) -> dict | None:
    """The `rayssl` attrs of `STORE/<volume_id>`, or None when there is no such (valid) volume."""
    if is_remote(store):
        return remote.read_remote_volume_attrs(str(store), volume_id)
    path = Path(store) / volume_id / "zarr.json"
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    attrs = metadata.get("attributes", {}).get("rayssl")
    return attrs if isinstance(attrs, dict) else None


def list_volume_ids(store: str | os.PathLike) -> list[str]:
    """Ids of the visible volumes (groups with rayssl attrs) of a store, sorted."""
    if is_remote(store):
        return remote.list_remote_volume_ids(str(store))
    root = Path(store)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / "zarr.json").exists())
