"""Tests for the Optuna sweep: no leakage, resume after a kill, determinism, nested CV."""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import subprocess
import sys
from operator import attrgetter
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
import optuna
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from joblib import Parallel, delayed, parallel_config
from omegaconf import OmegaConf
from scipy.stats import norm
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
from sklearn.pipeline import Pipeline

from pdl1exp.models import tuning as tuning_module
from pdl1exp.models.classifiers import build_estimator
from pdl1exp.models.selection import LassoSelector, build_selection
from pdl1exp.models.tuning import (
    SweepJob,
    WorkerDone,
    fit_folds,
    prepare_folds,
    select_best,
    sweep,
    sweeps,
    tune_classifier,
)

CONF = Path(__file__).resolve().parents[1] / "conf"

# Screening by p < 0.05 keeps ~5 % of pure-noise columns: enough to show what leakage does.
UNIVARIATE_SELECTION = {
    "name": "univariate",
    "steps": {
        "impute": {"_target_": "sklearn.impute.SimpleImputer", "strategy": "median"},
        "scale": {"_target_": "sklearn.preprocessing.StandardScaler"},
        "univariate": {
            "_target_": "pdl1exp.models.selection.UnivariateFilter",
            "p_threshold": 0.05,
        },
    },
}


def model_cfg(classifiers: str, selection: str, **tuning: Any) -> dict[str, Any]:
    """Composed ``classifier``/``selection``/``tuning`` groups as plain dicts (seed 42)."""
    overrides = [
        f"+classifier={classifiers}",
        f"+selection={selection}",
        "+tuning=optuna",
        "+seed=42",
        *(f"tuning.{key}={value}" for key, value in tuning.items()),
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def table(*, seed: int, n: int, p: int, n_planted: int = 0, shift: float = 1.0):
    """Gaussian noise with random labels; the first ``n_planted`` columns shift in positives."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    X = rng.standard_normal((n, p))
    X[:, :n_planted] += shift * y[:, None]
    index = pd.Index([f"P{i:04d}" for i in range(n)], name="patient_id")
    return pd.DataFrame(X, index=index, columns=[f"dl_{j:04d}" for j in range(p)]), y


def auc_ci(auc: float, y: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Hanley-McNeil normal-approximation CI of an AUC."""
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (
        n_pos * n_neg
    )
    half = norm.ppf(0.5 + level / 2) * np.sqrt(var)
    return auc - half, auc + half


def tune(X, y, cfg, name="lr", selection=None, **kwargs):
    return tune_classifier(
        X,
        y,
        name=name,
        spec=cfg["classifier"][name],
        selection_cfg=selection or cfg["selection"],
        tuning_cfg=cfg["tuning"],
        **{"storage": None, "study_name": "test", **kwargs},
    )


@pytest.mark.parametrize("selection", ["univariate", "lasso", "paper"])
def test_random_labels_give_chance_auc_and_leakage_would_not(selection):
    X, y = table(seed=11, n=120, p=2000)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.3, stratify=y, random_state=0
    )
    cfg = model_cfg("lr", "lasso" if selection == "univariate" else selection, n_trials=5)
    if selection == "univariate":
        cfg["selection"] = UNIVARIATE_SELECTION
    result = tune(X_train, y_train, cfg)

    low, high = auc_ci(result.cv_auc, y_train)
    assert low < 0.5 < high, f"cv_auc {result.cv_auc:.3f} [{low:.3f}, {high:.3f}]"
    # The final model's selection saw the training rows only.
    test_auc = roc_auc_score(y_test, result.model.predict_proba(X_test)[:, 1])
    low, high = auc_ci(test_auc, y_test)
    assert low < 0.5 < high, f"test_auc {test_auc:.3f} [{low:.3f}, {high:.3f}]"

    if selection == "univariate":
        # The pitfall: selection fitted on all the training data, then CV of the classifier.
        leaky_selection = Pipeline(build_selection(cfg["selection"])).set_output(transform="pandas")
        X_leaky = leaky_selection.fit_transform(X_train, y_train)
        splits = StratifiedKFold(5, shuffle=True, random_state=0)
        estimator = build_estimator(cfg["classifier"]["lr"], result.best_params)
        leaky = cross_val_predict(estimator, X_leaky, y_train, cv=splits, method="predict_proba")
        assert roc_auc_score(y_train, leaky[:, 1]) > 0.7


