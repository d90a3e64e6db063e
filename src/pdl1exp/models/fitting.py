"""The modelling stage: image feature sets swept by Optuna, clinical and combined models.

Every model is fitted on the training split only; its threshold comes from the training
split's out-of-fold predictions and the held-out splits are scored once.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import joblib
import numpy as np
import pandas as pd
from joblib import Memory, Parallel, delayed, effective_n_jobs
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_memory

from pdl1exp.evaluation import delong_ci, youden_threshold
from pdl1exp.hashing import content_key, frame_digest
from pdl1exp.models.clinical import clinical_pipeline, out_of_fold, signature, signature_column
from pdl1exp.models.results import Fitted, ModelResult, split_probas
from pdl1exp.models.tuning import (
    CachedFit,
    SweepJob,
    TuningResult,
    WorkerDone,
    fit_proba,
    model_code_key,
    replay_warnings,
    select_best,
    study_settings,
    sweeps,
)

__all__ = [
    "combined_table",
    "crossfit_out_of_fold",
    "fit_feature_sets",
    "image_models",
    "logistic_model",
]


def image_models(feature_set: str, X: pd.DataFrame, y: pd.Series, splits: pd.Series,
                 centers: pd.Series, results: Mapping[str, TuningResult]) -> list[ModelResult]:
    """The swept classifiers of one image feature set, each refitted on the training split,
    as model results: probabilities per split, the CV ones out of fold, and the threshold.

    Args:
        feature_set: ``dlr``, ``radiomics`` or ``dlr+radiomics``.
        X: the feature set's columns for every patient.
        y: 0/1 labels.
        splits: ``train``/``test``/``external`` per patient.
        centers: center per patient (external splits are reported per center).
        results: the sweep of the training split (:func:`~pdl1exp.models.tuning.sweeps`).
    """
    train = splits.index[splits == "train"]
    models = []
    for name, result in results.items():
        model = result.model  # fitted on the training split with the shared selection
        proba = split_probas(model, X, splits, centers)
        proba["cv"] = result.oof_proba
        threshold = youden_threshold(y.loc[train], result.oof_proba.loc[train])
        fold_sd = float(np.std(result.cv_auc_folds, ddof=1))
        models.append(ModelResult(
            feature_set, name, result.cv_auc, threshold, proba, result.best_params, model,
            features=list(X.columns), extra={"trials.csv": result.trials},
            sweep={"sweep_cv_auc": result.cv_auc, "sweep_cv_auc_fold_sd": fold_sd,
                   "sweep_n_trials": result.n_trials, "sweep_n_pruned": result.n_pruned}))
    return models


def logistic_model(feature_set: str, X: pd.DataFrame, y: pd.Series, splits: pd.Series,
                   centers: pd.Series, *, clinical: Mapping[str, Any], numeric: Sequence[str],
                   categorical: Sequence[str], keep: Sequence[str] = (),
                   log: Sequence[str] = (), spline: Sequence[str] = (), folds: int, seed: int,
                   image: Mapping[str, tuple[ModelResult, pd.DataFrame]] | None = None,
                   memory: Memory | None = None, n_jobs: int = 1) -> ModelResult:
    """The clinical (or combined) logistic model, fitted on the training split.

    The combined model's CV probabilities cross-fit its signatures inside each CV fold (see
    :func:`crossfit_out_of_fold`): a training row's signature never comes from a model that
    saw the fold it is evaluated on.

    Args:
        feature_set: ``clinical`` or ``combined``.
        X: clinical columns (plus image signatures for ``combined``).
        y: 0/1 labels.
        splits: ``train``/``test``/``external`` per patient.
        centers: center per patient.
        clinical: ``cfg.clinical``.
        numeric: numeric columns.
        categorical: categorical columns.
        keep: columns exempt from screening (the image signatures).
        log: numeric columns entering as log(1 + x).
        spline: numeric columns entering as restricted cubic splines.
        folds: CV folds for the out-of-fold predictions.
        seed: CV seed.
        image: signature column → (chosen image model, its feature table), for ``combined``.
        memory: a cache of the image models' fitted selections (:func:`crossfit_out_of_fold`).
        n_jobs: worker processes of the cross-fitted image models (``combined`` only).
    """
    train = splits.index[splits == "train"]
    pipe = clinical_pipeline(clinical, numeric=numeric, categorical=categorical, keep=keep,
                             log=log, spline=spline)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # unseen categories in a fold
        if image:
            oof = crossfit_out_of_fold(pipe, X.loc[train], y.loc[train], image=image,
                                       folds=folds, seed=seed, clip=clinical["signature_clip"],
                                       memory=memory, n_jobs=n_jobs)
        else:
            oof = out_of_fold(pipe, X.loc[train], y.loc[train].to_numpy(), folds=folds,
                              seed=seed)
        model = clone(pipe).fit(X.loc[train], y.loc[train].to_numpy())
        proba = split_probas(model, X, splits, centers)
    proba["cv"] = pd.Series(oof, index=train)
    cv_auc = delong_ci(y.loc[train], oof)[0]
    threshold = youden_threshold(y.loc[train], oof)
    return ModelResult(feature_set, "lr", cv_auc, threshold, proba, {}, model,
                       features=[*numeric, *categorical])


def crossfit_out_of_fold(pipe: Any, X: pd.DataFrame, y: pd.Series, *,
                         image: Mapping[str, tuple[ModelResult, pd.DataFrame]], folds: int,
                         seed: int, clip: float, memory: Memory | None = None,
                         n_jobs: int = 1) -> np.ndarray:
    """Out-of-fold probabilities of a model on image signatures, cross-fitted per fold.

    In each of the ``folds`` stratified folds (the same folds as :func:`out_of_fold`), every
    chosen image model (its selection and hyperparameters fixed) is refitted on the fold's
    training rows: their signatures come from an inner cross-fit, the held-out rows' from the
    refit; ``pipe`` is fitted on the former and scores the latter.

    Args:
        pipe: the unfitted combined pipeline.
        X: training rows (their signature columns are replaced).
        y: their labels.
        image: signature column → (chosen image model, its feature table).
        folds: number of folds (outer and inner).
        seed: CV seed.
        clip: see :func:`signature`.
        memory: a cache of the image models' fitted selections and of the result, keyed by
            the content of the tables, the labels and the models' parameters: a run on the
            same data fits none of them again.
        n_jobs: worker processes for the image models' fits (-1: one per core); every
            fold's inner and refitted fits of every signature are spread over them, and the
            result is the same for any value.
    """
    data = content_key({"X": frame_digest(X), "y": y.tolist(), "image": {
        column: [joblib.hash(clone(model.model)), frame_digest(features)]
        for column, (model, features) in image.items()}})
    crossfit = check_memory(memory).cache(_crossfit,
                                          ignore=["X", "y", "image", "memory", "n_jobs"])
    return crossfit(pipe, X, y, image=image, folds=folds, seed=seed, clip=clip, memory=memory,
                    n_jobs=n_jobs, data=data)


def _crossfit(pipe: Any, X: pd.DataFrame, y: pd.Series, *,
              image: Mapping[str, tuple[ModelResult, pd.DataFrame]], folds: int, seed: int,
              clip: float, memory: Memory | None, n_jobs: int, data: str) -> np.ndarray:
    """:func:`crossfit_out_of_fold`'s computation; ``data`` keys its cache entry.

    Every image-model fit (per outer fold and signature: one per inner fold, as
    :func:`~pdl1exp.models.clinical.out_of_fold` would make, and the refit) is one task of a
    single pool, so that ``n_jobs`` processes stay busy however few the folds.
    """
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    outer = list(splitter.split(X, y))
    labels = y.to_numpy()
    # Each task names its rows: the tables are not copied per task (joblib memory-maps a
    # large one for its worker processes).
    tables = {column: (_selection_cached(clone(model.model), memory), features.loc[X.index])
              for column, (model, features) in image.items()}
    inner = [[(fit_rows[train], fit_rows[val]) for train, val in
              splitter.split(fit_rows, labels[fit_rows])] for fit_rows, _ in outer]
    tasks = (delayed(_fit_proba)(pipeline, table, labels, fit, score)
             for (fit_rows, held_rows), splits in zip(outer, inner, strict=True)
             for pipeline, table in tables.values()
             for fit, score in [*splits, (fit_rows, held_rows)])
    workers = min(effective_n_jobs(n_jobs), len(outer) * len(tables) * (folds + 1))
    probas = iter(Parallel(n_jobs=workers, prefer="processes")(tasks))
    oof = np.empty(len(X))
    for (fit_rows, held_rows), splits in zip(outer, inner, strict=True):
        fit_columns, held_columns = {}, {}
        for column in tables:
            inner_oof = np.empty(len(X))
            for _, score in splits:
                inner_oof[score] = _replayed(next(probas))
            fit_columns[column] = signature(inner_oof[fit_rows], clip=clip)
            held_columns[column] = signature(_replayed(next(probas)), clip=clip)
        fitted = clone(pipe).fit(X.iloc[fit_rows].assign(**fit_columns), labels[fit_rows])
        oof[held_rows] = fitted.predict_proba(X.iloc[held_rows].assign(**held_columns))[:, 1]
    return oof


def _fit_proba(model: Pipeline, X: pd.DataFrame, y: np.ndarray, fit: np.ndarray,
               score: np.ndarray) -> tuple[np.ndarray, list[warnings.WarningMessage]]:
    """:func:`~pdl1exp.models.tuning.fit_proba` on the rows ``fit`` and ``score`` of ``X``
    (positions), sliced in the worker process."""
    return fit_proba(model, X.iloc[fit], y[fit], X.iloc[score])


def _replayed(result: tuple[np.ndarray, list[warnings.WarningMessage]]) -> np.ndarray:
    """A :func:`_fit_proba` result's probabilities, its warnings raised again here."""
    proba, caught = result
    replay_warnings(caught)
    return proba


