"""Benchmark: PyRadiomics seconds per patient (original, original + LoG) and parallel speed-up."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pdl1exp.data.load import cohort_stage
from pdl1exp.features.radiomics import extract_radiomics
from pdl1exp.imaging.rois import roi_stage
from pdl1exp.paths import CONFIG_DIR

__all__ = ["run"]


def run(n_patients: int = 24, *, n_jobs: tuple[int, ...] = (1, 2), seed: int = 42,
        overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Extract ``conf/radiomics/ct.yaml`` features of a small synthetic cohort, cold.

    Each (image types, n_jobs) pair starts from an empty cache, after an untimed warm-up;
    the parallel timings include starting the worker processes, as a real run pays it.

    Args:
        n_patients: synthetic patients (each with a mask, default geometry).
        n_jobs: worker-process counts to time.
        seed: the cohort's seed.
        overrides: extra Hydra overrides, e.g. ``("radiomics=ct_wavelet",)``.

    Returns:
        ``s_per_patient_<preset>_j<n>``, ``speedup_<preset>_j<n>`` (against the first count),
        the number of features of each preset and of patients.
    """
    results: dict[str, Any] = {"patients": n_patients}
    with tempfile.TemporaryDirectory() as folder:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[
                "radiomics=ct", f"seed={seed}", f"paths.cache_dir={folder}",
                f"dataset.generator.n_patients={n_patients}",
                "dataset.generator.seed_fraction=0.0", *overrides])
        rois, _ = roi_stage(cfg, cohort_stage(cfg))
        params = OmegaConf.to_container(cfg.radiomics.params, resolve=True)
        presets = {"original": {**params, "imageType": {"Original": {}}}, "original_log": params}
        # Untimed warm-up: file-system cache and PyRadiomics' first-call imports.
        extract_radiomics(rois.iloc[:1], params=presets["original"], n_jobs=1,
                          cache_dir=Path(folder) / "warm-up", label=cfg.radiomics.label)
        for preset, preset_params in presets.items():
            for jobs in n_jobs:
                start = time.perf_counter()
                extraction = extract_radiomics(rois, params=preset_params, n_jobs=jobs,
                                               cache_dir=Path(folder) / f"{preset}_{jobs}",
                                               label=cfg.radiomics.label)
                seconds = time.perf_counter() - start
                results[f"s_per_patient_{preset}_j{jobs}"] = seconds / len(rois)
                results[f"speedup_{preset}_j{jobs}"] = (
                    results[f"s_per_patient_{preset}_j{n_jobs[0]}"] * len(rois) / seconds)
            results[f"features_{preset}"] = extraction.table.shape[1]
    return results
