"""`rayssl verify`: check every chunk and zarr.json of a store's volumes against their records and the manifest, and re-convert bad ones."""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from rayssl.data.read import ChunkReadError, StoreReader
from rayssl.data.storage import is_remote

from .errors import ConversionError
from .manifest import read_manifest, write_manifest
from .store import list_volume_ids, read_volume_attrs

# Problems listed per array in a report; the rest are counted ("... and N more").
MAX_PROBLEMS_PER_ARRAY = 10


@dataclass
class VolumeCheck:
    """What `verify_volume` found for one volume: `problems` make it bad, `notes` do not."""

    id: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chunks: int = 0  # chunks read and checked

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class FixResult:
    """What `--fix` did for one bad volume."""

    id: str
    fixed: bool
    reason: str


@dataclass
class VerifyReport:
    """Every volume's check (after fixing, when fixes ran), the fixes, and store-level notes."""

    store: str
    volumes: list[VolumeCheck]
    fixes: list[FixResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def bad(self) -> list[VolumeCheck]:
        return [v for v in self.volumes if not v.ok]

    @property
    def ok(self) -> bool:
        return not self.bad

    def summary(self) -> str:
        """The report a person reads: every problem names its volume and chunk."""
        lines = []
        for volume in self.volumes:
            for problem in volume.problems:
                lines.append(f"  BAD {volume.id}: {problem}")
        for fix in self.fixes:
            lines.append(f"  {'FIXED' if fix.fixed else 'NOT FIXED'} {fix.id}: {fix.reason}")
        unrecorded = [v.id for v in self.volumes if any("no chunk record" in n for n in v.notes)]
        if unrecorded:
            shown = ", ".join(unrecorded[:5]) + (f" and {len(unrecorded) - 5} more" if len(unrecorded) > 5 else "")
            lines.append(f"  note: {len(unrecorded)} volume(s) have arrays without a chunk record ({shown}): written "
                         f"before rayssl recorded written chunks (or by another tool), so a lost chunk of theirs reads "
                         f"as fill value and cannot be detected; converting them again adds the record")
        lines += [f"  note: {note}" for note in self.notes]
        chunks = sum(v.chunks for v in self.volumes)
        lines.append(f"verify {self.store}: {len(self.volumes) - len(self.bad)} volume(s) ok, {len(self.bad)} bad "
                     f"({chunks} chunks checked)"
                     + (f"; fixed {sum(f.fixed for f in self.fixes)} of {len(self.fixes)}" if self.fixes else ""))
        return "\n".join(lines)


def verify_store(store: str | os.PathLike, *, fix: bool = False, workers: int | None = None,
                 progress: bool = True) -> VerifyReport:
    """Check every volume of the store's manifest; with `fix`, re-convert the bad ones from their sources.

    Runs in this process on a thread pool (`workers`, default: the CPU count, at most 8): blosc
    decoding and file reads release the GIL, so threads scale over cores, need no Ray start-up
    (30-45 s here) and on object stores overlap request latency. Each thread keeps one reader.
    """
    from tqdm.auto import tqdm

    uri = str(store).rstrip("/") if is_remote(store) else os.path.abspath(os.path.expanduser(str(store)))
    if not is_remote(uri) and not os.path.isdir(uri):
        raise ConversionError(f"{uri}: no such store (folder); give the path of a store made by `rayssl convert`.",
                              path=uri)
    if workers is not None and (isinstance(workers, bool) or int(workers) != workers or workers < 1):
        raise ValueError(f"workers={workers!r}: give a whole number of threads >= 1 (or leave it out)")
    manifest = read_manifest(uri)
    rows = manifest.to_dict("records")
    workers = int(workers) if workers is not None else min(os.cpu_count() or 1, 8)
    local = threading.local()

    def reader() -> StoreReader:
        if not hasattr(local, "reader"):
            local.reader = StoreReader(uri)
        return local.reader

    def check(row: dict) -> VolumeCheck:
        return verify_volume(uri, row, reader())

    bar = tqdm(total=len(rows), desc="verify", unit="volume", disable=not progress)
    checks: dict[str, VolumeCheck] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in as_completed([pool.submit(check, row) for row in rows]):  # the bar moves as volumes finish
            result = future.result()
            checks[result.id] = result
            bar.set_postfix_str(f"{sum(not c.ok for c in checks.values())} bad", refresh=False)
            bar.update(1)
    bar.close()
    report = VerifyReport(uri, [checks[str(row["id"])] for row in rows])
    listed = {str(row["group"]) for row in rows}
    unlisted = [v for v in list_volume_ids(uri) if v not in listed]
    if unlisted:
        report.notes.append(f"{len(unlisted)} volume group(s) in the store are not in the manifest "
                            f"({', '.join(unlisted[:5])}); they are never read. A `rayssl convert` into this "
                            f"store rescans the groups and lists them")
    if fix and report.bad:
        report.fixes = fix_volumes(uri, rows, [v.id for v in report.bad], lambda row: verify_volume(uri, row,
                                                                                               StoreReader(uri)))
        fixed = {f.id for f in report.fixes if f.fixed}
        report.volumes = [verify_volume(uri, row, StoreReader(uri)) if str(row["id"]) in fixed
                          else checks[str(row["id"])] for row in rows]
    return report


def _short(message: str, group: str, uri: str) -> str:
    """A reader error without the volume prefix (the report groups by volume) and the generic remedy."""
    message = message.replace(f"volume {group!r} in store {uri}: ", "")
    return re.split(r"; (?:re-convert|rewrite)", message, maxsplit=1)[0]


def verify_volume(store: str, row: dict, reader: StoreReader) -> VolumeCheck:
    """Check one manifest row: group attrs against the manifest, then each array: zarr.json against the
    manifest, and every chunk read and decoded (a chunk the record says was written must exist; a
    shard's index must pass its crc32c)."""
    volume_id, group = str(row["id"]), str(row["group"])
    result = VolumeCheck(volume_id)
    attrs = read_volume_attrs(store, group)
    if attrs is None:
        result.problems.append(f"{group}/zarr.json is missing or unreadable (the group holds the volume's "
                               f"attributes): the volume was deleted or its metadata edited")
        return result
    for key in ("shape", "dtype"):
        recorded, listed = attrs.get(key), row.get(key)
        if key == "shape":
            recorded = None if recorded is None else [int(v) for v in recorded]
            listed = None if listed is None else [int(v) for v in listed]
        if recorded and listed is not None and len(listed) and recorded != listed:
            result.problems.append(f"{group}/zarr.json attributes say {key} {recorded}, the manifest says {listed}: "
                                   f"the store was edited or corrupted")
    arrays = ["image"] + [name for name in ("label", "mask")
                          if bool(row.get(f"has_{name}")) or bool(attrs.get(f"has_{name}"))]
    for array in arrays:
        try:
            info = reader.array_info(group, array)
        except ChunkReadError as err:
            result.problems.append(_short(str(err), group, reader.uri))
            continue
        if info.written is None:
            result.notes.append(f"{array}: no chunk record")
        found: list[str] = []
        for key in np.ndindex(*info.grid):
            origin = tuple(k * c for k, c in zip(key, info.chunks))
            size = tuple(min(c, n - o) for c, n, o in zip(info.chunks, info.shape, origin))
            result.chunks += 1
            try:
                reader.read_boxes(group, [(origin, size)], array=array, dtype=None)
            except ChunkReadError as err:
                message = _short(str(err), group, reader.uri)
                if message not in found:  # a bad shard index fails every inner chunk the same way
                    found.append(message)
        result.problems += found[:MAX_PROBLEMS_PER_ARRAY]
        if len(found) > MAX_PROBLEMS_PER_ARRAY:
            result.problems.append(f"{array}: ... and {len(found) - MAX_PROBLEMS_PER_ARRAY} more bad chunks")
    return result


def _scan_ref(source: str):
    """The ScanRef a `source` attribute was written from (`path` or `path [series UID]`)."""
    from .io import ScanRef

    match = re.fullmatch(r"(.*) \[series (.+)\]", source)
    return ScanRef(match.group(1), match.group(2)) if match else ScanRef(source)


def _options(conversion: dict):
    """The ConversionOptions a volume was converted with, from its `conversion` attribute."""
    from .convert import ConversionOptions

    def triple(value):
        return None if value is None else tuple(value)

    return ConversionOptions(
        reorient=bool(conversion["reorient"]), spacing=triple(conversion["spacing"]),
        window=triple(conversion["window"]), normalize=triple(conversion["normalize"]),
        modality=conversion["requested_modality"], channel=conversion["channel"],
        npy_spacing=triple(conversion["npy_spacing"]) or (1.0, 1.0, 1.0),
        chunks=tuple(conversion["chunks"]), shards=triple(conversion["shards"]))


def fix_volume(store: str, volume_id: str, attrs: dict | None, row: dict) -> FixResult:
    """Re-convert one volume from its recorded source, where the source still exists with the recorded hash,
    with the recorded conversion options; published atomically (write_volume), replacing the bad copy."""
    from .convert import _files_and_reader, prepare_and_write
    from .io import path_suffix, sha256_of_files

    if attrs is None:
        return FixResult(volume_id, False, f"its group zarr.json (which holds the conversion options) is missing or "
                                           f"unreadable; convert {row.get('source') or 'its source'} again with "
                                           f"the original options (`rayssl convert SOURCE --out {store}`)")
    conversion = attrs.get("conversion")
    if isinstance(conversion, dict) and "demo" in conversion:
        return FixResult(volume_id, False, "a demo volume (no source file): rebuild the demo store "
                                           "(datasets_zarr.demo_store(..., rebuild=True), or delete it from the cache)")
    needed = ("reorient", "spacing", "window", "normalize", "requested_modality", "channel", "npy_spacing",
              "chunks", "shards")
    if not isinstance(conversion, dict) or any(k not in conversion for k in needed):
        return FixResult(volume_id, False, "no conversion record in its attributes (written by write_volume "
                                           "directly, not by `rayssl convert`): convert its source again yourself")
    options = _options(conversion)
    sources = [("image", attrs.get("source", ""), attrs.get("source_sha256", ""))]
    for name in ("label", "mask"):
        if attrs.get(f"{name}_source"):
            sources.append((name, attrs[f"{name}_source"], conversion.get(f"{name}_sha256") or ""))
    scans: dict[str, object] = {}
    hashes: dict[str, str] = {}
    try:
        for name, source, recorded in sources:
            ref = _scan_ref(str(source))
            if not source or not os.path.exists(ref.path):
                return FixResult(volume_id, False, f"its {name} source {source!r} no longer exists")
            files, read = _files_and_reader(ref, options)
            digest = sha256_of_files(files) if files else ""
            if not recorded or digest != recorded:
                return FixResult(volume_id, False, f"its {name} source {source} has changed since it was converted "
                                                   f"(sha256 {digest[:12]}, recorded {str(recorded)[:12] or 'none'}): "
                                                   f"not re-converted, that would store another scan under this id; "
                                                   f"convert it as a new volume")
            hashes[name] = digest
            scans[name] = read()
        image = scans["image"]
        is_npy = path_suffix(_scan_ref(str(attrs["source"])).path) == ".npy"
        modality = conversion.get("modality") or options.modality
        prepare_and_write(store, volume_id, image, options, source_sha256=hashes["image"],
                          label_scan=scans.get("label"), mask_scan=scans.get("mask"),
                          conversion=options.fingerprint(modality, is_npy, hashes.get("label"), hashes.get("mask")))
    except (ConversionError, OSError, ValueError) as err:
        return FixResult(volume_id, False, f"re-converting {attrs.get('source')} failed: {err}")
    return FixResult(volume_id, True, f"re-converted from {attrs.get('source')}")


def fix_volumes(store: str, rows: Iterable[dict], bad: Iterable[str],
                recheck: Callable[[dict], VolumeCheck]) -> list[FixResult]:
    """Fix each bad volume (`fix_volume`), check it again, and rewrite the manifest (same splits) when a
    fix changed a volume's row."""
    rows = list(rows)
    by_id = {str(row["id"]): row for row in rows}
    results = []
    for volume_id in bad:
        row = by_id[volume_id]
        attrs = read_volume_attrs(store, str(row["group"]))
        result = fix_volume(store, volume_id, attrs, row)
        if result.fixed:
            after = recheck(row)
            if not after.ok:
                result = FixResult(volume_id, False, f"re-converted, but still bad: {'; '.join(after.problems)}")
        results.append(result)
    if any(r.fixed for r in results):
        attrs_by_id = {str(row["id"]): read_volume_attrs(store, str(row["group"])) for row in rows}
        if all(a is not None for a in attrs_by_id.values()):
            # The store column as the manifest had it (a store built elsewhere keeps its recorded path).
            write_manifest(store, attrs_by_id, splits={str(r["id"]): str(r["split"]) for r in rows},
                           store_uri=str(rows[0]["store"]) if rows else None)
    return results
