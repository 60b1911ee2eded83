"""Issue #14 benchmark: does pretraining beat random init? Each method, a fixed CPU training budget,
several pretraining seeds, linear probes on two labelled sets, mean gain with 95 % intervals.

For every method (default: all five, each with its `cpu` profile; `mae` is the masked-image-modelling
baseline), pretraining on a population (`--pretrain-data`, default `population`: 256 CT phantoms,
seeds 5000.., and 256 synthetic brain MR subjects, both built by `rayssl demo` and cached; VoCo and
DrasCLR take the CT half, MLSSCL the MR half, see POPULATION_HALF; `demo` trains on the 8 default demo
phantoms as before issue 24):

1. Calibrate: a short run (`--calibration-steps`) measures the steady-state step time (the median
   `step_time_s` after the first report, so start-up is excluded); the budget `--minutes` of
   training then becomes `steps = minutes * 60 / step time` (at least `--min-steps`).
2. Pretrain that many steps once per seed in `--seeds` (the seed changes the initialisation, the
   data order and the views; everything else is the same).
3. Probe every run with `rayssl probe` on each probe set (`--probes`: `demo` = 8 held-out CT
   phantoms with organ labels, `mni152` = two MNI152 T1 hemispheres with CSF / grey / white
   matter) at `--fractions` (10 / 30 / 100 % of the fit crops), `--probe-repeats` repeats each,
   against the same network from random init.

A seed's gain is its probe gain (pretrained - random, averaged over the probe repeats). The table
gives, per method, probe set and fraction, the mean gain over the pretraining seeds with its 95 %
Student-t interval over those seeds, and says whether the interval excludes 0. Target (issue 14):
every method has a positive gain whose interval excludes 0 on at least one probe set at 10 %.
A second table (issue 30) gives every other method's pretrained score minus MAE's at the same
budget, per probe set and fraction, with a 95 % Welch interval over the two methods' seeds.

    python benchmarks/pretrain_value.py                      # full run: 5 methods x 3 seeds x 10 min (~3.7 h)
    python benchmarks/pretrain_value.py --methods gvsl --minutes 5
    python benchmarks/pretrain_value.py --quick              # smoke check (~5 min): 2 steps, 1 seed pair, 1 repeat
    python benchmarks/pretrain_value.py --merge A.json B.json   # one table from several invocations
    python benchmarks/pretrain_value.py --reprobe A.json     # probe A's runs again (after a probe change)

The budget is converted to steps from a short calibration run; a long run's steps are slower (its
data actors keep producing on the same 2 cores: VoCo 2.0 s vs 1.24 s calibrated), so the table
also gives each method's measured training minutes (the steps' own time, mean over seeds).

Writes benchmarks/_work/pretrain_value.json (every run, every probe row) and pretrain_value.png
(gain +- 95 % CI per method, probe set and fraction). Measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK, fmt_table, machine_info, wait_for_quiet, write_json  # noqa: E402

from rayssl.eval.cli import _fractions  # noqa: E402  (the same "10,30,100" parsing as `rayssl probe`)

METHODS = ("voco", "mlsscl", "drasclr", "gvsl", "mae")
# Methods that pretrain on one half of the population under `--pretrain-data population`: VoCo's `cpu`
# intensity is an HU window (its paper pretrains on CT only) and DrasCLR's patches need one voxel spacing
# for every volume (lung CT in its paper), so both refuse the MR half; MLSSCL's pairs (clips of one volume
# along different axes) carry no signal on the CT phantoms (benchmarks/pair_signal.py: no better than
# chance) and do on the MR population, as on the paper's brain MRI.
POPULATION_HALF = {
    "voco": ("population-ct", "HU-window intensity (CT only)"),
    "drasclr": ("population-ct", "one voxel spacing for all volumes (CT only)"),
    "mlsscl": ("population-mr", "pairs that tell one volume from another (MR; none on the CT phantoms)"),
}
BASELINE = "mae"  # the masked-image-modelling baseline every other method is compared with (issue 30)


def run_config(method: str, seed: int, steps: int, out: Path, name: str, profile: str, overrides: list[str]):
    from rayssl.config import resolve_config

    return resolve_config(method=method, profile=profile, overrides=[
        f"seed={seed}", f"train.steps={steps}", f"out={out}", f"name={name}",
        f"train.checkpoint_every={steps}", *overrides])


def steady_step_time(run_dir: str) -> float:
    """Median step time of a run's reports after the first (which carries start-up)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        times = [json.loads(line)["step_time_s"] for line in f][1:]
    if not times:
        raise RuntimeError(f"{run_dir}: too few reports to time a step; raise --calibration-steps")
    return float(statistics.median(times))


