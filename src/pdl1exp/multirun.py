"""Hydra multirun: each job's parent run is tagged with its sweep; the sweep is summarised.

``python -m pdl1exp -m +experiment=smoke backbone=resnet18_2d,densenet121_2d seed=1,2`` runs
one normal experiment per job (basic, ``joblib`` or ``slurm`` launcher), each its own parent
run tagged ``multirun_id`` (the sweep folder) and ``multirun_overrides``. When the sweep ends,
:class:`MultirunSummary` (a Hydra callback, ``hydra.callbacks`` in ``conf/config.yaml``) logs
``multirun_summary.csv`` as a run of its own (tags ``multirun_summary=true``,
``pdl1exp.kind=multirun_summary``): one row per configuration (a job's overrides minus
``seed``) with its number of seeds and the mean and SD of the metrics across them.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

__all__ = [
    "MULTIRUN_TAG",
    "OVERRIDES_TAG",
    "SUMMARY_RUN",
    "JobStartMethod",
    "MultirunSummary",
    "configuration",
    "job_tags",
    "multirun_id",
    "study_prefix",
    "write_multirun_summary",
]

log = logging.getLogger(__name__)

MULTIRUN_TAG = "multirun_id"
OVERRIDES_TAG = "multirun_overrides"
SUMMARY_RUN = "multirun_summary"
_KIND = "pdl1exp.kind"  # summaries carry it: pdl1exp.study never counts them as model runs
_SEED = "seed"  # what a configuration's runs differ in


def multirun_id(sweep_dir: str | Path) -> str:
    """The sweep's id: its folder as an absolute path (what the jobs and the callback see)."""
    return str(Path(sweep_dir).absolute())


def job_tags() -> dict[str, str]:
    """Tags of a multirun job's parent run (sweep, job number, overrides); ``{}`` otherwise."""
    if not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return {}
    return {MULTIRUN_TAG: multirun_id(hydra.sweep.dir), "multirun_job": str(hydra.job.num),
            OVERRIDES_TAG: json.dumps(list(hydra.overrides.task))}


def study_prefix(name: str) -> str:
    """Prefix of the job's Optuna study names: ``name``, and in a multirun job also a key of
    its overrides. Jobs whose sweeps have the same inputs (the radiomics of one seed under
    two backbones) would otherwise share a study, and all but one would end as workers of
    another job's sweep, without a run; rerunning the same multirun resumes each job's own.
    """
    tags = job_tags()
    if not tags:
        return name
    from pdl1exp.hashing import content_key

    return f"{name}/job-{content_key({'overrides': tags[OVERRIDES_TAG]})}"


def configuration(overrides: Sequence[str]) -> str:
    """A job's configuration: its overrides without ``seed`` (Hydra's override grammar)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return " ".join(text for text, override in zip(overrides, parsed, strict=True)
                    if override.key_or_group != _SEED)


def write_multirun_summary(*, uri: str, sweep: str, metrics: Sequence[str],
                           sort_by: str) -> dict[str, Any]:
    """Summarise the finished parent runs of multirun ``sweep``, one summary run per MLflow
    experiment they were logged to.

    Args:
        uri: MLflow tracking URI.
        sweep: the multirun id (:func:`multirun_id` of ``hydra.sweep.dir``).
        metrics: parent-run metrics summarised (e.g. ``test_auc``, ``nested_auc``; absent
            ones give NaN).
        sort_by: the metric the rows are sorted by (descending).

    Returns:
        Experiment id → its summary table (``multirun_summary.csv``); empty when no job
        finished.
    """
    import mlflow

    from pdl1exp.study import study_summary
    from pdl1exp.tracking import log_frame, tracked_run

    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(search_all_experiments=True,
                               filter_string=f"tags.{MULTIRUN_TAG} = '{sweep}'",
                               output_format="pandas")
    columns = ["tags.mlflow.parentRunId", f"tags.{_KIND}", "status", f"tags.{OVERRIDES_TAG}",
               "params.seed", "tags.backbone_weights", *(f"metrics.{m}" for m in metrics)]
    found = found.reindex(columns=[*found.columns, *set(columns) - set(found.columns)])
    jobs = found[found["tags.mlflow.parentRunId"].isna() & found[f"tags.{_KIND}"].isna()]
    finished = jobs[jobs["status"] == "FINISHED"]
    if len(finished) < len(jobs):
        log.warning("Multirun %s: %d of %d jobs did not finish; summarising the others",
                    sweep, len(jobs) - len(finished), len(jobs))
    summaries = {}
    for experiment_id, runs in finished.sort_values("start_time").groupby("experiment_id",
                                                                          sort=False):
        table = runs.assign(
            configuration=[configuration(json.loads(o)) for o in runs[f"tags.{OVERRIDES_TAG}"]],
            seed=runs["params.seed"], weights_loaded=runs["tags.backbone_weights"],
        ).rename(columns={f"metrics.{m}": m for m in metrics})
        summary = study_summary(table, params=["configuration"], metrics=metrics,
                                sort_by=sort_by).rename(columns={"n_runs": "n_seeds"})
        mlflow.set_experiment(experiment_id=experiment_id)
        with tracked_run(SUMMARY_RUN, tags={_KIND: SUMMARY_RUN, "multirun_summary": "true",
                                            MULTIRUN_TAG: sweep}):
            log_frame(summary, "multirun_summary.csv")
            mlflow.log_metrics({"n_runs": len(runs), "n_configurations": len(summary)})
        log.info("Multirun %s: %d runs, %d configurations\n%s", sweep, len(runs),
                 len(summary), summary.to_string(index=False))
        summaries[experiment_id] = summary
    return summaries


class MultirunSummary(Callback):
    """Hydra callback: at the start of a multirun, create the shared MLflow and Optuna stores
    (jobs started together would race to create their tables); at its end,
    :func:`write_multirun_summary`.

    Args:
        metrics: parent-run metrics to summarise across seeds.
        sort_by: the metric the summary is sorted by.
    """

    def __init__(self, *, metrics: Sequence[str], sort_by: str) -> None:
        self.metrics = list(metrics)
        self.sort_by = sort_by

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from pdl1exp.models.tuning import open_storage
        from pdl1exp.tracking import setup

        setup(config.tracking.uri, config.tracking.experiment)
        open_storage(config.tuning.storage, config.tuning)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_multirun_summary(uri=config.tracking.uri,
                               sweep=multirun_id(config.hydra.sweep.dir),
                               metrics=self.metrics, sort_by=self.sort_by)


class JobStartMethod(Callback):
    """Hydra callback: a job in a joblib worker starts its process pools as a plain run does.

    loky makes itself the default start method of its workers, and a pool the job spawns
    (radiomics) then dies with "cannot find context for 'loky'": the job resets it.
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if multiprocessing.get_start_method(allow_none=True) == "loky":
            multiprocessing.set_start_method(None, force=True)