def test_oof_equals_refitting_the_whole_pipeline_in_each_fold():
    X, y = table(seed=2, n=100, p=150, n_planted=3)
    X.iloc[::7, 4] = np.nan
    cfg = model_cfg("lr", "lasso", n_trials=3, cv_folds=4)
    result = tune(X, y, cfg)
    splits = StratifiedKFold(4, shuffle=True, random_state=cfg["tuning"]["random_state"])
    expected = cross_val_predict(result.best_pipeline, X, y, cv=splits, method="predict_proba")
    np.testing.assert_allclose(result.oof_proba.to_numpy(), expected[:, 1])
    assert result.oof_proba.index.equals(X.index)
    fold_aucs = [roc_auc_score(y[val], expected[val, 1]) for _, val in splits.split(X, y)]
    np.testing.assert_allclose(result.cv_auc_folds, fold_aucs)
    assert result.cv_auc == pytest.approx(np.mean(fold_aucs))
    assert not hasattr(result.best_pipeline.named_steps["classifier"], "coef_")  # unfitted


def test_a_finished_sweep_run_again_fits_the_selection_on_all_rows_only(tmp_path):
    X, y = table(seed=8, n=90, p=40, n_planted=3)
    cfg = model_cfg("[lr,knn]", "lasso", n_trials=2, cv_folds=3)
    search = {"selection_cfg": cfg["selection"], "tuning_cfg": cfg["tuning"],
              "storage": f"sqlite:///{tmp_path}/optuna.db", "study_name": "done"}
    first = sweep(X, y, classifiers=cfg["classifier"], **search)
    original = LassoSelector.fit
    with mock.patch.object(LassoSelector, "fit", autospec=True, side_effect=original) as fit:
        again = sweep(X, y, classifiers=cfg["classifier"], **search)
    assert fit.call_count == 1  # every trial is stored: no fold's selection is needed
    for name, result in again.items():
        pd.testing.assert_series_equal(result.oof_proba, first[name].oof_proba)
        np.testing.assert_array_equal(result.model.predict_proba(X),
                                      first[name].model.predict_proba(X))


def test_a_shared_selection_pickles_with_its_folds_still_to_fit():
    X, y = table(seed=9, n=60, p=12, n_planted=2)
    cfg = model_cfg("lr", "lasso", n_trials=1, cv_folds=3)
    shared = prepare_folds(X, y, selection_cfg=cfg["selection"], tuning_cfg=cfg["tuning"])
    restored = pickle.loads(pickle.dumps(shared))
    for fold, expected in zip(restored.folds, shared.folds, strict=True):
        pd.testing.assert_frame_equal(fold.X_val, expected.X_val)


def test_the_best_trials_oof_probabilities_come_from_its_trial_not_a_refit(tmp_path):
    X, y = table(seed=2, n=90, p=20, n_planted=3)
    cfg = model_cfg("lr", "none", n_trials=3, cv_folds=3, n_jobs=1)  # counted here
    fits = mock.patch.object(tuning_module, "_fold_proba", side_effect=tuning_module._fold_proba)
    with fits as fold_fits:
        fresh = tune(X, y, cfg)
    assert fold_fits.call_count == 3 * 3  # the trials' folds only
    assert "user_attrs_oof_proba" not in fresh.trials  # kept out of trials.csv
    # A study stored before trials kept their OOF probabilities: its best trial's are refitted.
    storage = {"storage": f"sqlite:///{tmp_path}/optuna.db", "study_name": "older"}
    with mock.patch.object(tuning_module, "_OOF", "not_stored"):
        tune(X, y, cfg, **storage)
    with fits as fold_fits:
        resumed = tune(X, y, cfg, **storage)
    assert fold_fits.call_count == 3
    for result in (fresh, resumed):
        splits = StratifiedKFold(3, shuffle=True, random_state=cfg["tuning"]["random_state"])
        expected = cross_val_predict(result.best_pipeline, X, y, cv=splits,
                                     method="predict_proba")
        np.testing.assert_allclose(result.oof_proba.to_numpy(), expected[:, 1], rtol=0,
                                   atol=1e-12)


