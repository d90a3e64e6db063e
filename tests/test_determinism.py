"""Same config and seed, fresh processes: the same sweep to 1e-9, whatever ``tuning.n_jobs``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

SWEEP = """
import json, sys
from tests.test_tuning import model_cfg, table
from pdl1exp.models.tuning import sweep

cfg = model_cfg("[lr,knn]", "lasso", n_trials=12, cv_folds=3, n_jobs=int(sys.argv[1]))
cfg["tuning"]["pruner"] = {"_target_": "optuna.pruners.MedianPruner",
                          "n_startup_trials": 5, "n_warmup_steps": 1}
X, y = table(seed=3, n=60, p=30, n_planted=3)
results = sweep(X, y, classifiers=cfg["classifier"], selection_cfg=cfg["selection"],
                tuning_cfg=cfg["tuning"], storage=f"sqlite:///{sys.argv[2]}",
                study_name="determinism")
print(json.dumps({name: {"params": r.best_params, "cv_auc": r.cv_auc,
                         "folds": r.cv_auc_folds, "oof": r.oof_proba.tolist(),
                         "n_pruned": r.n_pruned,
                         "values": r.trials["value"].tolist(),
                         "train_proba": r.model.predict_proba(X)[:, 1].tolist()}
                  for name, r in results.items()}))
"""


def fresh_sweep(tmp_path: Path, n_jobs: int, tag: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", SWEEP, str(n_jobs), str(tmp_path / f"{tag}.db")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_sweep_repeats_exactly_in_fresh_processes_with_any_n_jobs(tmp_path: Path) -> None:
    # Two fresh processes, one fitting the folds on one thread, the other on two.
    first = fresh_sweep(tmp_path, 1, "first")
    again = fresh_sweep(tmp_path, 2, "two_threads")
    assert list(again) == list(first) == ["lr", "knn"]
    for name, result in first.items():
        other = again[name]
        assert other["params"] == result["params"], name
        assert other["n_pruned"] == result["n_pruned"], name
        for key in ("cv_auc", "folds", "oof", "values", "train_proba"):
            np.testing.assert_allclose(np.asarray(other[key], dtype=float),
                                       np.asarray(result[key], dtype=float),
                                       rtol=0, atol=1e-9, err_msg=f"{name} {key}")
    assert any(result["n_pruned"] for result in first.values()) or pytest.fail(
        "no trial was pruned: the test would not see pruning depend on n_jobs")
