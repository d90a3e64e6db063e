"""The modelling stage on feature tables: feature sets, the primary model, whole-chain nested CV."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar
from unittest import mock

import numpy as np
import optuna
import pandas as pd
import pytest
from omegaconf import OmegaConf
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pdl1exp.models import fitting as fitting_module
from pdl1exp.models.clinical import out_of_fold, signature, signature_column
from pdl1exp.models.fitting import crossfit_out_of_fold, fit_feature_sets
from pdl1exp.models.nested import nested_estimates
from pdl1exp.models.results import ModelResult
from pdl1exp.models.selection import LassoSelector
from pdl1exp.models.tuning import fit_memory


def cohort(*, seed: int, n: int = 90, p: int = 30, signal: float = 0.0):
    """Cohort table and a deep-feature table; ``signal`` shifts 3 features in positives."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    index = pd.Index([f"P{i:03d}" for i in range(n)], name="patient_id")
    table = pd.DataFrame({"label": y, "center": "A", "age": rng.normal(60, 9, n),
                          "cea": rng.lognormal(1.0, 0.8, n),
                          "sex": rng.choice(["F", "M"], n)}, index=index)
    X = rng.standard_normal((n, p))
    X[:, :3] += signal * y[:, None]
    deep = pd.DataFrame(X, index=index, columns=[f"dl_{j:04d}" for j in range(p)])
    return table, deep


def chain(compose_cfg, **changes: Any) -> dict[str, Any]:
    """``fit_feature_sets`` keyword arguments from the smoke config (lr only, no storage)."""
    cfg = compose_cfg("+experiment=smoke", "tuning.storage=null")
    plain = {k: OmegaConf.to_container(cfg[k], resolve=True)
             for k in ("clinical", "classifier", "selection", "tuning")}
    return {"feature_sets": ["clinical", "dlr", "combined"], "combined_signatures": ["dlr"],
            "numeric": ["age", "cea"], "categorical": ["sex"], "log": ["cea"], "spline": [],
            "clinical": plain["clinical"],
            "classifiers": {"lr": plain["classifier"]["lr"]}, "selection": plain["selection"],
            "tuning": plain["tuning"], "study_prefix": "test", "seed": 0, **changes}


