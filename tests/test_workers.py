"""Worker counts: joblib's n_jobs convention, one rule for every pool."""

from __future__ import annotations

import pytest

from pdl1exp import workers as workers_module
from pdl1exp.workers import WorkerCountError, cores_each, n_workers


@pytest.mark.parametrize(("n_jobs", "expected"), [
    (1, 1), (3, 3), (12, 12),   # a count as given, even above the cores
    (-1, 8), (None, 8),         # one per core
    (-2, 7), (-8, 1), (-20, 1),  # counted back from the cores, at least one
])
def test_n_jobs_means_this_many_workers_on_8_cores(
        n_jobs: int | None, expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers_module, "cpu_count", lambda: 8)
    assert n_workers(n_jobs, setting="x.n_jobs") == expected


def test_zero_workers_is_an_error_naming_the_setting() -> None:
    with pytest.raises(WorkerCountError, match=r"tracking\.qc_jobs=0"):
        n_workers(0, setting="tracking.qc_jobs")


@pytest.mark.parametrize(("workers", "expected"), [(1, 8), (2, 4), (3, 2), (8, 1), (16, 1)])
def test_workers_share_8_cores(workers: int, expected: int,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers_module, "cpu_count", lambda: 8)
    assert cores_each(workers) == expected
