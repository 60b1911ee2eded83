"""Downstream evaluation of pretrained backbones: linear probes and fine-tuning against random init."""

from __future__ import annotations

from rayssl.lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
