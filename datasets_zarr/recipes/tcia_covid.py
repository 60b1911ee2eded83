"""Recipe for TCIA COVID-19 CT collections (NBIA downloads: <collection>/<patient>/<study>/<series>/*.dcm)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from ..convert import sanitize_id
from ..errors import ConversionError
from ..io import ScanRef, dicom_files_in, list_dicom_series
from ._common import RecipeFiles, require_folder, run_recipe

DEFAULTS = {"modality": "CT", "spacing": (1.5, 1.5, 2.0)}


def find_tcia_covid(root: str | os.PathLike, *, min_slices: int = 20) -> RecipeFiles:
    """Every CT image series below `root` (one volume each), leaving out scouts/localizers
    (ImageType LOCALIZER), non-CT series and series with fewer than `min_slices` slices.
    Ids: the PatientID, plus _s<SeriesNumber> when a patient has several kept series."""
    root = require_folder(root, "TCIA COVID-19")
    kept, skipped = [], []
    for folder, subfolders, _ in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        if not dicom_files_in(folder):
            continue
        for series in list_dicom_series(folder):
            where = f"{folder} [series {series.series_number} '{series.description}']"
            if series.modality != "CT":
                skipped.append(f"{where}: modality {series.modality}, not CT")
            elif any(t.upper() == "LOCALIZER" for t in series.image_type):
                skipped.append(f"{where}: localizer/scout")
            elif len(series.files) < min_slices:
                skipped.append(f"{where}: {len(series.files)} slices < min_slices={min_slices}")
            else:
                kept.append(series)
    if not kept:
        raise ConversionError(f"{root}: no CT series with at least {min_slices} slices found "
                              "(expected folders of DICOM slices).", path=str(root))
    by_patient = defaultdict(list)
    for series in kept:
        by_patient[series.patient_id or Path(series.folder).name].append(series)
    images, ids = [], []
    for patient, series_list in sorted(by_patient.items()):
        for series in series_list:
            suffix = "" if len(series_list) == 1 else (
                f"_s{series.series_number}" if series.series_number is not None
                else f"_{series.series_uid[-8:]}")
            images.append(ScanRef(series.folder, series.series_uid))
            ids.append(sanitize_id(f"{patient}{suffix}"))
    return RecipeFiles(images=images, ids=ids, skipped=skipped)


def convert_tcia_covid(root: str | os.PathLike, out: str | os.PathLike, *, min_slices: int = 20,
                       **convert_kwargs):
    """Convert a local TCIA COVID-19 CT download into `out` (defaults: CT, 1.5x1.5x2 mm;
    override any `convert` argument). Returns the manifest."""
    return run_recipe(find_tcia_covid(root, min_slices=min_slices), out, DEFAULTS,
                      convert_kwargs)