def test_same_seed_same_sweep_and_planted_features_found():
    X, y = table(seed=3, n=100, p=60, n_planted=3)
    cfg = model_cfg("lr", "lasso", n_trials=4)
    first, second = tune(X, y, cfg), tune(X, y, cfg)
    assert first.best_params == second.best_params
    assert first.cv_auc == second.cv_auc
    assert first.cv_auc_folds == second.cv_auc_folds
    pd.testing.assert_series_equal(first.oof_proba, second.oof_proba)
    assert first.cv_auc > 0.75
    assert len(first.trials) == 4
    assert first.n_trials == 4
    selected = [
        clone(result.best_pipeline).fit(X, y).named_steps["lasso"].selected_features_
        for result in (first, second)
    ]
    np.testing.assert_array_equal(*selected)
    assert {"dl_0000", "dl_0001", "dl_0002"} <= set(selected[0])


SRC = Path(__file__).resolve().parents[1] / "src"

# A sweep in a child process (argv: pickled tune_classifier kwargs, tuning.role, fits before
# it blocks mid-trial, -1: never): what a worker or a crashed run leaves in the storage.
WORKER = """
import pickle, sys, threading
from sklearn.linear_model import LogisticRegression
from pdl1exp.models.tuning import WorkerDone, tune_classifier

FITS_BEFORE_BLOCK = int(sys.argv[3])


class BlockingLogisticRegression(LogisticRegression):
    \"\"\"Tells the parent and blocks at the first fit after FITS_BEFORE_BLOCK, mid-trial.\"\"\"

    fits = 0

    def fit(self, X, y, sample_weight=None):
        type(self).fits += 1
        if type(self).fits > FITS_BEFORE_BLOCK:
            print("blocked", flush=True)
            threading.Event().wait()  # until the parent kills this process
        return super().fit(X, y, sample_weight)


with open(sys.argv[1], "rb") as handle:
    kwargs = pickle.load(handle)
kwargs["tuning_cfg"]["role"] = sys.argv[2]
if FITS_BEFORE_BLOCK >= 0:
    kwargs["spec"]["estimator"]["_target_"] = "__main__.BlockingLogisticRegression"
try:
    result = tune_classifier(**kwargs)
except WorkerDone as done:
    print("worker", done.summary, flush=True)
else:
    print("final", result.n_trials, flush=True)
"""



def start_worker(tmp_path: Path, kwargs: dict, role: str, *,
                 fits_before_block: int = -1) -> subprocess.Popen:
    (tmp_path / "kwargs.pkl").write_bytes(pickle.dumps(kwargs))
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get(
        "PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "kwargs.pkl"), role,
         str(fits_before_block)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env)


