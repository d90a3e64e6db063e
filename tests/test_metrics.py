"""Tests of pdl1exp.evaluation.metrics: point metrics, CI tables and MLflow names."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pdl1exp.evaluation import (
    METRICS,
    binary_metrics,
    bootstrap_ci,
    bootstrap_cis,
    delong_ci,
    flatten_metrics,
    metrics_with_ci,
)
from pdl1exp.evaluation.statistics import calibration_intercept_slope

THRESHOLD = 0.5


@pytest.fixture
def sample() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    y = rng.integers(0, 2, size=80)
    prob = np.clip(np.round(0.35 * y + 0.65 * rng.random(80), 2), 0, 1)
    prob[:3] = THRESHOLD  # on the cut-off: predicted positive
    return y, prob


def test_binary_metrics_match_sklearn(sample: tuple[np.ndarray, np.ndarray]) -> None:
    y, prob = sample
    pred = (prob >= THRESHOLD).astype(int)
    expected = {
        "auc": roc_auc_score(y, prob),
        "sensitivity": recall_score(y, pred),
        "specificity": recall_score(y, pred, pos_label=0),
        "accuracy": accuracy_score(y, pred),
        "ppv": precision_score(y, pred),
        "npv": precision_score(y, pred, pos_label=0),
        "f1": f1_score(y, pred),
        "brier": brier_score_loss(y, prob),
    }
    got = binary_metrics(y, prob, THRESHOLD)
    assert tuple(got) == METRICS
    assert got == pytest.approx(expected, abs=1e-12)


def test_undefined_point_metric_is_nan() -> None:
    got = binary_metrics([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], threshold=0.9)
    assert np.isnan(got["ppv"])
    assert got["sensitivity"] == 0.0
    assert got["npv"] == 0.5


def test_metrics_with_ci(sample: tuple[np.ndarray, np.ndarray]) -> None:
    y, prob = sample
    table = metrics_with_ci(y, prob, THRESHOLD, n_boot=300, level=0.9, seed=3)
    assert tuple(table) == (*METRICS, "auc_delong")
    point = binary_metrics(y, prob, THRESHOLD)
    for metric in METRICS:
        estimate, lower, upper, method = table[metric]
        assert estimate == pytest.approx(point[metric])
        assert lower <= estimate <= upper
        assert method == "bootstrap"
        assert table[metric][:3] == bootstrap_ci(
            y, prob, metric, n_boot=300, level=0.9, seed=3, threshold=THRESHOLD
        )
    assert table["auc_delong"][:3] == delong_ci(y, prob, level=0.9)


def test_degenerate_proportion_gets_clopper_pearson() -> None:
    """12/12 positives detected: not a 1.00-1.00 interval (R binom.test: 0.7354-1)."""
    y = np.r_[np.ones(12), np.zeros(12)].astype(int)
    prob = np.r_[np.full(12, 0.9), np.linspace(0.1, 0.95, 12)]
    table = metrics_with_ci(y, prob, 0.5, n_boot=200, level=0.95, seed=0)
    estimate, lower, upper, method = table["sensitivity"]
    assert (estimate, method) == (1.0, "clopper_pearson")
    assert lower == pytest.approx(0.7353515, abs=1e-6)
    assert upper == 1.0
    assert table["specificity"].method == "bootstrap"
    wilson = metrics_with_ci(y, prob, 0.5, n_boot=200, level=0.95, seed=0,
                             proportion_ci="wilson")
    assert wilson["specificity"].method == "wilson"
    assert wilson["auc"].method == "bootstrap"
    with pytest.raises(ValueError, match="proportion_ci"):
        metrics_with_ci(y, prob, 0.5, n_boot=10, level=0.95, seed=0, proportion_ci="exact")


def test_calibration_intercept_and_slope() -> None:
    rng = np.random.default_rng(0)
    true = rng.uniform(0.05, 0.95, 4000)
    y = (rng.random(4000) < true).astype(int)
    calibrated = calibration_intercept_slope(y, true)
    assert calibrated["calibration_intercept"][1] < 0 < calibrated["calibration_intercept"][2]
    assert calibrated["calibration_slope"][1] < 1 < calibrated["calibration_slope"][2]
    # Overconfident predictions (logit doubled): slope about 1/2.
    over = 1 / (1 + np.exp(-2 * np.log(true / (1 - true))))
    slope, lower, upper = calibration_intercept_slope(y, over)["calibration_slope"]
    assert lower < 0.5 < upper
    assert slope == pytest.approx(0.5, abs=0.05)


def test_flatten_metrics_names(sample: tuple[np.ndarray, np.ndarray]) -> None:
    y, prob = sample
    table = metrics_with_ci(y, prob, THRESHOLD, n_boot=50, level=0.95, seed=0)
    flat = flatten_metrics("external_siteA", table)
    names = {
        f"external_siteA_{m}{suffix}" for m in table for suffix in ("", "_ci_lower", "_ci_upper")
    }
    assert set(flat) == names
    assert flat["external_siteA_auc"] == table["auc"][0]
    assert flat["external_siteA_auc_ci_upper"] == table["auc"][2]
    plain = flatten_metrics("test", binary_metrics(y, prob, THRESHOLD))
    assert set(plain) == {f"test_{m}" for m in METRICS}


def test_shared_draw_equals_one_metric_at_a_time() -> None:
    rng = np.random.default_rng(5)
    y = (rng.random(120) < 0.4).astype(int)
    prob = np.clip(0.3 * y + rng.random(120) * 0.7, 0, 1)
    shared = bootstrap_cis(y, prob, METRICS, n_boot=300, seed=9, threshold=0.5)
    alone = [bootstrap_ci(y, prob, m, n_boot=300, seed=9, threshold=0.5) for m in METRICS]
    assert shared == alone
    assert [s.n_undefined for s in shared] == [a.n_undefined for a in alone]
