"""ComBat: removes a planted center shift on rows the fit never saw."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from neuroCombat import neuroCombat
from omegaconf import OmegaConf
from sklearn.pipeline import Pipeline

from pdl1exp.models import harmonization
from pdl1exp.models.harmonization import ComBat, UnseenCenterWarning
from pdl1exp.models.selection import build_selection

SHIFT, SCALE = 3.0, 2.0


def _cohort(n: int = 600, p: int = 5, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """Features of centers A and B; B's scanner adds SHIFT and multiplies by SCALE."""
    rng = np.random.default_rng(seed)
    ids = pd.Index([f"P{i:03d}" for i in range(n)], name="patient_id")
    centers = pd.Series(np.where(np.arange(n) % 2 == 0, "A", "B"), index=ids)
    values = rng.normal(size=(n, p))
    b = (centers == "B").to_numpy()
    values[b] = values[b] * SCALE + SHIFT
    return pd.DataFrame(values, index=ids, columns=[f"rad_{j}" for j in range(p)]), centers


def _gap(X: pd.DataFrame, centers: pd.Series) -> float:
    means = X.groupby(centers.reindex(X.index)).mean()
    return float((means.loc["B"] - means.loc["A"]).abs().max())


def test_removes_a_planted_shift_on_rows_the_fit_never_saw(
        monkeypatch: pytest.MonkeyPatch) -> None:
    X, centers = _cohort()
    train, test = X.iloc[:300], X.iloc[300:]
    fitted_on = []

    def spy(dat, covars, batch_col, **kwargs):
        fitted_on.append(dat.shape[1])  # neuroCombat takes features x samples
        return neuroCombat(dat, covars, batch_col, **kwargs)

    monkeypatch.setattr(harmonization, "neuroCombat", spy)
    step = ComBat(batches=centers).set_output(transform="pandas").fit(train)
    assert fitted_on == [len(train)]
    harmonised = step.transform(test)
    assert list(harmonised.index) == list(test.index)
    assert _gap(test, centers) > SHIFT - 1
    assert _gap(harmonised, centers) < 0.6  # sampling error of 150 vs 150 rows
    sd = harmonised.groupby(centers.reindex(test.index)).std()
    assert float((sd.loc["B"] / sd.loc["A"]).max()) < 1.6
    assert fitted_on == [len(train)]  # transform never refits


def test_training_rows_reproduce_neurocombat() -> None:
    X, centers = _cohort()
    step = ComBat(batches=centers.to_dict()).fit(X)
    frame = pd.DataFrame({"batch": centers.to_numpy()})
    expected = neuroCombat(X.to_numpy().T, frame, "batch")["data"].T
    np.testing.assert_allclose(step.transform(X), expected, atol=1e-10)


def test_unseen_center_is_an_error_or_left_pooled() -> None:
    X, centers = _cohort()
    centers.iloc[-5:] = "C"
    train, external = X.iloc[:300], X.iloc[-5:]
    with pytest.raises(ValueError, match=r"\['C'\].*P595"):
        ComBat(batches=centers).fit(train).transform(external)
    step = ComBat(batches=centers, unseen="pooled").fit(train)
    with pytest.warns(UnseenCenterWarning, match="left unharmonised"):
        out = step.transform(external)
    np.testing.assert_allclose(out, external.to_numpy())


def test_patient_without_center_is_named() -> None:
    X, centers = _cohort()
    with pytest.raises(ValueError, match="'P007'"):
        ComBat(batches=centers.drop("P007")).fit(X)
    with pytest.raises(ValueError, match="batches"):
        ComBat().fit(X)


def test_constant_feature_passes_through() -> None:
    X, centers = _cohort()
    X["rad_constant"] = 1.0
    step = ComBat(batches=centers).fit(X)
    assert list(step.harmonized_) == [True] * 5 + [False]
    np.testing.assert_array_equal(step.transform(X)[:, -1], 1.0)


@pytest.mark.filterwarnings("ignore::pdl1exp.models.selection.SelectionFallbackWarning")
def test_robust_preset_with_combat_enabled(compose_cfg) -> None:
    cfg = compose_cfg("selection=robust", "selection.steps.combat="
                      "{_target_: pdl1exp.models.harmonization.ComBat, unseen: pooled}")
    X, centers = _cohort()
    y = np.tile([0, 1, 1, 0], len(X) // 4)
    selection = Pipeline(build_selection(OmegaConf.to_container(cfg.selection, resolve=True)))
    selection.set_output(transform="pandas").set_params(combat__batches=centers)
    selection.fit(X.iloc[:80], y[:80])
    assert selection.named_steps["combat"].n_rows_per_center_ == {"A": 40, "B": 40}
    assert len(selection.transform(X.iloc[80:120])) == 40