def test_killed_sweep_resumes_without_losing_or_repeating_trials(tmp_path):
    n_trials, cv_folds, done_before_kill = 8, 3, 2
    X, y = table(seed=4, n=60, p=8, n_planted=2)
    # The killed trial goes stale after 2 s without heartbeat (the resumed sweep waits for it).
    cfg = model_cfg("lr", "none", n_trials=n_trials, cv_folds=cv_folds,
                    heartbeat_interval=1, grace_period=2, n_jobs=1)  # fits counted in the child
    cfg["tuning"]["pruner"] = {"_target_": "optuna.pruners.NopPruner"}
    db = tmp_path / "optuna.db"
    kwargs = {
        "X": X,
        "y": y,
        "name": "lr",
        "spec": cfg["classifier"]["lr"],
        "selection_cfg": cfg["selection"],
        "tuning_cfg": cfg["tuning"],
        "storage": f"sqlite:///{db}",
        "study_name": "resume",
    }
    # The child completes two trials, then blocks in the first fold of the third one, which
    # is RUNNING in the storage: killed there, it leaves what a crash mid-trial leaves.
    with start_worker(tmp_path, kwargs, "auto",
                      fits_before_block=done_before_kill * cv_folds) as process:
        line = process.stdout.readline()
        if line != "blocked\n":
            process.kill()
            pytest.fail(f"the child ended before blocking: {process.communicate()[1]}")
        process.kill()
        process.wait()

    before = optuna.load_study(study_name="resume", storage=f"sqlite:///{db}").trials
    first = [(t.number, t.params, t.value) for t in before if t.state.name == "COMPLETE"]
    interrupted = [t.number for t in before if t.state.name == "RUNNING"]
    assert len(first) == done_before_kill
    assert interrupted == [done_before_kill]

    result = tune_classifier(**kwargs)
    after = optuna.load_study(study_name="resume", storage=f"sqlite:///{db}").trials
    complete = [t for t in after if t.state.name == "COMPLETE"]
    assert result.n_trials == len(complete) == n_trials
    assert [(t.number, t.params, t.value) for t in complete[: len(first)]] == first
    assert len({tuple(sorted(t.params.items())) for t in complete}) == n_trials  # no repeats
    assert all(after[number].state.name == "FAIL" for number in interrupted)
    assert not [t for t in after if t.state.name == "RUNNING"]

    # A finished study resumes to itself: nothing more runs.
    again = tune_classifier(**kwargs)
    assert len(again.trials) == len(after)
    assert again.best_params == result.best_params


def test_pruned_trials_do_not_count_toward_the_budget():
    X, y = table(seed=7, n=80, p=20, n_planted=2)
    cfg = model_cfg("lr", "none", n_trials=6, cv_folds=4)
    assert cfg["tuning"]["timeout_s"] is None  # reported runs have no wall-clock budget
    # Prune eagerly: after one complete trial, any trial below the median after a fold.
    cfg["tuning"]["pruner"] = {
        "_target_": "optuna.pruners.MedianPruner",
        "n_startup_trials": 1,
        "n_warmup_steps": 0,
    }
    result = tune(X, y, cfg)
    states = result.trials["state"].value_counts()
    assert result.n_trials == states["COMPLETE"] == 6
    assert result.n_pruned == states["PRUNED"] > 0
    assert len(result.trials) == 6 + result.n_pruned


@pytest.mark.parametrize("pruner", ["NopPruner", "MedianPruner"])
def test_folds_are_reported_to_a_pruner_only(tmp_path, pruner):
    """Each fold's running mean is stored (a commit) only when a pruner can act on it."""
    X, y = table(seed=7, n=80, p=20, n_planted=2)
    cfg = model_cfg("lr", "none", n_trials=3, cv_folds=4, n_jobs=1)
    cfg["tuning"]["pruner"] = {"_target_": f"optuna.pruners.{pruner}"}
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = tune(X, y, cfg, storage=storage, study_name="reports")
    trials = optuna.load_study(study_name="reports", storage=storage).trials
    reported = [len(trial.intermediate_values) for trial in trials]
    assert reported == ([0] * 3 if pruner == "NopPruner" else [4] * 3)
    assert [len(trial.user_attrs["fold_aucs"]) for trial in trials] == [4] * 3
    assert result.cv_auc == pytest.approx(max(trial.value for trial in trials))


def two_classifier_search() -> dict[str, Any]:
    """Keyword arguments of a small lr + knn search (3 folds, 3 trials each)."""
    cfg = model_cfg("[lr,knn]", "none", n_trials=3, cv_folds=3)
    return {
        "classifiers": cfg["classifier"],
        "selection_cfg": cfg["selection"],
        "tuning_cfg": cfg["tuning"],
    }


