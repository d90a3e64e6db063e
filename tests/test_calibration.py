"""Recalibration of the registered model on its training out-of-fold predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit

from pdl1exp.evaluation import calibration_intercept_slope
from pdl1exp.models.calibration import Recalibrator, recalibrate
from pdl1exp.models.results import ModelResult


def overconfident(seed: int, n: int) -> tuple[pd.Series, pd.Series]:
    """Labels and probabilities whose logit is twice the true one (slope 1/2)."""
    rng = np.random.default_rng(seed)
    true = rng.uniform(0.05, 0.95, n)
    y = pd.Series((rng.random(n) < true).astype(int),
                  index=pd.Index([f"P{seed}_{i}" for i in range(n)], name="patient_id"))
    return y, pd.Series(expit(2 * logit(true)), index=y.index)


def result(y_cv: pd.Series, p_cv: pd.Series, y_test: pd.Series, p_test: pd.Series
           ) -> tuple[ModelResult, pd.Series]:
    model = ModelResult("combined", "lr", 0.7, 0.5, {"cv": p_cv, "test": p_test}, {}, None)
    return model, pd.concat([y_cv, y_test])


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_recalibration_fixes_an_overconfident_model_on_new_patients(method: str) -> None:
    model, y = result(*overconfident(0, 3000), *overconfident(1, 3000))
    before = calibration_intercept_slope(y.loc[model.proba["test"].index], model.proba["test"])
    fixed = recalibrate(model, y, method=method)
    after = calibration_intercept_slope(y.loc[fixed.proba["test"].index], fixed.proba["test"])
    assert before["calibration_slope"][0] == pytest.approx(0.5, abs=0.06)
    assert after["calibration_slope"][0] == pytest.approx(1.0, abs=0.15)  # isotonic: steps
    assert fixed.calibrator.method == method
    assert model.calibrator is None  # the raw result is left as it was
    if method == "platt":  # monotone: AUC and ranking unchanged
        assert fixed.calibrator.slope_ == pytest.approx(0.5, abs=0.06)
        np.testing.assert_array_equal(np.argsort(fixed.proba["test"]),
                                      np.argsort(model.proba["test"]))


def test_none_and_bad_methods() -> None:
    model, y = result(*overconfident(2, 200), *overconfident(3, 200))
    assert recalibrate(model, y, method="none") is model
    with pytest.raises(ValueError, match=r"evaluation\.recalibrate"):
        recalibrate(model, y, method="beta")
    with pytest.raises(ValueError, match="platt"):
        Recalibrator(method="beta").fit([0.2, 0.8], [0, 1])
