"""Paper-style outputs of a run: figures, tables and the HTML report, logged to MLflow."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pdl1exp.data.manifest import Cohort
from pdl1exp.evaluation.figures import (
    calibration_figure,
    decision_curve_figure,
    decision_curves,
    importance_figure,
    lasso_path_figure,
    nomogram_figure,
    roc_figure,
)
from pdl1exp.evaluation.report import ReportSection, write_report
from pdl1exp.evaluation.tables import baseline_table, format_p, metrics_table
from pdl1exp.features.extract import ROI_DESCRIPTORS
from pdl1exp.models.logistic import odds_ratio_table
from pdl1exp.models.nomogram import build_nomogram
from pdl1exp.models.results import Fitted, ModelResult

__all__ = ["write_outputs"]

log = logging.getLogger(__name__)


def _curves(models: list[ModelResult], y: pd.Series, split: str) -> dict[str, tuple]:
    return {m.name: (y.loc[m.proba[split].index].to_numpy(), m.proba[split].to_numpy())
            for m in models if split in m.proba
            and y.loc[m.proba[split].index].nunique() == 2}


def _split_figures(cfg: DictConfig, models: list[ModelResult], primary: ModelResult,
                   y: pd.Series, folder: Path, *, suffix: str = "") -> list[Path]:
    """ROC, calibration and decision curves of ``models`` on each held-out split."""
    ev = cfg.evaluation
    thresholds = np.arange(ev.dca.start, ev.dca.stop, ev.dca.step)
    paths = []
    prefix = "Exploratory: " if suffix else ""
    splits = sorted({s for m in models for s in m.proba if s not in ("train", "cv")})
    for split in splits:
        curves = _curves(models, y, split)
        if not curves:
            continue
        label = f"{split} (n = {len(next(iter(curves.values()))[0])})"
        name = f"{split}{suffix}"
        paths.append(roc_figure(curves, folder / f"roc_{name}.png",
                                title=f"{prefix}ROC, {label}",
                                band_for=primary.name if primary.name in curves else None,
                                n_boot=ev.n_boot, level=ev.level, seed=cfg.seed, dpi=ev.dpi))
        paths.append(calibration_figure(curves, folder / f"calibration_{name}.png",
                                        groups=ev.calibration_groups,
                                        title=f"{prefix}Calibration, {label}", dpi=ev.dpi))
        paths.append(decision_curve_figure(curves, folder / f"dca_{name}.png",
                                           thresholds=thresholds,
                                           title=f"{prefix}Decision curves, {label}",
                                           dpi=ev.dpi))
        decision_curves(curves, thresholds).to_csv(folder / f"dca_{name}.csv", index=False)
    return paths


def _reported(fitted: Fitted) -> list[ModelResult]:
    """The paper's figure: clinical, each chosen image model and combined."""
    chosen = set(map(id, fitted.chosen.values()))
    return [m for m in fitted.models
            if m.feature_set in ("clinical", "combined") or id(m) in chosen]


def _lasso_step(model: Any) -> Any | None:
    return next((step for _, step in getattr(model, "steps", [])
                 if hasattr(step, "coef_path_")), None)


def _model_figures(cfg: DictConfig, fitted: Fitted, primary: ModelResult, table: pd.DataFrame,
                   splits: pd.Series, folder: Path) -> list[Path]:
    """LASSO path, nomogram and odds ratios (combined/clinical), feature importance."""
    ev, paths = cfg.evaluation, []
    image = fitted.chosen.get(primary.feature_set) or next(iter(fitted.chosen.values()), None)
    lasso = _lasso_step(image.model) if image else None
    if lasso is not None:
        paths.append(lasso_path_figure(
            lambdas=lasso.lambdas_, coef_path=lasso.coef_path_, chosen_lambda=lasso.lambda_,
            cv_curve=lasso.cv_curve_, feature_names=lasso.feature_names_in_,
            path=folder / "lasso_path.png", max_labels=ev.lasso_max_labels, dpi=ev.dpi))
    train = splits.index[splits == "train"]
    logistic = {m.feature_set: m for m in fitted.models
                if m.feature_set in ("clinical", "combined")}
    nomogram_model = logistic.get("combined") or logistic.get("clinical")
    for name, model in logistic.items():
        X = (fitted.combined_table if name == "combined" else table).loc[train]
        screen = model.model.named_steps["screen"]
        columns = {"numeric": screen.numeric_, "categorical": screen.categorical_}
        odds = odds_ratio_table(model.model, X, level=ev.level, **columns)
        odds.to_csv(folder / f"{name}_odds_ratios.csv", index=False)
        screen.screen_.to_csv(folder / f"{name}_univariate_screen.csv", index=False)
        if model is nomogram_model:
            nomogram = build_nomogram(model.model, X, n_ticks=ev.nomogram.n_ticks,
                                      points_max=ev.nomogram.points_max, **columns)
            if getattr(model.calibrator, "method", None) == "platt":  # calibrated risk axis
                a, b = model.calibrator.intercept_, model.calibrator.slope_
                nomogram = replace(nomogram, points_per_logit=nomogram.points_per_logit / b,
                                   logit_at_zero=a + b * nomogram.logit_at_zero)
            paths.append(nomogram_figure(nomogram, folder / "nomogram.png", dpi=ev.dpi))
        if model is primary:
            importance = odds.set_index("term")["coef"].drop("(Intercept)", errors="ignore")
            paths.append(importance_figure(importance, folder / "importance.png",
                                           title=f"{primary.name}: coefficients (per SD)",
                                           top=ev.importance_top, dpi=ev.dpi))
    if primary.feature_set in fitted.chosen and lasso is not None:
        importance = pd.Series(lasso.coef_, index=lasso.selected_features_)
        paths.append(importance_figure(importance, folder / "importance.png",
                                       title=f"{primary.name}: LASSO coefficients",
                                       top=ev.importance_top, dpi=ev.dpi))
    return paths


