"""The cohort stage: write the configured synthetic cohort if any, then load and validate."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from pdl1exp.data.manifest import Cohort, load_cohort

__all__ = ["cohort_stage"]


def cohort_stage(cfg: DictConfig, *, require_label: bool = True) -> Cohort:
    """Write the synthetic cohort when configured, then load and validate the manifest.

    ``require_label=False`` for scoring new patients (absent labels become -1).
    """
    ds = cfg.dataset
    path = instantiate(ds.generator).write() if ds.generator else ds.path
    return load_cohort(path, tps_cutoff=ds.tps_cutoff, numeric=list(ds.clinical.numeric),
                       categorical=list(ds.clinical.categorical), on_error=ds.on_error,
                       air_hu=ds.validation.air_hu,
                       geometry_tolerance_mm=ds.validation.geometry_tolerance_mm,
                       n_jobs=ds.validation.n_jobs, require_label=require_label)
