"""Ray Tune sweeps over per-method search spaces, each trial scored by a downstream probe."""

from __future__ import annotations

from rayssl.lazy import lazy_exports

# Names resolve on first use (PEP 562), so `rayssl --help` (which imports rayssl.tune.cli) does not import Ray.
_EXPORTS = {
    "Param": "rayssl.tune.space", "SearchSpace": "rayssl.tune.space", "format_override": "rayssl.tune.space",
    "load_space": "rayssl.tune.space", "validate_space": "rayssl.tune.space",
    "SweepResult": "rayssl.tune.sweep", "probe_points": "rayssl.tune.sweep", "run_sweep": "rayssl.tune.sweep",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
