"""How many workers an ``n_jobs`` setting means on this machine (joblib's convention).

One rule for every pool of the pipeline (cohort writers, image readers, QC figures, radiomics
processes): a positive count as given; -1 one worker per core, -2 all cores but one, and so
on; None as -1. Cores are those :func:`joblib.cpu_count` finds: the affinity mask and a
cgroup's CPU quota (a container's ``--cpus``, a SLURM task's ``cpus_per_task``).
"""

from __future__ import annotations

from joblib import cpu_count

__all__ = ["WorkerCountError", "cores_each", "n_workers"]


class WorkerCountError(ValueError):
    """An ``n_jobs`` setting that means no worker (0)."""


def n_workers(n_jobs: int | None, *, setting: str) -> int:
    """The number of workers ``n_jobs`` asks for (at least 1).

    Args:
        n_jobs: a count, a negative number counted back from the cores (-1: all), or None (all).
        setting: the config key, named by the error.

    Raises:
        WorkerCountError: for 0.
    """
    n = -1 if n_jobs is None else int(n_jobs)
    if n == 0:
        msg = (f"{setting}=0 means no worker: use 1 (in this process), a number of workers, "
               "or -1 (one per core)")
        raise WorkerCountError(msg)
    return n if n > 0 else max(1, cpu_count() + 1 + n)


def cores_each(workers: int) -> int:
    """The cores each of ``workers`` gets when they share the machine (at least 1)."""
    return max(1, cpu_count() // workers)
