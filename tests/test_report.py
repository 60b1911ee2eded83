"""Rank 0's metrics.jsonl: one appended line per report on local disk, a resumed run keeps only the
steps it does not redo (a line cut short by a kill included), and a restart from scratch starts empty."""

from __future__ import annotations

import json

import torch

from rayssl.config import DataSection
from rayssl.train.report import Reporter
from rayssl.train.stall import DataWaitMeter


def report(run_dir: str, step: int, stop: int = 10) -> Reporter:
    return Reporter(run_dir, step, rank=0, stop=stop, data=DataSection(), data_wait=DataWaitMeter())


def metrics(step: int) -> dict[str, float]:
    return {"step": step, "loss": 1.0 / step, "samples_per_s": 2.0, "crops_per_s": 8.0, "data_wait_pct": 0.0,
            "lr": 1e-3}


def steps_in(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_local_reports_append_one_line_each(tmp_path):
    reporter = report(str(tmp_path), step=0)
    path = tmp_path / "metrics.jsonl"
    assert not path.exists()  # nothing written before the first report
    for step in (1, 2, 3):
        reporter.record(metrics(step), {"loss": torch.tensor(1.0)}, step)
        assert steps_in(path) == list(range(1, step + 1))
    assert reporter.appends


def test_resume_keeps_the_steps_it_does_not_redo_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(metrics(step)) for step in range(1, 6)]
    # Killed while appending step 6: the file ends in half a line.
    path.write_text("\n".join(lines) + "\n" + json.dumps(metrics(6))[:17])
    reporter = report(str(tmp_path), step=3)  # the checkpoint it resumes from is step 3
    assert steps_in(path) == [1, 2, 3]
    reporter.record(metrics(4), {"loss": torch.tensor(1.0)}, 4)
    assert steps_in(path) == [1, 2, 3, 4]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_restart_from_scratch_starts_an_empty_history(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(metrics(step)) + "\n" for step in (1, 2)))
    reporter = report(str(tmp_path), step=0)  # the first attempt died before its first checkpoint
    assert path.read_text() == ""
    reporter.record(metrics(1), {"loss": torch.tensor(1.0)}, 1)
    assert steps_in(path) == [1]
