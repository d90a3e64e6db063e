"""Benchmark of the statistics layer: vectorised bootstrap vs a per-resample loop, fast DeLong."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import numpy as np
from scipy import stats

from pdl1exp.evaluation.statistics import (
    METRICS,
    bootstrap_ci,
    bootstrap_cis,
    delong_ci,
    metric_value,
)

__all__ = ["run"]

T = TypeVar("T")


def _timed(repeat: int, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> tuple[T, float]:
    """Result and best wall time of ``repeat`` calls (the minimum is least disturbed by noise)."""
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return result, best


def _binormal_probs(
    n: int, prevalence: float, shift: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities from two unit normals ``shift`` apart."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    return y, stats.norm.cdf(rng.normal(size=n) + shift * y - shift / 2)


def run(
    *,
    n: int = 352,
    n_boot: int = 2000,
    n_delong: int = 100_000,
    prevalence: float = 0.45,
    shift: float = 1.0,
    threshold: float = 0.5,
    seed: int = 0,
    repeat: int = 5,
) -> dict[str, float]:
    """Seconds and speed-ups: ``bootstrap_ci`` vectorised vs looped per metric, DeLong on big n.

    The loop runs the same resamples through ``metric_value`` one at a time, so both paths must
    give the same interval; a mismatch raises.

    Args:
        n: sample size of the bootstrap benchmark (the paper's cohort has 352 patients).
        n_boot: resamples per metric.
        n_delong: sample size of the DeLong benchmark.
        prevalence: share of positives.
        shift: distance between the class means of the latent normal scores.
        threshold: decision cut-off of the threshold metrics.
        seed: data and resampling seed.
        repeat: timed calls per measurement; the fastest counts.
    """
    y, prob = _binormal_probs(n, prevalence, shift, seed)
    common = {"n_boot": n_boot, "seed": seed, "threshold": threshold}
    result: dict[str, float] = {"n": n, "n_boot": n_boot}
    fast_total = loop_total = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # undefined resamples are expected here
        for metric in METRICS:
            fast, fast_s = _timed(repeat, bootstrap_ci, y, prob, metric, **common)
            loop_fn = partial(metric_value, metric=metric, threshold=threshold)
            loop, loop_s = _timed(repeat, bootstrap_ci, y, prob, loop_fn, **common)
            if not np.allclose(fast, loop, equal_nan=True):
                msg = f"vectorised and looped bootstrap differ for {metric}: {fast} vs {loop}"
                raise RuntimeError(msg)
            result[f"bootstrap_{metric}_vectorised_s"] = fast_s
            result[f"bootstrap_{metric}_loop_s"] = loop_s
            result[f"bootstrap_{metric}_speedup"] = loop_s / fast_s
            fast_total += fast_s
            loop_total += loop_s
        # A metrics table: all eight metrics on one shared draw of the resamples.
        shared, shared_s = _timed(repeat, bootstrap_cis, y, prob, METRICS, **common)
    if shared != [bootstrap_ci(y, prob, m, **common) for m in METRICS]:
        msg = "bootstrap_cis differs from bootstrap_ci of the same metrics"
        raise RuntimeError(msg)
    result["bootstrap_all_vectorised_s"] = fast_total
    result["bootstrap_all_loop_s"] = loop_total
    result["bootstrap_all_speedup"] = loop_total / fast_total
    result["bootstrap_all_shared_draw_s"] = shared_s
    result["bootstrap_all_shared_draw_speedup"] = loop_total / shared_s

    y_big, prob_big = _binormal_probs(n_delong, prevalence, shift, seed)
    _, result["delong_ci_s"] = _timed(repeat, delong_ci, y_big, prob_big)
    result["delong_n"] = n_delong
    return result


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
