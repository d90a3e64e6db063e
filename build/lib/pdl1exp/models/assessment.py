"""Assessment of fitted models: metric rows with CIs per split and paired DeLong tables."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pdl1exp.evaluation import delong_test, flatten_metrics, metrics_with_ci
from pdl1exp.models.results import ModelResult

__all__ = ["delong_table", "evaluate", "selected_features", "split_metrics"]

log = logging.getLogger(__name__)

_DELONG_COLUMNS = ["split", "model_a", "model_b", "z", "p"]


def evaluate(result: ModelResult, y: pd.Series, *, n_boot: int, level: float,
             seed: int) -> pd.DataFrame:
    """Metrics with CIs of one model on every split, as long-format rows."""
    rows = []
    for split, proba in result.proba.items():
        labels = y.loc[proba.index].to_numpy()
        if len(np.unique(labels)) < 2:
            log.warning("%s: split %s has one class only; metrics skipped", result.name, split)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            table = metrics_with_ci(labels, proba.to_numpy(), result.threshold,
                                    n_boot=n_boot, level=level, seed=seed)
        for metric, (estimate, lower, upper) in table.items():
            rows.append({"feature_set": result.feature_set, "classifier": result.classifier,
                         "split": split, "n": len(labels), "metric": metric,
                         "estimate": estimate, "ci_lower": lower, "ci_upper": upper})
    return pd.DataFrame(rows)


def split_metrics(metrics: pd.DataFrame) -> dict[str, float]:
    """DESIGN.md metric names for one model's rows (DeLong AUC kept as ``auc_delong``)."""
    flat: dict[str, float] = {}
    for split, group in metrics.groupby("split"):
        values = {r.metric: (r.estimate, r.ci_lower, r.ci_upper) for r in group.itertuples()}
        flat.update(flatten_metrics(str(split), values))
    return {k: float(v) for k, v in flat.items() if np.isfinite(v)}


def delong_table(models: Sequence[ModelResult], y: pd.Series) -> pd.DataFrame:
    """Paired DeLong tests on the test split between every pair of models."""
    rows = []
    tested = [m for m in models if "test" in m.proba]
    for i, a in enumerate(tested):
        for b in tested[i + 1:]:
            idx = a.proba["test"].index
            z, p = delong_test(y.loc[idx], a.proba["test"], b.proba["test"].loc[idx])
            rows.append({"split": "test", "model_a": a.name, "model_b": b.name, "z": z, "p": p})
    return pd.DataFrame(rows, columns=_DELONG_COLUMNS)


def selected_features(model: Any) -> pd.DataFrame:
    """Features kept by the selection step of a fitted pipeline and their LASSO weights."""
    for _, step in getattr(model, "steps", []):
        if hasattr(step, "selected_features_") and hasattr(step, "coef_"):
            return pd.DataFrame({"feature": step.selected_features_, "coefficient": step.coef_})
    return pd.DataFrame(columns=["feature", "coefficient"])