def holdout(table: pd.DataFrame, *, seed: int) -> pd.Series:
    rng = np.random.default_rng(seed)
    splits = pd.Series("train", index=table.index)
    splits.iloc[rng.permutation(len(table))[: len(table) // 3]] = "test"
    return splits


def test_combined_model_reads_cross_fitted_signatures(compose_cfg) -> None:
    table, deep = cohort(seed=1, signal=1.5)
    splits = holdout(table, seed=1)
    fitted = fit_feature_sets(table, {"dlr": deep}, splits, **chain(compose_cfg))
    assert [m.name for m in fitted.models] == ["clinical/lr", "dlr/lr", "combined/lr"]
    dlr = fitted.chosen["dlr"]
    train = splits.index[splits == "train"]
    column = signature_column("dlr")
    # Training rows: the out-of-fold probability, never the in-sample (apparent) one.
    np.testing.assert_allclose(fitted.combined_table.loc[train, column],
                               signature(dlr.proba["cv"].loc[train].to_numpy(), clip=0.01))
    assert not np.allclose(fitted.combined_table.loc[train, column],
                           signature(dlr.proba["train"].loc[train].to_numpy(), clip=0.01))
    test = splits.index[splits == "test"]
    np.testing.assert_allclose(fitted.combined_table.loc[test, column],
                               signature(dlr.proba["test"].to_numpy(), clip=0.01))
    assert fitted.primary("combined").feature_set == "combined"
    assert fitted.primary("dlr") is dlr
    with pytest.raises(ValueError, match="radiomics"):
        fitted.primary("radiomics")


def test_a_second_fit_on_the_same_data_reads_every_selection_from_the_cache(
        compose_cfg, tmp_path) -> None:
    table, deep = cohort(seed=3, signal=1.5)
    splits = holdout(table, seed=3)
    kwargs = chain(compose_cfg, memory=fit_memory(tmp_path))
    kwargs["tuning"]["n_jobs"] = 1  # the combined model's fits in this process, to count them
    original, fit_proba = LassoSelector.fit, fitting_module._fit_proba
    with mock.patch.object(LassoSelector, "fit", autospec=True, side_effect=original) as fit, \
            mock.patch.object(fitting_module, "_fit_proba", side_effect=fit_proba) as fits:
        first = fit_feature_sets(table, {"dlr": deep}, splits, **kwargs)
        # k CV folds + all rows (sweep); per outer fold k inner folds + its fit rows (combined)
        k = kwargs["tuning"]["cv_folds"]
        assert fit.call_count == k + 1 + k * (k + 1)
        assert crossfit_calls(fits) == k * (k + 1)  # the combined model's image-model fits

        fit.reset_mock()
        fits.reset_mock()
        # The same features built another way (as a warm run reads them from a cache): two
        # memory blocks and an object index, which joblib's own hash of a table tells apart.
        warm = pd.concat([deep.iloc[:, :10], deep.iloc[:, 10:]], axis=1)
        warm.index = warm.index.astype(object)
        again = fit_feature_sets(table, {"dlr": warm}, splits, **kwargs)
        assert fit.call_count == 0
        assert crossfit_calls(fits) == 0  # the combined model's cross-fit is read back whole
    # The final dlr/lr classifier was fitted once, by the first run, and read back since.
    assert len(list(tmp_path.rglob("_fit_classifier/*/output.pkl"))) == 1
    uncached = fit_feature_sets(table, {"dlr": deep}, splits, **chain(compose_cfg))
    for other in (again, uncached):
        for model, expected in zip(other.models, first.models, strict=True):
            for split, proba in expected.proba.items():
                pd.testing.assert_series_equal(model.proba[split], proba, check_index_type=False)
    assert any(tmp_path.rglob("*.pkl"))


def crossfit_calls(fits: mock.Mock) -> int:
    """Fits of an image model (its selection as one cached step) by the combined model's
    cross-fit."""
    return sum(call.args[0].steps[0][0] == "selection" for call in fits.call_args_list)


def test_stored_trials_are_reused_by_the_same_model_code_only(compose_cfg, tmp_path) -> None:
    table, deep = cohort(seed=5, signal=1.0)
    splits = holdout(table, seed=5)
    kwargs = chain(compose_cfg, feature_sets=["dlr"])
    kwargs["tuning"] = {**kwargs["tuning"], "storage": f"sqlite:///{tmp_path}/optuna.db"}
    studies = []
    for code in ("a", "a", "b"):
        with mock.patch("pdl1exp.models.fitting.model_code_key", return_value=code):
            fit_feature_sets(table, {"dlr": deep}, splits, **kwargs)
        studies.append({s for s in optuna.get_all_study_names(kwargs["tuning"]["storage"])
                        if not s.endswith(":finalizer") and ":finalizer:" not in s})
    assert studies[0] == studies[1]  # the same code resumes its study
    assert len(studies[2]) == 2 * len(studies[0])  # other code starts its own


def test_spline_columns_reach_the_clinical_and_combined_models(compose_cfg) -> None:
    table, deep = cohort(seed=1, signal=1.5)
    fitted = fit_feature_sets(table, {"dlr": deep}, holdout(table, seed=1),
                              **chain(compose_cfg, spline=["age"]))
    for model in fitted.models:
        if model.feature_set in ("clinical", "combined"):
            design = model.model.named_steps["columns"].get_feature_names_out().tolist()
            assert {"age", "age'", "age''"} <= set(design)


def test_nested_estimates_cover_every_feature_set_and_fold(compose_cfg) -> None:
    table, deep = cohort(seed=2, signal=1.5)
    result = nested_estimates(table, {"dlr": deep}, outer_folds=3, **chain(compose_cfg))
    assert set(result.oof_proba) == {"clinical", "dlr", "combined"}
    assert all(p.index.equals(table.index) for p in result.oof_proba.values())
    assert result.folds.groupby("feature_set").size().to_dict() == {
        "clinical": 3, "dlr": 3, "combined": 3}
    metrics = result.metrics(table["label"], level=0.95)
    assert metrics["nested_dlr_auc"] > 0.75  # the planted signal is found out of sample
    assert metrics["nested_dlr_auc_ci_lower"] < metrics["nested_dlr_auc"]


@pytest.mark.parametrize("seed", [3, pytest.param(4, marks=pytest.mark.slow),
                                  pytest.param(5, marks=pytest.mark.slow)])
def test_honest_estimates_under_the_null(compose_cfg, seed: int) -> None:
    """Random labels: every nested CI holds 0.5 and the headline test AUC is not inflated."""
    table, deep = cohort(seed=seed)
    train = holdout(table, seed=seed)
    kwargs = chain(compose_cfg, seed=seed)
    result = nested_estimates(table.loc[train == "train"], {"dlr": deep}, outer_folds=3,
                              **kwargs)
    metrics = result.metrics(table["label"], level=0.95)
    for feature_set in ("clinical", "dlr", "combined"):
        low = metrics[f"nested_{feature_set}_auc_ci_lower"]
        high = metrics[f"nested_{feature_set}_auc_ci_upper"]
        assert low <= 0.5 <= high, feature_set
    fitted = fit_feature_sets(table, {"dlr": deep}, train, **kwargs)
    headline = fitted.primary("combined").proba["test"]
    assert roc_auc_score(table["label"].loc[headline.index], headline) < 0.75


def test_robust_selection_gets_icc_replicates_and_combat_centers(compose_cfg) -> None:
    """ICC replicates and ComBat centers reach the selection steps inside every fold; a
    noisy (irreproducible) feature is filtered and the planted center shift is harmonised."""
    table, deep = cohort(seed=7, p=6, signal=1.5)
    rad = deep.rename(columns=lambda c: c.replace("dl_", "rad_"))
    rng = np.random.default_rng(7)
    table["center"] = np.where(np.arange(len(table)) % 2, "A", "B")
    rad.loc[table["center"] == "B"] += 3.0  # a scanner shift
    replicate = rad + rng.normal(0, 0.05, rad.shape)
    replicate["rad_0005"] = rng.standard_normal(len(rad))  # not reproducible
    cfg = compose_cfg("+experiment=smoke", "tuning.storage=null", "selection=robust",
                      "selection.steps.lasso.cv=3",
                      "+selection.steps.combat={_target_: pdl1exp.models.harmonization.ComBat}")
    kwargs = chain(compose_cfg, feature_sets=["radiomics"], combined_signatures=[],
                   selection=OmegaConf.to_container(cfg.selection, resolve=True),
                   selection_inputs={"icc": {"replicates": {"a": rad, "b": replicate}},
                                     "combat": {"batches": table["center"]}})
    fitted = fit_feature_sets(table, {"radiomics": rad}, holdout(table, seed=7), **kwargs)
    steps = fitted.chosen["radiomics"].model.named_steps
    assert "rad_0005" not in steps["icc"].get_feature_names_out()
    assert steps["icc"].icc_.set_index("feature").loc["rad_0005", "kept"] == np.False_
    assert set(steps["combat"].batches) == {"A", "B"}
    assert fitted.primary("radiomics").cv_auc > 0.7


class RecordingClassifier(ClassifierMixin, BaseEstimator):
    """Scores the first column; records the rows of every fit (class-level log)."""

    fits: ClassVar[list[pd.Index]] = []

    def fit(self, X: pd.DataFrame, y: np.ndarray) -> RecordingClassifier:
        type(self).fits.append(X.index)
        self.classes_ = np.unique(y)
        return self

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        p = expit(X.iloc[:, 0].to_numpy())
        return np.column_stack([1 - p, p])

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] > 0.5).astype(int)


