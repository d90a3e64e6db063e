"""Optuna sweep of the classifiers by cross-validated ROC AUC on the training data only.

Longer than most modules on purpose: the shared per-fold selection, the study storage, the
trial objective with its pruning and budget, and the refit of each best model are one
protocol whose parts must agree on the same folds.
"""

from __future__ import annotations

import collections
import copy
import functools
import logging
import os
import socket
import sqlite3
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import optuna
import pandas as pd
from hydra.utils import instantiate
from joblib import Memory, Parallel, delayed, effective_n_jobs
from joblib.parallel import get_active_backend
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted, check_memory
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url
from tqdm.auto import tqdm

from pdl1exp.hashing import content_key, frame_digest
from pdl1exp.memo import code_key
from pdl1exp.models.classifiers import build_estimator, build_pipeline, suggest_params
from pdl1exp.models.selection import build_selection, univariate_auc

__all__ = [
    "CVFold",
    "CachedFit",
    "SharedSelection",
    "SweepJob",
    "TrialSeededSampler",
    "TuningResult",
    "WorkerDone",
    "fail_dead_trials",
    "fit_folds",
    "fit_memory",
    "fit_proba",
    "model_code_key",
    "open_storage",
    "prepare_folds",
    "replay_warnings",
    "select_best",
    "study_settings",
    "sweep",
    "sweeps",
    "tune_classifier",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

ROLES = ("auto", "worker", "finalize")
# The user attribute holding a completed trial's out-of-fold P(y=1), in row order: the
# best trial's are the sweep's OOF predictions, without refitting its folds.
_OOF = "oof_proba"
# Libraries whose version changes what a selection or a classifier fits.
_MODEL_LIBRARIES = ("scikit-learn", "numpy", "scipy", "pandas", "neuroCombat", "xgboost",
                    "xgboost-cpu", "lightgbm")
# When this process started: a finished sweep's claim is taken over by a later command only.
_STARTED = time.time()


# Settings of how (and where) a sweep runs, not of what it finds: processes that differ in
# them must share one study. n_jobs only spreads a trial's folds over processes; choice only
# reads the finished studies.
_RUNTIME_SETTINGS = ("storage", "role", "heartbeat_interval", "grace_period", "max_retry",
                     "n_jobs", "choice")


def study_settings(tuning_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The tuning settings that change a sweep's result: what a study's name must hash, so
    that workers with different ``tuning.role``, storage or ``n_jobs`` join the same study."""
    return {k: v for k, v in tuning_cfg.items() if k not in _RUNTIME_SETTINGS}


class WorkerDone(Exception):  # noqa: N818 - an outcome, not an error
    """A sweep process ran its share of the trials and another one finalizes.

    Raised by :func:`sweep` / :func:`tune_classifier` (returned per table by :func:`sweeps`)
    with ``tuning.role=worker``, or with ``role=auto`` when another process claimed the
    finalization first. The entry point
    prints ``summary`` (one line) and exits with status 0.
    """

    def __init__(self, summary: str) -> None:
        super().__init__(summary)
        self.summary = summary


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

    The folds' selections are fitted on first use of :attr:`folds` (or by :func:`fit_folds`,
    in worker processes): a sweep whose trials are all stored (with their out-of-fold
    probabilities) never needs them.

    Attributes:
        X: the feature table, one row per patient.
        splits: the stratified CV splits, (train, validation) row positions.
        fit: a fresh selection pipeline fitted on the given rows, and its output on them.
        full: the selection pipeline fitted on all rows (for the final models).
        X_full: ``full``'s output on all rows: the final classifiers' training input.
        y: the 0/1 labels of all rows.
        memory: the cache of fitted selections, which also keeps the final classifiers.
    """

    X: pd.DataFrame
    splits: list[tuple[np.ndarray, np.ndarray]]
    fit: Callable[[np.ndarray], tuple[Pipeline, pd.DataFrame]]
    full: Pipeline
    X_full: pd.DataFrame
    y: np.ndarray
    memory: Memory | str | None = None

    @functools.cached_property
    def folds(self) -> list[CVFold]:
        """The CV folds, each with the selection fitted on its training part only."""
        return fit_folds([self], n_jobs=1)[0]

    def fold(self, k: int) -> tuple[CVFold, list[warnings.WarningMessage]]:
        """CV fold ``k`` with the selection fitted on its training part, and the warnings
        raised (picklable: a worker process returns them for :func:`replay_warnings`)."""
        train, val = self.splits[k]
        with _recorded_warnings() as caught:
            selection, X_train = self.fit(train)
            fold = CVFold(X_train, self.y[train], selection.transform(self.X.iloc[val]),
                          self.y[val], val)
        return fold, caught

    def final_model(self, estimator: ClassifierMixin) -> Pipeline:
        """Selection + classifier fitted on all rows, without refitting the selection.

        The result predicts exactly as ``build_pipeline(selection_cfg, estimator).fit(X, y)``
        would. Its selection steps are a copy: refitting one model leaves the others alone.

        Args:
            estimator: an unfitted classifier (e.g. with a trial's best hyperparameters).
        """
        fit = check_memory(self.memory).cache(_fit_classifier, ignore=["X", "y"])
        classifier = fit(clone(estimator), self.X_full, self.y,
                         data=_data_key(self.X_full, self.y))
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
        wall_s: wall time of the study's trials in this process (0 when all were stored;
            studies run side by side overlap).
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
    wall_s: float = 0.0


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
    memory: Memory | str | None = None,
) -> SharedSelection:
    """Fit the selection steps on all rows, and on each stratified fold's training part when
    a trial first needs the folds.

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
        memory: a joblib cache of the fitted selections and final classifiers (see
            :func:`fit_memory`), or None.
    """
    y = _check_xy(X, y)
    splitter = StratifiedKFold(
        tuning_cfg["cv_folds"], shuffle=True, random_state=tuning_cfg["random_state"]
    )

    selection = Pipeline(build_selection(selection_cfg, selection_inputs)).set_output(
        transform="pandas")
    fit = functools.partial(_fit_rows, CachedFit(selection, memory), X, y)
    with _counted_convergence_warnings("feature selection, all"):
        full, X_full = fit(np.arange(len(y)))
    splits = list(splitter.split(X, y))
    for k, (_, val) in enumerate(splits):
        if len(np.unique(y[val])) < 2:  # no AUC on this fold
            msg = (f"tuning.cv_folds={tuning_cfg['cv_folds']}: CV fold {k} holds only one class "
                   f"(training labels: {int(y.sum())} positive, {int(len(y) - y.sum())} "
                   "negative); use fewer folds or more patients of the rarer class")
            raise ValueError(msg)
    return SharedSelection(X, splits, fit, full, X_full, y, memory)


