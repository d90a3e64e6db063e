"""Benchmark: one whole experiment, cold and warm, timed per stage, with the peak RSS.

Each run is a fresh ``python -m pdl1exp.bench.e2e`` process (interpreter start and imports
included, as a user pays them) in a folder of its own: its caches (synthetic cohort, segmented
masks, features), MLflow store and Optuna studies. Stage times come from wrapping the
pipeline's stage functions in that process (:data:`STAGES`; the pipeline itself is not
edited); a stage's time excludes the wrapped stages it calls (cohort generation is not counted
again under validation), and ``other`` is the rest of the wall time (start-up, imports, MLflow
set-up, child-run logging). The parent samples the resident memory of the process and all its
descendants (cohort writers, data loaders, PyRadiomics workers) with psutil.
"""

from __future__ import annotations

import csv
import functools
import importlib
import json
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import psutil

__all__ = ["STAGES", "StageTimer", "excluded_patients", "peak_rss", "run", "run_pipeline",
           "stage_peaks"]

# (module, attribute, stage): the stage functions as the pipeline looks them up.
STAGES: tuple[tuple[str, str, str], ...] = (
    ("pdl1exp.data.synthetic", "SyntheticCohort.write", "cohort"),
    ("pdl1exp.pipeline", "cohort_stage", "validation"),
    ("pdl1exp.pipeline", "roi_stage", "segmentation"),
    ("pdl1exp.pipeline", "_log_qc", "qc"),
    ("pdl1exp.pipeline", "_deep_features", "deep_features"),
    ("pdl1exp.pipeline", "radiomics_stage", "radiomics"),
    ("pdl1exp.models.tuning", "prepare_folds", "selection"),
    ("pdl1exp.models.tuning", "fit_folds", "selection"),
    ("pdl1exp.pipeline", "fit_feature_sets", "sweep"),
    ("pdl1exp.pipeline", "_nested", "nested_cv"),
    ("pdl1exp.pipeline", "evaluate", "evaluation"),
    ("pdl1exp.pipeline", "delong_table", "evaluation"),
    ("pdl1exp.pipeline", "write_outputs", "report"),
    ("pdl1exp.pipeline", "log_selected_model", "model_logging"),
)
RSS_POLL_S = 0.2  # sampling period of the process tree's resident memory
# PSS reads /proc/<pid>/smaps_rollup, which walks the page tables: 3-30 ms per read of the
# run's process tree, by its size (RSS from statm: 0.02 ms per process). Read every 0.2 s,
# it took 15-17 % of a core from the 2-core run it measured; every 2 s, a tenth of that.
PSS_POLL_S = 2.0


