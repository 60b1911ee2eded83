"""`rayssl preview`: stream samples through the real pipeline and draw each method's geometry as a PNG."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import numpy as np

from rayssl.config import RunConfig
from rayssl.methods.base import PreviewBox, PreviewFigure, PreviewScene, VolumeInfo

# plane name -> (horizontal axis, vertical axis, axis across the plane); arrays are (x, y, z) RAS.
PLANES: dict[str, tuple[int, int, int]] = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}
_AXIS_NAMES = "xyz"


def _plane(reader: Any, volume: VolumeInfo, plane: str, at: int) -> np.ndarray:
    """The volume's plane `plane` at index `at` (clamped into the volume), as [horizontal, vertical]."""
    h, v, n = PLANES[plane]
    start, size = [0, 0, 0], list(volume.shape)
    start[n], size[n] = int(np.clip(at, 0, volume.shape[n] - 1)), 1
    box = reader.read(volume.extra["group"], start, size, pad_value=volume.background, dtype=np.float32)
    return np.take(box, 0, axis=n)  # the two remaining axes keep (x, y, z) order = (h, v)


def _display_range(image: np.ndarray) -> tuple[float, float]:
    lo, hi = (float(x) for x in np.percentile(image, [1.0, 99.5]))
    return lo, max(hi, lo + 1e-6)


def _colours(figures: Sequence[PreviewFigure]) -> dict[str, Any]:
    """One colour per box/point group, in order of first appearance."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    groups: list[str] = []
    for fig in figures:
        for scene in fig.scenes:
            for item in [*scene.boxes, *scene.points]:
                if item.group not in groups:
                    groups.append(item.group)
    return {g: palette[i % len(palette)] for i, g in enumerate(groups)}


def _draw_box(ax: Any, box: PreviewBox, plane: str, at: float, colour: Any, labels: list[Any]) -> bool:
    """Outline `box` on a plane; solid when the plane cuts it, dashed (its projection) when not. Its label
    (top-left, inside) is appended to `labels`, to be kept apart from the others (_separate_labels)."""
    from matplotlib.patches import Rectangle

    h, v, n = PLANES[plane]
    cuts = box.start[n] <= at + 0.5 < box.start[n] + box.size[n]
    ax.add_patch(Rectangle((box.start[h], box.start[v]), box.size[h], box.size[v], fill=False, edgecolor=colour,
                           linewidth=box.linewidth if cuts else 0.9, linestyle="-" if cuts else "--", alpha=1.0 if cuts else 0.6))
    if box.slices is not None and box.slices[0] in (h, v):
        axis = box.slices[0]
        for p in box.slices[1]:
            c = p + 0.5  # voxel centre
            if axis == h:
                ax.plot([c, c], [box.start[v], box.start[v] + box.size[v]], color=colour, linewidth=0.5, alpha=0.8)
            else:
                ax.plot([box.start[h], box.start[h] + box.size[h]], [c, c], color=colour, linewidth=0.5, alpha=0.8)
    if box.label and cuts:
        text = ax.annotate(box.label, (box.start[h], box.start[v] + box.size[v]), xytext=_BOX_LABEL_OFFSETS[0],
                           textcoords="offset points", color=colour, fontsize=5.5, va="top", ha="left")
        text.rayssl_offsets = _BOX_LABEL_OFFSETS
        labels.append(text)
    if box.note and cuts:
        ax.text(box.start[h] + box.size[h] / 2, box.start[v] + box.size[v] / 2, box.note, color="white",
                fontsize=5, va="center", ha="center", bbox=dict(facecolor="black", alpha=0.45, pad=0.5, linewidth=0))
    return cuts


# Where a point's label may sit, in points from the point: tried in order until it overlaps no other label.
_LABEL_OFFSETS = [(dx, dy) for dy in (3, -9, 10, -16, 17, -23) for dx in (3, -13)]
# A box's label: inside its top-left corner, else lower down its left edge.
_BOX_LABEL_OFFSETS = [(2, -2 - 7 * k) for k in range(6)]


def _separate_labels(fig: Any, labels: Sequence[Sequence[Any]]) -> None:
    """Move point labels (annotations in offset points, one list per axes) so that no two of an axes overlap:
    each takes the first of _LABEL_OFFSETS clear of the labels placed before it (else the least overlapping)."""
    if not any(labels):
        return
    fig.canvas.draw()  # the final layout, so extents are those of the saved figure
    renderer = fig.canvas.get_renderer()

    def overlap(a: Any, b: Any) -> float:
        return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))

    for texts in labels:
        placed: list[Any] = []
        for text in texts:
            best = None
            for offset in getattr(text, "rayssl_offsets", _LABEL_OFFSETS):
                text.set_position(offset)
                box = text.get_window_extent(renderer)
                clash = sum(overlap(box, other) for other in placed)
                if best is None or clash < best[0]:
                    best = (clash, offset)
                if clash == 0:
                    break
            text.set_position(best[1])
            placed.append(text.get_window_extent(renderer))


def legend_handles(colours: dict[str, Any], projected: bool, points_in_plane: bool, points_off_plane: bool) -> list[Any]:
    """The legend: one line per group, then how to read dashed boxes and filled / hollow dots where drawn."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour, linewidth=1.4, label=group) for group, colour in colours.items()]
    if projected:
        handles.append(Line2D([], [], color="grey", linestyle="--", linewidth=0.9,
                              label="dashed: box does not cross this plane (its projection)"))
    if points_in_plane:
        handles.append(Line2D([], [], marker="o", markersize=4, color="grey", linestyle="none",
                              label="filled dot: point within 1 voxel of this plane"))
    if points_off_plane:
        handles.append(Line2D([], [], marker="o", markersize=4, color="grey", markerfacecolor="none", linestyle="none",
                              label="hollow dot: point off this plane (its projection)"))
    handles.append(Line2D([], [], color="#999999", linestyle=":", linewidth=0.8, label="volume edge"))
    return handles


