"""Whole-chain nested cross-validation: the estimate of the modelling *procedure*.

The outer stratified K folds of the training split wrap everything that is fitted: the
selection, every Optuna sweep, the choice of classifier per image feature set, the
cross-fitted signatures, the clinical screening and the combined model. Each outer fold runs
:func:`~pdl1exp.models.fitting.fit_feature_sets` on its training part alone and scores its
held-out part once; the pooled held-out probabilities give one AUC per feature set.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from pdl1exp.evaluation import delong_ci
from pdl1exp.models.fitting import fit_feature_sets

__all__ = ["NestedResult", "nested_estimates"]

log = logging.getLogger(__name__)


@dataclass
class NestedResult:
    """Outer-fold results per feature set.

    Attributes:
        oof_proba: feature set → pooled outer held-out probabilities (training split index).
        folds: one row per (outer fold, feature set): ``fold``, ``feature_set``,
            ``classifier`` (the one chosen inside that fold), ``n``, ``auc``.
    """

    oof_proba: dict[str, pd.Series]
    folds: pd.DataFrame

    def metrics(self, y: pd.Series, *, level: float) -> dict[str, float]:
        """``nested_<feature set>_auc`` with its DeLong CI, and the fold mean and SD."""
        out = {}
        for feature_set, proba in self.oof_proba.items():
            auc, lower, upper = delong_ci(y.loc[proba.index], proba, level=level)
            fold_aucs = self.folds.loc[self.folds.feature_set == feature_set, "auc"]
            out |= {f"nested_{feature_set}_auc": auc,
                    f"nested_{feature_set}_auc_ci_lower": lower,
                    f"nested_{feature_set}_auc_ci_upper": upper,
                    f"nested_{feature_set}_auc_fold_mean": float(fold_aucs.mean()),
                    f"nested_{feature_set}_auc_fold_sd": float(fold_aucs.std(ddof=1))}
        return out


def nested_estimates(table: pd.DataFrame, features: Mapping[str, pd.DataFrame], *,
                     outer_folds: int, **fit: Any) -> NestedResult:
    """Run the whole modelling chain in each outer fold of ``table`` (the training split).

    Args:
        table: training patients' cohort table (``label``, ``center``, clinical columns).
        features: image feature set → feature table (covering ``table``'s index).
        outer_folds: number of outer folds.
        **fit: the keyword arguments of :func:`fit_feature_sets` but ``splits`` (its
            ``seed`` also seeds the outer split).
    """
    y = table["label"].to_numpy()
    splitter = StratifiedKFold(outer_folds, shuffle=True, random_state=fit["seed"])
    pooled: dict[str, list[pd.Series]] = {}
    rows = []
    for k, (_, outer) in enumerate(splitter.split(table, y)):
        splits = pd.Series("train", index=table.index)
        splits.iloc[outer] = "test"
        fitted = fit_feature_sets(table, {f: X.loc[table.index] for f, X in features.items()},
                                  splits, **fit)
        reported = [m for m in fitted.models if m.feature_set not in fitted.chosen]
        reported += list(fitted.chosen.values())
        for model in reported:
            proba = model.proba["test"]
            pooled.setdefault(model.feature_set, []).append(proba)
            auc = float(roc_auc_score(table["label"].loc[proba.index], proba))
            rows.append({"fold": k, "feature_set": model.feature_set,
                         "classifier": model.classifier, "n": len(proba), "auc": auc})
        log.info("Nested CV outer fold %d/%d: %s", k + 1, outer_folds,
                 ", ".join(f"{r['feature_set']} {r['auc']:.3f}" for r in rows if r["fold"] == k))
    oof = {f: pd.concat(parts).loc[table.index] for f, parts in pooled.items()}
    folds = pd.DataFrame(rows, columns=["fold", "feature_set", "classifier", "n", "auc"])
    return NestedResult(oof, folds.astype({"auc": np.float64}))
