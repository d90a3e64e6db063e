"""Tests for the selection transformers and presets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from sklearn.linear_model import LogisticRegression, lasso_path
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from pdl1exp.models.selection import (
    CorrelationFilter,
    LassoSelector,
    NearZeroVarianceFilter,
    SelectionFallbackWarning,
    UnivariateFilter,
    build_selection,
    univariate_auc,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
PLANTED = ["dl_0000", "dl_0001", "dl_0002"]


def selection_preset(name: str):
    """A ``conf/selection`` preset with ``${seed}`` resolved as the root config would."""
    preset = OmegaConf.load(CONF / "selection" / f"{name}.yaml")
    return OmegaConf.merge({"seed": 42}, {"selection": preset}).selection


def planted_table(seed: int = 0, n: int = 200, p: int = 300) -> tuple[pd.DataFrame, np.ndarray]:
    """Noise features; the first three are shifted by 1.2 SD in positives."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.standard_normal((n, p))
    X[:, :3] += 1.2 * y[:, None]
    return pd.DataFrame(X, columns=[f"dl_{j:04d}" for j in range(p)]), y


@parametrize_with_checks(
    [
        NearZeroVarianceFilter(),
        UnivariateFilter(),
        CorrelationFilter(),
        LassoSelector(random_state=0),
        LassoSelector(estimator="lasso", one_se_rule=True, random_state=0),
    ]
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_near_zero_variance_drops_constant_and_sparse_columns():
    rng = np.random.default_rng(0)
    n = 100
    X = np.column_stack(
        [
            rng.standard_normal(n),  # informative spread
            np.zeros(n),  # constant
            np.r_[np.zeros(n - 2), 1.0, 2.0],  # 98 zeros: ratio 98, 3 % unique
            np.r_[np.zeros(n // 2), np.ones(n // 2)],  # binary but balanced: ratio 1
        ]
    )
    selector = NearZeroVarianceFilter(freq_cut=19.0, unique_cut=10.0).fit(X)
    np.testing.assert_array_equal(selector.get_support(), [True, False, False, True])
    assert not selector.fallback_


def test_near_zero_variance_all_constant_keeps_one_with_warning():
    X = np.ones((20, 3))
    with pytest.warns(SelectionFallbackWarning):
        selector = NearZeroVarianceFilter().fit(X)
    assert selector.fallback_
    assert selector.transform(X).shape == (20, 1)


@pytest.mark.parametrize("test", ["mannwhitney", "ttest"])
def test_univariate_filter_keeps_planted(test):
    X, y = planted_table()
    selector = UnivariateFilter(test=test, p_threshold=0.001).fit(X, y)
    assert set(PLANTED) <= set(selector.selected_features_)
    assert len(selector.selected_features_) < 10
    assert selector.pvalues_.shape == (X.shape[1],)


def test_univariate_filter_none_pass_keeps_smallest_p():
    X, y = planted_table()
    with pytest.warns(SelectionFallbackWarning):
        selector = UnivariateFilter(p_threshold=0.0).fit(X, y)
    assert selector.fallback_
    assert list(selector.selected_features_) == [X.columns[np.argmin(selector.pvalues_)]]


def test_univariate_filter_rejects_unknown_test_and_multiclass():
    X, y = planted_table()
    with pytest.raises(ValueError, match="test='anova'"):
        UnivariateFilter(test="anova").fit(X, y)
    with pytest.raises(ValueError, match="binary label"):
        UnivariateFilter().fit(X, np.arange(len(y)) % 3)


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_correlation_filter_keeps_the_label_related_twin(method):
    rng = np.random.default_rng(1)
    n = 150
    y = rng.integers(0, 2, n)
    strong = rng.standard_normal(n) + y
    X = pd.DataFrame(
        {
            "weak_twin": strong - 0.3 * y,  # r ~ 0.99 with "strong", less related to y
            "strong": strong,
            "other": rng.standard_normal(n),
        }
    )
    selector = CorrelationFilter(method=method, threshold=0.9).fit(X, y)
    assert list(selector.selected_features_) == ["strong", "other"]
    # Without redundancy at this threshold everything stays.
    assert CorrelationFilter(method=method, threshold=0.999).fit(X, y).get_support().all()


def test_univariate_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    X, y = planted_table(n=60, p=5)
    X.iloc[:10, 4] = 0.0  # ties
    expected = [roc_auc_score(y, X.iloc[:, j]) for j in range(5)]
    np.testing.assert_allclose(univariate_auc(X.to_numpy(), y), expected)


@pytest.mark.parametrize("estimator", ["logistic", "lasso"])
@pytest.mark.parametrize("one_se_rule", [False, True])
def test_lasso_selector_finds_planted_features(estimator, one_se_rule):
    X, y = planted_table()
    selector = LassoSelector(estimator=estimator, one_se_rule=one_se_rule, random_state=0)
    selector.fit(X, y)
    assert not selector.fallback_
    assert len(selector.selected_features_) <= 40  # of 300
    assert selector.coef_.shape == (len(selector.selected_features_),)
    strongest = np.argsort(-np.abs(selector.coef_))[: len(PLANTED)]
    assert sorted(selector.selected_features_[strongest]) == PLANTED
    assert np.all(selector.coef_[strongest] > 0)  # positives have the larger values
    curve = selector.cv_curve_
    assert list(curve.columns) == ["lambda", "score_mean", "score_se", "n_nonzero"]
    assert len(curve) == selector.n_lambdas
    assert np.all(np.diff(curve["lambda"]) < 0)
    assert selector.lambda_1se_ >= selector.lambda_min_
    assert selector.lambda_ == (selector.lambda_1se_ if one_se_rule else selector.lambda_min_)
    assert selector.coef_path_.shape == (selector.n_lambdas, X.shape[1])
    assert not selector.coef_path_[0].any()  # lambda_max keeps nothing


def test_one_se_rule_selects_no_more_than_lambda_min():
    X, y = planted_table(seed=3)
    n_min = len(LassoSelector(random_state=0).fit(X, y).selected_features_)
    n_1se = len(LassoSelector(one_se_rule=True, random_state=0).fit(X, y).selected_features_)
    assert n_1se <= n_min


def test_lasso_selector_zero_features_falls_back_to_best_auc():
    X, y = planted_table()
    # lambda_ratio=1 puts the whole grid at lambda_max, where no coefficient survives.
    with pytest.warns(SelectionFallbackWarning, match="LassoSelector kept no feature"):
        selector = LassoSelector(lambda_ratio=1.0, random_state=0).fit(X, y)
    assert selector.fallback_
    best = X.columns[np.argmax(np.abs(univariate_auc(X.to_numpy(), y) - 0.5))]
    assert list(selector.selected_features_) == [best]
    np.testing.assert_array_equal(selector.coef_, [0.0])
    assert selector.set_output(transform="pandas").transform(X).columns.tolist() == [best]


@pytest.mark.parametrize(("n", "p", "lambda_ratio"), [(120, 30, 1000.0), (60, 200, 10.0)])
def test_least_squares_path_matches_coordinate_descent(n, p, lambda_ratio):
    """The LARS path read at the grid is the LASSO solution (n > p and p > n)."""
    X, y = planted_table(seed=4, n=n, p=p)
    selector = LassoSelector(estimator="lasso", lambda_ratio=lambda_ratio, random_state=0)
    selector.fit(X, y)
    Xc, yc = X.to_numpy() - X.to_numpy().mean(axis=0), y - y.mean()
    _, expected, _ = lasso_path(Xc, yc, alphas=selector.lambdas_, tol=1e-12, max_iter=100_000)
    np.testing.assert_allclose(selector.coef_path_, expected.T, atol=1e-6)
    assert selector.n_iter_ > 0


def test_screened_logistic_path_matches_fitting_every_column():
    """The strong rule only skips columns the full fit would leave at zero."""
    X, y = planted_table(seed=6, n=100, p=150)
    selector = LassoSelector(tol=1e-8, random_state=0).fit(X, y)
    for lam, coef in zip(selector.lambdas_, selector.coef_path_, strict=True):
        full = LogisticRegression(C=1 / lam, l1_ratio=1.0, solver="liblinear", tol=1e-8)
        expected = full.fit(X.to_numpy(), y).coef_[0]
        np.testing.assert_allclose(coef, expected, atol=1e-5)
    assert 0 < selector.coef_path_.astype(bool).sum(axis=1).max() < X.shape[1] / 2


def test_lasso_selector_is_deterministic():
    X, y = planted_table(seed=5)
    first = LassoSelector(random_state=7).fit(X, y)
    second = LassoSelector(random_state=7).fit(X, y)
    np.testing.assert_array_equal(first.selected_features_, second.selected_features_)
    np.testing.assert_array_equal(first.coef_, second.coef_)


@pytest.mark.parametrize("preset", ["lasso", "paper"])
def test_presets_select_planted_features_despite_nans(preset):
    X, y = planted_table()
    X.iloc[::17, 5] = np.nan
    X.iloc[::13, 0] = np.nan
    cfg = selection_preset(preset)
    pipeline = Pipeline(build_selection(cfg)).set_output(transform="pandas")
    out = pipeline.fit_transform(X, y)
    assert set(PLANTED) <= set(out.columns)
    assert out.shape[1] < 100
    assert not out.isna().any().any()
    assert pipeline.steps[-1][1].random_state == 42


def test_none_preset_only_imputes_and_scales():
    X, y = planted_table(n=40, p=6)
    X.iloc[3, 2] = np.nan
    cfg = selection_preset("none")
    assert [name for name, _ in build_selection(cfg)] == ["impute", "scale"]
    out = Pipeline(build_selection(cfg)).set_output(transform="pandas").fit_transform(X, y)
    assert list(out.columns) == list(X.columns)
    np.testing.assert_allclose(out.mean(), 0.0, atol=1e-12)
