"""Nomogram of a fitted logistic clinical/combined model (classic points scale)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from pdl1exp.evaluation.nomogram import Nomogram, NomogramTerm, axis_ticks
from pdl1exp.models.logistic import logistic_terms, numeric_design

__all__ = ["build_nomogram", "nomogram_points"]

# Values over a numeric variable's observed range where its lowest and highest contribution
# are looked for (a spline's extremes may lie between ticks).
_GRID = 501


def build_nomogram(
    pipeline: Pipeline,
    X_train: pd.DataFrame,
    *,
    numeric: Sequence[str],
    categorical: Sequence[str],
    n_ticks: int,
    points_max: float = 100.0,
) -> Nomogram:
    """The classic (Iasonos/Harrell) nomogram of a fitted ``clinical_pipeline``.

    Each variable's contribution to the linear predictor is taken over its observed training
    range (numeric: raw values through the pipeline's [log or spline] transform, scaling and
    coefficients; categorical: each level's dummy coefficient, the reference level 0). A
    spline variable's axis may turn back: its ticks sit at their own points. The lowest
    contribution scores 0 points; the variable with the widest range spans ``points_max``.
    A patient's total points map back to the model's probability exactly
    (:meth:`Nomogram.predict_from_points`).

    Args:
        pipeline: fitted ``clinical_pipeline`` (logistic classifier).
        X_train: the training data (the ranges shown).
        numeric: its numeric variables.
        categorical: its categorical variables.
        n_ticks: about how many labelled values on a numeric axis.
        points_max: points of the widest variable.
    """
    terms = logistic_terms(pipeline, numeric=numeric, categorical=categorical)
    axes: list[tuple[str, tuple[float | str, ...], np.ndarray, np.ndarray]] = []
    for name in numeric:
        coef = terms.loc[terms["variable"] == name, "coef"].to_numpy()
        observed = X_train[name].dropna().to_numpy(dtype=float)
        low, high = observed.min(), observed.max()
        ticks = axis_ticks(low, high, n=n_ticks)
        # The extremes of the contribution over the observed range fix the axis: at its ends
        # for a monotonic transform, possibly inside for a spline. The ticks come last.
        values = numeric_design(pipeline, terms, name,
                                np.r_[np.linspace(low, high, _GRID), ticks]) @ coef
        axes.append((name, tuple(ticks.tolist()), values[-ticks.size:],
                     np.array([values.min(), values.max()])))
    for name in categorical:
        rows = terms[terms["variable"] == name]
        encoder = pipeline.named_steps["columns"].named_transformers_["categorical"][-1]
        levels = encoder.categories_[list(categorical).index(name)]
        by_level = dict(zip(rows["level"], rows["coef"], strict=True))
        contribution = np.array([by_level.get(level, 0.0) for level in levels])
        axes.append((name, tuple(str(level) for level in levels), contribution, contribution))
    widest = max(np.ptp(ends) for *_, ends in axes)
    if widest == 0:
        msg = "every coefficient is 0: the model has no nomogram"
        raise ValueError(msg)
    scale = points_max / widest
    nomogram_terms = tuple(
        NomogramTerm(
            name=name,
            values=values,
            points=tuple(float(p) for p in (contribution - ends.min()) * scale),
            max_points=float(np.ptp(ends) * scale),
            zero_logit=float(ends.min()),
        )
        for name, values, contribution, ends in axes
    )
    intercept = float(pipeline.named_steps["classifier"].intercept_[0])
    return Nomogram(
        terms=nomogram_terms,
        points_max=float(points_max),
        points_per_logit=float(scale),
        logit_at_zero=intercept + sum(t.zero_logit for t in nomogram_terms),
    )


def nomogram_points(
    nomogram: Nomogram,
    pipeline: Pipeline,
    X: pd.DataFrame,
    *,
    numeric: Sequence[str],
    categorical: Sequence[str],
) -> pd.DataFrame:
    """Points of each patient on every nomogram axis, and ``total_points``.

    Missing values are imputed by the pipeline, as for its predictions.

    Args:
        nomogram: built from ``pipeline`` by :func:`build_nomogram`.
        pipeline: the fitted ``clinical_pipeline``.
        X: patients, with the model's columns.
        numeric: its numeric variables.
        categorical: its categorical variables.
    """
    terms = logistic_terms(pipeline, numeric=numeric, categorical=categorical)
    design = np.asarray(pipeline.named_steps["columns"].transform(X), dtype=float)
    contribution = design * terms["coef"].to_numpy()
    points = pd.DataFrame(index=X.index)
    for term in nomogram.terms:
        columns = (terms["variable"] == term.name).to_numpy()
        logit = contribution[:, columns].sum(axis=1)
        points[term.name] = (logit - term.zero_logit) * nomogram.points_per_logit
    points["total_points"] = points.sum(axis=1)
    return points
