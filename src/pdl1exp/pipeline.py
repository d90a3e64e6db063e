"""The experiment: cohort → ROIs → deep features → split → models → evaluation → MLflow.

This module only wires the stages together, in order, and owns the MLflow parent run.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from sklearn.base import clone

from pdl1exp.data.images import read_image
from pdl1exp.data.load import cohort_stage
from pdl1exp.data.manifest import Cohort, problems_table
from pdl1exp.data.splits import assign_splits
from pdl1exp.evaluation import (
    delong_ci,
    delong_test,
    flatten_metrics,
    metrics_with_ci,
    youden_threshold,
)
from pdl1exp.features.extract import (
    DEEP_PREFIX,
    ROI_DESCRIPTORS,
    Extraction,
    extract_features,
    extractor_code_version,
)
from pdl1exp.hashing import content_key
from pdl1exp.imaging.qc import qc_figure
from pdl1exp.imaging.rois import roi_stage
from pdl1exp.models.clinical import SIGNATURE, clinical_pipeline, out_of_fold, signature
from pdl1exp.models.selected import SelectedModel
from pdl1exp.models.tuning import TuningResult, nested_cv_auc, sweep
from pdl1exp.reporting import write_outputs
from pdl1exp.serving import PREDICTIONS_FILE, log_selected_model
from pdl1exp.tracking import (
    environment_tags,
    flatten,
    log_frame,
    log_params,
    pseudonym,
    pseudonym_key,
    setup,
    tracked_run,
)

__all__ = ["ModelResult", "run"]

log = logging.getLogger(__name__)

FEATURE_SETS = ("clinical", "dlr", "combined")


@dataclass
class ModelResult:
    """One fitted model and its predictions.

    Args:
        feature_set: ``clinical``, ``dlr`` or ``combined``.
        classifier: classifier name.
        cv_auc: mean CV AUC on the training split (the model-selection criterion).
        threshold: Youden cut-off chosen on the training split's out-of-fold predictions.
        proba: split name → probabilities indexed by patient_id (``train`` apparent,
            ``cv`` out-of-fold, ``test``, ``external_<center>``).
        params: hyperparameters.
        model: the pipeline fitted on the whole training split.
        extra: additional artifacts (tables) for the child run.
        sweep: Optuna sweep summary metrics (mean tuned CV AUC, its fold SD, trial counts).
    """

    feature_set: str
    classifier: str
    cv_auc: float
    threshold: float
    proba: dict[str, pd.Series]
    params: dict[str, Any]
    model: Any
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)
    sweep: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.feature_set}/{self.classifier}"


def _log_qc(cfg: DictConfig, rois: pd.DataFrame) -> None:
    """QC figures of the segmented ROIs as ``qc/<patient>.png`` (pseudonymised on request)."""
    chosen = rois if cfg.tracking.qc == "all" else rois[rois["roi_source"] == "seeded"]
    if cfg.tracking.qc == "none" or chosen.empty:
        return
    key = pseudonym_key(Path(cfg.paths.cache_dir)) if cfg.tracking.pseudonymise else None
    window = (cfg.preprocess.window_width, cfg.preprocess.window_level)
    with tempfile.TemporaryDirectory() as folder:
        for pid, row in chosen.iterrows():
            name = pseudonym(pid, key) if key else pid
            qc_figure(read_image(row["image"]), read_image(row["mask"]),
                      Path(folder) / f"{name}.png", window=window,
                      title=f"{name}: {row['roi_volume_ml']:.2f} ml, "
                            f"{row['roi_max_diameter_mm']:.1f} mm ({row['roi_source']})")
        mlflow.log_artifacts(folder, "qc")


def _split_probas(model: Any, X: pd.DataFrame, splits: pd.Series,
                  centers: pd.Series) -> dict[str, pd.Series]:
    """Probabilities of a fitted model on train (apparent), test and each external center."""
    out = {}
    for split in ("train", "test"):
        rows = splits.index[splits == split]
        if len(rows):
            out[split] = pd.Series(model.predict_proba(X.loc[rows])[:, 1], index=rows)
    external = splits.index[splits == "external"]
    for center in sorted(centers.loc[external].unique()):
        rows = external[centers.loc[external] == center]
        name = f"external_{center or 'all'}"
        out[name] = pd.Series(model.predict_proba(X.loc[rows])[:, 1], index=rows)
    return out


def _dlr_models(cfg: DictConfig, X: pd.DataFrame, y: pd.Series, splits: pd.Series,
                centers: pd.Series, feature_key: str) -> list[ModelResult]:
    train = splits.index[splits == "train"]
    classifiers = OmegaConf.to_container(cfg.classifier, resolve=True)
    selection = OmegaConf.to_container(cfg.selection, resolve=True)
    tuning = OmegaConf.to_container(cfg.tuning, resolve=True)
    study = content_key({"features": feature_key, "train": sorted(train),
                         "selection": selection, "classifiers": classifiers,
                         "tuning": {k: v for k, v in tuning.items() if k != "storage"}})
    search = {"classifiers": classifiers, "selection_cfg": selection, "tuning_cfg": tuning,
              "storage": tuning["storage"], "study_name": f"{cfg.name}/dlr/{study}"}
    results: dict[str, TuningResult] = sweep(X.loc[train], y.loc[train].to_numpy(), **search)
    if tuning["protocol"] == "nested":
        _log_nested(cfg, X.loc[train], y.loc[train], search)
    models = []
    for name, result in results.items():
        model = clone(result.best_pipeline).fit(X.loc[train], y.loc[train].to_numpy())
        proba = _split_probas(model, X, splits, centers)
        proba["cv"] = result.oof_proba
        threshold = youden_threshold(y.loc[train], result.oof_proba.loc[train])
        models.append(ModelResult("dlr", name, result.cv_auc, threshold, proba,
                                  result.best_params, model,
                                  extra={"trials.csv": result.trials},
                                  sweep={"sweep_cv_auc": result.cv_auc,
                                         "sweep_cv_auc_fold_sd": float(
                                             np.std(result.cv_auc_folds, ddof=1)),
                                         "sweep_n_trials": result.n_trials,
                                         "sweep_n_pruned": result.n_pruned}))
    return models


def _log_nested(cfg: DictConfig, X: pd.DataFrame, y: pd.Series, search: dict[str, Any]) -> None:
    """Outer K-fold around the whole search: the honest estimate on a small cohort."""
    nested = nested_cv_auc(X, y.to_numpy(), **{**search,
                                               "study_name": f"{search['study_name']}/nested"})
    auc, lower, upper = delong_ci(y.loc[nested.oof_proba.index], nested.oof_proba,
                                  level=cfg.evaluation.level)
    mlflow.log_metrics({"nested_auc": auc, "nested_auc_ci_lower": lower,
                        "nested_auc_ci_upper": upper,
                        **{f"nested_auc_fold{k}": v for k, v in enumerate(nested.fold_aucs)}})
    log_frame(pd.DataFrame({"fold": range(len(nested.chosen)), "classifier": nested.chosen,
                            "auc": nested.fold_aucs}), "nested_cv.csv")
    log.info("Nested CV AUC %.3f (%.3f-%.3f)", auc, lower, upper)


def _logistic_model(cfg: DictConfig, feature_set: str, X: pd.DataFrame, y: pd.Series,
                    splits: pd.Series, centers: pd.Series, numeric: list[str],
                    categorical: list[str]) -> ModelResult:
    train = splits.index[splits == "train"]
    pipe = clinical_pipeline(cfg.clinical, numeric=numeric, categorical=categorical)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # unseen categories in a fold
        oof = out_of_fold(pipe, X.loc[train], y.loc[train].to_numpy(),
                          folds=cfg.tuning.cv_folds, seed=cfg.seed)
        model = clone(pipe).fit(X.loc[train], y.loc[train].to_numpy())
        proba = _split_probas(model, X, splits, centers)
    proba["cv"] = pd.Series(oof, index=train)
    cv_auc = delong_ci(y.loc[train], oof)[0]
    threshold = youden_threshold(y.loc[train], oof)
    return ModelResult(feature_set, "lr", cv_auc, threshold, proba, {}, model)


def _evaluate(cfg: DictConfig, result: ModelResult, y: pd.Series) -> pd.DataFrame:
    """Metrics with CIs of one model on every split, as long-format rows."""
    ev = cfg.evaluation
    rows = []
    for split, proba in result.proba.items():
        labels = y.loc[proba.index].to_numpy()
        if len(np.unique(labels)) < 2:
            log.warning("%s: split %s has one class only; metrics skipped", result.name, split)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            table = metrics_with_ci(labels, proba.to_numpy(), result.threshold,
                                    n_boot=ev.n_boot, level=ev.level, seed=cfg.seed)
        for metric, (estimate, lower, upper) in table.items():
            rows.append({"feature_set": result.feature_set, "classifier": result.classifier,
                         "split": split, "n": len(labels), "metric": metric,
                         "estimate": estimate, "ci_lower": lower, "ci_upper": upper})
    return pd.DataFrame(rows)


def _split_metrics(metrics: pd.DataFrame) -> dict[str, float]:
    """DESIGN.md metric names for one model's rows (DeLong AUC kept as ``auc_delong``)."""
    flat: dict[str, float] = {}
    for split, group in metrics.groupby("split"):
        values = {r.metric: (r.estimate, r.ci_lower, r.ci_upper) for r in group.itertuples()}
        flat.update(flatten_metrics(str(split), values))
    return {k: float(v) for k, v in flat.items() if np.isfinite(v)}


