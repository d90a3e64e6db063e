"""Tests of pdl1exp.models.nomogram: points scale, ticks and the round trip to probability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from omegaconf import OmegaConf

from pdl1exp.evaluation.figures import nomogram_figure
from pdl1exp.models.clinical import clinical_pipeline
from pdl1exp.models.nomogram import build_nomogram, nomogram_points
from tests.conftest import CONF
from tests.test_clinical import u_shaped_cohort
from tests.test_tables import CATEGORICAL, NUMERIC, clinical_cohort

COLUMNS = {"numeric": NUMERIC, "categorical": CATEGORICAL}


@pytest.fixture
def fitted() -> tuple[object, pd.DataFrame]:
    """The real clinical model config on a cohort with missing values in both kinds."""
    X, y = clinical_cohort(21, n=150)
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "clinical" / "paper.yaml"),
                          {"screening_p": None})  # every variable on the nomogram
    return clinical_pipeline(cfg, **COLUMNS).fit(X, y), X


def test_total_points_map_back_to_the_model_probability(fitted) -> None:
    model, X = fitted
    nomogram = build_nomogram(model, X, n_ticks=5, **COLUMNS)
    points = nomogram_points(nomogram, model, X, **COLUMNS)
    assert list(points.columns) == [*NUMERIC, *CATEGORICAL, "total_points"]
    assert points[X.age.isna()]["age"].nunique() == 1  # the imputed median's points
    np.testing.assert_allclose(nomogram.predict_from_points(points["total_points"]),
                               model.predict_proba(X)[:, 1], rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        nomogram.points_for_probability(nomogram.predict_from_points([5.0, 123.0])),
        [5.0, 123.0])


def test_points_scale_and_axes(fitted) -> None:
    model, X = fitted
    nomogram = build_nomogram(model, X, n_ticks=5, points_max=100, **COLUMNS)
    terms = {t.name: t for t in nomogram.terms}
    assert max(t.max_points for t in nomogram.terms) == pytest.approx(100)
    points = nomogram_points(nomogram, model, X, **COLUMNS)
    assert (points[NUMERIC + CATEGORICAL] >= -1e-9).all().all()
    for name in NUMERIC:
        term = terms[name]
        assert 3 <= len(term.values) <= 7
        present = X[name].between(min(term.values), max(term.values))
        # Reading a patient's value off the tick marks gives their points.
        np.testing.assert_allclose(np.interp(X.loc[present, name], term.values, term.points),
                                   points.loc[present, name], atol=1e-9)
    assert terms["age"].points[0] > terms["age"].points[-1]  # negative coefficient
    histology = terms["histology"]
    assert histology.values == ("adeno", "other", "squamous")
    coef = dict(zip(model.named_steps["columns"].get_feature_names_out(),
                    model.named_steps["classifier"].coef_[0], strict=True))
    adeno, _, squamous = histology.points
    assert min(histology.points) == 0.0  # the lowest contribution scores nothing
    assert adeno - squamous == pytest.approx(-coef["histology_squamous"]
                                             * nomogram.points_per_logit)


def test_points_max_rescales(fitted) -> None:
    model, X = fitted
    small = build_nomogram(model, X, n_ticks=5, points_max=10, **COLUMNS)
    large = build_nomogram(model, X, n_ticks=5, points_max=100, **COLUMNS)
    assert large.points_per_logit == pytest.approx(10 * small.points_per_logit)
    assert large.logit_at_zero == pytest.approx(small.logit_at_zero)


def test_nomogram_figure_written(fitted, tmp_path: Path) -> None:
    model, X = fitted
    nomogram = build_nomogram(model, X, n_ticks=5, **COLUMNS)
    path = nomogram_figure(nomogram, tmp_path / "nomogram.png", dpi=50)
    height, width = imread(path).shape[:2]
    assert width > height > 100  # one row per variable plus points, total, probability


def test_a_spline_axis_turns_back_and_still_maps_to_the_model_probability() -> None:
    """A U-shaped spline effect: the lowest points lie inside the age range, both ends score
    more, and each patient's total points still give the model's probability."""
    X, y = u_shaped_cohort(400, seed=5)
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "clinical" / "paper.yaml"),
                          {"screening_p": None})
    columns = {"numeric": ["age"], "categorical": ["sex"]}
    model = clinical_pipeline(cfg, spline=["age"], **columns).fit(X, y)
    nomogram = build_nomogram(model, X, n_ticks=7, **columns)
    age = next(t for t in nomogram.terms if t.name == "age")
    points = np.asarray(age.points)
    assert points[0] > points.min() < points[-1]
    assert points.min() >= 0
    assert age.max_points == pytest.approx(100)
    grid = np.linspace(X["age"].min(), X["age"].max(), 200)
    on_grid = nomogram_points(nomogram, model, pd.DataFrame({"age": grid, "sex": "F"}),
                              **columns)["age"]
    assert on_grid.min() == pytest.approx(0, abs=0.05)
    assert on_grid.max() == pytest.approx(100, abs=0.05)
    total = nomogram_points(nomogram, model, X, **columns)["total_points"]
    np.testing.assert_allclose(nomogram.predict_from_points(total),
                               model.predict_proba(X)[:, 1], rtol=0, atol=1e-9)
