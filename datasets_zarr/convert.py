"""The conversion driver: expands inputs, runs one Ray task per volume, skips unchanged volumes and keeps the manifest current."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from .errors import ConversionError, ConversionFailed
from .io import (SCAN_SUFFIXES, ScanRef, ScanVolume, is_dicom_file, list_dicom_series,
                 path_suffix, read_dicom_series, read_scan, scan_files, sha256_of_files,
                 strip_suffix, validate_spacing, validate_volume)
from .manifest import DEFAULT_SPLIT_FRACTIONS, scan_volume_attrs, validate_fractions, write_manifest
from .preprocess import (DEFAULT_CT_WINDOW, DEFAULT_MR_PERCENTILES, as_label, as_mask,
                         check_same_grid, detect_modality, preprocess)
from rayssl.data.storage import is_remote, storage_runtime_env

from .remote import CHUNKS_PER_SHARD
from .store import (STORE_FORMAT, chunk_shape, clean_incoming, ensure_store, read_volume_attrs,
                    shard_shape, validate_volume_id, write_volume)

# Rewrite the manifest at most this often while volumes finish (and always at the end).
MANIFEST_REWRITE_SECONDS = 10.0


@dataclass(frozen=True)
class ConversionOptions:
    """What to do to every volume of a run (validated once, in the driver)."""

    reorient: bool = True
    spacing: tuple[float, float, float] | None = None
    window: tuple[float, float] | None = None
    normalize: tuple[float, float] | None = None
    modality: str | None = None
    channel: int | None = None
    npy_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    chunks: tuple[int, int, int] = (64, 64, 64)
    shards: tuple[int, int, int] | None = None

    @classmethod
    def build(cls, *, reorient: bool = True, spacing=None, window=None, normalize=None,
              modality: str | None = None, channel: int | None = None,
              npy_spacing=(1.0, 1.0, 1.0), chunks=64, shards=None) -> "ConversionOptions":
        """Validate user-facing arguments (numbers, True for defaults) into options."""
        if modality is not None:
            modality = {"CT": "CT", "MR": "MR", "MRI": "MR"}.get(str(modality).upper())
            if modality is None:
                raise ConversionError("modality must be None (auto-detect), 'CT' or 'MR'.")
        if window is True:
            window = DEFAULT_CT_WINDOW
        if window is not None and window is not False:
            window = tuple(float(v) for v in window)
            if len(window) != 2 or not window[1] > window[0]:
                raise ConversionError(f"window={window!r}: give (hu_min, hu_max) with "
                                      "hu_min < hu_max, e.g. (-175, 250).")
        else:
            window = None
        if normalize is True:
            normalize = DEFAULT_MR_PERCENTILES
        if normalize is not None and normalize is not False:
            normalize = tuple(float(v) for v in normalize)
            if len(normalize) != 2 or not 0 <= normalize[0] < normalize[1] <= 100:
                raise ConversionError(f"normalize={normalize!r}: give two percentiles "
                                      "0 <= lower < upper <= 100, e.g. (0.5, 99.5).")
        else:
            normalize = None
        if channel is not None and (int(channel) != channel or channel < 0):
            raise ConversionError(f"channel={channel!r}: give a volume index >= 0.")
        chunks_3 = chunk_shape(chunks)
        return cls(reorient=bool(reorient),
                   spacing=None if spacing is None else validate_spacing(spacing),
                   window=window, normalize=normalize, modality=modality,
                   channel=None if channel is None else int(channel),
                   npy_spacing=validate_spacing(npy_spacing, what="npy_spacing"),
                   chunks=chunks_3, shards=shard_shape(shards, chunks_3))

    def fingerprint(self, modality: str, is_npy: bool, label_sha256: str | None,
                    mask_sha256: str | None) -> dict:
        """Parameters that decide a stored volume's content; equal fingerprint + source = skip."""
        record = {
            "format": STORE_FORMAT, "reorient": self.reorient, "spacing": self.spacing,
            "modality": modality, "requested_modality": self.modality,
            "window": self.window if modality == "CT" else None,
            "normalize": self.normalize if modality == "MR" else None,
            "channel": self.channel, "npy_spacing": self.npy_spacing if is_npy else None,
            "chunks": self.chunks, "shards": self.shards,
            "label_sha256": label_sha256, "mask_sha256": mask_sha256,
        }
        return json.loads(json.dumps(record))  # tuples -> lists, as stored in zarr.json


