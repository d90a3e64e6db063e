"""The experiment: cohort → ROIs → image features → split → models → evaluation → MLflow.

This module only wires the stages together, in order, and owns the MLflow parent run.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pdl1exp.data.load import cohort_stage
from pdl1exp.data.manifest import problems_table
from pdl1exp.data.splits import assign_splits
from pdl1exp.features.explain import gradcam_overlays, linear_head
from pdl1exp.features.extract import (
    DEEP_PREFIX,
    ROI_DESCRIPTORS,
    Extraction,
    extract_features,
    extractor_identity,
)
from pdl1exp.features.finetune import finetune_curves_figure, training_folds
from pdl1exp.features.radiomics import (
    extract_replicates,
    radiomics_stage,
)
from pdl1exp.hashing import content_key
from pdl1exp.imaging.qc import qc_figures
from pdl1exp.imaging.rois import roi_stage
from pdl1exp.models.assessment import (
    delong_table,
    evaluate,
    model_rows,
    prespecified_delong,
    selected_features,
    split_metrics,
)
from pdl1exp.models.calibration import recalibrate
from pdl1exp.models.fitting import fit_feature_sets
from pdl1exp.models.nested import nested_estimates
from pdl1exp.models.results import Fitted, ModelResult, held_out_frame
from pdl1exp.models.selected import SelectedModel
from pdl1exp.models.tuning import WorkerDone, fit_memory
from pdl1exp.multirun import job_tags, study_prefix
from pdl1exp.reporting import write_outputs
from pdl1exp.serving import PREDICTIONS_FILE, log_selected_model
from pdl1exp.tracking import (
    environment_tags,
    log_cohort,
    log_frame,
    log_params,
    pseudonym,
    pseudonym_key,
    setup,
    tracked_run,
)

__all__ = ["FEATURE_SETS", "run"]

log = logging.getLogger(__name__)

IMAGE_FEATURE_SETS = ("dlr", "radiomics", "dlr+radiomics")
FEATURE_SETS = ("clinical", *IMAGE_FEATURE_SETS, "combined")


def _check_feature_sets(cfg: DictConfig) -> None:
    sets, signatures = list(cfg.feature_sets), list(cfg.combined_signatures)
    problems = [f"unknown feature set {s!r}" for s in sets if s not in FEATURE_SETS]
    if "combined" in sets:
        problems += [f"combined_signatures names {s!r}, which is not an image feature set "
                     f"in feature_sets" for s in signatures
                     if s not in sets or s not in IMAGE_FEATURE_SETS]
        if not signatures:
            problems.append("combined needs at least one of combined_signatures")
    if cfg.evaluation.primary not in sets:
        problems.append(f"evaluation.primary={cfg.evaluation.primary!r} is not in feature_sets")
    if problems:
        msg = (f"feature_sets {sets} (drawn from {FEATURE_SETS}): " + "; ".join(problems))
        raise ValueError(msg)


def _patient_names(cfg: DictConfig) -> Callable[[str], str]:
    """How figures name a patient: its id, or a keyed pseudonym (``tracking.pseudonymise``)."""
    if not cfg.tracking.pseudonymise:
        return str
    key = pseudonym_key(Path(cfg.paths.cache_dir))
    return lambda pid: pseudonym(pid, key)


def _log_qc(cfg: DictConfig, rois: pd.DataFrame) -> None:
    """QC figures of the ROIs as ``qc/<patient>.png`` (pseudonymised on request)."""
    with tempfile.TemporaryDirectory() as folder:
        if qc_figures(rois, folder, which=cfg.tracking.qc,
                      window=(cfg.preprocess.window_width, cfg.preprocess.window_level),
                      name=_patient_names(cfg), n_jobs=cfg.tracking.qc_jobs,
                      cache_dir=Path(cfg.paths.cache_dir) / "qc"):
            mlflow.log_artifacts(folder, "qc")


def _deep_features(cfg: DictConfig, rois: pd.DataFrame, y: pd.Series,
                   splits: pd.Series) -> Extraction:
    """The deep-feature stage (fine-tuning, when enabled, sees the training patients only)."""
    train_labels = y[splits == "train"]
    extraction = extract_features(
        rois, preprocess=cfg.preprocess, roi=cfg.roi, backbone=cfg.backbone, seed=cfg.seed,
        cache_dir=Path(cfg.paths.cache_dir) / "features", train_labels=train_labels,
        # Cross-fitted fine-tuning uses the downstream CV folds (same splitter, same order).
        folds=training_folds(train_labels, cv_folds=cfg.tuning.cv_folds,
                             random_state=cfg.tuning.random_state))
    mlflow.set_tags({"backbone_weights": extraction.weights_tag,
                     "feature_cache": "hit" if extraction.cache_hit else "miss",
                     "feature_cache_key": extraction.key, "precision": extraction.precision})
    if extraction.finetune:
        mlflow.log_dict(extraction.finetune, "finetune.json")
        mlflow.log_metrics({f"finetune_alignment_{k}": v
                            for k, v in extraction.finetune.get("alignment", {}).items()})
        with tempfile.TemporaryDirectory() as folder:
            figure = finetune_curves_figure(extraction.finetune, Path(folder) / "finetune.png",
                                            dpi=cfg.evaluation.dpi)
            mlflow.log_artifact(str(figure))
    return extraction


def _explain(cfg: DictConfig, rois: pd.DataFrame, splits: pd.Series, fitted: Fitted,
             extraction: Extraction, folder: Path) -> list[Path]:
    """Grad-CAM overlays of the chosen DLR model on a sample of held-out ROIs, written to
    ``<folder>/explain`` (logged with the run folder)."""
    if "dlr" not in fitted.chosen or cfg.evaluation.gradcam_n <= 0:
        return []
    try:
        head = linear_head(fitted.chosen["dlr"].model)
    except ValueError as err:
        log.warning("No Grad-CAM: %s", err)
        return []
    held_out = rois.loc[splits.index[splits != "train"]]
    result = gradcam_overlays(held_out, preprocess=cfg.preprocess, roi=cfg.roi,
                              backbone=cfg.backbone, seed=cfg.seed, head=head,
                              n=cfg.evaluation.gradcam_n, out_dir=folder / "explain",
                              name=_patient_names(cfg),
                              finetune=extraction.finetune,
                              reference=cfg.evaluation.gradcam_reference, dpi=cfg.evaluation.dpi,
                              cache_dir=Path(cfg.paths.cache_dir) / "gradcam")
    mlflow.log_metrics({"gradcam_heat_in_mask_median": float(result["heat_mass_inside"].median()),
                        "gradcam_area_in_mask_median": float(result["area_inside"].median())})
    log_frame(result.drop(columns="path").reset_index(drop=True), "explain/gradcam.csv")
    return [Path(p) for p in result["path"]]


def _nested(cfg: DictConfig, train: pd.DataFrame, features: dict[str, pd.DataFrame],
            chain: dict[str, Any]) -> pd.DataFrame:
    """Whole-chain nested CV on the training split; logs ``nested_<feature set>_auc``."""
    result = nested_estimates(train, features, outer_folds=cfg.tuning.outer_folds, **chain)
    metrics = result.metrics(train["label"], level=cfg.evaluation.level)
    primary = f"nested_{cfg.evaluation.primary}_auc"
    mlflow.log_metrics({**metrics, **{k.replace(primary, "nested_auc"): v
                                      for k, v in metrics.items() if k.startswith(primary)}})
    log_frame(result.folds, "nested_cv.csv")
    summary = result.folds.groupby("feature_set", sort=False).agg(
        chosen=("classifier", lambda c: ", ".join(c)),
        fold_auc_mean=("auc", "mean"), fold_auc_sd=("auc", "std")).reset_index()
    summary["nested_auc"] = [metrics[f"nested_{f}_auc"] for f in summary.feature_set]
    summary["ci_lower"] = [metrics[f"nested_{f}_auc_ci_lower"] for f in summary.feature_set]
    summary["ci_upper"] = [metrics[f"nested_{f}_auc_ci_upper"] for f in summary.feature_set]
    log.info("Nested CV AUC of the primary (%s): %.3f", cfg.evaluation.primary,
             metrics[primary])
    return summary


def _selection_inputs(cfg: DictConfig, rois: pd.DataFrame, centers: pd.Series,
                      train: pd.Index) -> dict[str, dict[str, Any]]:
    """Data the selection steps need besides the features: the ICC filter's replicates
    (radiomics of perturbed ROIs, training patients only) and ComBat's centers."""
    steps, inputs = cfg.selection.steps, {}
    if steps.get("icc") is not None:
        rad = cfg.radiomics
        replicates = extract_replicates(
            rois.loc[train], params=rad.params, cache_dir=Path(cfg.paths.cache_dir) / "features",
            perturbations=tuple(rad.replicates.perturbations), n_jobs=rad.n_jobs,
            label=rad.label, shift_fraction=rad.replicates.shift_fraction)
        inputs["icc"] = {"replicates": {k: r.table for k, r in replicates.items()}}
    if steps.get("combat") is not None:
        inputs["combat"] = {"batches": centers}
    return inputs


