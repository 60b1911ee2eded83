"""Linear probes during pretraining (`--probe`): Ray tasks on checkpoints, recorded in the run folder."""

import json
import os

import matplotlib.image
import pytest

from rayssl.config import resolve_config
from rayssl.eval.features import load_run_weights
from rayssl.eval.online import online_probe_config, probe_steps_due
from rayssl.eval.probe import load_probe_data, probe_score


def test_probe_points_follow_checkpoints_and_the_last_step():
    cfg = resolve_config(method="voco", profile="cpu", overrides=[
        "train.steps=50", "train.checkpoint_every=10", "eval.probe_store=demo", "eval.probe_every=20"])
    assert [s for s in range(1, 51) if probe_steps_due(s, cfg)] == [20, 40, 50]
    with pytest.raises(ValueError, match="multiple of train.checkpoint_every=10"):
        resolve_config(method="voco", profile="cpu", overrides=["train.checkpoint_every=10", "eval.probe_every=15"])


def test_online_probe_scores_two_checkpoints_against_random_init(voco_resume_runs):
    # 4 steps, checkpoints at 2 and 4, eval.probe_store = the demo store, eval.probe_crops=4 (tests/conftest.py).
    result = voco_resume_runs.full
    cfg = resolve_config(file=os.path.join(result.run_dir, "config.yaml"))
    run = result.run_dir
    assert result.status == "finished"

    with open(os.path.join(run, "online_probe.json")) as f:
        online = json.load(f)
    assert [p["step"] for p in online["points"]] == [2, 4]
    assert online["metric"] == "dice" and not online["errors"]
    assert 0.0 <= online["random_init"] <= 1.0
    for point in online["points"]:
        assert 0.0 <= point["score"] <= 1.0
        assert point["gain"] == pytest.approx(point["score"] - online["random_init"])

    # The metrics rows of the probed steps carry the probe; the others do not.
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = {row["step"]: row for row in map(json.loads, f)}
    assert {s for s, row in rows.items() if "probe_score" in row} == {2, 4}
    assert rows[4]["probe_random"] == online["random_init"]
    assert "health_spread" in rows[1] and "health_effective_rank" in rows[1]
    # The held-out objective: at the first report, every 2 steps and at the end, with every loss term.
    assert {s for s, row in rows.items() if "heldout_loss" in row} == {1, 2, 4}
    for step in (1, 2, 4):
        terms = rows[step]
        prediction = (terms["heldout_pred"] if cfg.method_cfg().loss_form == "paper"
                      else terms["heldout_pos"] + terms["heldout_neg"])
        assert terms["heldout_loss"] == pytest.approx(
            prediction + cfg.method_cfg().lambda_reg * terms["heldout_reg"], rel=1e-5)

    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    assert summary["online_probe"]["points"] == online["points"]
    assert summary["heldout"]["first_step"] == 1 and summary["heldout"]["last_step"] == 4
    assert summary["heldout"]["last_loss"] == rows[4]["heldout_loss"]
    with open(os.path.join(run, "export", "model_card.json")) as f:
        assert json.load(f)["online_probe"]["random_init"] == online["random_init"]
    # TensorBoard: the probe points (logged after training) and the health metrics (every report).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run, "tensorboard"))
    events.Reload()
    assert {"probe/probe_score", "probe/probe_random", "health/spread", "heldout/loss"} <= set(events.Tags()["scalars"])
    assert sorted(e.step for e in events.Scalars("probe/probe_score")) == [2, 4]
    # loss.png gains a third panel: the probe against the step.
    assert matplotlib.image.imread(os.path.join(run, "loss.png")).shape[1] == 1600

    # The online score is what `probe_score` (the Tune objective) gives on that checkpoint.
    probe_cfg = online_probe_config(cfg)
    data = load_probe_data(cfg.eval.probe_store, fit_fraction=probe_cfg.fit_fraction, seed=probe_cfg.seed)
    again = probe_score(load_run_weights(run, source="checkpoint"), data, probe_cfg)
    assert again["probe_score"] == pytest.approx(online["points"][-1]["score"], abs=1e-4)
