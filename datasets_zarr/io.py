"""Readers for NIfTI/Analyze, DICOM series, MetaImage (.mhd/.mha/.nrrd) and .npy scans, all returning an array plus a voxel->RAS affine."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import ConversionError

# Extensions of single-file scans we know how to read (DICOM series are folders).
NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".img.gz", ".mgz", ".mgh")
SITK_SUFFIXES = (".mhd", ".mha", ".nrrd", ".nhdr")
NUMPY_SUFFIXES = (".npy",)
# Files a folder scan picks up. `.img` is left out: it is the data half of an Analyze `.hdr` pair.
SCAN_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".mgz", ".npy") + SITK_SUFFIXES

# DICOM objects that carry no image volume (structure sets, reports, segment objects...).
NON_IMAGE_DICOM_MODALITIES = {"RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "SEG", "PR", "KO", "REG", "DOC"}

# DICOM and ITK use LPS world coordinates; RAS flips the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Deflate never expands data by more than ~1032:1 (RFC 1951 worst case), so a gzip file of N
# bytes holds at most ~1032 N bytes: a header claiming more is refused before any allocation.
DEFLATE_MAX_RATIO = 1032


@dataclass
class ScanVolume:
    """A scan as read from disk, before any preprocessing.

    `array` axes follow the voxel axes of `affine`, which maps voxel indices (i, j, k) to RAS+ world
    millimetres, like a NIfTI sform. `modality` is set when the file says it (DICOM Modality tag).
    """

    array: np.ndarray
    affine: np.ndarray
    source: str
    modality: str | None = None
    source_files: tuple[str, ...] = field(default_factory=tuple)
    # What the reader assumed about the values, as `preprocessing` records (a "warning" key marks
    # one the user must hear about), e.g. a CT series without rescale tags.
    notes: list[dict] = field(default_factory=list)

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)


@dataclass(frozen=True)
class ScanRef:
    """Where a scan lives: a file, or a DICOM folder plus (when the folder mixes series) a series UID."""

    path: str
    series_uid: str | None = None

    def __str__(self) -> str:
        return self.path if self.series_uid is None else f"{self.path} [series {self.series_uid}]"


def path_suffix(path: str | os.PathLike) -> str:
    """Lower-case extension including a `.gz` part: `a/b.nii.gz` -> `.nii.gz`."""
    name = Path(path).name.lower()
    if name.endswith(".gz") and name.count(".") >= 2:
        return "." + ".".join(name.rsplit(".", 2)[-2:])
    return Path(name).suffix


def strip_suffix(path: str | os.PathLike) -> str:
    """File name without its (possibly double) extension: `img0001.nii.gz` -> `img0001`."""
    name = Path(path).name
    suffix = path_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else name


# ----------------------------------------------------------------------------------------------
# Single-file readers
# ----------------------------------------------------------------------------------------------


def read_nifti(path: str | os.PathLike, *, channel: int | None = None) -> ScanVolume:
    """Read a NIfTI-1/2 (.nii, .nii.gz) or Analyze (.hdr/.img) or MGH image with nibabel.

    The affine is nibabel's best affine (sform, else qform, else the Analyze default), which is
    voxel -> RAS+ millimetres. `channel` picks one volume of a 4D file.
    """
    import nibabel as nib

    path = str(path)
    _require_file(path)
    try:
        image = nib.load(path)
        _check_claimed_size(image, path)
        _check_raw_pixdim(image, path)
        shape = image.shape
        data = _select_channel(image.dataobj, shape, channel, path)
        affine = np.asarray(image.affine, dtype=np.float64)
    except ConversionError:
        raise
    except Exception as error:  # nibabel raises many types (EOFError, zlib.error, ImageFileError...)
        raise _unreadable(path, error) from error
    # Analyze/NIfTI pairs (.hdr + .img): the hash must cover both halves.
    return ScanVolume(array=data, affine=affine, source=path,
                      source_files=tuple(scan_files(ScanRef(path))))


def _check_claimed_size(image, path: str) -> None:
    """Refuse a header whose image size the file cannot hold, before the array is allocated.

    Uncompressed data must fit in the file after the header's data offset. For gzip (.nii.gz,
    .mgz) the deflate ratio bound is used rather than the gzip ISIZE trailer: ISIZE is the size
    mod 2^32 of the last gzip member only (multi-member files from bgzip, files over 4 GiB), so it
    cannot prove a file short, while the bound holds for every valid stream and costs nothing.
    """
    holder = image.file_map.get("image")
    data_file = (holder.filename if holder is not None else None) or path
    header = image.header
    shape = tuple(int(n) for n in header.get_data_shape())
    needed = int(np.prod(shape, dtype=object)) * header.get_data_dtype().itemsize
    offset = int(getattr(image.dataobj, "offset", 0) or 0)
    size = os.path.getsize(data_file)
    dims = " x ".join(str(n) for n in shape)
    claim = f"the header claims a {dims} {header.get_data_dtype()} image ({_bytes(needed)})"
    if data_file.lower().endswith((".gz", ".mgz")):
        if needed + offset > size * DEFLATE_MAX_RATIO + 4096:
            raise ConversionError(
                f"{data_file}: {claim}, but this {size}-byte compressed file can hold at most "
                f"{_bytes(size * DEFLATE_MAX_RATIO)}: it is truncated or its header is wrong. "
                "Re-download or re-export it.", path=path)
    elif needed > size - offset:
        raise ConversionError(
            f"{data_file}: {claim}, but the file holds only {_bytes(max(size - offset, 0))} after "
            f"its {offset}-byte header: it is truncated or its header is wrong. Re-download or "
            "re-export it.", path=path)


# Bytes per element of MetaImage ElementType and NRRD type names.
_METAIMAGE_TYPES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
                    "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_FLOAT": 4,
                    "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_DOUBLE": 8}
_NRRD_TYPES = {**{t: 1 for t in ("signed char", "int8", "int8_t", "uchar", "unsigned char",
                                  "uint8", "uint8_t")},
               **{t: 2 for t in ("short", "short int", "signed short", "signed short int", "int16",
                                 "int16_t", "ushort", "unsigned short", "unsigned short int",
                                 "uint16", "uint16_t")},
               **{t: 4 for t in ("int", "signed int", "int32", "int32_t", "uint", "unsigned int",
                                 "uint32", "uint32_t", "float")},
               **{t: 8 for t in ("longlong", "long long", "long long int", "signed long long",
                                 "signed long long int", "int64", "int64_t", "ulonglong",
                                 "unsigned long long", "unsigned long long int", "uint64",
                                 "uint64_t", "double")}}


def _check_itk_claimed_size(path: str) -> None:
    """MetaImage / NRRD: refuse a header whose image the data cannot hold, before ITK allocates.

    Raw data must fill the claimed size; zlib/gzip data is held to deflate's ratio bound (as
    `_check_claimed_size`). Encodings without a cheap bound (bzip2, ascii, hex), file lists and
    patterns are left to ITK.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
    except OSError:
        return
    fields: dict[str, str] = {}
    header_end = None
    suffix = path_suffix(path)
    if suffix in (".mhd", ".mha"):
        position = 0
        for line in head.split(b"\n"):
            position += len(line) + 1
            key, _, value = line.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                header_end = position
                break
        try:
            shape = [int(v) for v in fields["DimSize"].split()]
            itemsize = _METAIMAGE_TYPES[fields["ElementType"].upper()]
            channels = int(fields.get("ElementNumberOfChannels", "1") or 1)
        except (KeyError, ValueError):
            return  # ITK explains a malformed header itself
        data_name = fields.get("ElementDataFile", "")
        compressed = fields.get("CompressedData", "").lower() == "true"
    elif suffix in (".nrrd", ".nhdr"):
        position = 0
        for line in head.split(b"\n"):
            position += len(line) + 1
            text = line.decode("latin-1").rstrip("\r")
            if not text.strip():
                header_end = position
                break
            key, _, value = text.partition(":")
            fields[key.strip().lower()] = value.lstrip("=").strip()
        encoding = fields.get("encoding", "raw").lower()
        try:
            shape = [int(v) for v in fields["sizes"].split()]
            itemsize = 1 if fields.get("type", "").lower() in ("char", "signed char") else \
                _NRRD_TYPES[fields["type"].lower()]
        except (KeyError, ValueError):
            return
        if encoding not in ("raw", "gzip", "gz"):
            return
        channels, compressed = 1, encoding in ("gzip", "gz")
        data_name = fields.get("data file", fields.get("datafile", "LOCAL" if header_end else ""))
    else:
        return
    if header_end is None or not data_name or " " in data_name or "%" in data_name \
            or data_name.upper() == "LIST":
        return
    if data_name.upper() == "LOCAL":
        data_file, offset = path, header_end
    else:
        data_file, offset = os.path.join(os.path.dirname(path), data_name), 0
        if not os.path.exists(data_file):
            return  # ITK names the missing data file
    needed = int(np.prod(shape, dtype=object)) * itemsize * channels
    available = os.path.getsize(data_file) - offset
    dims = " x ".join(str(n) for n in shape)
    claim = f"the header claims a {dims} image of {itemsize}-byte values ({_bytes(needed)})"
    if compressed and needed > max(available, 0) * DEFLATE_MAX_RATIO + 4096:
        raise ConversionError(
            f"{path}: {claim}, but its {max(available, 0)} bytes of compressed data can hold at "
            f"most {_bytes(max(available, 0) * DEFLATE_MAX_RATIO)}: the data is truncated or the "
            "header is wrong. Re-download or re-export it.", path=path)
    if not compressed and needed > available:
        raise ConversionError(
            f"{path}: {claim}, but {data_file} holds only {_bytes(max(available, 0))} of data: "
            "it is truncated or the header is wrong. Re-download or re-export it.", path=path)


