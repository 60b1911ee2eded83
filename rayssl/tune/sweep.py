"""`rayssl tune`: Ray Tune sweeps over tune_spaces/<method>.yaml; each trial is a TorchTrainer run scored by a probe.

Why a probe: the pretext loss is not comparable across values of VoCo's lambda and n, MLSSCL's
alpha/beta or DrasCLR's K, so trials are ranked by a downstream linear probe
(`rayssl.eval.probe.probe_score`) on a held-out labelled set.

How a trial runs (a Tune *function* trainable, the Train V2 way):

1. Its run configuration = the method profile + `--set` overrides + the sampled values, named by
   the trial id (`runs/<trial_id>` under the sweep folder).
2. Pretraining runs in segments: `train.stop_after` = the next probe point, then
   `pretrain(cfg, resume=run_dir)` continues from the segment's final checkpoint exactly (same
   data order, optimizer, scheduler and method state). Each segment is one `TorchTrainer` run
   with `TuneReportCallback`, so the per-step training metrics stream into the trial's results.
3. After each segment the latest checkpoint's backbone is probed and
   `tune.report({"probe_score", "probe_dice", "loss", "step", ...})` is sent. ASHA
   (`time_attr="step"`) compares trials at those probe points and stops the weak ones; because it
   decides only on probe reports, a trial is stopped between segments, when no TorchTrainer of it
   is running.

Ray Train V2's `ValidationConfig` (async validation of reported checkpoints) was the other option:
its results are attached to checkpoints in Train's checkpoint manager and are not forwarded by
`TuneReportCallback`, so ASHA would never see the score; it would also need the method-agnostic
training loop to pass `validation=` to `ray.train.report`. The segment loop keeps the loop untouched
and gives Tune a synchronous score at fixed steps.

Resources: the trial function reserves 0.01 CPU (its TorchTrainer's workers and Ray Data actors
reserve theirs); the probe runs in it between segments, while that trial trains nothing. By
default as many trials run at once as the cluster's CPUs fit (`--max-concurrent`).

The Train V2 controller of a stopped trial is cleaned up through the Ray State API, which needs
the dashboard: a local runtime is started with `include_dashboard=True`, and its address is given
to every worker (`RAY_API_SERVER_ADDRESS`) so the cleanup works even when other Ray instances run
on the same machine.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import secrets
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from rayssl.config import resolve_config
from rayssl.runtime import attach_address, check_address, start_or_attach
from rayssl.tune.space import SearchSpace, format_override, load_space, validate_space

METRIC = "probe_score"
# What the trial function itself reserves: next to nothing (Tune refuses an empty bundle); its
# TorchTrainer's workers and data actors reserve the CPUs that train.
TRIAL_FUNCTION_CPUS = 0.01
# Tune would reject the per-step training results forwarded by TuneReportCallback, which carry no
# probe score; ASHA simply ignores results without its metric.
_STRICT_METRIC_ENV = "TUNE_DISABLE_STRICT_METRIC_CHECKING"


def probe_points(steps: int, probes: int) -> list[int]:
    """Steps after which a trial is probed: `probes` evenly spaced points ending at `steps`."""
    if steps < 1 or probes < 1:
        raise ValueError(f"steps and probes must be >= 1, got {steps}, {probes}")
    return sorted({max(1, round(steps * i / probes)) for i in range(1, probes + 1)})


# ---------------------------------------------------------------------------------------------
# The trial (runs in a Tune trial actor)
# ---------------------------------------------------------------------------------------------
_PROBE_DATA_CACHE: dict[tuple, Any] = {}


def _probe_data(store: str, fit_fraction: float, seed: int):
    from rayssl.eval.probe import load_probe_data

    key = (store, fit_fraction, seed)
    if key not in _PROBE_DATA_CACHE:
        _PROBE_DATA_CACHE[key] = load_probe_data(store, fit_fraction=fit_fraction, seed=seed)
    return _PROBE_DATA_CACHE[key]


def sweep_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One trial: segmented pretraining with a probe report after each segment."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rayssl.eval.features import load_run_weights
    from rayssl.eval.probe import ProbeConfig, probe_score
    from rayssl.train.runfolder import read_metrics
    from rayssl.train.trainer import pretrain

    t0 = time.perf_counter()
    trial_id = tune.get_context().get_trial_id()
    sampled = [format_override(path, value) for path, value in sorted(config.items())]
    cfg = resolve_config(method=setup["method"], profile=setup["profile"], file=setup.get("config_file"),
                         overrides=[*setup["overrides"], *sampled, f"name={trial_id}", f"out={setup['runs_dir']}"])
    run_dir = os.path.join(setup["runs_dir"], trial_id)
    probe_cfg = ProbeConfig(**setup["probe"])
    data = _probe_data(setup["probe_store"], probe_cfg.fit_fraction, probe_cfg.seed)
    resume = None
    for point in setup["points"]:
        segment = cfg.model_copy(update={"train": cfg.train.model_copy(update={"stop_after": point})})
        pretrain(segment, resume=resume, callbacks=[TuneReportCallback()])
        resume = run_dir
        t_probe = time.perf_counter()
        weights = load_run_weights(run_dir, source="checkpoint")
        score = probe_score(weights, data, probe_cfg)
        metrics = read_metrics(run_dir)
        tune.report({
            **score,
            "loss": float(metrics[-1]["loss"]) if metrics else float("nan"),
            "step": int(weights.step or point),
            "probe_time_s": round(time.perf_counter() - t_probe, 2),
            "trial_time_s": round(time.perf_counter() - t0, 2),
        })


# ---------------------------------------------------------------------------------------------
# The sweep (driver)
# ---------------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    sweep_dir: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_dir: str | None
    wall_time_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ray(address: str | None, ray_init: dict[str, Any] | None = None) -> None:
    """Attach to `address`, or start a local runtime with the dashboard (Train V2 cleanup needs the State API)."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"logging_level": "WARNING", **(ray_init or {})}
    if attach_address(address):
        start_or_attach(address, **kwargs)
        return
    port = int(kwargs.pop("dashboard_port", 0) or _free_port())
    api = f"http://127.0.0.1:{port}"
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "RAY_API_SERVER_ADDRESS": api}
    # Without an explicit address, State API clients (e.g. Train V2's placement-group cleaner)
    # guess the cluster and fail when several Ray instances run on this machine.
    os.environ["RAY_API_SERVER_ADDRESS"] = api
    kwargs.setdefault("include_dashboard", True)
    kwargs.setdefault("dashboard_host", "127.0.0.1")
    start_or_attach(None, dashboard_port=port, runtime_env=runtime_env, **kwargs)


