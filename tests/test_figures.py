"""Tests of pdl1exp.evaluation.figures: ROC band, decision curves and every PNG written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from pdl1exp.evaluation import net_benefit, net_benefit_treat_all
from pdl1exp.evaluation.figures import (
    calibration_figure,
    decision_curve_figure,
    decision_curves,
    importance_figure,
    lasso_path_figure,
    roc_figure,
)
from pdl1exp.evaluation.nomogram import axis_ticks
from pdl1exp.evaluation.statistics import _resample_indices, roc_band

DPI = 60
GRID = np.linspace(0, 1, 51)


@pytest.fixture
def curves() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 150)
    good = 1 / (1 + np.exp(-(1.5 * y - 0.75 + rng.normal(size=150))))
    return {"DLR": (y, good), "Clinical": (y, rng.random(150))}


def best_sensitivity(y: np.ndarray, score: np.ndarray, specificity: float) -> float:
    """Largest sensitivity among cut-offs with at least this specificity (brute force)."""
    best = 0.0
    for cut in np.r_[np.unique(score), np.inf]:
        predicted = score >= cut
        if (~predicted[y == 0]).mean() >= specificity - 1e-12:
            best = max(best, predicted[y == 1].mean())
    return best


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels; fails unless the file is a PNG."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = imread(path).shape[:2]
    return width, height


def test_roc_band_estimate_is_the_roc_staircase_and_inside_the_band(curves) -> None:
    y, prob = curves["DLR"]
    prob = np.round(prob, 1)  # ties: several cut-offs share a score
    estimate, lower, upper = roc_band(y, prob, specificities=GRID, n_boot=400, level=0.95,
                                      seed=1)
    np.testing.assert_allclose(estimate, [best_sensitivity(y, prob, sp) for sp in GRID])
    assert (lower <= estimate).all()
    assert (estimate <= upper).all()
    assert (upper - lower).max() > 0.1  # a real band, not the curve twice
    assert estimate[0] == 1.0


def test_roc_band_resamples_are_evaluated_like_the_sample(curves) -> None:
    y, prob = curves["DLR"]
    _, lower, upper = roc_band(y, prob, specificities=GRID, n_boot=1, level=0.5, seed=7)
    (resample,) = _resample_indices(y == 1, 1, np.random.default_rng(7), stratified=True)
    expected = [best_sensitivity(y[resample], prob[resample], sp) for sp in GRID]
    np.testing.assert_allclose(lower, expected)
    np.testing.assert_allclose(upper, expected)


def test_roc_band_is_reproducible_and_checks_its_grid(curves) -> None:
    y, prob = curves["DLR"]
    first = roc_band(y, prob, specificities=GRID, n_boot=50, level=0.9, seed=2)
    second = roc_band(y, prob, specificities=GRID, n_boot=50, level=0.9, seed=2)
    np.testing.assert_array_equal(first, second)
    with pytest.raises(ValueError, match="specificities"):
        roc_band(y, prob, specificities=[0.5, 1.2], n_boot=10, level=0.9, seed=0)


def test_decision_curves_treat_all_and_models(curves) -> None:
    y, prob = curves["DLR"]
    pt = np.linspace(0, 0.9, 19)
    table = decision_curves(curves, pt)
    prevalence = y.mean()
    np.testing.assert_allclose(table["Treat all"], prevalence - (1 - prevalence) * pt / (1 - pt))
    np.testing.assert_allclose(table["Treat all"], net_benefit_treat_all(y, pt))
    np.testing.assert_allclose(table["DLR"], net_benefit(y, prob, pt))
    assert (table["Treat none"] == 0).all()
    assert list(table.columns) == ["threshold", "Treat all", "Treat none", "DLR", "Clinical"]


def test_decision_curves_need_the_same_patients(curves) -> None:
    y, prob = curves["DLR"]
    with pytest.raises(ValueError, match="same patients"):
        decision_curves({"a": (y, prob), "b": (1 - y, prob)}, [0.1, 0.2])


def test_roc_figure_written_at_requested_dpi(curves, tmp_path: Path) -> None:
    path = roc_figure(curves, tmp_path / "roc.png", title="Test set", band_for="DLR",
                      n_boot=200, level=0.95, seed=0, dpi=DPI)
    assert path == tmp_path / "roc.png"
    width, height = png_size(path)
    assert width == height  # square canvas for the equal-aspect ROC axes
    assert width >= 5 * DPI
    with pytest.raises(ValueError, match="band_for"):
        roc_figure(curves, tmp_path / "x.png", title="", band_for="nope", n_boot=10, dpi=DPI,
                   level=0.95, seed=0)


def test_roc_figure_at_print_dpi(curves, tmp_path: Path) -> None:
    path = roc_figure(curves, tmp_path / "sub" / "roc.png", title="", band_for=None,
                      n_boot=10, level=0.95, seed=0, dpi=300)
    assert min(png_size(path)) >= 1500  # 5.5 in at 300 dpi


def test_calibration_figure_handles_constant_predictions(curves, tmp_path: Path) -> None:
    y, _ = curves["DLR"]
    with_constant = {**curves, "Constant": (y, np.full(y.size, 0.4))}
    path = calibration_figure(with_constant, tmp_path / "cal.png", groups=10, title="Test",
                              dpi=DPI)
    width, height = png_size(path)
    assert height > width > 4 * DPI  # reliability panel above a histogram


def test_decision_curve_figure_written(curves, tmp_path: Path) -> None:
    path = decision_curve_figure(curves, tmp_path / "dca.png",
                                 thresholds=np.linspace(0, 0.99, 100), title="DCA", dpi=DPI)
    width, height = png_size(path)
    assert width > height > 3 * DPI


def test_lasso_path_figure_written(tmp_path: Path) -> None:
    lambdas = np.geomspace(1.0, 0.01, 15)
    signal = np.array([0.9, -0.6, 0.3, 0.05, 0.0, 0.0])
    # Soft thresholding: the LASSO path of an orthonormal design.
    path_ = np.sign(signal) * np.clip(np.abs(signal)[None, :] - 0.5 * lambdas[:, None], 0, None)
    cv = pd.DataFrame({"lambda": lambdas, "score_mean": -0.7 + 0.1 * np.sin(np.arange(15)),
                       "score_se": np.full(15, 0.02), "n_nonzero": (path_ != 0).sum(axis=1)})
    out = lasso_path_figure(lambdas=lambdas, coef_path=path_, chosen_lambda=lambdas[9],
                            cv_curve=cv, feature_names=[f"dl_{j}" for j in range(6)],
                            path=tmp_path / "lasso.png", max_labels=2, dpi=DPI)
    width, height = png_size(out)
    assert width > 2 * height > 4 * DPI  # two panels side by side
    with pytest.raises(ValueError, match="coef_path"):
        lasso_path_figure(lambdas=lambdas, coef_path=path_[:, :3], chosen_lambda=0.1,
                          cv_curve=cv, feature_names=list("abcdef"), path=tmp_path / "x.png",
                          max_labels=2, dpi=DPI)


def test_importance_figure_grows_with_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    importance = pd.Series(rng.normal(size=40), index=[f"dl_{j}" for j in range(40)],
                           name="LASSO coefficient")
    few = importance_figure(importance, tmp_path / "few.png", title="Top", top=5, dpi=DPI)
    many = importance_figure(importance, tmp_path / "many.png", title="Top", top=30, dpi=DPI)
    assert png_size(many)[1] > png_size(few)[1]
    with pytest.raises(ValueError, match="at least one"):
        importance_figure(pd.Series(dtype=float), tmp_path / "none.png", title="", top=5,
                          dpi=DPI)


@pytest.mark.parametrize(
    ("low", "high", "n", "expected"),
    [(0, 100, 11, np.arange(0, 101, 10)), (43, 81, 5, [50, 60, 70, 80]),
     (0.12, 0.5, 5, [0.2, 0.3, 0.4, 0.5]), (3, 3, 5, [3])],
)
def test_axis_ticks_are_round_and_inside_the_range(low: float, high: float, n: int,
                                                   expected) -> None:
    np.testing.assert_allclose(axis_ticks(low, high, n=n), expected)