def _bytes(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _check_raw_pixdim(image, path: str) -> None:
    """Refuse zero/negative voxel sizes that nibabel would silently replace by 1 mm.

    nibabel "fixes" pixdim on load, so the header is re-read unchecked. Only matters when no
    sform defines the geometry (the sform is checked through the affine later).
    """
    import nibabel as nib

    header = image.header
    if not isinstance(header, nib.analyze.AnalyzeHeader) or (
            "sform_code" in header and int(header["sform_code"]) > 0):
        return
    holder = image.file_map.get("header") or image.file_map.get("image")
    header_file = (holder.filename if holder is not None else None) or path
    with nib.openers.ImageOpener(header_file) as handle:
        raw = type(header).from_fileobj(handle, check=False)
    ndim = min(int(raw["dim"][0]), 3)
    zooms = np.asarray(raw["pixdim"][1:ndim + 1], dtype=float)
    if np.any(~np.isfinite(zooms)) or np.any(zooms <= 0):
        raise ConversionError(
            f"{path}: header voxel size pixdim[1:4]={zooms.tolist()} has zero, negative or "
            "NaN values (nibabel would silently assume 1 mm). Fix the header (e.g. "
            "nibabel: img.header.set_zooms(...)) with the real spacing, then convert again.",
            path=path)


def read_sitk(path: str | os.PathLike, *, channel: int | None = None) -> ScanVolume:
    """Read a MetaImage (.mhd + .raw/.zraw, .mha) or NRRD file with SimpleITK.

    ITK stores origin and direction in LPS world coordinates and its arrays come out (z, y, x);
    the array is transposed to (x, y, z) and the affine converted LPS -> RAS.
    """
    import SimpleITK as sitk

    path = str(path)
    _require_file(path)
    header_spacing = _metaimage_field(path, ("ElementSpacing", "ElementSize")) \
        if path_suffix(path) == ".mhd" else None
    if header_spacing is not None:
        try:
            values = [float(v) for v in header_spacing.split()]
        except ValueError:
            values = [float("nan")]
        if not values or not all(np.isfinite(values)) or min(values) <= 0:
            raise ConversionError(
                f"{path}: ElementSpacing '{header_spacing}' has zero, negative or invalid "
                "values. Fix the .mhd header with the real voxel size, then convert again.",
                path=path)
    _check_itk_claimed_size(path)
    try:
        image = sitk.ReadImage(path)
        array = sitk.GetArrayFromImage(image)
    except Exception as error:
        if "spacing" in str(error).lower():
            raise ConversionError(
                f"{path}: the header's voxel spacing is invalid ({error}). Fix it with the real "
                "voxel size, then convert again.", path=path) from error
        raise _unreadable(path, error) from error
    dimension = image.GetDimension()
    components = image.GetNumberOfComponentsPerPixel()
    if dimension == 4:
        array = np.moveaxis(array, 0, -1)  # (t, z, y, x) -> (z, y, x, t)
    elif dimension != 3:
        raise ConversionError(
            f"{path}: image has {dimension} dimensions; a 3D volume is needed.", path=path)
    # (z, y, x[, c]) -> (x, y, z[, c])
    array = np.moveaxis(array, (0, 1, 2), (2, 1, 0)) if array.ndim >= 3 else array
    if dimension == 4 or components > 1:
        array = _select_channel(array, array.shape, channel, path)
    spacing = np.asarray(image.GetSpacing()[:3], dtype=np.float64)
    origin = np.asarray(image.GetOrigin()[:3], dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64)
    direction = direction.reshape(dimension, dimension)[:3, :3]
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction @ np.diag(spacing)
    affine_lps[:3, 3] = origin
    files = [path]
    if path_suffix(path) == ".mhd":
        files += _metaimage_data_files(path)
    return ScanVolume(array=np.ascontiguousarray(array), affine=LPS_TO_RAS @ affine_lps,
                      source=path, source_files=tuple(files))


def read_npy(path: str | os.PathLike, *, spacing: Sequence[float] = (1.0, 1.0, 1.0),
             channel: int | None = None) -> ScanVolume:
    """Read a .npy array assumed to be (x, y, z) in RAS+ order with the given voxel spacing (mm).

    A bare array has no geometry: the affine is diag(spacing) with the origin at 0, i.e. identity
    orientation. `spacing` must come from the caller (default 1 mm isotropic).
    """
    path = str(path)
    _require_file(path)
    spacing = validate_spacing(spacing, what="npy_spacing", path=path)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:
        raise _unreadable(path, error) from error
    array = _select_channel(array, array.shape, channel, path)
    affine = np.diag([*spacing, 1.0])
    return ScanVolume(array=np.array(array), affine=affine, source=path, source_files=(path,))


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file has the DICOM preamble, or a .dcm/.dicom extension."""
    from pydicom.misc import is_dicom

    name = Path(path).name
    if name.startswith(".") or name.upper() == "DICOMDIR":
        return False
    if name.lower().endswith((".dcm", ".dicom")):
        return True
    if path_suffix(path) in SCAN_SUFFIXES + NIBABEL_SUFFIXES + (".json", ".txt", ".csv", ".raw",
                                                                ".zraw", ".xml", ".md"):
        return False
    try:
        return is_dicom(str(path))
    except OSError:
        return False


def dicom_files_in(folder: str | os.PathLike) -> list[str]:
    """DICOM files directly inside `folder` (not recursive), sorted by name."""
    folder = Path(folder)
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and is_dicom_file(p))


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One image series found in a folder: its UID, files and a few descriptive tags."""

    folder: str
    series_uid: str
    files: tuple[str, ...]
    modality: str | None
    series_number: int | None
    description: str
    image_type: tuple[str, ...]
    patient_id: str = ""


def list_dicom_series(folder: str | os.PathLike,
                      unreadable: list[tuple[str, str]] | None = None) -> list[DicomSeriesInfo]:
    """Group the DICOM files of `folder` by SeriesInstanceUID, reading headers only.

    Non-image objects (RTSTRUCT, SR, SEG...) are left out. A file whose header cannot be read
    raises a ConversionError naming it, unless `unreadable` is a list: then the file is left out
    of every series and `(file, message)` appended, so one bad file fails alone.
    """
    import pydicom

    folder = str(folder)
    groups: dict[str, list[tuple[str, object]]] = defaultdict(list)
    for file in dicom_files_in(folder):
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=[
                "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "ImageType",
                "PatientID"])
        except Exception as error:
            if unreadable is None:
                raise _unreadable(file, error) from error
            unreadable.append((file, str(_unreadable(file, error))))
            continue
        uid = str(header.get("SeriesInstanceUID", "")) or "(no SeriesInstanceUID)"
        groups[uid].append((file, header))
    series = []
    for uid, members in groups.items():
        first = members[0][1]
        modality = str(first.get("Modality", "")) or None
        if modality in NON_IMAGE_DICOM_MODALITIES:
            continue
        number = first.get("SeriesNumber", None)
        image_type = first.get("ImageType", None) or ()
        series.append(DicomSeriesInfo(
            folder=folder, series_uid=uid, files=tuple(sorted(f for f, _ in members)),
            modality=modality, series_number=int(number) if number not in (None, "") else None,
            description=str(first.get("SeriesDescription", "")),
            image_type=tuple(str(t) for t in (image_type if not isinstance(image_type, str)
                                              else [image_type])),
            patient_id=str(first.get("PatientID", ""))))
    return sorted(series, key=lambda s: (s.series_number is None, s.series_number or 0,
                                         s.series_uid))


