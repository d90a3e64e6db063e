"""Tests of pdl1exp.evaluation.tables: metrics, Table 1, odds ratios and screening."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import stats
from scipy.special import expit

from pdl1exp.evaluation import METRICS
from pdl1exp.evaluation.tables import baseline_table, format_p, metrics_numeric, metrics_table
from pdl1exp.models.clinical import clinical_pipeline
from pdl1exp.models.logistic import logistic_terms, odds_ratio_table, univariate_screen

NUMERIC, CATEGORICAL = ["age", "size_mm"], ["sex", "histology"]
# Unpenalised logistic model, so the reference MLE below is the same fit.
MLE_CFG = {
    "screening_p": None,
    "backward_aic": False,
    "spline_knots": 4,
    "estimator": {"_target_": "sklearn.linear_model.LogisticRegression", "C": float("inf"),
                  "solver": "newton-cholesky", "tol": 1e-12, "max_iter": 200},
    "categorical_encoder": {"_target_": "sklearn.preprocessing.OneHotEncoder", "drop": "first",
                            "handle_unknown": "ignore", "sparse_output": False},
}


def newton_logistic(design: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference MLE by Newton-Raphson: coefficients (intercept first), inverse Hessian."""
    d = np.column_stack([np.ones(len(design)), design])
    beta = np.zeros(d.shape[1])
    for _ in range(50):
        p = expit(d @ beta)
        hessian = d.T @ (d * (p * (1 - p))[:, None])
        beta = beta + np.linalg.solve(hessian, d.T @ (y - p))
    p = expit(d @ beta)
    return beta, np.linalg.inv(d.T @ (d * (p * (1 - p))[:, None]))


def loglik(design: np.ndarray, y: np.ndarray) -> float:
    beta, _ = newton_logistic(design, y)
    eta = beta[0] + design @ beta[1:]
    return float((y * eta - np.logaddexp(0, eta)).sum())


