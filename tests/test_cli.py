"""Command line: a user's error prints its message alone and exits 2; bugs keep a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pdl1exp.cli import EXIT_USER_ERROR, user_errors
from pdl1exp.data.manifest import CohortError, Problem
from pdl1exp.models.tuning import WorkerDone
from pdl1exp.workers import WorkerCountError

SRC = Path(__file__).resolve().parents[1] / "src"


def command(tmp_path: Path, module: str, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m module overrides`` in ``tmp_path``, this checkout's package first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get(
        "PYTHONPATH", "")]), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def assert_message_alone(done: subprocess.CompletedProcess, *expected: str) -> None:
    assert done.returncode == EXIT_USER_ERROR, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    assert 'File "' not in output
    for text in expected:
        assert text in output


def test_a_bad_override_exits_2_with_hydras_message(tmp_path: Path) -> None:
    done = command(tmp_path, "pdl1exp", "no_such_key=1")
    assert_message_alone(done, "no_such_key")


def test_a_bad_manifest_exits_2_with_the_rows_and_nothing_else(tmp_path: Path) -> None:
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("patient_id,image,mask,label\nP001,absent.nii.gz,absent_mask.nii.gz,1\n")
    done = command(tmp_path, "pdl1exp", "dataset=manifest", f"dataset.path={manifest}",
                   f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
                   f"paths.cache_dir={tmp_path}/cache", f"tuning.storage=sqlite:///{tmp_path}/o.db")
    assert_message_alone(done, "pdl1exp: ", "patient 'P001', column 'image'", "not found")


def test_predict_with_an_unknown_model_exits_2(tmp_path: Path) -> None:
    manifest = tmp_path / "new.csv"
    manifest.write_text("patient_id,image,mask\nP001,absent.nii.gz,absent_mask.nii.gz\n")
    done = command(tmp_path, "pdl1exp.predict", "model_uri=models:/absent@champion",
                   f"dataset.path={manifest}", f"output={tmp_path}/preds.csv",
                   f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert_message_alone(done, "predict: ", "absent")
    assert not (tmp_path / "preds.csv").exists()


def test_the_wrapper_sorts_user_errors_bugs_and_finished_workers(capsys) -> None:
    @user_errors("prog", LookupError)
    def body(error: Exception | None) -> str:
        if error is not None:
            raise error
        return "ran"

    assert body(None) == "ran"
    cohort = CohortError(Path("cohort.csv"), [Problem("P7", "mask", "empty mask")])
    workers = WorkerCountError("tracking.qc_jobs=0 means no worker")
    for error in (cohort, LookupError("no @candidate"), FileNotFoundError("weights.pt"),
                  workers):
        with pytest.raises(SystemExit) as exit_:
            body(error)
        assert exit_.value.code == EXIT_USER_ERROR
        assert capsys.readouterr().err == f"prog: {error}\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        body(ZeroDivisionError("bug"))
    assert body(WorkerDone("sweep 'x': trials complete")) is None
    assert capsys.readouterr().out == "prog: sweep 'x': trials complete\n"
