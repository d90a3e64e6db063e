"""Logistic-model inference for the clinical and combined models: Wald tables, screening.

The unpenalised maximum-likelihood fit (as R's ``glm``) behind the odds-ratio table, the
univariable screening of the paper's clinical procedure and backward elimination by AIC.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from scipy.special import expit
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder

from pdl1exp.evaluation.tables import category_levels

__all__ = [
    "fit_logistic",
    "is_penalised",
    "logistic_terms",
    "numeric_design",
    "odds_ratio_table",
    "univariate_screen",
]

_INTERCEPT = "(Intercept)"
_NUMERIC_GROUPS = ("numeric", "log", "spline")
_GROUPS = (*_NUMERIC_GROUPS, "categorical")


def logistic_terms(
    pipeline: Pipeline, *, numeric: Sequence[str], categorical: Sequence[str]
) -> pd.DataFrame:
    """The design columns of a fitted clinical pipeline: ``term``, ``variable``, ``level``
    (None for numeric), ``group`` (its transformer) and ``coef``, in design order.

    Numeric variables come from the ``numeric`` (linear), ``log`` (``log(1 + x)``) and
    ``spline`` (restricted cubic spline: terms ``x``, ``x'``, ``x''``, …) transformers,
    categorical ones from ``categorical`` (one-hot, a reference level dropped).

    Args:
        pipeline: fitted ``clinical_pipeline`` (steps ``columns`` → ``classifier``).
        numeric: its numeric variables.
        categorical: its categorical variables.
    """
    columns = pipeline.named_steps["columns"]
    fitted = {name: (transformer, list(cols)) for name, transformer, cols in columns.transformers_
              if name in _GROUPS}
    found = {group: fitted.get(group, (None, []))[1] for group in _GROUPS}
    if sorted(c for g in _NUMERIC_GROUPS for c in found[g]) != sorted(numeric) or \
            found["categorical"] != list(categorical):
        msg = (f"columns {list(numeric)} + {list(categorical)} differ from the pipeline's "
               f"{found}")
        raise ValueError(msg)
    rows: list[tuple[str, str, object, str]] = [(c, c, None, "numeric")
                                                for c in found["numeric"]]
    rows += [(f"log(1 + {c})", c, None, "log") for c in found["log"]]
    if found["spline"]:
        spline = fitted["spline"][0].named_steps["spline"]
        variables = np.repeat(found["spline"], spline.n_terms_)
        rows += [(term, variable, None, "spline") for term, variable in
                 zip(spline.get_feature_names_out(found["spline"]), variables, strict=True)]
    if categorical:
        encoder = fitted["categorical"][0][-1]
        if not isinstance(encoder, OneHotEncoder):
            msg = f"categorical columns must be one-hot encoded, got {type(encoder).__name__}"
            raise TypeError(msg)
        drops = encoder.drop_idx_ if encoder.drop_idx_ is not None else [None] * len(categorical)
        for name, categories, drop in zip(categorical, encoder.categories_, drops, strict=True):
            rows += [(f"{name}_{level}", name, level, "categorical")
                     for k, level in enumerate(categories) if drop is None or k != drop]
    coef = pipeline.named_steps["classifier"].coef_[0]
    if len(rows) != coef.size:
        msg = (f"cannot map the {coef.size} coefficients onto the {len(rows)} design "
               "columns expected from the variables")
        raise ValueError(msg)
    terms = pd.DataFrame(rows, columns=["term", "variable", "level", "group"])
    return terms.assign(coef=coef)


def numeric_design(pipeline: Pipeline, terms: pd.DataFrame, name: str,
                   values: np.ndarray) -> np.ndarray:
    """Design columns of numeric variable ``name`` at raw ``values`` (rows: values; columns:
    its terms in ``terms``), through its impute → [log | spline] → scale transformer."""
    for group, transformer, columns in pipeline.named_steps["columns"].transformers_:
        if group in _NUMERIC_GROUPS and name in list(columns):
            frame = pd.DataFrame(dict.fromkeys(columns, np.asarray(values, dtype=float)))
            out = np.asarray(transformer.transform(frame), dtype=float)
            own = terms.loc[terms["group"] == group, "variable"].to_numpy() == name
            return out[:, own]
    msg = f"numeric variable {name!r} is not in the pipeline"
    raise ValueError(msg)


def is_penalised(pipeline: Pipeline) -> bool:
    """Whether the pipeline's logistic classifier was fitted with a tuned penalty (ridge):
    its coefficients are shrunk, and Wald intervals do not apply."""
    return isinstance(pipeline.named_steps["classifier"], LogisticRegressionCV)


def _wald(design: np.ndarray, beta: np.ndarray, level: float,
          contrasts: np.ndarray | None = None) -> pd.DataFrame:
    """Wald estimates, SE, CI and p of the linear ``contrasts`` (rows; default: each
    coefficient) of logistic coefficients ``beta`` (intercept first), from the inverse of the
    Fisher information ``D' W D`` of the design with a leading column of ones."""
    contrasts = np.eye(beta.size) if contrasts is None else contrasts
    d = np.column_stack([np.ones(len(design)), design])
    p = expit(d @ beta)
    covariance = np.linalg.pinv(d.T @ (d * (p * (1 - p))[:, None]))
    estimate = contrasts @ beta
    se = np.sqrt(np.einsum("ij,jk,ik->i", contrasts, covariance, contrasts))
    z = stats.norm.ppf((1 + level) / 2)
    return pd.DataFrame({
        "coef": estimate, "se": se, "odds_ratio": np.exp(estimate),
        "ci_lower": np.exp(estimate - z * se), "ci_upper": np.exp(estimate + z * se),
        "p": 2 * stats.norm.sf(np.abs(estimate / se)),
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
    needed). Numeric variables are standardised by the pipeline: their OR is per SD (of
    ``log(1 + x)`` for logged ones). A spline variable's terms have no odds ratio of their
    own, so each also gets the row ``<variable>: <Q3> vs <Q1>``: the odds ratio between its
    training upper and lower quartiles, as ``rms``'s ``summary`` reports. A ridge-penalised
    model (``clinical=full``) reports its shrunk coefficients and odds ratios with
    ``penalised`` True and no Wald SE, CI or p.

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
    beta = np.r_[intercept, terms["coef"].to_numpy()]
    head = pd.concat([
        pd.DataFrame({"term": [_INTERCEPT], "variable": [_INTERCEPT], "level": [None]}),
        terms[["term", "variable", "level"]],
    ], ignore_index=True)
    contrasts = [np.eye(beta.size)]
    for name in terms.loc[terms["group"] == "spline", "variable"].unique():
        low, high = np.nanquantile(X_train[name].to_numpy(dtype=float), [0.25, 0.75])
        change = np.zeros(beta.size)
        own = 1 + np.flatnonzero(terms["variable"].to_numpy() == name)
        change[own] = np.diff(numeric_design(pipeline, terms, name, [low, high]), axis=0)[0]
        contrasts.append(change[None])
        head.loc[len(head)] = [f"{name}: {high:g} vs {low:g}", name, None]
    wald = _wald(design, beta, level, np.vstack(contrasts))
    penalised = is_penalised(pipeline)
    if penalised:  # shrunk estimates: the unpenalised Wald SE, CI and p would mislead
        wald[["se", "ci_lower", "ci_upper", "p"]] = np.nan
    return pd.concat([head, wald], axis=1).assign(penalised=penalised)


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
            levels = category_levels(values)
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