def clinical_cohort(seed: int, n: int = 160) -> tuple[pd.DataFrame, np.ndarray]:
    """Clinical variables with a known logistic effect, missing values in age and sex."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({
        "age": rng.normal(62, 9, n).round(),
        "size_mm": rng.gamma(2.0, 10.0, n),
        "sex": rng.choice(["F", "M"], n),
        "histology": rng.choice(["adeno", "other", "squamous"], n, p=[0.5, 0.2, 0.3]),
    })
    eta = (-0.04 * (X.age - 62) + 0.05 * (X.size_mm - 20) + 0.9 * (X.sex == "M")
           - 0.7 * (X.histology == "squamous"))
    y = (rng.random(n) < expit(eta - 0.3)).astype(int)
    X.loc[[0, 4, 9], "age"] = np.nan
    X.loc[[3, 8], "sex"] = np.nan
    return X, y


@pytest.fixture
def cohort() -> tuple[pd.DataFrame, np.ndarray]:
    return clinical_cohort(11)


# ---------------------------------------------------------------------------------------------
# metrics


def long_metrics() -> pd.DataFrame:
    rows = []
    models = [("dlr", "svm"), ("clinical", "lr")]
    splits = {"test": 40, "external_b": 30, "train": 120, "external_a": 25, "cv": 120}
    for k, ((feature_set, classifier), (split, n)) in enumerate(
            (m, s) for m in models for s in splits.items()):
        for j, metric in enumerate((*METRICS, "auc_delong")):
            estimate = 0.5 + 0.01 * k + 0.001 * j
            rows.append({"feature_set": feature_set, "classifier": classifier, "split": split,
                         "n": n, "metric": metric, "estimate": estimate,
                         "ci_lower": estimate - 0.05, "ci_upper": estimate + 0.05})
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=0)
    undefined = (frame.metric == "ppv") & (frame.split == "cv") & (frame.classifier == "lr")
    frame.loc[undefined, ["estimate", "ci_lower", "ci_upper"]] = np.nan
    return frame


def test_metrics_table_orders_and_formats() -> None:
    table = metrics_table(long_metrics())
    assert list(table.columns[:3]) == ["Model", "Split", "n"]
    assert list(table.columns[3:]) == [
        "AUC (95% CI)", "Sensitivity (95% CI)", "Specificity (95% CI)", "Accuracy (95% CI)",
        "PPV (95% CI)", "NPV (95% CI)", "F1 (95% CI)", "Brier (95% CI)"]
    order = ["train", "tuning CV (optimistic)", "test", "external_a", "external_b"]
    assert table["Split"].tolist() == order * 2
    # First appearance in the shuffled rows decides the model order.
    first = long_metrics().assign(model=lambda f: f.feature_set + "/" + f.classifier)
    assert table["Model"].tolist() == [m for m in pd.unique(first.model) for _ in order]
    dlr_test = table[(table.Model == "dlr/svm") & (table.Split == "test")].iloc[0]
    # k = 0 (dlr, test): AUC from the DeLong rows (j = 8), sensitivity j = 1.
    assert dlr_test["AUC (95% CI)"] == "0.51 (0.46–0.56)"
    assert dlr_test["Sensitivity (95% CI)"] == "0.50 (0.45–0.55)"
    assert dlr_test["n"] == 40
    cv = table.Split == "tuning CV (optimistic)"
    lr_cv = table[(table.Model == "clinical/lr") & cv].iloc[0]
    assert lr_cv["PPV (95% CI)"] == "n/a"


def test_metrics_numeric_and_bootstrap_auc() -> None:
    wide = metrics_numeric(long_metrics(), auc_ci="bootstrap")
    row = wide.loc[("dlr/svm", "test")]
    assert row["auc"] == pytest.approx(0.5)
    assert row["auc_ci_upper"] == pytest.approx(0.55)
    assert row["n"] == 40
    delong = metrics_numeric(long_metrics())
    assert delong.loc[("dlr/svm", "test"), "auc"] == pytest.approx(0.508)
    # A model without DeLong rows keeps its bootstrap AUC.
    rows = long_metrics()
    mixed = metrics_numeric(rows[~((rows.classifier == "lr") & (rows.metric == "auc_delong"))])
    assert mixed.loc[("dlr/svm", "test"), "auc"] == pytest.approx(0.508)
    assert mixed.loc[("clinical/lr", "train"), "auc"] == pytest.approx(0.57)
    table = metrics_table(long_metrics(), level=0.9, digits=3)
    assert table.loc[0, "Brier (90% CI)"].count(".") == 3
    with pytest.raises(ValueError, match="missing the column"):
        metrics_table(long_metrics().drop(columns="n"))
    with pytest.raises(ValueError, match="auc_ci"):
        metrics_table(long_metrics(), auc_ci="wald")


# ---------------------------------------------------------------------------------------------
# baseline table


def test_baseline_table_tests_match_scipy() -> None:
    rng = np.random.default_rng(5)
    n = 40
    frame = pd.DataFrame({
        "split": np.repeat(["train", "test"], n // 2),
        "age": rng.normal(60, 8, n),
        "cea": rng.lognormal(1.0, 1.0, n),
        "smoker": ["yes"] * 3 + ["no"] * 17 + ["yes"] * 12 + ["no"] * 8,
        "stage": rng.choice(["I", "II", "III"], n),
    })
    frame.loc[[2, 30], "age"] = np.nan
    table = baseline_table(frame, group="split", numeric=["age", "cea"],
                           categorical=["smoker", "stage"])
    test, train = frame[frame.split == "test"], frame[frame.split == "train"]
    assert list(table.columns) == ["Variable", "Level", "test (n=20)", "train (n=20)", "p", "Test"]

    age = table[table.Variable == "age"]
    assert age.Level.tolist() == ["mean ± SD", "missing"]
    assert age.iloc[0]["Test"] == "Welch t-test"
    expected = stats.ttest_ind(test.age.dropna(), train.age.dropna(), equal_var=False).pvalue
    assert age.iloc[0]["p"] == pytest.approx(expected, rel=1e-12)
    assert age.iloc[1]["test (n=20)"] == "1 (5.0%)"

    cea = table[table.Variable == "cea"].iloc[0]
    assert (cea["Level"], cea["Test"]) == ("median [IQR]", "Mann-Whitney U")
    assert cea["p"] == pytest.approx(stats.mannwhitneyu(test.cea, train.cea).pvalue, rel=1e-12)
    q = np.percentile(test.cea, [25, 50, 75])
    assert cea["test (n=20)"] == f"{q[1]:.1f} [{q[0]:.1f}–{q[2]:.1f}]"

    # smoker yes: 12/20 in test, 3/20 in train; expected counts 7.5, 12.5: chi-square.
    smoker = table[table.Variable == "smoker"]
    counts = [[8, 17], [12, 3]]
    assert smoker.iloc[0]["Test"] == "Chi-square"
    assert smoker.iloc[0]["p"] == pytest.approx(stats.chi2_contingency(counts).pvalue)
    assert smoker.Level.tolist() == ["n (%)", "no", "yes"]
    assert smoker.iloc[2]["test (n=20)"] == "12 (60.0%)"
    stage = table[table.Variable == "stage"].iloc[0]
    assert stage["Test"] == "Chi-square"
    assert np.isnan(table[table.Level == "yes"]["p"]).all()


def test_baseline_table_fisher_for_small_expected_counts() -> None:
    frame = pd.DataFrame({
        "label": [0] * 12 + [1] * 10,
        "egfr": ["mut"] * 1 + ["wt"] * 11 + ["mut"] * 6 + ["wt"] * 4,
    })
    table = baseline_table(frame, group="label", numeric=[], categorical=["egfr"])
    header = table.iloc[0]
    assert header["Test"] == "Fisher exact"
    assert header["p"] == pytest.approx(stats.fisher_exact([[1, 6], [11, 4]]).pvalue)
    assert list(table.columns[2:4]) == ["0 (n=12)", "1 (n=10)"]


def test_baseline_table_needs_two_groups() -> None:
    frame = pd.DataFrame({"g": ["a", "b", "c"], "x": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="exactly 2 levels"):
        baseline_table(frame, group="g", numeric=["x"], categorical=[])
    with pytest.raises(ValueError, match="not in the table"):
        baseline_table(frame.iloc[:2], group="g", numeric=["y"], categorical=[])


def test_format_p() -> None:
    assert format_p(0.0004) == "<0.001"
    assert format_p(0.04321) == "0.043"
    assert format_p(np.nan) == "n/a"


# ---------------------------------------------------------------------------------------------
# logistic models


def hand_design(X: pd.DataFrame) -> np.ndarray:
    """The pipeline's design, built by hand: median-imputed z-scores, reference dummies."""
    num = X[NUMERIC].fillna(X[NUMERIC].median())
    z = (num - num.mean()) / num.std(ddof=0)
    sex = X.sex.fillna(X.sex.mode()[0])
    return np.column_stack([z, sex == "M", X.histology == "other",
                            X.histology == "squamous"]).astype(float)


