"""Clinical and combined (DLR signature + clinical) logistic models on patient tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from hydra.utils import instantiate
from scipy.special import logit
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["SIGNATURE", "clinical_pipeline", "out_of_fold", "signature"]

SIGNATURE = "dlr_signature"
# Keeps the signature finite when a model is certain.
_EPS = 1e-6


def clinical_pipeline(cfg: Mapping[str, Any], *, numeric: Sequence[str],
                      categorical: Sequence[str]) -> Pipeline:
    """Impute (median / most frequent) → scale numeric, one-hot categorical → logistic model.

    Args:
        cfg: ``cfg.clinical`` (``estimator``, ``categorical_encoder``).
        numeric: numeric columns (the DLR signature is one for the combined model).
        categorical: categorical columns.
    """
    parts = []
    if numeric:
        parts.append(("numeric", Pipeline([("impute", SimpleImputer(strategy="median")),
                                           ("scale", StandardScaler())]), list(numeric)))
    if categorical:
        parts.append(("categorical", Pipeline([
            ("impute", SimpleImputer(strategy="most_frequent")),
            ("encode", instantiate(cfg["categorical_encoder"]))]), list(categorical)))
    if not parts:
        msg = "the clinical model needs at least one clinical column (dataset.clinical)"
        raise ValueError(msg)
    columns = ColumnTransformer(parts, verbose_feature_names_out=False)
    return Pipeline([("columns", columns), ("classifier", instantiate(cfg["estimator"]))])


def out_of_fold(model: Pipeline, X: pd.DataFrame, y: np.ndarray, *, folds: int,
                seed: int) -> np.ndarray:
    """Cross-validated probabilities on the training data (each fold fitted without itself)."""
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return cross_val_predict(model, X, y, cv=splitter, method="predict_proba")[:, 1]


def signature(proba: np.ndarray) -> np.ndarray:
    """The DLR signature: the logit of the deep model's probability."""
    return logit(np.clip(proba, _EPS, 1 - _EPS))
