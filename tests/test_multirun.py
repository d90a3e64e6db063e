"""Multirun: launcher configs, job tags and the summary across seeds logged as its own run."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pdl1exp.multirun import (
    MULTIRUN_TAG,
    OVERRIDES_TAG,
    SUMMARY_RUN,
    JobStartMethod,
    MultirunSummary,
    configuration,
    job_tags,
    study_prefix,
    write_multirun_summary,
)
from pdl1exp.study import study_runs
from pdl1exp.tracking import log_params, setup, tracked_run
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_launcher_configs_compose(compose_cfg) -> None:
    from hydra import compose

    slurm = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                    return_hydra_config=True).hydra.launcher
    assert slurm._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (slurm.partition, slurm.timeout_min, slurm.cpus_per_task, slurm.tasks_per_node) == (
        "gpu", 240, 8, 1)
    joblib = compose("config", overrides=["hydra/launcher=joblib"],
                     return_hydra_config=True).hydra
    assert joblib.launcher._target_.endswith("joblib_launcher.JoblibLauncher")
    callback = instantiate(joblib.callbacks.multirun_summary)
    assert isinstance(callback, MultirunSummary)
    assert callback.metrics == ["test_auc", "nested_auc"]


def test_a_configuration_is_the_overrides_but_the_seed() -> None:
    assert configuration(["+experiment=smoke", "backbone=resnet18_2d", "seed=2",
                          "feature_sets=[clinical,dlr]"]) == (
        "+experiment=smoke backbone=resnet18_2d feature_sets=[clinical,dlr]")
    assert job_tags() == {}  # not under a Hydra multirun
    assert study_prefix("smoke") == "smoke"


def test_a_job_in_a_loky_worker_spawns_pools_with_the_plain_start_method() -> None:
    from joblib.externals.loky.backend import context  # registers the "loky" context

    before = multiprocessing.get_start_method(allow_none=True)
    default = multiprocessing.get_all_start_methods()[0]
    try:
        multiprocessing.set_start_method(context.LokyContext._name, force=True)
        JobStartMethod().on_job_start(config=OmegaConf.create({}))
        assert multiprocessing.get_start_method() == default
    finally:
        multiprocessing.set_start_method(before, force=True)


def _job(sweep: str, overrides: list[str], metrics: dict[str, float], *,
         status: str = "FINISHED") -> str:
    seed = next(o.split("=")[1] for o in overrides if o.startswith("seed="))
    tags = {MULTIRUN_TAG: sweep, OVERRIDES_TAG: json.dumps(overrides),
            "backbone_weights": f"random:{seed}"}
    with tracked_run("smoke", tags=tags) as run:
        log_params({"seed": seed})
        mlflow.log_metrics(metrics)
        with tracked_run("dlr/lr", nested=True, tags=tags):  # children are not jobs
            mlflow.log_metrics({"test_auc": 0.99})
        if status != "FINISHED":
            mlflow.end_run(status)
    return run.info.run_id


def test_summary_has_one_row_per_configuration_across_seeds(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = setup(uri, "smoke")
    sweep, other = str(tmp_path / "sweep"), str(tmp_path / "other")
    r18, dense = ["+experiment=smoke", "backbone=resnet18_2d"], [
        "+experiment=smoke", "backbone=densenet121_2d"]
    _job(sweep, [*r18, "seed=1"], {"test_auc": 0.6, "nested_auc": 0.7})
    _job(sweep, [*r18, "seed=2"], {"test_auc": 0.8, "nested_auc": 0.5})
    _job(sweep, [*dense, "seed=1"], {"test_auc": 0.7})  # holdout protocol: no nested AUC
    _job(sweep, [*dense, "seed=2"], {"test_auc": 0.9}, status="FAILED")
    _job(other, [*dense, "seed=3"], {"test_auc": 0.1})  # another sweep of the experiment

    callback = MultirunSummary(metrics=["test_auc", "nested_auc"], sort_by="test_auc")
    callback.on_multirun_end(  # what Hydra calls with the master config
        config=OmegaConf.create({"tracking": {"uri": uri}, "hydra": {"sweep": {"dir": sweep}}}))
    [(where, summary)] = write_multirun_summary(
        uri=uri, sweep=sweep, metrics=["test_auc", "nested_auc"], sort_by="test_auc").items()
    assert where == experiment
    assert list(summary.configuration) == [" ".join(r18), " ".join(dense)]
    first, second = summary.iloc[0], summary.iloc[1]
    assert (first.n_seeds, first.seeds, second.n_seeds, second.seeds) == (2, "1,2", 1, "1")
    assert first.test_auc == pytest.approx(0.7)
    assert first.test_auc_sd == pytest.approx(0.1414213562)
    assert first.nested_auc == pytest.approx(0.6)
    assert pd.isna(second.nested_auc)
    assert pd.isna(second.test_auc_sd)

    runs = mlflow.search_runs(experiment_ids=[experiment],
                              filter_string=f"tags.mlflow.runName = '{SUMMARY_RUN}'",
                              output_format="list")
    assert len(runs) == 2  # the callback's and the direct call's
    for run in runs:
        assert run.data.tags["multirun_summary"] == "true"
        assert run.data.tags[MULTIRUN_TAG] == sweep
        assert run.data.metrics == {"n_runs": 3.0, "n_configurations": 2.0}
        logged = MlflowClient().download_artifacts(run.info.run_id, "multirun_summary.csv",
                                                   str(tmp_path / run.info.run_id))
        pd.testing.assert_frame_equal(pd.read_csv(logged), summary.reset_index(drop=True),
                                      check_dtype=False)
    # the ROI/backbone study never counts a multirun summary as a model run
    study = set(study_runs("smoke", params=[], metrics=["test_auc"]).run_id)
    assert len(study) == 4
    assert study.isdisjoint(r.info.run_id for r in runs)


@pytest.mark.slow
def test_joblib_multirun_logs_one_parent_run_per_job_and_the_summary(tmp_path: Path) -> None:
    """Two jobs at once (joblib), sharing the MLflow/Optuna stores and the cache folder."""
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "pdl1exp", "-m", "hydra/launcher=joblib",
               "hydra.launcher.n_jobs=2", "+experiment=smoke", "feature_sets=[clinical,radiomics]",
               "evaluation.primary=radiomics", "seed=1,2", "tracking.qc=none",
               f"hydra.sweep.dir={sweep}", *tiny_overrides(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["smoke"], output_format="list")
    jobs = [r for r in runs if r.info.run_name == "smoke"]
    assert sorted(r.data.params["seed"] for r in jobs) == ["1", "2"]
    assert {r.info.status for r in jobs} == {"FINISHED"}
    assert {r.data.tags[MULTIRUN_TAG] for r in jobs} == {str(sweep)}
    assert sorted(r.data.tags["multirun_job"] for r in jobs) == ["0", "1"]
    studies = optuna.get_all_study_names(f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert studies  # each job's radiomics sweep (its pool spawned inside a loky worker)
    assert all(name.startswith("smoke/job-") for name in studies)
    assert all((sweep / str(n) / "report.html").is_file() for n in (0, 1))
    [summary] = [r for r in runs if r.info.run_name == SUMMARY_RUN]
    table = pd.read_csv(MlflowClient().download_artifacts(
        summary.info.run_id, "multirun_summary.csv", str(tmp_path / "summary")))
    assert (len(table), table.n_seeds[0], table.seeds[0]) == (1, 2, "1,2")
    assert table.test_auc[0] == pytest.approx(
        sum(r.data.metrics["test_auc"] for r in jobs) / 2)
