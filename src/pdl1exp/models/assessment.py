"""Assessment of fitted models: metric rows with CIs per split and paired DeLong tables."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from statsmodels.stats.multitest import multipletests
from statsmodels.tools.sm_exceptions import PerfectSeparationError

from pdl1exp.evaluation import (
    calibration_intercept_slope,
    delong_test,
    flatten_metrics,
    metrics_with_ci,
)
from pdl1exp.models.results import Fitted, ModelResult

__all__ = [
    "delong_table",
    "evaluate",
    "model_rows",
    "prespecified_delong",
    "selected_features",
    "split_metrics",
]

log = logging.getLogger(__name__)

_DELONG_COLUMNS = ["split", "model_a", "model_b", "z", "p"]


def evaluate(result: ModelResult, y: pd.Series, *, n_boot: int, level: float, seed: int,
             proportion_ci: str) -> pd.DataFrame:
    """Metrics with CIs of one model on every split, as long-format rows (with the interval
    method), plus the calibration intercept and slope (logistic recalibration, Wald CIs)."""
    rows = []
    for split, proba in result.proba.items():
        labels = y.loc[proba.index].to_numpy()
        if len(np.unique(labels)) < 2:
            log.warning("%s: split %s has one class only; metrics skipped", result.name, split)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            table = metrics_with_ci(labels, proba.to_numpy(), result.threshold,
                                    n_boot=n_boot, level=level, seed=seed,
                                    proportion_ci=proportion_ci)
            table |= {name: (*ci, "wald") for name, ci in _calibration(labels, proba, level)}
        for metric, (estimate, lower, upper, method) in table.items():
            rows.append({"feature_set": result.feature_set, "classifier": result.classifier,
                         "split": split, "n": len(labels), "metric": metric,
                         "estimate": estimate, "ci_lower": lower, "ci_upper": upper,
                         "ci_method": method})
    return pd.DataFrame(rows)


def _calibration(labels: np.ndarray, proba: pd.Series,
                 level: float) -> list[tuple[str, tuple[float, float, float]]]:
    """Calibration intercept and slope, NaN where the recalibration model cannot be fitted
    (e.g. perfectly separated predictions)."""
    try:
        return list(calibration_intercept_slope(labels, proba.to_numpy(), level=level).items())
    except (ValueError, np.linalg.LinAlgError, PerfectSeparationError):
        nan = (np.nan, np.nan, np.nan)
        return [("calibration_intercept", nan), ("calibration_slope", nan)]


def model_rows(metrics: pd.DataFrame, model: ModelResult) -> pd.DataFrame:
    """One model's rows of the long metrics table."""
    return metrics[(metrics.feature_set == model.feature_set)
                   & (metrics.classifier == model.classifier)]


def split_metrics(metrics: pd.DataFrame) -> dict[str, float]:
    """DESIGN.md metric names for one model's rows (DeLong AUC kept as ``auc_delong``)."""
    flat: dict[str, float] = {}
    for split, group in metrics.groupby("split"):
        values = {r.metric: (r.estimate, r.ci_lower, r.ci_upper) for r in group.itertuples()}
        flat.update(flatten_metrics(str(split), values))
    return {k: float(v) for k, v in flat.items() if np.isfinite(v)}


def _delong_rows(pairs: Sequence[tuple[ModelResult, ModelResult]], y: pd.Series,
                 split: str) -> pd.DataFrame:
    rows = []
    for a, b in pairs:
        if split in a.proba and split in b.proba:
            idx = a.proba[split].index
            z, p = delong_test(y.loc[idx], a.proba[split], b.proba[split].loc[idx])
            rows.append({"split": split, "model_a": a.name, "model_b": b.name, "z": z, "p": p})
    return pd.DataFrame(rows, columns=_DELONG_COLUMNS)


def delong_table(models: Sequence[ModelResult], y: pd.Series, *,
                 split: str = "test") -> pd.DataFrame:
    """Exploratory: paired DeLong tests between every pair of models (unadjusted p)."""
    pairs = [(a, b) for i, a in enumerate(models) for b in models[i + 1:]]
    return _delong_rows(pairs, y, split)


def prespecified_delong(fitted: Fitted, y: pd.Series, *, split: str = "test") -> pd.DataFrame:
    """The paper's comparisons, Holm-adjusted: combined vs clinical, combined vs each chosen
    image model, and the chosen image models against each other (``p_holm``)."""
    by_set = {m.feature_set: m for m in fitted.models if m.feature_set in ("clinical",
                                                                          "combined")}
    images = list(fitted.chosen.values())
    pairs = []
    if "combined" in by_set:
        pairs += [(by_set["combined"], other)
                  for other in [*([by_set["clinical"]] if "clinical" in by_set else []), *images]]
    pairs += [(a, b) for i, a in enumerate(images) for b in images[i + 1:]]
    table = _delong_rows(pairs, y, split)
    defined = table["p"].notna()
    table["p_holm"] = np.nan
    if defined.any():
        table.loc[defined, "p_holm"] = multipletests(table.loc[defined, "p"], method="holm")[1]
    return table


def selected_features(model: Any) -> pd.DataFrame:
    """Features kept by the selection step of a fitted pipeline and their LASSO weights."""
    for _, step in getattr(model, "steps", []):
        if hasattr(step, "selected_features_") and hasattr(step, "coef_"):
            return pd.DataFrame({"feature": step.selected_features_, "coefficient": step.coef_})
    return pd.DataFrame(columns=["feature", "coefficient"])