def _delong_table(models: list[ModelResult], y: pd.Series) -> pd.DataFrame:
    """Paired DeLong tests on the test split between every pair of models."""
    rows = []
    tested = [m for m in models if "test" in m.proba]
    for i, a in enumerate(tested):
        for b in tested[i + 1:]:
            idx = a.proba["test"].index
            z, p = delong_test(y.loc[idx], a.proba["test"], b.proba["test"].loc[idx])
            rows.append({"split": "test", "model_a": a.name, "model_b": b.name, "z": z, "p": p})
    return pd.DataFrame(rows, columns=["split", "model_a", "model_b", "z", "p"])


def _selected_features(model: Any) -> pd.DataFrame:
    """Features kept by the selection step of a fitted pipeline and their LASSO weights."""
    for _, step in getattr(model, "steps", []):
        if hasattr(step, "selected_features_") and hasattr(step, "coef_"):
            return pd.DataFrame({"feature": step.selected_features_, "coefficient": step.coef_})
    return pd.DataFrame(columns=["feature", "coefficient"])


def _log_child(result: ModelResult, metrics: pd.DataFrame, tags: dict[str, str]) -> None:
    with tracked_run(result.name, nested=True, tags={**tags, "feature_set": result.feature_set,
                                                    "classifier": result.classifier}):
        log_params({"classifier": result.classifier, "feature_set": result.feature_set,
                    "threshold": result.threshold, **result.params})
        mlflow.log_metrics({**_split_metrics(metrics), **result.sweep})
        for name, frame in result.extra.items():
            log_frame(frame, name)