def training_minutes(run_dir: str) -> float:
    """A run's steps' own time (what a budget became), from its metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return sum(json.loads(line)["step_time_s"] for line in f) / 60.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2", help="pretraining seeds (>= 3 for an interval worth reading)")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per run, minutes (issue: <= 15)")
    p.add_argument("--min-steps", type=int, default=20)
    p.add_argument("--steps", type=int, default=None,
                   help="fixed steps per run instead of the --minutes budget (no calibration): long runs' steps are "
                        "slower than the calibration's, so a budget in minutes can overshoot")
    p.add_argument("--calibration-steps", type=int, default=8)
    p.add_argument("--profile", default="cpu")
    p.add_argument("--pretrain-data", default="population",
                   help="population (CT + MR populations of --population-n volumes each), population-ct, "
                        "population-mr, demo (the 8 default phantoms), or comma-separated store paths")
    p.add_argument("--population-n", type=int, default=256, help="volumes per population store (issue 24: >= 256)")
    p.add_argument("--probes", default="demo,mni152", help="probe sets (names or labelled store paths)")
    p.add_argument("--fractions", type=_fractions, default=(0.1, 0.3, 1.0))
    p.add_argument("--probe-repeats", type=int, default=3, help="repeats of each probe (its own interval)")
    p.add_argument("--probe-tasks", default="auto", choices=("auto", "voxel", "patch", "both"),
                   help="which probe reads the features (auto: the method's own); with --reprobe, `patch` puts a "
                        "voxel-probed method (MAE) on the patch probe's scale, to compare it with MLSSCL and DrasCLR")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="extra config override for every run (all methods), e.g. train.lr=1e-3")
    p.add_argument("--max-load", type=float, default=1.0, help="wait for the 1-min load average to drop below this")
    p.add_argument("--quick", action="store_true", help="smoke check: 2 steps, seeds 0,1, 1 probe repeat, 100 %% labels")
    p.add_argument("--out", default=str(WORK / "pretrain_value"))
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="no runs: merge the pretrain_value.json of earlier invocations (e.g. one per method) "
                        "into one table and plot")
    p.add_argument("--reprobe", metavar="JSON", default=None,
                   help="no pretraining: probe again the runs an earlier pretrain_value.json lists (after a probe "
                        "fix), with this invocation's --probes / --fractions / --probe-repeats")
    args = p.parse_args()
    if args.merge:
        return merge(args.merge, Path(args.out) / ("merged-" + time.strftime("%Y%m%d-%H%M%S")))
    if args.reprobe:
        return reprobe(args, Path(args.out) / ("reprobed-" + time.strftime("%Y%m%d-%H%M%S")))

    from rayssl.train.trainer import pretrain

    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    probes = [s for s in args.probes.split(",") if s]
    fractions, repeats = args.fractions, args.probe_repeats
    if args.quick:
        seeds, fractions, repeats = seeds[:2] or [0, 1], (1.0,), 1
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    data_by_method = {m: POPULATION_HALF[m][0] if args.pretrain_data == "population" and m in POPULATION_HALF
                      else args.pretrain_data for m in methods}
    overrides_by_method = {}
    for method in methods:
        stores = pretraining_stores(data_by_method[method], args.population_n)
        overrides_by_method[method] = ([f"data.stores={json.dumps(stores)}" if len(stores) > 1
                                        else f"data.store={stores[0]}"] if stores else []) + args.overrides
        if data_by_method[method] != args.pretrain_data:
            print(f"[bench] {method} pretrains on {data_by_method[method]}: its cpu profile needs "
                  f"{POPULATION_HALF[method][1]}", flush=True)
    load = wait_for_quiet(args.max_load, max_wait_s=900)
    print(f"[bench] load {load[0]:.2f}; methods {methods}, seeds {seeds}, budget {args.minutes} min per run; "
          f"probes {probes} at {[f'{f:.0%}' for f in fractions]}, {repeats} repeats; runs in {out}", flush=True)
    t_start = time.time()
    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "load_start": load, "methods": {}}
    for method in methods:
        mine: dict[str, Any] = {"runs": []}
        results["methods"][method] = mine
        if args.quick:
            steps = 2
        elif args.steps:
            steps = args.steps
        else:
            calibration = pretrain(run_config(method, 999, args.calibration_steps, out, f"{method}-calibration",
                                              args.profile, overrides_by_method[method]))
            step_time = steady_step_time(calibration.run_dir)
            steps = max(args.min_steps, int(args.minutes * 60 / step_time))
            mine.update(step_time_s=step_time)
        mine["steps"] = steps
        mine["pretrain_data"] = data_by_method[method]
        print(f"[bench] {method}: {steps} steps per run", flush=True)
        for seed in seeds:
            t0 = time.time()
            result = pretrain(run_config(method, seed, steps, out, f"{method}-seed{seed}", args.profile,
                                         overrides_by_method[method]))
            if result.status != "finished":
                raise RuntimeError(f"{method} seed {seed}: pretraining {result.status}: {result.error}")
            with open(os.path.join(result.run_dir, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
            losses = [row["loss"] for row in rows]
            run = {"seed": seed, "run_dir": result.run_dir, "train_wall_s": round(time.time() - t0, 1),
                   # What the budget became: the steps' own time. Steps of a long run are slower than the
                   # calibration's (its data actors keep producing on the same 2 cores).
                   "train_min": round(training_minutes(result.run_dir), 2),
                   "loss_first": losses[0], "loss_last_10pct": statistics.fmean(losses[-max(1, len(losses) // 10):]),
                   "probes": probe_run(result.run_dir, probes, fractions, repeats, args.probe_tasks)}
            mine["runs"].append(run)
            write_json(out / "pretrain_value.json", results)
    results["wall_s"] = round(time.time() - t_start, 1)
    report(results, probes, fractions, out)
    return 0


def pretraining_stores(choice: str, n: int) -> list[str]:
    """Store paths for `--pretrain-data` (built through `rayssl demo` on first use, then cached); [] = the default demo."""
    from datasets_zarr.demo import demo_store
    from rayssl.cli import POPULATION_SEEDS

    kinds = {"population": ["ct", "mr"], "population-ct": ["ct"], "population-mr": ["mr"], "demo": []}
    if choice not in kinds:
        return [s for s in choice.split(",") if s]
    return [str(demo_store(n=n, kind=kind, seed=POPULATION_SEEDS[kind], progress=True)) for kind in kinds[choice]]


def probe_run(run_dir: str, probes: list[str], fractions: Any, repeats: int, tasks: str = "auto") -> dict[str, Any]:
    """Every probe set's rows for one pretraining run (pretrained and random init)."""
    from rayssl.eval.probe import ProbeConfig
    from rayssl.eval.report import run_probe

    return {probe: run_probe(run_dir, store=probe, out_dir=os.path.join(run_dir, f"probe-{probe}"),
                             cfg=ProbeConfig(fractions=fractions, repeats=repeats, threads=2, tasks=tasks)).rows
            for probe in probes}


