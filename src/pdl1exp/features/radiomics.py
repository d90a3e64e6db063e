"""Handcrafted radiomics stage: IBSI features by PyRadiomics, per patient, through the cache.

PyRadiomics comes from the maintained ``pyradiomics-bhklab`` distribution (the original
``pyradiomics`` does not build on Python 3.11 with numpy 2); it installs the same
``radiomics`` module. Every patient's row is cached on its own as soon as it is computed, so
an interrupted cohort resumes where it stopped; the whole table is cached under the cohort
key once every patient succeeded.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import re
from collections.abc import Mapping
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import radiomics
import SimpleITK as sitk
from omegaconf import DictConfig, OmegaConf
from radiomics.featureextractor import RadiomicsFeatureExtractor
from tqdm.auto import tqdm

from pdl1exp.data.images import checked_files, read_image, trust_checked
from pdl1exp.data.manifest import CohortError, Problem
from pdl1exp.features.cache import FeatureCache
from pdl1exp.hashing import content_key, file_digest
from pdl1exp.workers import n_workers

__all__ = [
    "PERTURBATIONS",
    "RADIOMICS_PREFIX",
    "RadiomicsExtraction",
    "extract_radiomics",
    "extract_replicates",
    "feature_name",
    "perturb",
    "radiomics_stage",
]

log = logging.getLogger(__name__)

RADIOMICS_PREFIX = "rad_"
PERTURBATIONS = ("erode", "dilate", "shift")
_ROI_LABEL = 1  # the binarised mask's tumour value handed to PyRadiomics
_SOURCE_DIGEST = file_digest(__file__)
_NAME_JUNK = re.compile(r"[^0-9a-z]+")
# PyRadiomics warns per patient and image type about redundant features (GLCM Sum Average =
# 2 x Joint Average); real failures raise and become Problems, so only errors are shown.
_LIBRARY_LOG_LEVEL = logging.ERROR


@dataclass(frozen=True)
class RadiomicsExtraction:
    """Result of the radiomics stage.

    Args:
        table: one row per successfully extracted patient (index patient_id), columns
            ``rad_<image type>_<class>_<feature>``.
        key: the cohort's cache key.
        cache_hit: True when no patient was extracted.
        problems: the patients whose extraction failed (column ``mask``).
        perturbation: ``None`` for the original ROIs, else the ROI perturbation applied.
    """

    table: pd.DataFrame
    key: str
    cache_hit: bool
    problems: list[Problem] = field(default_factory=list)
    perturbation: str | None = None


def feature_name(pyradiomics_key: str) -> str:
    """``log-sigma-1-0-mm-3D_glcm_Contrast`` -> ``rad_log_sigma_1_0_mm_3d_glcm_contrast``."""
    return RADIOMICS_PREFIX + _NAME_JUNK.sub("_", pyradiomics_key.lower()).strip("_")


def _binary_roi(mask: sitk.Image, *, label: int | None) -> sitk.Image:
    """The ROI as a 0/1 label map: every non-zero voxel (``label=None``) or one label value."""
    roi = mask != 0 if label is None else mask == label
    return sitk.Cast(roi, sitk.sitkUInt8)


def perturb(image: sitk.Image, roi: sitk.Image, *, perturbation: str | None,
            shift_fraction: float) -> tuple[sitk.Image, sitk.Image]:
    """Perturb a ROI as a second reader would (Zwanenburg et al. 2019).

    Args:
        image: the CT.
        roi: its 0/1 ROI.
        perturbation: None (unchanged), ``"erode"``/``"dilate"`` (the ROI by one voxel,
            ball structuring element) or ``"shift"`` (image and ROI translated together by
            ``shift_fraction`` of a voxel along every axis, on the same voxel grid, so the
            content moves relative to the sampling grid; the ROI is re-thresholded at 0.5).
        shift_fraction: the sub-voxel translation, as a fraction of the voxel spacing.
    """
    if perturbation is None:
        return image, roi
    if perturbation == "erode":
        return image, sitk.BinaryErode(roi, [1, 1, 1], sitk.sitkBall, 0, 1)
    if perturbation == "dilate":
        return image, sitk.BinaryDilate(roi, [1, 1, 1], sitk.sitkBall, 0, 1)
    if perturbation == "shift":
        offset = [shift_fraction * s for s in image.GetSpacing()]
        move = sitk.TranslationTransform(3, offset)
        # The voxels that enter through the border copy their neighbours.
        moved = sitk.Resample(image, image, move, sitk.sitkBSpline, 0.0, sitk.sitkUnknown, True)
        partial = sitk.Resample(sitk.Cast(roi, sitk.sitkFloat32), roi, move, sitk.sitkLinear, 0.0)
        return moved, sitk.Cast(partial >= 0.5, sitk.sitkUInt8)
    msg = f"perturbation={perturbation!r} is not one of {(None, *PERTURBATIONS)}"
    raise ValueError(msg)


@functools.lru_cache(maxsize=4)
def _extractor(params: str) -> RadiomicsFeatureExtractor:
    """One PyRadiomics extractor per parameter set (JSON, keys in the configured order) and
    process: building one checks the parameters against PyRadiomics' YAML schema, 12 % of a
    patient's time when built per patient; :meth:`~RadiomicsFeatureExtractor.execute`
    works on a copy of its settings.
    No diagnostics (``additionalInfo``): image hashes and statistics that are not features,
    17 % of the time per patient; the features are the same to the bit."""
    return RadiomicsFeatureExtractor(json.loads(params), additionalInfo=False)


def _extract_one(job: dict[str, Any]) -> dict[str, float]:
    """Features of one patient (runs in a worker process)."""
    logging.getLogger("radiomics").setLevel(_LIBRARY_LOG_LEVEL)
    image = read_image(job["image"])
    roi = _binary_roi(read_image(job["mask"]), label=job["label"])
    image, roi = perturb(image, roi, perturbation=job["perturbation"],
                         shift_fraction=job["shift_fraction"])
    # Keys in the configured order: PyRadiomics returns image types and classes in it.
    extractor = _extractor(json.dumps(job["params"]))
    result = extractor.execute(image, roi, label=_ROI_LABEL)
    # Shape axis lengths come from np.linalg.eig of a symmetric covariance: real up to
    # round-off, which leaves +-1e-16j on some values.
    return {feature_name(k): float(np.real(v)) for k, v in result.items()}


def _safe_extract(job: dict[str, Any]) -> dict[str, float] | str:
    """Features, or the reason why PyRadiomics could not compute them."""
    try:
        return _extract_one(job)
    except Exception as err:  # any PyRadiomics failure is this patient's problem, not a crash
        return f"radiomics extraction failed: {type(err).__name__}: {err}"


def _worker_init(checked: frozenset[tuple[str, int, int, int]]) -> None:
    """One ITK thread per worker: the processes are the parallelism. The image files the
    parent has checked (``checked``, :func:`~pdl1exp.data.images.checked_files`) are not
    decompressed once more to check them again."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    trust_checked(checked)


