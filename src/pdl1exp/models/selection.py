"""Feature selection steps (filters, LASSO) that are fitted inside each CV fold.

One module for every selection transformer: they share the support/fallback base class and
the sklearn estimator checks that run over all of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from hydra.utils import instantiate
from scipy.special import expit
from scipy.stats import mannwhitneyu, rankdata, ttest_ind
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import SelectorMixin
from sklearn.linear_model import LogisticRegression, lars_path
from sklearn.model_selection import StratifiedKFold
from sklearn.utils import ClassifierTags, Tags
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = [
    "CorrelationFilter",
    "LassoSelector",
    "NearZeroVarianceFilter",
    "SelectionFallbackWarning",
    "UnivariateFilter",
    "build_selection",
    "univariate_auc",
]

_TESTS = ("mannwhitney", "ttest")
_CORRELATIONS = ("pearson", "spearman")
_LASSO_ESTIMATORS = ("logistic", "lasso")


class SelectionFallbackWarning(UserWarning):
    """A selection step would have kept no feature and kept the single best one instead."""


def build_selection(cfg: Mapping[str, Any], inputs: Mapping[str, Mapping[str, Any]] | None = None
                    ) -> list[tuple[str, TransformerMixin]]:
    """Instantiate the ordered ``steps`` of a selection config (``conf/selection/*.yaml``).

    Args:
        cfg: mapping with ``steps``: step name -> ``{_target_: ..., params}``, in order (a
            null step is a passthrough slot).
        inputs: step name -> runtime keyword arguments that are data, not config (the ICC
            filter's ``replicates``, ComBat's ``batches``).

    Returns:
        ``(name, transformer)`` pairs, ready for :class:`sklearn.pipeline.Pipeline`.
    """
    inputs = inputs or {}
    return [(name, instantiate(step, _convert_="all", **inputs.get(name, {}))
             if step is not None else "passthrough") for name, step in cfg["steps"].items()]


def univariate_auc(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ROC AUC of every column used alone as a score (ties count one half).

    Args:
        X: ``(n_samples, n_features)`` values.
        y: 0/1 labels.
    """
    positive = y == 1
    n_pos, n_neg = positive.sum(), (~positive).sum()
    ranks = rankdata(X, axis=0)
    # Mann-Whitney U of the positives, normalised: the probabilistic definition of the AUC.
    return (ranks[positive].sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _binary_target(y: np.ndarray) -> np.ndarray:
    """Map a two-class label to 0/1 (the larger label is the positive class)."""
    check_classification_targets(y)
    classes, y01 = np.unique(y, return_inverse=True)
    if classes.size != 2:
        msg = f"feature selection needs a binary label; got {classes.size} classes {classes!r}"
        raise ValueError(msg)
    return y01


def _check_option(name: str, value: object, options: tuple[str, ...]) -> None:
    if value not in options:
        msg = f"{name}={value!r} is not one of {options}"
        raise ValueError(msg)


def _standardized(A: np.ndarray) -> np.ndarray:
    """Centre columns and scale them to unit norm, so ``Z.T @ Z`` is the correlation matrix.

    Constant columns become zeros: they correlate with nothing.
    """
    centred = A - A.mean(axis=0)
    norms = np.linalg.norm(centred, axis=0)
    return np.divide(centred, norms, out=np.zeros_like(centred), where=norms > 0)


class _SupportSelector(SelectorMixin, BaseEstimator):
    """Column selector that never keeps zero columns: downstream steps need at least one.

    Fitted subclasses have ``support_`` (boolean mask), ``selected_features_`` (kept names)
    and ``fallback_`` (True when the criterion kept nothing and the best column was kept).
    """

    def _set_support(self, keep: np.ndarray, scores: np.ndarray) -> None:
        """Store the kept columns; with none, keep the best-scoring one and warn.

        Args:
            keep: boolean mask of the columns that pass the step's criterion.
            scores: per-column merit, higher is better (NaN counts as worst).
        """
        self.fallback_ = not keep.any()
        if self.fallback_:
            keep = np.zeros_like(keep)
            keep[np.argmax(np.nan_to_num(scores, nan=-np.inf))] = True
        self.support_ = keep
        self.selected_features_ = self.get_feature_names_out()
        if self.fallback_:
            best = self.selected_features_[0]
            msg = f"{type(self).__name__} kept no feature; keeping the best one, {best!r}"
            warnings.warn(msg, SelectionFallbackWarning, stacklevel=3)

    def _get_support_mask(self) -> np.ndarray:
        check_is_fitted(self, "support_")
        return self.support_


class _SupervisedSelector(_SupportSelector):
    """Selector whose criterion needs the binary label."""

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        # The label is a binary class: this tag makes the estimator checks send two classes.
        tags.classifier_tags = ClassifierTags(multi_class=False)
        return tags

    def _validate_xy(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        X, y = validate_data(self, X, y, dtype=np.float64)
        return X, _binary_target(y)


class NearZeroVarianceFilter(_SupportSelector):
    """Drop constant and near-constant columns (caret's ``nearZeroVar`` rule).

    A column is dropped when it is constant, or when both the ratio of its most to its second
    most frequent value exceeds ``freq_cut`` and its distinct values make up at most
    ``unique_cut`` percent of the samples. Both criteria are scale-free, so the step may follow
    standardisation. Sparse ReLU deep features (mostly one value) are the typical casualties.

    Args:
        freq_cut: most/second-most frequent value count ratio above which a column is suspect.
        unique_cut: percentage of distinct values at or below which a column is suspect.
    """

    def __init__(self, *, freq_cut: float = 95 / 5, unique_cut: float = 10.0) -> None:
        self.freq_cut = freq_cut
        self.unique_cut = unique_cut

    def fit(self, X, y=None) -> NearZeroVarianceFilter:
        """Compute the frequency statistics of every column.

        Args:
            X: ``(n_samples, n_features)`` values without NaN.
            y: ignored.
        """
        X = validate_data(self, X, dtype=np.float64)
        n_features = X.shape[1]
        self.freq_ratio_ = np.empty(n_features)
        n_unique = np.empty(n_features, dtype=int)
        for j, column in enumerate(X.T):
            counts = np.sort(np.unique(column, return_counts=True)[1])[::-1]
            n_unique[j] = counts.size
            self.freq_ratio_[j] = counts[0] / counts[1] if counts.size > 1 else np.inf
        self.percent_unique_ = 100 * n_unique / X.shape[0]
        near_zero = (self.freq_ratio_ > self.freq_cut) & (self.percent_unique_ <= self.unique_cut)
        self._set_support(~(near_zero | (n_unique == 1)), self.percent_unique_)
        return self


class UnivariateFilter(_SupervisedSelector):
    """Keep the columns whose two-sample test against the label has ``p < p_threshold``.

    Args:
        test: ``"mannwhitney"`` (two-sided Mann-Whitney U) or ``"ttest"`` (Welch's t-test).
        p_threshold: p-values strictly below it pass (no multiplicity correction, as in the
            paper's screening step).
    """

    def __init__(self, *, test: str = "mannwhitney", p_threshold: float = 0.05) -> None:
        self.test = test
        self.p_threshold = p_threshold

    def fit(self, X, y) -> UnivariateFilter:
        """Test every column.

        Args:
            X: ``(n_samples, n_features)`` values without NaN.
            y: binary labels.
        """
        _check_option("test", self.test, _TESTS)
        X, y = self._validate_xy(X, y)
        positives, negatives = X[y == 1], X[y == 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            if self.test == "mannwhitney":
                pvalues = mannwhitneyu(positives, negatives, axis=0).pvalue
            else:
                pvalues = ttest_ind(positives, negatives, axis=0, equal_var=False).pvalue
        # Constant columns give NaN: no evidence against the null.
        self.pvalues_ = np.where(np.isnan(pvalues), 1.0, pvalues)
        self._set_support(self.pvalues_ < self.p_threshold, -self.pvalues_)
        return self


class CorrelationFilter(_SupervisedSelector):
    """Drop redundant columns: of every pair with ``|r| > threshold`` keep one.

    Columns are visited from the most to the least related to the label (``|r|`` between the
    column and the 0/1 label, with the same ``method``); each visited column that is still
    present is kept and removes the later ones it correlates with. So of a correlated pair
    the survivor is the one more related to the label.

    Args:
        method: ``"pearson"`` or ``"spearman"`` (Pearson on ranks).
        threshold: absolute correlation above which two columns are redundant.
    """

    def __init__(self, *, method: str = "pearson", threshold: float = 0.9) -> None:
        self.method = method
        self.threshold = threshold

    def fit(self, X, y) -> CorrelationFilter:
        """Find a subset of columns without highly correlated pairs.

        Args:
            X: ``(n_samples, n_features)`` values without NaN.
            y: binary labels.
        """
        _check_option("method", self.method, _CORRELATIONS)
        X, y = self._validate_xy(X, y)
        if self.method == "spearman":
            X = rankdata(X, axis=0)
        Z = _standardized(X)
        corr = np.abs(Z.T @ Z)
        self.relevance_ = np.abs(Z.T @ _standardized(y[:, None].astype(np.float64)))[:, 0]
        keep = np.zeros(X.shape[1], dtype=bool)
        removed = np.zeros(X.shape[1], dtype=bool)
        for j in np.argsort(-self.relevance_, kind="stable"):
            if not removed[j]:
                keep[j] = True
                removed |= corr[j] > self.threshold
        self._set_support(keep, self.relevance_)
        return self


def _logistic_path(
    X: np.ndarray, y: np.ndarray, lambdas: np.ndarray, selector: LassoSelector
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L1 logistic regression at every ``lambda = 1 / C``, screened by the strong rule.

    liblinear's cost grows with the columns it is given, and most columns stay at zero along
    the path. So each penalty is fitted on the columns the sequential strong rule (Tibshirani
    et al. 2012, as in glmnet) keeps, those whose log-likelihood gradient at the previous
    penalty's solution reaches ``2 lambda_k - lambda_(k-1)``, and the previous non-zero ones.
    Columns that then violate the optimality condition ``|x_j'(y - p)| <= lambda`` are added
    and the penalty refitted, so the solution is that of the unscreened problem.

    Returns:
        coefficients ``(n_lambdas, n_features)``, intercepts and solver iterations.
    """
    coefs = np.zeros((lambdas.size, X.shape[1]))
    intercepts = np.zeros(lambdas.size)
    n_iter = np.zeros(lambdas.size, dtype=int)
    gradient = np.abs(X.T @ (y - 0.5))  # at the empty model, where the path starts
    previous, active = lambdas[0], np.zeros(X.shape[1], dtype=bool)
    for i, lam in enumerate(lambdas):
        keep = active | (gradient >= 2 * lam - previous)
        keep[np.argmax(gradient)] = True  # liblinear needs a column
        while True:
            model = LogisticRegression(
                C=1 / lam,
                l1_ratio=1.0,
                solver="liblinear",
                max_iter=selector.max_iter,
                tol=selector.tol,
                random_state=selector.random_state,
            ).fit(X[:, keep], y)
            coefs[i, keep] = model.coef_[0]
            eta = X[:, keep] @ model.coef_[0] + model.intercept_[0]
            gradient = np.abs(X.T @ (y - expit(eta)))
            violators = ~keep & (gradient > lam)
            if not violators.any():
                break
            keep |= violators
        intercepts[i], n_iter[i] = model.intercept_[0], model.n_iter_[0]
        previous, active = lam, coefs[i] != 0
    return coefs, intercepts, n_iter


def _lasso_path(
    X: np.ndarray, y: np.ndarray, lambdas: np.ndarray, selector: LassoSelector
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares LASSO at every ``lambda = alpha``, like :func:`_logistic_path`.

    LARS with the LASSO modification follows the exact solution path, which is piecewise
    linear in ``alpha`` between the knots where a column enters or leaves; reading it at the
    grid by linear interpolation is therefore exact (``LassoLarsCV`` does the same). With
    ``p >> n`` it reaches the smallest penalty in about ``n`` steps, where coordinate descent
    stalls on correlated columns at small penalties.

    Returns:
        coefficients, intercepts and, per penalty, the LARS steps taken to reach it.
    """
    x_mean, y_mean = X.mean(axis=0), y.mean()
    # lars_path fits no intercept: centring gives the same solution as fitting one.
    knots, _, path, n_steps = lars_path(
        X - x_mean,
        y - y_mean,
        Gram="auto",
        method="lasso",
        alpha_min=lambdas[-1],
        max_iter=selector.max_iter,
        return_n_iter=True,
    )
    if knots[-1] > lambdas[-1] and n_steps >= selector.max_iter:
        msg = f"LARS stopped at max_iter={selector.max_iter} steps above lambda={lambdas[-1]:.3g}"
        warnings.warn(msg, ConvergenceWarning, stacklevel=2)
    coefs = np.zeros((lambdas.size, X.shape[1]))
    # np.interp wants increasing knots; beyond the path's last knot the solution is held.
    for j in np.flatnonzero(path.any(axis=1)):
        coefs[:, j] = np.interp(lambdas, knots[::-1], path[j, ::-1])
    steps = (knots[None, :] > lambdas[:, None]).sum(axis=1)
    return coefs, y_mean - coefs @ x_mean, steps


def _logistic_lambda_max(X: np.ndarray, y: np.ndarray) -> float:
    """Smallest ``1 / C`` at which liblinear's L1 logistic keeps no feature (``l1_min_c``)."""
    return float(np.abs((2 * y - 1) @ X).max() / 2)


def _lasso_lambda_max(X: np.ndarray, y: np.ndarray) -> float:
    """Smallest ``alpha`` at which the least-squares LASSO keeps no feature."""
    return float(np.abs((X - X.mean(axis=0)).T @ (y - y.mean())).max() / X.shape[0])


def _logistic_score(y: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Mean Bernoulli log-likelihood of each column of linear predictors (= -log loss)."""
    return (y[:, None] * eta - np.logaddexp(0, eta)).mean(axis=0)


def _lasso_score(y: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Negative mean squared error of each column of predictions."""
    return -((y[:, None] - eta) ** 2).mean(axis=0)


_PATHS = {
    "logistic": (_logistic_lambda_max, _logistic_path, _logistic_score),
    "lasso": (_lasso_lambda_max, _lasso_path, _lasso_score),
}


class LassoSelector(_SupervisedSelector):
    """Keep the columns with a non-zero LASSO coefficient at the cross-validated penalty.

    The penalty grid has ``n_lambdas`` values from ``lambda_max`` (the smallest penalty that
    keeps no feature) down to ``lambda_max / lambda_ratio``, as in glmnet. Stratified K-fold CV
    scores every penalty: mean log-likelihood for ``estimator="logistic"`` (L1 logistic
    regression, liblinear, ``lambda = 1 / C``), negative MSE for ``estimator="lasso"``
    (least squares on the 0/1 label, ``lambda = alpha``; the paper's ``LassoCV``, its exact
    path computed by LARS and read at the grid). The chosen
    penalty is ``lambda_min`` (best mean CV score) or, with ``one_se_rule``, ``lambda_1se``
    (the largest penalty whose mean score is within one standard error of the best). The
    final model is refitted on all the data given to :meth:`fit`.

    When that model keeps no feature, the single column with the largest ``|AUC - 0.5|``
    (its univariate ROC AUC, see :func:`univariate_auc`) is kept, its ``coef_`` is 0, and
    ``fallback_`` is True, with a :class:`SelectionFallbackWarning`.

    Args:
        estimator: ``"logistic"`` or ``"lasso"``.
        cv: number of stratified folds.
        one_se_rule: choose ``lambda_1se`` instead of ``lambda_min``.
        n_lambdas: number of penalties on the grid.
        lambda_ratio: ``lambda_max / lambda_min`` of the grid (>= 1).
        max_iter: solver iteration limit (liblinear iterations; LARS steps for ``"lasso"``).
        tol: liblinear's tolerance (``"logistic"`` only: the LARS path is exact).
        random_state: seeds the CV shuffle and liblinear.

    Attributes:
        selected_features_: names of the kept columns.
        coef_: coefficients of the kept columns at the chosen penalty.
        lambda_: the chosen penalty; ``lambda_min_`` and ``lambda_1se_`` are both stored.
        n_iter_: solver iterations (LARS steps) of the final fit at ``lambda_``.
        lambdas_: the penalty grid, decreasing.
        coef_path_: ``(n_lambdas, n_features_in_)`` coefficients fitted on all the data.
        cv_curve_: DataFrame with ``lambda``, ``score_mean``, ``score_se`` (over folds) and
            ``n_nonzero`` (mean over folds), one row per penalty: the LASSO-path figure.
    """

    def __init__(
        self,
        *,
        estimator: str = "logistic",
        cv: int = 5,
        one_se_rule: bool = False,
        n_lambdas: int = 20,
        lambda_ratio: float = 100.0,
        max_iter: int = 1000,
        tol: float = 1e-4,
        random_state: int | None = None,
    ) -> None:
        self.estimator = estimator
        self.cv = cv
        self.one_se_rule = one_se_rule
        self.n_lambdas = n_lambdas
        self.lambda_ratio = lambda_ratio
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    def fit(self, X, y) -> LassoSelector:
        """Cross-validate the penalty, refit on all the data and keep the non-zero columns.

        Args:
            X: ``(n_samples, n_features)`` values without NaN, ideally standardised.
            y: binary labels.
        """
        _check_option("estimator", self.estimator, _LASSO_ESTIMATORS)
        if self.lambda_ratio < 1:
            msg = f"lambda_ratio must be >= 1, got {self.lambda_ratio}"
            raise ValueError(msg)
        X, y = self._validate_xy(X, y)
        lambda_max, fit_path, score = _PATHS[self.estimator]
        # Any positive grid gives the empty model when no column varies with the label.
        top = lambda_max(X, y) or 1.0
        self.lambdas_ = np.geomspace(top, top / self.lambda_ratio, self.n_lambdas)

        folds = StratifiedKFold(self.cv, shuffle=True, random_state=self.random_state)
        scores = np.empty((self.cv, self.n_lambdas))
        n_nonzero = np.empty((self.cv, self.n_lambdas))
        for k, (train, test) in enumerate(folds.split(X, y)):
            coefs, intercepts, _ = fit_path(X[train], y[train], self.lambdas_, self)
            scores[k] = score(y[test], X[test] @ coefs.T + intercepts)
            n_nonzero[k] = (coefs != 0).sum(axis=1)
        mean = scores.mean(axis=0)
        se = scores.std(axis=0, ddof=1) / np.sqrt(self.cv)
        best = int(np.argmax(mean))
        # The grid decreases, so the first index within one SE is the largest such penalty.
        one_se = int(np.argmax(mean >= mean[best] - se[best]))
        self.lambda_min_, self.lambda_1se_ = self.lambdas_[best], self.lambdas_[one_se]
        chosen = one_se if self.one_se_rule else best
        self.lambda_ = self.lambdas_[chosen]
        self.cv_curve_ = pd.DataFrame(
            {
                "lambda": self.lambdas_,
                "score_mean": mean,
                "score_se": se,
                "n_nonzero": n_nonzero.mean(axis=0),
            }
        )

        self.coef_path_, _, n_iter = fit_path(X, y, self.lambdas_, self)
        self.n_iter_ = int(n_iter[chosen])
        coef = self.coef_path_[chosen]
        auc_distance = np.abs(univariate_auc(X, y) - 0.5)
        self._set_support(coef != 0, auc_distance)
        self.coef_ = coef[self.support_]
        return self