def _draw_scene_plane(ax: Any, scene: PreviewScene, volume: VolumeInfo, image: np.ndarray, plane: str,
                      colours: dict[str, Any], grey: tuple[float, float]) -> tuple[bool, set[bool], list[Any]]:
    """One plane of a scene: the volume slice `image` through the focus, its outline, boxes and points.
    Returns whether some box was drawn as a projection, which kinds of dot were drawn (True: in the
    plane, filled; False: off it, hollow) for the legend, and the points' labels (to keep apart)."""
    h, v, n = PLANES[plane]
    at = int(np.floor(scene.focus[n]))
    lo, hi = grey
    ax.set_facecolor("#202020")
    ax.imshow(image.T, cmap="gray", origin="lower", vmin=lo, vmax=hi,
              extent=(0, volume.shape[h], 0, volume.shape[v]), interpolation="nearest")
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((0, 0), volume.shape[h], volume.shape[v], fill=False, edgecolor="#999999",
                           linewidth=0.6, linestyle=":"))
    projected = False
    xs, ys = [0.0, float(volume.shape[h])], [0.0, float(volume.shape[v])]
    labels: list[Any] = []
    for box in scene.boxes:
        projected |= not _draw_box(ax, box, plane, at, colours[box.group], labels)
        xs += [box.start[h], box.start[h] + box.size[h]]
        ys += [box.start[v], box.start[v] + box.size[v]]
    dots: set[bool] = set()
    for point in scene.points:
        in_plane = abs(point.position[n] - (at + 0.5)) <= 1.0
        dots.add(in_plane)
        colour = colours[point.group]
        ax.plot(point.position[h], point.position[v], marker="o", markersize=4 if point.label else 2.5,
                markerfacecolor=colour if in_plane else "none", markeredgecolor=colour, linestyle="none")
        if point.label:  # placed apart from the others once the layout is final (_separate_labels)
            labels.append(ax.annotate(point.label, (point.position[h], point.position[v]), xytext=_LABEL_OFFSETS[0],
                                      textcoords="offset points", color=colour, fontsize=6))
        xs.append(point.position[h])
        ys.append(point.position[v])
    pad = 2.0
    ax.set_xlim(min(xs) - pad, max(xs) + pad)
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.set_aspect(volume.spacing[v] / volume.spacing[h])  # physical proportions
    ax.set_xlabel(f"{_AXIS_NAMES[h]} (voxel)", fontsize=6, labelpad=1)
    ax.set_ylabel(f"{_AXIS_NAMES[v]} (voxel)", fontsize=6, labelpad=1)
    ax.tick_params(labelsize=5, length=2, pad=1)
    ax.set_title(f"{plane} plane {_AXIS_NAMES[n]}={at}", fontsize=7)
    return projected, dots, labels


