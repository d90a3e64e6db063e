"""ICC reproducibility filter: equal to pingouin, keeps stable features, sees training rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from pdl1exp.models import reproducibility
from pdl1exp.models.reproducibility import ICC_TYPES, ICCFilter, icc
from pdl1exp.models.selection import SelectionFallbackWarning, build_selection

PINGOUIN_NAMES = {"ICC1": "ICC(1,1)", "ICC2": "ICC(A,1)", "ICC3": "ICC(C,1)"}
N_TRAIN, N_TEST = 40, 10


@parametrize_with_checks([ICCFilter()])
def test_sklearn_compatible(estimator, check) -> None:
    check(estimator)


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # inside pingouin 0.7
@pytest.mark.parametrize("icc_type", ICC_TYPES)
def test_vectorised_icc_equals_pingouin(icc_type: str) -> None:
    pingouin = pytest.importorskip("pingouin")
    rng = np.random.default_rng(3)
    n, k, p = 15, 4, 6
    ratings = (rng.normal(size=(n, 1, p)) * rng.uniform(0.1, 3, p)
               + rng.normal(size=(n, k, p)) + rng.normal(size=(1, k, p)))
    expected = []
    for j in range(p):
        long = pd.DataFrame({"subject": np.repeat(np.arange(n), k),
                             "rater": np.tile(np.arange(k), n), "value": ratings[:, :, j].ravel()})
        table = pingouin.intraclass_corr(long, targets="subject", raters="rater",
                                         ratings="value").set_index("Type")
        expected.append(table.loc[PINGOUIN_NAMES[icc_type], "ICC"])
    np.testing.assert_allclose(icc(ratings, icc_type=icc_type), expected, rtol=1e-10)


def _cohort(seed: int = 0) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], np.ndarray]:
    """X (radiomics + one deep feature) and three replicates; test rows are in them too.

    ``rad_stable`` agrees across replicates on the training rows, ``rad_noise`` does not.
    On the test rows ``rad_stable`` is scrambled, so an ICC that saw them would drop it.
    """
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_TEST
    ids = pd.Index([f"P{i:03d}" for i in range(n)], name="patient_id")
    truth = rng.normal(size=n)
    replicates = {}
    for name in ("original", "erode", "dilate"):
        stable = truth + 0.05 * rng.normal(size=n)
        stable[N_TRAIN:] = rng.normal(scale=10, size=N_TEST)
        replicates[name] = pd.DataFrame({"rad_stable": stable, "rad_noise": rng.normal(size=n)},
                                        index=ids)
    X = replicates["original"].assign(dl_0000=rng.normal(size=n))
    y = rng.integers(0, 2, n)
    return X, replicates, y


def test_keeps_stable_drops_noise_passes_deep_features() -> None:
    X, replicates, y = _cohort()
    train = X.iloc[:N_TRAIN]
    step = ICCFilter(replicates=replicates).set_output(transform="pandas").fit(train, y[:N_TRAIN])
    assert list(step.selected_features_) == ["rad_stable", "dl_0000"]
    icc_table = step.icc_.set_index("feature")
    assert icc_table.loc["rad_stable", "icc"] > 0.95
    assert icc_table.loc["rad_noise", "icc"] < 0.3
    assert "dl_0000" not in icc_table.index
    assert step.n_subjects_ == N_TRAIN
    out = step.transform(X.iloc[N_TRAIN:])
    assert list(out.columns) == ["rad_stable", "dl_0000"]
    assert list(out.index) == list(X.index[N_TRAIN:])


def test_fit_sees_training_rows_only(monkeypatch: pytest.MonkeyPatch) -> None:
    X, replicates, y = _cohort()
    seen = []

    def spy(ratings: np.ndarray, *, icc_type: str) -> np.ndarray:
        seen.append(ratings.shape)
        return icc(ratings, icc_type=icc_type)

    monkeypatch.setattr(reproducibility, "icc", spy)
    ICCFilter(replicates=replicates).fit(X.iloc[:N_TRAIN], y[:N_TRAIN])
    assert seen == [(N_TRAIN, 3, 2)]
    # Seeing the scrambled test rows would have dropped the stable feature.
    everyone = ICCFilter(replicates=replicates).fit(X, y)
    assert "rad_stable" not in everyone.selected_features_


def test_keeps_the_most_reproducible_when_none_passes() -> None:
    X, replicates, _ = _cohort()
    X = X[["rad_stable", "rad_noise"]]
    with pytest.warns(SelectionFallbackWarning, match="rad_stable"):
        step = ICCFilter(replicates=replicates, threshold=1.1).fit(X.iloc[:N_TRAIN])
    assert list(step.selected_features_) == ["rad_stable"]


def test_needs_patient_ids_and_two_replicates() -> None:
    X, replicates, _ = _cohort()
    with pytest.raises(TypeError, match="DataFrame indexed by patient id"):
        ICCFilter(replicates=replicates).fit(X.to_numpy())
    with pytest.raises(ValueError, match="at least two replicate"):
        ICCFilter(replicates={"original": replicates["original"]}).fit(X)
    with pytest.raises(ValueError, match="icc_type"):
        ICCFilter(replicates=replicates, icc_type="ICC4").fit(X)


@pytest.mark.filterwarnings("ignore::pdl1exp.models.selection.SelectionFallbackWarning")
def test_robust_preset_runs_with_replicates_set_at_run_time(compose_cfg) -> None:
    cfg = compose_cfg("selection=robust")
    steps = build_selection(OmegaConf.to_container(cfg.selection, resolve=True))
    assert [name for name, _ in steps][:3] == ["icc", "impute", "combat"]
    X, replicates, y = _cohort()
    selection = Pipeline(steps).set_output(transform="pandas")
    selection.set_params(icc__replicates=replicates)
    out = selection.fit(X.iloc[:N_TRAIN], y[:N_TRAIN]).transform(X.iloc[N_TRAIN:])
    assert "rad_noise" not in out.columns
    assert selection.named_steps["icc"].icc_.shape[0] == 2