def _selection_cached(model: Pipeline, memory: Memory | None) -> Pipeline:
    """``model`` (selection steps, then a classifier) with its selection steps as one
    :class:`~pdl1exp.models.tuning.CachedFit` step: the cache holds each fitted selection and
    its few selected columns, not every intermediate table."""
    *selection, classifier = model.steps
    return Pipeline([("selection", CachedFit(Pipeline(selection), memory)), classifier])


def combined_table(table: pd.DataFrame, chosen: Mapping[str, ModelResult], *,
                   clip: float) -> pd.DataFrame:
    """The clinical table plus one signature column per chosen image model.

    Training rows get the cross-fitted (out-of-fold) signature, never in-sample scores;
    held-out rows the refitted model's. ``clip``: see :func:`signature`.
    """
    columns = {}
    for feature_set, model in chosen.items():
        held_out = [p for s, p in model.proba.items() if s not in ("train", "cv")]
        proba = pd.concat([model.proba["cv"], *held_out]).loc[table.index]
        columns[signature_column(feature_set)] = signature(proba.to_numpy(), clip=clip)
    return table.assign(**columns)


def fit_feature_sets(table: pd.DataFrame, features: Mapping[str, pd.DataFrame],
                     splits: pd.Series, *, feature_sets: Sequence[str],
                     combined_signatures: Sequence[str], numeric: Sequence[str],
                     categorical: Sequence[str], log: Sequence[str],
                     spline: Sequence[str], clinical: Mapping[str, Any],
                     classifiers: Mapping[str, Any], selection: Mapping[str, Any],
                     tuning: Mapping[str, Any], study_prefix: str, seed: int,
                     selection_inputs: Mapping[str, Mapping[str, Any]] | None = None,
                     memory: Memory | None = None) -> Fitted:
    """Fit every configured feature set on the training split.

    Args:
        table: the cohort table (``label``, ``center``, clinical columns), one row a patient.
        features: image feature set → its feature table (same index as ``table``).
        splits: ``train``/``test``/``external`` per patient.
        feature_sets: the configured feature sets, in order.
        combined_signatures: image feature sets whose signatures enter ``combined``.
        numeric: clinical numeric columns.
        categorical: clinical categorical columns.
        log: numeric columns entering as log(1 + x) (``dataset.clinical.log``).
        spline: numeric columns entering as restricted cubic splines
            (``dataset.clinical.spline``).
        clinical: ``cfg.clinical``.
        classifiers: ``cfg.classifier``.
        selection: ``cfg.selection``.
        tuning: ``cfg.tuning``.
        study_prefix: Optuna study names start with it (experiment name).
        seed: CV seed of the logistic models.
        selection_inputs: runtime data of the selection steps (ICC replicates, ComBat
            batches).
        memory: a cache of fitted feature selections
            (:func:`~pdl1exp.models.tuning.fit_memory`); None fits every one.

    Raises:
        WorkerDone: with ``tuning.role`` worker (or a lost claim), after running this
            process's share of every sweep: another process finalizes.
    """
    y, centers = table["label"], table["center"]
    train = splits.index[splits == "train"]
    logistic = {"clinical": clinical, "log": log, "spline": spline, "folds": tuning["cv_folds"],
                "seed": seed}
    fitted = Fitted(models=[])
    if "clinical" in feature_sets:
        fitted.models.append(logistic_model("clinical", table, y, splits, centers,
                                            numeric=numeric, categorical=categorical,
                                            **logistic))
    folds = tuning["cv_folds"]

    def standard_error(model: ModelResult) -> float:  # of a swept model's tuning CV AUC
        return model.sweep["sweep_cv_auc_fold_sd"] / np.sqrt(folds)

    image_sets = [f for f in feature_sets if f in features]
    labels = y.loc[train].to_numpy()
    jobs = []
    for feature_set in image_sets:
        X = features[feature_set].loc[train]
        study = content_key({"features": frame_digest(X), "train": sorted(train),
                             "labels": labels.tolist(), "selection": selection,
                             "classifiers": classifiers, "code": model_code_key(),
                             "tuning": study_settings(tuning)})
        jobs.append(SweepJob(X, labels, f"{study_prefix}/{feature_set}/{study}",
                             selection_inputs, label=feature_set))
    # Every image feature set's studies run in one pool (no core waits for a set's slowest)
    outcomes = sweeps(jobs, classifiers=classifiers, selection_cfg=selection, tuning_cfg=tuning,
                      storage=tuning["storage"], memory=memory) if jobs else []
    done: list[str] = []  # sweeps this process only helped with (tuning.role)
    for feature_set, outcome in zip(image_sets, outcomes, strict=True):
        if isinstance(outcome, WorkerDone):  # another process finalizes
            done.append(str(outcome))
            continue
        models = image_models(feature_set, features[feature_set], y, splits, centers, outcome)
        fitted.models.extend(models)
        fitted.chosen[feature_set] = select_best(models, rule=tuning["choice"],
                                                 standard_error=standard_error)
    if done:
        raise WorkerDone(" | ".join(done))
    if "combined" in feature_sets:
        chosen = {f: fitted.chosen[f] for f in combined_signatures}
        fitted.combined_table = combined_table(table, chosen, clip=clinical["signature_clip"])
        signatures = [signature_column(f) for f in chosen]
        image = {signature_column(f): (model, features[f]) for f, model in chosen.items()}
        fitted.models.append(logistic_model(
            "combined", fitted.combined_table, y, splits, centers,
            numeric=[*numeric, *signatures], categorical=categorical, keep=signatures,
            image=image, memory=memory, n_jobs=tuning["n_jobs"], **logistic))
    return fitted
