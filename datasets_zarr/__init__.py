"""Convert CT/MR scans (NIfTI, DICOM, MetaImage, NumPy) into rayssl's chunked Zarr v3 stores, plus demo data."""

from .convert import (ConversionOptions, VolumeJob, VolumeResult, convert, convert_one,
                      expand_input, plan_jobs)
from .demo import (DEMO_LABELS, MNI_TISSUE_LABELS, demo_store, make_mni_tissue_hemisphere, make_mni_variant,
                   make_phantom, write_dicom_series)
from .errors import ConversionError, ConversionFailed
from .io import (ScanRef, ScanVolume, list_dicom_series, read_dicom_series, read_npy, read_nifti,
                 read_scan, read_sitk)
from .manifest import (VolumeMeta, hash_split, iter_volume_meta, read_manifest, volume_meta,
                       write_manifest)
from .preprocess import foreground_bbox, reorient_to_ras
from .store import clean_incoming, write_volume

# .mhd/.mha/.nrrd go through SimpleITK; the name says which files it is for.
read_mhd = read_sitk

__all__ = [
    "ConversionError", "ConversionFailed", "ConversionOptions", "DEMO_LABELS", "MNI_TISSUE_LABELS", "ScanRef",
    "ScanVolume", "VolumeJob", "VolumeMeta", "VolumeResult", "clean_incoming", "convert", "convert_one", "demo_store",
    "expand_input", "foreground_bbox", "hash_split", "iter_volume_meta", "list_dicom_series",
    "make_mni_tissue_hemisphere", "make_mni_variant", "make_phantom", "plan_jobs", "read_dicom_series", "read_manifest",
    "read_mhd", "read_nifti", "read_npy", "read_scan", "read_sitk", "reorient_to_ras",
    "volume_meta", "write_dicom_series", "write_manifest", "write_volume",
]