class CachedFit(TransformerMixin, BaseEstimator):
    """A transformer whose fits are kept in a joblib cache and read back for the same inputs.

    A fit is looked up by the unfitted transformer (its parameters) and by the *content* of
    the data and labels: values, index, column names and dtypes. joblib's own hash of a table
    depends on its memory layout, so the same features computed in a cold run and read from
    Parquet in a warm one would miss each other's entries.

    Args:
        transformer: the transformer to fit (e.g. a selection pipeline).
        memory: a joblib ``Memory`` or its folder (:func:`fit_memory`); None: no cache.
    """

    def __init__(self, transformer: Any, memory: Memory | str | None = None) -> None:
        self.transformer = transformer
        self.memory = memory

    def fit(self, X: pd.DataFrame, y: np.ndarray) -> CachedFit:
        self.fit_transform(X, y)
        return self

    def fit_transform(self, X: pd.DataFrame, y: np.ndarray) -> pd.DataFrame:
        fit = check_memory(self.memory).cache(_fit_transform, ignore=["X", "y"])
        self.transformer_, out = fit(clone(self.transformer), X, y, data=_data_key(X, y))
        return out

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        check_is_fitted(self)
        return self.transformer_.transform(X)


def _fit_transform(transformer: Any, X: pd.DataFrame, y: np.ndarray, data: str) -> tuple:
    """``transformer`` fitted on ``X``, ``y`` and its output on them; ``data`` is what the
    cache keys them by (:func:`_data_key`)."""
    return transformer, transformer.fit_transform(X, y)


def _fit_classifier(
    estimator: ClassifierMixin, X: pd.DataFrame, y: np.ndarray, data: str
) -> ClassifierMixin:
    """``estimator`` fitted on ``X``, ``y``; ``data`` keys the cache entry (:func:`_data_key`)."""
    return estimator.fit(X, y)


def _data_key(X: pd.DataFrame, y: np.ndarray) -> str:
    return content_key({"X": frame_digest(X), "y": np.asarray(y).tolist()})


def _fit_rows(
    selection: CachedFit, X: pd.DataFrame, y: np.ndarray, rows: np.ndarray,
) -> tuple[Pipeline, pd.DataFrame]:
    """``selection`` fitted on some rows: the fitted pipeline and its output on those rows."""
    fitted = clone(selection)
    out = fitted.fit_transform(X.iloc[rows], y[rows])
    return fitted.transformer_, out


def fit_folds(selections: Sequence[SharedSelection], n_jobs: int,
              labels: Sequence[str | None] | None = None) -> list[list[CVFold]]:
    """The CV folds of every selection (:attr:`SharedSelection.folds`), the folds not yet
    fitted spread over up to ``n_jobs`` worker processes (-1: one per core), in one pool
    whatever the number of selections; each fold's convergence warnings counted in one line,
    which names its selection's entry of ``labels`` (if any).
    """
    named = dict(zip(map(id, selections), labels or [None] * len(selections), strict=True))
    unique = list({id(selection): selection for selection in selections}.values())
    todo = [(selection, k) for selection in unique if "folds" not in vars(selection)
            for k in range(len(selection.splits))]
    workers = 1 if not todo or _nested_threads() else min(effective_n_jobs(n_jobs), len(todo))
    fitted = Parallel(n_jobs=workers, prefer="processes", return_as="generator")(
        delayed(selection.fold)(k) for selection, k in todo)
    folds: dict[int, list[CVFold]] = collections.defaultdict(list)
    try:
        for (selection, k), (fold, caught) in zip(
                todo, tqdm(fitted, total=len(todo), desc="Feature selection", unit="fold"),
                strict=True):
            with _counted_convergence_warnings(
                    _labelled(named[id(selection)], f"feature selection, fold {k}")):
                replay_warnings(caught)
            folds[id(selection)].append(fold)
    finally:  # the pool's results collected even on an error here (as in _objective)
        collections.deque(fitted, maxlen=0)
    for selection in unique:
        if id(selection) in folds:  # functools.cached_property's cache: the instance dict
            vars(selection)["folds"] = folds[id(selection)]
    return [selection.folds for selection in selections]


def _labelled(label: str | None, what: str) -> str:
    """``what`` of the feature table ``label`` names, for the log: ``dlr: tuning rf``."""
    return f"{label}: {what}" if label else what


