"""`rayssl preview`: stream a few samples through the real pipeline and draw their views as a PNG montage."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from rayssl.config import RunConfig


def _volumes_in(name: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """3D volumes inside a view array of one sample: [..., D, H, W] with any leading dims."""
    if array.ndim < 3 or not np.issubdtype(array.dtype, np.floating):
        return []
    lead = array.shape[:-3]
    out = []
    for idx in np.ndindex(*lead) if lead else [()]:
        label = name + ("[" + ",".join(map(str, idx)) + "]" if idx else "")
        out.append((label, array[idx]))
    return out


def render_montage(samples: list[dict[str, np.ndarray]], path: str, max_views: int = 8) -> str:
    """One row per (sample, view): axial / coronal / sagittal centre planes of each 3D view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, np.ndarray]] = []
    for i, sample in enumerate(samples):
        for key in sorted(sample):
            for label, vol in _volumes_in(key, sample[key])[:max_views]:
                rows.append((f"s{i} {label}", vol))
    if not rows:
        raise ValueError("the samples hold no 3D views to draw")
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.4 * len(rows)), squeeze=False)
    for r, (label, vol) in enumerate(rows):
        x, y, z = (s // 2 for s in vol.shape)
        planes = {"axial (z)": vol[:, :, z].T, "coronal (y)": vol[:, y, :].T, "sagittal (x)": vol[x, :, :].T}
        for c, (title, plane) in enumerate(planes.items()):
            ax = axes[r, c]
            ax.imshow(plane, cmap="gray", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{label}\n{tuple(vol.shape)}", fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def preview(cfg: RunConfig, samples: int = 4, out: str = "preview.png", address: str | None = None,
            ray_init: dict[str, Any] | None = None) -> str:
    """Stream `samples` samples of `cfg`'s method through Ray Data and draw them."""
    from rayssl.data.pipeline import build_dataset
    from rayssl.data.volumes import check_volumes_in_split, load_volumes
    from rayssl.methods import get_method_class
    from rayssl.train.trainer import ensure_ray, resolve_store

    method = get_method_class(cfg.method)(cfg.method_cfg())
    store = resolve_store(cfg)
    ensure_ray(address, **(ray_init or {}))
    volumes = method.prepare(store, load_volumes(store, cfg.data.split))
    check_volumes_in_split(method.check_volumes, volumes, store, cfg.data.split)
    ds = build_dataset(volumes, method.plan, method.views, num_samples=samples, seed=cfg.seed,
                       actors=(cfg.data.actors_min, cfg.data.actors_max), actor_cpus=cfg.data.actor_cpus,
                       on_error=cfg.data.on_error, read_dtype=method.read_dtype)
    t0 = time.perf_counter()
    rows = ds.take(samples)
    print(f"[rayssl] {len(rows)} {cfg.method} samples streamed from {store} in {time.perf_counter() - t0:.1f} s "
          f"(includes pipeline start-up)")
    for key, value in rows[0].items():
        print(f"  {key}: {getattr(value, 'shape', ())} {getattr(value, 'dtype', type(value).__name__)}")
    return render_montage([{k: np.asarray(v) for k, v in r.items()} for r in rows], out)
