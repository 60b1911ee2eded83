"""`rayssl --help` and every subcommand's help answer without importing torch, MONAI or Ray (issue 28: < 0.5 s)."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "monai", "ray")
SUBCOMMANDS = ["pretrain", "preview", "recipe", "export", "convert", "verify", "demo", "probe", "tune"]


def _heavy_modules_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("HEAVY="), out.stdout[-500:]
    return [m for m in last[len("HEAVY="):].split(",") if m]


def test_building_the_parser_imports_no_heavy_package():
    assert _heavy_modules_after("from rayssl.cli import build_parser; build_parser()") == []


@pytest.mark.parametrize("command", ["", *SUBCOMMANDS])
def test_every_help_exits_cleanly_without_heavy_imports(command):
    argv = [command, "--help"] if command else ["--help"]
    code = ("from rayssl.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code")
    assert _heavy_modules_after(code) == []


def test_lazy_package_names_still_resolve():
    import rayssl.eval
    import rayssl.tune

    assert callable(rayssl.eval.run_probe) and callable(rayssl.tune.run_sweep)
    assert set(rayssl.eval.__all__) <= set(dir(rayssl.eval))
    with pytest.raises(AttributeError):
        rayssl.eval.no_such_name  # noqa: B018