def model_code_key() -> str:
    """A key of the code that fits and scores models: pdl1exp's model modules and the versions
    of the libraries they fit with. Stored trials and cached fits are reused under it only."""
    models = sorted(f"models/{f.name}" for f in Path(__file__).parent.glob("*.py"))
    return content_key({"pdl1exp.models": code_key(*models),
                        **{name: _version(name) for name in _MODEL_LIBRARIES}})


def _version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:  # e.g. xgboost-cpu where the xgboost distribution serves
        return None


def fit_memory(folder: str | Path) -> Memory:
    """A joblib cache of fitted feature selections and final classifiers in
    ``folder/<model_code_key()>``.

    A fit is looked up by its inputs (:class:`CachedFit`: configuration, data and labels),
    so a run on the same training data and CV folds reuses every selection fitted before,
    whatever its classifiers, and every final classifier with the same hyperparameters;
    changed code starts an empty folder (delete the old ones).
    """
    return Memory(Path(folder) / model_code_key(), verbose=0)


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


def fit_proba(
    estimator: Any, X_fit: pd.DataFrame, y_fit: np.ndarray, X_score: pd.DataFrame
) -> tuple[np.ndarray, list[warnings.WarningMessage]]:
    """Fit a clone of ``estimator`` on ``X_fit``, ``y_fit``; its P(y=1) on ``X_score``, and
    the warnings raised (a worker process's would not reach the caller's log: pass them to
    :func:`replay_warnings`)."""
    with _recorded_warnings() as caught:
        proba = clone(estimator).fit(X_fit, y_fit).predict_proba(X_score)[:, 1]
    return proba, caught


@contextmanager
def _recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning raised inside; the list holds them, picklable, on exit (a worker
    process returns them to the caller for :func:`replay_warnings`)."""
    recorded: list[warnings.WarningMessage] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield recorded
    recorded.extend(_picklable(warning) for warning in caught)


def _fold_proba(
    estimator: ClassifierMixin, fold: CVFold
) -> tuple[np.ndarray, list[warnings.WarningMessage]]:
    """:func:`fit_proba` on a fold's selected training features and its validation part."""
    return fit_proba(estimator, fold.X_train, fold.y_train, fold.X_val)


def _picklable(warning: warnings.WarningMessage) -> warnings.WarningMessage:
    """The warning without its source line and file object, which need not pickle."""
    return warnings.WarningMessage(warning.message, warning.category, warning.filename,
                                   warning.lineno)


def replay_warnings(caught: Iterable[warnings.WarningMessage]) -> None:
    """Raise warnings recorded in a worker process again here, where the caller's filters
    apply."""
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename,
                               warning.lineno)


def _sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URL; None for another backend or memory."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return Path(parsed.database)
    return None


def _absolute(url: str) -> str:
    """``url`` with a relative SQLite path made absolute: worker processes started by an
    earlier call may have another working directory."""
    path = _sqlite_file(url)
    if path is None or path.is_absolute():
        return url
    return make_url(url).set(database=str(path.resolve())).render_as_string(
        hide_password=False)


