"""Optuna workers sharing one study on PostgreSQL, and an MLflow server on PostgreSQL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pdl1exp.models.selected import SelectedModel
from pdl1exp.models.tuning import (
    WorkerDone,
    _claim,
    _open_study,
    fail_dead_trials,
    open_storage,
    study_settings,
    tune_classifier,
)
from pdl1exp.promote import promote
from pdl1exp.serving import CANDIDATE, CHAMPION, PREDICTIONS_FILE, log_selected_model
from pdl1exp.tracking import log_frame, setup, tracked_run
from tests.test_tuning import model_cfg, start_worker, table

# Waits for a server or the heartbeat to act: generous, never part of a result.
DEADLINE_S = 120

def sweep_kwargs(url: str, *, n_trials: int, cv_folds: int = 3) -> dict:
    """One classifier's sweep on a small table, studies in ``url``; quick heartbeats."""
    X, y = table(seed=11, n=60, p=8, n_planted=2)
    cfg = model_cfg("lr", "none", n_trials=n_trials, cv_folds=cv_folds, heartbeat_interval=1,
                    grace_period=2, n_jobs=1)  # folds fitted in the worker (its fits counted)
    cfg["tuning"]["pruner"] = {"_target_": "optuna.pruners.NopPruner"}
    return {"X": X, "y": y, "name": "lr", "spec": cfg["classifier"]["lr"],
            "selection_cfg": cfg["selection"], "tuning_cfg": cfg["tuning"], "storage": url,
            "study_name": "shared"}


def complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


@pytest.mark.postgres
def test_two_workers_share_the_budget_and_one_finalizes(postgres_url: str,
                                                        tmp_path: Path) -> None:
    n_trials = 12
    kwargs = sweep_kwargs(postgres_url, n_trials=n_trials)
    workers = [start_worker(tmp_path, kwargs, "auto") for _ in range(2)]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in outputs]
    lines = sorted(out.strip() for out, _ in outputs)
    assert lines[0] == f"final {n_trials}"  # exactly one process refits ...
    assert lines[1].startswith("worker sweep 'shared': trials complete: lr ")  # ... one exits
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    # Each process stops once it sees the budget complete: a trial the other one had
    # started by then may complete beyond it, and the finalizer leaves it out.
    assert n_trials <= len(complete(study)) <= n_trials + 1
    assert not [t for t in study.trials if t.state.name == "RUNNING"]


@pytest.mark.postgres
def test_a_worker_killed_mid_trial_loses_nothing_and_its_trial_is_retried(
        postgres_url: str, tmp_path: Path) -> None:
    n_trials, cv_folds, done_before_kill = 6, 3, 2
    kwargs = sweep_kwargs(postgres_url, n_trials=n_trials, cv_folds=cv_folds)
    with start_worker(tmp_path, kwargs, "worker",
                      fits_before_block=done_before_kill * cv_folds) as worker:
        line = worker.stdout.readline()
        if line != "blocked\n":
            worker.kill()
            pytest.fail(f"the worker ended before blocking: {worker.communicate()[1]}")
        worker.kill()
        worker.wait()

    storage = open_storage(postgres_url, kwargs["tuning_cfg"])
    study = optuna.load_study(study_name="shared", storage=storage)
    assert len(complete(study)) == done_before_kill
    killed = study.trials[done_before_kill]
    assert killed.state.name == "RUNNING"
    deadline = time.monotonic() + DEADLINE_S  # the heartbeat stops; after grace_period ...
    while study.trials[done_before_kill].state.name == "RUNNING":
        assert time.monotonic() < deadline, "the dead worker's trial never went stale"
        fail_stale_trials(study)  # ... what every worker does before each trial
        time.sleep(kwargs["tuning_cfg"]["heartbeat_interval"])

    result = tune_classifier(**{**kwargs, "tuning_cfg": {**kwargs["tuning_cfg"],
                                                          "role": "finalize"}})
    trials = optuna.load_study(study_name="shared", storage=postgres_url).trials
    assert trials[done_before_kill].state.name == "FAIL"
    retried = [t for t in trials
               if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == done_before_kill]
    assert len(retried) == 1
    assert retried[0].state.name == "COMPLETE"
    assert retried[0].params == killed.params
    assert result.n_trials == len([t for t in trials if t.state.name == "COMPLETE"]) == n_trials
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def mlflow_server(postgres_url: str, tmp_path: Path):
    """``mlflow server`` on a free loopback port: PostgreSQL backend store, artifacts served
    from a local folder (clients need no shared file system)."""
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", postgres_url,
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + DEADLINE_S
    while True:  # until the server answers its health check
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()}")
        time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=60)
    log.close()
    mlflow.set_tracking_uri(None)


