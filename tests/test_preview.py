"""`rayssl preview` draws each method's geometry; the drawn boxes agree with the method's plan and labels."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np


from rayssl.cli import main


def _preview(method: str, store, tmp_path, *overrides: str, flags: tuple[str, ...] = ()) -> dict:
    """Run `rayssl preview --method M` on `store`; check the PNG; return sample 0's geometry record."""
    from PIL import Image

    out = tmp_path / f"{method}.png"
    sets = [a for o in ("data.actors_max=1", *overrides) for a in ("--set", o)]
    assert main(["preview", "--method", method, "--data", str(store), "--profile", "cpu", "--out", str(out),
                 *sets, *flags]) == 0
    image = Image.open(out)
    assert image.size[0] > 500 and image.size[1] > 500
    assert len(set(image.convert("L").getdata())) > 50  # real image content, not a blank canvas
    record = json.load(open(tmp_path / f"{method}.json"))
    assert record["method"] == method and record["samples"][0]["png"] == str(out)
    return record["samples"][0]


def _boxes(scene: dict, group: str) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.array(b["start"], float), np.array(b["size"], float)) for b in scene["boxes"] if b["group"] == group]


def _overlap(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    lo, hi = np.maximum(a[0], b[0]), np.minimum(a[0] + a[1], b[0] + b[1])
    return float(np.prod(np.clip(hi - lo, 0, None)))


def _inside(inner, outer) -> bool:
    return bool((inner[0] >= outer[0]).all() and (inner[0] + inner[1] <= outer[0] + outer[1]).all())


def test_voco_preview_grid_random_crops_and_labels(ray_local, demo_store_path, tmp_path):
    from rayssl.methods.voco import position_labels

    record = _preview("voco", demo_store_path, tmp_path)
    (scene,) = record["scenes"]
    facts = record["facts"]
    (region,) = _boxes(scene, "region")
    bases, randoms = _boxes(scene, "base crop"), _boxes(scene, "random crop")
    assert len(bases) == int(np.prod(facts["grid"])) == 16 and len(randoms) == 2
    # The base crops tile the region exactly: inside it, pairwise disjoint, volumes summing to it.
    assert all(_inside(b, region) for b in bases)
    assert all(_overlap(a, b) == 0 for a, b in itertools.combinations(bases, 2))
    assert sum(float(np.prod(b[1])) for b in bases) == float(np.prod(region[1]))
    # Random crops lie inside the region, base-crop sized.
    assert all(_inside(r, region) and tuple(r[1]) == tuple(facts["base_size"]) for r in randoms)
    # The labels the model trains on (from views) = the drawn overlaps = the method's own computation.
    labels = np.array(facts["labels"])
    drawn = np.array([[_overlap(r, b) / np.prod(r[1]) for b in bases] for r in randoms])
    np.testing.assert_allclose(drawn, labels, atol=1e-6)
    np.testing.assert_allclose(position_labels(np.array(facts["random_starts_in_region"]), facts["base_size"],
                                               facts["region_size"], facts["grid"]), labels, atol=1e-6)
    # Each base crop notes its nonzero labels.
    notes = [b["note"] for b in scene["boxes"] if b["group"] == "base crop"]
    assert [bool(n) for n in notes] == list((labels > 0).any(axis=0))


def test_mlsscl_preview_places_the_short_clip_where_the_plan_and_views_put_it(ray_local, demo_store_path, tmp_path):
    from rayssl.config import resolve_config
    from rayssl.data.pipeline import ViewBuilder
    from rayssl.data.plan import Planner
    from rayssl.data.volumes import load_volumes
    from rayssl.methods.mlsscl import MLSSCL

    record = _preview("mlsscl", demo_store_path, tmp_path)
    facts = record["facts"]
    cfg = resolve_config(method="mlsscl", profile="cpu", overrides=[f"data.store={demo_store_path}"])
    method = MLSSCL(cfg.method_cfg())
    volumes = method.prepare(load_volumes(str(demo_store_path), cfg.data.split))
    _, _, requests, _ = Planner(volumes, method.plan, seed=cfg.seed).plan_requests(record["sample"])
    for view, request in zip(("axial", "coronal", "sagittal"), requests):
        assert facts["clip_boxes"][view] == {"start": list(request.start), "size": list(request.size)}
    # The short clip: the long (axial) clip's in-plane window, its z-range inside the long clip's,
    # starting at the offset the views drew (rebuilt here in-process from the same sample).
    offset = int(ViewBuilder(volumes, method.plan, method.views, seed=cfg.seed).build_sample(record["sample"])["short_offset"])
    assert facts["short_offset"] == offset
    long_box, short_box = facts["clip_boxes"]["axial"], facts["short_box"]
    assert short_box["start"] == [long_box["start"][0], long_box["start"][1], long_box["start"][2] + offset]
    assert short_box["size"][:2] == long_box["size"][:2]
    assert short_box["start"][2] + short_box["size"][2] <= long_box["start"][2] + long_box["size"][2]
    (scene,) = record["scenes"]
    (short,) = [b for b in scene["boxes"] if b["group"] == "short clip"]
    axis, slices = short["slices"]
    assert axis == 2 and np.array_equal(np.diff(slices), [facts["short_stride"]] * (facts["clip_length"] - 1))
    assert slices[0] == short_box["start"][2]


def test_drasclr_preview_shows_the_landmark_its_neighbours_and_the_atlas(ray_local, demo_store_path, tmp_path):
    from datasets_zarr.manifest import read_manifest, write_manifest

    store = tmp_path / "copy.zarr"  # prepare() writes lung masks into the store
    shutil.copytree(demo_store_path, store)
    old = read_manifest(demo_store_path)
    write_manifest(store, splits=dict(zip(old["id"], old["split"])))
    record = _preview("drasclr", store, tmp_path)
    facts = record["facts"]
    j, neighbors = facts["landmark"], facts["neighbors"]
    subject, atlas = record["scenes"]
    assert atlas["title"].startswith(f"atlas {facts['atlas']}")
    # The neighbours are j's nearest landmarks in the atlas (ties on the landmark grid may go either way).
    centres = np.array(facts["atlas_centres"])
    assert len(centres) == facts["n_landmarks"] and len(neighbors) == 2
    distance = np.linalg.norm(centres - centres[j], axis=1)
    distance[j] = np.inf
    assert j not in neighbors and distance[neighbors].max() <= np.sort(distance)[len(neighbors) - 1] + 1e-4
    # Subject patches are centred on the landmark and on those neighbours.
    patches = _boxes(subject, "landmark patch") + _boxes(subject, "neighbour patches")
    for i, (start, size) in zip([j, *neighbors], patches):
        np.testing.assert_allclose(start + size / 2, facts["subject_centres"][str(i)])
        assert tuple(size) == (facts["patch_size"],) * 3
    assert {p["label"] for p in atlas["points"] if p["group"] != "atlas landmarks"} == {str(i) for i in [j, *neighbors]}
    assert sum(p["group"] == "atlas landmarks" for p in atlas["points"]) == facts["n_landmarks"] - 1 - len(neighbors)


def test_gvsl_preview_warps_with_the_run_model(ray_local, demo_store_path, tmp_path):
    """`--run RUN`: the moving image is warped by the run's checkpointed model (here one whose DVF
    is a constant 1-voxel shift, so its use is visible in the numbers)."""
    import os

    import torch

    from rayssl.config import resolve_config
    from rayssl.methods.gvsl import GVSL
    from rayssl.checkpoint import write_checkpoint_dir

    method = GVSL(resolve_config(method="gvsl", profile="cpu").method_cfg())
    model = method.build_model()
    with torch.no_grad():
        model.deformable_head.flow.weight.zero_()
        model.deformable_head.flow.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    run = tmp_path / "run"
    run.mkdir()
    os.replace(write_checkpoint_dir({"model": model.state_dict(), "step": 3}, {"step": 3}), run / "checkpoint_000003")
    record = _preview("gvsl", demo_store_path, tmp_path, flags=("--run", str(run)))
    facts = record["facts"]
    assert facts["pair"][0] != facts["pair"][1] and facts["model"] == "given"
    assert abs(facts["max_abs_flow_voxels"] - 1.0) < 1e-5
    assert any("checkpoint of step 3" in n for n in record["notes"])
    assert [s["title"].split(":")[0] for s in record["scenes"]] == ["x_A (fixed)", "x_B (moving)"]
    titles = [i["title"] for i in record["images"]]
    assert any("corrupted" in t for t in titles) and any(t.startswith("x_B warped") for t in titles)
    assert all(i["shape"] == [48, 48] for i in record["images"])


def test_gvsl_geometry_without_a_model_uses_a_fresh_one(demo_store_path):
    from rayssl.config import resolve_config
    from rayssl.data.pipeline import ViewBuilder
    from rayssl.data.volumes import load_volumes
    from rayssl.methods.gvsl import GVSL

    method = GVSL(resolve_config(method="gvsl", profile="cpu").method_cfg())
    volumes = method.prepare(load_volumes(str(demo_store_path), "train"))
    builder = ViewBuilder(volumes, method.plan, method.views, seed=0)
    _, _, requests, _ = builder.planner.plan_requests(0)
    figure = method.preview_geometry(volumes, requests, builder.build_sample(0))
    assert figure.facts["model"] == "fresh" and figure.facts["max_abs_flow_voxels"] < 0.05  # near identity
    assert [s.volume for s in figure.scenes] == [r.volume for r in requests] and len(figure.images) == 4


def test_preview_refuses_zero_samples(demo_store_path, tmp_path, capsys):
    assert main(["preview", "--data", str(demo_store_path), "--samples", "0", "--out", str(tmp_path / "p.png")]) == 2
    assert "--samples must be >= 1" in capsys.readouterr().err


def test_point_labels_are_kept_apart_and_the_legend_explains_filled_and_hollow_dots():
    """DrasCLR's neighbour landmarks sit a few voxels apart: their labels must not print over each other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rayssl.preview import _LABEL_OFFSETS, _separate_labels, legend_handles

    fig, ax = plt.subplots(figsize=(3, 3), dpi=110)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    points = [(50 + i % 3, 50 + i // 3) for i in range(7)]  # 7 points within 3 voxels of each other
    labels = [ax.annotate(str(10 + i), p, xytext=_LABEL_OFFSETS[0], textcoords="offset points", fontsize=6)
              for i, p in enumerate(points)]
    _separate_labels(fig, [labels])
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert len({t.get_position() for t in labels}) > 1
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    plt.close(fig)

    names = [h.get_label() for h in legend_handles({"landmark patch": "red"}, projected=False, points_in_plane=True,
                                                   points_off_plane=True)]
    assert any(n.startswith("filled dot") for n in names) and any(n.startswith("hollow dot") for n in names)
    names = [h.get_label() for h in legend_handles({"region": "red"}, False, False, False)]
    assert not any("dot" in n for n in names)