def test_combined_cv_refits_signatures_without_the_fold_it_scores() -> None:
    table, deep = cohort(seed=4, signal=1.5)
    y = table["label"]
    # An image model as the sweep fits it: selection steps, then the classifier.
    spy = make_pipeline(StandardScaler(), RecordingClassifier()).set_output(transform="pandas")
    image = ModelResult("dlr", "spy", 0.5, 0.5, {}, {}, spy)
    X = table[["age"]].assign(**{signature_column("dlr"): 0.0})
    pipe = make_pipeline(StandardScaler(), LogisticRegression())
    RecordingClassifier.fits = []
    oof = crossfit_out_of_fold(pipe, X, y, image={signature_column("dlr"): (image, deep)},
                               folds=3, seed=0, clip=0.01)
    held_out = [X.index[held] for _, held in
                StratifiedKFold(3, shuffle=True, random_state=0).split(X, y)]
    fits = RecordingClassifier.fits
    assert len(fits) == 3 * (3 + 1)  # per fold: the inner cross-fit and the refit
    for k, rows in enumerate(held_out):
        for fit in fits[4 * k: 4 * k + 4]:
            assert not fit.intersection(rows).size  # never saw the fold it scores
    # The signature (first deep feature carries the signal) reaches the held-out scores.
    assert roc_auc_score(y, oof) > 0.7