def reprobe(args: argparse.Namespace, out: Path) -> int:
    """Probe the runs of an earlier invocation again (its pretraining is kept) and report them."""
    with open(args.reprobe) as f:
        results = json.load(f)
    probes = [s for s in args.probes.split(",") if s]
    results.update(reprobed_from=args.reprobe, reprobe_args=vars(args))
    # Only the methods asked for (default: every method in the file).
    wanted = [m for m in args.methods.split(",") if m]
    results["methods"] = {m: mine for m, mine in results["methods"].items() if m in wanted}
    for method, mine in results["methods"].items():
        for run in mine["runs"]:
            print(f"[bench] probing {method} seed {run['seed']} again on {probes} ({run['run_dir']})", flush=True)
            run["probes"].update(probe_run(run["run_dir"], probes, args.fractions, args.probe_repeats,
                                           args.probe_tasks))
            write_json(out / "pretrain_value.json", results)
    every_set = list(dict.fromkeys(p for mine in results["methods"].values() for run in mine["runs"] for p in run["probes"]))
    report(results, every_set, args.fractions, out)
    return 0


def merge(paths: list[str], out: Path) -> int:
    """One table from several invocations' results (each method from the last file that has it)."""
    results: dict[str, Any] = {"merged_from": paths, "methods": {}, "args": {}}
    probes: list[str] = []
    fractions: list[float] = []
    for path in paths:
        with open(path) as f:
            part = json.load(f)
        results["methods"].update(part["methods"])
        results["args"][path] = part["args"]
        probes += [s for s in part["args"]["probes"].split(",") if s and s not in probes]
        fractions += [f for f in part["args"]["fractions"] if f not in fractions]
    report(results, probes, sorted(fractions), out)
    return 0


