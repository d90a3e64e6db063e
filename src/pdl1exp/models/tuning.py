"""Optuna sweep of the classifiers by cross-validated ROC AUC on the training data only.

Longer than most modules on purpose: the shared per-fold selection, the study storage, the
trial objective with its pruning and budget, and the refit of each best model are one
protocol whose parts must agree on the same folds.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import optuna
import pandas as pd
from hydra.utils import instantiate
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from sklearn.base import ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sqlalchemy.engine import make_url
from tqdm.auto import tqdm

from pdl1exp.models.classifiers import build_estimator, build_pipeline, suggest_params
from pdl1exp.models.selection import build_selection

__all__ = [
    "CVFold",
    "SharedSelection",
    "TuningResult",
    "prepare_folds",
    "select_best",
    "sweep",
    "tune_classifier",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class CVFold:
    """One stratified CV split, with the selection steps fitted on its training part only."""

    X_train: pd.DataFrame
    y_train: np.ndarray
    X_val: pd.DataFrame
    y_val: np.ndarray
    val_index: np.ndarray  # row positions of the validation part in the full table


@dataclass(frozen=True)
class SharedSelection:
    """The selection fitted once per CV fold and once on all rows, shared by every classifier.

    Attributes:
        folds: the CV folds, each with the selection fitted on its training part only.
        full: the selection pipeline fitted on all rows (for the final models).
        X_full: ``full``'s output on all rows: the final classifiers' training input.
        y: the 0/1 labels of all rows.
    """

    folds: list[CVFold]
    full: Pipeline
    X_full: pd.DataFrame
    y: np.ndarray

    def final_model(self, estimator: ClassifierMixin) -> Pipeline:
        """Selection + classifier fitted on all rows, without refitting the selection.

        The result predicts exactly as ``build_pipeline(selection_cfg, estimator).fit(X, y)``
        would. Its selection steps are a copy: refitting one model leaves the others alone.

        Args:
            estimator: an unfitted classifier (e.g. with a trial's best hyperparameters).
        """
        classifier = clone(estimator).fit(self.X_full, self.y)
        steps = [*copy.deepcopy(self.full.steps), ("classifier", classifier)]
        return Pipeline(steps).set_output(transform="pandas")


@dataclass
class TuningResult:
    """Outcome of one classifier's sweep.

    Attributes:
        name: classifier name (key of ``cfg.classifier``).
        best_params: hyperparameters of the best trial.
        cv_auc: mean validation AUC of the best trial over the CV folds.
        cv_auc_folds: the per-fold AUCs behind ``cv_auc``.
        n_trials: completed trials in the study, resumed ones included (the budget).
        n_pruned: pruned trials, which do not count toward ``n_trials``.
        trials: ``study.trials_dataframe()``.
        best_pipeline: unfitted selection + classifier pipeline with ``best_params``.
        oof_proba: out-of-fold probabilities of the best params on the same CV splits,
            indexed like ``X``.
        model: ``best_pipeline`` fitted on all of ``X``, its selection fitted once and shared
            by every classifier of the sweep (see :meth:`SharedSelection.final_model`).
    """

    name: str
    best_params: dict[str, Any]
    cv_auc: float
    cv_auc_folds: list[float]
    n_trials: int
    n_pruned: int
    trials: pd.DataFrame
    best_pipeline: Pipeline
    oof_proba: pd.Series
    model: Pipeline


def _check_xy(X: pd.DataFrame, y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if len(X) != y.shape[0]:
        msg = f"X has {len(X)} rows but y has {y.shape[0]} labels"
        raise ValueError(msg)
    return y


def prepare_folds(
    X: pd.DataFrame,
    y: np.ndarray,
    *,
    selection_cfg: Mapping[str, Any],
    tuning_cfg: Mapping[str, Any],
    selection_inputs: Mapping[str, Mapping[str, Any]] | None = None,
) -> SharedSelection:
    """Fit the selection steps on each stratified fold's training part and on all rows.

    The selection has no tuned hyperparameters, so fitting it once per fold and reusing it
    across trials and classifiers gives exactly what refitting the whole pipeline in every
    fold of every trial would, much faster; likewise the fit on all rows serves every final
    model. Each fit logs one line when its solvers did not converge.

    Args:
        X: feature table, one row per patient.
        y: 0/1 labels.
        selection_cfg: ``cfg.selection``.
        tuning_cfg: ``cfg.tuning`` (``cv_folds``, ``random_state``).
        selection_inputs: runtime data of the selection steps (``build_selection``).
    """
    y = _check_xy(X, y)
    splitter = StratifiedKFold(
        tuning_cfg["cv_folds"], shuffle=True, random_state=tuning_cfg["random_state"]
    )
    plan = [*splitter.split(X, y), (np.arange(len(y)), None)]
    fits = []
    for k, (train, _) in enumerate(tqdm(plan, desc="Feature selection", unit="fit")):
        what = f"feature selection, fold {k}" if k < len(plan) - 1 else "feature selection, all"
        selection = Pipeline(build_selection(selection_cfg, selection_inputs)).set_output(
            transform="pandas")
        with _counted_convergence_warnings(what):
            fits.append((selection, selection.fit_transform(X.iloc[train], y[train])))
    folds = [
        CVFold(X_train, y[train], selection.transform(X.iloc[val]), y[val], val)
        for (train, val), (selection, X_train) in zip(plan[:-1], fits[:-1], strict=True)
    ]
    full, X_full = fits[-1]
    return SharedSelection(folds, full, X_full, y)


@contextmanager
def _counted_convergence_warnings(what: str) -> Iterator[None]:
    """Replace sklearn's per-fit ConvergenceWarnings by one count (and the first) in the log."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        yield
    convergence = []
    for warning in caught:
        if issubclass(warning.category, ConvergenceWarning):
            convergence.append(warning)
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    if convergence:
        first = str(convergence[0].message).splitlines()[0]
        logger.warning(
            "%s: %d solver fits did not converge (first: %s)", what, len(convergence), first
        )


def _fold_proba(estimator: ClassifierMixin, fold: CVFold) -> np.ndarray:
    """Fit a clone on a fold's selected training features; P(y=1) on its validation part."""
    model = clone(estimator).fit(fold.X_train, fold.y_train)
    return model.predict_proba(fold.X_val)[:, 1]


def _ensure_sqlite_folder(url: str) -> None:
    """Create the folder of a ``sqlite:///path`` file; SQLite will not."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def _open_study(
    storage: str | None, study_name: str, tuning_cfg: Mapping[str, Any]
) -> optuna.Study:
    """Create the study, or load it to resume after an interruption.

    A study is driven by one process at a time, so RUNNING trials found here belong to a
    process that died (killed, out of memory): they are marked FAIL, and never count.
    """
    if storage is not None:
        _ensure_sqlite_folder(storage)
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction="maximize",
        sampler=instantiate(tuning_cfg["sampler"]),
        pruner=instantiate(tuning_cfg["pruner"]),
        load_if_exists=True,
    )
    interrupted = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in interrupted:
        study.tell(trial.number, state=TrialState.FAIL)
    if interrupted:
        numbers = [trial.number for trial in interrupted]
        logger.warning("study %r: interrupted trials %s marked FAIL", study_name, numbers)
    seed = tuning_cfg["sampler"].get("seed")
    if study.trials and seed is not None:
        # Seeded afresh, a resumed sampler would replay the first run's random start-up draws.
        study.sampler = instantiate(tuning_cfg["sampler"], seed=seed + len(study.trials))
    return study


def tune_classifier(
    X: pd.DataFrame,
    y: np.ndarray,
    *,
    name: str,
    spec: Mapping[str, Any],
    selection_cfg: Mapping[str, Any],
    tuning_cfg: Mapping[str, Any],
    storage: str | None,
    study_name: str,
    selection: SharedSelection | None = None,
    selection_inputs: Mapping[str, Mapping[str, Any]] | None = None,
) -> TuningResult:
    """Tune one classifier by its mean stratified K-fold ROC AUC on ``X`` (training data).

    Each trial fits the classifier on every fold's training part (after that fold's own
    selection) and reports the running mean AUC after each fold to the pruner. Trials run
    until ``tuning.n_trials`` have completed: pruned and failed trials do not count, so every
    classifier gets the same budget. A study already in ``storage`` is resumed: its completed
    trials count and only the remainder runs; RUNNING trials left by a killed process are
    marked FAIL. One process at a time drives a study (``tuning.n_jobs`` threads within it;
    with more than one, up to ``n_jobs - 1`` trials beyond the budget may complete).
    ``tuning.timeout_s`` (default null) stops a study early by wall clock: the classifiers'
    budgets then differ and their CV AUCs are no longer comparable.

    Args:
        X: training feature table, one row per patient.
        y: 0/1 labels.
        name: classifier name, for the result and the log.
        spec: ``cfg.classifier[name]`` (``estimator`` + ``search_space``).
        selection_cfg: ``cfg.selection``.
        tuning_cfg: ``cfg.tuning``.
        storage: Optuna RDB URL such as ``sqlite:///mlruns/optuna.db``; ``None`` = in memory.
        study_name: unique per (data, config, classifier); the same name resumes.
        selection: from :func:`prepare_folds` on the same ``X``, ``y``, to share the selection
            fits between classifiers; computed here when omitted.
        selection_inputs: runtime data of the selection steps (``build_selection``).
    """
    y = _check_xy(X, y)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if selection is None:
        selection = prepare_folds(X, y, selection_cfg=selection_cfg, tuning_cfg=tuning_cfg,
                                  selection_inputs=selection_inputs)
    study = _open_study(storage, study_name, tuning_cfg)

    def objective(trial: optuna.Trial) -> float:
        estimator = build_estimator(spec, suggest_params(trial, spec["search_space"]))
        aucs = []
        for step, fold in enumerate(selection.folds):
            aucs.append(float(roc_auc_score(fold.y_val, _fold_proba(estimator, fold))))
            trial.report(float(np.mean(aucs)), step)
            if trial.should_prune():
                raise optuna.TrialPruned
        trial.set_user_attr("fold_aucs", aucs)
        return float(np.mean(aucs))

    n_trials = tuning_cfg["n_trials"]
    start = time.perf_counter()
    with _counted_convergence_warnings(f"tuning {name}"):
        if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < n_trials:
            study.optimize(
                objective,
                timeout=tuning_cfg.get("timeout_s"),
                n_jobs=tuning_cfg["n_jobs"],
                callbacks=[MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE,))],
            )
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            msg = f"study {study_name!r} has no complete trial of {name!r}; raise tuning.timeout_s"
            raise RuntimeError(msg)
        if len(complete) < n_trials:
            logger.warning(
                "%s: %d of %d trials completed within tuning.timeout_s=%s; its CV AUC is not "
                "comparable with the other classifiers'",
                name,
                len(complete),
                n_trials,
                tuning_cfg["timeout_s"],
            )
        best = study.best_trial
        best_estimator = build_estimator(spec, best.params)
        oof = np.empty(len(y))
        for fold in selection.folds:
            oof[fold.val_index] = _fold_proba(best_estimator, fold)
        model = selection.final_model(best_estimator)

    n_pruned = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    logger.info(
        "%s: cv_auc=%.3f, %d complete trials (+%d pruned), %.1f s",
        name,
        best.value,
        len(complete),
        n_pruned,
        time.perf_counter() - start,
    )
    return TuningResult(
        name=name,
        best_params=dict(best.params),
        cv_auc=float(best.value),
        cv_auc_folds=list(best.user_attrs["fold_aucs"]),
        n_trials=len(complete),
        n_pruned=n_pruned,
        trials=study.trials_dataframe(),
        best_pipeline=build_pipeline(selection_cfg, best_estimator, selection_inputs),
        oof_proba=pd.Series(oof, index=X.index, name=name),
        model=model,
    )


def sweep(
    X: pd.DataFrame,
    y: np.ndarray,
    *,
    classifiers: Mapping[str, Mapping[str, Any]],
    selection_cfg: Mapping[str, Any],
    tuning_cfg: Mapping[str, Any],
    storage: str | None,
    study_name: str,
    selection_inputs: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, TuningResult]:
    """Tune every classifier on the same CV folds and fit each best one on all of ``X``.

    The selection is fitted once per fold and once on all of ``X`` and shared by every
    classifier and trial; each result's ``model`` is ready to predict.

    Args:
        X: training feature table.
        y: 0/1 labels.
        classifiers: ``cfg.classifier`` (name -> spec).
        selection_cfg: ``cfg.selection``.
        tuning_cfg: ``cfg.tuning``.
        storage: Optuna RDB URL or ``None``.
        study_name: prefix; each classifier's study is ``<study_name>/<classifier>``.
        selection_inputs: runtime data of the selection steps (``build_selection``).
    """
    selection = prepare_folds(X, y, selection_cfg=selection_cfg, tuning_cfg=tuning_cfg,
                              selection_inputs=selection_inputs)
    return {
        name: tune_classifier(
            X,
            y,
            name=name,
            spec=spec,
            selection_cfg=selection_cfg,
            tuning_cfg=tuning_cfg,
            storage=storage,
            study_name=f"{study_name}/{name}",
            selection=selection,
            selection_inputs=selection_inputs,
        )
        for name, spec in classifiers.items()
    }


def select_best(results: Iterable[T]) -> T:
    """The result (anything with ``cv_auc``: a :class:`TuningResult`, a fitted model) with
    the highest tuning CV AUC, never a test metric; ties go to the first."""
    results = list(results)
    if not results:
        msg = "select_best needs at least one result"
        raise ValueError(msg)
    return max(results, key=lambda result: result.cv_auc)
