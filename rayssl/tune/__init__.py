"""Ray Tune sweeps over per-method search spaces, each trial scored by a downstream probe."""

from __future__ import annotations

import importlib
from typing import Any

# Names resolve on first use (PEP 562), so `rayssl --help` (which imports rayssl.tune.cli) does not import Ray.
_EXPORTS = {
    "Param": "rayssl.tune.space", "SearchSpace": "rayssl.tune.space", "format_override": "rayssl.tune.space",
    "load_space": "rayssl.tune.space", "validate_space": "rayssl.tune.space",
    "SweepResult": "rayssl.tune.sweep", "probe_points": "rayssl.tune.sweep", "run_sweep": "rayssl.tune.sweep",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rayssl.tune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