def _log_child(result: ModelResult, metrics: pd.DataFrame, tags: dict[str, str]) -> None:
    with tracked_run(result.name, nested=True, tags={**tags, "feature_set": result.feature_set,
                                                    "classifier": result.classifier}):
        log_params({"classifier": result.classifier, "feature_set": result.feature_set,
                    "threshold": result.threshold, **result.params})
        mlflow.log_metrics({**split_metrics(metrics), **result.sweep})
        for name, frame in result.extra.items():
            log_frame(frame, name)


def _selected_model(primary: ModelResult, fitted: Fitted, cohort_clinical: list[str],
                    signatures: list[str], signature_clip: float) -> SelectedModel:
    """The primary model as one estimator from the feature table to a probability."""
    if primary.feature_set == "combined":
        image = {f: fitted.chosen[f] for f in signatures}
    elif primary.feature_set == "clinical":
        image = {}
    else:
        image = {primary.feature_set: primary}
    model = SelectedModel(
        feature_set=primary.feature_set, threshold=primary.threshold,
        image={f: m.model for f, m in image.items()},
        image_features={f: m.features for f, m in image.items()},
        clinical=primary.model if primary.feature_set in ("clinical", "combined") else None,
        clinical_features=cohort_clinical, signature_clip=signature_clip,
        calibrator=primary.calibrator)
    return model.fit(None)