def _scene_rows(scenes: Sequence[PreviewScene], ncols: int) -> list[list[PreviewScene]]:
    """Scenes packed into rows of at most `ncols` planes, in order (e.g. GVSL's pair side by side)."""
    rows: list[list[PreviewScene]] = []
    for scene in scenes:
        if rows and sum(len(s.planes) for s in rows[-1]) + len(scene.planes) <= ncols:
            rows[-1].append(scene)
        else:
            rows.append([scene])
    return rows


def render_preview(figure: PreviewFigure, volumes: Sequence[VolumeInfo], path: str, ncols: int = 4) -> str:
    """Draw one sample's PreviewFigure: rows of scenes (their planes), then the images, legend and notes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rayssl.data.read import StoreReader

    scene_rows = _scene_rows(figure.scenes, ncols)
    image_rows = -(-len(figure.images) // ncols)
    height = 3.0 * len(scene_rows) + 2.6 * image_rows + 0.9 + 0.12 * len(figure.notes)
    fig = plt.figure(figsize=(3.0 * ncols, height), dpi=110, layout="constrained")
    rows = fig.subfigures(len(scene_rows) + (1 if image_rows else 0), 1, squeeze=False,
                          height_ratios=[3.0] * len(scene_rows) + ([2.6 * image_rows] if image_rows else []))[:, 0]
    colours = _colours([figure])
    readers: dict[str, StoreReader] = {}
    projected, dots, labels = False, set(), []
    for row, scenes in zip(rows, scene_rows):
        used = sum(len(s.planes) for s in scenes)
        parts = row.subfigures(1, len(scenes) + (1 if used < ncols else 0), squeeze=False,
                               width_ratios=[len(s.planes) for s in scenes] + ([ncols - used] if used < ncols else []))[0]
        for part, scene in zip(parts, scenes):
            volume = volumes[scene.volume]
            store = str(volume.extra["store"])
            reader = readers.setdefault(store, StoreReader(store))
            part.suptitle(scene.title, fontsize=7.5, fontweight="bold", wrap=True)
            images = [_plane(reader, volume, plane, int(np.floor(scene.focus[PLANES[plane][2]]))) for plane in scene.planes]
            # One grey scale for all planes of a scene (a plane of air alone would otherwise show its noise).
            grey = _display_range(np.concatenate([i.ravel() for i in images]))
            for c, (plane, image) in enumerate(zip(scene.planes, images)):
                ax = part.add_subplot(1, len(scene.planes), c + 1)
                box_projected, plane_dots, plane_labels = _draw_scene_plane(ax, scene, volume, image, plane, colours, grey)
                projected |= box_projected
                dots |= plane_dots
                labels.append(plane_labels)
    if image_rows:
        axes = rows[-1].subplots(image_rows, ncols, squeeze=False).ravel()
        for ax in axes:
            ax.set_axis_off()
        for ax, item in zip(axes, figure.images):
            image = np.asarray(item.image, dtype=np.float32)
            lo, hi = item.display_range if item.display_range is not None else _display_range(image)
            ax.imshow(image.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(item.title, fontsize=6.5)
    handles = legend_handles(colours, projected, points_in_plane=True in dots, points_off_plane=False in dots)
    # The title heads the legend: constrained layout then keeps both above the panels, apart.
    fig.legend(handles=handles, loc="outside upper center", ncol=min(len(handles), 4), fontsize=6.5, frameon=False,
               title=figure.title, title_fontproperties={"size": 10, "weight": "bold"})
    if figure.notes:
        fig.supxlabel("\n".join(figure.notes), fontsize=6, x=0.01, ha="left")
    _separate_labels(fig, labels)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _jsonable(figure: PreviewFigure) -> dict[str, Any]:
    """The figure's geometry and facts (images reduced to their titles and shapes)."""
    out = {
        "title": figure.title,
        "scenes": [dataclasses.asdict(s) for s in figure.scenes],
        "images": [{"title": i.title, "shape": list(np.shape(i.image))} for i in figure.images],
        "notes": list(figure.notes),
        "facts": figure.facts,
    }
    return json.loads(json.dumps(out, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def sample_paths(out: str, n: int) -> list[str]:
    """PNG paths of n samples: `out` for the first, `<stem>-<i><ext>` for the others."""
    stem, ext = os.path.splitext(out)
    return [out] + [f"{stem}-{i}{ext or '.png'}" for i in range(1, n)]


def preview(cfg: RunConfig, samples: int = 1, out: str = "preview.png", address: str | None = None,
            ray_init: dict[str, Any] | None = None, model: Any = None, run: str | None = None) -> list[str]:
    """Stream `samples` samples of `cfg`'s method through Ray Data and draw each one's geometry.

    Each sample's plan is rebuilt on the driver from its sample index (plans are deterministic in
    (seed, sample)), and the method's `preview_geometry` turns plan + views (+ `model`, if given,
    or the model of run folder `run`'s newest checkpoint) into boxes, points and images. Writes one PNG per sample and `<stem>.json` with the geometry
    of all of them; returns the PNG paths.
    """
    from rayssl.data.pipeline import build_dataset
    from rayssl.data.plan import Planner
    from rayssl.data.storage import apply_storage_options
    from rayssl.data.volumes import check_volumes_in_split, load_volumes
    from rayssl.methods import get_method_class
    from rayssl.train.trainer import ensure_ray, prepare_volumes, resolve_stores

    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    method = get_method_class(cfg.method)(cfg.method_cfg())
    model_note = ""
    if run is not None and model is None:
        from rayssl.checkpoint import load_newest_state

        state = load_newest_state(run)
        if state is None:
            raise FileNotFoundError(f"run folder {run} has no complete checkpoint_*/ to take the model from")
        model = method.build_model()
        model.load_state_dict(state["model"])  # strict: a config that does not match the run fails here
        model_note = f"Model: {run}, checkpoint of step {int(state.get('step', -1))}."
    stores, _ = resolve_stores(cfg)
    apply_storage_options(stores, cfg.data.storage_options)
    ensure_ray(address, **(ray_init or {}))
    loaded = load_volumes(stores, cfg.data.split)
    check_volumes_in_split(method.check_volumes, loaded, stores, cfg.data.split)
    volumes = prepare_volumes(method, loaded)  # each volume in its own store
    where = ", ".join(stores)
    ds = build_dataset(volumes, method.plan, method.views, num_samples=samples, seed=cfg.seed,
                       actors=(cfg.data.actors_min, cfg.data.actors_max), actor_cpus=cfg.data.actor_cpus,
                       on_error=cfg.data.on_error, read_dtype=method.read_dtype)
    t0 = time.perf_counter()
    rows = sorted(ds.take(samples), key=lambda row: int(row["sample"]))
    print(f"[rayssl] {len(rows)} {cfg.method} samples streamed from {where} in {time.perf_counter() - t0:.1f} s "
          f"(includes pipeline start-up)")
    for key, value in rows[0].items():
        print(f"  {key}: {getattr(value, 'shape', ())} {getattr(value, 'dtype', type(value).__name__)}")
    planner = Planner(volumes, method.plan, seed=cfg.seed)  # the same plans the data actors made
    paths, records = [], []
    for row, path in zip(rows, sample_paths(out, len(rows))):
        sample = int(row["sample"])
        _, _, requests, _ = planner.plan_requests(sample)
        views = {k: np.asarray(v) for k, v in row.items() if k != "sample"}
        figure = method.preview_geometry(volumes, requests, views, model=model)
        figure.title = f"{figure.title} (sample {sample}, seed {cfg.seed})"
        if model_note:
            figure.notes.append(model_note)
        paths.append(render_preview(figure, volumes, path))
        records.append({"sample": sample, "png": path, **_jsonable(figure)})
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"method": cfg.method, "stores": stores, "samples": records}, f, indent=1)
    return paths
