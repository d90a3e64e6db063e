"""Binary-classifier statistics in numpy/scipy, matching R pROC and ResourceSelection.

One module on purpose (longer than most): every function shares one validated input and the
grouped-count representation of tied scores that makes the bootstrap, DeLong and the ROC band
exact (pROC's) and vectorised over resamples.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import statsmodels.api as sm
from numpy.typing import ArrayLike, NDArray
from scipy import stats
from scipy.special import logit

__all__ = [
    "METRICS",
    "BootstrapCI",
    "bootstrap_ci",
    "bootstrap_cis",
    "calibration_intercept_slope",
    "check_scores",
    "delong_ci",
    "delong_test",
    "delong_test_unpaired",
    "hosmer_lemeshow",
    "metric_value",
    "net_benefit",
    "net_benefit_treat_all",
    "roc_band",
    "youden_threshold",
]

METRICS = ("auc", "sensitivity", "specificity", "accuracy", "ppv", "npv", "f1", "brier")
_THRESHOLD_METRICS = frozenset(METRICS) - {"auc", "brier"}
# pROC halves both neighbours before adding once a midpoint exceeds this, to avoid overflow.
_PROC_HALVING_LIMIT = 1e100

FloatArray = NDArray[np.float64]
CountArray = NDArray[np.int64]
MetricFn = Callable[[NDArray[Any], FloatArray], float]


class BootstrapCI(tuple):
    """Bootstrap result ``(estimate, lower, upper)`` that also carries ``n_undefined``.

    Unpacks as exactly three floats (``est, lo, hi = bootstrap_ci(...)``); ``n_undefined``
    counts the resamples where the metric was undefined.
    """

    n_undefined: int

    def __new__(cls, estimate: float, lower: float, upper: float, *, n_undefined: int = 0):
        self = super().__new__(cls, (float(estimate), float(lower), float(upper)))
        self.n_undefined = int(n_undefined)
        return self

    def __getnewargs_ex__(self) -> tuple[tuple[float, ...], dict[str, int]]:
        return tuple(self), {"n_undefined": self.n_undefined}

    def __repr__(self) -> str:
        est, lower, upper = self
        return (
            f"BootstrapCI(estimate={est!r}, lower={lower!r}, upper={upper!r}, "
            f"n_undefined={self.n_undefined})"
        )


# ---------------------------------------------------------------------------------------------
# validation


def check_scores(
    y_true: ArrayLike, *scores: ArrayLike, names: tuple[str, ...], probability: bool = False
) -> tuple[NDArray[np.bool_], list[FloatArray]]:
    """Binary labels as bool, scores as float; ValueError naming what is wrong."""
    y = np.asarray(y_true)
    if y.ndim != 1 or y.size == 0:
        msg = f"y_true must be a non-empty 1-D array, got shape {y.shape}"
        raise ValueError(msg)
    if y.dtype != np.bool_:
        if not (np.issubdtype(y.dtype, np.number) and np.isin(y, (0, 1)).all()):
            found = np.unique(y.astype(str))[:5].tolist()
            msg = f"y_true must hold only 0/1 (or bool) labels, found values such as {found}"
            raise ValueError(msg)
        y = y == 1
    if y.all() or not y.any():
        msg = f"y_true holds one class only ({int(y[0])}); both 0 and 1 are needed"
        raise ValueError(msg)
    checked = []
    for name, score in zip(names, scores, strict=True):
        try:
            s = np.asarray(score, dtype=float)
        except (TypeError, ValueError) as err:
            msg = f"{name} must be numeric: {err}"
            raise ValueError(msg) from err
        if s.shape != y.shape:
            msg = f"{name} has shape {s.shape} but y_true has shape {y.shape}"
            raise ValueError(msg)
        n_nan = int(np.isnan(s).sum())
        if n_nan:
            msg = f"{name} contains {n_nan} NaN value(s); impute or drop them first"
            raise ValueError(msg)
        if probability and ((s < 0).any() or (s > 1).any()):
            msg = f"{name} must be probabilities in [0, 1], got range [{s.min()}, {s.max()}]"
            raise ValueError(msg)
        checked.append(s)
    return y, checked


def _check_level(level: float) -> float:
    if not 0 < level < 1:
        msg = f"level must be in (0, 1), got {level}"
        raise ValueError(msg)
    return float(level)


def _check_thresholds(thresholds: ArrayLike) -> FloatArray:
    pt = np.atleast_1d(np.asarray(thresholds, dtype=float))
    if pt.ndim != 1 or not ((pt >= 0) & (pt < 1)).all():
        msg = f"thresholds must be a 1-D array of probabilities in [0, 1), got {thresholds!r}"
        raise ValueError(msg)
    return pt


def _check_metric(metric: str | MetricFn, threshold: float | None) -> None:
    if callable(metric):
        return
    if metric not in METRICS:
        msg = f"unknown metric {metric!r}; choose one of {METRICS} or pass a callable"
        raise ValueError(msg)
    if metric in _THRESHOLD_METRICS and threshold is None:
        msg = (
            f"metric {metric!r} needs a decision threshold (predict positive when "
            "score >= threshold); pass threshold=..., e.g. from youden_threshold()"
        )
        raise ValueError(msg)


# ---------------------------------------------------------------------------------------------
# one vectorised core: per-row counts of cells, for the sample (one row) or all resamples at once


def _row_counts(cell: NDArray[np.intp], n_cells: int, idx: NDArray[np.intp]) -> CountArray:
    """How many drawn observations fall in each cell, per row of ``idx``: ``(rows, n_cells)``."""
    rows = idx.shape[0]
    flat = (cell[idx] + n_cells * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n_cells).reshape(rows, n_cells)


def _grouped_counts(
    y: NDArray[np.bool_], score: FloatArray, idx: NDArray[np.intp]
) -> tuple[FloatArray, CountArray, CountArray]:
    """Distinct scores (ascending) and, per row of ``idx``, positives and negatives at each."""
    values, group = np.unique(score, return_inverse=True)
    d = values.size
    counts = _row_counts(group + d * y, 2 * d, idx).reshape(-1, 2, d)
    return values, counts[:, 1], counts[:, 0]


def _sample_counts(
    y: NDArray[np.bool_], score: FloatArray
) -> tuple[FloatArray, CountArray, CountArray]:
    """Grouped counts of the sample itself: a single row."""
    return _grouped_counts(y, score, _identity(y.size))


def _identity(n: int) -> NDArray[np.intp]:
    """The sample itself as a one-row index matrix."""
    return np.arange(n)[None, :]


def _at_or_above(counts: CountArray) -> CountArray:
    """Counts at or above each distinct score; one extra trailing 0 for "above every score"."""
    suffix = np.cumsum(counts[..., ::-1], axis=-1)[..., ::-1]
    return np.concatenate([suffix, np.zeros_like(counts[..., :1])], axis=-1)


def _ratio(num: NDArray[Any], den: NDArray[Any]) -> FloatArray:
    """num / den, NaN (undefined) where den is 0."""
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def _metric_rows(
    metric: str,
    y: NDArray[np.bool_],
    score: FloatArray,
    idx: NDArray[np.intp],
    threshold: float | None,
) -> FloatArray:
    """``metric`` on every row of the index matrix ``idx``; NaN where undefined."""
    if metric == "auc":
        _, pos, neg = _grouped_counts(y, score, idx)
        # Mann-Whitney: each positive counts the negatives strictly below it, ties 1/2; twice
        # that, 2 * below + tied = 2 * cumsum - tied, stays in exact integers.
        twice_u = np.einsum("ij,ij->i", pos, 2 * np.cumsum(neg, axis=1) - neg)
        return _ratio(twice_u / 2, pos.sum(axis=1) * neg.sum(axis=1))
    if metric == "brier":
        return ((score - y) ** 2)[idx].mean(axis=1)
    # One small int8 code per observation (bit 0: label, bit 1: predicted positive) keeps the
    # gathered (rows, n) matrix at one byte per draw; three counts give the confusion matrix.
    code = (y + 2 * (score >= threshold)).astype(np.int8)[idx]
    n_pos = np.count_nonzero(code & 1, axis=1)
    n_pred = np.count_nonzero(code & 2, axis=1)
    tp = np.count_nonzero(code == 3, axis=1)
    fn, fp = n_pos - tp, n_pred - tp
    tn = idx.shape[1] - n_pos - fp
    num, den = {
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
        "accuracy": (tp + tn, idx.shape[1]),
        "ppv": (tp, tp + fp),
        "npv": (tn, tn + fn),
        "f1": (2 * tp, 2 * tp + fp + fn),
    }[metric]
    return _ratio(num, np.broadcast_to(den, num.shape))


def _resample_indices(
    y: NDArray[np.bool_], n_boot: int, rng: np.random.Generator, *, stratified: bool
) -> NDArray[np.intp]:
    """All resamples as one ``(n_boot, n)`` index matrix.

    Stratified (as pROC): positives and negatives are drawn separately, so every resample keeps
    the class counts of the sample.
    """
    strata = [np.flatnonzero(y), np.flatnonzero(~y)] if stratified else [np.arange(y.size)]
    # A scalar upper bound per stratum keeps numpy's fast bounded-integer path.
    return np.hstack([s[rng.integers(0, s.size, size=(n_boot, s.size))] for s in strata])


# ---------------------------------------------------------------------------------------------
# public API


def metric_value(
    y_true: ArrayLike, y_score: ArrayLike, metric: str, *, threshold: float | None = None
) -> float:
    """One named metric of :data:`METRICS` on the sample; NaN where undefined.

    Args:
        y_true: 0/1 labels.
        y_score: scores, higher = more likely positive (probabilities for ``brier``).
        metric: a name from :data:`METRICS`.
        threshold: decision cut-off for the threshold metrics (positive when score >= it).
    """
    _check_metric(metric, threshold)
    y, (s,) = check_scores(y_true, y_score, names=("y_score",), probability=metric == "brier")
    return float(_metric_rows(metric, y, s, _identity(y.size), threshold)[0])


def bootstrap_ci(
    y_true: ArrayLike,
    y_score: ArrayLike,
    metric: str | MetricFn = "auc",
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    stratified: bool = True,
    threshold: float | None = None,
) -> BootstrapCI:
    """Percentile bootstrap CI of a metric: ``(estimate, lower, upper)`` plus ``n_undefined``.

    All resamples are drawn as one index matrix from ``np.random.default_rng(seed)`` and named
    metrics are computed for every resample at once. Resamples where the metric is undefined
    (NaN, e.g. ``ppv`` with no predicted positive) are left out of the interval, counted in
    ``n_undefined`` and reported with a warning.

    Args:
        y_true: 0/1 labels.
        y_score: scores, higher = more likely positive (probabilities for ``brier``).
        metric: a name from :data:`METRICS`, or ``f(y_true, y_score) -> float`` (run per resample).
        n_boot: number of resamples.
        level: confidence level of the two-sided interval.
        seed: seed of the resampling generator.
        stratified: resample positives and negatives separately (pROC's default).
        threshold: cut-off for the threshold metrics (positive when score >= threshold);
            ignored by ``auc`` and ``brier``.
    """
    return bootstrap_cis(y_true, y_score, [metric], n_boot=n_boot, level=level, seed=seed,
                         stratified=stratified, threshold=threshold)[0]


def bootstrap_cis(
    y_true: ArrayLike,
    y_score: ArrayLike,
    metrics: Sequence[str | MetricFn],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    stratified: bool = True,
    threshold: float | None = None,
) -> list[BootstrapCI]:
    """:func:`bootstrap_ci` of several metrics on the same resamples (one index matrix).

    Each result equals ``bootstrap_ci`` of that metric with the same seed; drawing the
    resamples once is what makes a full metrics table cheap.

    Args:
        y_true: 0/1 labels.
        y_score: scores (probabilities when ``brier`` is among the metrics).
        metrics: names from :data:`METRICS` or callables.
        n_boot: number of resamples.
        level: confidence level of the two-sided interval.
        seed: seed of the resampling generator.
        stratified: resample positives and negatives separately.
        threshold: cut-off of the threshold metrics.
    """
    for metric in metrics:
        _check_metric(metric, threshold)
    level = _check_level(level)
    if n_boot < 1:
        msg = f"n_boot must be >= 1, got {n_boot}"
        raise ValueError(msg)
    y, (s,) = check_scores(y_true, y_score, names=("y_score",), probability="brier" in metrics)
    idx = _resample_indices(y, n_boot, np.random.default_rng(seed), stratified=stratified)
    return [_percentile_interval(metric, y, s, idx, threshold, level) for metric in metrics]


def _percentile_interval(metric: str | MetricFn, y: NDArray[np.bool_], s: FloatArray,
                         idx: NDArray[np.intp], threshold: float | None,
                         level: float) -> BootstrapCI:
    """Estimate and percentile interval of one metric over the resamples ``idx``."""
    n_boot = idx.shape[0]
    if callable(metric):
        name = getattr(metric, "__name__", repr(metric))
        labels = y.astype(int)
        estimate = float(metric(labels, s))
        boot = np.array([metric(labels[row], s[row]) for row in idx], dtype=float)
    else:
        name = metric
        estimate = float(_metric_rows(metric, y, s, _identity(y.size), threshold)[0])
        boot = _metric_rows(metric, y, s, idx, threshold)
    undefined = np.isnan(boot)
    n_undefined = int(undefined.sum())
    if n_undefined:
        warnings.warn(
            f"bootstrap_ci: metric {name!r} was undefined in {n_undefined} of {n_boot} "
            "resamples; they are left out of the interval",
            RuntimeWarning,
            stacklevel=2,
        )
    if n_undefined == n_boot:
        lower = upper = np.nan
    else:
        alpha = (1.0 - level) / 2
        # numpy's default "linear" quantile is R's type 7, which pROC uses.
        lower, upper = np.quantile(boot[~undefined], [alpha, 1.0 - alpha])
    return BootstrapCI(estimate, lower, upper, n_undefined=n_undefined)


def _delong(y: NDArray[np.bool_], scores: list[FloatArray]) -> tuple[FloatArray, FloatArray]:
    """AUCs and their DeLong covariance matrix, fast midrank algorithm (Sun & Xu 2014)."""
    m, n = int(y.sum()), int((~y).sum())
    v10, v01 = [], []
    for s in scores:
        pos, neg = s[y], s[~y]
        # Midranks make ties count 1/2; rank in all minus rank within the class counts the other
        # class below (plus half the ties).
        combined = stats.rankdata(np.concatenate([pos, neg]))
        v10.append((combined[:m] - stats.rankdata(pos)) / n)
        v01.append(1.0 - (combined[m:] - stats.rankdata(neg)) / m)
    v10_arr, v01_arr = np.vstack(v10), np.vstack(v01)
    theta = v10_arr.mean(axis=1)
    cov = np.atleast_2d(np.cov(v10_arr)) / m + np.atleast_2d(np.cov(v01_arr)) / n
    return theta, cov


def _delong_defined(y: NDArray[np.bool_], caller: str) -> bool:
    """pROC returns NA when a class has one member (its variance needs n - 1 > 0)."""
    smallest = min(int(y.sum()), int((~y).sum()))
    if smallest >= 2:
        return True
    warnings.warn(
        f"{caller}: DeLong variance needs at least 2 positives and 2 negatives; returning NaN",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def delong_ci(
    y_true: ArrayLike, y_score: ArrayLike, level: float = 0.95
) -> tuple[float, float, float]:
    """AUC with DeLong CI ``(auc, lower, upper)``, as pROC ``ci.auc(method="delong")``.

    Direction is fixed (higher score = positive); an AUC below 0.5 is returned as is. The
    interval is clipped to [0, 1] as pROC does.

    Args:
        y_true: 0/1 labels.
        y_score: scores, higher = more likely positive.
        level: confidence level of the two-sided interval.
    """
    level = _check_level(level)
    y, scores = check_scores(y_true, y_score, names=("y_score",))
    if not _delong_defined(y, "delong_ci"):
        return float(_metric_rows("auc", y, scores[0], _identity(y.size), None)[0]), np.nan, np.nan
    theta, cov = _delong(y, scores)
    half = stats.norm.ppf(0.5 + level / 2) * np.sqrt(cov[0, 0])
    auc = float(theta[0])
    return auc, float(np.clip(auc - half, 0, 1)), float(np.clip(auc + half, 0, 1))


def delong_test(y_true: ArrayLike, score_a: ArrayLike, score_b: ArrayLike) -> tuple[float, float]:
    """Paired two-sided DeLong test of AUC(a) = AUC(b): ``(z, p)``, as pROC ``roc.test``.

    As in pROC, ``z = 0`` (``p = 1``) when both the difference and its standard error are 0.

    Args:
        y_true: 0/1 labels.
        score_a: scores of the first model on the same cases.
        score_b: scores of the second model.
    """
    y, scores = check_scores(y_true, score_a, score_b, names=("score_a", "score_b"))
    if not _delong_defined(y, "delong_test"):
        return np.nan, np.nan
    theta, cov = _delong(y, scores)
    diff = theta[0] - theta[1]
    sig = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if diff == 0 and sig == 0:
        return 0.0, 1.0
    with np.errstate(divide="ignore"):
        z = float(diff / sig)
    return z, float(2 * stats.norm.sf(abs(z)))


def delong_test_unpaired(y_a: ArrayLike, score_a: ArrayLike, y_b: ArrayLike,
                         score_b: ArrayLike) -> tuple[float, float]:
    """Unpaired two-sided DeLong test of AUC(a) = AUC(b) on different patients: ``(z, p)``,
    as pROC ``roc.test(paired = FALSE, method = "delong")``: ``z = (AUC_a - AUC_b) /
    sqrt(V_a + V_b)``.

    Args:
        y_a: 0/1 labels of the first model's patients.
        score_a: its scores.
        y_b: 0/1 labels of the second model's patients.
        score_b: its scores.
    """
    parts = []
    for name, labels, score in (("a", y_a, score_a), ("b", y_b, score_b)):
        y, scores = check_scores(labels, score, names=(f"score_{name}",))
        if not _delong_defined(y, "delong_test_unpaired"):
            return np.nan, np.nan
        theta, cov = _delong(y, scores)
        parts.append((theta[0], cov[0, 0]))
    (auc_a, var_a), (auc_b, var_b) = parts
    diff, sig = auc_a - auc_b, np.sqrt(var_a + var_b)
    if diff == 0 and sig == 0:
        return 0.0, 1.0
    with np.errstate(divide="ignore"):
        z = float(diff / sig)
    return z, float(2 * stats.norm.sf(abs(z)))


def youden_threshold(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Cut-off maximising sensitivity + specificity - 1; predict positive when score >= it.

    Candidates are pROC's: ``-inf``, the midpoints between adjacent distinct scores, ``+inf``
    (``-inf`` = all positive, ``+inf`` = none). If several cut-offs reach the maximum, pROC
    ``coords(roc, "best", best.method="youden")`` lists them all in ascending order; this
    returns the first, the lowest (most sensitive) one. Ties in the criterion are exact float
    equality of ``tp/P + tn/N``, computed as pROC does.

    Args:
        y_true: 0/1 labels.
        y_score: scores, higher = more likely positive.
    """
    y, (s,) = check_scores(y_true, y_score, names=("y_score",))
    values, pos, neg = _sample_counts(y, s)
    n_pos, n_neg = pos.sum(), neg.sum()
    # Candidate k predicts positive for scores >= values[k] (k = len(values): none).
    youden = _at_or_above(pos[0]) / n_pos + (n_neg - _at_or_above(neg[0])) / n_neg
    best = int(np.argmax(youden))  # first maximum = lowest cut-off
    lower = np.concatenate([[-np.inf], values])
    upper = np.concatenate([values, [np.inf]])
    mid = (lower + upper) / 2
    huge = np.abs(mid) > _PROC_HALVING_LIMIT
    mid[huge] = lower[huge] / 2 + upper[huge] / 2
    # A midpoint that rounds onto the lower score would wrongly include it; pROC moves it up.
    rounded = np.isin(mid, values) & (mid == lower)
    mid[rounded] = upper[rounded]
    return float(mid[best])


def hosmer_lemeshow(y_true: ArrayLike, y_prob: ArrayLike, groups: int = 10, *,
                    validation: bool = False) -> tuple[float, float]:
    """Hosmer-Lemeshow test ``(statistic, p_value)``, as R ``ResourceSelection::hoslem.test``.

    Groups are cut at the unique ``quantile(y_prob, seq(0, 1, 1/groups))`` (R type 7), intervals
    closed on the right and the lowest one closed on both sides; df = ``groups - 2`` even when
    ties leave fewer groups (as hoslem.test). On validation data (a model not fitted on these
    patients) df = ``groups``, as Hosmer and Lemeshow recommend for external samples. Where a
    group has an expected count of 0 (empty group, or probabilities all 0 or all 1) the
    statistic is undefined: NaN with a warning.

    Args:
        y_true: 0/1 labels.
        y_prob: predicted probabilities of the positive class.
        groups: number of quantile groups, at least 3.
        validation: the patients are validation data (df = groups).
    """
    if groups < 3:
        msg = f"groups must be >= 3 (df = groups - 2), got {groups}"
        raise ValueError(msg)
    y, (p,) = check_scores(y_true, y_prob, names=("y_prob",), probability=True)
    # R's seq(0, 1, by = 1/g) is from + (0:g) * by, capped at 1: same rounding here.
    probs = np.minimum(np.arange(groups + 1) * (1.0 / groups), 1.0)
    breaks = np.unique(np.quantile(p, probs))
    if breaks.size < 2:
        msg = "hosmer_lemeshow needs at least two distinct probabilities"
        raise ValueError(msg)
    k = breaks.size - 1
    group = np.clip(np.searchsorted(breaks, p, side="left") - 1, 0, None)
    size = np.bincount(group, minlength=k)
    observed = np.bincount(group, weights=y, minlength=k)
    expected = np.bincount(group, weights=p, minlength=k)
    obs = np.concatenate([size - observed, observed])
    exp = np.concatenate([size - expected, expected])
    if (exp <= 0).any():
        warnings.warn(
            "hosmer_lemeshow: a group has expected count 0 (empty, or all probabilities 0 or 1); "
            "statistic undefined, returning NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        return np.nan, np.nan
    statistic = float(((obs - exp) ** 2 / exp).sum())
    return statistic, float(stats.chi2.sf(statistic, groups if validation else groups - 2))


def net_benefit(y_true: ArrayLike, y_prob: ArrayLike, thresholds: ArrayLike) -> FloatArray:
    """Decision-curve net benefit ``TP/n - FP/n * pt/(1-pt)``, treating when prob >= pt.

    Args:
        y_true: 0/1 labels.
        y_prob: predicted probabilities of the positive class.
        thresholds: threshold probabilities ``pt`` in [0, 1).
    """
    pt = _check_thresholds(thresholds)
    y, (p,) = check_scores(y_true, y_prob, names=("y_prob",), probability=True)
    values, pos, neg = _sample_counts(y, p)
    cut = np.searchsorted(values, pt, side="left")
    tp, fp = _at_or_above(pos[0])[cut], _at_or_above(neg[0])[cut]
    return (tp - fp * pt / (1.0 - pt)) / y.size


def net_benefit_treat_all(y_true: ArrayLike, thresholds: ArrayLike) -> FloatArray:
    """Net benefit of treating everyone (treating no one is 0 at every threshold).

    Args:
        y_true: 0/1 labels.
        thresholds: threshold probabilities ``pt`` in [0, 1).
    """
    return net_benefit(y_true, np.ones(np.shape(y_true)), thresholds)


# ---------------------------------------------------------------------------------------------
# ROC band


def _sensitivity_at(
    y: NDArray[np.bool_], score: np.ndarray, idx: NDArray[np.intp], specificities: np.ndarray
) -> np.ndarray:
    """Best sensitivity at each specificity, per row of the resample matrix ``idx``.

    With ``k = ceil(sp * n_neg)`` negatives required below the cut-off, the best cut-off
    lies just above the k-th smallest negative: the ROC's upper staircase.
    """
    _, pos, neg = _grouped_counts(y, score, idx)
    rows, d = neg.shape
    n_neg, n_pos = neg[0].sum(), pos[0].sum()
    neg_below = np.cumsum(neg, axis=1)  # negatives at or below each distinct score
    pos_below = np.concatenate([np.zeros((rows, 1), dtype=int), np.cumsum(pos, axis=1)], axis=1)
    # Small tolerance so sp * n_neg landing on an integer is not pushed up by rounding.
    k = np.ceil(specificities * n_neg - 1e-9).astype(int)
    # Rows are non-decreasing in [0, n_neg]: offsetting each row makes one sorted vector, so
    # every (row, specificity) is found with a single searchsorted.
    offset = np.arange(rows)[:, None] * (n_neg + 1)
    first = np.searchsorted((neg_below + offset).ravel(), (k[None, :] + offset).ravel())
    j = first.reshape(rows, -1) - np.arange(rows)[:, None] * d
    # j = index of the k-th smallest negative; positives strictly above it are detected.
    above = n_pos - np.take_along_axis(pos_below, j + 1, axis=1)
    return np.where(k[None, :] == 0, n_pos, above) / n_pos


def roc_band(
    y_true: ArrayLike,
    y_score: ArrayLike,
    *,
    specificities: ArrayLike,
    n_boot: int,
    level: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise bootstrap band of sensitivity over a specificity grid (as pROC ``ci.se``).

    Positives and negatives are resampled separately (stratified); all resamples are evaluated
    at once. Returns ``(sensitivity, lower, upper)``, each the size of ``specificities``.

    Args:
        y_true: 0/1 labels.
        y_score: scores, higher = more likely positive.
        specificities: grid in [0, 1].
        n_boot: bootstrap resamples.
        level: confidence level of each pointwise interval.
        seed: resampling seed.
    """
    y, (s,) = check_scores(y_true, y_score, names=("y_score",))
    grid = np.asarray(specificities, dtype=float)
    if grid.ndim != 1 or ((grid < 0) | (grid > 1)).any():
        msg = f"specificities must be a 1-D grid in [0, 1], got {specificities!r}"
        raise ValueError(msg)
    if not 0 < level < 1 or n_boot < 1:
        msg = f"roc_band needs 0 < level < 1 and n_boot >= 1, got {level}, {n_boot}"
        raise ValueError(msg)
    estimate = _sensitivity_at(y, s, _identity(y.size), grid)[0]
    idx = _resample_indices(y, n_boot, np.random.default_rng(seed), stratified=True)
    boot = _sensitivity_at(y, s, idx, grid)
    lower, upper = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return estimate, lower, upper


def calibration_intercept_slope(y_true: ArrayLike, y_prob: ArrayLike, *,
                                level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """Logistic recalibration: calibration intercept (in the large) and slope with Wald CIs.

    The slope is ``b`` of ``logit P(y) = a + b logit(p)``; the intercept is ``a`` of
    ``logit P(y) = a + logit(p)`` (slope fixed at 1, as Van Calster et al. 2019). A
    well-calibrated model has intercept 0 and slope 1. Probabilities are clipped to
    ``[1e-8, 1 - 1e-8]`` before the logit.

    Args:
        y_true: 0/1 labels.
        y_prob: predicted probabilities of the positive class.
        level: confidence level.
    """
    y, (p,) = check_scores(y_true, y_prob, names=("y_prob",), probability=True)
    level = _check_level(level)
    lp = logit(np.clip(p, 1e-8, 1 - 1e-8))
    family = sm.families.Binomial()
    out = {}
    for name, design, offset in (("calibration_intercept", np.ones((y.size, 1)), lp),
                                 ("calibration_slope", sm.add_constant(lp), None)):
        fit = sm.GLM(y.astype(float), design, family=family, offset=offset).fit()
        lower, upper = fit.conf_int(alpha=1 - level)[-1]
        out[name] = (float(fit.params[-1]), float(lower), float(upper))
    return out
