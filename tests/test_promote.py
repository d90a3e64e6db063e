"""Promotion: candidate → champion only when it is not worse on the held-out patients."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pdl1exp.evaluation import delong_test_unpaired
from pdl1exp.promote import decide, promote
from pdl1exp.serving import CHAMPION
from tests.test_serving import log_version

LABELS = np.tile([0, 1], 20)
RNG = np.random.default_rng(0)
GOOD = LABELS * 0.5 + RNG.uniform(0, 0.6, LABELS.size)        # AUC ≈ 0.95
BAD = LABELS * 0.05 + RNG.uniform(0, 0.6, LABELS.size)        # AUC ≈ 0.6


def _predictions(scores: np.ndarray, prefix: str = "T") -> pd.DataFrame:
    index = pd.Index([f"{prefix}{i:03d}" for i in range(LABELS.size)], name="patient_id")
    return pd.DataFrame({"label": LABELS, "probability": scores}, index=index)


def _champion(name: str) -> str:
    return str(MlflowClient().get_registered_model(name).aliases[CHAMPION])


def test_first_candidate_is_promoted_and_a_worse_one_refused(tmp_path: Path) -> None:
    first = log_version(tmp_path, "m", labels=LABELS, probability=GOOD)
    decision = promote(name="m", alpha=0.05)
    assert decision.promote
    assert decision.method == "no champion"
    assert _champion("m") == first

    worse = log_version(tmp_path, "m", labels=LABELS, probability=BAD)
    decision = promote(name="m", alpha=0.05)
    assert not decision.promote
    assert decision.method == "paired DeLong"
    assert decision.numbers["p_worse"] < 0.05
    assert _champion("m") == first
    version = MlflowClient().get_model_version("m", worse)
    assert version.tags["promotion.decision"] == "rejected"
    assert version.tags["promotion.champion_version"] == first
    assert float(version.tags["promotion.candidate_auc"]) < float(
        version.tags["promotion.champion_auc"])
    assert version.description.startswith("NOT PROMOTED")


def test_dry_run_changes_nothing(tmp_path: Path, capsys) -> None:
    first = log_version(tmp_path, "m", labels=LABELS, probability=BAD)
    promote(name="m", alpha=0.05)
    better = log_version(tmp_path, "m", labels=LABELS, probability=GOOD)
    assert promote(name="m", alpha=0.05, dry_run=True).promote
    assert "[dry run] PROMOTED" in capsys.readouterr().out
    assert _champion("m") == first
    assert not any(k.startswith("promotion.")
                   for k in MlflowClient().get_model_version("m", better).tags)
    assert promote(name="m", alpha=0.05).promote
    assert _champion("m") == better


def test_rule_without_pairing_and_without_the_auc_requirement() -> None:
    champion = _predictions(GOOD)
    unpaired = decide(_predictions(BAD, prefix="U"), champion, alpha=0.05)
    assert unpaired.method == "unpaired DeLong"
    assert not unpaired.promote
    assert unpaired.numbers["p_worse"] < 0.05
    bad, good = _predictions(BAD, prefix="U"), champion
    z, p = delong_test_unpaired(bad["label"], bad["probability"], good["label"],
                                good["probability"])
    assert unpaired.numbers["z"] == z
    assert p == pytest.approx(2 * unpaired.numbers["p_worse"])

    slightly_lower = GOOD.copy()
    slightly_lower[[0, 2]] = 0.9  # two negatives now outrank some positives
    candidate = _predictions(slightly_lower)
    strict = decide(candidate, champion, alpha=0.05)
    assert not strict.promote
    assert strict.numbers["p_worse"] >= 0.05
    assert decide(candidate, champion, alpha=0.05, require_higher_auc=False).promote


def test_command_without_candidate_exits_non_zero_and_writes_nothing(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "pdl1exp.promote", "registry.name=absent",
         f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
        cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert "'absent' has no @candidate" in done.stderr
    assert list(cwd.iterdir()) == []
