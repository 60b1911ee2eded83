"""Every shell line of README.md and docs/**/*.md runs as written (at tiny sizes) or its block is marked.

The convention (README, "Testing"): a fenced ```bash block runs in tests/test_docs_commands.py unless the line just
above its opening fence is an HTML comment `<!-- docs-test: REASON -->`, with REASON one of MARK_REASONS (the
block needs what CI lacks: a cluster, a GPU, object storage, a browser) or `run by tests/test_x.py [...]`
(another test runs those commands; every subcommand and flag of the block must appear in one of the named files).
An unmarked line that this test cannot run fails it, naming the file and line.

Running a line: `.venv/bin/rayssl` is this interpreter's `rayssl.cli`; placeholders are substituted (`runs/voco-...`
the VoCo run made here, `data/*.zarr` the session's tiny demo store, `scans/`, `img.nii.gz`, `seg.nii.gz` tiny
NIfTI files, a lone `...` the tiny-size options) and tiny sizes appended (`--steps 2`, tiny VoCo). Every line
that starts a pretraining run is grouped into one run (the union of their options; the README's first command's
options first), which goes through a subprocess as a user's does, attached to the session's Ray runtime, and
whose console is checked to hold rayssl's lines only. The other lines run in this process through
`rayssl.cli.main`, on the same Ray runtime.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
from dataclasses import dataclass

import pytest

from helpers import VOCO_TINY, assert_clean_console, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK_REASONS = ("needs cluster", "needs gpu", "needs cloud", "needs a browser")
SHELL_LANGS = ("bash", "sh", "shell", "console")
FENCE = re.compile(r"^```(\S*)\s*$")
MARK = re.compile(r"^<!--\s*docs-test:\s*(.+?)\s*-->\s*$")
# A line of an unlabelled block that looks like a command (it should be in a ```bash block).
COMMAND_LIKE = re.compile(r"^\s*(\$ |\.venv/bin/|rayssl |ray |python |pip |\./setup\.sh)")
# Commands CI itself runs (.ci/run): checked against that script instead of run again.
CI_SCRIPT = os.path.join(ROOT, ".ci", "run")
SUBCOMMANDS = ("pretrain", "preview", "recipe", "export", "convert", "verify", "demo", "probe", "tune")


@dataclass
class Block:
    path: str
    line: int  # 1-based line of the opening fence
    mark: str | None
    commands: list[tuple[int, str]]  # (line number, command with continuations joined, comment stripped)


def doc_files() -> list[str]:
    return [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                               recursive=True))]


def _strip_comment(line: str) -> str:
    """The command without its trailing `# ...` comment."""
    kept = []
    for token in line.split():
        if token.startswith("#"):
            break
        kept.append(token)
    return " ".join(kept)


def shell_blocks(path: str) -> tuple[list[Block], list[str]]:
    """The shell blocks of a Markdown file, and the command-like lines of its unlabelled blocks (errors)."""
    lines = open(path, encoding="utf-8").read().splitlines()
    blocks, stray = [], []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        lang, start = fence.group(1), i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        body = lines[i + 1:j]
        mark = MARK.match(lines[start - 1].strip()) if start > 0 else None
        if lang in SHELL_LANGS:
            commands, pending, first = [], "", 0
            for k, text in enumerate(body, start=start + 2):
                if not pending:
                    first = k
                stripped = text.rstrip()
                if stripped.endswith("\\"):
                    pending += stripped[:-1] + " "
                    continue
                command = _strip_comment(pending + stripped)
                pending = ""
                if command:
                    commands.append((first, command))
            blocks.append(Block(path, start + 1, mark.group(1) if mark else None, commands))
        elif lang == "":
            stray += [f"{os.path.relpath(path, ROOT)}:{start + 2 + k}: {t.strip()}" for k, t in enumerate(body)
                      if COMMAND_LIKE.match(t)]
        i = j + 1
    return blocks, stray


def all_blocks() -> list[Block]:
    return [b for path in doc_files() for b in shell_blocks(path)[0]]


def _rel(block: Block, line: int) -> str:
    return f"{os.path.relpath(block.path, ROOT)}:{line}"


def check_mark(block: Block) -> None:
    """A marked block: a known reason, or `run by` test files that exist and name every subcommand and flag."""
    if block.mark in MARK_REASONS:
        return
    if not block.mark.startswith("run by "):
        raise AssertionError(f"{_rel(block, block.line - 1)}: unknown docs-test mark {block.mark!r}; use one of "
                             f"{', '.join(MARK_REASONS)} or `run by tests/test_x.py`")
    files = block.mark[len("run by "):].split()
    texts = []
    for name in files:
        path = os.path.join(ROOT, name.split("::")[0])
        assert os.path.isfile(path), f"{_rel(block, block.line - 1)}: {name} does not exist"
        texts.append(open(path, encoding="utf-8").read())
    for line, command in block.commands:
        words = [w for w in shlex.split(command) if w.startswith("--") or w in SUBCOMMANDS]
        for word in words:
            flag = word.split("=", 1)[0]
            assert any(flag in text for text in texts), (
                f"{_rel(block, line)}: `{flag}` of `{command}` appears in none of {', '.join(files)}, which the mark "
                f"says run this block; run it there, or mark the block otherwise")


@dataclass
class Step:
    where: str
    argv: list[str]  # rayssl arguments (after the subcommand's substitutions)
    kind: str  # "pretrain" (grouped fresh run), "rayssl" (in-process), "ci" (checked against .ci/run)


def _is_rayssl(word: str) -> bool:
    return word in ("rayssl", ".venv/bin/rayssl") or word.endswith("/bin/rayssl")


def plan(block: Block) -> list[Step]:
    """How each command of an unmarked block runs here; AssertionError naming the line when it cannot."""
    steps = []
    for line, command in block.commands:
        where = _rel(block, line)
        for part in command.split("&&"):
            words = shlex.split(part)
            if not words:
                continue
            if words[0] == "./setup.sh" or (words[0].endswith("python") and words[1:3] == ["-m", "pytest"]):
                steps.append(Step(where, words, "ci"))
            elif _is_rayssl(words[0]) and len(words) > 1 and words[1] in SUBCOMMANDS:
                fresh_run = words[1] == "pretrain" and "--resume" not in words
                steps.append(Step(where, words[1:], "pretrain" if fresh_run else "rayssl"))
            else:
                raise AssertionError(
                    f"{where}: `{part.strip()}` is neither run by tests/test_docs_commands.py nor marked; mark its block "
                    f"with `<!-- docs-test: REASON -->` on the line above its fence (REASON: {', '.join(MARK_REASONS)}, "
                    f"or `run by tests/test_x.py`), or teach the test to run it")
    return steps


def test_every_docs_shell_line_is_run_or_marked():
    """Fast (no Ray): the whole docs are classified; a new unmarked line this test cannot run fails here."""
    strays = [s for path in doc_files() for s in shell_blocks(path)[1]]
    assert not strays, f"commands in code blocks without a language (label them ```bash): {strays}"
    blocks = all_blocks()
    assert sum(len(b.commands) for b in blocks) >= 40  # the parser found the docs' commands
    runnable = 0
    for block in blocks:
        if block.mark:
            check_mark(block)
        else:
            runnable += len(plan(block))
    assert runnable >= 10


def test_the_marking_convention_catches_a_new_unmarked_line(tmp_path):
    doc = tmp_path / "new.md"
    doc.write_text("# new\n\n```bash\nkubectl apply -f rayssl.yaml   # a new way to run\n```\n\n"
                   "<!-- docs-test: needs cluster -->\n```bash\nray up cluster.yaml\n```\n\n"
                   "<!-- docs-test: run by tests/conftest.py -->\n```bash\nrayssl tune --no-such-flag\n```\n")
    unmarked, cluster, run_by = shell_blocks(str(doc))[0]
    with pytest.raises(AssertionError, match=r"new\.md:4: `kubectl apply -f rayssl.yaml` is neither run"):
        plan(unmarked)
    check_mark(cluster)
    with pytest.raises(AssertionError, match="--no-such-flag"):
        check_mark(run_by)


def _write_scans(folder) -> dict[str, str]:
    """Tiny NIfTI inputs for the convert lines: scans/ with two CT volumes, img.nii.gz and its seg.nii.gz."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    os.makedirs(folder / "scans", exist_ok=True)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for name in ("scans/a.nii.gz", "scans/b.nii.gz", "img.nii.gz"):
        ct = rng.integers(-1000, 400, size=(24, 24, 16)).astype(np.int16)
        nib.save(nib.Nifti1Image(ct, affine), str(folder / name))
    nib.save(nib.Nifti1Image((ct > 0).astype(np.uint8), affine), str(folder / "seg.nii.gz"))
    return {"scans/": str(folder / "scans"), "img.nii.gz": str(folder / "img.nii.gz"),
            "seg.nii.gz": str(folder / "seg.nii.gz")}


