"""``python -m pdl1exp.study +experiment=dlr_study``: the summary of a ROI/backbone study.

The study itself is a Hydra multirun, one normal run per combination
(``python -m pdl1exp -m +experiment=dlr_study``, sweep in ``conf/experiment/dlr_study.yaml``).
This command reads that experiment's finished runs from MLflow and writes one row per
combination (``study.params``) with its metrics (``study.metrics``, e.g. ``test_auc`` and
``nested_dlr_auc``) averaged over seeds: ``study_summary.csv``, ``study_runs.csv`` (one row per
run) and ``study_summary.png``, logged as their own run (``study_summary``) of the experiment.
Rows are sorted by ``study.sort_by`` (default ``nested_dlr_auc``): the nested-CV AUC
is the honest one to choose an input by; a single test split is noisy, and choosing by it
makes its number optimistic.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import hydra
import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from omegaconf import DictConfig

from pdl1exp.paths import CONFIG_DIR
from pdl1exp.tracking import log_frame, setup, tracked_run

__all__ = [
    "SUMMARY_RUN",
    "main",
    "study_figure",
    "study_runs",
    "study_summary",
    "write_study_summary",
]

log = logging.getLogger(__name__)

SUMMARY_RUN = "study_summary"
_KIND = "pdl1exp.kind"
_LOADED = "backbone_weights"  # the tag of what was really loaded (imagenet/file/random)


def study_runs(experiment: str, *, params: Sequence[str],
               metrics: Sequence[str]) -> pd.DataFrame:
    """The finished top-level runs of ``experiment`` (the summaries excluded), newest last.

    Args:
        experiment: MLflow experiment name (the tracking URI must be set).
        params: the run params that make a combination (e.g. ``roi.mode``).
        metrics: the metrics to collect (e.g. ``test_auc``).

    Returns:
        One row per run: ``run_id``, ``start_time``, ``seed``, the params, ``weights_loaded``
        (the ``backbone_weights`` tag) and the metrics (NaN where a run lacks one).
    """
    found = mlflow.search_runs(experiment_names=[experiment],
                               filter_string="attributes.status = 'FINISHED'",
                               output_format="pandas")
    columns = {"run_id": "run_id", "start_time": "start_time", "params.seed": "seed",
               **{f"params.{p}": p for p in params}, f"tags.{_LOADED}": "weights_loaded",
               **{f"metrics.{m}": m for m in metrics}}
    runs = found.reindex(columns=[*columns, "tags.mlflow.parentRunId", f"tags.{_KIND}"])
    top = runs["tags.mlflow.parentRunId"].isna() & runs[f"tags.{_KIND}"].isna()
    return (runs.loc[top, list(columns)].rename(columns=columns)
            .sort_values("start_time").reset_index(drop=True))


def study_summary(runs: pd.DataFrame, *, params: Sequence[str], metrics: Sequence[str],
                  sort_by: str) -> pd.DataFrame:
    """One row per combination: its metrics' mean and SD over seeds, and how many runs.

    A rerun of a combination with the same seed replaces the earlier run.

    Args:
        runs: from :func:`study_runs`.
        params: the columns that make a combination.
        metrics: the metric columns.
        sort_by: the metric to sort by (descending).
    """
    latest = runs.drop_duplicates([*params, "seed"], keep="last")
    grouped = latest.groupby(list(params), dropna=False, sort=False)
    table = grouped.agg(
        n_runs=("run_id", "size"),
        seeds=("seed", lambda s: ",".join(sorted(map(str, s)))),
        weights_loaded=("weights_loaded", lambda s: ",".join(sorted(set(map(str, s))))),
        **{name: (m, stat) for m in metrics
           for name, stat in ((m, "mean"), (f"{m}_sd", "std"))})
    return table.reset_index().sort_values(sort_by, ascending=False, na_position="last",
                                           ignore_index=True)


def study_figure(summary: pd.DataFrame, path: str | Path, *, params: Sequence[str],
                 metrics: Sequence[str], dpi: int = 100) -> Path:
    """Dot plot of each combination's metrics (mean ± SD over seeds), best on top.

    Args:
        summary: from :func:`study_summary`.
        path: the PNG to write.
        params: the columns that make a combination (the row labels).
        metrics: the metric columns plotted.
        dpi: resolution.
    """
    labels = summary[list(params)].astype(str).agg(" | ".join, axis=1)
    rows = np.arange(len(summary))[::-1]
    fig = Figure(figsize=(8.0, 1.2 + 0.35 * len(summary)), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    offsets = np.linspace(-0.15, 0.15, len(metrics))
    for metric, offset in zip(metrics, offsets, strict=True):
        ax.errorbar(summary[metric], rows + offset, xerr=summary[f"{metric}_sd"].fillna(0.0),
                    fmt="o", capsize=3, label=metric)
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1.0)
    ax.set_yticks(rows, labels)
    ax.set_xlabel("AUC (mean ± SD over seeds)")
    ax.set_title(" | ".join(params), fontsize="small")
    ax.legend(fontsize="small")
    path = Path(path)
    fig.savefig(path)
    return path


def write_study_summary(*, uri: str, experiment: str, params: Sequence[str],
                        metrics: Sequence[str], sort_by: str, dpi: int = 100) -> pd.DataFrame:
    """Summarise the experiment's runs and log the tables and figure as a new run.

    Args:
        uri: MLflow tracking URI.
        experiment: the study's MLflow experiment.
        params: the run params that make a combination.
        metrics: the metrics summarised.
        sort_by: the metric to sort by.
        dpi: resolution of the figure.

    Returns:
        The summary (``study_summary.csv``).
    """
    setup(uri, experiment)
    runs = study_runs(experiment, params=params, metrics=metrics)
    if runs.empty:
        msg = (f"MLflow experiment {experiment!r} at {uri} has no finished run to summarise: "
               f"run the study first (python -m pdl1exp -m +experiment=dlr_study)")
        raise ValueError(msg)
    summary = study_summary(runs, params=params, metrics=metrics, sort_by=sort_by)
    with tracked_run(SUMMARY_RUN, tags={_KIND: SUMMARY_RUN}), \
            tempfile.TemporaryDirectory() as folder:
        log_frame(summary, "study_summary.csv")
        log_frame(runs, "study_runs.csv")
        mlflow.log_artifact(str(study_figure(summary, Path(folder) / "study_summary.png",
                                             params=params, metrics=metrics, dpi=dpi)))
        mlflow.log_metric("n_runs", len(runs))
        mlflow.log_metric("n_combinations", len(summary))
    log.info("Study %s: %d runs, %d combinations\n%s", experiment, len(runs), len(summary),
             summary.to_string(index=False))
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    """Summarise the study of ``cfg.tracking.experiment`` (needs ``+experiment=dlr_study``)."""
    if "study" not in cfg:
        msg = ("no study config: run as python -m pdl1exp.study +experiment=dlr_study (the "
               "same experiment and overrides as the multirun)")
        raise ValueError(msg)
    logging.getLogger("pdl1exp").setLevel(cfg.log_level)
    write_study_summary(uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
                        params=list(cfg.study.params), metrics=list(cfg.study.metrics),
                        sort_by=cfg.study.sort_by, dpi=cfg.evaluation.dpi)


if __name__ == "__main__":
    main()
