"""Paper-style tables: metrics with CIs, baseline characteristics, odds ratios, screening."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder

from pdl1exp.evaluation.statistics import METRICS

__all__ = [
    "METRIC_LABELS",
    "baseline_table",
    "fit_logistic",
    "format_p",
    "logistic_terms",
    "metrics_numeric",
    "metrics_table",
    "odds_ratio_table",
    "univariate_screen",
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
_INTERCEPT = "(Intercept)"
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
    table = pd.DataFrame({
        "Model": wide.index.get_level_values("model"),
        "Split": wide.index.get_level_values("split"),
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


def _levels(values: pd.Series) -> list[object]:
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
            rows += _categorical_rows(name, parts, _levels(table[name]))
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


def logistic_terms(
    pipeline: Pipeline, *, numeric: Sequence[str], categorical: Sequence[str]
) -> pd.DataFrame:
    """The design columns of a fitted clinical pipeline: ``term``, ``variable``, ``level``
    (None for numeric) and ``coef``, in design order.

    Args:
        pipeline: fitted ``clinical_pipeline`` (steps ``columns`` → ``classifier``).
        numeric: its numeric variables.
        categorical: its categorical variables.
    """
    columns = pipeline.named_steps["columns"]
    fitted = {name: (transformer, list(cols)) for name, transformer, cols in columns.transformers_}
    for name, cols in (("numeric", list(numeric)), ("categorical", list(categorical))):
        found = fitted[name][1] if name in fitted else []
        if found != cols:
            msg = f"{name} columns {cols} differ from the pipeline's {found}"
            raise ValueError(msg)
    variables: list[str] = list(numeric)
    levels: list[object] = [None] * len(numeric)
    if categorical:
        encoder = fitted["categorical"][0][-1]
        if not isinstance(encoder, OneHotEncoder):
            msg = f"categorical columns must be one-hot encoded, got {type(encoder).__name__}"
            raise TypeError(msg)
        drops = encoder.drop_idx_ if encoder.drop_idx_ is not None else [None] * len(categorical)
        for name, categories, drop in zip(categorical, encoder.categories_, drops, strict=True):
            kept = [c for k, c in enumerate(categories) if drop is None or k != drop]
            variables += [name] * len(kept)
            levels += kept
    coef = pipeline.named_steps["classifier"].coef_[0]
    terms = columns.get_feature_names_out()
    if not len(terms) == len(variables) == coef.size:
        msg = (f"cannot map the {coef.size} coefficients onto the {len(variables)} design "
               "columns expected from the variables")
        raise ValueError(msg)
    return pd.DataFrame({"term": terms, "variable": variables, "level": levels, "coef": coef})


def _wald(design: np.ndarray, beta: np.ndarray, level: float) -> pd.DataFrame:
    """Wald SE, CI and p of logistic coefficients ``beta`` (intercept first) from the inverse
    of the Fisher information ``D' W D`` of the design with a leading column of ones."""
    d = np.column_stack([np.ones(len(design)), design])
    p = expit(d @ beta)
    information = d.T @ (d * (p * (1 - p))[:, None])
    se = np.sqrt(np.diag(np.linalg.pinv(information)))
    z = stats.norm.ppf((1 + level) / 2)
    return pd.DataFrame({
        "coef": beta, "se": se, "odds_ratio": np.exp(beta),
        "ci_lower": np.exp(beta - z * se), "ci_upper": np.exp(beta + z * se),
        "p": 2 * stats.norm.sf(np.abs(beta / se)),
    })


