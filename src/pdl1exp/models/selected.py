"""The selected model as one estimator: patient feature table → probability of PD-L1 positive."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin

from pdl1exp.models.clinical import SIGNATURE, signature

__all__ = ["SelectedModel"]

_FEATURE_SETS = ("clinical", "dlr", "combined")


class SelectedModel(ClassifierMixin, BaseEstimator):
    """Chain the fitted parts of the selected model and carry its decision threshold.

    ``dlr`` maps deep features to a probability; ``clinical`` maps clinical columns (plus the
    DLR signature for ``combined``) to a probability. Both are fitted pipelines from the
    training split; this class fits nothing itself.

    Args:
        feature_set: ``clinical``, ``dlr`` or ``combined``.
        dlr: fitted deep-feature pipeline (``dlr`` and ``combined``).
        clinical: fitted clinical/combined pipeline (``clinical`` and ``combined``).
        threshold: train-chosen cut-off; positive when probability >= threshold.
        deep_features: columns the DLR pipeline reads.
        clinical_features: clinical columns the clinical pipeline reads.
    """

    def __init__(self, *, feature_set: str, dlr=None, clinical=None, threshold: float = 0.5,
                 deep_features: Sequence[str] = (),
                 clinical_features: Sequence[str] = ()) -> None:
        self.feature_set = feature_set
        self.dlr = dlr
        self.clinical = clinical
        self.threshold = threshold
        self.deep_features = deep_features
        self.clinical_features = clinical_features

    @property
    def input_columns(self) -> list[str]:
        """Every column the model reads, in order."""
        deep = list(self.deep_features) if self.feature_set != "clinical" else []
        clinical = list(self.clinical_features) if self.feature_set != "dlr" else []
        return deep + clinical

    def fit(self, X: pd.DataFrame, y=None) -> SelectedModel:
        """Check the parts (they arrive fitted) and record the classes."""
        if self.feature_set not in _FEATURE_SETS:
            msg = f"feature_set must be one of {_FEATURE_SETS}, got {self.feature_set!r}"
            raise ValueError(msg)
        self.classes_ = np.array([0, 1])
        return self

    def _check_columns(self, X: pd.DataFrame) -> None:
        missing = [c for c in self.input_columns if c not in X.columns]
        if missing:
            msg = (f"input is missing {len(missing)} column(s) the model needs: {missing[:10]}"
                   f"{' ...' if len(missing) > 10 else ''}")
            raise ValueError(msg)

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        self._check_columns(X)
        if self.feature_set == "dlr":
            positive = self.dlr.predict_proba(X[list(self.deep_features)])[:, 1]
        else:
            table = X[list(self.clinical_features)].copy()
            if self.feature_set == "combined":
                deep = self.dlr.predict_proba(X[list(self.deep_features)])[:, 1]
                table[SIGNATURE] = signature(deep)
            positive = self.clinical.predict_proba(table)[:, 1]
        return np.column_stack([1 - positive, positive])

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        """Predicted status at the train-chosen threshold."""
        return (self.predict_proba(X)[:, 1] >= self.threshold).astype(int)