def test_sweep_names_studies_and_select_best_uses_cv_auc(tmp_path):
    X, y = table(seed=5, n=80, p=20, n_planted=2)
    storage = f"sqlite:///{tmp_path}/sub/optuna.db"  # the folder is created
    results = sweep(X, y, **two_classifier_search(), storage=storage, study_name="exp")
    assert list(results) == ["lr", "knn"]
    # One study per classifier, and the sweep's finalization claim.
    assert sorted(optuna.get_all_study_names(storage)) == ["exp/knn", "exp/lr", "exp:finalizer"]
    best = select_best(results.values())
    assert best.cv_auc == max(result.cv_auc for result in results.values())
    assert select_best(reversed(list(results.values()))).cv_auc == best.cv_auc
    with pytest.raises(ValueError, match="at least one"):
        select_best([])


def test_one_se_rule_takes_the_simplest_classifier_within_one_standard_error():
    candidates = [SimpleNamespace(name=n, cv_auc=a, se=se) for n, a, se in
                  [("lr", 0.724, 0.03), ("svm", 0.725, 0.03), ("extra_trees", 0.747, 0.03)]]
    se = attrgetter("se")
    assert select_best(candidates).name == "extra_trees"
    assert select_best(candidates, rule="one_se", standard_error=se).name == "lr"  # 0.717 bar
    tight = [*candidates[:2], SimpleNamespace(name="rf", cv_auc=0.747, se=0.01)]
    assert select_best(tight, rule="one_se", standard_error=se).name == "rf"  # 0.737 bar
    with pytest.raises(ValueError, match=r"tuning\.choice='worst'"):
        select_best(candidates, rule="worst", standard_error=se)


def test_a_wall_clock_budget_is_flagged_as_incomparable(tmp_path, caplog):
    X, y = table(seed=7, n=60, p=10, n_planted=2)
    storage = {"storage": f"sqlite:///{tmp_path}/optuna.db", "study_name": "clock"}
    tune(X, y, model_cfg("lr", "none", n_trials=1, cv_folds=3), **storage)
    # An expired clock starts no trial: the resumed study keeps its one of three. Optuna's
    # clock ticks in microseconds, so on a fast machine no time at all may pass before its
    # first check: every reading of this clock is a second after the previous one.
    ticks = iter(range(10**6))

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2026, 1, 1) + datetime.timedelta(seconds=next(ticks))

    cfg = model_cfg("lr", "none", n_trials=3, cv_folds=3, timeout_s=0.5)
    clock = mock.patch("optuna.study._optimize.datetime", SimpleNamespace(datetime=Clock))
    with clock, caplog.at_level(logging.WARNING, logger="pdl1exp.models.tuning"):
        result = tune(X, y, cfg, **storage)
        assert result.n_trials == 1
        assert "1 of 3 trials completed within tuning.timeout_s" in caplog.text
        with pytest.raises(RuntimeError, match="no complete trial"):
            tune(X, y, cfg, storage=None, study_name="clock")


def test_selection_is_fitted_once_per_fold_and_once_for_every_final_model():
    X, y = table(seed=8, n=90, p=40, n_planted=3)
    # n_jobs=1: the folds' selections are fitted in this process, where the mock counts them
    cfg = model_cfg("[lr,knn]", "lasso", n_trials=2, cv_folds=3, n_jobs=1)
    search = {"selection_cfg": cfg["selection"], "tuning_cfg": cfg["tuning"]}
    original = LassoSelector.fit
    with mock.patch.object(LassoSelector, "fit", autospec=True, side_effect=original) as fit:
        results = sweep(
            X, y, classifiers=cfg["classifier"], **search, storage=None, study_name="shared"
        )
    assert fit.call_count == 3 + 1  # the CV folds, then all rows; not once per classifier
    for result in results.values():
        refitted = clone(result.best_pipeline).fit(X, y)
        np.testing.assert_allclose(result.model.predict_proba(X), refitted.predict_proba(X))
    lr, knn = (results[name].model.named_steps["lasso"] for name in ("lr", "knn"))
    assert lr is not knn  # copies: refitting one final model leaves the other alone
    np.testing.assert_array_equal(lr.selected_features_, knn.selected_features_)