@pytest.mark.postgres
def test_runs_models_and_aliases_round_trip_through_an_mlflow_server(mlflow_server: str) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"age": rng.normal(65, 8, 40), "size_mm": rng.normal(30, 9, 40)})
    y = (frame["size_mm"] + rng.normal(0, 5, 40) > 30).astype(int)
    clinical = make_pipeline(StandardScaler(), LogisticRegression()).fit(frame, y)
    model = SelectedModel(feature_set="clinical", clinical=clinical,
                          clinical_features=["age", "size_mm"]).fit(None)
    setup(mlflow_server, "server")
    with tracked_run("server") as run:
        mlflow.log_metric("test_auc", 0.75)
        log_frame(pd.DataFrame({"patient_id": [f"P{i}" for i in range(40)], "split": "test",
                                "label": y, "probability": model.predict_proba(frame)[:, 1]}),
                  PREDICTIONS_FILE)
        version = log_selected_model(model, example=frame, extractor={},
                                     registered_model="server-model", target="PD-L1")
    client = mlflow.MlflowClient()
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert client.get_model_version_by_alias("server-model", CANDIDATE).version == version.version
    assert promote(name="server-model", alpha=0.05).promote  # no champion yet
    assert client.get_model_version_by_alias("server-model", CHAMPION).version == version.version
    served = mlflow.pyfunc.load_model("models:/server-model@champion").predict(frame)
    np.testing.assert_allclose(served["probability"], model.predict_proba(frame)[:, 1])


def test_roles_on_sqlite_a_worker_only_runs_trials_and_the_finalizer_claims(
        tmp_path: Path) -> None:
    kwargs = sweep_kwargs(f"sqlite:///{tmp_path}/optuna.db", n_trials=4)
    worker = {**kwargs, "tuning_cfg": {**kwargs["tuning_cfg"], "role": "worker"}}
    with pytest.raises(WorkerDone, match=r"trials complete: lr 4/4 \(4 here\); another"):
        tune_classifier(**worker)
    with pytest.raises(WorkerDone, match=r"lr 4/4 \(0 here\)"):  # nothing left to run
        tune_classifier(**worker)
    result = tune_classifier(**kwargs)  # auto: claims the finalization, runs no trial
    assert result.n_trials == 4
    claim = optuna.load_study(study_name="shared:finalizer", storage=kwargs["storage"])
    assert claim.user_attrs["holder"]["pid"] == os.getpid()
    assert claim.user_attrs["holder"]["done"] is not None
    again = tune_classifier(**kwargs)  # the same process may finalize again (a rerun)
    assert again.best_params == result.best_params
    with pytest.raises(ValueError, match=r"tuning\.role='boss'"):
        tune_classifier(**{**kwargs, "tuning_cfg": {**kwargs["tuning_cfg"], "role": "boss"}})


def test_a_claim_being_written_or_alive_is_kept_and_a_dead_one_taken_over_once(
        tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db",
                           sweep_kwargs(None, n_trials=1)["tuning_cfg"])
    optuna.create_study(storage=storage, study_name="s:finalizer")  # its holder not yet written
    assert _claim(storage, "s", "auto") == (None, "another process")
    assert _claim(storage, "s", "finalize") == ("s:finalizer:1", None)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout
    holder = {"host": socket.gethostname(), "pid": int(dead), "started": 0, "done": None}
    optuna.load_study(storage=storage, study_name="s:finalizer:1").set_user_attr(
        "holder", holder)
    assert _claim(storage, "s", "auto") == ("s:finalizer:2", None)  # the next claim, atomic
    alive = {**holder, "host": "elsewhere", "pid": 1}
    optuna.load_study(storage=storage, study_name="s:finalizer:2").set_user_attr(
        "holder", alive)
    assert _claim(storage, "s", "auto") == (None, "elsewhere (pid 1)")


