"""Models on feature tables: leak-free selection, the classifiers and their Optuna sweep."""

from __future__ import annotations

from pdl1exp.models.classifiers import build_estimator, build_pipeline, suggest_params
from pdl1exp.models.selection import (
    CorrelationFilter,
    LassoSelector,
    NearZeroVarianceFilter,
    SelectionFallbackWarning,
    UnivariateFilter,
    build_selection,
    univariate_auc,
)
from pdl1exp.models.tuning import (
    CVFold,
    SharedSelection,
    SweepJob,
    TuningResult,
    fit_folds,
    prepare_folds,
    select_best,
    sweep,
    sweeps,
    tune_classifier,
)

__all__ = [
    "CVFold",
    "CorrelationFilter",
    "LassoSelector",
    "NearZeroVarianceFilter",
    "SelectionFallbackWarning",
    "SharedSelection",
    "SweepJob",
    "TuningResult",
    "UnivariateFilter",
    "build_estimator",
    "build_pipeline",
    "build_selection",
    "fit_folds",
    "prepare_folds",
    "select_best",
    "suggest_params",
    "sweep",
    "sweeps",
    "tune_classifier",
    "univariate_auc",
]