def read_dicom_series(folder: str | os.PathLike, *, series_uid: str | None = None,
                      files: Sequence[str] | None = None) -> ScanVolume:
    """Read one DICOM image series (a folder of single-frame slices) into an (x, y, z) volume.

    Slices are ordered by their ImagePositionPatient projected on the slice normal (the cross
    product of the ImageOrientationPatient row and column cosines), never by file name. The slice
    step comes from the positions (SliceThickness is not the spacing). RescaleSlope/Intercept are
    applied per slice. A series whose slices disagree in orientation, size or pixel spacing, has
    duplicate or missing slices, or a tilted gantry is refused with a ConversionError.

    Array axis 0 follows the DICOM columns (the row direction cosine), axis 1 the rows (column
    cosine), axis 2 the sorted slices; the affine maps them to RAS+ mm.
    """
    import pydicom

    folder = str(folder)
    if files is None:
        if not Path(folder).is_dir():
            _require_file(folder)
        all_series = list_dicom_series(folder)
        if not all_series:
            raise ConversionError(f"{folder}: no DICOM image files found in this folder.",
                                  path=folder)
        if series_uid is None:
            if len(all_series) > 1:
                listing = "; ".join(f"{s.series_uid} ({len(s.files)} files, "
                                    f"'{s.description}')" for s in all_series)
                raise ConversionError(
                    f"{folder}: folder holds {len(all_series)} DICOM series ({listing}). "
                    "Pass series_uid=..., or give the folder to convert(), which splits series "
                    "into separate volumes.", path=folder)
            chosen = all_series[0]
        else:
            matching = [s for s in all_series if s.series_uid == series_uid]
            if not matching:
                raise ConversionError(f"{folder}: no series with SeriesInstanceUID {series_uid}.",
                                      path=folder)
            chosen = matching[0]
        files = chosen.files
    source = folder if series_uid is None else f"{folder} [series {series_uid}]"

    slices = []
    for file in files:
        try:
            slices.append((file, pydicom.dcmread(file)))
        except Exception as error:
            raise _unreadable(file, error) from error
    if len(slices) < 2:
        raise ConversionError(
            f"{source}: series has {len(slices)} slice(s); a volume needs at least 2 slices to "
            "define the slice spacing. Drop single-slice series (scouts, localizers).",
            path=folder)

    def required(file, ds, keyword):
        value = ds.get(keyword, None)
        if value is None or value == "":
            raise ConversionError(
                f"{file}: DICOM tag {keyword} is missing, so the slice cannot be placed in 3D. "
                "This is not a cross-sectional image series (or the export stripped geometry); "
                "export the series with full geometry tags or convert it to NIfTI first.",
                path=file)
        return value

    first_file, first = slices[0]
    orientation = np.asarray(required(first_file, first, "ImageOrientationPatient"), dtype=float)
    pixel_spacing = np.asarray(required(first_file, first, "PixelSpacing"), dtype=float)
    rows, cols = int(required(first_file, first, "Rows")), int(required(first_file, first,
                                                                         "Columns"))
    if getattr(first, "NumberOfFrames", 1) not in (None, "", 1, "1"):
        raise ConversionError(
            f"{first_file}: multi-frame (enhanced) DICOM is not supported; convert it to NIfTI "
            "(e.g. with dcm2niix) and convert the NIfTI.", path=first_file)
    if np.any(pixel_spacing <= 0):
        raise ConversionError(
            f"{first_file}: PixelSpacing {pixel_spacing.tolist()} is not positive; the file's "
            "geometry is broken. Fix the header or convert the scan with an explicit spacing.",
            path=first_file)
    row_cosine, col_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, col_cosine)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise ConversionError(
            f"{first_file}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal unit "
            "vectors.", path=first_file)

    positions = []
    for file, ds in slices:
        if not np.allclose(np.asarray(required(file, ds, "ImageOrientationPatient"), float),
                           orientation, atol=1e-4):
            raise ConversionError(
                f"{source}: inconsistent series: {Path(file).name} has a different "
                "ImageOrientationPatient than the other slices. The folder mixes acquisitions; "
                "split them into one folder per series.", path=file)
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols) or not np.allclose(
                np.asarray(required(file, ds, "PixelSpacing"), float), pixel_spacing, atol=1e-4):
            raise ConversionError(
                f"{source}: inconsistent series: {Path(file).name} has a different image size or "
                "PixelSpacing than the other slices. Split the folder into one folder per series.",
                path=file)
        positions.append(np.asarray(required(file, ds, "ImagePositionPatient"), dtype=float))
    positions = np.stack(positions)
    along_normal = positions @ normal
    order = np.argsort(along_normal, kind="stable")
    sorted_positions, sorted_along = positions[order], along_normal[order]
    gaps = np.diff(sorted_along)
    if np.any(gaps < 1e-3):
        duplicate = int(np.argmin(gaps))
        names = (Path(slices[order[duplicate]][0]).name, Path(slices[order[duplicate + 1]][0]).name)
        raise ConversionError(
            f"{source}: inconsistent series: slices {names[0]} and {names[1]} sit at the same "
            f"position ({sorted_along[duplicate]:.3f} mm along the slice normal). The folder holds "
            "duplicate files or several acquisitions of the same SeriesInstanceUID; keep one.",
            path=folder)
    if gaps.max() - gaps.min() > max(0.01 * np.median(gaps), 1e-2):
        raise ConversionError(
            f"{source}: inconsistent series: slice gaps vary from {gaps.min():.3f} to "
            f"{gaps.max():.3f} mm, so slices are missing or the spacing is irregular. Re-export "
            "the complete series.", path=folder)
    step = (sorted_positions[-1] - sorted_positions[0]) / (len(slices) - 1)
    if np.linalg.norm(step - (step @ normal) * normal) > 1e-3 * np.linalg.norm(step) + 1e-3:
        raise ConversionError(
            f"{source}: slices are not stacked along their normal (gantry tilt or sheared "
            "acquisition). Resample it to an orthogonal grid first (e.g. dcm2niix corrects "
            "gantry tilt), then convert the NIfTI.", path=folder)

    slopes = [_rescale_value(*slices[i], "RescaleSlope", 1.0) for i in order]
    intercepts = [_rescale_value(*slices[i], "RescaleIntercept", 0.0) for i in order]
    for i, slope in zip(order, slopes):
        if slope == 0:
            raise ConversionError(
                f"{slices[i][0]}: RescaleSlope is 0, which maps every pixel to the same value; "
                "the header is broken. Set the scanner's RescaleSlope (usually 1) in the file or "
                "re-export the series.", path=slices[i][0])
    modality = str(first.get("Modality", "")) or None
    notes = []
    without_tags = [slices[i][0] for i in order
                    if _blank(slices[i][1].get("RescaleSlope", None))
                    or _blank(slices[i][1].get("RescaleIntercept", None))]
    if modality == "CT" and without_tags:
        # Raw CT pixels are usually HU + 1024 (or + 32768): stored as is they would not be HU.
        notes.append({"op": "dicom_rescale", "slope": 1.0, "intercept": 0.0, "assumed": True,
                      "slices_without_tags": len(without_tags),
                      "warning": f"{source}: {len(without_tags)} of {len(slices)} CT slice(s) "
                                 f"(e.g. {Path(without_tags[0]).name}) have no RescaleSlope/"
                                 "RescaleIntercept; values were stored as read (slope 1, "
                                 "intercept 0) and may not be Hounsfield units. Check the "
                                 "stored range (air should be near -1000)."})
    # Integer slope/intercept (CT in HU): exact integer arithmetic, stored as int16 when it fits.
    # Otherwise float32. Slices are filled one by one to keep peak memory near the output size.
    integral = all(v == round(v) for v in slopes + intercepts)
    _check_pixel_data_sizes(slices, rows, cols)
    # int32 holds any 16-bit pixel times a sane integer slope; 8-bit/16-bit data is the norm.
    values = np.empty((cols, rows, len(order)), dtype=np.int32 if integral else np.float32)
    for position, index in enumerate(order):
        file, ds = slices[index]
        try:
            pixels = ds.pixel_array
        except Exception as error:
            raise ConversionError(
                f"{file}: cannot decode pixel data ({type(error).__name__}: {error}). If the "
                "series is compressed (JPEG/JPEG2000), install a pydicom pixel-data plugin "
                "(pylibjpeg or gdcm) or decompress it first.", path=file) from error
        if pixels.ndim != 2 or pixels.shape != (rows, cols):
            raise ConversionError(
                f"{file}: pixel data has shape {pixels.shape}; single-frame grayscale slices of "
                f"{rows} x {cols} are needed.", path=file)
        # (rows, cols) -> (cols, rows): array axis 0 follows the row cosine.
        if integral:
            values[:, :, position] = pixels.T.astype(np.int32) * int(slopes[position]) + int(
                intercepts[position])
        else:
            values[:, :, position] = pixels.T * np.float32(slopes[position]) + np.float32(
                intercepts[position])
    if integral:
        low, high = int(values.min()), int(values.max())
        fits_int16 = np.iinfo(np.int16).min <= low and high <= np.iinfo(np.int16).max
        array = values.astype(np.int16) if fits_int16 else values
    else:
        array = values

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cosine * pixel_spacing[1]  # column index: step between columns
    affine_lps[:3, 1] = col_cosine * pixel_spacing[0]  # row index: step between rows
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = sorted_positions[0]
    return ScanVolume(array=array, affine=LPS_TO_RAS @ affine_lps, source=source,
                      modality=modality, source_files=tuple(sorted(files)), notes=notes)


