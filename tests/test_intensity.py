"""The intensity contract (rayssl/data/intensity.py): one rule for "stored in HU" and one mapping, used alike
by every method's training views, its probe inputs and its export's bundle metadata."""

import pickle
from dataclasses import replace

import numpy as np
import pytest

from datasets_zarr.demo import make_phantom, phantom_affine
from datasets_zarr.landmarks import nearest_landmarks
from datasets_zarr.manifest import write_manifest
from datasets_zarr.preprocess import foreground_bbox
from datasets_zarr.store import write_volume
from rayssl.config import resolve_config
from rayssl.data.intensity import IntensityMapping, IntensityRule, hu_offset
from rayssl.data.pipeline import ViewBuilder
from rayssl.data.types import VolumeInfo
from rayssl.data.volumes import load_volumes
from rayssl.eval.features import intensity_scaler
from rayssl.eval.probe import load_probe_data, scaled_volumes
from rayssl.export import bundle_metadata
from rayssl.methods import get_method_class
from rayssl.methods.drasclr import EXTRA_ATLAS_COORDS, EXTRA_NEIGHBORS, EXTRA_POSITIONS

SHAPE, SPACING = (40, 40, 24), (8.0, 8.0, 10.0)
METHODS = ("voco", "mlsscl", "gvsl", "drasclr")
# Each method's cpu profile with views and networks small enough for 40 x 40 x 24 phantoms.
TINY = {
    "voco": ["n_x=2", "n_y=2", "region_size=[32,32,16]", "input_size=32", "unet_features=[4,4,8,8,16,4]",
             "proj_hidden_dim=8", "proj_dim=8"],
    "mlsscl": ["clip_length=4", "long_stride=2", "short_stride=1", "plane_size=16", "image_size=16",
               "resnet_widen_factor=0.125", "mlsscl.proj_dim=8"],
    "gvsl": ["gvsl.input_size=[16,16,16]", "features=[4,4,8,8,16,4]", "num_groups=2"],
    "drasclr": ["patch_size=8", "n_neighbors=2", "widths=[4,4,4,8,8]", "rep_dim=8", "drasclr.proj_dim=6",
                "num_experts=3"],
}
CT_STORAGE = ("int16", "uint16", "float32")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same two CT phantoms stored three ways: int16 HU (the converter's default), uint16 = HU + 1024
    (the offset recorded in `intensity`) and float32 HU; and an MR store holding values in [0, 1] (like MNI152)."""
    root = tmp_path_factory.mktemp("intensity")
    affine = phantom_affine(SHAPE, SPACING)
    phantoms = [make_phantom(seed, SHAPE, SPACING) for seed in (0, 1)]
    paths = {}
    for kind in (*CT_STORAGE, "mr"):
        store = root / kind
        for i, (hu, label) in enumerate(phantoms):
            # One foreground box for all: it is computed from HU values (a uint16 store would otherwise box everything).
            options = dict(label=label, bbox=foreground_bbox(hu, "CT"), chunks=16)
            if kind == "int16":
                write_volume(store, f"s{i}", hu, affine, modality="CT", **options)
            elif kind == "uint16":
                write_volume(store, f"s{i}", (hu.astype(np.int32) + 1024).astype(np.uint16), affine, modality="CT",
                             intensity={"unit": "HU", "offset": 1024}, background=0.0, **options)
            elif kind == "float32":
                write_volume(store, f"s{i}", hu.astype(np.float32), affine, modality="CT", intensity={"unit": "HU"},
                             background=-1024.0, **options)
            else:
                mr = np.clip((hu.astype(np.float32) + 1000.0) / 2000.0, 0.0, 1.0)
                write_volume(store, f"s{i}", mr, affine, modality="MR", **options)
        write_manifest(store, splits={"s0": "train", "s1": "train"})
        paths[kind] = str(store)
    return paths


def _method(name: str, *overrides: str):
    cfg = resolve_config(method=name, profile="cpu", overrides=[*TINY[name], *overrides])
    return get_method_class(name)(cfg.method_cfg())


def _with_landmarks(volumes: list[VolumeInfo], k: int = 2) -> list[VolumeInfo]:
    """DrasCLR's prepared facts without registration: one landmark grid in an identity atlas."""
    centres = np.array([(x, y, z) for x in (12, 20, 28) for y in (14, 26) for z in (8, 16)], np.float32)
    extra = {EXTRA_POSITIONS: centres, EXTRA_NEIGHBORS: nearest_landmarks(centres, k),
             EXTRA_ATLAS_COORDS: (centres / np.array(SHAPE, np.float32) * 2 - 1).astype(np.float32)}
    return [replace(v, extra={**v.extra, **extra}) for v in volumes]


def _views(name: str, store: str, *overrides: str, samples: int = 3) -> list[dict[str, np.ndarray]]:
    """Training views as the data actors build them (plan, read, views) on a copy of the method that never planned."""
    method = _method(name, *overrides)
    volumes = load_volumes(store, split="all")
    if name == "drasclr":
        volumes = _with_landmarks(volumes)
    views = pickle.loads(pickle.dumps(method)).views
    builder = ViewBuilder(volumes, method.plan, views, seed=0, read_dtype=method.read_dtype)
    return [builder.build_sample(s) for s in range(samples)]


def _probe_inputs(name: str, store: str) -> list[np.ndarray]:
    method = _method(name)
    return scaled_volumes(load_probe_data(store), intensity_scaler(name, method.config))


class TestOneRule:
    def test_stored_in_hu_from_the_record_then_the_dtype(self, stores):
        offsets = {kind: {hu_offset(v) for v in load_volumes(stores[kind], split="all")} for kind in stores}
        assert offsets == {"int16": {0.0}, "uint16": {1024.0}, "float32": {0.0}, "mr": {None}}
        # A manifest from before the intensity column: integer CT is HU, float CT was windowed at conversion.
        old = VolumeInfo(0, "v", SHAPE, SPACING, (0, 0, 0, *SHAPE), -1024.0, "CT", extra={"dtype": "int16"})
        assert hu_offset(old) == 0.0 and hu_offset(replace(old, extra={"dtype": "float32"})) is None
        scaled = replace(old, extra={"dtype": "float32", "intensity": '{"unit": "scaled", "range": [0, 1]}'})
        assert IntensityRule("hu_window").resolve(scaled).kind == "none"

    def test_mapping_windows_clips_and_maps_to_its_range(self):
        hu = np.array([-2000.0, -1024.0, -392.0, 240.0, 900.0], np.float32)
        window = IntensityMapping("hu_window", -1024.0, 240.0, out_range=(-1.0, 1.0))
        np.testing.assert_allclose(window.apply(hu), [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-6)
        shifted = replace(window, hu_offset=1024.0)
        np.testing.assert_allclose(shifted.apply(hu + 1024.0), window.apply(hu), atol=1e-6)
        flat = IntensityMapping("percentile", 0.5, 99.5)
        assert (flat.apply(np.full((4, 4), 7.0)) == 0.0).all()
        assert IntensityMapping("none").value_range is None and IntensityMapping("none").apply(hu) is not hu


class TestSameCTStoredThreeWays:
    @pytest.mark.parametrize("name", METHODS)
    def test_identical_training_views_and_probe_inputs(self, stores, name):
        views = {kind: _views(name, stores[kind]) for kind in CT_STORAGE}
        for kind in ("uint16", "float32"):
            for a, b in zip(views["int16"], views[kind]):
                assert set(a) == set(b)
                for key in a:
                    np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-5, err_msg=f"{name} {kind} {key}")
        floats = [v for s in views["int16"] for v in s.values() if np.issubdtype(np.asarray(v).dtype, np.floating)
                  and np.ndim(v) >= 3]
        assert max(float(np.ptp(v)) for v in floats) > 0.5  # the views hold an image, not a constant
        probes = {kind: _probe_inputs(name, stores[kind]) for kind in CT_STORAGE}
        low, high = _method(name).intensity_rule().out_range
        for kind in ("uint16", "float32"):
            for a, b in zip(probes["int16"], probes[kind]):
                np.testing.assert_allclose(b, a, rtol=0, atol=1e-6, err_msg=f"{name} {kind} probe input")
        assert all(p.min() >= low and p.max() <= high and p.max() - p.min() > 0.5 * (high - low)
                   for p in probes["int16"])


class TestMRUnderACTWindow:
    @pytest.mark.parametrize("name", METHODS)
    def test_views_and_probe_inputs_use_percentiles(self, stores, name):
        method = _method(name)
        assert method.intensity_rule().mode == "hu_window"  # each method's cpu profile windows CT
        volumes = load_volumes(stores["mr"], split="all")
        if name == "drasclr":
            volumes = _with_landmarks(volumes)
        requests = method.plan(volumes, 0, np.random.default_rng(0))
        assert {r.intensity.kind for r in requests} == {"percentile"}
        low, high = method.intensity_rule().out_range
        # A HU window would squeeze the stored [0, 1] into ~0.5 of the range ([-1024, 240] -> near -0.4).
        for probe in _probe_inputs(name, stores["mr"]):
            assert probe.min() == pytest.approx(low) and probe.max() == pytest.approx(high)
        views = _views(name, stores["mr"], samples=2)
        spans = [float(np.ptp(v)) for s in views for v in s.values()
                 if np.issubdtype(np.asarray(v).dtype, np.floating) and np.ndim(v) >= 3]
        assert max(spans) > 0.5 * (high - low), spans


@pytest.mark.parametrize("name,overrides,kind,expected", [
    ("drasclr", (), "int16", {"format": "hounsfield", "modality": "CT", "value_range": [-1.0, 1.0]}),
    ("drasclr", (), "mr", {"format": "magnitude", "modality": "MR", "value_range": [-1.0, 1.0]}),
    ("mlsscl", (), "mr", {"format": "magnitude", "modality": "MR", "value_range": [0.0, 1.0]}),
    ("mlsscl", (), "int16", {"format": "hounsfield", "modality": "CT", "value_range": [0.0, 1.0]}),
    ("voco", (), "int16", {"format": "hounsfield", "modality": "CT", "value_range": [0.0, 1.0]}),
    ("voco", ("intensity=none",), "int16", {"format": "magnitude", "modality": "CT", "value_range": []}),
    ("gvsl", ("intensity=stored_2048",), "uint16", {"format": "hounsfield", "modality": "CT", "value_range": [0.0, 1.0]}),
    ("gvsl", (), "mr", {"format": "magnitude", "modality": "MR", "value_range": [0.0, 1.0]}),
])
def test_bundle_metadata_follows_the_resolved_mapping(stores, name, overrides, kind, expected):
    """The export's MONAI metadata as the training loop writes it: the card's facts, the run's resolved intensity."""
    method = _method(name, *overrides)
    exported = method.export(method.build_model())
    volumes = load_volumes(stores[kind], split="all")
    card = {**method.card(), "method": name, "network": exported.network, "network_kwargs": exported.network_kwargs,
            "intensity_resolved": method.intensity_rule().summary(volumes)}
    image = bundle_metadata(card)["network_data_format"]["inputs"]["image"]
    assert {k: image[k] for k in expected} == expected