def _substitute(argv: list[str], files: dict[str, str], store: str, voco_run: str | None) -> list[str]:
    out = []
    for word in argv:
        if word == "...":
            continue  # "your usual options": the tiny ones are appended
        if re.fullmatch(r"runs/voco-\.\.\.", word):
            assert voco_run, "a line uses runs/voco-... before the grouped pretraining run made one"
            word = voco_run
        elif word in files:
            word = files[word]
        elif re.fullmatch(r"data/\w+\.zarr", word) and not os.path.exists(word):
            word = store  # the user's store: the session's tiny demo store
        out.append(word)
    return out


def _tiny_pretrain(argv: list[str], store: str) -> list[str]:
    """The grouped run's arguments at tiny sizes: the tiny store (and as the probe set), 2 steps, tiny VoCo."""
    argv = list(argv)
    if "--probe" in argv:
        at = argv.index("--probe")
        if at + 1 == len(argv) or argv[at + 1].startswith("--"):
            argv.insert(at + 1, store)
        argv += ["--set", "eval.probe_crops=4"]
    if "--data" not in argv:
        argv += ["--data", store]
    if "--steps" not in argv:
        argv += ["--steps", "2"]
    return argv + ["--out", "runs"] + [a for o in VOCO_TINY for a in ("--set", o)]