def _ensure_sqlite_folder(url: str) -> None:
    """Create the folder of a ``sqlite:///path`` file; SQLite will not."""
    if (path := _sqlite_file(url)) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def _retry(tuning_cfg: Mapping[str, Any]) -> RetryHeartbeatStaleTrialCallback:
    """Optuna's rerun of a dead process's trial (``tuning.max_retry`` times); its
    experimental-API warning, once per sweep, is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=tuning_cfg["max_retry"])


def open_storage(url: str | None, tuning_cfg: Mapping[str, Any]) -> RDBStorage | None:
    """The study storage at ``url`` (``None``: in memory), with heartbeats.

    Each running trial records a heartbeat every ``tuning.heartbeat_interval`` seconds; a
    trial silent for ``tuning.grace_period`` seconds belongs to a dead process (killed, out
    of memory, machine lost): Optuna marks it FAIL and enqueues it again (at most
    ``tuning.max_retry`` times), so the next trial any worker starts reruns its parameters.

    Args:
        url: SQLAlchemy URL: ``sqlite:///mlruns/optuna.db`` for one machine,
            ``postgresql+psycopg://user@host/db`` for workers on many.
        tuning_cfg: ``cfg.tuning``.
    """
    if url is None:
        return None
    _ensure_sqlite_folder(url)
    options = {
        "engine_kwargs": {"pool_pre_ping": True},  # survive a database restart
        "heartbeat_interval": tuning_cfg["heartbeat_interval"],
        "grace_period": tuning_cfg["grace_period"],
        "heartbeat_stale_trial_callback": _retry(tuning_cfg),
    }
    with warnings.catch_warnings(), _schema_lock(url):
        warnings.simplefilter("ignore", ExperimentalWarning)
        storage = RDBStorage(url, **options)
    if _sqlite_file(url) is not None:
        event.listen(storage.engine, "connect", _sqlite_write_ahead_log)
        storage.engine.dispose()  # drop the pooled connections made before the listener
    return storage


def _sqlite_write_ahead_log(connection: Any, _record: Any) -> None:
    """SQLite in write-ahead-log mode, synced at checkpoints rather than at every commit:
    a trial commits about a dozen times (parameters, attributes, state; fold reports under a
    pruner), and each commit waited for the disk (20 trials with fold reports: 205 -> 120 ms
    of storage per trial, 2 cores).
    A killed process loses nothing committed; a power cut, at most the last commits, never
    the database. WAL needs every process on one machine, as SQLite storage does anyway
    (PostgreSQL for many). A database busy with another process keeps its mode."""
    cursor = connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        if str(cursor.fetchone()[0]).lower() == "wal":
            cursor.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.OperationalError:  # locked by another process: its current mode stays
        pass
    finally:
        cursor.close()


@contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """Hold a PostgreSQL advisory lock while Optuna creates its tables: workers started
    together on an empty database would otherwise race to create the same types."""
    if make_url(url).get_backend_name() != "postgresql":
        yield
        return
    engine = create_engine(url)
    key = {"key": zlib.crc32(b"pdl1exp: optuna schema")}
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), key)
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), key)
    finally:
        engine.dispose()


def _check_role(tuning_cfg: Mapping[str, Any]) -> str:
    role = tuning_cfg.get("role", "auto")
    if role not in ROLES:
        msg = f"tuning.role={role!r}: expected one of {ROLES}"
        raise ValueError(msg)
    return role


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler whose draws for a trial depend on the seed and the trial's rank only.

    The rank is the trial's place among the study's trials that did not fail. Each trial gets
    a fresh inner sampler (``tuning.sampler``, e.g. TPE, which reads the history from the
    study) seeded from ``(seed, rank)``. A study resumed after a crash (the dead trial failed
    and rerun with its parameters) therefore draws exactly what the uninterrupted study
    would have drawn: a killed and rerun sweep gives the same result.

    Args:
        factory: the inner sampler for a seed.
        seed: the sweep's seed.
        salt: added to every trial's seed (a worker's process, so that workers started
            together do not draw the same parameters).
    """

    def __init__(self, factory: Callable[[int], optuna.samplers.BaseSampler], *, seed: int,
                 salt: int = 0) -> None:
        self._factory = factory
        self._seed = seed
        self._salt = salt
        self._inner: dict[int, optuna.samplers.BaseSampler] = {}

    def _for(self, study: optuna.Study, trial: optuna.trial.FrozenTrial
             ) -> optuna.samplers.BaseSampler:
        if trial.number not in self._inner:
            rank = sum(t.number < trial.number and t.state != TrialState.FAIL
                       for t in study.get_trials(deepcopy=False))
            state = np.random.SeedSequence([self._seed, rank, self._salt]).generate_state(1)
            self._inner[trial.number] = self._factory(int(state[0]))
        return self._inner[trial.number]

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._for(study, trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study,
                                    trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return self._for(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict[str, Any]) -> dict[str, Any]:
        return self._for(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                           param_name: str, param_distribution: Any) -> Any:
        return self._for(study, trial).sample_independent(study, trial, param_name,
                                                          param_distribution)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                    state: TrialState, values: Any) -> None:
        self._for(study, trial).after_trial(study, trial, state, values)
        self._inner.pop(trial.number, None)


def _sampler(tuning_cfg: Mapping[str, Any]) -> optuna.samplers.BaseSampler:
    """``tuning.sampler``, seeded per trial (see :class:`TrialSeededSampler`) when seeded.

    A worker's draws also depend on its process: workers started together must not draw the
    same parameters (a sweep over several workers is not reproducible anyway).
    """
    seed = tuning_cfg["sampler"].get("seed")
    if seed is None:
        return instantiate(tuning_cfg["sampler"])
    salt = 0
    if _check_role(tuning_cfg) != "auto":
        salt = zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())
    return TrialSeededSampler(lambda s: instantiate(tuning_cfg["sampler"], seed=s),
                              seed=int(seed), salt=salt)


def _open_study(
    storage: RDBStorage | None, study_name: str, tuning_cfg: Mapping[str, Any]
) -> optuna.Study:
    """Create the study, or load it to resume after an interruption or to join other workers.

    Trials left RUNNING by a dead process are failed and retried through the storage's
    heartbeat (see :func:`open_storage`) and :func:`fail_dead_trials`, never by hand.
    """
    return optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction="maximize",
        sampler=_sampler(tuning_cfg),
        pruner=instantiate(tuning_cfg["pruner"]),
        load_if_exists=True,
    )


def _claim(storage: RDBStorage | None, name: str, role: str) -> tuple[str | None, str | None]:
    """Claim the finalization of sweep ``name``: ``(claim study, None)`` if won, else
    ``(None, who holds it)``.

    A claim is a study ``<name>:finalizer`` (then ``:1``, ``:2``, ... for takeovers): creating
    a study of a taken name fails atomically in any RDB, so of the processes that race for a
    claim exactly one wins. Its holder (host, pid, start, finish), written in one attribute
    after creation, is this process, or a process of this host that died, or a finished
    finalization older than this process (the same command run again): a dead or finished
    claim is taken over by creating the next one. ``role=finalize`` always takes over.
    """
    if storage is None:
        return None, None
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _STARTED, "done": None}
    taken = set(optuna.get_all_study_names(storage))
    generation = 0
    while _claim_name(name, generation + 1) in taken:
        generation += 1
    try:
        claim = optuna.create_study(storage=storage, study_name=_claim_name(name, generation))
    except DuplicatedStudyError:
        claim = optuna.load_study(storage=storage, study_name=_claim_name(name, generation))
        holder = claim.user_attrs.get("holder")
        mine = holder is not None and (holder["host"], holder["pid"]) == (me["host"], me["pid"])
        if not mine:
            if role != "finalize":
                if holder is None:  # created an instant ago; its holder is being written
                    return None, "another process"
                dead = holder["done"] is None and _gone(holder)
                finished = holder["done"] is not None and holder["done"] < _STARTED
                if not (dead or finished):
                    return None, f"{holder['host']} (pid {holder['pid']})"
            try:
                claim = optuna.create_study(storage=storage,
                                            study_name=_claim_name(name, generation + 1))
            except DuplicatedStudyError:  # another process took it over first
                return None, "another process"
    claim.set_user_attr("holder", me)
    return claim.study_name, None