@dataclass(frozen=True)
class VolumeJob:
    """One volume to convert: its id, image source and optional label / mask sources."""

    volume_id: str
    image: ScanRef
    label: ScanRef | None = None
    mask: ScanRef | None = None


@dataclass
class VolumeResult:
    """What one task did: status is 'converted', 'skipped', 'duplicate' or 'failed'.

    `details` may hold "duplicate_of" (the volume id holding the same source content) and
    "warnings" (messages the user must see, also recorded in the volume's `preprocessing`).
    """

    volume_id: str
    source: str
    status: str
    attrs: dict | None = None
    error: str | None = None
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Input expansion and ids
# ----------------------------------------------------------------------------------------------


def expand_input(path: str | os.PathLike | ScanRef,
                 unreadable: list[tuple[str, str]] | None = None) -> list[tuple[ScanRef, str]]:
    """Scans found at `path`, each with a base name for its volume id.

    A file is one scan. A folder holding DICOM files is one scan per DICOM series in it. Any
    other folder is searched recursively for scan files (NIfTI, Analyze .hdr, .mhd/.mha/.nrrd,
    .npy) and DICOM series folders; hidden entries and Zarr stores are skipped. A `ScanRef`
    naming one series of a DICOM folder is taken as is. A DICOM file whose header cannot be read
    raises, unless `unreadable` is a list: then it is left out of its series and `(file,
    message)` appended (the rest of the folder still converts).
    """
    if isinstance(path, ScanRef):
        if path.series_uid is not None:
            if not os.path.isdir(path.path):
                raise ConversionError(f"{path.path}: no such DICOM folder.", path=path.path)
            return [(path, f"{Path(path.path).name}_{path.series_uid.split('.')[-1][-12:]}")]
        path = path.path
    path = str(path)
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file or folder. Check the path (and that the "
                              "dataset is fully downloaded/unpacked).", path=path)
    if os.path.isfile(path):
        if path_suffix(path) not in SCAN_SUFFIXES + (".img", ".img.gz", ".mgh") and \
                is_dicom_file(path):
            return _dicom_folder_scans(os.path.dirname(os.path.abspath(path)))
        return [(ScanRef(path), strip_suffix(path))]
    found: list[tuple[ScanRef, str]] = []
    for folder, subfolders, files in os.walk(path):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")
                               and not os.path.exists(os.path.join(folder, d, "zarr.json")))
        files = sorted(f for f in files if not f.startswith("."))
        for name in files:
            if path_suffix(name) in SCAN_SUFFIXES:
                found.append((ScanRef(os.path.join(folder, name)), strip_suffix(name)))
        if any(is_dicom_file(os.path.join(folder, f)) for f in files
               if path_suffix(f) not in SCAN_SUFFIXES):
            found.extend(_dicom_folder_scans(folder, unreadable))
    if not found and not unreadable:
        raise ConversionError(
            f"{path}: no scans found in this folder (looked for NIfTI .nii/.nii.gz, Analyze .hdr, "
            ".mhd/.mha/.nrrd, .npy and DICOM series, recursively).", path=path)
    return found


def _dicom_folder_scans(folder: str, unreadable: list[tuple[str, str]] | None = None
                        ) -> list[tuple[ScanRef, str]]:
    series = list_dicom_series(folder, unreadable)
    name = Path(folder).name
    if len(series) == 1:
        return [(ScanRef(folder), name)]
    scans = []
    for info in series:
        tag = (f"s{info.series_number}" if info.series_number is not None
               else info.series_uid.split(".")[-1][-12:])
        scans.append((ScanRef(folder, info.series_uid), f"{name}_{tag}"))
    return scans