@dataclass
class Fitted:
    """Everything the modelling stage produced.

    Args:
        models: every fitted model (clinical, each DLR classifier, combined).
        best_dlr: the DLR model with the best CV AUC (None without the dlr feature set).
        deep_features: the deep-feature columns.
        extraction: the deep-feature stage's result (None without the dlr feature set).
    """

    models: list[ModelResult]
    best_dlr: ModelResult | None = None
    deep_features: list[str] = field(default_factory=list)
    extraction: Extraction | None = None


def _fit_models(cfg: DictConfig, cohort: Cohort, rois: pd.DataFrame, table: pd.DataFrame,
                splits: pd.Series) -> Fitted:
    """Clinical model, DLR sweep and combined model, each fitted on the training split."""
    y, centers = table["label"], table["center"]
    fitted = Fitted(models=[])
    if "clinical" in cfg.feature_sets:
        fitted.models.append(_logistic_model(cfg, "clinical", table, y, splits, centers,
                                             cohort.numeric, cohort.categorical))
    if "dlr" not in cfg.feature_sets:
        return fitted
    # Fine-tuning (when enabled) sees the training patients only: the leakage guard.
    extraction = extract_features(rois, preprocess=cfg.preprocess, roi=cfg.roi,
                                  backbone=cfg.backbone, seed=cfg.seed,
                                  cache_dir=Path(cfg.paths.cache_dir) / "features",
                                  train_labels=y[splits == "train"])
    mlflow.set_tags({"backbone_weights": extraction.weights_tag,
                     "feature_cache": "hit" if extraction.cache_hit else "miss",
                     "feature_cache_key": extraction.key, "precision": extraction.precision})
    if extraction.finetune:
        mlflow.log_dict(extraction.finetune, "finetune.json")
    X = extraction.table.loc[rois.index].filter(like=DEEP_PREFIX, axis=1)
    dlr = _dlr_models(cfg, X, y, splits, centers, extraction.key)
    fitted.models.extend(dlr)
    fitted.best_dlr = select_best_model(dlr)
    fitted.deep_features = list(X.columns)
    fitted.extraction = extraction
    log_frame(_selected_features(fitted.best_dlr.model), "selected_features.csv")
    if "combined" in cfg.feature_sets:
        # Train rows get the cross-fitted (out-of-fold) signature, never in-sample scores.
        held_out = [p for s, p in fitted.best_dlr.proba.items() if s not in ("train", "cv")]
        combined = table.assign(**{SIGNATURE: signature(
            pd.concat([fitted.best_dlr.proba["cv"], *held_out]).loc[rois.index])})
        fitted.models.append(_logistic_model(cfg, "combined", combined, y, splits, centers,
                                             [*cohort.numeric, SIGNATURE],
                                             cohort.categorical))
    return fitted


def _selected_model(best: ModelResult, fitted: Fitted, cohort: Cohort) -> SelectedModel:
    """The selected model as one estimator from the feature table to a probability."""
    dlr = fitted.best_dlr.model if best.feature_set == "combined" else None
    model = SelectedModel(
        feature_set=best.feature_set, threshold=best.threshold,
        dlr=best.model if best.feature_set == "dlr" else dlr,
        clinical=best.model if best.feature_set != "dlr" else None,
        deep_features=fitted.deep_features, clinical_features=cohort.clinical)
    return model.fit(None)