def test_combined_cv_is_the_same_in_worker_processes_and_as_fold_by_fold_refits() -> None:
    table, deep = cohort(seed=5, signal=1.0)
    # Two different image models; feature tables of every patient in another order, the
    # combined model's training rows a subset of them.
    radiomics = deep.iloc[:, 3:].set_axis([f"rad_{j}" for j in range(deep.shape[1] - 3)],
                                          axis=1)
    image = {}
    for name, features, classifier in (
            ("dlr", deep, LogisticRegression(C=0.1)),
            ("radiomics", radiomics, LogisticRegression(C=1.0, max_iter=1))):  # warns
        model = make_pipeline(StandardScaler(), classifier)
        image[signature_column(name)] = (ModelResult(name, "lr", 0.5, 0.5, {}, {}, model),
                                         features.sample(frac=1.0, random_state=0))
    train = table.index[:72]
    X, y = table.loc[train, ["age"]].assign(**dict.fromkeys(image, 0.0)), table.loc[train, "label"]
    pipe = make_pipeline(StandardScaler(), LogisticRegression())
    # Reference: each outer fold's signatures by out_of_fold and a refit, one after another.
    expected = np.empty(len(X))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for fit, held in StratifiedKFold(4, shuffle=True, random_state=1).split(X, y):
            fit_ids, held_ids = X.index[fit], X.index[held]
            y_fit = y.loc[fit_ids].to_numpy()
            inner, outer = {}, {}
            for column, (result, features) in image.items():
                inner[column] = signature(out_of_fold(result.model, features.loc[fit_ids],
                                                      y_fit, folds=4, seed=1), clip=0.01)
                refit = clone(result.model).fit(features.loc[fit_ids], y_fit)
                outer[column] = signature(refit.predict_proba(features.loc[held_ids])[:, 1],
                                          clip=0.01)
            fitted = clone(pipe).fit(X.loc[fit_ids].assign(**inner), y_fit)
            expected[held] = fitted.predict_proba(X.loc[held_ids].assign(**outer))[:, 1]
    for n_jobs in (1, 2):
        # A worker process's warnings are raised again in this one.
        with pytest.warns(ConvergenceWarning):
            oof = crossfit_out_of_fold(pipe, X, y, image=image, folds=4, seed=1, clip=0.01,
                                       n_jobs=n_jobs)
        np.testing.assert_allclose(oof, expected, rtol=0, atol=1e-12)