def test_non_finite_probabilities_stop_the_sweep_with_the_trial_named():
    X, y = table(seed=3, n=60, p=8, n_planted=2)
    # timeout_s: without the check every trial would fail (value NaN) and none complete
    cfg = model_cfg("lr", "none", n_trials=2, cv_folds=3, n_jobs=1, timeout_s=30)

    def nan(estimator, fold):
        return np.full(len(fold.y_val), np.nan), []

    with mock.patch.object(tuning_module, "_fold_proba", side_effect=nan), \
            pytest.raises(ValueError, match=r"trial 0 .* CV fold 0: the classifier predicted NaN"):
        tune(X, y, cfg)


def test_a_cv_fold_with_one_class_is_one_clear_error():
    """Three positives cannot fill five folds: one error naming the folds and the counts
    (no fold AUC exists; a NaN trial value would never complete)."""
    X, y = table(seed=3, n=40, p=6)
    y = np.zeros(40, dtype=int)
    y[:3] = 1
    cfg = model_cfg("lr", "none", n_trials=1, cv_folds=5, n_jobs=1)
    with pytest.warns(UserWarning, match="least populated class"), \
            pytest.raises(ValueError, match=r"cv_folds=5: CV fold \d holds only one class "
                                            r"\(training labels: 3 positive, 37 negative\)"):
        prepare_folds(X, y, selection_cfg=cfg["selection"], tuning_cfg=cfg["tuning"])


def test_worker_processes_warnings_reach_the_log_as_one_count(caplog, recwarn):
    """A fold fitted in a worker process warns there; the sweep logs one line counting them."""
    X, y = table(seed=4, n=80, p=10, n_planted=2)
    cfg = model_cfg("lr", "none", n_trials=2, cv_folds=2, n_jobs=2)
    cfg["classifier"]["lr"]["estimator"]["max_iter"] = 1  # every fit stops early
    with caplog.at_level(logging.WARNING, logger=tuning_module.__name__):
        tune(X, y, cfg)
    sweep_lines = [r.getMessage() for r in caplog.records
                   if r.getMessage().startswith("tuning lr:")]
    assert len(sweep_lines) == 1
    assert sweep_lines[0].startswith("tuning lr: 4 solver fits did not converge (first: lbfgs")
    assert not [w for w in recwarn if issubclass(w.category, ConvergenceWarning)]


def test_studies_on_a_shared_storage_run_side_by_side_with_the_same_trials(
        tmp_path, monkeypatch, caplog, recwarn):
    """On a storage, two workers each run a classifier's study (its folds one after another):
    the same trials as the studies one after another here, every study's warnings counted in
    this log, and a relative SQLite path found by workers started in another folder."""
    X, y = table(seed=5, n=80, p=12, n_planted=2)
    cfg = model_cfg("[lr,knn]", "none", n_trials=3, cv_folds=3, n_jobs=2)
    cfg["classifier"]["lr"]["estimator"]["max_iter"] = 1  # every lr fit warns once
    kwargs = {"classifiers": cfg["classifier"], "selection_cfg": cfg["selection"]}
    Parallel(n_jobs=2)(delayed(os.getcwd)() for _ in range(2))  # workers started here
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger=tuning_module.__name__):
        side = sweep(X, y, **kwargs, tuning_cfg=cfg["tuning"], storage="sqlite:///rel/a.db",
                     study_name="side")
    one = sweep(X, y, **kwargs, tuning_cfg={**cfg["tuning"], "n_jobs": 1},
                storage="sqlite:///rel/b.db", study_name="one")
    for name in ("lr", "knn"):
        columns = ["number", "value", *side[name].trials.filter(like="params_").columns]
        pd.testing.assert_frame_equal(side[name].trials[columns], one[name].trials[columns])
        np.testing.assert_array_equal(side[name].oof_proba, one[name].oof_proba)
        trials = optuna.load_study(study_name=f"side/{name}", storage="sqlite:///rel/a.db").trials
        assert os.getpid() not in {trial.user_attrs["worker"]["pid"] for trial in trials}
    counted = "tuning lr: 9 solver fits did not converge (first: lbfgs"  # 3 trials x 3 folds
    assert [r.getMessage()[:len(counted)] for r in caplog.records
            if r.getMessage().startswith("tuning")] == [counted, counted]  # either way
    assert not [w for w in recwarn if issubclass(w.category, ConvergenceWarning)]