def _claim_name(name: str, generation: int) -> str:
    return f"{name}:finalizer" + (f":{generation}" if generation else "")


def _release(storage: RDBStorage | None, claim: str | None) -> None:
    """Mark a claimed finalization finished (a later command may claim it again)."""
    if storage is not None and claim is not None:
        study = optuna.load_study(storage=storage, study_name=claim)
        study.set_user_attr("holder", {**study.user_attrs["holder"], "done": time.time()})


def _gone(process: Mapping[str, Any]) -> bool:
    """Whether a recorded process (``host``, ``pid``) ran on this host and has died."""
    return process["host"] == socket.gethostname() and not _alive(process["pid"])


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _objective(
    spec: Mapping[str, Any], folds: list[CVFold], n_jobs: int, counter: list[int], *,
    prune: bool,
):
    """Mean validation AUC over the folds, reported fold by fold to the pruner (``prune``).

    Without a pruner (``prune=False``, Optuna's ``NopPruner``) nothing is reported: each
    report is a storage commit (a 5-fold trial's five: about a quarter of a fast trial's
    storage time on SQLite), and no one reads them (the trial keeps ``fold_aucs``).

    The folds are fitted in up to ``n_jobs`` worker processes (-1: one per core, at most one
    per fold) and reported in their order, so the trial (and the sweep) is the same whatever
    ``n_jobs``. A pruned trial stops at once in one process; with worker processes its other
    folds, mostly dispatched already, still run to the end. Processes, not threads: most of a
    small forest's fit is Python that holds the GIL (sklearn 1.9, 280 x 200 features, 2
    cores: the seven classifiers' sweep 105 s sequential, 78 s on 2 threads, 62 s on 2
    processes, the same AUCs).
    """
    workers = min(effective_n_jobs(n_jobs), len(folds))
    n_rows = sum(len(fold.val_index) for fold in folds)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        estimator = build_estimator(spec, suggest_params(trial, spec["search_space"]))
        probas = Parallel(n_jobs=workers, prefer="processes", return_as="generator")(
            delayed(_fold_proba)(estimator, fold) for fold in folds
        )
        aucs, oof = [], np.empty(n_rows)
        try:
            for step, (fold, (proba, caught)) in enumerate(
                zip(folds, probas, strict=True)
            ):
                replay_warnings(caught)
                if not np.isfinite(proba).all():  # the rank AUC would be NaN, not an error
                    # (every fold holds both classes: prepare_folds)
                    msg = (f"trial {trial.number} ({trial.params}), CV fold {step}: the "
                           "classifier predicted NaN or infinite probabilities")
                    raise ValueError(msg)
                aucs.append(float(univariate_auc(proba[:, None], fold.y_val)[0]))
                oof[fold.val_index] = proba
                if prune:
                    trial.report(float(np.mean(aucs)), step)
                    if trial.should_prune():
                        raise optuna.TrialPruned
        finally:
            if workers > 1:  # a pruned trial's folds run to the end: closing the generator
                # would kill the reused pool, and leaving it to the garbage collector can
                # deadlock the next trial's submission to that pool
                collections.deque(probas, maxlen=0)
            else:
                probas.close()
        trial.set_user_attr("fold_aucs", aucs)
        trial.set_user_attr(_OOF, oof.tolist())  # JSON floats round-trip exactly
        counter.append(trial.number)
        return float(np.mean(aucs))

    return objective


def _best_oof(
    best: optuna.trial.FrozenTrial, estimator: ClassifierMixin, selection: SharedSelection
) -> np.ndarray:
    """The best trial's out-of-fold probabilities: stored by its trial, refitted only for a
    trial stored before they were (the folds are the study's, fixed by its name)."""
    stored = best.user_attrs.get(_OOF)
    if stored is not None:
        return np.asarray(stored, dtype=float)
    oof = np.empty(len(selection.y))
    for fold in selection.folds:
        oof[fold.val_index], caught = _fold_proba(estimator, fold)
        replay_warnings(caught)
    return oof


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _run_trials(
    study: optuna.Study, spec: Mapping[str, Any], folds: list[CVFold],
    tuning_cfg: Mapping[str, Any], n_jobs: int, callbacks: Iterable[Callable] = (),
) -> int:
    """Run trials until ``tuning.n_trials`` have completed in the study, by any process, each
    trial's folds in ``n_jobs`` processes; return how many this process completed."""
    n_trials, mine = tuning_cfg["n_trials"], []
    fail_dead_trials(study, tuning_cfg)
    if len(_complete(study)) < n_trials:
        study.optimize(
            _objective(spec, folds, n_jobs, mine,
                       prune=not isinstance(study.pruner, optuna.pruners.NopPruner)),
            timeout=tuning_cfg.get("timeout_s"),
            callbacks=[MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE,)), *callbacks],
        )
    return len(mine)


