"""Crash safety: a run killed with SIGKILL is closed on restart, and the rerun of the same
command reuses what was finished and ends with the metrics of an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from pdl1exp.tracking import END_REASON_TAG, HEARTBEAT_TAG, setup, tracked_run
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
_POLL_S = 0.05  # how often the marker is looked for (no timing assumption: any value works)
_LIMIT_S = 900  # a run that neither reaches the marker nor ends is a hang


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_running_runs_are_closed_as_killed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = setup(uri, "crash")
    client, now, here = MlflowClient(), time.time(), socket.gethostname()

    def running(name: str, *, beat: float | None = None, host: str = "elsewhere",
                pid: int = 1, parent: str | None = None, started: float = now) -> str:
        tags = {"pdl1exp.host": host, "pdl1exp.pid": str(pid)} if parent is None else {
            "mlflow.parentRunId": parent}
        if beat is not None:
            tags[HEARTBEAT_TAG] = f"{beat:.3f}"
        return client.create_run(experiment, start_time=int(started * 1000), tags=tags,
                                 run_name=name).info.run_id

    dead_here = running("dead here", beat=now, host=here, pid=_dead_pid())
    silent = running("silent", beat=now - 1000)
    silent_child = running("silent/child", parent=silent)
    alive = running("alive", beat=now - 10)
    alive_child = running("alive/child", parent=alive)
    legacy = running("no heartbeat", started=now - 1000)
    with tracked_run("this process", heartbeat_s=60) as run:  # alive here, fresh heartbeat
        setup(uri, "crash", stale_after_s=300)
        mine = run.info.run_id
        assert client.get_run(mine).info.status == "RUNNING"
    other = setup(uri, "other", stale_after_s=300)  # other experiments are left alone
    assert other != experiment

    def status(run_id: str) -> str:
        return client.get_run(run_id).info.status

    assert {r: status(r) for r in (dead_here, silent, silent_child, legacy)} == dict.fromkeys(
        (dead_here, silent, silent_child, legacy), "KILLED")
    assert {r: status(r) for r in (alive, alive_child, mine)} == {
        alive: "RUNNING", alive_child: "RUNNING", mine: "FINISHED"}
    reasons = {r: client.get_run(r).data.tags[END_REASON_TAG]
               for r in (dead_here, silent, silent_child, legacy)}
    assert "is gone" in reasons[dead_here]
    # The age is counted when the cleanup runs: a loaded machine may add seconds.
    age = re.search(r"no heartbeat for (\d+) s", reasons[silent])
    assert age is not None
    assert 1000 <= int(age.group(1)) <= 1001 + time.time() - now  # rounded
    assert f"parent run {silent}" in reasons[silent_child]
    assert "no heartbeat" in reasons[legacy]
    # ended at the last sign of life, not at the cleanup
    assert client.get_run(silent).info.end_time == int(float(f"{now - 1000:.3f}") * 1000)


def test_the_heartbeat_is_refreshed_while_the_run_lives(tmp_path: Path) -> None:
    setup(f"sqlite:///{tmp_path}/mlflow.db", "beat")
    client = MlflowClient()
    with tracked_run("beating", heartbeat_s=0.05) as run:
        first = client.get_run(run.info.run_id).data.tags[HEARTBEAT_TAG]
        deadline = time.monotonic() + _LIMIT_S
        while client.get_run(run.info.run_id).data.tags[HEARTBEAT_TAG] == first:
            assert time.monotonic() < deadline, "the heartbeat never moved"
            time.sleep(_POLL_S)
        with tracked_run("child", nested=True) as child:
            assert HEARTBEAT_TAG not in client.get_run(child.info.run_id).data.tags
    tags = client.get_run(run.info.run_id).data.tags
    assert (tags["pdl1exp.host"], tags["pdl1exp.pid"]) == (socket.gethostname(), str(os.getpid()))
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


# --- kill -9 at a stage, rerun the same command ------------------------------------------

def _command(root: Path) -> list[str]:
    return [sys.executable, "-m", "pdl1exp", "+experiment=smoke", *tiny_overrides(root),
            f"hydra.run.dir={root}/run"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def _kill_at(root: Path, marker: Callable[[], bool], what: str) -> None:
    """Start the experiment and SIGKILL it (its whole process group) once ``marker()``."""
    out = (root / "killed.log").open("w")
    child = subprocess.Popen(_command(root), cwd=ROOT, env=_env(), stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + _LIMIT_S
    try:
        while not marker():
            if child.poll() is not None or time.monotonic() > deadline:
                tail = (root / "killed.log").read_text()[-3000:]
                pytest.fail(f"the run ended (or hung) before {what}:\n{tail}")
            time.sleep(_POLL_S)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        out.close()
    assert child.returncode == -signal.SIGKILL


def _rerun(root: Path) -> str:
    done = subprocess.run(_command(root), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


def _parents(root: Path) -> dict[str, mlflow.entities.Run]:
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["smoke"], output_format="list")
    return {r.info.status: r for r in runs if r.info.run_name == "smoke"}


def _check_resumed(root: Path, reference: Path) -> None:
    """The killed run is KILLED with its reason; the rerun's metrics are the reference's."""
    parents = _parents(root)
    assert set(parents) == {"KILLED", "FINISHED"}
    assert "is gone" in parents["KILLED"].data.tags[END_REASON_TAG]
    expected = _parents(reference)["FINISHED"].data.metrics
    got = parents["FINISHED"].data.metrics
    assert set(got) == set(expected)
    assert got == {k: pytest.approx(v, rel=0, abs=1e-9) for k, v in expected.items()}


def _log_has(root: Path, pattern: str) -> Callable[[], bool]:
    log = root / "run" / "__main__.log"
    return lambda: log.exists() and re.search(pattern, log.read_text()) is not None


@pytest.mark.slow  # three smoke runs; resume's parts are unit-tested in the default suite
def test_kill_during_radiomics_extraction_resumes_from_the_patient_cache(
        smoke_store, tmp_path: Path) -> None:
    patients = tmp_path / "cache" / "features" / "radiomics"
    _kill_at(tmp_path, lambda: len(list(patients.glob("*.parquet"))) >= 3,
             "3 patients' radiomics were cached")
    cached = len(list(patients.glob("*.parquet")))
    output = _rerun(tmp_path)
    reused = int(re.search(r"Radiomics \(original\): (\d+) patients cached", output)[1])
    assert reused >= cached  # per-patient rows written before the kill are read back
    _check_resumed(tmp_path, smoke_store[0])


@pytest.mark.slow
def test_kill_during_cohort_writing_regenerates_it(smoke_store, tmp_path: Path) -> None:
    synthetic = tmp_path / "cache" / "synthetic"
    _kill_at(tmp_path, lambda: any(synthetic.glob(".*.partial-*/images/*")),
             "the first patient of the synthetic cohort was written")
    assert not list(synthetic.glob("*/metadata.json"))  # killed before it was published
    output = _rerun(tmp_path)
    assert "Generating synthetic cohort" in output
    _check_resumed(tmp_path, smoke_store[0])


def _trials(root: Path, prefix: str) -> dict[str, int]:
    storage = f"sqlite:///{root}/mlruns/optuna.db"
    return {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)
            if s.study_name.startswith(prefix) and ":finalizer" not in s.study_name}


@pytest.mark.slow
def test_kill_during_the_sweep_resumes_the_studies(smoke_store, tmp_path: Path) -> None:
    """Killed once the first feature set's sweep is finalized (its claim held by the dead
    process): the rerun runs none of its trials again and takes the claim over."""
    _kill_at(tmp_path, _log_has(tmp_path, r"\] - dlr/lr: cv_auc="),
             "the first sweep was finalized")
    swept = _trials(tmp_path, "smoke/dlr/")
    assert swept
    assert all(n == 3 for n in swept.values())  # tuning.n_trials of the smoke experiment
    _rerun(tmp_path)
    assert _trials(tmp_path, "smoke/dlr/") == swept
    _check_resumed(tmp_path, smoke_store[0])