def trial_cpus(cfg) -> float:
    """CPUs one trial reserves: its Train workers plus its largest data-actor pool."""
    return cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.data.actors_max * cfg.data.actor_cpus


def run_sweep(method: str, num_samples: int = 4, steps: int | None = None, out: str = "runs/tune",
              space: str | None = None, overrides: Sequence[str] = (), profile: str | None = None,
              config_file: str | None = None, address: str | None = None, probes: int = 2,
              max_concurrent: int | None = None, probe_store: str | None = None, probe: dict[str, Any] | None = None,
              scheduler: Any = None, grace_probes: int = 1, reduction_factor: float = 2, seed: int = 0,
              name: str | None = None, ray_init: dict[str, Any] | None = None) -> SweepResult:
    """Run a sweep and name a winner; see the module docstring for how a trial runs.

    Everything is validated (search space against the method config, probe settings) before Ray
    starts. Writes into `<out>/<name>/`: trials.json + trials.csv (the table), scores.png (probe
    score vs each hyperparameter), sweep.json, runs/<trial_id>/ (each trial's run folder) and
    best/ (the winner's exported backbone, model card, config.yaml and trial.json).
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from rayssl.data.volumes import load_volumes
    from rayssl.eval.features import initial_weights
    from rayssl.eval.probe import ProbeConfig, default_probe_store, probe_score
    from rayssl.train.trainer import resolve_stores

    t0 = time.perf_counter()
    check_address(address)  # an unreachable cluster fails now, not after the baseline probe
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    search = load_space(method, space)
    base_overrides = [*overrides, *([f"train.steps={steps}"] if steps else [])]
    cfg = resolve_config(method=method, profile=profile, file=config_file, overrides=base_overrides)
    checked = validate_space(search, profile=cfg.profile, overrides=base_overrides, config_file=config_file)
    points = probe_points(cfg.train.steps, probes)
    if not 1 <= grace_probes <= len(points):
        raise ValueError(f"grace_probes must lie in [1, {len(points)}], got {grace_probes}")
    # Tune's probe scores the eval crops rather than whole volumes: same ranking signal, a fraction of the time.
    probe_settings = {"threads": max(1, math.floor(trial_cpus(cfg))), "eval_on": "crops", "crops_per_volume": 8,
                      **(probe or {})}
    probe_cfg = ProbeConfig(**probe_settings)  # validated before any worker starts
    print(f"[rayssl] tune {method}: {search.describe()} ({checked} extreme configurations validated); "
          f"{num_samples} trials x {cfg.train.steps} steps, probed at steps {points}", flush=True)

    sweep_name = name or f"tune-{method}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    out_abs = os.path.abspath(out)
    sweep_dir = os.path.join(out_abs, sweep_name)
    if os.path.exists(sweep_dir):
        raise FileExistsError(f"sweep folder {sweep_dir} already exists; choose another --name")
    # Build the (cached) demo stores here once, so trials do not race to build them.
    stores, _ = resolve_stores(cfg)
    # Trials use the sweep's data.store / data.stores as given; the demo store is pinned here.
    data_overrides = [] if cfg.data.store_entries() else [f"data.store={stores[0]}"]
    probe_store = probe_store or default_probe_store()
    labelled = [v for v in load_volumes(probe_store, split="all") if v.has_label]
    if len(labelled) < 2:
        raise ValueError(f"probe store {probe_store} has {len(labelled)} labelled volume(s); the probe needs at least 2")
    # Reference: the same probe on the untrained network (the trials' common starting point when the
    # sampled values do not change the architecture), so the sweep's scores can be read against it.
    baseline = probe_score(initial_weights(cfg, seed=cfg.seed),
                           _probe_data(probe_store, probe_cfg.fit_fraction, probe_cfg.seed), probe_cfg)[METRIC]
    print(f"[rayssl] probe score of the untrained network (reference): {baseline:.4f}", flush=True)

    runs_dir = os.path.join(sweep_dir, "runs")
    os.makedirs(runs_dir)

    start_ray(address, ray_init)
    if max_concurrent is None:
        max_concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // max(trial_cpus(cfg), 1e-9)))
    os.environ.setdefault(_STRICT_METRIC_ENV, "1")
    setup = {
        "method": method, "profile": cfg.profile, "config_file": config_file,
        "overrides": [*base_overrides, *data_overrides], "runs_dir": runs_dir, "points": points,
        "probe_store": probe_store, "probe": probe_settings,
    }
    scheduler = scheduler or ASHAScheduler(time_attr="step", max_t=cfg.train.steps,
                                           grace_period=points[grace_probes - 1], reduction_factor=reduction_factor)
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, setup=setup), {"CPU": TRIAL_FUNCTION_CPUS})
    tuner = tune.Tuner(
        trainable,
        param_space=search.param_space(),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", scheduler=scheduler, num_samples=num_samples,
            # Tune ignores TuneConfig(max_concurrent_trials=...) when a search generator is passed
            # (ray/tune/tune.py), so the seeded generator carries the limit itself.
            search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent),
            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
        ),
        run_config=tune.RunConfig(name=sweep_name, storage_path=out_abs,
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1),
    )
    grid = tuner.fit()
    trials = collect_trials(grid, search, cfg.train.steps, runs_dir)
    best = pick_best(trials)
    best_dir = copy_best(best, sweep_dir) if best else None
    wall = time.perf_counter() - t0
    result = SweepResult(sweep_dir=sweep_dir, trials=trials, best=best, best_dir=best_dir, wall_time_s=wall,
                         extra={"method": method, "space": search.source, "points": points, "steps": cfg.train.steps,
                                "untrained_probe_score": baseline,
                                "max_concurrent": max_concurrent, "probe_store": probe_store, "stores": stores})
    write_results(result, search)
    print(format_trials(trials, search.paths))
    print(f"[rayssl] untrained network (reference): probe_score {baseline:.4f}")
    if best:
        print(f"[rayssl] winner: trial {best['trial']} ({', '.join(f'{p}={best[p]}' for p in search.paths)}) "
              f"probe_score {best['probe_score']:.3f}; weights in {best_dir}")
    else:
        print("[rayssl] no trial reported a probe score: see the trial errors above")
    print(f"[rayssl] sweep finished in {wall:.0f} s: {sweep_dir}")
    return result


def collect_trials(grid: Any, search: SearchSpace, steps: int, runs_dir: str) -> list[dict[str, Any]]:
    """One row per trial: sampled values, last probe score, best probe score, loss, steps, time, status."""
    rows = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(result.path).removeprefix("trial_")
        row: dict[str, Any] = {"trial": trial_id}
        for path in search.paths:
            value = result.config.get(path)
            row[path] = value.item() if hasattr(value, "item") else (list(value) if isinstance(value, tuple) else value)
        frame = result.metrics_dataframe
        probed = frame[frame[METRIC].notna()] if frame is not None and METRIC in frame else None
        if probed is not None and len(probed):
            last = probed.iloc[-1]
            dice = float(last["probe_dice"]) if "probe_dice" in last else math.nan
            row.update(probe_score=float(last[METRIC]), best_probe_score=float(probed[METRIC].max()),
                       probe_dice=None if math.isnan(dice) else dice,
                       loss=float(last["loss"]), steps=int(last["step"]), probes=int(len(probed)))
        else:
            row.update(probe_score=None, best_probe_score=None, probe_dice=None, loss=None, steps=0, probes=0)
        trained = frame["step"].max() if frame is not None and "step" in frame else 0
        row["trained_steps"] = int(trained) if trained == trained else 0
        row["time_s"] = round(float((result.metrics or {}).get("time_total_s", 0.0)), 1)
        if result.error is not None:
            row["status"] = "error"
            row["error"] = str(result.error).strip().splitlines()[-1][:300]
        else:
            row["status"] = "completed" if row["trained_steps"] >= steps else "stopped early"
        row["run_dir"] = os.path.join(runs_dir, trial_id)
        rows.append(row)
    return rows


def pick_best(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Highest last probe score; among equals, the trial that trained longest."""
    scored = [t for t in trials if t.get("probe_score") is not None and not math.isnan(t["probe_score"])]
    if not scored:
        return None
    return max(scored, key=lambda t: (t["probe_score"], t["steps"]))