def _check_pixel_data_sizes(slices, rows: int, cols: int) -> None:
    """Refuse a slice whose uncompressed PixelData is shorter than Rows x Columns claims.

    Runs before the volume is allocated, so a header claiming 30000 x 30000 is a message naming
    the file, not a MemoryError. Compressed transfer syntaxes are checked when decoded.
    """
    for file, ds in slices:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        pixels = ds.get("PixelData", None)
        if syntax is None or syntax.is_compressed or pixels is None:
            continue
        bits = int(ds.get("BitsAllocated", 16) or 16)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        needed = rows * cols * samples * bits // 8
        if len(pixels) < needed:
            raise ConversionError(
                f"{file}: Rows x Columns = {rows} x {cols} ({bits}-bit) needs {_bytes(needed)} of "
                f"pixel data but the file holds {_bytes(len(pixels))}: the slice is truncated or "
                "its header is wrong. Re-export the series.", path=file)


def _blank(value) -> bool:
    return value is None or value == ""


def _rescale_value(file: str, ds, keyword: str, default: float) -> float:
    """A slice's RescaleSlope/RescaleIntercept (`default` when absent); refuses non-numbers."""
    value = ds.get(keyword, None)
    if _blank(value):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number):
        raise ConversionError(f"{file}: {keyword} is {value!r}, not a finite number; the header "
                              "is broken. Fix the tag or re-export the series.", path=file)
    return number


