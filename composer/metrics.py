"""Task metrics: one number from predicted class probabilities.

Shapes: N examples, C classes.

``compute(metric, probs [N, C], labels [N], scores=None [N]) -> float``

Classification metrics (accuracy, f1, matthews) use ``argmax(probs)`` as the
prediction. Correlation metrics (pearson, spearman) serve regression tasks that were
binned into C classes (``regression:`` in a task YAML): the prediction is the expected
bin value ``probs @ centers`` (``centers`` defaults to ``arange(C)``, which gives the
same spearman as any increasing centers) compared with the gold float ``scores``;
without ``scores`` the bin indices ``labels`` stand in for them.
"""
from __future__ import annotations

import numpy as np

from composer.errors import TaskError

METRICS: tuple[str, ...] = ("accuracy", "f1", "matthews", "pearson", "spearman")
"""Metric names a task YAML may use."""

CORRELATION_METRICS: tuple[str, ...] = ("pearson", "spearman")


def _as_arrays(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if probs.ndim != 2:
        raise TaskError(f"metric input probs has shape {probs.shape}; expected [N, C]")
    if probs.shape[0] != labels.shape[0]:
        raise TaskError(
            f"metric input has {probs.shape[0]} rows of probs but {labels.shape[0]} labels; "
            "pass one label per row"
        )
    if probs.shape[0] == 0:
        raise TaskError("metric input is empty (0 examples); evaluate on a non-empty split")
    return probs, labels


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``pred [N]`` equal to ``labels [N]``."""
    return float(np.mean(pred == labels))


def f1(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Binary F1 of class 1 when ``num_classes == 2``, else the macro average over classes.

    A class with no predicted and no gold examples scores 0 (the sklearn convention).
    """
    classes = [1] if num_classes == 2 else list(range(num_classes))
    scores = []
    for c in classes:
        tp = float(np.sum((pred == c) & (labels == c)))
        fp = float(np.sum((pred == c) & (labels != c)))
        fn = float(np.sum((pred != c) & (labels == c)))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom > 0 else 0.0)
    return float(np.mean(scores))


def matthews(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Matthews correlation (the multi-class R_K form); 0 when undefined (one class only)."""
    cm = np.zeros((num_classes, num_classes), dtype=np.float64)  # [C gold, C pred]
    np.add.at(cm, (labels, pred), 1.0)
    t = cm.sum(axis=1)  # [C] gold counts
    p = cm.sum(axis=0)  # [C] predicted counts
    c = np.trace(cm)
    s = cm.sum()
    cov_yp = c * s - t @ p
    cov_yy = s * s - t @ t
    cov_pp = s * s - p @ p
    denom = np.sqrt(cov_yy * cov_pp)
    return float(cov_yp / denom) if denom > 0 else 0.0


def _correlation(metric: str, pred: np.ndarray, gold: np.ndarray) -> float:
    from scipy import stats

    # a constant vector has no correlation; scipy warns and returns nan, we say 0
    if np.ptp(pred) == 0 or np.ptp(gold) == 0:
        return 0.0
    if metric == "pearson":
        return float(stats.pearsonr(pred, gold)[0])
    return float(stats.spearmanr(pred, gold)[0])


def compute(
    metric: str,
    probs: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray | None = None,
    centers: np.ndarray | None = None,
) -> float:
    """One metric value.

    Args:
        metric: one of ``METRICS``.
        probs: [N, C] class probabilities (or any scores whose argmax is the prediction).
        labels: [N] int gold class indices.
        scores: [N] float gold values for correlation metrics (regression tasks);
            defaults to ``labels``.
        centers: [C] the value each class stands for in correlation metrics
            (e.g. ``TaskSpec.bin_centers()``); defaults to ``arange(C)``.

    Returns:
        The metric as a float (accuracy/f1 in [0, 1], matthews/pearson/spearman in [-1, 1]).
    """
    if metric not in METRICS:
        raise TaskError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    probs, labels = _as_arrays(probs, labels)
    N, C = probs.shape
    if labels.min() < 0 or labels.max() >= C:
        raise TaskError(
            f"metric input has label {int(labels.max() if labels.max() >= C else labels.min())} "
            f"outside 0..{C - 1} for probs with {C} classes; pass class indices"
        )
    if metric in CORRELATION_METRICS:
        values = np.arange(C, dtype=np.float64) if centers is None else np.asarray(centers, np.float64)
        if values.shape != (C,):
            raise TaskError(f"metric centers have shape {values.shape}; expected [{C}] (one per class)")
        pred = probs @ values  # [N] expected value
        gold = labels.astype(np.float64) if scores is None else np.asarray(scores, np.float64).reshape(-1)
        if gold.shape != (N,):
            raise TaskError(f"metric scores have shape {gold.shape}; expected [{N}] (one per row)")
        return _correlation(metric, pred, gold)
    pred = probs.argmax(axis=1)  # [N]
    if metric == "accuracy":
        return accuracy(pred, labels)
    if metric == "f1":
        return f1(pred, labels, C)
    return matthews(pred, labels, C)
