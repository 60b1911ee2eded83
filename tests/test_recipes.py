"""Dataset recipes on tiny fake copies of each dataset's layout (BTCV, MSD, LUNA16, TCIA COVID-19, ADNI/OASIS)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import zarr

import datasets_zarr as dz
from datasets_zarr import recipes
from datasets_zarr.demo import phantom_affine, write_dicom_series

SHAPE = (16, 14, 10)


def ct_volume(seed, spacing):
    image, label = dz.make_phantom(seed, shape=SHAPE, spacing=spacing)
    return image, label, phantom_affine(SHAPE, spacing)


def stored(store, volume_id, name="image"):
    return zarr.open_array(str(Path(store) / volume_id / name), mode="r")[...]


def volume_attrs(store, volume_id):
    return zarr.open_group(str(Path(store) / volume_id), mode="r").attrs["rayssl"]


def test_btcv(ray_local, tmp_path):
    raw = tmp_path / "Abdomen" / "RawData"
    for folder in ("Training/img", "Training/label", "Testing/img"):
        (raw / folder).mkdir(parents=True)
    spacing = (1.5, 1.5, 2.0)  # the recipe's target: no resampling needed
    for number in ("0001", "0002"):
        image, label, affine = ct_volume(int(number), spacing)
        nib.save(nib.Nifti1Image(image, affine), raw / "Training/img" / f"img{number}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), raw / "Training/label" / f"label{number}.nii.gz")
    image, _, affine = ct_volume(61, spacing)
    nib.save(nib.Nifti1Image(image, affine), raw / "Testing/img" / "img0061.nii.gz")

    found = recipes.find_btcv(tmp_path)
    assert found.ids == ["btcv-img0001", "btcv-img0002", "btcv-img0061"]
    assert [Path(p).name if p else None for p in found.labels] == [
        "label0001.nii.gz", "label0002.nii.gz", None]
    assert len(recipes.find_btcv(tmp_path, include_test=False)) == 2

    store = tmp_path / "btcv.zarr"
    manifest = recipes.convert_btcv(tmp_path, store, progress=False)
    assert list(manifest["id"]) == found.ids
    assert list(manifest["has_label"]) == [True, True, False]
    np.testing.assert_array_equal(stored(store, "btcv-img0002", "label"),
                                  dz.make_phantom(2, shape=SHAPE, spacing=spacing)[1])
    attrs = volume_attrs(store, "btcv-img0001")
    assert attrs["modality"] == "CT" and attrs["dtype"] == "int16"
    assert [s["op"] for s in attrs["preprocessing"]] == ["reorient", "resample"]
    with pytest.raises(dz.ConversionError, match="not a BTCV folder"):
        recipes.find_btcv(tmp_path / "Abdomen" / "RawData" / "Training")
    with pytest.raises(dz.ConversionError, match="decided by the recipe"):
        recipes.convert_btcv(tmp_path, store, labels=[None])


def test_msd_ct_and_multichannel_mr(ray_local, tmp_path):
    spleen = tmp_path / "Task09_Spleen"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (spleen / folder).mkdir(parents=True)
    spacing = (1.5, 1.5, 2.0)
    for case in ("spleen_2", "spleen_10"):
        image, label, affine = ct_volume(len(case), spacing)
        nib.save(nib.Nifti1Image(image, affine), spleen / "imagesTr" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image((label == 5).astype(np.uint8), affine),
                 spleen / "labelsTr" / f"{case}.nii.gz")
    image, _, affine = ct_volume(11, spacing)  # not spleen_10's seed: a copy is a duplicate
    nib.save(nib.Nifti1Image(image, affine), spleen / "imagesTs" / "spleen_1.nii.gz")
    (spleen / "imagesTr" / "._spleen_2.nii.gz").write_bytes(b"macOS resource fork")
    (spleen / "dataset.json").write_text(json.dumps({
        "name": "Spleen", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                     for c in ("spleen_2", "spleen_10")],
        "test": ["./imagesTs/spleen_1.nii.gz"]}))
    found = recipes.find_msd(spleen)
    assert found.ids == ["msd-spleen_2", "msd-spleen_10", "msd-spleen_1"]
    assert recipes.msd.msd_defaults(spleen) == {"modality": "CT", "spacing": (1.5, 1.5, 2.0)}

    brain = tmp_path / "Task01_BrainTumour"
    for folder in ("imagesTr", "labelsTr"):
        (brain / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    four_channels = rng.uniform(0, 1000, size=SHAPE + (4,)).astype(np.float32)
    four_channels[..., 1] *= 10  # channel 1 on another scale: tells channels apart
    nib.save(nib.Nifti1Image(four_channels, np.eye(4)), brain / "imagesTr" / "BRATS_001.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), np.eye(4)),
             brain / "labelsTr" / "BRATS_001.nii.gz")
    # No dataset.json training list here: the recipe falls back to the folders.
    (brain / "dataset.json").write_text(json.dumps(
        {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}}))
    assert recipes.msd.msd_defaults(brain) == {"modality": "MR", "normalize": (0.5, 99.5),
                                               "channel": 0}

    store = tmp_path / "msd.zarr"
    manifest = recipes.convert_msd(spleen, store, progress=False)
    assert list(manifest["has_label"]) == [False, True, True]  # sorted ids: 1, 10, 2
    manifest = recipes.convert_msd(brain, store, progress=False)
    assert "msd-BRATS_001" in set(manifest["id"])
    mr = stored(store, "msd-BRATS_001")
    low, high = np.percentile(four_channels[..., 0], [0.5, 99.5])
    expected = np.clip((four_channels[..., 0] - low) / (high - low), 0, 1)
    np.testing.assert_allclose(mr, expected, atol=1e-5)
    attrs = volume_attrs(store, "msd-BRATS_001")
    assert attrs["modality"] == "MR" and attrs["intensity"]["unit"] == "scaled"


def test_luna16_mhd_with_lung_masks(ray_local, tmp_path):
    uids = ["1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860",
            "1.3.6.1.4.1.14519.5.2.1.6279.6001.100332161840553388986847034053"]
    (tmp_path / "seg-lungs-LUNA16").mkdir()
    expected = {}
    for index, uid in enumerate(uids):
        folder = tmp_path / f"subset{index}"
        folder.mkdir()
        image, label, _ = ct_volume(index, (1.0, 1.0, 1.0))
        # ITK/LUNA order: array (z, y, x); identity direction means axes point L, P, S.
        lps = image[::-1, ::-1, :]
        itk = sitk.GetImageFromArray(np.ascontiguousarray(lps.transpose(2, 1, 0)))
        itk.SetSpacing((1.0, 1.0, 1.0))
        itk.SetOrigin((-120.0, 80.0, -300.0))
        sitk.WriteImage(itk, str(folder / f"{uid}.mhd"))
        expected[uid] = (image, label)
    lungs = np.where(expected[uids[0]][1] == 1, 3, np.where(expected[uids[0]][1] == 2, 4, 0))
    mask = sitk.GetImageFromArray(np.ascontiguousarray(
        lungs[::-1, ::-1, :].transpose(2, 1, 0).astype(np.uint8)))
    mask.CopyInformation(sitk.ReadImage(str(tmp_path / "subset0" / f"{uids[0]}.mhd")))
    sitk.WriteImage(mask, str(tmp_path / "seg-lungs-LUNA16" / f"{uids[0]}.mhd"))

    found = recipes.find_luna16(tmp_path)
    assert found.ids == uids and found.masks[1] is None
    assert any("no lung mask" in note for note in found.skipped)
    store = tmp_path / "luna.zarr"
    manifest = recipes.convert_luna16(tmp_path, store, progress=False)
    assert list(manifest["has_mask"]) == [True, False]
    for uid in uids:
        np.testing.assert_array_equal(stored(store, uid), expected[uid][0])
    np.testing.assert_array_equal(stored(store, uids[0], "mask"), (lungs > 0).astype(np.uint8))
    attrs = volume_attrs(store, uids[0])
    # LPS origin (-120, 80, -300) of ITK voxel 0 -> RAS voxel (nx-1, ny-1, 0) of the stored array
    nx, ny, _ = SHAPE
    np.testing.assert_allclose(attrs["origin"], [120.0 - (nx - 1), -80.0 - (ny - 1), -300.0])
    assert len(attrs["source_sha256"]) == 64
    assert recipes.find_luna16(tmp_path, subsets=[1]).ids == [uids[1]]


def test_tcia_covid_series_selection(ray_local, tmp_path):
    collection = tmp_path / "manifest-1608266677008" / "CT Images in COVID-19"
    spacing = (1.5, 1.5, 2.0)
    image, _, affine = ct_volume(1, spacing)
    write_dicom_series(image, affine, collection / "volume-covid19-A-0003" / "study" / "2.000-CT",
                       patient_id="volume-covid19-A-0003", shuffle_seed=0, series_number=2)
    scout = collection / "volume-covid19-A-0003" / "study" / "1.000-scout"
    for path in write_dicom_series(image[:, :, :2], affine, scout, series_number=1,
                                   patient_id="volume-covid19-A-0003"):
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path)
    other, _, _ = ct_volume(2, spacing)
    second = collection / "volume-covid19-A-0011" / "study"
    write_dicom_series(other, affine, second / "3.000-CT-lung", patient_id="volume-covid19-A-0011",
                       series_number=3, file_prefix="L")
    write_dicom_series(other, affine, second / "3.000-CT-lung", patient_id="volume-covid19-A-0011",
                       series_number=4, file_prefix="M")  # two series in one folder
    write_dicom_series(other[:, :, :3], affine, second / "short", series_number=5,
                       patient_id="volume-covid19-A-0011")

    found = recipes.find_tcia_covid(tmp_path, min_slices=5)
    assert found.ids == ["volume-covid19-A-0003", "volume-covid19-A-0011_s3",
                         "volume-covid19-A-0011_s4"]
    notes = " | ".join(found.skipped)
    assert "localizer" in notes and "3 slices < min_slices=5" in notes

    store = tmp_path / "covid.zarr"
    manifest = recipes.convert_tcia_covid(tmp_path, store, min_slices=5, progress=False)
    assert list(manifest["id"]) == found.ids
    np.testing.assert_array_equal(stored(store, "volume-covid19-A-0003"), image)
    np.testing.assert_array_equal(stored(store, "volume-covid19-A-0011_s4"), other)


def test_brain_mri_adni_and_oasis(ray_local, tmp_path):
    rng = np.random.default_rng(1)

    def brain():
        return rng.uniform(0, 800, size=SHAPE).astype(np.float32)

    adni = tmp_path / "ADNI"
    scan_dir = adni / "002_S_0295" / "MPRAGE" / "2006-04-18" / "S13408"
    scan_dir.mkdir(parents=True)
    nib.save(nib.Nifti1Image(brain(), np.eye(4)), scan_dir / "ADNI_002_S_0295_MR_MPRAGE.nii")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), np.eye(4)),
             scan_dir / "ADNI_002_S_0295_aseg.nii")
    other = adni / "011_S_0002" / "MPRAGE" / "2005-08-26" / "S9107"
    other.mkdir(parents=True)
    nib.save(nib.Nifti1Image(brain(), np.eye(4)), other / "ADNI_011_S_0002_MR_MPRAGE.nii.gz")
    found = recipes.find_nifti_brains(adni)
    assert found.ids == ["ADNI_002_S_0295_MR_MPRAGE", "ADNI_011_S_0002_MR_MPRAGE"]
    assert any("aseg" in note for note in found.skipped)

    oasis = tmp_path / "oasis"
    raw_images = {}
    for session in ("OAS1_0001_MR1", "OAS1_0002_MR1"):
        raw = oasis / "disc1" / session / "RAW"
        raw.mkdir(parents=True)
        for repetition in (1, 2):
            data = brain()
            nib.save(nib.AnalyzeImage(data, np.eye(4)), raw / f"{session}_mpr-{repetition}_anon.hdr")
            raw_images[(session, repetition)] = data
        t88 = oasis / "disc1" / session / "PROCESSED" / "MPRAGE" / "T88_111"
        t88.mkdir(parents=True)
        nib.save(nib.AnalyzeImage(brain(), np.eye(4)),
                 t88 / f"{session}_mpr_n4_anon_111_t88_masked_gfc.hdr")
        seg = oasis / "disc1" / session / "FSL_SEG"
        seg.mkdir()
        nib.save(nib.AnalyzeImage(rng.integers(0, 4, SHAPE).astype(np.uint8), np.eye(4)),
                 seg / f"{session}_mpr_n4_anon_111_t88_masked_gfc_fseg.hdr")
    found = recipes.find_oasis(oasis)
    assert found.ids == ["OAS1_0001_MR1", "OAS1_0002_MR1"] and found.labels is None
    assert all(p.endswith("_mpr-1_anon.hdr") for p in found.images)
    labelled = recipes.find_oasis(oasis, variant="t88_masked", tissue_labels=True)
    assert all(p.endswith("_fseg.hdr") for p in labelled.labels)
    with pytest.raises(dz.ConversionError, match="tissue_labels needs"):
        recipes.find_oasis(oasis, tissue_labels=True)

    store = tmp_path / "brains.zarr"
    manifest = recipes.convert_brain_mri(oasis, store, progress=False)  # auto -> OASIS raw
    assert list(manifest["id"]) == ["OAS1_0001_MR1", "OAS1_0002_MR1"]
    image = stored(store, "OAS1_0001_MR1")
    assert image.dtype == np.float32 and image.min() == 0.0 and image.max() == 1.0
    # Analyze has no orientation: nibabel's default is LAS, so x comes out flipped.
    source = raw_images[("OAS1_0001_MR1", 1)][::-1]
    low, high = np.percentile(source, [0.5, 99.5])
    np.testing.assert_allclose(image, np.clip((source - low) / (high - low), 0, 1), atol=1e-5)
    # The source hash covers the .img half of the pair: changing it reconverts the volume.
    img_file = oasis / "disc1" / "OAS1_0001_MR1" / "RAW" / "OAS1_0001_MR1_mpr-1_anon.img"
    img_file.write_bytes(np.zeros(SHAPE, np.float32).tobytes())
    again = recipes.convert_brain_mri(oasis, store, progress=False)
    assert again.attrs["converted"] == ["OAS1_0001_MR1"]
    assert again.attrs["skipped"] == ["OAS1_0002_MR1"]

    adni_manifest = recipes.convert_brain_mri(adni, tmp_path / "adni.zarr", progress=False)
    assert list(adni_manifest["modality"]) == ["MR", "MR"]