def copy_best(best: dict[str, Any], sweep_dir: str) -> str:
    """Copy the winner's export (or, for a trial stopped early, an export of its last checkpoint) to <sweep>/best."""
    import torch

    from rayssl.eval.features import load_run_weights

    best_dir = os.path.join(sweep_dir, "best")
    os.makedirs(best_dir, exist_ok=True)
    run_dir = best["run_dir"]
    export_dir = os.path.join(run_dir, "export")
    if os.path.exists(os.path.join(export_dir, "backbone.pt")):
        for name in os.listdir(export_dir):
            shutil.copy2(os.path.join(export_dir, name), os.path.join(best_dir, name))
    else:
        weights = load_run_weights(run_dir, source="checkpoint")
        torch.save(weights.state_dict, os.path.join(best_dir, "backbone.pt"))
        card = {**weights.card, "network_kwargs": weights.network_kwargs, "weights": "backbone.pt",
                "key_groups": weights.key_groups, "num_keys": len(weights.state_dict),
                "notes": f"exported from {weights.source} (step {weights.step}) of a trial stopped before its last step"}
        with open(os.path.join(best_dir, "model_card.json"), "w") as f:
            json.dump(card, f, indent=2, default=str)
    if os.path.exists(os.path.join(run_dir, "config.yaml")):
        shutil.copy2(os.path.join(run_dir, "config.yaml"), os.path.join(best_dir, "config.yaml"))
    with open(os.path.join(best_dir, "trial.json"), "w") as f:
        json.dump(best, f, indent=2, default=str)
    return best_dir