def test_a_sqlite_store_writes_ahead_and_syncs_at_checkpoints(tmp_path: Path) -> None:
    """Every pooled connection of a SQLite study store is in WAL mode with
    synchronous=NORMAL, and another process reading the file sees the committed trials."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    storage = open_storage(url, sweep_kwargs(None, n_trials=1)["tuning_cfg"])
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    connections = [storage.engine.connect() for _ in range(2)]  # two at once: two made
    for connection in connections:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        connection.close()
    other = subprocess.run(
        [sys.executable, "-c", "import optuna; print(len(optuna.load_study(study_name='s', "
                               f"storage='{url}').trials))"],
        capture_output=True, text=True, check=True)
    assert other.stdout.strip() == "3"


def test_study_names_hash_what_changes_results_not_how_the_sweep_runs() -> None:
    tuning = sweep_kwargs(None, n_trials=4)["tuning_cfg"]
    runtime = {**tuning, "role": "worker", "storage": "postgresql+psycopg://h/db",
               "n_jobs": 8, "heartbeat_interval": 5, "grace_period": 20, "max_retry": 1}
    assert study_settings(runtime) == study_settings(tuning)
    assert study_settings({**tuning, "n_trials": 5}) != study_settings(tuning)
    assert "sampler" in study_settings(tuning)


def test_a_trial_killed_before_its_first_heartbeat_is_failed_and_retried(
        tmp_path: Path) -> None:
    tuning = sweep_kwargs(None, n_trials=1)["tuning_cfg"]
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db", tuning)
    study = optuna.create_study(storage=storage, study_name="s")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout
    silent = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # no record
    recorded = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    recorded.set_user_attr("worker", {"host": socket.gethostname(), "pid": int(dead)})
    alive = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    alive.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
    fail_dead_trials(study, {**tuning, "grace_period": 0})  # the silent one's start is past
    states = {t.number: t.state.name for t in study.trials}
    assert states[silent.number] == states[recorded.number] == "FAIL"
    assert states[alive.number] == "RUNNING"
    retried = [t for t in study.trials if t.state.name == "WAITING"]  # enqueued again
    assert sorted(t.params["x"] for t in retried) == sorted([silent.params["x"],
                                                              recorded.params["x"]])


def test_a_sweep_resumed_after_a_dead_trial_draws_what_the_uninterrupted_one_drew(
        tmp_path: Path) -> None:
    tuning = sweep_kwargs(None, n_trials=1)["tuning_cfg"]
    space = {"x": optuna.distributions.FloatDistribution(-3, 3),
             "c": optuna.distributions.CategoricalDistribution(["a", "b"])}

    def objective(trial: optuna.Trial) -> float:
        x, c = trial.suggest_float("x", -3, 3), trial.suggest_categorical("c", ["a", "b"])
        return -(x - 1) ** 2 + (c == "b")

    def study(name: str) -> optuna.Study:
        storage = open_storage(f"sqlite:///{tmp_path}/{name}.db", tuning)
        return _open_study(storage, name, tuning)

    def completed(s: optuna.Study) -> list[dict]:
        return [t.params for t in s.trials if t.state.name == "COMPLETE"]

    whole = study("whole")
    whole.optimize(objective, n_trials=14)  # past TPE's 10 random start-up trials
    crashed = study("crashed")
    crashed.optimize(objective, n_trials=6)
    crashed.ask(space)  # its process dies mid-trial: left RUNNING, no heartbeat, no record
    resumed = study("crashed")  # a fresh process opens the study again
    fail_dead_trials(resumed, {**tuning, "grace_period": 0})
    resumed.optimize(objective, n_trials=8)  # the dead trial's rerun, then the rest
    assert completed(resumed) == completed(whole)