def test_odds_ratio_table_matches_reference_mle(cohort) -> None:
    X, y = cohort
    model = clinical_pipeline(MLE_CFG, numeric=NUMERIC, categorical=CATEGORICAL).fit(X, y)
    table = odds_ratio_table(model, X, numeric=NUMERIC, categorical=CATEGORICAL)
    beta, covariance = newton_logistic(hand_design(X), y)
    se = np.sqrt(np.diag(covariance))
    assert table["term"].tolist() == ["(Intercept)", "age", "size_mm", "sex_M",
                                      "histology_other", "histology_squamous"]
    assert table["variable"].tolist()[3:] == ["sex", "histology", "histology"]
    np.testing.assert_allclose(table["coef"], beta, rtol=1e-6)
    np.testing.assert_allclose(table["se"], se, rtol=1e-6)
    np.testing.assert_allclose(table["odds_ratio"], np.exp(beta), rtol=1e-6)
    np.testing.assert_allclose(table["ci_lower"], np.exp(beta - 1.959963984540054 * se),
                               rtol=1e-6)
    np.testing.assert_allclose(table["p"], 2 * stats.norm.sf(np.abs(beta / se)), rtol=1e-5)


def test_logistic_terms_reject_other_columns(cohort) -> None:
    X, y = cohort
    model = clinical_pipeline(MLE_CFG, numeric=NUMERIC, categorical=CATEGORICAL).fit(X, y)
    with pytest.raises(ValueError, match="differ from the pipeline"):
        logistic_terms(model, numeric=["age"], categorical=CATEGORICAL)