def _run_folder() -> Path:
    """Hydra's run folder when running under Hydra, else a fresh temporary folder."""
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path(tempfile.mkdtemp(prefix="pdl1exp-"))


def _plain(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.to_container(cfg[key], resolve=True)


def run(cfg: DictConfig) -> float:
    """Run one experiment; return the primary model's training CV AUC."""
    logging.getLogger("pdl1exp").setLevel(cfg.log_level)
    _check_feature_sets(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    setup(cfg.tracking.uri, cfg.tracking.experiment, stale_after_s=cfg.tracking.stale_after_s)
    tags = {**environment_tags(), **job_tags(), "config_hash": content_key(resolved),
            "experiment": cfg.name}
    try:
        with tracked_run(cfg.name, tags=tags, heartbeat_s=cfg.tracking.heartbeat_s) as parent:
            return _experiment(cfg, tags)
    except WorkerDone:  # this process only helped another one's sweep: leave no run behind
        MlflowClient().delete_run(parent.info.run_id)
        raise


def _experiment(cfg: DictConfig, tags: dict[str, str]) -> float:
    """The stages in order, inside the parent run."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    log_params(resolved)
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    cohort = cohort_stage(cfg)
    mlflow.set_tag("data_hash", cohort.data_hash)
    log_cohort(cohort.table[["label", *cohort.clinical]], name=cfg.dataset.name,
               digest=cohort.data_hash, target="label")
    rois, roi_problems = roi_stage(cfg, cohort)
    problems = cohort.problems + roi_problems
    _log_qc(cfg, rois)
    radiomics = None
    if {"radiomics", "dlr+radiomics"} & set(cfg.feature_sets):
        radiomics = radiomics_stage(cfg, rois, source=cohort.source)
        mlflow.set_tags({"radiomics_cache": "hit" if radiomics.cache_hit else "miss",
                         "radiomics_cache_key": radiomics.key})
        problems += radiomics.problems
        rois = rois.loc[rois.index.isin(radiomics.table.index)]
    if problems:
        log_frame(problems_table(problems), "excluded_patients.csv")
    table = cohort.table.loc[rois.index].join(rois[list(ROI_DESCRIPTORS)])
    y = table["label"]
    splits = assign_splits(table, test_size=cfg.dataset.test_size, seed=cfg.seed)
    log_frame(pd.DataFrame({"split": splits, "label": y}), "splits.csv", index=True)
    mlflow.log_metrics({f"n_{s}": int((splits == s).sum()) for s in splits.unique()})

    features: dict[str, pd.DataFrame] = {}
    extraction = None
    if {"dlr", "dlr+radiomics"} & set(cfg.feature_sets):
        extraction = _deep_features(cfg, rois, y, splits)
        features["dlr"] = extraction.table.loc[rois.index].filter(like=DEEP_PREFIX, axis=1)
    if radiomics is not None:
        features["radiomics"] = radiomics.table.loc[rois.index]
    if "dlr+radiomics" in cfg.feature_sets:  # early fusion: one selection over both
        features["dlr+radiomics"] = features["dlr"].join(features["radiomics"])
    features = {f: X for f, X in features.items() if f in cfg.feature_sets}
    chain = {"feature_sets": list(cfg.feature_sets),
             "combined_signatures": list(cfg.combined_signatures),
             "numeric": cohort.numeric, "categorical": cohort.categorical,
             "log": list(cfg.dataset.clinical.log),
             "spline": list(cfg.dataset.clinical.spline),
             "clinical": _plain(cfg, "clinical"), "classifiers": _plain(cfg, "classifier"),
             "selection": _plain(cfg, "selection"), "tuning": _plain(cfg, "tuning"),
             "study_prefix": study_prefix(cfg.name), "seed": cfg.seed,
             "memory": fit_memory(Path(cfg.paths.cache_dir) / "fits"),
             "selection_inputs": _selection_inputs(cfg, rois, table["center"],
                                                   splits.index[splits == "train"])}
    fitted = fit_feature_sets(table, features, splits, **chain)
    ev = cfg.evaluation
    raw = fitted.primary(ev.primary)
    fitted.swap(raw, recalibrate(raw, y, method=ev.recalibrate))
    nested = None
    if cfg.tuning.protocol == "nested":
        nested = _nested(cfg, table.loc[splits == "train"], features, chain)
    metrics = pd.concat([evaluate(m, y, n_boot=ev.n_boot, level=ev.level, seed=cfg.seed,
                                  proportion_ci=ev.proportion_ci)
                         for m in fitted.models], ignore_index=True)
    log_frame(metrics, "metrics.csv")
    delong = prespecified_delong(fitted, y)
    log_frame(delong, "delong_tests.csv")
    log_frame(delong_table(fitted.models, y), "delong_tests_exploratory.csv")
    for model in fitted.models:
        _log_child(model, model_rows(metrics, model), tags)
    primary = fitted.primary(ev.primary)
    mlflow.log_metrics(split_metrics(model_rows(metrics, primary)))
    mlflow.set_tags({"best_feature_set": primary.feature_set,
                     "best_classifier": primary.classifier,
                     "recalibration": ev.recalibrate})
    if fitted.chosen:
        first = fitted.chosen.get(primary.feature_set) or next(iter(fitted.chosen.values()))
        log_frame(selected_features(first.model), "selected_features.csv")
    for feature_set, model in fitted.chosen.items():  # the reproducibility filter's ICCs
        icc = getattr(model.model.named_steps.get("icc"), "icc_", None)
        if icc is not None:
            log_frame(icc, f"icc_{feature_set}.csv")
    folder = _run_folder()
    explained = _explain(cfg, rois, splits, fitted, extraction, folder) if extraction else []
    write_outputs(cfg, cohort=cohort, table=table, splits=splits, fitted=fitted,
                  primary=primary, metrics=metrics, delong=delong, nested=nested,
                  versions={**tags, "data_hash": cohort.data_hash}, folder=folder,
                  explained=explained)
    selected = _selected_model(primary, fitted, cohort.clinical,
                               list(cfg.combined_signatures), cfg.clinical.signature_clip)
    log_frame(held_out_frame(primary, y), PREDICTIONS_FILE)
    columns = pd.concat(features.values(), axis=1) if features else None
    inputs = table if columns is None else table.join(
        columns.loc[:, ~columns.columns.duplicated()])
    identity = extractor_identity(cfg, extraction) if extraction else {}
    if radiomics is not None:  # predict recomputes the radiomics with these
        identity |= {k: _plain(cfg, k) for k in ("radiomics", "segmentation")}
    log_selected_model(selected, example=inputs.loc[splits == "train"],
                       extractor=identity,
                       registered_model=cfg.tracking.registered_model,
                       target=cohort.target_name)
    log.info("Primary model %s: training CV AUC %.3f; metrics in MLflow run %s",
             primary.name, primary.cv_auc, mlflow.active_run().info.run_id)
    return float(primary.cv_auc)
