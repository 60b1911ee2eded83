"""`rayssl probe`: the probes (and optional fine-tuning) of one run against random init, repeated, written
to the run folder (probe.json, probe.png) and its model card."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from rayssl.eval.features import export_folder, load_run_weights
from rayssl.eval.finetune import FinetuneConfig, run_finetune
from rayssl.eval.probe import (
    REPEAT_SEED_STEP,
    ProbeConfig,
    ProbeData,
    _Threads,
    format_table,
    load_probe_data,
    plot_rows,
    prepare,
    probe_network,
    summarise_repeats,
)


@dataclass
class ProbeReport:
    rows: list[dict[str, Any]]
    info: dict[str, Any]
    json_path: str | None = None
    png_path: str | None = None


def run_probe(run_dir: str, store: str | None = None, cfg: ProbeConfig | None = None, source: str = "auto",
              checkpoint: str | None = None, finetune: FinetuneConfig | None = None, out_dir: str | None = None,
              write: bool = True, data: ProbeData | None = None) -> ProbeReport:
    """`rayssl probe`: linear probes (and optionally fine-tuning) of a run's backbone vs random init.

    Writes probe.json and probe.png into `out_dir` (default: the run folder) and adds a probe
    summary to export/model_card.json when the run has an export.
    """
    cfg = cfg or ProbeConfig()
    t0 = time.perf_counter()
    weights = load_run_weights(run_dir, source=source, checkpoint=checkpoint)
    data = data or load_probe_data(store, fit_fraction=cfg.fit_fraction, seed=cfg.seed)
    repeat_rows: list[list[dict[str, Any]]] = []
    with _Threads(cfg.threads):
        for r in range(cfg.repeats):
            repeat_cfg = replace(cfg, seed=cfg.seed + REPEAT_SEED_STEP * r)
            setup = prepare(weights, data, repeat_cfg)
            if r == 0:
                print(f"[rayssl] probe: {weights.method} backbone ({weights.network.rsplit('.', 1)[-1]}, "
                      f"{weights.source}, step {weights.step}) on {len(data.fit)} fit / {len(data.eval)} eval "
                      f"volumes of {data.store}; {setup.patch}^3 crops, tasks {setup.tasks}, "
                      f"{cfg.repeats} repeats", flush=True)
            t_repeat = time.perf_counter()
            rows: list[dict[str, Any]] = []
            for pretrained in ([True, False] if cfg.baseline else [True]):
                rows += probe_network(setup, pretrained)
            if finetune is not None:
                rows += run_finetune(setup, replace(finetune, seed=finetune.seed + REPEAT_SEED_STEP * r),
                                     baseline=cfg.baseline)
            repeat_rows.append(rows)
            left = (cfg.repeats - r - 1) * (time.perf_counter() - t_repeat)
            print(f"[rayssl] probe repeat {r + 1}/{cfg.repeats} done in {time.perf_counter() - t_repeat:.0f} s"
                  + (f", ETA {left:.0f} s" if left > 0 else ""), flush=True)
    rows = summarise_repeats(repeat_rows)
    info = {
        "run": os.path.abspath(run_dir), "method": weights.method, "network": weights.network,
        "source": weights.source, "step": weights.step, "store": data.store, "patch": setup.patch,
        "fit_volumes": [data.volumes[i].info.id for i in data.fit],
        "eval_volumes": [data.volumes[i].info.id for i in data.eval],
        "classes": data.class_names, "fit_crops": len(setup.fit_pool), "eval_crops": len(setup.eval_pool),
        "repeats": cfg.repeats, "repeat_seeds": [cfg.seed + REPEAT_SEED_STEP * r for r in range(cfg.repeats)],
        "config": asdict(cfg), "finetune": asdict(finetune) if finetune is not None else None,
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    report = ProbeReport(rows=rows, info=info)
    print(format_table(rows))
    if write:
        out_dir = out_dir or run_dir
        os.makedirs(out_dir, exist_ok=True)
        report.json_path = os.path.join(out_dir, "probe.json")
        with open(report.json_path, "w") as f:
            json.dump({**info, "rows": rows}, f, indent=2, default=_json_default)
        report.png_path = plot_rows(rows, os.path.join(out_dir, "probe.png"),
                                    title=f"{weights.method} ({weights.source}, step {weights.step}) vs random init")
        _annotate_card(run_dir, rows, info)
        print(f"[rayssl] probe results: {report.json_path}, {report.png_path}")
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _annotate_card(run_dir: str, rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    card_path = os.path.join(export_folder(run_dir), "model_card.json")
    if info["source"] != "export" or not os.path.exists(card_path):
        return
    with open(card_path) as f:
        card = json.load(f)
    card["probe"] = {
        "store": info["store"], "patch": info["patch"],
        "repeats": info.get("repeats"),
        "scores": [{k: r.get(k) for k in ("probe", "init", "fraction", "metric", "score", "score_ci95", "gain",
                                          "gain_ci95") if k in r} for r in rows],
    }
    tmp = card_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(card, f, indent=2, default=_json_default)
    os.replace(tmp, card_path)
