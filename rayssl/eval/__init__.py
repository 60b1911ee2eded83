"""Downstream evaluation of pretrained backbones: linear probes and fine-tuning against random init."""

from rayssl.eval.features import FeatureNet, RunWeights, build_network, intensity_scaler, load_run_weights
from rayssl.eval.finetune import FinetuneConfig, run_finetune
from rayssl.eval.probe import ProbeConfig, ProbeData, load_probe_data, probe_score
from rayssl.eval.report import ProbeReport, run_probe

__all__ = [
    "FeatureNet", "FinetuneConfig", "ProbeConfig", "ProbeData", "ProbeReport", "RunWeights", "build_network",
    "intensity_scaler", "load_probe_data", "load_run_weights", "probe_score", "run_finetune", "run_probe",
]