def odds_ratio_table(
    pipeline: Pipeline,
    X_train: pd.DataFrame,
    *,
    numeric: Sequence[str],
    categorical: Sequence[str],
    level: float = 0.95,
) -> pd.DataFrame:
    """Coefficients, odds ratios, Wald CIs and p-values of a fitted clinical logistic model.

    The covariance is the inverse Fisher information of the fitted model on its transformed
    training design (logistic link: observed = expected information, so the labels are not
    needed). Numeric variables are standardised by the pipeline: their OR is per SD.

    Args:
        pipeline: fitted ``clinical_pipeline``.
        X_train: the data it was fitted on.
        numeric: its numeric variables.
        categorical: its categorical variables.
        level: confidence level of the CIs.
    """
    terms = logistic_terms(pipeline, numeric=numeric, categorical=categorical)
    design = np.asarray(pipeline.named_steps["columns"].transform(X_train), dtype=float)
    intercept = pipeline.named_steps["classifier"].intercept_[0]
    wald = _wald(design, np.r_[intercept, terms["coef"].to_numpy()], level)
    head = pd.concat([
        pd.DataFrame({"term": [_INTERCEPT], "variable": [_INTERCEPT], "level": [None]}),
        terms[["term", "variable", "level"]],
    ], ignore_index=True)
    return pd.concat([head, wald], axis=1)


def fit_logistic(design: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Unpenalised logistic MLE: coefficients (intercept first) and log-likelihood."""
    if design.shape[1] == 0:
        mean = y.mean()
        beta = np.array([np.log(mean / (1 - mean))])
    else:
        model = LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-10,
                                   max_iter=1000).fit(design, y)
        beta = np.r_[model.intercept_, model.coef_[0]]
    eta = beta[0] + design @ beta[1:]
    return beta, float((y * eta - np.logaddexp(0, eta)).sum())


def univariate_screen(
    X: pd.DataFrame,
    y: np.ndarray,
    *,
    numeric: Sequence[str],
    categorical: Sequence[str],
    p_threshold: float,
    level: float = 0.95,
) -> pd.DataFrame:
    """The paper's univariate clinical screening: one logistic regression per variable.

    Each variable is tested by the likelihood-ratio test against the intercept-only model on
    the same patients (those with the variable present). Numeric variables are standardised
    (OR per SD); categorical ones are dummy-coded against their first level (OR per level).
    Returns one row per term: ``variable``, ``term``, ``n``, ``odds_ratio``, ``ci_lower``,
    ``ci_upper`` (Wald), ``p`` (the variable's LR p-value) and ``selected`` (``p <
    p_threshold``).

    Args:
        X: one row per patient.
        y: 0/1 labels.
        numeric: numeric variables.
        categorical: categorical variables.
        p_threshold: variables with a likelihood-ratio p below it are selected.
        level: confidence level of the Wald CIs.
    """
    labels = np.asarray(y, dtype=float)
    rows = []
    for name in [*numeric, *categorical]:
        present = X[name].notna().to_numpy()
        values = X.loc[present, name]
        if name in numeric:
            v = values.to_numpy(dtype=float)
            sd = v.std(ddof=1)
            design = ((v - v.mean()) / sd)[:, None] if sd > 0 else np.empty((v.size, 0))
            terms = [f"{name} (per SD)"] if sd > 0 else []
        else:
            levels = _levels(values)
            dummies = pd.get_dummies(pd.Categorical(values, categories=levels), drop_first=True)
            design = dummies.to_numpy(dtype=float)
            terms = [f"{name}={lv} (vs {levels[0]})" for lv in levels[1:]]
        target = labels[present]
        if not terms:
            # A constant variable cannot be tested.
            rows.append({"variable": name, "term": name, "n": int(present.sum()),
                         "odds_ratio": np.nan, "ci_lower": np.nan, "ci_upper": np.nan,
                         "p": np.nan, "selected": False})
            continue
        beta, loglik = fit_logistic(design, target)
        _, null_loglik = fit_logistic(np.empty((target.size, 0)), target)
        p = float(stats.chi2.sf(2 * (loglik - null_loglik), design.shape[1]))
        wald = _wald(design, beta, level).iloc[1:]
        for term, (_, w) in zip(terms, wald.iterrows(), strict=True):
            rows.append({"variable": name, "term": term, "n": int(present.sum()),
                         "odds_ratio": w["odds_ratio"], "ci_lower": w["ci_lower"],
                         "ci_upper": w["ci_upper"], "p": p, "selected": p < p_threshold})
    return pd.DataFrame(rows, columns=["variable", "term", "n", "odds_ratio", "ci_lower",
                                       "ci_upper", "p", "selected"])
