"""Metric tables for one split: point estimates, bootstrap/DeLong CIs and MLflow metric names."""

from __future__ import annotations

from collections.abc import Mapping

from numpy.typing import ArrayLike

from pdl1exp.evaluation.statistics import METRICS, bootstrap_cis, delong_ci, metric_value

__all__ = ["METRICS", "binary_metrics", "flatten_metrics", "metrics_with_ci"]


def binary_metrics(y_true: ArrayLike, y_prob: ArrayLike, threshold: float) -> dict[str, float]:
    """Every metric of :data:`METRICS` on the sample (NaN where undefined, e.g. ppv with no
    predicted positive).

    Args:
        y_true: 0/1 labels.
        y_prob: predicted probabilities of the positive class.
        threshold: decision cut-off; positive when ``y_prob >= threshold``.
    """
    return {m: metric_value(y_true, y_prob, m, threshold=threshold) for m in METRICS}


def metrics_with_ci(
    y_true: ArrayLike, y_prob: ArrayLike, threshold: float, *, n_boot: int, level: float, seed: int
) -> dict[str, tuple[float, float, float]]:
    """``(estimate, lower, upper)`` for every metric of :data:`METRICS` (stratified percentile
    bootstrap, the same resamples for all metrics) plus ``auc_delong`` (DeLong CI).

    Args:
        y_true: 0/1 labels.
        y_prob: predicted probabilities of the positive class.
        threshold: decision cut-off; positive when ``y_prob >= threshold``.
        n_boot: bootstrap resamples.
        level: confidence level.
        seed: bootstrap seed.
    """
    intervals = bootstrap_cis(y_true, y_prob, METRICS, n_boot=n_boot, level=level, seed=seed,
                              threshold=threshold)
    table: dict[str, tuple[float, float, float]] = dict(zip(METRICS, intervals, strict=True))
    table["auc_delong"] = delong_ci(y_true, y_prob, level=level)
    return table


def flatten_metrics(
    split: str, metrics: Mapping[str, float | tuple[float, float, float]]
) -> dict[str, float]:
    """MLflow metric names: ``{split}_{metric}`` and, for ``(estimate, lower, upper)`` values,
    ``{split}_{metric}_ci_lower`` / ``{split}_{metric}_ci_upper``.

    Args:
        split: ``train``, ``cv``, ``test`` or ``external_<center>``.
        metrics: output of :func:`binary_metrics` or :func:`metrics_with_ci`.
    """
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, tuple):
            estimate, lower, upper = value
            flat[f"{split}_{name}_ci_lower"] = float(lower)
            flat[f"{split}_{name}_ci_upper"] = float(upper)
        else:
            estimate = value
        flat[f"{split}_{name}"] = float(estimate)
    return flat