def _outcome(cfg: DictConfig) -> str:
    target = cfg.dataset.get("target")
    if target:
        rule = (f"{target.column} >= {target.cutoff}" if target.get("cutoff") is not None
                else f"{target.column} = {target.get('positive')}")
        return f"{target.get('name') or target.column} positive when {rule}"
    return (f"PD-L1 positive when the tumour proportion score >= {cfg.dataset.tps_cutoff} % "
            "(or the manifest's 0/1 label)")


def _tripod(cfg: DictConfig, cohort: Cohort, table: pd.DataFrame, splits: pd.Series,
            fitted: Fitted, primary: ModelResult, metrics: pd.DataFrame,
            nested: pd.DataFrame | None) -> ReportSection:
    """TRIPOD+AI-style reporting checklist of the run (items a reviewer looks for)."""
    y, train = table["label"], splits == "train"
    events = int(min(y[train].sum(), (1 - y[train]).sum()))
    clinical = [*cohort.numeric, *cohort.categorical]
    missing = table[clinical].isna().sum() if clinical else pd.Series(dtype=int)
    candidates = {m.feature_set: len(m.features) for m in fitted.chosen.values()}
    test = metrics[(metrics.feature_set == primary.feature_set)
                   & (metrics.classifier == primary.classifier) & (metrics.split == "test")]
    calibration = {r.metric: f"{r.estimate:.2f} ({r.ci_lower:.2f} to {r.ci_upper:.2f})"
                   for r in test.itertuples() if r.metric.startswith("calibration_")}
    items = {
        "Data source": (f"{cfg.dataset.name}: {len(table)} patients from {cohort.source.name}"
                        f" ({table['center'].nunique()} center(s)); {len(cohort.problems)} "
                        "excluded with reasons (excluded_patients.csv)"),
        "Outcome": _outcome(cfg),
        "Predictors": (f"clinical {clinical or 'none'}; image feature sets "
                       f"{sorted(fitted.chosen) or 'none'} from the tumour ROI"),
        "Missing data": ("imputed inside every fitted pipeline from training rows only "
                         "(median / most frequent); missing clinical values: "
                         + (", ".join(f"{k} {v}" for k, v in missing.items() if v) or "none")),
        "Sample size": (f"{int(train.sum())} training patients, {events} events in the "
                        f"smaller class; events per candidate predictor: clinical "
                        f"{events / max(len(clinical), 1):.1f}, "
                        + ", ".join(f"{k} {events / n:.2f} ({n} features before selection)"
                                    for k, n in candidates.items())),
        "Model choice": (f"primary model pre-specified (evaluation.primary="
                         f"{cfg.evaluation.primary}); within each image feature set the "
                         f"classifier with the best tuning-CV AUC after "
                         f"{cfg.tuning.n_trials} completed Optuna trials each; clinical "
                         f"model clinical={cfg.clinical.name}"),
        "Estimates": ("single stratified test split, scored once"
                      + ("; whole-chain nested CV on the training split (below)"
                         if nested is not None else
                         "; no nested CV in this run (tuning.protocol=nested adds it)")),
        "Calibration (test)": (", ".join(f"{k.removeprefix('calibration_')} {v}"
                                         for k, v in calibration.items()) or "not estimable"),
        "Intended use": (f"research: estimating {cohort.target_name} status from CT (+ clinical "
                         "data) for cohort studies; not validated for clinical decisions"),
    }
    checklist = pd.DataFrame({"item": list(items), "this run": list(items.values())})
    return ReportSection("Reporting checklist (TRIPOD+AI items)", table=checklist)