def _patient_key(row: pd.Series, spec: Mapping[str, Any]) -> str:
    return content_key({**spec, "image": row["image_sha"], "mask": row["mask_key"]})


def extract_radiomics(rois: pd.DataFrame, *, params: Mapping[str, Any], cache_dir: str | Path,
                      n_jobs: int | None = None, label: int | None = None,
                      perturbation: str | None = None,
                      shift_fraction: float = 0.5) -> RadiomicsExtraction:
    """PyRadiomics features of every patient's ROI, or read from the cache.

    Args:
        rois: index patient_id; columns ``image``, ``mask`` (paths), ``image_sha``,
            ``mask_key`` (content identities, as made by the ROI stage).
        params: a PyRadiomics parameter mapping (``setting``, ``imageType``,
            ``featureClass``), ``cfg.radiomics.params``.
        cache_dir: the feature cache folder.
        n_jobs: worker processes (:func:`~pdl1exp.workers.n_workers`: None or -1 one per
            core; 1: in this process).
        label: the mask value of the tumour; None takes every non-zero voxel.
        perturbation: None, or one of :data:`PERTURBATIONS` (ICC replicates, see
            :func:`perturb`).
        shift_fraction: voxel fraction of the ``shift`` perturbation.
    """
    if perturbation is not None and perturbation not in PERTURBATIONS:
        msg = f"perturbation={perturbation!r} is not one of {(None, *PERTURBATIONS)}"
        raise ValueError(msg)
    params = _plain(params)
    spec = {"params": params, "label": label, "pyradiomics": radiomics.__version__,
            "code": _SOURCE_DIGEST, "perturbation": perturbation,
            "shift_fraction": shift_fraction if perturbation == "shift" else None}
    keys = {pid: _patient_key(row, spec) for pid, row in rois.iterrows()}
    key = content_key({"patients": dict(sorted(keys.items()))})
    cohort_cache = FeatureCache(cache_dir)
    cached = cohort_cache.get(key)
    if cached is not None:
        log.info("Radiomics cache hit %s (%d patients, %d features)", key, *cached.shape)
        return RadiomicsExtraction(cached, key, True, [], perturbation)

    patient_cache = FeatureCache(Path(cache_dir) / "radiomics")
    rows: dict[str, pd.Series] = {}
    todo = []
    for pid, row in rois.iterrows():
        hit = patient_cache.get(keys[pid])
        if hit is None:
            todo.append({"patient_id": pid, "image": row["image"], "mask": row["mask"],
                         "label": label, "params": params, "perturbation": perturbation,
                         "shift_fraction": shift_fraction})
        else:  # another patient with the same files may have written it
            rows[pid] = hit["value"]
    workers = min(n_workers(n_jobs, setting="radiomics.n_jobs"), max(1, len(todo)))
    log.info("Radiomics (%s): %d patients cached, %d to extract on %d process(es)",
             perturbation or "original", len(rows), len(todo), workers)
    problems = []
    with tqdm(total=len(todo), unit="patient", desc="Radiomics", disable=not todo) as bar:
        for job, result in _run(todo, workers):
            pid = job["patient_id"]
            if isinstance(result, str):
                problems.append(Problem(pid, "mask", result))
            else:
                rows[pid] = pd.Series(result, dtype=float)
                # A patient's row as one (feature, value) column: as a one-row table of its
                # hundreds of columns, Parquet took 45 ms a patient against 1 ms.
                patient_cache.put(keys[pid], rows[pid].rename_axis("feature").to_frame("value"))
            bar.update()
    for problem in problems:
        log.warning("%s", problem)
    order = [pid for pid in rois.index if pid in rows]
    table = (pd.concat({pid: rows[pid] for pid in order}, axis=1).T  # aligned by feature name
             .rename_axis(index="patient_id", columns=None) if order
             else pd.DataFrame(index=pd.Index([], name="patient_id")))
    if not problems:
        cohort_cache.put(key, table)
    return RadiomicsExtraction(table, key, not todo, problems, perturbation)


