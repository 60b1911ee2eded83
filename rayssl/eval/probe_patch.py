"""The patch probe: logistic regression on pooled frozen features predicting the crop-centre class."""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from rayssl.eval.crops import CropPool, fraction_subset
from rayssl.eval.probe_config import ProbeConfig


def macro_auc(truth: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Mean one-vs-rest ROC AUC over the classes that occur (and not only) in `truth`."""
    from sklearn.metrics import roc_auc_score

    scores = []
    for j, c in enumerate(classes):
        positive = truth == c
        if positive.any() and not positive.all():
            scores.append(roc_auc_score(positive, proba[:, j]))
    return float(np.mean(scores)) if scores else float("nan")


def patch_probe(fit_pool: CropPool, fit_pooled: np.ndarray, eval_pool: CropPool, eval_pooled: np.ndarray,
                cfg: ProbeConfig) -> list[dict[str, Any]]:
    """One row per label fraction: logistic regression on pooled features predicting the crop-centre class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = []
    for fraction in cfg.fractions:
        t0 = time.perf_counter()
        subset = fraction_subset(fit_pool, fraction, cfg.seed, cfg.fraction_unit)
        y = fit_pool.centre_class[subset]
        row: dict[str, Any] = {"probe": "patch", "fraction": fraction, "n_train_crops": len(subset),
                               "metric": "balanced_accuracy"}
        if len(np.unique(y)) < 2:
            rows.append({**row, "score": float("nan"), "note": "fewer than 2 classes in this fraction"})
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=cfg.seed))
        clf.fit(fit_pooled[subset], y)
        truth = eval_pool.centre_class
        predicted = clf.predict(eval_pooled)
        with warnings.catch_warnings():  # predicting a class absent from the eval crops is not an error here
            warnings.simplefilter("ignore", UserWarning)
            balanced = float(balanced_accuracy_score(truth, predicted))
        rows.append({**row, "score": balanced, "balanced_accuracy": balanced,
                     "accuracy": float(accuracy_score(truth, predicted)),
                     "auc": macro_auc(truth, clf.predict_proba(eval_pooled), clf.classes_),
                     "time_s": round(time.perf_counter() - t0, 2)})
    return rows