def _group_pretrain(steps: list[Step]) -> list[str]:
    """The union of the fresh-run lines' options, in order of appearance (a flag given twice keeps the first)."""
    argv, seen = ["pretrain"], set()
    for step in steps:
        words, i = step.argv[1:], 0
        while i < len(words):
            word = words[i]
            takes_value = i + 1 < len(words) and not words[i + 1].startswith("--") and word not in ("...",)
            key = (word, words[i + 1]) if word == "--set" and takes_value else word
            chunk = words[i:i + 2] if takes_value else words[i:i + 1]
            if key not in seen:
                seen.add(key)
                argv += chunk
            i += len(chunk)
    return argv


@pytest.mark.slow
def test_docs_commands_run_as_written(ray_local, demo_store_path, tmp_path, monkeypatch, capsys):
    from rayssl.cli import main

    steps = [s for block in all_blocks() if not block.mark for s in plan(block)]
    ci = open(CI_SCRIPT, encoding="utf-8").read()
    for step in (s for s in steps if s.kind == "ci"):
        command = " ".join(step.argv)
        expected = "./setup.sh test" if step.argv[0] == "./setup.sh" else ".venv/bin/python -m pytest"
        assert expected in ci or command in ci, f"{step.where}: `{command}` is neither run by .ci/run nor here"
    store = str(shutil.copytree(demo_store_path, tmp_path / "store.zarr"))
    files = _write_scans(tmp_path)
    monkeypatch.chdir(tmp_path)

    # The grouped pretraining run, as a user runs it (a subprocess, pipes not a terminal).
    fresh = [s for s in steps if s.kind == "pretrain"]
    argv = _tiny_pretrain(_substitute(_group_pretrain(fresh), files, store, None), store)
    proc = run_cli(argv, cwd=tmp_path, ray_address=ray_local.get_runtime_context().gcs_address)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, (f"{', '.join(s.where for s in fresh)}: `rayssl {' '.join(argv)}` failed", console)
    (voco_run,) = glob.glob(str(tmp_path / "runs" / "voco-*"))
    assert_clean_console(console, os.path.join(voco_run, "ray.log"))
    assert re.search(r"^\[rayssl\] step 2/2 \| loss ", proc.stdout, re.M), console
    assert f"Ray's own output: {voco_run}/ray.log" in proc.stdout, console

    # Every other line, in this process (one Ray runtime), in the order the docs give them.
    for step in (s for s in steps if s.kind == "rayssl"):
        argv = _substitute(step.argv, files, store, voco_run)
        if argv[0] == "pretrain":  # --resume of the finished run: "nothing to do"
            argv += ["--out", "runs"]
        elif argv[0] == "probe":  # one label fraction, few crops, two repeats
            argv += ["--fractions", "100", "--crops-per-volume", "2", "--threads", "2", "--repeats", "2"]
        elif argv[0] == "preview":
            argv += ["--data", store, "--out", str(tmp_path / "preview.png"), "--set", "data.actors_max=1"]
        code = main(argv)
        out = capsys.readouterr()
        assert code == 0, (f"{step.where}: `rayssl {' '.join(argv)}` exited {code}", out.out[-3000:], out.err[-3000:])