def _run(todo: list[dict[str, Any]], workers: int):
    """Yield ``(job, features or failure reason)`` as patients finish."""
    if workers == 1:
        for job in todo:
            yield job, _safe_extract(job)
        return
    # spawn: the parent may hold ITK/OpenMP threads (torch) that a fork would copy broken.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                             initargs=(checked_files(),)) as pool:
        futures: dict[Future, dict[str, Any]] = {pool.submit(_safe_extract, job): job
                                                 for job in todo}
        for future in as_completed(futures):
            yield futures[future], future.result()


def extract_replicates(rois: pd.DataFrame, *, params: Mapping[str, Any], cache_dir: str | Path,
                       perturbations: tuple[str, ...] = PERTURBATIONS,
                       n_jobs: int | None = None, label: int | None = None,
                       shift_fraction: float = 0.5) -> dict[str, RadiomicsExtraction]:
    """The original extraction and one per ROI perturbation: the ICC filter's replicates.

    Args:
        rois: as for :func:`extract_radiomics`; pass the training patients only.
        perturbations: names from :data:`PERTURBATIONS`.
        params, cache_dir, n_jobs, label, shift_fraction: as for :func:`extract_radiomics`.

    Returns:
        ``{"original": ..., "erode": ..., ...}``; ``{name: r.table}`` is what
        :class:`pdl1exp.models.reproducibility.ICCFilter` takes as ``replicates``.
    """
    names = (None, *perturbations)
    return {name or "original": extract_radiomics(
        rois, params=params, cache_dir=cache_dir, n_jobs=n_jobs, label=label,
        perturbation=name, shift_fraction=shift_fraction) for name in names}


def _plain(params: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict (an OmegaConf node is converted), as PyRadiomics' schema check needs."""
    if OmegaConf.is_config(params):
        return OmegaConf.to_container(params, resolve=True)
    return dict(params)


def radiomics_stage(cfg: DictConfig, rois: pd.DataFrame, *,
                    source: str | Path) -> RadiomicsExtraction:
    """The radiomics of every ROI with the configured parameters (``cfg.radiomics``) through
    the feature cache; failed patients raise one :class:`CohortError` under
    ``dataset.on_error=raise``, else they are the result's ``problems`` (absent from the table).

    Args:
        cfg: a config with ``radiomics``, ``paths.cache_dir`` and ``dataset.on_error``.
        rois: the ROI stage's table.
        source: the manifest, named in the error.
    """
    rad = cfg.radiomics
    extraction = extract_radiomics(rois, params=rad.params,
                                   cache_dir=Path(cfg.paths.cache_dir) / "features",
                                   n_jobs=rad.n_jobs, label=rad.label)
    if extraction.problems and cfg.dataset.on_error == "raise":
        raise CohortError(source, extraction.problems)
    return extraction
