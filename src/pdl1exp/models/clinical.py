"""Clinical and combined (DLR signature + clinical) logistic models on patient tables."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from hydra.utils import instantiate
from scipy.special import logit
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer, make_column_selector
from sklearn.impute import SimpleImputer
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data

from pdl1exp.models.logistic import fit_logistic, univariate_screen

__all__ = ["SIGNATURE", "RestrictedCubicSpline", "UnivariateScreen", "clinical_pipeline",
           "out_of_fold", "signature", "signature_column"]


def signature_column(feature_set: str) -> str:
    """The combined model's column for an image feature set's signature."""
    return f"{feature_set}_signature"


SIGNATURE = signature_column("dlr")


class UnivariateScreen(TransformerMixin, BaseEstimator):
    """Keep the variables whose univariate logistic likelihood-ratio p is below a threshold.

    The paper's clinical screening, as a pipeline step so that it is refitted inside every CV
    fold. When no variable passes, the one with the smallest p is kept (``fallback_``).

    Args:
        numeric: candidate numeric columns.
        categorical: candidate categorical columns.
        p_threshold: selection level; None keeps every candidate.
        keep: columns always kept, untested (the DLR signature of the combined model).
        backward_aic: then drop, one at a time, the variable whose removal lowers the AIC
            of the multivariable logistic model most, until no removal does.
    """

    def __init__(self, *, numeric: Sequence[str] = (), categorical: Sequence[str] = (),
                 p_threshold: float | None = 0.05, keep: Sequence[str] = (),
                 backward_aic: bool = False) -> None:
        self.numeric = numeric
        self.categorical = categorical
        self.p_threshold = p_threshold
        self.keep = keep
        self.backward_aic = backward_aic

    def fit(self, X: pd.DataFrame, y: np.ndarray) -> UnivariateScreen:
        numeric = [c for c in self.numeric if c not in self.keep]
        categorical = [c for c in self.categorical if c not in self.keep]
        self.fallback_ = False
        if self.p_threshold is None or not numeric + categorical:
            chosen = set(numeric + categorical)
            self.screen_ = pd.DataFrame(columns=["variable", "p", "selected"])
        else:
            self.screen_ = univariate_screen(X, np.asarray(y), numeric=numeric,
                                             categorical=categorical,
                                             p_threshold=self.p_threshold)
            p = self.screen_.groupby("variable", sort=False)["p"].first()
            chosen = set(p.index[p < self.p_threshold])
            if not chosen:
                chosen, self.fallback_ = {p.idxmin()}, True
        if self.backward_aic:
            chosen = self._backward(X, np.asarray(y), chosen)
        self.numeric_ = [c for c in self.numeric if c in chosen or c in self.keep]
        self.categorical_ = [c for c in self.categorical if c in chosen or c in self.keep]
        return self

    def _aic(self, X: pd.DataFrame, y: np.ndarray, variables: set[str]) -> float:
        numeric = [c for c in self.numeric if c in variables or c in self.keep]
        categorical = [c for c in self.categorical if c in variables or c in self.keep]
        parts = []
        if numeric:
            filled = SimpleImputer(strategy="median").fit_transform(X[numeric])
            parts.append(StandardScaler().fit_transform(filled))
        if categorical:
            filled = SimpleImputer(strategy="most_frequent").fit_transform(X[categorical])
            parts.append(OneHotEncoder(drop="first", sparse_output=False).fit_transform(filled))
        design = np.hstack(parts) if parts else np.empty((len(X), 0))
        beta, loglik = fit_logistic(design, y)
        return 2 * beta.size - 2 * loglik

    def _backward(self, X: pd.DataFrame, y: np.ndarray, chosen: set[str]) -> set[str]:
        """Backward elimination by AIC over the screened variables (``keep`` stays)."""
        current = set(chosen)
        aic = self._aic(X, y, current)
        self.aic_path_ = [(sorted(current), aic)]
        while len(current) > 1:
            trials = {v: self._aic(X, y, current - {v}) for v in sorted(current)}
            drop = min(trials, key=trials.get)
            if trials[drop] >= aic:
                break
            current, aic = current - {drop}, trials[drop]
            self.aic_path_.append((sorted(current), aic))
        return current

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        return X[self.numeric_ + self.categorical_]

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        return np.asarray(self.numeric_ + self.categorical_, dtype=object)


# Knot quantiles by number of knots (Harrell, Regression Modeling Strategies, 2nd ed., 2.4.6).
_KNOT_QUANTILES = {
    3: (0.10, 0.50, 0.90),
    4: (0.05, 0.35, 0.65, 0.95),
    5: (0.05, 0.275, 0.50, 0.725, 0.95),
    6: (0.05, 0.23, 0.41, 0.59, 0.77, 0.95),
    7: (0.025, 0.1833, 0.3417, 0.50, 0.6583, 0.8167, 0.975),
}


def _cube(x: np.ndarray, at: np.ndarray | float) -> np.ndarray:
    """``(x - at)_+^3``, one column per knot in ``at``."""
    return np.clip(x[:, None] - np.atleast_1d(at), 0, None) ** 3


class RestrictedCubicSpline(TransformerMixin, BaseEstimator):
    """Restricted (natural) cubic spline basis of each column, as R's ``rms::rcs``.

    A column with ``k`` distinct knots becomes ``k - 1`` columns: ``x`` itself and ``k - 2``
    cubic terms (Harrell's ``rcspline.eval`` with ``norm=2``), so the fitted curve is cubic
    between knots and linear beyond the outer ones. Knots sit at Harrell's quantiles of the
    training column; tied quantiles are merged, and a column with fewer than 3 distinct knots
    enters linearly. ``n_terms_`` holds the number of output columns per input column.

    Args:
        n_knots: knots per column, 3 to 7.
    """

    def __init__(self, n_knots: int = 4) -> None:
        self.n_knots = n_knots

    def fit(self, X: Any, y: Any = None) -> RestrictedCubicSpline:
        if self.n_knots not in _KNOT_QUANTILES:
            msg = f"n_knots must be one of {sorted(_KNOT_QUANTILES)}, got {self.n_knots}"
            raise ValueError(msg)
        X = validate_data(self, X, dtype=float)
        quantiles = _KNOT_QUANTILES[self.n_knots]
        knots = [np.unique(np.quantile(column, quantiles)) for column in X.T]
        self.knots_ = [k if k.size >= 3 else k[:0] for k in knots]
        self.n_terms_ = [max(k.size - 1, 1) for k in self.knots_]
        return self

    def transform(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=float, reset=False)
        blocks = []
        for column, knots in zip(X.T, self.knots_, strict=True):
            blocks.append(column[:, None])
            if knots.size:
                inner, before, last = knots[:-2], knots[-2], knots[-1]
                terms = (_cube(column, inner)
                         - _cube(column, before) * (last - inner) / (last - before)
                         + _cube(column, last) * (before - inner) / (last - before))
                blocks.append(terms / (last - knots[0]) ** 2)
        return np.hstack(blocks)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """``x``, ``x'``, ``x''``, … per column (the names ``rms`` prints)."""
        check_is_fitted(self)
        if input_features is None:
            input_features = getattr(self, "feature_names_in_",
                                     [f"x{j}" for j in range(self.n_features_in_)])
        prime = "'"
        return np.asarray([name + prime * j
                           for name, n in zip(input_features, self.n_terms_, strict=True)
                           for j in range(n)], dtype=object)


def _exactly(names: Sequence[str]) -> str:
    """A column-name regex matching exactly ``names`` (none when empty)."""
    return "^(?:" + "|".join(map(re.escape, names)) + ")$" if names else "(?!)"


def clinical_pipeline(cfg: Mapping[str, Any], *, numeric: Sequence[str],
                      categorical: Sequence[str], keep: Sequence[str] = (),
                      log: Sequence[str] = (), spline: Sequence[str] = ()) -> Pipeline:
    """Screen → impute (median / most frequent) → [log(1 + x) | restricted cubic spline] →
    scale numeric, one-hot categorical → logistic.

    Args:
        cfg: ``cfg.clinical`` (``screening_p``, ``backward_aic``, ``spline_knots``,
            ``estimator``, ``categorical_encoder``).
        numeric: numeric columns (each image signature is one for the combined model).
        categorical: categorical columns.
        keep: columns exempt from screening.
        log: numeric columns entering as ``log(1 + x)`` (skewed markers such as CEA).
        spline: numeric columns entering as restricted cubic splines with
            ``cfg["spline_knots"]`` knots (a non-linear effect, Harrell's default).
    """
    if not [*numeric, *categorical]:
        msg = "the clinical model needs at least one clinical column (dataset.clinical)"
        raise ValueError(msg)
    for name, columns in (("log", log), ("spline", spline)):
        if unknown := sorted(set(columns) - set(numeric)):
            msg = (f"dataset.clinical.{name} names {unknown}, which are not numeric clinical "
                   f"columns {list(numeric)}")
            raise ValueError(msg)
    if both := sorted(set(log) & set(spline)):
        msg = f"{both} are in both dataset.clinical.log and dataset.clinical.spline"
        raise ValueError(msg)
    logged = [c for c in numeric if c in set(log)]
    splined = [c for c in numeric if c in set(spline)]
    linear = [c for c in numeric if c not in {*log, *spline}]

    def numeric_steps(*first: tuple[str, Any]) -> Pipeline:
        return Pipeline([("impute", SimpleImputer(strategy="median")), *first,
                         ("scale", StandardScaler())])

    # Columns by name and dtype: the screen decides per fold which variables reach this step.
    columns = ColumnTransformer([
        ("numeric", numeric_steps(),
         make_column_selector(pattern=_exactly(linear), dtype_include="number")),
        ("log", numeric_steps(("log", FunctionTransformer(np.log1p,
                                                          feature_names_out="one-to-one"))),
         make_column_selector(pattern=_exactly(logged), dtype_include="number")),
        ("spline", numeric_steps(("spline", RestrictedCubicSpline(cfg["spline_knots"]))),
         make_column_selector(pattern=_exactly(splined), dtype_include="number")),
        ("categorical", Pipeline([("impute", SimpleImputer(strategy="most_frequent")),
                                  ("encode", instantiate(cfg["categorical_encoder"]))]),
         make_column_selector(dtype_exclude="number")),
    ], verbose_feature_names_out=False)
    screen = UnivariateScreen(numeric=list(numeric), categorical=list(categorical),
                              p_threshold=cfg["screening_p"], keep=list(keep),
                              backward_aic=cfg["backward_aic"])
    return Pipeline([("screen", screen), ("columns", columns),
                     ("classifier", instantiate(cfg["estimator"]))])


def out_of_fold(model: Pipeline, X: pd.DataFrame, y: np.ndarray, *, folds: int,
                seed: int) -> np.ndarray:
    """Cross-validated probabilities on the training data (each fold fitted without itself)."""
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return cross_val_predict(model, X, y, cv=splitter, method="predict_proba")[:, 1]


def signature(proba: np.ndarray, *, clip: float) -> np.ndarray:
    """An image signature: the logit of an image model's probability clipped to
    ``[clip, 1 - clip]`` (a classifier's 0/1 votes would become extreme outliers)."""
    return logit(np.clip(proba, clip, 1 - clip))
