"""Evaluation: pure numpy/scipy/statsmodels statistics (pROC-compatible) and metric tables."""

from __future__ import annotations

from pdl1exp.evaluation.metrics import METRICS, binary_metrics, flatten_metrics, metrics_with_ci
from pdl1exp.evaluation.statistics import (
    BootstrapCI,
    bootstrap_ci,
    bootstrap_cis,
    calibration_intercept_slope,
    delong_ci,
    delong_test,
    delong_test_unpaired,
    hosmer_lemeshow,
    metric_value,
    net_benefit,
    net_benefit_treat_all,
    youden_threshold,
)

__all__ = [
    "METRICS",
    "BootstrapCI",
    "binary_metrics",
    "bootstrap_ci",
    "bootstrap_cis",
    "calibration_intercept_slope",
    "delong_ci",
    "delong_test",
    "delong_test_unpaired",
    "flatten_metrics",
    "hosmer_lemeshow",
    "metric_value",
    "metrics_with_ci",
    "net_benefit",
    "net_benefit_treat_all",
    "youden_threshold",
]
