"""The ROI/backbone study: its multirun config, and the summary of its MLflow runs."""

from __future__ import annotations

import itertools
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient

from pdl1exp.study import SUMMARY_RUN, write_study_summary
from pdl1exp.tracking import log_params, setup, tracked_run
from tests.conftest import CONF

PARAMS = ["roi.mode", "backbone.name", "backbone.weights", "backbone.finetune.enabled"]
METRICS = ["test_auc", "nested_dlr_auc"]


def test_study_sweeps_roi_backbone_and_weights_as_normal_dlr_runs() -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=dlr_study"], return_hydra_config=True)
        sweep = {k: v.split(",") for k, v in cfg.hydra.sweeper.params.items()}
        assert set(sweep) == {"roi", "backbone", "backbone.weights"}
        assert list(cfg.study.params) == PARAMS
        assert list(cfg.study.metrics) == METRICS
        assert (cfg.feature_sets, cfg.evaluation.primary, cfg.tuning.protocol) == (
            ["dlr"], "dlr", "nested")  # logs test_auc and nested_dlr_auc on the parent
        assert list(cfg.classifier) == ["lr"]  # one pre-specified model: inputs compared alone
        for combination in itertools.product(*(
                [f"{k}={v}" for v in values] for k, values in sweep.items())):
            job = compose("config", overrides=["+experiment=dlr_study", *combination])
            assert job.name == "dlr_study"
            assert job.backbone.spatial_dims == 2
            assert job.roi.mode in ("2d", "2.5d_adjacent", "2.5d_orthogonal")
        three_d = compose("config", overrides=["+experiment=dlr_study", "roi=seed_patch_3d",
                                               "backbone=resnet18_3d"])
        assert (three_d.roi.mode, three_d.backbone.spatial_dims) == ("seed_patch_3d", 3)
    GlobalHydra.instance().clear()


def _run(roi: str, backbone: str, seed: int, metrics: dict[str, float], *,
         status: str = "FINISHED") -> str:
    params = {"roi": {"mode": roi}, "seed": seed,
              "backbone": {"name": backbone, "weights": "random", "finetune": {"enabled": False}}}
    with tracked_run("dlr_study", tags={"backbone_weights": f"random:{seed}"}) as run:
        log_params(params)
        mlflow.log_metrics(metrics)
        with tracked_run("dlr/lr", nested=True):  # children are not study runs
            mlflow.log_metrics({"test_auc": 0.99})
        if status != "FINISHED":
            mlflow.end_run(status)
    return run.info.run_id


def test_summary_reads_the_latest_finished_run_of_each_combination_and_seed(
        tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    setup(uri, "dlr_study")
    _run("2d", "resnet18_2d", 1, {"test_auc": 0.10, "nested_dlr_auc": 0.10})  # superseded
    _run("2d", "resnet18_2d", 1, {"test_auc": 0.60, "nested_dlr_auc": 0.70})
    _run("2d", "resnet18_2d", 2, {"test_auc": 0.80, "nested_dlr_auc": 0.50})
    _run("2.5d_adjacent", "resnet50_2d", 1, {"test_auc": 0.55, "nested_dlr_auc": 0.65})
    _run("2.5d_adjacent", "resnet50_2d", 2, {"test_auc": 0.95, "nested_dlr_auc": 0.95},
         status="FAILED")
    _run("2.5d_orthogonal", "resnet18_2d", 1, {"test_auc": 0.70})  # no nested metric
    setup(uri, "other")
    _run("2d", "resnet50_2d", 1, {"test_auc": 0.99, "nested_dlr_auc": 0.99})

    summary = write_study_summary(uri=uri, experiment="dlr_study", params=PARAMS,
                                  metrics=METRICS, sort_by="nested_dlr_auc")
    assert list(summary[["roi.mode", "backbone.name"]].itertuples(index=False, name=None)) == [
        ("2.5d_adjacent", "resnet50_2d"), ("2d", "resnet18_2d"),
        ("2.5d_orthogonal", "resnet18_2d")]  # by nested AUC, the one without it last
    row = summary.iloc[1]
    assert (row.n_runs, row.seeds, row.weights_loaded) == (2, "1,2", "random:1,random:2")
    assert row.test_auc == pytest.approx(0.70)
    assert row.test_auc_sd == pytest.approx(0.1414, abs=1e-3)
    assert row.nested_dlr_auc == pytest.approx(0.60)
    assert summary.iloc[0].n_runs == 1
    assert pd.isna(summary.iloc[2].nested_dlr_auc)

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("dlr_study")
    (logged,) = client.search_runs([experiment.experiment_id],
                                   filter_string=f"attributes.run_name = '{SUMMARY_RUN}'")
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} == {
        "study_summary.csv", "study_runs.csv", "study_summary.png"}
    csv = pd.read_csv(client.download_artifacts(logged.info.run_id, "study_summary.csv",
                                                str(tmp_path)))
    assert csv["test_auc"].tolist() == pytest.approx(summary["test_auc"].tolist(), nan_ok=True)
    assert logged.data.metrics["n_runs"] == 5  # finished top-level runs, superseded included
    # Summarising again ignores the earlier summary run.
    again = write_study_summary(uri=uri, experiment="dlr_study", params=PARAMS,
                                metrics=METRICS, sort_by="nested_dlr_auc")
    pd.testing.assert_frame_equal(again, summary)


def test_summary_of_an_empty_study_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="run the study first"):
        write_study_summary(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="dlr_study",
                            params=PARAMS, metrics=METRICS, sort_by="nested_dlr_auc")
