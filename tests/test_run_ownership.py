"""Run folders are owned (issue 25, item 2): `--resume` trains only into folders rayssl made, never rewrites a
finished run, refuses another method or profile; a run folder is claimed atomically before Ray starts.

Most cases fail before Ray, so `pretrain` gets an `address` nobody listens on: reaching Ray would be that
address's ConnectionError. Finished runs are built by hand as a run leaves them (marker, config.yaml,
a complete checkpoint, summary.json), plus one real finished run from the session fixture.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rayssl.config import resolve_config

from helpers import MLSSCL_TINY, NOBODY_LISTENS

REPO = Path(__file__).resolve().parents[1]


def _cfg(store, out, *extra):
    return resolve_config(method="mlsscl", profile="cpu",
                          overrides=[f"data.store={store}", f"out={out}", *MLSSCL_TINY, "train.steps=2", *extra])


def _snapshot(folder) -> dict[str, tuple[str, int]]:
    """Every file under `folder`: content hash and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _finished_run(store, runs: Path, name: str = "done") -> Path:
    """A finished 2-step MLSSCL run folder as pretrain leaves it (with a skipped volume on record)."""
    from rayssl.checkpoint import write_checkpoint_dir

    cfg = _cfg(store, runs, f"name={name}")
    run_dir = runs / name
    run_dir.mkdir(parents=True)
    (run_dir / "rayssl_run.json").write_text(json.dumps(
        {"rayssl_run": 1, "name": name, "method": "mlsscl", "profile": "cpu", "created": "2026-12-07T02:00:00+00:00"}))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False))
    (run_dir / "README.md").write_text(f"# rayssl run {name}\n")
    written = write_checkpoint_dir({"step": 2}, {"step": 2})
    shutil.move(written, run_dir / "checkpoint_2026-12-07_02-00-02.000000")
    (run_dir / "summary.json").write_text(json.dumps(
        {"status": "finished", "steps": 2, "target_steps": 2, "wall_time_s": 41.3, "peak_memory_mb": 912.0,
         "final_metrics": {"step": 2, "loss": 7.5},
         "skipped_volumes": {"phantom-001": {"count": 1, "reason": "chunk phantom-001/image/c/0/0/0 is corrupt"}}}))
    return run_dir


# ---- --resume: whose folder, which state --------------------------------------------------------


