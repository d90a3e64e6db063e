"""Clinical screening inside the pipeline, and the selected model as one estimator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import patsy
import pytest
from omegaconf import OmegaConf
from scipy.special import expit
from sklearn.metrics import roc_auc_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from pdl1exp.models.clinical import (
    SIGNATURE,
    RestrictedCubicSpline,
    UnivariateScreen,
    clinical_pipeline,
    signature,
)
from pdl1exp.models.selected import SelectedModel
from tests.conftest import CONF

CFG = OmegaConf.load(CONF / "clinical" / "paper.yaml")


def _cohort(n: int = 300, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({"age": rng.normal(64, 9, n), "noise": rng.normal(0, 1, n),
                      "stage": rng.choice(["I", "II", "III"], n),
                      "sex": rng.choice(["F", "M"], n)})
    logit = 1.2 * (X["age"] - 64) / 9 + (X["stage"] == "III") * 1.5
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int).to_numpy()
    X.loc[X.index[:10], "age"] = np.nan
    return X, y


def test_screen_keeps_related_variables_only() -> None:
    X, y = _cohort()
    screen = UnivariateScreen(numeric=["age", "noise"], categorical=["stage", "sex"],
                              p_threshold=0.05).fit(X, y)
    assert screen.numeric_ == ["age"]
    assert screen.categorical_ == ["stage"]
    assert list(screen.transform(X).columns) == ["age", "stage"]
    assert not screen.fallback_


def test_screen_falls_back_to_the_best_variable_and_keeps_forced_columns() -> None:
    X, y = _cohort()
    X = X.assign(**{SIGNATURE: np.zeros(len(X))})
    noise_only = UnivariateScreen(numeric=["noise", SIGNATURE], categorical=["sex"],
                                  p_threshold=1e-12, keep=[SIGNATURE]).fit(X, y)
    assert noise_only.fallback_
    assert len(noise_only.numeric_ + noise_only.categorical_) == 2
    assert SIGNATURE in noise_only.numeric_


def test_backward_aic_drops_uninformative_variables() -> None:
    X, y = _cohort(n=600)
    screen = UnivariateScreen(numeric=["age", "noise"], categorical=["stage", "sex"],
                              p_threshold=None, backward_aic=True).fit(X, y)
    assert "age" in screen.numeric_
    assert "stage" in screen.categorical_
    assert "noise" not in screen.numeric_
    aics = [aic for _, aic in screen.aic_path_]
    assert aics == sorted(aics, reverse=True)  # every step lowered the AIC
    assert len(screen.aic_path_[0][0]) == 4


def test_pipeline_refits_the_screen_per_fit() -> None:
    X, y = _cohort()
    model = clinical_pipeline(CFG, numeric=["age", "noise"], categorical=["stage", "sex"])
    model.fit(X, y)
    assert model.named_steps["screen"].numeric_ == ["age"]
    proba = model.predict_proba(X)[:, 1]
    assert ((proba > 0) & (proba < 1)).all()
    shuffled = np.random.default_rng(1).permutation(y)
    again = clinical_pipeline(CFG, numeric=["age", "noise"], categorical=["stage", "sex"])
    assert again.fit(X, shuffled).named_steps["screen"].numeric_ != ["age"] or \
        again.named_steps["screen"].categorical_ != ["stage"]


def test_selected_model_chains_dlr_into_the_combined_model() -> None:
    X, y = _cohort()
    deep = pd.DataFrame({"dl_0000": y + np.random.default_rng(2).normal(0, 1, len(y))},
                        index=X.index)
    dlr = clinical_pipeline({**CFG, "screening_p": None}, numeric=["dl_0000"],
                            categorical=[]).fit(deep, y)
    combined_X = X.assign(**{SIGNATURE: signature(dlr.predict_proba(deep)[:, 1], clip=0.01)})
    clinical = clinical_pipeline(CFG, numeric=["age", "noise", SIGNATURE],
                                 categorical=["stage", "sex"], keep=[SIGNATURE]).fit(combined_X, y)
    model = SelectedModel(feature_set="combined", image={"dlr": dlr}, clinical=clinical,
                          threshold=0.4, image_features={"dlr": ["dl_0000"]},
                          clinical_features=["age", "noise", "stage", "sex"]).fit(None)
    inputs = pd.concat([deep, X], axis=1)
    np.testing.assert_allclose(model.predict_proba(inputs)[:, 1],
                               clinical.predict_proba(combined_X)[:, 1])
    assert set(np.unique(model.predict(inputs))) <= {0, 1}
    with pytest.raises(ValueError, match="missing 1 column"):
        model.predict_proba(inputs.drop(columns=["stage"]))


def u_shaped_cohort(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Risk lowest at age 64, rising on both sides (a linear term sees no effect)."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({"age": rng.normal(64, 9, n), "sex": rng.choice(["F", "M"], n)})
    y = (rng.random(n) < expit(((X["age"] - 64) / 9) ** 2 - 1)).astype(int).to_numpy()
    return X, y


@parametrize_with_checks([RestrictedCubicSpline(), RestrictedCubicSpline(n_knots=3)])
def test_spline_is_sklearn_compatible(estimator, check) -> None:
    check(estimator)


@pytest.mark.parametrize("n_knots", [3, 4, 5])
def test_spline_spans_the_natural_cubic_splines_and_is_linear_beyond_the_outer_knots(
        n_knots: int) -> None:
    x = np.random.default_rng(0).gamma(3.0, 10.0, 400)
    spline = RestrictedCubicSpline(n_knots).fit(x[:, None])
    (knots,) = spline.knots_
    quantiles = {3: [0.10, 0.50, 0.90], 4: [0.05, 0.35, 0.65, 0.95],
                 5: [0.05, 0.275, 0.50, 0.725, 0.95]}[n_knots]
    np.testing.assert_allclose(knots, np.quantile(x, quantiles))
    inside = x[(x > knots[0]) & (x < knots[-1])]
    basis = np.column_stack([np.ones(inside.size), spline.transform(inside[:, None])])
    assert basis.shape[1] == n_knots
    # patsy's natural cubic regression spline with the same knots spans the same functions.
    reference = np.asarray(patsy.dmatrix(
        "cr(x, knots=inner, lower_bound=low, upper_bound=high) - 1",
        {"x": inside, "inner": knots[1:-1], "low": knots[0], "high": knots[-1]}))
    for a, b in ((basis, reference), (reference, basis)):
        residual = b - a @ np.linalg.lstsq(a, b, rcond=None)[0]
        assert np.abs(residual).max() < 1e-8 * np.abs(b).max()
    # Linear beyond the outer knots, curved between them.
    for grid in (np.linspace(knots[-1], knots[-1] + 50, 6), np.linspace(knots[0] - 20,
                                                                         knots[0], 6)):
        np.testing.assert_allclose(np.diff(spline.transform(grid[:, None]), n=2, axis=0), 0,
                                   atol=1e-9)
    middle = np.linspace(knots[0], knots[-1], 6)
    assert np.abs(np.diff(spline.transform(middle[:, None])[:, 1:], n=2, axis=0)).max() > 1e-3
    primes = ["cea" + "'" * j for j in range(n_knots - 1)]
    assert list(spline.get_feature_names_out(["cea"])) == primes


def test_spline_of_a_column_with_few_distinct_values_is_linear() -> None:
    X = np.repeat([[0.0], [1.0]], 50, axis=0)
    spline = RestrictedCubicSpline().fit(X)
    assert spline.n_terms_ == [1]
    np.testing.assert_array_equal(spline.transform(X), X)


def test_splines_capture_a_non_linear_effect_that_a_linear_term_misses() -> None:
    X, y = u_shaped_cohort(600, seed=3)
    test_X, test_y = u_shaped_cohort(600, seed=4)
    full = OmegaConf.merge(OmegaConf.load(CONF / "clinical" / "full.yaml"),
                           {"estimator": {"random_state": 0}})
    columns = {"numeric": ["age"], "categorical": ["sex"]}
    linear = clinical_pipeline(full, **columns).fit(X, y)
    curved = clinical_pipeline(full, spline=["age"], **columns).fit(X, y)
    assert curved.named_steps["columns"].get_feature_names_out()[:3].tolist() == [
        "age", "age'", "age''"]
    auc = {name: roc_auc_score(test_y, model.predict_proba(test_X)[:, 1])
           for name, model in (("linear", linear), ("spline", curved))}
    assert auc["linear"] < 0.6 < 0.7 < auc["spline"]


def test_log_and_spline_columns_must_be_numeric_clinical_columns_listed_once() -> None:
    columns = {"numeric": ["age", "cea"], "categorical": ["sex"]}
    with pytest.raises(ValueError, match=r"dataset.clinical.spline names \['size'\]"):
        clinical_pipeline(CFG, spline=["size"], **columns)
    with pytest.raises(ValueError, match=r"\['cea'\] are in both"):
        clinical_pipeline(CFG, log=["cea"], spline=["cea"], **columns)
