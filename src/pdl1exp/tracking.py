"""MLflow: store set-up, run lifecycle (never left RUNNING), tags, params and artifacts."""

from __future__ import annotations

import hashlib
import hmac
import importlib
import logging
import secrets
import subprocess
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

__all__ = [
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


def setup(uri: str, experiment: str) -> str:
    """Point MLflow at ``uri`` and return the experiment id (created when missing).

    With a local ``sqlite:///`` store, artifacts go beside the database
    (``<db folder>/<experiment>/<run id>/artifacts``).
    """
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        mlflow.set_experiment(experiment_id=found.experiment_id)
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        db_dir = Path(uri.removeprefix("sqlite:///")).resolve().parent
        location = (db_dir / experiment).as_uri()
    # The MLflow 3 UI opens an experiment of this kind on its runs, not the GenAI overview.
    experiment_id = MlflowClient().create_experiment(
        experiment, artifact_location=location, tags={_KIND_TAG: _KIND})
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


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
def tracked_run(name: str, *, nested: bool = False,
                tags: Mapping[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start a run that ends FINISHED, FAILED (error tag) or KILLED (Ctrl-C), never RUNNING."""
    run = mlflow.start_run(run_name=name, nested=nested, tags=dict(tags or {}))
    try:
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
        path.write_bytes(secrets.token_bytes(32))
        path.chmod(0o600)
    return path.read_bytes()


def log_frame(frame: pd.DataFrame, name: str, *, index: bool = False) -> None:
    """Log a table as a CSV artifact called ``name``."""
    mlflow.log_text(frame.to_csv(index=index), name)