def test_resume_refuses_a_folder_rayssl_did_not_make(tiny_store, tmp_path, capsys):
    from rayssl.cli import main
    from rayssl.train.trainer import pretrain

    mine = tmp_path / "my_project"
    mine.mkdir()
    (mine / "README.md").write_text("# my notes\n")
    (mine / "summary.json").write_text('{"mine": true}')
    before = _snapshot(mine)
    code = main(["pretrain", "--resume", str(mine), "--data", tiny_store, "--method", "mlsscl", "--profile", "cpu",
                 "--address", NOBODY_LISTENS, *sum((["--set", o] for o in MLSSCL_TINY), [])])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--resume {mine}: not a rayssl run folder (no rayssl_run.json" in err and "untouched" in err, err
    with pytest.raises(ValueError, match="not a rayssl run folder"):
        pretrain(_cfg(tiny_store, tmp_path), resume=str(mine), address=NOBODY_LISTENS)
    # A config.yaml alone (no checkpoint) does not make a run either; nor does a damaged marker.
    (mine / "config.yaml").write_text(yaml.safe_dump(_cfg(tiny_store, tmp_path).to_yaml_dict()))
    with pytest.raises(ValueError, match="not a rayssl run folder"):
        pretrain(_cfg(tiny_store, tmp_path), resume=str(mine), address=NOBODY_LISTENS)
    (mine / "config.yaml").unlink()
    (mine / "rayssl_run.json").write_text("{not json")
    with pytest.raises(ValueError, match="rayssl_run.json is damaged"):
        pretrain(_cfg(tiny_store, tmp_path), resume=str(mine), address=NOBODY_LISTENS)
    (mine / "rayssl_run.json").unlink()
    assert _snapshot(mine) == before


def test_resume_of_a_finished_run_writes_nothing(tiny_store, tmp_path, capsys):
    from rayssl.cli import main

    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    run_dir = _finished_run(str(store), tmp_path / "runs")
    before = _snapshot(run_dir)
    for extra in ([], ["--profile", "cpu"], ["--method", "mlsscl"], "store gone"):
        if extra == "store gone":  # deciding that nothing is left to do needs no store
            shutil.rmtree(store)
            extra = []
        code = main(["pretrain", "--resume", str(run_dir), "--address", NOBODY_LISTENS, *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "is already at step 2 >= 2: nothing to do, nothing written" in out, out
    assert _snapshot(run_dir) == before  # summary.json keeps its wall time, peak memory and skipped volume


def test_resume_with_another_method_or_profile_names_the_runs_own(tiny_store, tmp_path, capsys):
    from rayssl.cli import main
    from rayssl.train.trainer import pretrain

    run_dir = _finished_run(tiny_store, tmp_path / "runs")
    before = _snapshot(run_dir)
    for flag, asked, own in (("--method", "voco", "mlsscl"), ("--profile", "paper", "cpu")):
        code = main(["pretrain", "--resume", str(run_dir), flag, asked, "--steps", "4", "--address", NOBODY_LISTENS])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"this run was made with {flag} {own}, not {asked}" in err, err
        assert f"start a new run with {flag} {asked}" in err, err
    # The same through the API (e.g. a config resolved with another profile).
    other = resolve_config(file=str(run_dir / "config.yaml"), profile="paper", overrides=["train.steps=4"])
    with pytest.raises(ValueError, match="made with --profile cpu, not paper"):
        pretrain(other, resume=str(run_dir), address=NOBODY_LISTENS)
    assert _snapshot(run_dir) == before


def test_a_run_made_before_the_marker_is_recognised_by_its_config_and_checkpoints(tiny_store, tmp_path, capsys):
    from rayssl.cli import main

    run_dir = _finished_run(tiny_store, tmp_path / "runs", name="old")
    (run_dir / "rayssl_run.json").unlink()
    assert main(["pretrain", "--resume", str(run_dir), "--address", NOBODY_LISTENS]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["pretrain", "--resume", str(run_dir), "--method", "voco", "--address", NOBODY_LISTENS]) == 2
    assert "made with --method mlsscl" in capsys.readouterr().err
    shutil.rmtree(next(run_dir.glob("checkpoint_*")))  # no complete checkpoint: not recognisable as a run
    assert main(["pretrain", "--resume", str(run_dir), "--address", NOBODY_LISTENS]) == 2
    assert "not a rayssl run folder" in capsys.readouterr().err


def test_resume_of_a_real_finished_run_rewrites_nothing(voco_resume_runs, tmp_path, capsys):
    """The session's finished VoCo run (tests/conftest.py), copied: resumed as it is, and with another profile."""
    from rayssl.cli import main

    run_dir = tmp_path / "full"
    shutil.copytree(voco_resume_runs.full.run_dir, run_dir)
    assert json.loads((run_dir / "rayssl_run.json").read_text())["method"] == "voco"
    before = _snapshot(run_dir)
    assert main(["pretrain", "--resume", str(run_dir)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["pretrain", "--resume", str(run_dir), "--profile", "paper"]) == 2
    assert "made with --profile cpu, not paper" in capsys.readouterr().err
    assert _snapshot(run_dir) == before


# ---- creating a run folder --------------------------------------------------------------------

_CLAIM_ORDER_SCRIPT = """
import json, sys
from rayssl.config import resolve_config
from rayssl.train.trainer import pretrain
cfg = resolve_config(method="mlsscl", profile="cpu", overrides=json.loads(sys.argv[1]))
events = []
def hook(event, args):
    if event == "os.mkdir":
        events.append(["mkdir", str(args[0])])
    elif event == "socket.connect":
        events.append(["connect", str(args[1])])
sys.addaudithook(hook)
try:
    pretrain(cfg, address="127.0.0.1:9")
    error = None
except Exception as err:
    error = type(err).__name__
print("RESULT " + json.dumps({"error": error, "events": events}))
"""


def test_run_folder_is_claimed_before_ray_and_removed_when_the_run_fails_before_training(tiny_store, tmp_path):
    """A fresh interpreter (no Ray in it): the run folder's os.mkdir comes before Ray is contacted; the run then
    fails to reach Ray, and the folder it made is removed again (nothing half-written is left)."""
    runs = tmp_path / "runs"
    overrides = [f"data.store={tiny_store}", f"out={runs}", *MLSSCL_TINY, "train.steps=1", "name=first"]
    done = subprocess.run([sys.executable, "-c", _CLAIM_ORDER_SCRIPT, json.dumps(overrides)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["error"] == "ClusterUnreachable", result
    events = result["events"]
    run_dir = str(runs / "first")
    made = [i for i, e in enumerate(events) if e == ["mkdir", run_dir]]
    ray_contacted = [i for i, e in enumerate(events) if e[0] == "connect" and "'127.0.0.1', 9" in e[1]]
    assert made and ray_contacted and made[0] < ray_contacted[0], events
    assert runs.is_dir() and list(runs.iterdir()) == []  # the failed run's folder is gone


def test_a_second_run_with_the_same_name_fails_at_once(tiny_store, tmp_path):
    from rayssl.train.runfolder import claim_run_folder
    from rayssl.train.trainer import pretrain

    runs = tmp_path / "runs"
    cfg = _cfg(tiny_store, runs, "name=twin")
    claim_run_folder(str(runs / "twin"), cfg)  # what the first run holds from the moment its name is resolved
    marker = json.loads((runs / "twin" / "rayssl_run.json").read_text())
    assert {k: marker[k] for k in ("name", "method", "profile")} == {"name": "twin", "method": "mlsscl", "profile": "cpu"}
    with pytest.raises(FileExistsError, match="already exists"):
        claim_run_folder(str(runs / "twin"), cfg)  # os.mkdir: atomic, whoever comes second fails
    with pytest.raises(FileExistsError, match=f"run folder {runs / 'twin'} already exists"):
        pretrain(cfg, address=NOBODY_LISTENS)  # before Ray: not the unreachable address's error
    assert os.listdir(runs / "twin") == ["rayssl_run.json"]


def _make_read_only(folder: Path) -> None:
    """`folder` read-only for this process: chmod, or for root (whom chmod does not stop) the immutable flag."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True) if shutil.which("chattr") else None
    if done is None or done.returncode != 0:
        pytest.skip(f"running as root and cannot make a folder read-only here (chattr: {done and done.stderr})")


def _make_writable(folder: Path) -> None:
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


@pytest.mark.parametrize("case", ["out", "cache"])
def test_read_only_run_parent_or_cache_is_named_before_ray(tiny_store, tmp_path, case, monkeypatch, capsys):
    """A read-only --out, or a read-only RAYSSL_CACHE where the demo store must be built, fails with a sentence
    (exit code 2) before Ray and before any run folder is made."""
    import ray

    from rayssl.cli import main

    read_only = tmp_path / "read_only"
    read_only.mkdir()
    _make_read_only(read_only)
    was_up = ray.is_initialized()
    try:
        monkeypatch.setenv("RAYSSL_CACHE", str(tmp_path / "cache"))
        argv = ["pretrain", "--method", "mlsscl", "--profile", "cpu", "--name", "x", "--steps", "1",
                "--address", NOBODY_LISTENS, *sum((["--set", o] for o in MLSSCL_TINY), [])]
        if case == "out":
            argv += ["--data", tiny_store, "--out", str(read_only)]
        else:
            argv += ["--out", str(tmp_path / "runs")]
            monkeypatch.setenv("RAYSSL_CACHE", str(read_only))
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, err
        assert "not reachable" not in err and ray.is_initialized() == was_up, err
        if case == "out":
            assert f"cannot create run folder {read_only}/x: " in err and "writable --out" in err, err
        else:
            assert f"cannot build the demo store in the cache folder {read_only}/demo" in err, err
            assert "RAYSSL_CACHE" in err
            assert not (tmp_path / "runs").exists()
        assert list(read_only.iterdir()) == []
    finally:
        _make_writable(read_only)