def _predictions(best: ModelResult, y: pd.Series, splits: pd.Series) -> pd.DataFrame:
    """The selected model's held-out predictions (the test set a promotion compares on)."""
    frames = [pd.DataFrame({"patient_id": p.index, "split": name,
                            "label": y.loc[p.index].to_numpy(), "probability": p.to_numpy()})
              for name, p in best.proba.items() if name not in ("train",)]
    return pd.concat(frames, ignore_index=True)


def _extractor_identity(cfg: DictConfig, extraction: Extraction | None) -> dict[str, Any]:
    """What predict needs to recompute the deep features exactly as in training."""
    if extraction is None:
        return {}
    configs = {k: OmegaConf.to_container(cfg[k], resolve=True)
               for k in ("backbone", "preprocess", "roi", "segmentation")}
    return {**configs, "seed": cfg.seed, "weights_tag": extraction.weights_tag,
            "precision": extraction.precision, "feature_cache_key": extraction.key,
            "code_version": extractor_code_version()}


def _run_folder() -> Path:
    """Hydra's run folder when running under Hydra, else a fresh temporary folder."""
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path(tempfile.mkdtemp(prefix="pdl1exp-"))


def run(cfg: DictConfig) -> float:
    """Run one experiment; return the selected model's CV AUC (the sweep objective)."""
    logging.getLogger("pdl1exp").setLevel(cfg.log_level)
    unknown = set(cfg.feature_sets) - set(FEATURE_SETS)
    if unknown or ("combined" in cfg.feature_sets and "dlr" not in cfg.feature_sets):
        msg = (f"feature_sets must be drawn from {FEATURE_SETS} (combined needs dlr), got "
               f"{list(cfg.feature_sets)}")
        raise ValueError(msg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    setup(cfg.tracking.uri, cfg.tracking.experiment)
    tags = {**environment_tags(), "config_hash": content_key(resolved), "experiment": cfg.name}
    with tracked_run(cfg.name, tags=tags):
        log_params(flatten(resolved))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        cohort = cohort_stage(cfg)
        mlflow.set_tag("data_hash", cohort.data_hash)
        rois, roi_problems = roi_stage(cfg, cohort)
        problems = cohort.problems + roi_problems
        if problems:
            log_frame(problems_table(problems), "excluded_patients.csv")
        _log_qc(cfg, rois)
        table = cohort.table.loc[rois.index].join(rois[list(ROI_DESCRIPTORS)])
        y = table["label"]
        splits = assign_splits(table, test_size=cfg.dataset.test_size, seed=cfg.seed)
        log_frame(pd.DataFrame({"split": splits, "label": y}), "splits.csv", index=True)
        mlflow.log_metrics({f"n_{s}": int((splits == s).sum()) for s in splits.unique()})

        fitted = _fit_models(cfg, cohort, rois, table, splits)
        models = fitted.models
        metrics = pd.concat([_evaluate(cfg, m, y) for m in models], ignore_index=True)
        log_frame(metrics, "metrics.csv")
        delong = _delong_table(models, y)
        log_frame(delong, "delong_tests.csv")
        for model in models:
            rows = metrics[(metrics.feature_set == model.feature_set)
                           & (metrics.classifier == model.classifier)]
            _log_child(model, rows, tags)
        best = select_best_model(models)
        rows = metrics[(metrics.feature_set == best.feature_set)
                       & (metrics.classifier == best.classifier)]
        mlflow.log_metrics(_split_metrics(rows))
        mlflow.set_tags({"best_feature_set": best.feature_set,
                         "best_classifier": best.classifier})
        write_outputs(cfg, cohort=cohort, table=table, splits=splits, fitted=fitted, best=best,
                      metrics=metrics, delong=delong,
                      versions={**tags, "data_hash": cohort.data_hash}, folder=_run_folder())
        selected = _selected_model(best, fitted, cohort)
        log_frame(_predictions(best, y, splits), PREDICTIONS_FILE)
        inputs = table if fitted.extraction is None else table.join(
            fitted.extraction.table[fitted.deep_features])
        log_selected_model(selected, example=inputs.loc[splits == "train"],
                           extractor=_extractor_identity(cfg, fitted.extraction),
                           registered_model=cfg.tracking.registered_model)
        log.info("Selected %s (CV AUC %.3f); metrics in MLflow run %s", best.name, best.cv_auc,
                 mlflow.active_run().info.run_id)
        return float(best.cv_auc)


def select_best_model(models: list[ModelResult]) -> ModelResult:
    """The model with the highest training CV AUC (never chosen on test data)."""
    return max(models, key=lambda m: m.cv_auc)