class StageTimer:
    """Accumulate the exclusive wall time of wrapped functions per stage name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        # (stage, start, end) of every call in epoch seconds, to match the memory samples
        self.intervals: list[tuple[str, float, float]] = []
        self._children: list[float] = []  # time spent in wrapped callees, per open call

    def wrap(self, stage: str, function: Callable) -> Callable:
        """``function`` timed under ``stage`` (minus the time of wrapped functions it calls)."""

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._children.append(0.0)
            start, began = time.perf_counter(), time.time()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.intervals.append((stage, began, time.time()))
                self.seconds[stage] += elapsed - self._children.pop()
                if self._children:
                    self._children[-1] += elapsed

        return timed

    @contextmanager
    def patched(self, stages: Sequence[tuple[str, str, str]] = STAGES) -> Iterator[StageTimer]:
        """Replace each ``module.attribute`` of ``stages`` by its timed wrapper meanwhile."""
        with ExitStack() as stack:
            for module_name, attribute, stage in stages:
                owner: Any = importlib.import_module(module_name)
                *path, name = attribute.split(".")
                for part in path:
                    owner = getattr(owner, part)
                stack.enter_context(
                    mock.patch.object(owner, name, self.wrap(stage, getattr(owner, name))))
            yield self


@contextmanager
def peak_rss(
    pid: int, *, period_s: float = RSS_POLL_S, pss_period_s: float = PSS_POLL_S
) -> Iterator[dict[str, Any]]:
    """Sample the memory of ``pid`` and its descendants; peaks in MB when done.

    ``peak_mb``: summed RSS every ``period_s``, which counts pages shared by forked workers
    once per process (an upper bound); ``peak_pss_mb``: summed PSS (shared pages split
    between their sharers), read at most every ``pss_period_s`` as it costs a thousand times
    more; ``samples``: every (epoch time, RSS MB) sampled, for :func:`stage_peaks`.
    """
    result: dict[str, Any] = {"peak_mb": 0.0, "peak_pss_mb": 0.0, "samples": []}
    stop = threading.Event()

    def poll() -> None:
        root, pss_due = psutil.Process(pid), 0.0
        while not stop.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            now = time.time()
            with_pss = now >= pss_due
            rss = pss = 0
            for process in tree:
                try:
                    if with_pss:
                        memory = process.memory_full_info()
                        pss += memory.pss
                    else:
                        memory = process.memory_info()
                except psutil.NoSuchProcess:  # a worker that just ended
                    continue
                rss += memory.rss
            result["peak_mb"] = max(result["peak_mb"], rss / 2**20)
            result["samples"].append((now, rss / 2**20))
            if with_pss:
                result["peak_pss_mb"] = max(result["peak_pss_mb"], pss / 2**20)
                pss_due = now + pss_period_s
            stop.wait(period_s)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()


def stage_peaks(
    samples: Sequence[tuple[float, float]], intervals: Sequence[tuple[str, float, float]]
) -> dict[str, float]:
    """The largest memory sample taken during each stage (``other``: outside every stage).

    A sample belongs to the innermost call running at its time, the one that began last
    (the wrapped stages nest, as in :class:`StageTimer`). A stage shorter than the sampling
    period may get no sample, and then no entry.

    Args:
        samples: (epoch time, MB) as :func:`peak_rss` records them.
        intervals: (stage, start, end) in epoch seconds, as :class:`StageTimer` records them.
    """
    peaks: dict[str, float] = {}
    for at, megabytes in samples:
        running = [(start, stage) for stage, start, end in intervals if start <= at <= end]
        stage = max(running)[1] if running else "other"
        peaks[stage] = max(peaks.get(stage, 0.0), round(megabytes, 1))
    return peaks


def run_pipeline(overrides: Sequence[str], *, folder: str | Path) -> dict[str, Any]:
    """One ``python -m pdl1exp`` run with every store inside ``folder``, timed per stage.

    Args:
        overrides: Hydra overrides, e.g. ``("+experiment=fusion",)``.
        folder: holds ``cache/``, ``mlflow.db`` (artifacts beside it), ``optuna.db`` and the
            Hydra run folder; reuse it for a warm run.

    Returns:
        ``wall_s``, ``peak_rss_mb``, ``peak_pss_mb`` (:func:`peak_rss`), ``stages_s``
        ({stage: s}, ``other`` included), ``peak_rss_mb_by_stage`` (:func:`stage_peaks`),
        ``excluded_patients`` (:func:`excluded_patients`).
    """
    folder = Path(folder).resolve()
    stages_file = folder / "stages.json"
    stores = [f"paths.cache_dir={folder / 'cache'}",
              f"tracking.uri=sqlite:///{folder / 'mlflow.db'}",
              f"tuning.storage=sqlite:///{folder / 'optuna.db'}",
              f"hydra.run.dir={folder / 'runs' / '${now:%H-%M-%S-%f}'}"]
    command = [sys.executable, "-m", "pdl1exp.bench.e2e", str(stages_file), *overrides, *stores]
    start, started = time.perf_counter(), time.time()
    process = psutil.Popen(command, cwd=folder)
    with peak_rss(process.pid) as memory:
        code = process.wait()
    wall_s = time.perf_counter() - start
    if code:
        msg = f"benchmark run failed (exit {code}): {' '.join(command)}"
        raise RuntimeError(msg)
    timed = json.loads(stages_file.read_text())
    stages = timed["seconds"]
    stages["other"] = max(0.0, wall_s - sum(stages.values()))
    return {"wall_s": wall_s, "peak_rss_mb": memory["peak_mb"],
            "peak_pss_mb": memory["peak_pss_mb"],
            "stages_s": {k: round(v, 2) for k, v in stages.items()},
            "peak_rss_mb_by_stage": stage_peaks(memory["samples"], timed["intervals"]),
            "excluded_patients": excluded_patients(folder, since=started)}


def excluded_patients(folder: Path, *, since: float) -> int:
    """Distinct patients in the ``excluded_patients.csv`` artifacts written under ``folder``
    from ``since`` (epoch s) on: those a ``dataset.on_error=skip`` run left out."""
    ids: set[str] = set()
    for path in folder.rglob("excluded_patients.csv"):
        if path.stat().st_mtime >= since:
            with path.open(newline="") as table:
                ids |= {row["patient_id"] for row in csv.DictReader(table)}
    return len(ids)


def run(*, overrides: Sequence[str] = ("+experiment=fusion",), folder: str | Path | None = None,
        first: str = "cold") -> dict[str, Any]:
    """The experiment twice in one folder: first cold (every cache empty, the cohort included),
    or after what ran in ``folder`` before, then warm (every cache of the first run kept).

    Args:
        overrides: Hydra overrides of both runs.
        folder: where both run (:func:`run_pipeline`); None: a new temporary folder.
        first: the first run's name in the result (``cold``; ``after_fusion`` for a run in
            the folder of the fusion benchmark's runs, whose cohort, masks and features it
            finds cached).

    Returns:
        ``{first}_s``, ``warm_s``, ``peak_rss_mb`` (the larger of both runs), ``stages_s``
        (first run), ``warm_stages_s``, ``peak_rss_mb_warm``, ``peak_rss_mb_by_stage`` and
        ``excluded_patients`` (first run) and how stages were timed.
    """
    with ExitStack() as scratch:
        if folder is None:
            folder = scratch.enter_context(tempfile.TemporaryDirectory(prefix="pdl1exp-bench-"))
        cold = run_pipeline(overrides, folder=folder)
        warm = run_pipeline(overrides, folder=folder)
    return {"overrides": list(overrides), f"{first}_s": round(cold["wall_s"], 1),
            "warm_s": round(warm["wall_s"], 1),
            "peak_rss_mb": round(max(cold["peak_rss_mb"], warm["peak_rss_mb"]), 1),
            "peak_rss_mb_warm": round(warm["peak_rss_mb"], 1),
            "peak_pss_mb": round(max(cold["peak_pss_mb"], warm["peak_pss_mb"]), 1),
            "stages_s": cold["stages_s"], "warm_stages_s": warm["stages_s"],
            "peak_rss_mb_by_stage": cold["peak_rss_mb_by_stage"],
            "excluded_patients": cold["excluded_patients"],
            "timing": "stage functions wrapped in the run's process (pdl1exp.bench.e2e.STAGES); "
                      f"RSS of the process tree sampled every {RSS_POLL_S:g} s, PSS every "
                      f"{PSS_POLL_S:g} s, with psutil"}


def _child(stages_file: str, overrides: list[str]) -> None:
    """The timed run: ``python -m pdl1exp`` with the stage functions wrapped."""
    import pdl1exp.pipeline  # noqa: F401  (imported so that its stage functions can be wrapped)
    from pdl1exp.__main__ import main

    timer = StageTimer()
    sys.argv = ["pdl1exp", *overrides]
    try:
        with timer.patched():
            main()
    except SystemExit as stop:  # Hydra exits after the run
        if stop.code:
            raise
    finally:
        Path(stages_file).write_text(
            json.dumps({"seconds": timer.seconds, "intervals": timer.intervals}))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2:])