def sanitize_id(name: str) -> str:
    """Make a name a valid volume id ([A-Za-z0-9._-]+, not starting with '.')."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "volume"


def unique_volume_ids(scans: Sequence[tuple[ScanRef, str]]) -> list[str]:
    """Ids from base names; colliding names get parent folder names prefixed until unique."""
    # Folders above the file (or above the DICOM series folder, whose own name is the base).
    parents = [[sanitize_id(p) for p in Path(os.path.abspath(ref.path)).parent.parts[1:]]
               for ref, _ in scans]
    depth = [0] * len(scans)

    def candidate(i: int) -> str:
        prefix = parents[i][len(parents[i]) - depth[i]:] if depth[i] else []
        return "_".join(prefix + [sanitize_id(scans[i][1])])

    for _ in range(64):
        ids = [candidate(i) for i in range(len(scans))]
        counts: dict[str, int] = {}
        for volume_id in ids:
            counts[volume_id] = counts.get(volume_id, 0) + 1
        clashing = [i for i, volume_id in enumerate(ids) if counts[volume_id] > 1]
        if not clashing:
            return ids
        grown = False
        for i in clashing:
            if depth[i] < len(parents[i]):
                depth[i] += 1
                grown = True
        if not grown:
            break
    # Still clashing with every parent folder used: add a short hash of the full path.
    ids = [candidate(i) for i in range(len(scans))]
    return [f"{volume_id}-{hashlib.sha1(str(scans[i][0]).encode()).hexdigest()[:8]}"
            if ids.count(volume_id) > 1 else volume_id for i, volume_id in enumerate(ids)]


def plan_jobs(inputs: Sequence[str | ScanRef], labels: Sequence[str | None] | None = None,
              masks: Sequence[str | None] | None = None, ids: Sequence[str] | None = None,
              ) -> tuple[list[VolumeJob], list[VolumeResult]]:
    """Expand inputs (and labels/masks, paired in order) into jobs.

    Returns (jobs, failures): an input that cannot be expanded (missing path, empty folder,
    label count mismatch) becomes a failure record; the caller decides whether to raise. A DICOM
    file whose header cannot be read fails alone: it becomes a failure record of its own (with
    details["unreadable_file"]) and the rest of its folder is planned as usual.
    """
    for name, extra in (("labels", labels), ("masks", masks)):
        if extra is not None and len(extra) != len(inputs):
            raise ConversionError(
                f"{name} has {len(extra)} entries but inputs has {len(inputs)}: {name} are paired "
                f"with inputs by position, so give one per input (None for an input without "
                f"{name[:-1]}).")
    scans: list[tuple[ScanRef, str]] = []
    extras: list[tuple[ScanRef | None, ScanRef | None]] = []
    failures: list[VolumeResult] = []
    for index, item in enumerate(inputs):
        unreadable: list[tuple[str, str]] = []
        try:
            found = expand_input(item, unreadable)
            paired = []
            for name, extra in (("labels", labels), ("masks", masks)):
                target = None if extra is None else extra[index]
                if target is None:
                    paired.append([None] * len(found))
                    continue
                extra_found = expand_input(target, unreadable)
                if len(extra_found) != len(found):
                    raise ConversionError(
                        f"{name}[{index}]={target} holds {len(extra_found)} scan(s) but "
                        f"inputs[{index}]={item} holds {len(found)}. {name.capitalize()} are "
                        "paired with the input's scans in sorted order, so the counts must "
                        "match.", path=str(target))
                paired.append([ref for ref, _ in extra_found])
        except ConversionError as error:
            failures.append(VolumeResult(volume_id=sanitize_id(strip_suffix(str(item))),
                                         source=str(item), status="failed", error=str(error)))
            continue
        finally:
            failures.extend(VolumeResult(volume_id=sanitize_id(strip_suffix(file)), source=file,
                                         status="failed", error=message,
                                         details={"unreadable_file": True})
                            for file, message in unreadable)
        scans.extend(found)
        extras.extend(zip(paired[0], paired[1]))
    seen: dict[tuple[str, str | None], int] = {}
    for ref, _ in scans:
        key = (os.path.realpath(ref.path), ref.series_uid)
        seen[key] = seen.get(key, 0) + 1
    repeated = [str(ScanRef(*key)) for key, count in seen.items() if count > 1]
    if repeated:
        raise ConversionError(f"these scans are given more than once (directly or inside "
                              f"folders): {repeated}. Give each scan once.")
    if ids is not None:
        if len(ids) != len(scans):
            raise ConversionError(f"ids has {len(ids)} entries but the inputs expand to "
                                  f"{len(scans)} scans; give one id per scan.")
        volume_ids = [validate_volume_id(v) for v in ids]
        duplicates = sorted({v for v in volume_ids if volume_ids.count(v) > 1})
        if duplicates:
            raise ConversionError(f"ids must be unique; repeated: {duplicates}.")
    else:
        volume_ids = unique_volume_ids(scans)
    jobs = [VolumeJob(volume_id=volume_id, image=ref, label=label, mask=mask)
            for volume_id, (ref, _), (label, mask) in zip(volume_ids, scans, extras)]
    return jobs, failures


# ----------------------------------------------------------------------------------------------
# One volume
# ----------------------------------------------------------------------------------------------


def _files_and_reader(ref: ScanRef, options: ConversionOptions):
    """Files of a scan (for hashing) and a function reading it, listing DICOM headers once."""
    if os.path.isdir(ref.path):
        series = list_dicom_series(ref.path, unreadable=[])  # plan_jobs reported those
        if ref.series_uid is not None:
            series = [s for s in series if s.series_uid == ref.series_uid]
        if len(series) != 1:
            # Let the reader produce its explanatory error (none / several series).
            return [], lambda: read_scan(ref, channel=options.channel,
                                         npy_spacing=options.npy_spacing)
        files = list(series[0].files)

        def read() -> ScanVolume:
            volume = read_dicom_series(ref.path, series_uid=ref.series_uid, files=files)
            validate_volume(volume)
            return volume
        return files, read
    if not os.path.exists(ref.path):
        return [], lambda: read_scan(ref)
    return scan_files(ref), lambda: read_scan(ref, channel=options.channel,
                                              npy_spacing=options.npy_spacing)


def prepare_and_write(store: str | os.PathLike, volume_id: str, scan: ScanVolume,
                      options: ConversionOptions, *, source_sha256: str,
                      label_scan: ScanVolume | None = None, mask_scan: ScanVolume | None = None,
                      conversion: dict | None = None) -> dict:
    """Preprocess an in-memory scan (+ label/mask) and write it with `write_volume`.

    Used by every conversion task and by the demo store, so both produce the same format.
    Returns the volume's `rayssl` attrs.
    """
    modality = options.modality or detect_modality(scan.array, scan.modality)
    label = mask = None
    if label_scan is not None:
        check_same_grid(scan.array.shape, scan.affine, label_scan.array.shape, label_scan.affine,
                        what="label", image_source=scan.source, other_source=label_scan.source)
        label = as_label(label_scan.array, label_scan.source)
    if mask_scan is not None:
        check_same_grid(scan.array.shape, scan.affine, mask_scan.array.shape, mask_scan.affine,
                        what="mask", image_source=scan.source, other_source=mask_scan.source)
        mask = as_mask(mask_scan.array)
    prepared = preprocess(scan.array, scan.affine, modality=modality, label=label, mask=mask,
                          reorient=options.reorient, spacing=options.spacing,
                          window=options.window, normalize=options.normalize,
                          source=scan.source)
    # What the reader assumed (e.g. DICOM rescale) comes first: it happened first.
    prepared.preprocessing = list(scan.notes) + prepared.preprocessing
    extra = {"conversion": conversion} if conversion is not None else {}
    if label_scan is not None:
        extra["label_source"] = label_scan.source
    if mask_scan is not None:
        extra["mask_source"] = mask_scan.source
    write_volume(store, volume_id, prepared.image, prepared.affine, modality=prepared.modality,
                 label=prepared.label, mask=prepared.mask, source=scan.source,
                 source_sha256=source_sha256, preprocessing=prepared.preprocessing,
                 bbox=prepared.bbox, background=prepared.background,
                 intensity=prepared.intensity, chunks=options.chunks, shards=options.shards,
                 orientation=prepared.orientation, extra_attrs=extra)
    attrs = read_volume_attrs(store, volume_id)
    assert attrs is not None
    return attrs


# A full disk, an exhausted quota, a file-size limit (RLIMIT_FSIZE): the volume, not the input, failed.
WRITE_LIMIT_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def convert_one(job: VolumeJob, store: str, options: ConversionOptions,
                overwrite: bool = False, source_sha256: str | None = None) -> VolumeResult:
    """Convert one job into `STORE/<id>`, or skip it when the stored copy is current.

    `source_sha256`: the image files' hash when the driver computed it already (duplicate check).
    Never raises: errors come back as a 'failed' result whose message names the file. Nothing of
    a failed volume becomes visible (write_volume publishes only complete groups). Warnings
    recorded in the volume's `preprocessing` come back in `details["warnings"]`.
    """
    started = time.perf_counter()
    source = str(job.image)
    try:
        image_files, read_image = _files_and_reader(job.image, options)
        label_files, read_label = _files_and_reader(job.label, options) if job.label else ([],
                                                                                          None)
        mask_files, read_mask = _files_and_reader(job.mask, options) if job.mask else ([], None)
        if source_sha256 is None:
            source_sha256 = sha256_of_files(image_files) if image_files else ""
        label_sha256 = sha256_of_files(label_files) if label_files else None
        mask_sha256 = sha256_of_files(mask_files) if mask_files else None
        is_npy = path_suffix(job.image.path) == ".npy"

        existing = read_volume_attrs(store, job.volume_id)
        if existing is not None:
            same_source = existing.get("source") == source
            if existing.get("source_sha256") == source_sha256 and source_sha256:
                modality = options.modality or existing.get("modality")
                wanted = options.fingerprint(modality, is_npy, label_sha256, mask_sha256)
                if existing.get("conversion") == wanted:
                    return VolumeResult(job.volume_id, source, "skipped", attrs=existing,
                                        seconds=time.perf_counter() - started)
            elif not same_source and not overwrite:
                raise ConversionError(
                    f"{source}: volume id '{job.volume_id}' is already used in the store by "
                    f"{existing.get('source')} (different content). Give this scan another id "
                    "(ids=...) or pass overwrite=True to replace it.",
                    path=source, volume_id=job.volume_id)

        scan = read_image()
        label_scan = read_label() if read_label else None
        mask_scan = read_mask() if read_mask else None
        modality = options.modality or detect_modality(scan.array, scan.modality)
        conversion = options.fingerprint(modality, is_npy, label_sha256, mask_sha256)
        attrs = prepare_and_write(store, job.volume_id, scan, options,
                                  source_sha256=source_sha256, label_scan=label_scan,
                                  mask_scan=mask_scan, conversion=conversion)
        warnings = [step["warning"] for step in attrs.get("preprocessing", ())
                    if isinstance(step, dict) and "warning" in step]
        return VolumeResult(job.volume_id, source, "converted", attrs=attrs,
                            seconds=time.perf_counter() - started,
                            details={"warnings": warnings} if warnings else {})
    except ConversionError as error:
        message = str(error)
    except MemoryError:
        message = (f"{source}: ran out of memory converting this volume; give the tasks more "
                   "memory or resample it to a coarser spacing.")
    except OSError as error:
        if error.errno not in WRITE_LIMIT_ERRNOS:
            message = (f"{source}: unexpected {type(error).__name__}: {error}\n"
                       + traceback.format_exc(limit=6))
        else:  # write_volume already removed its temporary: nothing of this volume is kept
            message = (f"{source}: writing volume '{job.volume_id}' into {store} failed: "
                       f"{error.strerror or error} (disk full, quota or file-size limit). Nothing "
                       "of this volume was kept; free space and run the same conversion again: "
                       "it converts only what is missing.")
    except Exception as error:  # a bug or an unforeseen file quirk: keep the traceback
        message = (f"{source}: unexpected {type(error).__name__}: {error}\n"
                   + traceback.format_exc(limit=6))
    return VolumeResult(job.volume_id, source, "failed", error=message,
                        seconds=time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------


def check_output(out: str | os.PathLike) -> None:
    """Refuse an output path that cannot become a store, before any input is read.

    An existing file, a parent that is a file, or a folder this process cannot write (read-only
    permissions or file system) is a ConversionError naming the path and the fix. Object-store
    URLs are checked when the store is opened.
    """
    if is_remote(out):
        return
    root = Path(out).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise ConversionError(
            f"{root}: the output path is an existing file, not a folder; a store is a folder. "
            f"Give a new path (e.g. {root.with_suffix('.zarr')}) or a store made by rayssl "
            "convert.", path=str(root))
    existing = root
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConversionError(
            f"{root}: cannot create the store: {existing} is a file, not a folder. Choose "
            "another output path.", path=str(root))
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the store" if existing == root else f"its parent folder {existing}"
        raise ConversionError(
            f"{root}: cannot write the store: {what} is not writable by this user (read-only "
            "permissions or file system). Choose a writable output path or fix the "
            "permissions.", path=str(root))


def hash_sources(jobs: Sequence[VolumeJob], threads: int = 8
                 ) -> tuple[dict[str, str], list[VolumeResult]]:
    """sha256 of every job's image files, by volume id, hashed on a few threads in the driver.

    The driver already lists the inputs (plan_jobs), and hashlib releases the GIL on large
    blocks, so threads read in parallel. Returns (hashes, failures): a file that cannot be read
    fails alone.
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(job: VolumeJob) -> tuple[VolumeJob, str | None, str | None]:
        try:
            files = scan_files(job.image) if os.path.exists(job.image.path) else []
            return job, (sha256_of_files(files) if files else ""), None
        except ConversionError as error:
            return job, None, str(error)
        except OSError as error:
            return job, None, (f"{job.image}: cannot read the file to hash it "
                               f"({type(error).__name__}: {error}).")

    hashes: dict[str, str] = {}
    failures: list[VolumeResult] = []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(jobs)))) as pool:
        for job, digest, error in pool.map(one, jobs):
            if digest is None:
                failures.append(VolumeResult(job.volume_id, str(job.image), "failed", error=error))
            else:
                hashes[job.volume_id] = digest
    return hashes, failures


