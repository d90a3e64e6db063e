"""End to end: the smoke experiment logs a complete parent run; failures end FAILED."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from pdl1exp.data.manifest import CohortError
from pdl1exp.pipeline import run
from tests.conftest import fmcib_checkpoint, fmcib_trunk, tiny_overrides


def _runs(root: Path, experiment: str) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns/mlflow.db")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def test_smoke_experiment_end_to_end(smoke_store, tmp_path: Path) -> None:
    root, cfg = smoke_store
    runs = _runs(root, "smoke")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name for r in runs} - {"smoke"}
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert children == {"clinical/lr", "combined/lr"} | {
        f"{fs}/{c}" for fs in ("dlr", "radiomics", "dlr+radiomics") for c in ("lr", "rf")}
    assert all(r.info.status == "FINISHED" for r in runs)
    dlr_lr = next(r for r in runs if r.info.run_name == "dlr/lr")
    assert dlr_lr.data.metrics["sweep_n_trials"] == cfg.tuning.n_trials
    assert dlr_lr.data.metrics["sweep_cv_auc_fold_sd"] >= 0.0
    assert "trials.csv" in {a.path for a in MlflowClient().list_artifacts(dlr_lr.info.run_id)}
    tags = parent.data.tags
    for tag in ("git_commit", "data_hash", "config_hash", "backbone_weights", "feature_cache",
                "feature_cache_key", "best_feature_set", "best_classifier", "version.torch"):
        assert tags.get(tag), tag
    assert tags["backbone_weights"] == "random:42"
    (dataset,) = parent.inputs.dataset_inputs
    assert dataset.dataset.name == "synthetic"
    assert tags["data_hash"].startswith(dataset.dataset.digest)
    assert "patient_id" not in dataset.dataset.schema
    assert tags["feature_cache"] == "miss"
    metrics = parent.data.metrics
    for split in ("train", "cv", "test"):
        for name in ("auc", "sensitivity", "specificity"):
            assert 0.0 <= metrics[f"{split}_{name}"] <= 1.0
            assert metrics[f"{split}_{name}_ci_lower"] <= metrics[f"{split}_{name}"]
            assert metrics[f"{split}_{name}"] <= metrics[f"{split}_{name}_ci_upper"]
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "metrics.csv", "delong_tests.csv", "splits.csv",
            "selected_features.csv", "predictions.csv", "qc", "roc_test.png",
            "calibration_test.png", "dca_test.png", "lasso_path.png", "nomogram.png",
            "report.html", "metrics_table.csv", "baseline_by_split.csv",
            "clinical_odds_ratios.csv", "delong_tests_exploratory.csv",
            "roc_test_exploratory.png", "explain"} <= artifacts
    explain = [a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "explain")]
    assert "explain/gradcam.csv" in explain
    assert any(p.startswith("explain/SYN") and p.endswith(".png") for p in explain)
    qc = [a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "qc")]
    assert qc
    assert all(p.startswith("qc/SYN") and p.endswith(".png") for p in qc)
    folder = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id,
                                                 dst_path=str(tmp_path / "artifacts"))
    table = pd.read_csv(Path(folder) / "metrics.csv")
    assert set(table["split"]) == {"train", "cv", "test"}
    assert set(table["feature_set"]) == {"clinical", "dlr", "radiomics", "dlr+radiomics",
                                         "combined"}
    assert {"bootstrap", "delong", "wald"} <= set(table["ci_method"])
    for name in ("calibration_intercept", "calibration_slope"):
        assert f"test_{name}" in metrics
        assert metrics[f"test_{name}_ci_lower"] <= metrics[f"test_{name}_ci_upper"]
    assert tags["best_feature_set"] == "combined"  # the pre-specified primary, always
    delong = pd.read_csv(Path(folder) / "delong_tests.csv")
    assert list(delong.columns) == ["split", "model_a", "model_b", "z", "p", "p_holm"]
    assert len(delong) == 1 + 3 + 3  # combined vs clinical and each image; images pairwise
    assert (delong["p_holm"] >= delong["p"]).all()
    report = (Path(folder) / "report.html").read_text()
    for text in ("AUC (95% CI)", "tuning CV (optimistic)", "TRIPOD+AI", "Holm-adjusted",
                 "Grad-CAM",
                 "data:image/png;base64"):
        assert text in report, text
    splits = pd.read_csv(Path(folder) / "splits.csv", index_col="patient_id")
    assert len(splits) == cfg.dataset.generator.n_patients
    assert (splits["split"] == "test").mean() == pytest.approx(cfg.dataset.test_size, abs=0.05)
    assert splits.groupby("split")["label"].mean().between(0.3, 0.7).all()  # stratified

    # Same config again: features come from the cache, numbers are identical.
    run(cfg)
    again = [r for r in _runs(root, "smoke")
             if "mlflow.parentRunId" not in r.data.tags and r.info.run_id != parent.info.run_id]
    assert again[0].data.tags["feature_cache"] == "hit"
    assert again[0].data.metrics["test_auc"] == metrics["test_auc"]


def test_bad_manifest_ends_the_run_failed(compose_cfg, tmp_path: Path) -> None:
    manifest = tmp_path / "cohort.csv"
    pd.DataFrame([{"patient_id": "A", "image": "a.nii.gz", "mask": "m.nii.gz", "label": 1},
                  {"patient_id": "B", "image": "b.nii.gz", "mask": "m.nii.gz", "label": 0}]
                 ).to_csv(manifest, index=False)
    cfg = compose_cfg("+experiment=clinical", "dataset=manifest", f"dataset.path={manifest}",
                      *tiny_overrides(tmp_path))
    with pytest.raises(CohortError, match="'A'"):
        run(cfg)
    (failed,) = _runs(tmp_path, "clinical")
    assert failed.info.status == "FAILED"
    assert "CohortError" in failed.data.tags["error"]


def test_fmcib_from_a_checkpoint_file_runs_the_smoke_experiment(compose_cfg,
                                                               tmp_path: Path) -> None:
    """``backbone=fmcib_3d`` with weights from a file in FMCIB's format (trunk_state_dict
    beside the head, made here) through the whole smoke experiment."""
    torch.manual_seed(1)
    path = fmcib_checkpoint(tmp_path / "fmcib.torch", fmcib_trunk().state_dict())
    cfg = compose_cfg("+experiment=smoke", "backbone=fmcib_3d", f"backbone.weights={path}",
                      "backbone.input_size=[16,16,16]", "feature_sets=[dlr]",
                      "evaluation.primary=dlr", "classifier=lr", *tiny_overrides(tmp_path))
    assert (cfg.roi.mode, cfg.preprocess.spacing_mm) == ("seed_patch_3d", [1.0, 1.0, 1.0])
    run(cfg)
    (parent,) = [r for r in _runs(tmp_path, "smoke") if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED"
    sha = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert parent.data.tags["backbone_weights"] == f"file:{sha}"
    assert 0.0 <= parent.data.metrics["test_auc"] <= 1.0
    folder = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id,
                                                 dst_path=str(tmp_path / "artifacts"))
    selected = pd.read_csv(Path(folder) / "selected_features.csv")
    assert selected.to_string().count("dl_") > 0  # FMCIB's 4096 features reached the model


@pytest.mark.slow
def test_nested_protocol_logs_the_outer_estimate(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg("+experiment=smoke", "feature_sets=[dlr]", "evaluation.primary=dlr",
                      "tuning.protocol=nested",
                      "tuning.outer_folds=3", "classifier=lr", *tiny_overrides(tmp_path))
    run(cfg)
    (parent,) = [r for r in _runs(tmp_path, "smoke") if "mlflow.parentRunId" not in r.data.tags]
    metrics = parent.data.metrics
    assert metrics["nested_auc_ci_lower"] <= metrics["nested_auc"] <= metrics["nested_auc_ci_upper"]
    assert metrics["nested_auc"] == metrics["nested_dlr_auc"]
    assert metrics["nested_dlr_auc_fold_sd"] >= 0.0
    folder = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id,
                                                 dst_path=str(tmp_path / "artifacts"))
    folds = pd.read_csv(Path(folder) / "nested_cv.csv")
    assert list(folds["fold"]) == [0, 1, 2]
    assert set(folds["classifier"]) == {"lr"}
    assert "Nested cross-validation" in (Path(folder) / "report.html").read_text()


@pytest.mark.slow
def test_external_patients_are_reported_per_center(compose_cfg, tmp_path: Path) -> None:
    smoke = compose_cfg("+experiment=smoke", *tiny_overrides(tmp_path))
    manifest = pd.read_csv(instantiate(smoke.dataset.generator).write(),
                           dtype={"patient_id": str})
    positive = manifest["pdl1_tps"] >= 1
    rank = manifest.groupby(positive).cumcount()
    manifest["split"] = np.where(rank < 4, "external", np.where(rank < 8, "test", "train"))
    manifest["center"] = np.where(manifest["split"] == "external", "B", "A")
    root = Path(smoke.dataset.generator.cache_dir)
    path = next(root.iterdir()) / "with_external.csv"
    manifest.to_csv(path, index=False)
    cfg = compose_cfg("+experiment=clinical", "dataset=manifest", f"dataset.path={path}",
                      "dataset.clinical.numeric=[age,pack_years,cea]",
                      "dataset.clinical.categorical=[sex,smoking,histology,stage]",
                      *tiny_overrides(tmp_path))
    run(cfg)
    (parent,) = [r for r in _runs(tmp_path, "clinical")
                 if "mlflow.parentRunId" not in r.data.tags]
    metrics = parent.data.metrics
    assert metrics["n_external"] == 8
    assert "external_B_auc" in metrics
    assert metrics["external_B_auc_ci_lower"] <= metrics["external_B_auc"]


@pytest.mark.slow
def test_an_external_scanner_shifted_center_with_combat_gets_every_feature_set(
        compose_cfg, tmp_path: Path) -> None:
    """Center B has another scanner (HU offset, more noise, softer kernel) and is split
    between training and test; center C's patients (same scanner shift) are external. ComBat
    is fitted on the training rows (A and B) inside the pipeline, C is unseen (pooled rule),
    and every feature set is reported on the external center."""
    shift = "{hu_offset: 40.0, noise_scale: 1.6, psf_mm: 1.2}"
    generator = ["dataset.generator.centers=[A,B,C]",
                 f"++dataset.generator.scanners={{B: {shift}, C: {shift}}}"]
    smoke = compose_cfg("+experiment=smoke", *generator, *tiny_overrides(tmp_path))
    manifest = pd.read_csv(instantiate(smoke.dataset.generator).write(),
                           dtype={"patient_id": str})
    positive = manifest["pdl1_tps"] >= 1
    external = manifest["center"] == "C"
    rank = manifest[~external].groupby(positive[~external]).cumcount()
    manifest["split"] = "external"
    manifest.loc[~external, "split"] = np.where(rank < 4, "test", "train")
    path = next(Path(smoke.dataset.generator.cache_dir).iterdir()) / "with_external.csv"
    manifest.to_csv(path, index=False)
    cfg = compose_cfg("+experiment=smoke", "dataset=manifest", f"dataset.path={path}",
                      "dataset.clinical.numeric=[age,pack_years,cea]",
                      "dataset.clinical.categorical=[sex,smoking,histology,stage]",
                      "selection=robust", "selection.steps.lasso.cv=3",
                      "selection.steps.combat={_target_: pdl1exp.models.harmonization.ComBat,"
                      " unseen: pooled}", *tiny_overrides(tmp_path))
    run(cfg)
    runs = _runs(tmp_path, "smoke")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.metrics["n_external"] == external.sum()
    reported = {r.data.tags["mlflow.runName"].split("/")[0] for r in runs
                if r is not parent and "external_C_auc" in r.data.metrics}
    assert reported == {"clinical", "dlr", "radiomics", "dlr+radiomics", "combined"}
