"""``make bench``: run every benchmark and write experiments/BENCHMARKS.md and .json."""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from pdl1exp.bench import backbone as bench_backbone
from pdl1exp.bench import statistics as bench_statistics
from pdl1exp.bench import sweep as bench_sweep
from pdl1exp.data.load import cohort_stage
from pdl1exp.features.extract import extract_features
from pdl1exp.imaging.rois import roi_stage
from pdl1exp.paths import CONFIG_DIR

__all__ = ["extraction", "main"]

log = logging.getLogger(__name__)
_TARGETS = {
    "backbone": "≥ 35 ROIs/s bf16 (≥ 14 fp32), ≥ 70 % of the measured matmul peak",
    "extraction": "352-patient cohort: cache hit < 2 s",
    "sweep": "7 classifiers × configured trials in minutes on 2 cores",
    "statistics": "bootstrap of 8 metrics ≥ 20× a Python loop; delong_ci(n=100 000) < 1 s",
}


def extraction(*overrides: str) -> dict[str, Any]:
    """Cold and cached deep-feature extraction of the default (352-patient) cohort."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    cohort = cohort_stage(cfg)
    rois, _ = roi_stage(cfg, cohort)
    timings = {}
    with tempfile.TemporaryDirectory() as cache:
        for label in ("cold", "cached"):
            start = time.perf_counter()
            result = extract_features(rois, preprocess=cfg.preprocess, roi=cfg.roi,
                                      backbone=cfg.backbone, seed=cfg.seed, cache_dir=cache)
            timings[f"{label}_s"] = time.perf_counter() - start
            timings[f"{label}_hit"] = result.cache_hit
    return {"patients": len(rois), "backbone": cfg.backbone.name,
            "precision": result.precision, "weights": result.weights_tag,
            "patients_per_s_cold": len(rois) / timings["cold_s"], **timings}


def _section(name: str, results: dict[str, Any]) -> str:
    rows = "\n".join(f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |"
                     for k, v in results.items())
    return f"## {name}\n\nTarget: {_TARGETS[name]}\n\n| measure | value |\n|---|---|\n{rows}\n"


def main() -> None:
    """Run the benchmarks and write the report beside experiments/README.md."""
    logging.basicConfig(level=logging.INFO)
    suites: dict[str, Callable[[], dict[str, Any]]] = {
        "statistics": bench_statistics.run, "backbone": bench_backbone.run,
        "extraction": extraction, "sweep": bench_sweep.run,
    }
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    for name, suite in suites.items():
        log.info("Benchmark: %s", name)
        results[name] = suite()
    folder = Path("experiments")
    folder.mkdir(exist_ok=True)
    (folder / "BENCHMARKS.json").write_text(json.dumps(results, indent=2, default=str))
    body = "\n".join(_section(name, results[name]) for name in suites)
    (folder / "BENCHMARKS.md").write_text(
        f"# Benchmarks\n\nWritten by `make bench` on {results['machine']['platform']} "
        f"({results['machine']['torch_threads']} torch threads).\n\n{body}")


if __name__ == "__main__":
    main()
