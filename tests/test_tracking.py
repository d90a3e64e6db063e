"""Tracking helpers: run lifecycle, flattening, pseudonyms."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from pdl1exp.tracking import log_params, pseudonym, pseudonym_key, setup, tracked_run


def test_runs_end_failed_or_killed_never_running(tmp_path: Path) -> None:
    setup(f"sqlite:///{tmp_path}/mlflow.db", "lifecycle")
    ids = {}

    def body(name: str, error: type[BaseException]) -> None:
        with tracked_run(name) as run:
            ids[name] = run.info.run_id
            raise error

    with pytest.raises(ZeroDivisionError):
        body("boom", ZeroDivisionError)
    with pytest.raises(KeyboardInterrupt):
        body("ctrl-c", KeyboardInterrupt)
    failed, killed = ids["boom"], ids["ctrl-c"]
    with tracked_run("ok") as run:
        finished = run.info.run_id
    status = {r: mlflow.get_run(r).info.status for r in (failed, killed, finished)}
    assert status == {failed: "FAILED", killed: "KILLED", finished: "FINISHED"}
    assert "ZeroDivisionError" in mlflow.get_run(failed).data.tags["error"]
    assert mlflow.active_run() is None


def test_nested_params_are_logged_with_dotted_keys(tmp_path: Path) -> None:
    setup(f"sqlite:///{tmp_path}/mlflow.db", "params")
    with tracked_run("p") as run:
        log_params({"backbone": {"name": "r50", "tta": {"n": 4}},
                    "classifier": [f"c{i}" for i in range(3)], "seed": 1,
                    **{f"k{i}": i for i in range(150)}})
    params = mlflow.get_run(run.info.run_id).data.params
    assert params["backbone.name"] == "r50"
    assert params["backbone.tta.n"] == "4"
    assert params["classifier"] == "['c0', 'c1', 'c2']"
    assert len(params) == 154
    experiment = mlflow.get_experiment_by_name("params")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_pseudonyms_are_stable_keyed_and_not_the_id(tmp_path: Path) -> None:
    key = pseudonym_key(tmp_path)
    assert pseudonym_key(tmp_path) == key
    assert pseudonym("SYN0001", key) == pseudonym("SYN0001", key) != "SYN0001"
    assert pseudonym("SYN0001", key) != pseudonym("SYN0002", key)
    assert pseudonym("SYN0001", key) != pseudonym("SYN0001", pseudonym_key(tmp_path / "other"))
