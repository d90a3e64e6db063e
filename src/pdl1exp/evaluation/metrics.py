"""Metric tables for one split: point estimates, bootstrap/DeLong CIs and MLflow metric names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from statsmodels.stats.proportion import proportion_confint

from pdl1exp.evaluation.statistics import METRICS, bootstrap_cis, delong_ci, metric_value

__all__ = ["METRICS", "MetricCI", "binary_metrics", "flatten_metrics", "metrics_with_ci"]

# Interval methods of proportions: config name -> statsmodels method.
_PROPORTION_METHODS = {"bootstrap": None, "wilson": "wilson", "clopper_pearson": "beta"}


def binary_metrics(y_true: ArrayLike, y_prob: ArrayLike, threshold: float) -> dict[str, float]:
    """Every metric of :data:`METRICS` on the sample (NaN where undefined, e.g. ppv with no
    predicted positive).

    Args:
        y_true: 0/1 labels.
        y_prob: predicted probabilities of the positive class.
        threshold: decision cut-off; positive when ``y_prob >= threshold``.
    """
    return {m: metric_value(y_true, y_prob, m, threshold=threshold) for m in METRICS}


class MetricCI(NamedTuple):
    """A metric's estimate, interval and how the interval was made."""

    estimate: float
    lower: float
    upper: float
    method: str


def _counts(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, tuple[int, int]]:
    """(successes, trials) of each proportion metric at the threshold."""
    positive, predicted = y == 1, prob >= threshold
    tp, tn = int((positive & predicted).sum()), int((~positive & ~predicted).sum())
    fp, fn = int((~positive & predicted).sum()), int((positive & ~predicted).sum())
    return {"sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp),
            "accuracy": (tp + tn, y.size), "ppv": (tp, tp + fp), "npv": (tn, tn + fn)}


def metrics_with_ci(
    y_true: ArrayLike, y_prob: ArrayLike, threshold: float, *, n_boot: int, level: float,
    seed: int, proportion_ci: str = "bootstrap",
) -> dict[str, MetricCI]:
    """``(estimate, lower, upper, method)`` for every metric of :data:`METRICS` (stratified
    percentile bootstrap, the same resamples for all metrics) plus ``auc_delong`` (DeLong CI).

    Proportions (sensitivity, specificity, accuracy, PPV, NPV) take ``proportion_ci``:
    ``bootstrap`` (falling back to Clopper-Pearson where the bootstrap interval is degenerate,
    e.g. 12/12 correct), ``wilson`` or ``clopper_pearson``.

    Args:
        y_true: 0/1 labels.
        y_prob: predicted probabilities of the positive class.
        threshold: decision cut-off; positive when ``y_prob >= threshold``.
        n_boot: bootstrap resamples.
        level: confidence level.
        seed: bootstrap seed.
        proportion_ci: ``bootstrap``, ``wilson`` or ``clopper_pearson``.
    """
    if proportion_ci not in _PROPORTION_METHODS:
        msg = f"proportion_ci must be one of {tuple(_PROPORTION_METHODS)}, got {proportion_ci!r}"
        raise ValueError(msg)
    intervals = bootstrap_cis(y_true, y_prob, METRICS, n_boot=n_boot, level=level, seed=seed,
                              threshold=threshold)
    table = {m: MetricCI(*ci, "bootstrap") for m, ci in zip(METRICS, intervals, strict=True)}
    counts = _counts(np.asarray(y_true), np.asarray(y_prob, dtype=float), threshold)
    for metric, (successes, trials) in counts.items():
        estimate, lower, upper, _ = table[metric]
        method = proportion_ci
        if method == "bootstrap" and trials and not lower < upper:
            method = "clopper_pearson"
        if method != "bootstrap" and trials:
            lower, upper = proportion_confint(successes, trials, alpha=1 - level,
                                              method=_PROPORTION_METHODS[method])
            table[metric] = MetricCI(estimate, float(lower), float(upper), method)
    table["auc_delong"] = MetricCI(*delong_ci(y_true, y_prob, level=level), "delong")
    return table


def flatten_metrics(
    split: str, metrics: Mapping[str, float | tuple[float, float, float]]
) -> dict[str, float]:
    """MLflow metric names: ``{split}_{metric}`` and, for ``(estimate, lower, upper)`` values,
    ``{split}_{metric}_ci_lower`` / ``{split}_{metric}_ci_upper``.

    Args:
        split: ``train``, ``cv``, ``test`` or ``external_<center>``.
        metrics: output of :func:`binary_metrics` or :func:`metrics_with_ci` (tuples
            ``(estimate, lower, upper, ...)``).
    """
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, tuple):
            estimate, lower, upper = value[:3]
            flat[f"{split}_{name}_ci_lower"] = float(lower)
            flat[f"{split}_{name}_ci_upper"] = float(upper)
        else:
            estimate = value
        flat[f"{split}_{name}"] = float(estimate)
    return flat
