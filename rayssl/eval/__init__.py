"""Downstream evaluation of pretrained backbones: linear probes and fine-tuning against random init."""

from __future__ import annotations

import importlib
from typing import Any

# Names resolve on first use (PEP 562): `rayssl --help` imports rayssl.eval.cli, which must not pull in
# torch and MONAI (seconds) just to build an argument parser.
_EXPORTS = {
    "FeatureNet": "rayssl.eval.features", "RunWeights": "rayssl.eval.features",
    "build_network": "rayssl.eval.features", "intensity_scaler": "rayssl.eval.features",
    "load_run_weights": "rayssl.eval.features",
    "FinetuneConfig": "rayssl.eval.finetune", "run_finetune": "rayssl.eval.finetune",
    "ProbeConfig": "rayssl.eval.probe", "ProbeData": "rayssl.eval.probe", "load_probe_data": "rayssl.eval.probe",
    "probe_score": "rayssl.eval.probe",
    "ProbeReport": "rayssl.eval.report", "run_probe": "rayssl.eval.report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rayssl.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
