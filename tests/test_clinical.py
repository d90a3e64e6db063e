"""Clinical screening inside the pipeline, and the selected model as one estimator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from pdl1exp.models.clinical import SIGNATURE, UnivariateScreen, clinical_pipeline, signature
from pdl1exp.models.selected import SelectedModel
from tests.conftest import CONF

CFG = OmegaConf.load(CONF / "clinical" / "paper.yaml")


def _cohort(n: int = 300, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({"age": rng.normal(64, 9, n), "noise": rng.normal(0, 1, n),
                      "stage": rng.choice(["I", "II", "III"], n),
                      "sex": rng.choice(["F", "M"], n)})
    logit = 1.2 * (X["age"] - 64) / 9 + (X["stage"] == "III") * 1.5
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int).to_numpy()
    X.loc[X.index[:10], "age"] = np.nan
    return X, y


def test_screen_keeps_related_variables_only() -> None:
    X, y = _cohort()
    screen = UnivariateScreen(numeric=["age", "noise"], categorical=["stage", "sex"],
                              p_threshold=0.05).fit(X, y)
    assert screen.numeric_ == ["age"]
    assert screen.categorical_ == ["stage"]
    assert list(screen.transform(X).columns) == ["age", "stage"]
    assert not screen.fallback_


def test_screen_falls_back_to_the_best_variable_and_keeps_forced_columns() -> None:
    X, y = _cohort()
    X = X.assign(**{SIGNATURE: np.zeros(len(X))})
    noise_only = UnivariateScreen(numeric=["noise", SIGNATURE], categorical=["sex"],
                                  p_threshold=1e-12, keep=[SIGNATURE]).fit(X, y)
    assert noise_only.fallback_
    assert len(noise_only.numeric_ + noise_only.categorical_) == 2
    assert SIGNATURE in noise_only.numeric_


def test_backward_aic_drops_uninformative_variables() -> None:
    X, y = _cohort(n=600)
    screen = UnivariateScreen(numeric=["age", "noise"], categorical=["stage", "sex"],
                              p_threshold=None, backward_aic=True).fit(X, y)
    assert "age" in screen.numeric_
    assert "stage" in screen.categorical_
    assert "noise" not in screen.numeric_
    aics = [aic for _, aic in screen.aic_path_]
    assert aics == sorted(aics, reverse=True)  # every step lowered the AIC
    assert len(screen.aic_path_[0][0]) == 4


def test_pipeline_refits_the_screen_per_fit() -> None:
    X, y = _cohort()
    model = clinical_pipeline(CFG, numeric=["age", "noise"], categorical=["stage", "sex"])
    model.fit(X, y)
    assert model.named_steps["screen"].numeric_ == ["age"]
    proba = model.predict_proba(X)[:, 1]
    assert ((proba > 0) & (proba < 1)).all()
    shuffled = np.random.default_rng(1).permutation(y)
    again = clinical_pipeline(CFG, numeric=["age", "noise"], categorical=["stage", "sex"])
    assert again.fit(X, shuffled).named_steps["screen"].numeric_ != ["age"] or \
        again.named_steps["screen"].categorical_ != ["stage"]


def test_selected_model_chains_dlr_into_the_combined_model() -> None:
    X, y = _cohort()
    deep = pd.DataFrame({"dl_0000": y + np.random.default_rng(2).normal(0, 1, len(y))},
                        index=X.index)
    dlr = clinical_pipeline({**CFG, "screening_p": None}, numeric=["dl_0000"],
                            categorical=[]).fit(deep, y)
    combined_X = X.assign(**{SIGNATURE: signature(dlr.predict_proba(deep)[:, 1], clip=0.01)})
    clinical = clinical_pipeline(CFG, numeric=["age", "noise", SIGNATURE],
                                 categorical=["stage", "sex"], keep=[SIGNATURE]).fit(combined_X, y)
    model = SelectedModel(feature_set="combined", image={"dlr": dlr}, clinical=clinical,
                          threshold=0.4, image_features={"dlr": ["dl_0000"]},
                          clinical_features=["age", "noise", "stage", "sex"]).fit(None)
    inputs = pd.concat([deep, X], axis=1)
    np.testing.assert_allclose(model.predict_proba(inputs)[:, 1],
                               clinical.predict_proba(combined_X)[:, 1])
    assert set(np.unique(model.predict(inputs))) <= {0, 1}
    with pytest.raises(ValueError, match="missing 1 column"):
        model.predict_proba(inputs.drop(columns=["stage"]))