def report(results: dict[str, Any], probes: list[str], fractions: Any, out: Path) -> None:
    """Aggregate over pretraining seeds: the table, the target check, the JSON and the plot."""
    from rayssl.eval.probe import mean_ci95

    table, summary = [], []
    for method, mine in results["methods"].items():
        train_min = statistics.fmean(run.get("train_min") or training_minutes(run["run_dir"]) for run in mine["runs"])
        for probe in probes:
            for fraction in fractions:
                pre = [r for run in mine["runs"] for r in run["probes"][probe]
                       if r["init"] == "pretrained" and r["fraction"] == fraction and r["probe"] != "finetune"]
                if not pre:
                    continue
                gain, half = mean_ci95([r["gain"] for r in pre])
                score, _ = mean_ci95([r["score"] for r in pre])
                excludes = bool(half == half and gain - half > 0)
                summary.append({"method": method, "probe_set": probe, "probe": pre[0]["probe"], "fraction": fraction,
                                "metric": pre[0]["metric"], "pretrained": score, "random": score - gain,
                                "gain": gain, "gain_ci95": half, "seeds": len(pre), "positive_excluding_0": excludes,
                                "steps": mine["steps"], "train_min": train_min})
                table.append([method, mine["steps"], f"{train_min:.1f}", probe,
                              f"{pre[0]['probe']} {pre[0]['metric']}", f"{fraction:.0%}",
                              f"{score:.3f}", f"{score - gain:.3f}", f"{gain:+.3f} ± {half:.3f}",
                              "yes" if excludes else "no"])
    results["summary"] = summary
    targets = {m: any(s["positive_excluding_0"] for s in summary if s["method"] == m and s["fraction"] == min(fractions))
               for m in results["methods"]}
    results["target_met"] = targets
    results["gain_over_baseline"] = gains_over(results, probes, fractions)
    write_json(out / "pretrain_value.json", results)
    seeds = sorted({len(mine["runs"]) for mine in results["methods"].values()})
    print(fmt_table(table, ["method", "steps", "train min", "probe set", "probe", "labels", "pretrained", "random",
                            f"gain ± 95 % CI ({'/'.join(map(str, seeds))} seeds)", "CI > 0"]))
    print(f"[bench] target (gain > 0 with CI excluding 0 at {min(fractions):.0%} on some probe set): {targets}")
    if results["gain_over_baseline"]:
        print(fmt_table([[g["method"], g["probe_set"], f"{g['fraction']:.0%}", f"{g['gain']:+.3f} ± {g['gain_ci95']:.3f}",
                          "/".join(map(str, g["seeds"])), "yes" if g["ci_excludes_0"] else "no"]
                         if "not_comparable" not in g else
                         [g["method"], g["probe_set"], "all", f"not comparable: {g['not_comparable']}", "", ""]
                         for g in results["gain_over_baseline"]],
                        ["method", "probe set", "labels", f"pretrained score - {BASELINE}'s ± 95 % CI (Welch)",
                         "seeds", "CI excludes 0"]))
    plot(summary, out / "pretrain_value.png")
    wall = f"wall {results['wall_s']:.0f} s; " if "wall_s" in results else ""
    print(f"[bench] {wall}results {out / 'pretrain_value.json'}, plot {out / 'pretrain_value.png'}")


