"""Tests for the classifier configs, search spaces and pipeline assembly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from sklearn.calibration import CalibratedClassifierCV
from sklearn.pipeline import Pipeline
from sklearn.svm import SVC

from pdl1exp.models.classifiers import build_estimator, build_pipeline, suggest_params

CONF = Path(__file__).resolve().parents[1] / "conf"
SEVEN = ["lr", "svm", "knn", "rf", "extra_trees", "xgboost", "lightgbm"]
EVERY = sorted(path.stem for path in (CONF / "classifier").glob("*.yaml") if path.stem != "all")


def compose_cfg(*overrides: str) -> DictConfig:
    """Compose the model config groups the way the root config does (``seed: 42``)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(overrides=["+selection=lasso", "+tuning=optuna", "+seed=42", *overrides])


def tiny_table(seed: int = 0, n: int = 60, p: int = 25) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2)
    X = rng.standard_normal((n, p))
    X[:, :2] += y[:, None]
    X[rng.random((n, p)) < 0.02] = np.nan
    index = pd.Index([f"P{i:03d}" for i in range(n)], name="patient_id")
    return pd.DataFrame(X, index=index, columns=[f"dl_{j:04d}" for j in range(p)]), y


def test_every_classifier_file_is_covered():
    assert sorted([*SEVEN, "mlp", "naive_bayes"]) == EVERY


def test_all_composes_the_seven_classifiers():
    cfg = compose_cfg("+classifier=all")
    assert list(cfg.classifier) == SEVEN
    for spec in cfg.classifier.values():
        assert set(spec) == {"estimator", "search_space"}


@pytest.mark.parametrize("name", EVERY)
def test_single_choice_is_a_one_key_mapping(name):
    cfg = compose_cfg(f"+classifier={name}")
    assert list(cfg.classifier) == [name]


def test_list_choice_and_seed_interpolation():
    cfg = compose_cfg("+classifier=[lr,mlp]", "seed=7")
    assert list(cfg.classifier) == ["lr", "mlp"]
    assert cfg.classifier.lr.estimator.random_state == 7
    assert cfg.selection.steps.lasso.random_state == 7
    assert cfg.tuning.sampler.seed == 7


def test_primary_config_with_searchpath(tmp_path):
    # The shape of the lead's conf/config.yaml: the default and an override both compose.
    (tmp_path / "config.yaml").write_text(
        "defaults:\n  - classifier: all\n  - selection: lasso\n  - tuning: optuna\n  - _self_\n"
        f"seed: 42\nhydra:\n  searchpath:\n    - file://{CONF}\n"
    )
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        assert list(compose("config").classifier) == SEVEN
        assert list(compose("config", overrides=["classifier=svm"]).classifier) == ["svm"]


@pytest.mark.parametrize("name", EVERY)
def test_every_classifier_fits_through_the_pipeline(name):
    cfg = compose_cfg(f"+classifier={name}")
    spec = cfg.classifier[name]
    X, y = tiny_table()
    # Lowest value of every range / first choice: a valid corner of the space.
    corner = {
        key: entry.choices[0] if entry.type == "categorical" else entry.low
        for key, entry in spec.search_space.items()
    }
    params = suggest_params(optuna.trial.FixedTrial(corner), spec.search_space)
    estimator = build_estimator(spec, params)
    pipeline = build_pipeline(cfg.selection, estimator)
    assert isinstance(pipeline, Pipeline)
    assert [step for step, _ in pipeline.steps][-1] == "classifier"
    assert list(pipeline.named_steps) == [*cfg.selection.steps, "classifier"]
    proba = pipeline.fit(X, y).predict_proba(X)
    assert proba.shape == (len(X), 2)
    assert np.all((proba >= 0) & (proba <= 1))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    for key, value in corner.items():
        assert pipeline.named_steps["classifier"].get_params()[key] == value


def test_svm_is_platt_scaled_and_seeds_resolve():
    cfg = compose_cfg("+classifier=all")
    svm = build_estimator(cfg.classifier.svm, {"estimator__C": 3.0})
    assert isinstance(svm, CalibratedClassifierCV)
    assert (svm.method, svm.ensemble) == ("sigmoid", False)  # = SVC(probability=True)
    assert isinstance(svm.estimator, SVC)
    assert svm.estimator.C == 3.0
    for name in ["lr", "rf", "extra_trees", "xgboost", "lightgbm"]:
        assert build_estimator(cfg.classifier[name]).get_params()["random_state"] == 42
    assert svm.estimator.random_state == 42


def test_suggest_params_samples_within_the_yaml_space():
    space = {
        "C": {"type": "float", "low": 1e-3, "high": 1e2, "log": True},
        "k": {"type": "int", "low": 3, "high": 31, "step": 2},
        "kernel": {"type": "categorical", "choices": ["rbf", "linear"]},
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        params = suggest_params(study.ask(), space)
        assert 1e-3 <= params["C"] <= 1e2
        assert params["k"] in range(3, 32, 2)
        assert params["kernel"] in {"rbf", "linear"}
    assert study.trials[0].distributions["C"].log


def test_suggest_params_rejects_unknown_type():
    trial = optuna.trial.FixedTrial({"C": 1.0})
    with pytest.raises(ValueError, match="has type 'loguniform'"):
        suggest_params(trial, {"C": {"type": "loguniform", "low": 1e-3, "high": 1.0}})