def find_duplicates(jobs: Sequence[VolumeJob], hashes: Mapping[str, str],
                    stored: Mapping[str, dict]) -> dict[str, str]:
    """Job id -> id of the volume holding the same source content (the job is not converted).

    A stored volume with another id and the same source_sha256 wins (the same scan reached under
    a new id, e.g. `in_good` for a stored `good`); within this run the first job in order keeps
    its content. A job whose own id is stored with that hash is not a duplicate (it is current
    or re-converted under its id).
    """
    owner: dict[str, str] = {}
    for volume_id, attrs in stored.items():
        digest = attrs.get("source_sha256")
        if digest and volume_id not in hashes:
            owner.setdefault(digest, volume_id)
    for volume_id, attrs in stored.items():  # a stored id this run converts again keeps it
        if volume_id in hashes and attrs.get("source_sha256") == hashes[volume_id] \
                and hashes[volume_id]:
            owner[hashes[volume_id]] = volume_id
    duplicates = {}
    for job in jobs:
        digest = hashes.get(job.volume_id)
        if not digest:
            continue
        first = owner.setdefault(digest, job.volume_id)
        if first != job.volume_id:
            duplicates[job.volume_id] = first
    return duplicates


def convert(inputs: Sequence[str | os.PathLike | ScanRef] | str | os.PathLike,
            out: str | os.PathLike,
            labels: Sequence[str | os.PathLike | None] | None = None,
            masks: Sequence[str | os.PathLike | None] | None = None, *,
            ids: Sequence[str] | None = None,
            spacing: float | Sequence[float] | None = None,
            modality: str | None = None,
            window: Sequence[float] | bool | None = None,
            normalize: Sequence[float] | bool | None = None,
            reorient: bool = True,
            channel: int | None = None,
            npy_spacing: float | Sequence[float] = (1.0, 1.0, 1.0),
            chunks: int | Sequence[int] = 64,
            shards: int | Sequence[int] | None = None,
            splits: Mapping[str, str] | None = None,
            split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
            split_seed: int = 0,
            on_error: str = "raise",
            overwrite: bool = False,
            address: str | None = None,
            num_cpus_per_task: float = 1,
            progress: bool = True):
    """Convert scans into the Zarr store `out` (one Ray task per volume) and return its manifest.

    inputs: files (NIfTI/Analyze, .mhd/.mha/.nrrd, .npy), DICOM series folders, or folders of
        scans (searched recursively). labels / masks: one entry per input (None = none), each
        expanding to as many scans as its input; paired in sorted order.
    ids: one volume id per expanded scan (default: file/folder names, made unique).
    spacing: resample to this voxel size (mm); images trilinear, labels/masks nearest.
    modality: 'CT' / 'MR' for all volumes; default auto (DICOM Modality tag, else CT when the
        minimum is below -500).
    window: CT only: (hu_min, hu_max) or True for (-175, 250): clip + scale to [0, 1] float32.
        Default None keeps int16 HU.
    normalize: MR only: (lower, upper) percentiles or True for (0.5, 99.5): scale to [0, 1].
    reorient: to RAS+ (default). channel: the volume of 4D inputs to keep.
    npy_spacing: voxel size of .npy inputs (they carry none); their axes are taken as RAS+.
    chunks / shards: Zarr chunk (default 64^3) and shard shape (default: unsharded on a local
        disk, 4x the chunk edge, 256^3, on object storage).
    splits / split_fractions / split_seed: manifest split per id (explicit dict entries win over
        the seeded hash split).
    on_error: every volume is attempted either way and failures never leave anything visible.
        'raise' (default) raises ConversionFailed at the end listing the failed volumes (invalid
        arguments or missing inputs raise at once, before any work); 'skip' warns and returns.
    overwrite: replace a stored volume whose id belongs to another source.
    address: Ray cluster address when Ray is not initialised yet (default: start a local one).
        On a cluster, `out` must be a path every node sees (shared file system) or an object-store
        URL (s3://bucket/ct.zarr, any fsspec URL); credentials and endpoint come from the standard
        environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), forwarded to the Ray tasks.

    Volumes whose stored source_sha256 and conversion parameters equal the current ones are
    skipped, so an interrupted or extended run redoes only what changed. A scan whose content
    (sha256 of its files) another volume of the store or an earlier scan of this run already
    holds is not stored again (no train/test leak through a copy under another id). The
    manifest's `attrs` carry "converted", "skipped", "duplicates" (id, source, duplicate_of),
    "failures" and "warnings" (id, warning: e.g. a CT series without rescale tags).
    An output path that cannot become a store (a file, a read-only parent) raises before any
    input is read.
    """
    if on_error not in ("raise", "skip"):
        raise ConversionError(f"on_error={on_error!r}: use 'raise' or 'skip'.")
    check_output(out)
    if isinstance(inputs, (str, os.PathLike, ScanRef)):
        inputs = [inputs]
    inputs = [p if isinstance(p, ScanRef) else str(p) for p in inputs]
    if not inputs:
        raise ConversionError("inputs is empty: give at least one scan, DICOM folder or folder.")
    options = ConversionOptions.build(
        reorient=reorient, spacing=spacing, window=window, normalize=normalize,
        modality=modality, channel=channel, npy_spacing=npy_spacing, chunks=chunks,
        shards=shards)
    if shards is None and is_remote(out):  # object stores: few objects, ranged reads (remote.py)
        options = dataclasses.replace(options, shards=tuple(c * CHUNKS_PER_SHARD for c in options.chunks))
    validate_fractions(split_fractions)
    labels = None if labels is None else [None if p is None else str(p) for p in labels]
    masks = None if masks is None else [None if p is None else str(p) for p in masks]

    jobs, failures = plan_jobs(inputs, labels, masks, ids)
    # A missing input or bad pairing raises at once; an unreadable file inside a folder fails
    # alone, like a volume that cannot be decoded.
    planning = [f for f in failures if not f.details.get("unreadable_file")]
    if planning and on_error == "raise":
        raise ConversionError("\n".join(f.error for f in planning))
    store = str(ensure_store(out))
    removed = clean_incoming(store)
    if removed:
        print(f"convert: removed {len(removed)} leftover(s) of interrupted writes from "
              f"{store}/.incoming")
    attrs_by_id = scan_volume_attrs(store)
    hashes, hash_failures = hash_sources(jobs)
    failures.extend(hash_failures)
    duplicate_of = find_duplicates(jobs, hashes, attrs_by_id)
    duplicates = [VolumeResult(job.volume_id, str(job.image), "duplicate",
                               details={"duplicate_of": duplicate_of[job.volume_id],
                                        "source_sha256": hashes[job.volume_id]})
                  for job in jobs if job.volume_id in duplicate_of]
    jobs = [job for job in jobs if job.volume_id in hashes and job.volume_id not in duplicate_of]

    def rewrite_manifest():
        return write_manifest(store, attrs_by_id, splits=splits,
                              split_fractions=split_fractions, split_seed=split_seed)

    results: list[VolumeResult] = []
    warnings_seen: list[dict] = []
    last_write = time.monotonic()
    for result in _run_on_ray(jobs, store, options, overwrite, address, num_cpus_per_task,
                              progress, hashes):
        results.append(result)
        for message in result.details.get("warnings", ()):
            warnings_seen.append({"id": result.volume_id, "warning": message})
            print(f"convert: WARNING {result.volume_id}: {message}", flush=True)
        if result.status == "failed":
            failures.append(result)
            if progress:
                print(f"convert: FAILED {result.volume_id}: {result.error}", flush=True)
        elif result.attrs is not None:
            attrs_by_id[result.volume_id] = result.attrs
        if result.status == "converted" and time.monotonic() - last_write > \
                MANIFEST_REWRITE_SECONDS:
            rewrite_manifest()
            last_write = time.monotonic()
    manifest = rewrite_manifest()
    # Again at the end: a task whose worker died during this run (Ray retried it elsewhere)
    # left its temporary behind, and a writer killed just before we started may only now be dead.
    clean_incoming(store)

    converted = [r.volume_id for r in results if r.status == "converted"]
    skipped = [r.volume_id for r in results if r.status == "skipped"]
    failure_records = [{"id": f.volume_id, "source": f.source, "error": f.error}
                       for f in failures]
    duplicate_records = [{"id": d.volume_id, "source": d.source, **d.details}
                         for d in duplicates]
    manifest.attrs.update({"converted": converted, "skipped": skipped,
                           "duplicates": duplicate_records, "failures": failure_records,
                           "warnings": warnings_seen})
    same = "".join(
        f"{', ' if i else ' ('}{d['id']} = {d['duplicate_of']}" for i, d in
        enumerate(duplicate_records[:5])) + (", ..." if len(duplicates) > 5 else "") + \
        (") not stored again" if duplicates else "")
    summary = (f"convert: {len(converted)} converted, skipped {len(skipped)} already converted, "
               f"skipped {len(duplicates)} duplicate(s) of another volume's source content"
               f"{same}, {len(failures)} failed; store {store} now holds {len(manifest)} "
               "volume(s)")
    print(summary, flush=True)
    if failures:
        if on_error == "raise":
            raise ConversionFailed(failure_records, manifest)
        import warnings

        warnings.warn(str(ConversionFailed(failure_records)), stacklevel=2)
    return manifest