def test_folds_fitted_in_worker_processes_equal_the_folds_fitted_here(caplog, recwarn):
    """Two tables' folds in one pool of 2 processes: the same folds as fitted in this
    process, each fold's solver warnings counted in one line of this log naming its table."""
    cfg = model_cfg("lr", "lasso", cv_folds=3, n_jobs=2)
    cfg["selection"]["steps"]["lasso"]["max_iter"] = 1  # every LASSO fit stops early
    kwargs = {"selection_cfg": cfg["selection"], "tuning_cfg": cfg["tuning"]}
    tables = [table(seed=seed, n=60, p=12, n_planted=2) for seed in (6, 7)]
    with caplog.at_level(logging.WARNING, logger=tuning_module.__name__):
        pooled = fit_folds([prepare_folds(X, y, **kwargs) for X, y in tables], n_jobs=2,
                           labels=["a", "b"])
    counted = [r.getMessage() for r in caplog.records if "feature selection, fold" in
               r.getMessage()]
    assert [line[:line.index(":", 3)] for line in counted] == [
        f"{label}: feature selection, fold {k}" for label in "ab" for k in range(3)]
    assert all("did not converge" in line for line in counted)
    assert not [w for w in recwarn if issubclass(w.category, ConvergenceWarning)]
    for (X, y), folds in zip(tables, pooled, strict=True):
        here = prepare_folds(X, y, **kwargs).folds
        for fold, expected in zip(folds, here, strict=True):
            pd.testing.assert_frame_equal(fold.X_train, expected.X_train, check_exact=True)
            pd.testing.assert_frame_equal(fold.X_val, expected.X_val, check_exact=True)
            np.testing.assert_array_equal(fold.val_index, expected.val_index)


def test_a_selection_given_twice_is_fitted_once_and_inside_a_worker_here():
    """The same selection twice: its folds fitted once, both entries given them. Where joblib
    would nest threads (a multirun job's worker process), the folds are fitted here."""
    cfg = model_cfg("lr", "lasso", cv_folds=3, n_jobs=2)
    selection = prepare_folds(*table(seed=6, n=60, p=12, n_planted=2),
                              selection_cfg=cfg["selection"], tuning_cfg=cfg["tuning"])
    with parallel_config(backend="threading"), \
            mock.patch.object(tuning_module, "Parallel", wraps=Parallel) as pool:
        first, second = fit_folds([selection, selection], n_jobs=2)
    assert pool.call_args.kwargs["n_jobs"] == 1
    assert first is second is selection.folds
    assert len(first) == 3