# ----------------------------------------------------------------------------------------------
# Dispatch, validation and hashing
# ----------------------------------------------------------------------------------------------


def read_scan(ref: ScanRef | str | os.PathLike, *, channel: int | None = None,
              npy_spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> ScanVolume:
    """Read any supported scan (file or DICOM folder), validate it, and return it unmodified.

    Validation: the array is 3D (after `channel` selection of a 4D file), every voxel is finite,
    and the affine has positive, finite spacing. Each failure is a ConversionError that names the
    file and says what to do.
    """
    if not isinstance(ref, ScanRef):
        ref = ScanRef(str(ref))
    path = ref.path
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file or folder. Check the path (and that the "
                              "dataset is fully downloaded/unpacked).", path=path)
    suffix = path_suffix(path)
    if os.path.isdir(path):
        volume = read_dicom_series(path, series_uid=ref.series_uid)
    elif suffix in NIBABEL_SUFFIXES:
        volume = read_nifti(path, channel=channel)
    elif suffix in SITK_SUFFIXES:
        volume = read_sitk(path, channel=channel)
    elif suffix in NUMPY_SUFFIXES:
        volume = read_npy(path, spacing=npy_spacing, channel=channel)
    elif is_dicom_file(path):
        volume = read_dicom_series(os.path.dirname(path) or ".", files=[path])
    else:
        raise ConversionError(
            f"{path}: unknown file type '{suffix}'. Supported: NIfTI/Analyze "
            f"({', '.join(NIBABEL_SUFFIXES)}), {', '.join(SITK_SUFFIXES)}, .npy, or a folder "
            "holding one DICOM series.", path=path)
    validate_volume(volume)
    return volume


def validate_volume(volume: ScanVolume) -> None:
    """Refuse arrays that are not 3D, hold NaN/Inf, or whose affine has zero/negative/NaN spacing."""
    source = volume.source
    if volume.array.ndim != 3:
        raise ConversionError(
            f"{source}: array has shape {volume.array.shape}; a 3D volume is needed.", path=source)
    if 0 in volume.array.shape:
        raise ConversionError(
            f"{source}: array has shape {volume.array.shape}: an axis of length 0 holds no voxels "
            "(an empty or truncated export). Export the scan again.", path=source)
    if min(volume.array.shape) < 2:
        raise ConversionError(
            f"{source}: array has shape {volume.array.shape}; a 3D volume needs at least 2 voxels "
            "along every axis (this looks like a single slice).", path=source)
    if not np.all(np.isfinite(volume.affine)):
        raise ConversionError(f"{source}: the image affine holds NaN/Inf; the header is broken.",
                              path=source)
    spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
    if np.any(spacing <= 1e-6) or abs(np.linalg.det(volume.affine[:3, :3])) <= 1e-12:
        raise ConversionError(
            f"{source}: voxel spacing {np.round(spacing, 6).tolist()} mm has a zero axis (the "
            "header's pixdim/affine is broken). Fix the header, or save the array as .npy and "
            "pass npy_spacing=(sx, sy, sz).", path=source)
    if np.issubdtype(volume.array.dtype, np.floating):
        finite = np.isfinite(volume.array)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise ConversionError(
                f"{source}: {bad} voxel(s) are NaN or Inf. Replace them (e.g. "
                "numpy.nan_to_num with the background value) and save the scan again.",
                path=source)
    elif not (np.issubdtype(volume.array.dtype, np.integer) or volume.array.dtype == bool):
        raise ConversionError(f"{source}: unsupported voxel type {volume.array.dtype}.",
                              path=source)


def validate_spacing(spacing: Sequence[float] | float, *, what: str = "spacing",
                     path: str | None = None) -> tuple[float, float, float]:
    """A spacing given by a user: one number (isotropic) or three, all finite and > 0 (mm)."""
    try:
        values = np.asarray(spacing, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        values = np.asarray([np.nan])
    if values.size == 1:
        values = np.repeat(values, 3)
    where = f"{path}: " if path else ""
    if values.shape != (3,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ConversionError(f"{where}{what}={spacing!r} is invalid: give one (isotropic) or "
                              "three positive voxel sizes in mm, e.g. (1.5, 1.5, 2.0).", path=path)
    return tuple(float(v) for v in values)


def scan_files(ref: ScanRef | str) -> list[str]:
    """Every file whose bytes make up the scan (for hashing), without decoding pixel data."""
    if not isinstance(ref, ScanRef):
        ref = ScanRef(str(ref))
    path = ref.path
    if os.path.isdir(path):
        # Unreadable files belong to no series; the planner reports them (convert.plan_jobs).
        series = list_dicom_series(path, unreadable=[])
        if ref.series_uid is not None:
            series = [s for s in series if s.series_uid == ref.series_uid]
        return sorted(f for s in series for f in s.files)
    suffix = path_suffix(path)
    files = [path]
    if suffix in (".hdr", ".img", ".img.gz"):
        stem = path[: len(path) - len(suffix)]
        files = [stem + s for s in (".hdr", ".img", ".img.gz") if os.path.exists(stem + s)]
    elif suffix == ".mhd":
        files += _metaimage_data_files(path)
    return sorted(set(files))


def sha256_of_files(files: Iterable[str]) -> str:
    """SHA-256 of the files' contents concatenated in sorted-path order."""
    digest = hashlib.sha256()
    for file in sorted(files):
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _require_file(path: str) -> None:
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file or folder. Check the path (and that the "
                              "dataset is fully downloaded/unpacked).", path=path)


def _unreadable(path: str, error: BaseException) -> ConversionError:
    return ConversionError(
        f"{path}: cannot read the file ({type(error).__name__}: {error}). It is truncated, corrupt "
        "or not the format its name says; re-download or re-export it.", path=path)


def _select_channel(data, shape: tuple, channel: int | None, path: str) -> np.ndarray:
    """Return a 3D numpy array from a 3D/4D(+) array-like, squeezing trailing singleton axes."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3:
        raise ConversionError(f"{path}: image has shape {tuple(shape)}; a 3D volume is needed.",
                              path=path)
    if len(shape) == 3:
        return np.asarray(data).reshape(shape)
    extra = int(np.prod(shape[3:]))
    if channel is None:
        raise ConversionError(
            f"{path}: image is {len(shape)}D with shape {shape} ({extra} volumes/channels along "
            "the 4th axis). Select one with channel=N (CLI: --channel N), or split the file into "
            "3D volumes (e.g. nibabel.funcs.four_to_three).", path=path)
    if not 0 <= channel < extra:
        raise ConversionError(
            f"{path}: channel={channel} is out of range: the image has {extra} volumes/channels "
            f"(shape {shape}).", path=path)
    full = np.asarray(data).reshape(shape[:3] + (extra,))
    return np.ascontiguousarray(full[..., channel])


def _metaimage_field(path: str, keys: Sequence[str]) -> str | None:
    """Value of the first of `keys` in an .mhd text header (None when absent/unreadable)."""
    try:
        with open(path, "r", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition("=")
                if key.strip() in keys:
                    return value.strip()
                if key.strip() == "ElementDataFile":
                    break  # the header ends with ElementDataFile
    except OSError:
        return None
    return None


def _metaimage_data_files(path: str) -> list[str]:
    """The data file named by an .mhd header's ElementDataFile line (none for LOCAL/LIST)."""
    value = _metaimage_field(path, ("ElementDataFile",))
    if not value or value.upper() in ("LOCAL", "LIST") or "%" in value:
        return []
    data = os.path.join(os.path.dirname(path), value)
    return [data] if os.path.exists(data) else []