def _run_on_ray(jobs: Sequence[VolumeJob], store: str, options: ConversionOptions,
                overwrite: bool, address: str | None, num_cpus_per_task: float, progress: bool,
                hashes: Mapping[str, str]):
    """Yield a VolumeResult per job as Ray tasks finish, with a tqdm bar."""
    if not jobs:
        return
    import ray
    from tqdm.auto import tqdm

    from rayssl.runtime import start_or_attach

    start_or_attach(address)
    # max_retries covers a worker process dying (e.g. OOM-killed); conversion errors are results.
    runtime_env = storage_runtime_env([store])
    task = ray.remote(convert_one).options(num_cpus=num_cpus_per_task, max_retries=1,
                                           **({"runtime_env": runtime_env} if runtime_env else {}))
    pending = {task.remote(job, store, options, overwrite, hashes.get(job.volume_id)): job
               for job in jobs}
    bar = tqdm(total=len(jobs), desc="convert", unit="volume", disable=not progress)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as error:  # the worker died (twice): report, keep going
                    result = VolumeResult(job.volume_id, str(job.image), "failed",
                                          error=f"{job.image}: the conversion task died "
                                                f"({type(error).__name__}: {error}).")
                bar.set_postfix_str(f"{result.status} {result.volume_id}", refresh=False)
                bar.update(1)
                yield result
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
