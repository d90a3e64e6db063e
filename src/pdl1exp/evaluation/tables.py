"""Paper-style tables: metrics with CIs and baseline characteristics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from pdl1exp.evaluation.statistics import METRICS

__all__ = [
    "METRIC_LABELS",
    "baseline_table",
    "category_levels",
    "format_p",
    "metrics_numeric",
    "metrics_table",
]

METRIC_LABELS = {
    "auc": "AUC",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "accuracy": "Accuracy",
    "ppv": "PPV",
    "npv": "NPV",
    "f1": "F1",
    "brier": "Brier",
}
_AUC_CI = ("delong", "bootstrap")
# DESIGN.md split names, in reading order; external cohorts follow, by center.
_SPLIT_ORDER = ("train", "cv", "test")
# Shapiro-Wilk needs three observations.
_SHAPIRO_MIN_N = 3
_TWO_BY_TWO = (2, 2)


def format_p(p: float, *, digits: int = 3) -> str:
    """A p-value as printed in papers: ``<0.001`` below the last digit, ``n/a`` when undefined.

    Args:
        p: the p-value.
        digits: decimals shown.
    """
    if not np.isfinite(p):
        return "n/a"
    smallest = 10.0**-digits
    return f"<{smallest:.{digits}f}" if p < smallest else f"{p:.{digits}f}"


def _estimate_ci(estimate: float, lower: float, upper: float, digits: int) -> str:
    """``0.85 (0.82–0.88)``; missing parts as ``n/a``."""
    if not np.isfinite(estimate):
        return "n/a"
    if not (np.isfinite(lower) and np.isfinite(upper)):
        return f"{estimate:.{digits}f} (n/a)"
    return f"{estimate:.{digits}f} ({lower:.{digits}f}–{upper:.{digits}f})"


# ---------------------------------------------------------------------------------------------
# metrics


def metrics_numeric(metrics: pd.DataFrame, *, auc_ci: str = "delong") -> pd.DataFrame:
    """Wide numeric metrics: one row per (model, split), ``{metric}``, ``{metric}_ci_lower``,
    ``{metric}_ci_upper`` columns in :data:`METRICS` order.

    Models keep their order of first appearance; splits run train, cv, test, then external
    cohorts alphabetically.

    Args:
        metrics: long rows with ``feature_set``, ``classifier``, ``split``, ``n``, ``metric``,
            ``estimate``, ``ci_lower``, ``ci_upper`` (the pipeline's ``metrics.csv``).
        auc_ci: ``"delong"`` (the ``auc_delong`` rows where a model and split has them, else
            the bootstrap ``auc``) or ``"bootstrap"``.
    """
    if auc_ci not in _AUC_CI:
        msg = f"auc_ci={auc_ci!r} is not one of {_AUC_CI}"
        raise ValueError(msg)
    required = {"feature_set", "classifier", "split", "n", "metric", "estimate", "ci_lower",
                "ci_upper"}
    missing = required - set(metrics.columns)
    if missing:
        msg = f"metrics is missing the column(s) {sorted(missing)}"
        raise ValueError(msg)
    rows = metrics.assign(model=metrics["feature_set"] + "/" + metrics["classifier"])
    if auc_ci == "delong":
        # The DeLong AUC replaces the bootstrap one wherever a (model, split) has it.
        key = pd.MultiIndex.from_frame(rows[["model", "split"]])
        with_delong = key[rows["metric"].eq("auc_delong").to_numpy()]
        bootstrap = rows["metric"].eq("auc").to_numpy() & key.isin(with_delong)
        rows = rows[~bootstrap].assign(metric=rows["metric"].replace({"auc_delong": "auc"}))
    rows = rows[rows["metric"].isin(METRICS)]
    wide = rows.set_index(["model", "split", "metric"])[
        ["estimate", "ci_lower", "ci_upper"]].unstack("metric")
    n = rows.groupby(["model", "split"])["n"].first()
    columns = {"n": n}
    for metric in (m for m in METRICS if m in wide["estimate"].columns):
        columns[metric] = wide["estimate"][metric]
        columns[f"{metric}_ci_lower"] = wide["ci_lower"][metric]
        columns[f"{metric}_ci_upper"] = wide["ci_upper"][metric]
    table = pd.DataFrame(columns)
    model_rank = {m: i for i, m in enumerate(pd.unique(rows["model"]))}
    split_rank = {s: (_SPLIT_ORDER.index(s), s) if s in _SPLIT_ORDER else (len(_SPLIT_ORDER), s)
                  for s in table.index.get_level_values("split")}
    order = sorted(table.index, key=lambda key: (model_rank[key[0]], split_rank[key[1]]))
    return table.loc[order]


def metrics_table(
    metrics: pd.DataFrame, *, level: float = 0.95, digits: int = 2, auc_ci: str = "delong"
) -> pd.DataFrame:
    """The paper's performance table: ``Model``, ``Split``, ``n`` and one
    ``"AUC (95% CI)"``-style text column per metric, e.g. ``0.85 (0.82–0.88)``.

    The numbers behind it come from :func:`metrics_numeric`.

    Args:
        metrics: long rows as for :func:`metrics_numeric`.
        level: confidence level the CIs were computed at (for the headers).
        digits: decimals shown.
        auc_ci: ``"delong"`` or ``"bootstrap"`` AUC interval.
    """
    wide = metrics_numeric(metrics, auc_ci=auc_ci)
    splits = wide.index.get_level_values("split")
    table = pd.DataFrame({
        "Model": wide.index.get_level_values("model"),
        # Out-of-fold AUCs on the folds the model was tuned or chosen on are optimistic.
        "Split": np.where(splits == "cv", "tuning CV (optimistic)", splits),
        "n": wide["n"].astype(int).to_numpy(),
    })
    for metric in (m for m in METRICS if m in wide.columns):
        table[f"{METRIC_LABELS[metric]} ({level:.0%} CI)"] = [
            _estimate_ci(e, lo, hi, digits) for e, lo, hi in zip(
                wide[metric], wide[f"{metric}_ci_lower"], wide[f"{metric}_ci_upper"],
                strict=True)
        ]
    return table


# ---------------------------------------------------------------------------------------------
# baseline characteristics


def _two_groups(table: pd.DataFrame, group: str) -> tuple[list[object], pd.Series]:
    if group not in table.columns:
        msg = f"group column {group!r} is not in the table"
        raise ValueError(msg)
    g = table[group]
    if g.isna().any():
        msg = f"group column {group!r} has {int(g.isna().sum())} missing value(s); drop them"
        raise ValueError(msg)
    levels = sorted(pd.unique(g).tolist(), key=str)
    if len(levels) != 2:
        msg = f"group column {group!r} must have exactly 2 levels, found {levels}"
        raise ValueError(msg)
    return levels, g


def _is_normal(values: np.ndarray, alpha: float) -> bool:
    if values.size < _SHAPIRO_MIN_N or np.ptp(values) == 0:
        return False
    return bool(stats.shapiro(values).pvalue > alpha)


def _numeric_rows(name: str, parts: list[pd.Series], alpha: float,
                  digits: int) -> list[dict[str, object]]:
    """One summary row (and the p-value) for a numeric variable."""
    values = [p.dropna().to_numpy(dtype=float) for p in parts]
    if all(_is_normal(v, alpha) for v in values):
        summary, test = "mean ± SD", "Welch t-test"
        cells = [f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}" for v in values]
        p = stats.ttest_ind(*values, equal_var=False).pvalue
    else:
        summary, test = "median [IQR]", "Mann-Whitney U"
        quartiles = [np.percentile(v, [25, 50, 75]) if v.size else np.full(3, np.nan)
                     for v in values]
        cells = [f"{q[1]:.{digits}f} [{q[0]:.{digits}f}–{q[2]:.{digits}f}]" for q in quartiles]
        p = (stats.mannwhitneyu(*values).pvalue if all(v.size for v in values) else np.nan)
    return [{"Variable": name, "Level": summary, "cells": cells, "p": float(p), "Test": test}]


def _categorical_rows(name: str, parts: list[pd.Series],
                      levels: Sequence[object]) -> list[dict[str, object]]:
    """A header row with the p-value, then n (%) per level."""
    counts = np.array([[int((p == level).sum()) for p in parts] for level in levels])
    observed = counts[counts.sum(axis=1) > 0]
    totals = counts.sum(axis=0)
    if observed.shape[0] < 2 or (observed.sum(axis=0) == 0).any():
        p, test = np.nan, "n/a"
    else:
        expected = stats.contingency.expected_freq(observed)
        if observed.shape == _TWO_BY_TWO and (expected < 5).any():
            p, test = stats.fisher_exact(observed).pvalue, "Fisher exact"
        else:
            p, test = stats.chi2_contingency(observed).pvalue, "Chi-square"
    rows: list[dict[str, object]] = [
        {"Variable": name, "Level": "n (%)", "cells": ["", ""], "p": float(p), "Test": test}
    ]
    for level, row in zip(levels, counts, strict=True):
        cells = [f"{c} ({100 * c / t:.1f}%)" if t else "0" for c, t in zip(row, totals,
                                                                           strict=True)]
        rows.append({"Variable": name, "Level": str(level), "cells": cells, "p": np.nan,
                     "Test": ""})
    return rows


def category_levels(values: pd.Series) -> list[object]:
    """The levels of a categorical variable: declared categories, else sorted values."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        return list(values.cat.categories)
    return sorted(pd.unique(values.dropna()).tolist(), key=str)


def baseline_table(
    table: pd.DataFrame,
    *,
    group: str,
    numeric: Sequence[str],
    categorical: Sequence[str],
    normality_alpha: float = 0.05,
    digits: int = 1,
) -> pd.DataFrame:
    """The paper's Table 1: characteristics of two groups (train/test, or PD-L1 −/+).

    Numeric: mean ± SD and Welch's t-test when both groups pass Shapiro-Wilk
    (``p > normality_alpha``), else median [IQR] and the Mann-Whitney U test. Categorical:
    n (%) of the non-missing per level; chi-square test (Yates-corrected for 2×2), Fisher's
    exact test for a 2×2 table with an expected count below 5. A ``missing`` row follows each
    variable with missing values. Columns: ``Variable``, ``Level``, one per group
    (``"<level> (n=<count>)"``), ``p`` (float, on the variable's first row) and ``Test``.

    Args:
        table: one row per patient.
        group: column with exactly two levels and no missing value.
        numeric: numeric variables.
        categorical: categorical variables.
        normality_alpha: Shapiro-Wilk level below which a group is taken as non-normal.
        digits: decimals of the summaries.
    """
    levels, g = _two_groups(table, group)
    headers = [f"{level} (n={int((g == level).sum())})" for level in levels]
    rows: list[dict[str, object]] = []
    for name in [*numeric, *categorical]:
        if name not in table.columns:
            msg = f"baseline_table: variable {name!r} is not in the table"
            raise ValueError(msg)
        parts = [table.loc[g == level, name] for level in levels]
        if name in numeric:
            rows += _numeric_rows(name, parts, normality_alpha, digits)
        else:
            rows += _categorical_rows(name, parts, category_levels(table[name]))
        n_missing = [int(p.isna().sum()) for p in parts]
        if any(n_missing):
            cells = [f"{m} ({100 * m / p.size:.1f}%)" for m, p in zip(n_missing, parts,
                                                                        strict=True)]
            rows.append({"Variable": name, "Level": "missing", "cells": cells, "p": np.nan,
                         "Test": ""})
    out = pd.DataFrame(rows, columns=["Variable", "Level", "cells", "p", "Test"])
    cells = pd.DataFrame(out.pop("cells").tolist(), columns=headers, index=out.index)
    return pd.concat([out[["Variable", "Level"]], cells, out[["p", "Test"]]], axis=1)


# ---------------------------------------------------------------------------------------------
# logistic models
