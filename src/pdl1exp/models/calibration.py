"""Recalibration of the registered model on its training out-of-fold predictions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.special import expit, logit
from sklearn.base import BaseEstimator
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_is_fitted

from pdl1exp.evaluation import youden_threshold
from pdl1exp.models.results import ModelResult

__all__ = ["METHODS", "Recalibrator", "recalibrate"]

METHODS = ("platt", "isotonic", "none")
# Probabilities are clipped before the logit of Platt scaling.
_CLIP = 1e-6


class Recalibrator(BaseEstimator):
    """Map a model's probabilities to calibrated ones.

    ``platt``: logistic regression on the logit of the probability (intercept and slope, as
    the calibration intercept/slope); ``isotonic``: a monotone step function.

    Args:
        method: ``platt`` or ``isotonic``.
    """

    def __init__(self, *, method: str = "platt") -> None:
        self.method = method

    def fit(self, proba: ArrayLike, y: ArrayLike) -> Recalibrator:
        """Fit on out-of-fold probabilities and their labels."""
        p, y = np.asarray(proba, dtype=float), np.asarray(y)
        if self.method == "platt":
            model = LogisticRegression(C=np.inf).fit(_logit(p)[:, None], y)
            self.intercept_, self.slope_ = float(model.intercept_[0]), float(model.coef_[0, 0])
        elif self.method == "isotonic":
            self.isotonic_ = IsotonicRegression(y_min=0.0, y_max=1.0,
                                                out_of_bounds="clip").fit(p, y)
        else:
            msg = f"Recalibrator.method must be 'platt' or 'isotonic', got {self.method!r}"
            raise ValueError(msg)
        return self

    def transform(self, proba: ArrayLike) -> np.ndarray:
        """Calibrated probabilities."""
        p = np.asarray(proba, dtype=float)
        if self.method == "platt":
            check_is_fitted(self, "slope_")
            return expit(self.intercept_ + self.slope_ * _logit(p))
        check_is_fitted(self, "isotonic_")
        return self.isotonic_.predict(p)


def _logit(p: np.ndarray) -> np.ndarray:
    return logit(np.clip(p, _CLIP, 1 - _CLIP))


def recalibrate(result: ModelResult, y: pd.Series, *, method: str) -> ModelResult:
    """The model with every split's probabilities recalibrated by a :class:`Recalibrator`
    fitted on its training out-of-fold (``cv``) predictions, and the Youden threshold chosen
    again on the recalibrated ones. ``method="none"`` returns ``result`` unchanged."""
    if method not in METHODS:
        msg = f"evaluation.recalibrate must be one of {METHODS}, got {method!r}"
        raise ValueError(msg)
    if method == "none":
        return result
    oof = result.proba["cv"]
    calibrator = Recalibrator(method=method).fit(oof.to_numpy(), y.loc[oof.index].to_numpy())
    proba = {split: pd.Series(calibrator.transform(p.to_numpy()), index=p.index)
             for split, p in result.proba.items()}
    threshold = youden_threshold(y.loc[oof.index], proba["cv"])
    return replace(result, proba=proba, threshold=threshold, calibrator=calibrator)
