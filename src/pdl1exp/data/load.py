"""The cohort stage: write the configured synthetic cohort if any, then load and validate."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from pdl1exp.data.manifest import Cohort, dataset_options, load_cohort

__all__ = ["cohort_stage"]


def cohort_stage(cfg: DictConfig, *, require_label: bool = True) -> Cohort:
    """Write the synthetic cohort when configured, then load and validate the manifest.

    ``require_label=False`` for scoring new patients (absent labels become -1).
    """
    ds = cfg.dataset
    # A manifest path wins: an experiment's generator settings (e.g. smoke's cohort size)
    # then concern the synthetic cohort only.
    path = ds.path if ds.path is not None else instantiate(ds.generator).write()
    return load_cohort(path, **dataset_options(ds), require_label=require_label,
                       cache_dir=Path(cfg.paths.cache_dir) / "dicom")