def _seed_scores(mine: dict[str, Any], probe: str, fraction: float) -> list[float]:
    """One pretrained probe score per pretraining seed (the mean over its probe repeats)."""
    scores = []
    for run in mine["runs"]:
        rows = [r["score"] for r in run["probes"].get(probe, [])
                if r["init"] == "pretrained" and r["fraction"] == fraction and r["probe"] != "finetune"]
        if rows:
            scores.append(statistics.fmean(rows))
    return scores


def _probe_metric(mine: dict[str, Any], probe: str) -> set[tuple[str, str]]:
    """The (probe kind, metric) pairs a method's pretrained rows on `probe` were scored with."""
    return {(r["probe"], r["metric"]) for run in mine["runs"] for r in run["probes"].get(probe, [])
            if r["init"] == "pretrained" and r["probe"] != "finetune"}


def gains_over(results: dict[str, Any], probes: list[str], fractions: Any, baseline: str = BASELINE) -> list[dict[str, Any]]:
    """Each method's pretrained probe score minus the baseline's (issue 30: "is it worth it over MAE?"),
    per probe set and fraction, with a 95 % Welch interval over the two methods' pretraining seeds
    (independent runs of different networks, so unpaired)."""
    from scipy import stats

    if baseline not in results["methods"]:
        return []
    rows = []
    for method, mine in results["methods"].items():
        if method == baseline:
            continue
        for probe in probes:
            mine_metric, base_metric = _probe_metric(mine, probe), _probe_metric(results["methods"][baseline], probe)
            if mine_metric != base_metric:
                # A patch probe's balanced accuracy minus a voxel probe's Dice is no comparison: say so, compute nothing.
                rows.append({"method": method, "baseline": baseline, "probe_set": probe, "fraction": None,
                             "not_comparable": f"{'/'.join(map(' '.join, sorted(mine_metric)))} vs "
                                               f"{'/'.join(map(' '.join, sorted(base_metric)))}"})
                continue
            for fraction in fractions:
                a, b = _seed_scores(mine, probe, fraction), _seed_scores(results["methods"][baseline], probe, fraction)
                if not a or not b:
                    continue
                diff = statistics.fmean(a) - statistics.fmean(b)
                half = float("nan")  # one seed on either side, or no spread at all: no interval
                if len(a) > 1 and len(b) > 1:
                    interval = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
                    half = float(interval.high - interval.low) / 2
                rows.append({"method": method, "baseline": baseline, "probe_set": probe, "fraction": fraction,
                             "gain": diff, "gain_ci95": half, "seeds": [len(a), len(b)],
                             "ci_excludes_0": bool(half == half and abs(diff) > half)})
    return rows


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Gain +- 95 % CI per method (panels: probe sets; groups: label fractions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sets = list(dict.fromkeys(s["probe_set"] for s in summary))
    methods = list(dict.fromkeys(s["method"] for s in summary))
    fractions = sorted({s["fraction"] for s in summary})
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(5 * max(1, len(sets)), 3.8), squeeze=False)
    for ax, probe_set in zip(axes[0], sets):
        width = 0.8 / max(1, len(fractions))
        for j, fraction in enumerate(fractions):
            rows = [next((s for s in summary if s["method"] == m and s["probe_set"] == probe_set
                          and s["fraction"] == fraction), None) for m in methods]
            xs = np.arange(len(methods)) + (j - (len(fractions) - 1) / 2) * width
            ax.bar(xs, [r["gain"] if r else np.nan for r in rows], width, label=f"{fraction:.0%} labels",
                   yerr=[np.nan_to_num(r["gain_ci95"]) if r else 0 for r in rows], capsize=3)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(len(methods)), methods)
        ax.set_ylabel("probe gain over random init")
        ax.set_title(f"probe set: {probe_set}")
        ax.legend(fontsize=8)
    fig.suptitle("pretrained - random init, mean over pretraining seeds, 95 % CI", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
