"""Ray Tune sweeps over per-method search spaces, each trial scored by a downstream probe."""

from rayssl.tune.space import Param, SearchSpace, format_override, load_space, validate_space
from rayssl.tune.sweep import SweepResult, probe_points, run_sweep

__all__ = ["Param", "SearchSpace", "SweepResult", "format_override", "load_space", "probe_points", "run_sweep",
           "validate_space"]
