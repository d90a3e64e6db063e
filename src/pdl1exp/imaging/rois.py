"""ROI stage: the tumour mask of every patient (provided, or segmented from its seed)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import SimpleITK as sitk
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pdl1exp.data.images import read_image, write_image
from pdl1exp.data.manifest import Cohort, CohortError, Problem
from pdl1exp.hashing import content_key
from pdl1exp.imaging.measurements import roi_size
from pdl1exp.imaging.segmentation import SegmentationError
from pdl1exp.memo import code_key, read_memo, write_memo
from pdl1exp.workers import cores_each, n_workers

__all__ = ["prepare_rois", "roi_stage"]

log = logging.getLogger(__name__)

Segmenter = Callable[[sitk.Image, tuple[float, float, float]], sitk.Image]


def prepare_rois(table: pd.DataFrame, *, segmenter: Segmenter | None,
                 segmentation_params: dict[str, Any], mask_dir: str | Path,
                 n_jobs: int = 1) -> tuple[pd.DataFrame, list[Problem]]:
    """Give every patient a mask file and its size descriptors.

    Rows with a mask keep it. Rows with only a seed are segmented (``segmenter`` is None
    under ``segmentation=mask``, which makes them an error); their masks are written to
    ``mask_dir/<key>.nii.gz``, keyed by image content, seed and segmentation parameters,
    so a rerun reuses them and a reviewer can open them. Each mask's sizes are kept in
    ``mask_dir/sizes`` by its content key.

    Args:
        table: the cohort table (index patient_id; image, mask, seed, image_sha, mask_sha).
        segmenter: ``(image, seed_mm) -> mask`` or None.
        segmentation_params: everything that changes a segmentation (part of the key).
        mask_dir: where segmented masks go.
        n_jobs: patients processed in parallel (threads; :func:`~pdl1exp.workers.n_workers`).

    Returns:
        Index patient_id with ``image``, ``mask``, ``image_sha``, ``mask_key``,
        ``roi_source`` (provided/seeded), ``seed`` (LPS mm or None: the centre of a seed
        patch), ``roi_volume_ml``, ``roi_max_diameter_mm``;
        and the problems of patients that could not get a mask.
    """
    mask_dir = Path(mask_dir)

    def one(item: tuple[str, pd.Series]) -> dict[str, Any] | Problem:
        pid, row = item
        mask = None
        if isinstance(row["mask"], str):
            path, key, source = row["mask"], row["mask_sha"], "provided"
        elif segmenter is None:
            return Problem(pid, "mask", "no mask, and segmentation=mask does not segment "
                           "seeds: give a mask or use segmentation=seeded")
        else:
            key = content_key({"image": row["image_sha"], "seed": row["seed"],
                               "params": segmentation_params})
            path = mask_dir / f"{key}.nii.gz"
            source = "seeded"
            if not path.exists():
                try:
                    mask = segmenter(read_image(row["image"]), tuple(row["seed"]))
                except SegmentationError as err:
                    return Problem(pid, "seed", f"segmentation failed: {err}")
                mask_dir.mkdir(parents=True, exist_ok=True)
                write_image(mask, path)
        sizes = _sizes(key, path, mask, folder=mask_dir / "sizes")
        return {"patient_id": pid, "image": row["image"], "mask": str(path),
                "image_sha": row["image_sha"], "mask_key": key, "roi_source": source,
                "seed": row["seed"],
                "roi_volume_ml": sizes["volume_ml"],
                "roi_max_diameter_mm": sizes["max_diameter_mm"]}

    workers = n_workers(n_jobs, setting="dataset.validation.n_jobs")
    # ITK gives each filter every core; the threads share them instead (2 cores, 108 seeded
    # patients: 2 threads of 2 ITK threads each 20.9 s, of 1 each 18.8 s; the same masks).
    with _itk_threads(cores_each(workers)), ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, table.iterrows()))
    problems = [r for r in results if isinstance(r, Problem)]
    rows = [r for r in results if not isinstance(r, Problem)]
    n_seeded = sum(r["roi_source"] == "seeded" for r in rows)
    log.info("ROIs ready: %d provided, %d segmented from seeds, %d failed",
             len(rows) - n_seeded, n_seeded, len(problems))
    frame = pd.DataFrame(rows).set_index("patient_id") if rows else pd.DataFrame()
    return frame, problems


def _sizes(key: str, path: str | Path, mask: sitk.Image | None, *,
           folder: Path) -> dict[str, float]:
    """Volume and largest diameter of the mask with content key ``key`` (``mask``, or read
    from ``path``), kept in ``folder``: a rerun reads no mask it has measured."""
    memo = content_key({"mask": key, "code": code_key("imaging/measurements.py")})
    sizes = read_memo(folder, memo)
    if sizes is None:
        sizes = roi_size(mask if mask is not None else read_image(path))
        write_memo(folder, memo, sizes)
    return sizes


@contextmanager
def _itk_threads(n: int) -> Iterator[None]:
    """ITK filters made meanwhile run ``n`` threads (the process's default), then the previous
    default again."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def roi_stage(cfg: DictConfig, cohort: Cohort) -> tuple[pd.DataFrame, list[Problem]]:
    """Masks for every patient (seeded segmentation where only a seed is given)."""
    seg = cfg.segmentation
    segmenter = instantiate(seg.segmenter) if seg.method == "seeded" else None
    params = OmegaConf.to_container(seg, resolve=True)
    rois, problems = prepare_rois(cohort.table, segmenter=segmenter, segmentation_params=params,
                                  mask_dir=Path(cfg.paths.cache_dir) / "masks",
                                  n_jobs=cfg.dataset.validation.n_jobs)
    if problems and cfg.dataset.on_error == "raise":
        raise CohortError(cohort.source, problems)
    return rois, problems