def test_univariate_screen_likelihood_ratio(cohort) -> None:
    X, y = cohort
    X = X.assign(constant=1.0)
    screen = univariate_screen(X, y, numeric=[*NUMERIC, "constant"], categorical=CATEGORICAL,
                               p_threshold=0.05)
    assert screen["variable"].tolist() == ["age", "size_mm", "constant", "sex", "histology",
                                           "histology"]
    # age: complete cases only, standardised, one degree of freedom.
    present = X.age.notna().to_numpy()
    age = X.age[present].to_numpy()
    z = ((age - age.mean()) / age.std(ddof=1))[:, None]
    stat = 2 * (loglik(z, y[present]) - loglik(np.empty((present.sum(), 0)), y[present]))
    row = screen.iloc[0]
    assert row["n"] == present.sum()
    assert row["p"] == pytest.approx(stats.chi2.sf(stat, 1), rel=1e-6)
    assert row["odds_ratio"] == pytest.approx(np.exp(newton_logistic(z, y[present])[0][1]),
                                              rel=1e-6)
    # histology: two dummies, two degrees of freedom, one p for both rows.
    dummies = np.column_stack([X.histology == "other", X.histology == "squamous"]).astype(float)
    stat = 2 * (loglik(dummies, y) - loglik(np.empty((len(y), 0)), y))
    histology = screen[screen.variable == "histology"]
    np.testing.assert_allclose(histology["p"], stats.chi2.sf(stat, 2), rtol=1e-6)
    assert histology["term"].tolist() == ["histology=other (vs adeno)",
                                          "histology=squamous (vs adeno)"]
    assert (screen["selected"] == (screen["p"] < 0.05)).all()
    assert np.isnan(screen.loc[screen.variable == "constant", "p"]).all()


def test_odds_ratio_table_of_a_spline_variable_gives_the_interquartile_odds_ratio(cohort) -> None:
    """A spline's terms keep their own rows; the added ``age: Q3 vs Q1`` row is the model's
    odds ratio between two patients at the training quartiles, with the Wald CI of that
    contrast (checked against statsmodels on the same design)."""
    X, y = cohort
    model = clinical_pipeline(MLE_CFG, numeric=NUMERIC, categorical=CATEGORICAL,
                              spline=["age"]).fit(X, y)
    table = odds_ratio_table(model, X, numeric=NUMERIC, categorical=CATEGORICAL)
    low, high = np.nanquantile(X["age"], [0.25, 0.75])
    assert table["term"].tolist() == ["(Intercept)", "size_mm", "age", "age'", "age''",
                                      "sex_M", "histology_other", "histology_squamous",
                                      f"age: {high:g} vs {low:g}"]
    assert (table["variable"].iloc[2:5] == "age").all()
    pair = pd.concat([X.iloc[[1]]] * 2).assign(age=[high, low])
    logits = model.decision_function(pair)
    contrast = table.iloc[-1]
    assert contrast["odds_ratio"] == pytest.approx(np.exp(logits[0] - logits[1]), rel=1e-9)
    design = sm.add_constant(np.asarray(model.named_steps["columns"].transform(X), dtype=float))
    reference = sm.Logit(y, design).fit(disp=0)
    np.testing.assert_allclose(table["coef"].iloc[:-1], reference.params, rtol=1e-5, atol=1e-8)
    weights = np.zeros(design.shape[1])
    weights[2:5] = np.diff(np.asarray(model.named_steps["columns"].named_transformers_[
        "spline"].transform(pd.DataFrame({"age": [low, high]}))), axis=0)[0]
    test = reference.t_test(weights)
    assert contrast["coef"] == pytest.approx(float(test.effect[0]), rel=1e-5)
    assert contrast["se"] == pytest.approx(float(test.sd[0, 0]), rel=1e-5)
    assert contrast["p"] == pytest.approx(float(test.pvalue), rel=1e-4)