def _stop_when_orphaned(parent: int) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """A study callback stopping a worker process's trials once ``parent`` (the process that
    runs the sweep) has died: a killed sweep leaves no study running behind it, only the trial
    under way, as when the trials ran in that process."""

    def stop(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        if os.getppid() != parent:  # re-parented: the sweep's process is gone
            study.stop()

    return stop


def _study_process(
    url: str, study_name: str, spec: Mapping[str, Any], folds: list[CVFold],
    tuning_cfg: Mapping[str, Any], parent: int,
) -> tuple[int, float, list[warnings.WarningMessage]]:
    """:func:`_run_trials` of one study in a worker process of ``parent``, its folds one after
    another: the trials it completed, its wall time, and the warnings raised (for the
    caller's log)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    with _recorded_warnings() as caught:
        study = _open_study(open_storage(url, tuning_cfg), study_name, tuning_cfg)
        mine = _run_trials(study, spec, folds, tuning_cfg, n_jobs=1,
                           callbacks=[_stop_when_orphaned(parent)])
    return mine, time.perf_counter() - start, caught


def _nested_threads() -> bool:
    """Whether joblib would run "processes" as threads here: inside a worker process (a
    multirun job) it nests threads, which would share this process's warning filters, which
    every study and fold replaces."""
    return getattr(get_active_backend(prefer="processes")[0], "uses_threads", False)


def _run_studies(
    sweeps: Sequence[_Sweep], opened: Sequence[Mapping[str, optuna.Study]],
    tuning_cfg: Mapping[str, Any], url: str | None,
) -> tuple[list[dict[str, int]], list[dict[str, float]]]:
    """The trials of every sweep's studies: how many this process completed, and the wall
    time, per sweep and study.

    The folds of every sweep that still has trials to run are fitted first, in one pool.
    Studies on a storage that processes share then run side by side, one per worker process
    (``tuning.n_jobs``), every sweep's in one pool, each trial's folds one after another:
    the cores stay busy through Optuna's own work between trials and through the slowest
    study of a feature table, which its studies alone would leave to one core. Otherwise
    (one worker, one study, an in-memory storage, or inside a worker process) they run one
    after another here, each trial's folds in the workers.
    Either way a study's trials are the same: its sampler reads its own trials only, and the
    folds are reported in their order.
    """
    mine = [dict.fromkeys(studies, 0) for studies in opened]
    elapsed = [dict.fromkeys(studies, 0.0) for studies in opened]
    # (a finished study's dead trials are failed by _finalize's wait for the workers)
    pending = [(i, name) for i, studies in enumerate(opened)
               for name, study in studies.items()
               if len(_complete(study)) < tuning_cfg["n_trials"]]
    if not pending:  # every trial stored: the folds' selections are not needed
        return mine, elapsed
    needed = sorted({i for i, _ in pending})  # each table's folds, fitted for all its studies
    folds = dict(zip(needed, fit_folds([sweeps[i].selection for i in needed],
                                       tuning_cfg["n_jobs"],
                                       [sweeps[i].job.label for i in needed]), strict=True))
    workers = min(effective_n_jobs(tuning_cfg["n_jobs"]), len(pending))
    if url is None or workers < 2 or _nested_threads():
        for i, name in pending:
            start = time.perf_counter()
            with _counted_convergence_warnings(_labelled(sweeps[i].job.label, f"tuning {name}")):
                mine[i][name] = _run_trials(opened[i][name], sweeps[i].studies[name][0],
                                            folds[i], tuning_cfg, tuning_cfg["n_jobs"])
            elapsed[i][name] = time.perf_counter() - start
        return mine, elapsed
    done = Parallel(n_jobs=workers, prefer="processes", batch_size=1)(
        delayed(_study_process)(_absolute(url), opened[i][name].study_name,
                                sweeps[i].studies[name][0], folds[i], tuning_cfg, os.getpid())
        for i, name in pending
    )
    for (i, name), (count, seconds, caught) in zip(pending, done, strict=True):
        with _counted_convergence_warnings(_labelled(sweeps[i].job.label, f"tuning {name}")):
            replay_warnings(caught)
        mine[i][name], elapsed[i][name] = count, seconds
    return mine, elapsed


def fail_dead_trials(study: optuna.Study, tuning_cfg: Mapping[str, Any]) -> None:
    """Fail, and retry, RUNNING trials whose process is dead but has no heartbeat to go stale.

    A process killed between creating a trial and its first heartbeat leaves a trial that
    Optuna's heartbeat never marks stale. Every trial records its host and pid first thing:
    a RUNNING trial is dead when that process is gone from this host, or when it carries no
    record ``tuning.grace_period`` seconds after its start.
    """
    now = datetime.now()  # Optuna's trial times are naive local times
    retry = _retry(tuning_cfg)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker is None:
            dead = (now - trial.datetime_start).total_seconds() > tuning_cfg["grace_period"]
        else:
            dead = _gone(worker)
        # Optuna's own fail_stale_trials reaches the storage the same way.
        if dead and study._storage.set_trial_state_values(
                trial._trial_id, TrialState.FAIL):
            retry(study, study._storage.get_trial(trial._trial_id))


def _wait_for_workers(study: optuna.Study, tuning_cfg: Mapping[str, Any]) -> None:
    """Wait until no other process runs a trial of the study (dead ones' go stale)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        while True:
            fail_stale_trials(study)
            fail_dead_trials(study, tuning_cfg)
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not running:
                return
            logger.info(
                "study %r: waiting for %d trials of other workers", study.study_name, len(running)
            )
            time.sleep(tuning_cfg["heartbeat_interval"])


def _finalize(
    study: optuna.Study, X: pd.DataFrame, *, name: str, spec: Mapping[str, Any],
    selection_cfg: Mapping[str, Any], tuning_cfg: Mapping[str, Any],
    selection: SharedSelection, shared: bool, elapsed_s: float,
    selection_inputs: Mapping[str, Mapping[str, Any]] | None = None,
    label: str | None = None,
) -> TuningResult:
    """Best of the first ``tuning.n_trials`` completed trials, refitted on all of ``X``
    (``label``: the table's name in the log).

    Workers finishing together may complete a few trials beyond the budget: those are left
    out, so every classifier is chosen from the same number of trials.
    """
    if shared:
        _wait_for_workers(study, tuning_cfg)
    n_trials = tuning_cfg["n_trials"]
    complete = sorted(_complete(study), key=lambda trial: trial.number)[:n_trials]
    if not complete:
        msg = (
            f"study {study.study_name!r} has no complete trial of {name!r}; "
            "raise tuning.timeout_s"
        )
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
    best = max(complete, key=lambda trial: trial.value)  # ties: the earliest, as Optuna's
    best_estimator = build_estimator(spec, best.params)
    with _counted_convergence_warnings(_labelled(label, f"refitting {name}")):
        oof = _best_oof(best, best_estimator, selection)
        model = selection.final_model(best_estimator)
    n_pruned = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    logger.info(
        "%s: cv_auc=%.3f, %d complete trials (+%d pruned), %.1f s",
        f"{label}/{name}" if label else name,
        best.value,
        len(complete),
        n_pruned,
        elapsed_s,
    )
    return TuningResult(
        name=name,
        best_params=dict(best.params),
        cv_auc=float(best.value),
        cv_auc_folds=list(best.user_attrs["fold_aucs"]),
        n_trials=len(complete),
        n_pruned=n_pruned,
        wall_s=elapsed_s,
        trials=study.trials_dataframe().drop(columns=f"user_attrs_{_OOF}", errors="ignore"),
        best_pipeline=build_pipeline(selection_cfg, best_estimator, selection_inputs),
        oof_proba=pd.Series(oof, index=X.index, name=name),
        model=model,
    )


@dataclass(frozen=True)
class SweepJob:
    """One feature table to sweep the classifiers on (:func:`sweeps`).

    Attributes:
        X: training feature table, one row per patient.
        y: 0/1 labels.
        study_name: prefix; each classifier's study is ``<study_name>/<classifier>``, and
            the sweep's finalization claim is ``study_name``.
        selection_inputs: runtime data of the selection steps (``build_selection``).
        selection: from :func:`prepare_folds` on the same ``X``, ``y``; computed when
            omitted.
        label: names the table in the log (e.g. its feature set), as several tables' lines
            come together.
    """

    X: pd.DataFrame
    y: np.ndarray
    study_name: str
    selection_inputs: Mapping[str, Mapping[str, Any]] | None = None
    selection: SharedSelection | None = None
    label: str | None = None


@dataclass(frozen=True)
class _Sweep:
    """A job as :func:`_tune` runs it: its studies (name -> (spec, study name)), its claim
    and its prepared selection."""

    job: SweepJob
    studies: Mapping[str, tuple[Mapping[str, Any], str]]
    claim: str
    selection: SharedSelection


def _tune(
    jobs: Sequence[tuple[SweepJob, Mapping[str, tuple[Mapping[str, Any], str]], str]], *,
    selection_cfg: Mapping[str, Any], tuning_cfg: Mapping[str, Any], storage: str | None,
    memory: Memory | str | None = None,
) -> list[dict[str, TuningResult] | WorkerDone]:
    """Run the trials of every job's studies (job, name -> (spec, study name), claim) at
    once, then finalize each job in turn, or not: a job another process claimed, and every
    later one, gives its :class:`WorkerDone` (this process then only helped with trials)."""
    role = _check_role(tuning_cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepared = []
    for job, studies, claim in jobs:
        y = _check_xy(job.X, job.y)
        selection = job.selection if job.selection is not None else prepare_folds(
            job.X, y, selection_cfg=selection_cfg, tuning_cfg=tuning_cfg,
            selection_inputs=job.selection_inputs, memory=memory)
        prepared.append(_Sweep(job, studies, claim, selection))
    rdb = open_storage(storage, tuning_cfg)
    opened = [{name: _open_study(rdb, study_name, tuning_cfg)
               for name, (_, study_name) in sweep.studies.items()} for sweep in prepared]
    mine, elapsed = _run_studies(prepared, opened, tuning_cfg, storage)
    outcomes: list[dict[str, TuningResult] | WorkerDone] = []
    for sweep, studies, counts, seconds in zip(prepared, opened, mine, elapsed, strict=True):
        won, holder = (None, "this worker") if role == "worker" else _claim(rdb, sweep.claim,
                                                                              role)
        if holder is not None:
            done = ", ".join(
                f"{name} {len(_complete(study))}/{tuning_cfg['n_trials']} ({counts[name]} here)"
                for name, study in studies.items()
            )
            finalizer = "another process" if holder == "this worker" else holder
            outcomes.append(WorkerDone(
                f"sweep {sweep.claim!r}: trials complete: {done}; {finalizer} finalizes"))
            role = "worker"  # another process finalizes: help with the rest, claim none
            continue
        outcomes.append({
            name: _finalize(
                study, sweep.job.X, name=name, spec=sweep.studies[name][0],
                selection_cfg=selection_cfg, tuning_cfg=tuning_cfg, selection=sweep.selection,
                shared=rdb is not None, selection_inputs=sweep.job.selection_inputs,
                elapsed_s=seconds[name], label=sweep.job.label,
            )
            for name, study in studies.items()
        })
        _release(rdb, won)
    return outcomes


def _outcome(outcome: dict[str, TuningResult] | WorkerDone) -> dict[str, TuningResult]:
    if isinstance(outcome, WorkerDone):
        raise outcome
    return outcome


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
    trials count and only the remainder runs; a killed process's trial is retried (see
    :func:`open_storage`). ``tuning.timeout_s`` (default null) stops a study early by wall
    clock: the classifiers' budgets then differ and their CV AUCs are no longer comparable.

    ``tuning.n_jobs`` worker processes fit a trial's CV folds, so the sweep is identical for any
    ``n_jobs`` (parallel trials in one process would make the sampler depend on timing).
    Several processes may run the same sweep on one RDB ``storage``, each its own trials
    (such a sweep depends on timing and is not reproducible). ``tuning.role``: ``auto``
    (default) runs trials, then the first process to claim the finalization refits and
    returns the result, the others raise
    :class:`WorkerDone`; ``worker`` runs trials, then raises :class:`WorkerDone`;
    ``finalize`` runs trials, waits for the other workers' trials, and returns the result.

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

    Raises:
        WorkerDone: this process only ran trials (see ``tuning.role``).
    """
    job = SweepJob(X, y, study_name, selection_inputs, selection)
    return _outcome(_tune([(job, {name: (spec, study_name)}, study_name)],
                          selection_cfg=selection_cfg, tuning_cfg=tuning_cfg,
                          storage=storage)[0])[name]


def sweeps(
    jobs: Sequence[SweepJob],
    *,
    classifiers: Mapping[str, Mapping[str, Any]],
    selection_cfg: Mapping[str, Any],
    tuning_cfg: Mapping[str, Any],
    storage: str | None,
    memory: Memory | str | None = None,
) -> list[dict[str, TuningResult] | WorkerDone]:
    """Tune every classifier on each job's feature table; fit each best one on all of it.

    The selection is fitted once per fold and once on all rows of each table and shared by
    every classifier and trial; each result's ``model`` is ready to predict. Every job's
    trials run before any finalization: on a ``storage``, all the jobs' studies run side by
    side in ``tuning.n_jobs`` worker processes, with the same trials as one after another.
    Then each job is finalized in turn under its own claim (see :func:`tune_classifier` for
    ``tuning.role``); a job another process claimed, and every later one, gives a
    :class:`WorkerDone` instead of results.

    Args:
        jobs: the feature tables (with labels and study names).
        classifiers: ``cfg.classifier`` (name -> spec).
        selection_cfg: ``cfg.selection``.
        tuning_cfg: ``cfg.tuning``.
        storage: Optuna RDB URL or ``None``.
        memory: a joblib cache of the fitted selections (:func:`fit_memory`), or None.

    Returns:
        Per job, classifier name -> result, or the :class:`WorkerDone` of a job this
        process only ran trials for.
    """
    return _tune(
        [(job, {name: (spec, f"{job.study_name}/{name}") for name, spec in classifiers.items()},
          job.study_name) for job in jobs],
        selection_cfg=selection_cfg, tuning_cfg=tuning_cfg, storage=storage, memory=memory)


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
    memory: Memory | str | None = None,
    selection: SharedSelection | None = None,
) -> dict[str, TuningResult]:
    """:func:`sweeps` of one feature table.

    Args:
        X: training feature table.
        y: 0/1 labels.
        classifiers: ``cfg.classifier`` (name -> spec).
        selection_cfg: ``cfg.selection``.
        tuning_cfg: ``cfg.tuning``.
        storage: Optuna RDB URL or ``None``.
        study_name: prefix; each classifier's study is ``<study_name>/<classifier>``.
        selection_inputs: runtime data of the selection steps (``build_selection``).
        memory: a joblib cache of the fitted selections (:func:`fit_memory`), or None.
        selection: from :func:`prepare_folds` on the same ``X``, ``y``; computed here when
            omitted.

    Raises:
        WorkerDone: this process only ran trials (see ``tuning.role``).
    """
    return _outcome(sweeps([SweepJob(X, y, study_name, selection_inputs, selection)],
                           classifiers=classifiers, selection_cfg=selection_cfg,
                           tuning_cfg=tuning_cfg, storage=storage, memory=memory)[0])


def select_best(results: Iterable[T], *, rule: str = "best",
                standard_error: Callable[[T], float] | None = None) -> T:
    """The result (anything with ``cv_auc``: a :class:`TuningResult`, a fitted model) chosen
    by tuning CV AUC, never by a test metric.

    Args:
        results: candidates in order of parsimony (simplest first: the configured order).
        rule: ``best``: the highest CV AUC (ties go to the first); ``one_se``: the first
            (simplest) candidate whose CV AUC is within one standard error of the best one's
            (Hastie, Tibshirani & Friedman, *Elements of Statistical Learning*, 7.10): the
            best of several tuned families is optimistic, and mostly by chance.
        standard_error: the standard error of a candidate's CV AUC (``one_se`` only).
    """
    results = list(results)
    if not results:
        msg = "select_best needs at least one result"
        raise ValueError(msg)
    best = max(results, key=lambda result: result.cv_auc)
    if rule == "best":
        return best
    if rule != "one_se" or standard_error is None:
        msg = f"tuning.choice={rule!r}: expected 'best' or 'one_se' (with a standard error)"
        raise ValueError(msg)
    bar = best.cv_auc - standard_error(best)
    return next(result for result in results if result.cv_auc >= bar)