def write_results(result: SweepResult, search: SearchSpace) -> None:
    import pandas as pd

    with open(os.path.join(result.sweep_dir, "trials.json"), "w") as f:
        json.dump(result.trials, f, indent=2, default=str)
    pd.DataFrame(result.trials).to_csv(os.path.join(result.sweep_dir, "trials.csv"), index=False)
    summary = {**asdict(result), "space": search.describe()}
    with open(os.path.join(result.sweep_dir, "sweep.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    plot_scores(result.trials, search, os.path.join(result.sweep_dir, "scores.png"),
                reference=result.extra.get("untrained_probe_score"))


def plot_scores(trials: list[dict[str, Any]], search: SearchSpace, path: str, reference: float | None = None) -> str:
    """One panel per hyperparameter: each trial's last probe score against its value (dashed: untrained network)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = search.params
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.5), squeeze=False)
    scored = [t for t in trials if t.get("probe_score") is not None]
    for ax, param in zip(axes[0], params):
        categorical = param.kind == "choice"
        labels = [str(v) for v in param.args] if categorical else []
        for status, marker in (("completed", "o"), ("stopped early", "x")):
            mine = [t for t in scored if t["status"] == status]
            xs = [labels.index(str(t[param.path])) if categorical else t[param.path] for t in mine]
            ax.scatter(xs, [t["probe_score"] for t in mine], marker=marker, label=status)
        if categorical:
            ax.set_xticks(range(len(labels)), labels)
        elif param.kind == "loguniform":
            ax.set_xscale("log")
        if reference is not None:
            ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label="untrained")
        ax.set_xlabel(param.path)
        ax.set_ylabel(METRIC)
        ax.legend(fontsize=7)
    fig.suptitle(f"{search.method}: probe score of each trial", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_trials(trials: list[dict[str, Any]], paths: list[str]) -> str:
    """The trial table, best first."""
    ordered = sorted(trials, key=lambda t: -(t["probe_score"] if t.get("probe_score") is not None else -math.inf))
    header = ["trial", *paths, "probe_score", "loss", "steps", "time_s", "status"]
    table = [header]
    for t in ordered:
        table.append([str(t["trial"]), *(_short(t.get(p)) for p in paths), _short(t.get("probe_score")),
                      _short(t.get("loss")), str(t.get("trained_steps", 0)), _short(t.get("time_s")), t["status"]])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table)


def _short(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