def test_several_tables_studies_run_in_one_pool_with_the_same_trials(tmp_path):
    """sweeps() of two feature tables on a storage (their four studies in one pool of worker
    processes) gives each table what sweep() of it alone, in this process, gives."""
    cfg = model_cfg("[lr,knn]", "none", n_trials=3, cv_folds=3, n_jobs=2)
    kwargs = {"classifiers": cfg["classifier"], "selection_cfg": cfg["selection"]}
    tables = {"a": table(seed=5, n=80, p=12, n_planted=2), "b": table(seed=6, n=70, p=9)}
    pooled = sweeps([SweepJob(X, y, f"pooled/{key}") for key, (X, y) in tables.items()],
                    **kwargs, tuning_cfg=cfg["tuning"], storage=f"sqlite:///{tmp_path}/a.db")
    for (key, (X, y)), results in zip(tables.items(), pooled, strict=True):
        alone = sweep(X, y, **kwargs, tuning_cfg={**cfg["tuning"], "n_jobs": 1},
                      storage=f"sqlite:///{tmp_path}/b.db", study_name=f"alone/{key}")
        for name in ("lr", "knn"):
            columns = ["number", "value", *alone[name].trials.filter(like="params_").columns]
            pd.testing.assert_frame_equal(results[name].trials[columns],
                                          alone[name].trials[columns])
            np.testing.assert_array_equal(results[name].oof_proba, alone[name].oof_proba)
            trials = optuna.load_study(study_name=f"pooled/{key}/{name}",
                                       storage=f"sqlite:///{tmp_path}/a.db").trials
            assert os.getpid() not in {trial.user_attrs["worker"]["pid"] for trial in trials}


def test_a_sweep_another_process_claimed_makes_this_one_a_worker_for_the_rest(tmp_path):
    """Of several tables, the first whose finalization another process holds gives a
    WorkerDone naming that process, and every later table one too (this process only ran
    trials); the tables before it are finalized here."""
    cfg = model_cfg("lr", "none", n_trials=2, cv_folds=3, n_jobs=1)
    jobs = [SweepJob(*table(seed=seed, n=50, p=6), f"claimed/{seed}") for seed in (1, 2, 3)]
    claim = tuning_module._claim

    def held_elsewhere(storage, name, role):
        return (None, "pid 1 on another host") if name == "claimed/2" else claim(storage, name,
                                                                                  role)

    with mock.patch.object(tuning_module, "_claim", side_effect=held_elsewhere):
        first, second, third = sweeps(
            jobs, classifiers=cfg["classifier"], selection_cfg=cfg["selection"],
            tuning_cfg=cfg["tuning"], storage=f"sqlite:///{tmp_path}/optuna.db")
    assert first["lr"].n_trials == 2
    assert isinstance(second, WorkerDone)
    assert "claimed/2" in second.summary
    assert "pid 1 on another host finalizes" in second.summary
    assert isinstance(third, WorkerDone)
    assert "another process finalizes" in third.summary
    assert "lr 2/2 (2 here)" in third.summary  # its trials ran before the claims


def test_inside_a_worker_the_studies_run_one_after_another_here(tmp_path):
    """Where joblib would nest threads (a multirun job's worker process), the studies are not
    run side by side: their warning filters would be shared."""
    X, y = table(seed=5, n=60, p=8, n_planted=2)
    cfg = model_cfg("[lr,knn]", "none", n_trials=2, cv_folds=3, n_jobs=2)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    spy = mock.patch.object(tuning_module, "_study_process",
                            side_effect=tuning_module._study_process)
    with parallel_config(backend="threading"), spy as study_process:  # as in joblib's workers
        sweep(X, y, classifiers=cfg["classifier"], selection_cfg=cfg["selection"],
              tuning_cfg=cfg["tuning"], storage=storage, study_name="nested")
    assert not study_process.called
    for name in ("lr", "knn"):
        trials = optuna.load_study(study_name=f"nested/{name}", storage=storage).trials
        assert {trial.user_attrs["worker"]["pid"] for trial in trials} == {os.getpid()}


def test_a_study_in_a_worker_stops_when_the_sweeps_process_is_gone():
    """Between trials a worker's study checks its parent: re-parented (the sweep's process was
    killed) it stops, leaving no study running behind a killed sweep."""
    study = mock.Mock()
    tuning_module._stop_when_orphaned(os.getppid())(study, None)  # the parent lives on
    study.stop.assert_not_called()
    tuning_module._stop_when_orphaned(os.getppid() + 1)(study, None)  # another parent
    study.stop.assert_called_once()
