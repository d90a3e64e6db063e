"""MLflow: store set-up, run lifecycle (never left RUNNING), tags, params and artifacts.

A top-level run beats a heartbeat (tag ``pdl1exp.heartbeat``, unix seconds) while its
process lives; :func:`setup` closes as KILLED the experiment's RUNNING runs whose process is
gone (``kill -9``, out of memory, lost machine), so no run stays RUNNING forever.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from filelock import FileLock
from mlflow.tracking import MlflowClient

__all__ = [
    "END_REASON_TAG",
    "HEARTBEAT_TAG",
    "close_stale_runs",
    "code_version",
    "environment_tags",
    "log_cohort",
    "log_frame",
    "log_params",
    "pseudonym",
    "pseudonym_key",
    "setup",
    "tracked_run",
]

log = logging.getLogger(__name__)

# Import names: the xgboost module comes from either the xgboost or the xgboost-cpu wheel.
_PACKAGES = ("torch", "monai", "pytorch_lightning", "sklearn", "optuna", "mlflow", "xgboost",
             "lightgbm", "SimpleITK", "pandas", "numpy", "scipy", "hydra")
_MAX_ERROR = 4000
_PARAM_BATCH = 100
_DIGEST_MAX = 36
_KIND_TAG, _KIND = "mlflow.experimentKind", "custom_model_development"
HEARTBEAT_TAG = "pdl1exp.heartbeat"
END_REASON_TAG = "end_reason"
_HOST_TAG, _PID_TAG = "pdl1exp.host", "pdl1exp.pid"
_PARENT_TAG = "mlflow.parentRunId"


def setup(uri: str, experiment: str, *, stale_after_s: float | None = None) -> str:
    """Point MLflow at ``uri`` and return the experiment id (created when missing).

    With a local ``sqlite:///`` store, artifacts go beside the database
    (``<db folder>/<experiment>/<run id>/artifacts``).

    Args:
        uri: tracking URI.
        experiment: experiment name.
        stale_after_s: when given, first close the experiment's runs left RUNNING by dead
            processes (:func:`close_stale_runs`).
    """
    location, lock = None, nullcontext()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        location = (db.resolve().parent / experiment).as_uri()
        # Processes started together (a joblib multirun) would race to create the tables
        # and the experiment: one at a time.
        lock = FileLock(f"{db}.lock")
    mlflow.set_tracking_uri(uri)
    with lock:
        found = mlflow.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            # The MLflow 3 UI opens an experiment of this kind on its runs, not the GenAI
            # overview.
            experiment_id = MlflowClient().create_experiment(
                experiment, artifact_location=location, tags={_KIND_TAG: _KIND})
    mlflow.set_experiment(experiment_id=experiment_id)
    if stale_after_s is not None:
        close_stale_runs(experiment_id, stale_after_s=stale_after_s)
    return experiment_id


def _alive_here(tags: Mapping[str, str]) -> bool | None:
    """Whether the run's process is alive: known only for a process of this host."""
    if tags.get(_HOST_TAG) != socket.gethostname() or _PID_TAG not in tags:
        return None
    try:
        os.kill(int(tags[_PID_TAG]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def close_stale_runs(experiment_id: str, *, stale_after_s: float) -> list[str]:
    """Close the experiment's RUNNING runs whose process is gone as KILLED; return their ids.

    A top-level run is gone when its process (same host) no longer exists, or when its
    heartbeat (:data:`HEARTBEAT_TAG`; a run without one: its start) is older than
    ``stale_after_s``; a child run goes with its parent. Each closed run gets an
    :data:`END_REASON_TAG` saying why, and ends at its last sign of life.

    Args:
        experiment_id: the experiment to clean.
        stale_after_s: seconds without heartbeat after which a run counts as dead; keep it
            several times ``tracking.heartbeat_s`` (and above the clock skew between hosts).
    """
    client = MlflowClient()
    running = {r.info.run_id: r for r in mlflow.search_runs(
        experiment_ids=[experiment_id], filter_string="attributes.status = 'RUNNING'",
        output_format="list")}
    now = time.time()

    def verdict(run: mlflow.entities.Run) -> tuple[float, str | None]:
        """(last sign of life in unix seconds, why it is dead or None)."""
        tags = run.data.tags
        parent = running.get(tags.get(_PARENT_TAG, ""))
        if parent is not None:
            seen, why = verdict(parent)
            return seen, why and f"its parent run {parent.info.run_id} {why}"
        seen = float(tags.get(HEARTBEAT_TAG, run.info.start_time / 1000))
        if _alive_here(tags) is False:
            return seen, f"process {tags[_PID_TAG]} on {tags[_HOST_TAG]} is gone"
        if now - seen > stale_after_s:
            return seen, (f"no heartbeat for {now - seen:.0f} s "
                          f"(tracking.stale_after_s={stale_after_s:g})")
        return seen, None

    closed = []
    for run_id, run in running.items():
        seen, why = verdict(run)
        if why is None:
            continue
        reason = f"closed as KILLED by a later run ({socket.gethostname()}): {why}"
        client.set_tag(run_id, END_REASON_TAG, reason)
        client.set_terminated(run_id, status="KILLED", end_time=int(seen * 1000))
        log.warning("MLflow run %s (%s) was left RUNNING: %s", run_id,
                    run.info.run_name, reason)
        closed.append(run_id)
    return closed


def log_cohort(table: pd.DataFrame, *, name: str, digest: str, target: str) -> None:
    """The cohort as the run's input dataset (the UI's Dataset column): name, digest
    (``data_hash``, cut to MLflow's 36 characters), schema and row count. ``table`` must hold
    no identifying column."""
    with warnings.catch_warnings():  # the 0/1 label is an integer column on purpose
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        dataset = mlflow.data.from_pandas(table.reset_index(drop=True), name=name,
                                          digest=digest[:_DIGEST_MAX], targets=target)
    mlflow.log_input(dataset, context="cohort")


@contextmanager
def _heartbeat(run_id: str, interval_s: float) -> Iterator[None]:
    """Refresh the run's :data:`HEARTBEAT_TAG` every ``interval_s`` from a daemon thread."""
    client, stop = MlflowClient(), threading.Event()

    def beat() -> None:
        while not stop.wait(interval_s):
            try:
                client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.3f}")
            except Exception as err:  # a store hiccup must not end the run
                log.warning("MLflow heartbeat of run %s failed: %s", run_id, err)

    thread = threading.Thread(target=beat, name=f"mlflow-heartbeat-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def tracked_run(name: str, *, nested: bool = False, tags: Mapping[str, str] | None = None,
                heartbeat_s: float | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start a run that ends FINISHED, FAILED (error tag) or KILLED (Ctrl-C), never RUNNING.

    Args:
        name: run name.
        nested: a child of the active run.
        tags: run tags.
        heartbeat_s: seconds between heartbeats of a top-level run (None: no heartbeat);
            with them, a later :func:`setup` closes the run if its process dies.
    """
    tags = dict(tags or {})
    beats = heartbeat_s is not None and not nested
    if beats:
        tags |= {HEARTBEAT_TAG: f"{time.time():.3f}", _HOST_TAG: socket.gethostname(),
                 _PID_TAG: str(os.getpid())}
    run = mlflow.start_run(run_name=name, nested=nested, tags=tags)
    try:
        with _heartbeat(run.info.run_id, heartbeat_s) if beats else nullcontext():
            yield run
    except KeyboardInterrupt:
        mlflow.set_tag("error", "interrupted (KeyboardInterrupt)")
        mlflow.end_run("KILLED")
        raise
    except BaseException as err:
        mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:_MAX_ERROR])
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def code_version() -> str:
    """The git commit of the source tree (``+dirty`` with uncommitted changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}+dirty" if dirty.strip() else commit


def environment_tags() -> dict[str, str]:
    """Code version and the versions of the packages that change numbers."""
    tags = {"git_commit": code_version(), "python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            tags[f"version.{name}"] = str(importlib.import_module(name).__version__)
        except ImportError:
            tags[f"version.{name}"] = "absent"
    return tags


def log_params(params: Mapping[str, Any]) -> None:
    """Log (nested) params as ``a.b.c`` keys, in batches (MLflow takes 100 per call)."""
    flat = pd.json_normalize(dict(params), sep=".").iloc[0].to_dict() if params else {}
    items = [(k, str(v)) for k, v in flat.items()]
    for start in range(0, len(items), _PARAM_BATCH):
        mlflow.log_params(dict(items[start:start + _PARAM_BATCH]))


def pseudonym(patient_id: str, key: bytes) -> str:
    """A stable, non-reversible stand-in for a patient id (HMAC-SHA256, 12 hex)."""
    return hmac.new(key, patient_id.encode(), hashlib.sha256).hexdigest()[:12]


def pseudonym_key(folder: str | Path) -> bytes:
    """The secret behind :func:`pseudonym`, kept beside the store and never logged."""
    path = Path(folder) / ".pseudonym_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_bytes(secrets.token_bytes(32))
        partial.chmod(0o600)
        try:  # a hard link never replaces: of concurrent runs, the first key wins
            os.link(partial, path)
        except FileExistsError:
            pass
        finally:
            partial.unlink()
    return path.read_bytes()


def log_frame(frame: pd.DataFrame, name: str, *, index: bool = False) -> None:
    """Log a table as a CSV artifact called ``name``."""
    mlflow.log_text(frame.to_csv(index=index), name)