def write_outputs(cfg: DictConfig, *, cohort: Cohort, table: pd.DataFrame, splits: pd.Series,
                  fitted: Fitted, primary: ModelResult, metrics: pd.DataFrame,
                  delong: pd.DataFrame, versions: dict[str, str], folder: Path,
                  nested: pd.DataFrame | None = None, explained: list[Path] | None = None
                  ) -> Path:
    """Write every figure, table and ``report.html`` into ``folder`` and log them."""
    folder.mkdir(parents=True, exist_ok=True)
    y = table["label"]
    figures = _split_figures(cfg, _reported(fitted), primary, y, folder)
    figures += _model_figures(cfg, fitted, primary, table, splits, folder)
    exploratory = _split_figures(cfg, fitted.models, primary, y, folder, suffix="_exploratory")
    wide = metrics_table(metrics, level=cfg.evaluation.level)
    wide.to_csv(folder / "metrics_table.csv", index=False)
    baseline = table.assign(split=splits, status=y.map(dict(enumerate(cohort.class_names))))
    numeric = [*cohort.numeric, *(c for c in ROI_DESCRIPTORS if c in table.columns)]
    by_split = baseline_table(baseline[baseline["split"].isin(["train", "test"])],
                              group="split", numeric=numeric, categorical=cohort.categorical)
    by_label = baseline_table(baseline[baseline["split"] == "train"], group="status",
                              numeric=numeric, categorical=cohort.categorical)
    by_split.to_csv(folder / "baseline_by_split.csv", index=False)
    by_label.to_csv(folder / "baseline_by_status.csv", index=False)
    counts = pd.crosstab(splits, y.map({0: "negative", 1: "positive"}))
    sections = [
        ReportSection("Cohort", text=(
            f"{len(table)} patients ({int(y.sum())} {cohort.class_names[1]}, "
            f"{y.mean():.0%}); {len(cohort.problems)} problem(s) excluded. Primary model "
            f"(pre-specified by evaluation.primary): {primary.name}; its training "
            f"cross-validation AUC is {primary.cv_auc:.3f}"
            f"{' (tuning CV: optimistic)' if primary.sweep else ''}."),
            table=counts.reset_index()),
        ReportSection("Baseline characteristics: training vs test", table=by_split),
        ReportSection(f"Baseline characteristics by {cohort.target_name} status (training)",
                      table=by_label),
        ReportSection("Discrimination and classification (95% CI)", text=(
            "AUC with DeLong CI; other metrics at the Youden threshold chosen on the training "
            "split's out-of-fold predictions, with stratified bootstrap CIs."), table=wide),
        *([ReportSection("Nested cross-validation: the estimate of the whole procedure", text=(
            "Outer folds of the training split wrap every fitted step (selection, sweeps, the "
            "classifier choice, signatures, clinical screening, the combined model). Compare "
            "with the single test-split result above; tuning-CV AUCs are optimistic."),
            table=nested)] if nested is not None else []),
        ReportSection("Figures", figures=[p for p in figures if p.suffix == ".png"]),
        *([ReportSection("Grad-CAM of the DLR model (held-out patients)", text=(
            "Where in the ROI the deep features that drive the chosen DLR model's linear score "
            "respond (explain/gradcam.csv: share of heat-map mass inside the dilated mask)."),
            figures=explained)] if explained else []),
        ReportSection("Exploratory figures: every classifier", figures=[
            p for p in exploratory if p.suffix == ".png"]),
        ReportSection("Pre-specified comparisons on the test split", text=(
            "Paired DeLong tests: combined vs clinical, combined vs each image model, image "
            "models against each other; p-values Holm-adjusted for these comparisons only "
            "(every other pair is exploratory: delong_tests_exploratory.csv)."),
            table=delong.assign(p=delong["p"].map(format_p),
                                p_holm=delong["p_holm"].map(format_p))),
        _tripod(cfg, cohort, table, splits, fitted, primary, metrics, nested),
        ReportSection("Data and code versions", table=versions),
    ]
    report = write_report(folder / "report.html", title=f"pdl1exp: {cfg.name}",
                          sections=sections)
    mlflow.log_artifacts(str(folder))
    log.info("Report written to %s", report)
    return report
