"""Grad-CAM of the backbone under the DLR model's linear score: maps, overlays, heat mass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pdl1exp.data.manifest import load_cohort
from pdl1exp.features.backbones import build_backbone
from pdl1exp.features.explain import (
    LinearHead,
    LinearScore,
    explained_class,
    gradcam_maps,
    gradcam_overlays,
    heat_mass_inside,
    linear_head,
)
from pdl1exp.features.extractor import DeepFeatureExtractor
from pdl1exp.features.weights import NEUTRAL_MEAN, NEUTRAL_STD, load_weights
from pdl1exp.models.selection import LassoSelector


@pytest.fixture(scope="module")
def rois(tiny_cohort: Path) -> pd.DataFrame:
    table = load_cohort(tiny_cohort).table
    table = table[table["mask"].notna()].head(4)
    return table[["image", "mask", "image_sha"]].assign(mask_key=table["mask_sha"])


def _blob_score(seed: int, size: int, centre: tuple[int, int], background: float = NEUTRAL_MEAN[0],
                ) -> tuple[LinearScore, torch.Tensor, torch.Tensor]:
    """A random ResNet18, a head that responds to a bright disk at ``centre``, the image and
    the image without the disk.

    At the default background (the input mean) the background normalises to zero, like the
    convolutions' zero padding: the network's activations there are zero, and only the disk
    can draw heat. A background of 0 (a masked crop's) normalises to a non-zero input.
    """
    net = build_backbone(name="resnet18", spatial_dims=2, in_channels=3)
    load_weights(net, weights="random", seed=seed, arch="resnet18")
    blank = torch.full((1, 3, size, size), background)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image = blank.clone()
    image[:, :, (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= (size // 10) ** 2] = 1.0
    encoder = DeepFeatureExtractor(net, mean=NEUTRAL_MEAN, std=NEUTRAL_STD, channels_last=False)
    with torch.no_grad():
        weight = (encoder(image) - encoder(blank))[0]
    return LinearScore(net, weight=weight, mean=NEUTRAL_MEAN, std=NEUTRAL_STD).eval(), image, blank


def _quadrant_masses(heat: np.ndarray) -> np.ndarray:
    """Share of the heat in each quadrant of a square map, ``[[top-left, top-right], ...]``."""
    half = heat.shape[0] // 2
    quadrants = np.zeros((2, 2, *heat.shape), dtype=bool)
    for i in range(2):
        for j in range(2):
            quadrants[i, j, i * half:(i + 1) * half, j * half:(j + 1) * half] = True
    return np.array([[heat_mass_inside(heat, quadrants[i, j]) for j in range(2)]
                     for i in range(2)])


@pytest.mark.parametrize("seed", [0, 1])
def test_heat_concentrates_on_the_blob_the_head_responds_to(seed: int) -> None:
    size = 64
    model, image, _ = _blob_score(seed, size, centre=(48, 16))
    with torch.no_grad():
        assert model(image)[0, 0] > 0  # the image argues for "positive": the map explains it
    heat = gradcam_maps(model, image, target_layer="layer2")[0]
    assert heat.shape == (size, size)
    assert (heat >= 0).all()
    mass = _quadrant_masses(heat)
    assert mass.sum() == pytest.approx(1.0)
    assert mass[1, 0] > 0.5  # the blob's quadrant; a uniform map gives 0.25
    assert mass[1, 0] > 2 * max(mass[0, 0], mass[0, 1], mass[1, 1])  # not transposed/flipped


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_keeps_the_heat_on_the_blob_over_a_background_that_is_not_neutral(
        seed: int) -> None:
    model, image, blank = _blob_score(seed, 64, centre=(48, 16), background=0.0)
    plain = _quadrant_masses(gradcam_maps(model, image, target_layer="layer2")[0])
    relative = gradcam_maps(model, image, target_layer="layer2", reference=blank)[0]
    assert plain[1, 0] < 0.4  # the background's activations draw heat: near uniform (0.25)
    mass = _quadrant_masses(relative)
    assert mass.sum() == pytest.approx(1.0)
    assert mass[1, 0] > 0.6
    assert mass[1, 0] > 2 * max(mass[0, 0], mass[0, 1], mass[1, 1])
    # Where the image is its reference, nothing differs: no heat anywhere.
    assert not gradcam_maps(model, blank, target_layer="layer2", reference=blank).any()


def test_with_a_reference_the_map_explains_how_the_crop_moves_the_score() -> None:
    model, image, blank = _blob_score(0, 64, centre=(48, 16), background=0.0)
    with torch.no_grad():
        raw = float(model(image)[0, 0])
    shifted = LinearScore(model.encoder.backbone, weight=model.head.weight[0].detach(),
                          mean=NEUTRAL_MEAN, std=NEUTRAL_STD, offset=raw + 1.0).eval()
    assert explained_class(shifted, image) == 1  # the crop argues for "negative"...
    assert explained_class(shifted, image, blank) == 0  # ...yet the blob raises its score
    heat = gradcam_maps(shifted, image, target_layer="layer2", reference=blank)[0]
    assert _quadrant_masses(heat)[1, 0] > 0.6


def test_heat_mass_inside() -> None:
    heat = np.array([[0.0, 1.0], [3.0, 0.0]])
    assert heat_mass_inside(heat, heat > 2) == pytest.approx(0.75)
    assert np.isnan(heat_mass_inside(np.zeros((2, 2)), heat > 2))


def _data(n: int = 60) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(n, 6)) * [1, 2, 3, 4, 5, 6] + 10,
                     columns=[f"dl_{i:04d}" for i in range(6)])
    signal = (X["dl_0001"] - 10) / 2 - (X["dl_0004"] - 10) / 5
    y = (signal + rng.normal(size=n) > 0).astype(int).to_numpy()
    return X, y


def _pipeline(classifier) -> Pipeline:
    return Pipeline([("scale", StandardScaler()),
                     ("lasso", LassoSelector(cv=3, n_lambdas=8, random_state=0)),
                     ("classifier", classifier)]).set_output(transform="pandas")


def test_linear_head_is_the_exact_logit_of_a_linear_classifier() -> None:
    X, y = _data()
    model = _pipeline(LogisticRegression()).fit(X, y)
    head = linear_head(model)
    assert head.source == "classifier"
    assert list(head.weights.index) == list(model["lasso"].selected_features_)
    score = X[head.weights.index].to_numpy() @ head.weights.to_numpy() - head.offset
    intercept = model.decision_function(X) - score
    np.testing.assert_allclose(intercept, model["classifier"].intercept_[0], atol=1e-9)
    assert abs(score.mean()) < 1e-9  # centred on the average training patient


def test_linear_head_falls_back_to_the_lasso_surrogate() -> None:
    X, y = _data()
    model = _pipeline(RandomForestClassifier(n_estimators=5, random_state=0)).fit(X, y)
    head = linear_head(model)
    assert head.source == "lasso"
    lasso, scale = model["lasso"], model["scale"]
    sd = pd.Series(scale.scale_, index=scale.feature_names_in_)
    np.testing.assert_allclose(head.weights.to_numpy(),
                               lasso.coef_ / sd[head.weights.index].to_numpy())
    no_lasso = Pipeline([("scale", StandardScaler()),
                         ("classifier", RandomForestClassifier(n_estimators=5))]).fit(X, y)
    with pytest.raises(ValueError, match="not linear"):
        linear_head(no_lasso)


@pytest.mark.parametrize("overrides", [
    ["backbone=resnet18_2d", "backbone.input_size=[64,64]"],
    ["backbone=resnet18_3d", "backbone.input_size=[48,48,48]"],
])
def test_overlays_are_written_with_pseudonyms_and_heat_fractions(
        compose_cfg, rois, tmp_path: Path, overrides: list[str]) -> None:
    cfg = compose_cfg(*overrides, "backbone.weights=random")
    rng = np.random.default_rng(0)
    head = LinearHead(weights=pd.Series(rng.normal(size=8),
                                        index=[f"dl_{i:04d}" for i in range(0, 80, 10)]),
                      offset=0.0, source="lasso")
    alias = {pid: f"anon{k}" for k, pid in enumerate(rois.index)}
    result = gradcam_overlays(rois, preprocess=cfg.preprocess, roi=cfg.roi,
                              backbone=cfg.backbone, seed=0, head=head, n=3,
                              out_dir=tmp_path / "explain", name=alias.__getitem__)
    assert len(result) == 3
    assert set(result.index) <= set(alias.values())
    assert not any(pid in " ".join(result.path) for pid in rois.index)
    for path in result.path:
        with Image.open(path) as png:
            assert png.size[0] > 100
    assert result.heat_mass_inside.notna().any()
    assert result.heat_mass_inside.dropna().between(0.0, 1.0).all()
    assert set(result.explains) <= {"positive", "negative"}
    # The map explains how the tumour moves the score away from the blanked crop's.
    assert ((result.score >= result.reference_score) == (result.explains == "positive")).all()
    assert result.area_inside.between(0.0, 1.0).all()
    assert (result.source == "lasso").all()
    every = gradcam_overlays(rois, preprocess=cfg.preprocess, roi=cfg.roi,
                             backbone=cfg.backbone, seed=0, head=head, n=10,
                             out_dir=tmp_path / "all")
    assert sorted(every.index) == sorted(rois.index)  # n above the ROIs: all of them
    back = {v: k for k, v in alias.items()}
    np.testing.assert_allclose(every.loc[[back[a] for a in result.index], "heat_mass_inside"],
                               result.heat_mass_inside)  # deterministic


def test_overlays_reference_is_checked_and_can_be_turned_off(compose_cfg, rois,
                                                             tmp_path: Path) -> None:
    cfg = compose_cfg("backbone=resnet18_2d", "backbone.input_size=[64,64]",
                      "backbone.weights=random")
    head = LinearHead(weights=pd.Series([1.0, -1.0], index=["dl_0001", "dl_0002"]),
                      offset=0.0, source="lasso")
    kwargs = {"preprocess": cfg.preprocess, "roi": cfg.roi, "backbone": cfg.backbone,
              "seed": 0, "head": head, "n": 2}
    with pytest.raises(ValueError, match="gradcam_reference must be one of"):
        gradcam_overlays(rois, out_dir=tmp_path / "bad", reference="blank", **kwargs)
    plain = gradcam_overlays(rois, out_dir=tmp_path / "plain", reference="none", **kwargs)
    relative = gradcam_overlays(rois, out_dir=tmp_path / "rel", **kwargs)
    assert list(plain.index) == list(relative.index)
    assert plain.heat_mass_inside.dropna().between(0.0, 1.0).all()
    assert plain.reference_score.isna().all()
    assert ((plain.score >= 0) == (plain.explains == "positive")).all()  # the argued class
    assert not np.allclose(plain.heat_mass_inside, relative.heat_mass_inside)


def test_a_rerun_copies_the_kept_overlays_and_a_changed_head_maps_again(
        compose_cfg, rois, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pdl1exp.features import explain

    cfg = compose_cfg("backbone=resnet18_2d", "backbone.input_size=[64,64]",
                      "backbone.weights=random")
    head = LinearHead(weights=pd.Series([1.0, -1.0], index=["dl_0001", "dl_0002"]),
                      offset=0.0, source="lasso")
    kwargs = {"preprocess": cfg.preprocess, "roi": cfg.roi, "backbone": cfg.backbone,
              "seed": 0, "n": 3, "cache_dir": tmp_path / "cache"}
    first = gradcam_overlays(rois, head=head, out_dir=tmp_path / "first", **kwargs)

    def no_mapping(*args, **kw):
        raise AssertionError("a kept overlay was mapped again")

    with monkeypatch.context() as patch:
        patch.setattr(explain, "gradcam_maps", no_mapping)
        again = gradcam_overlays(rois, head=head, out_dir=tmp_path / "again", **kwargs)
        # Settings that do not change the network's outputs keep the overlays.
        other_run = compose_cfg("backbone=resnet18_2d", "backbone.input_size=[64,64]",
                                "backbone.weights=random", "backbone.batch_size=3",
                                "backbone.num_workers=0")
        gradcam_overlays(rois, head=head, out_dir=tmp_path / "batch",
                         **{**kwargs, "backbone": other_run.backbone})
    pd.testing.assert_frame_equal(again.drop(columns="path"), first.drop(columns="path"))
    for old, new in zip(first.path, again.path, strict=True):
        assert Path(new).parent == tmp_path / "again"
        assert Path(new).read_bytes() == Path(old).read_bytes()
    # Another head (or name, network, crop...) is another key: mapped, not read back.
    calls = []
    monkeypatch.setattr(explain, "gradcam_maps",
                        lambda *a, **kw: calls.append(1) or gradcam_maps(*a, **kw))
    other = LinearHead(weights=head.weights * -1.0, offset=0.5, source="lasso")
    changed = gradcam_overlays(rois, head=other, out_dir=tmp_path / "other", **kwargs)
    assert len(calls) == 3
    assert not np.allclose(changed.score, first.score)
    renamed = gradcam_overlays(rois, head=head, out_dir=tmp_path / "renamed",
                               name=lambda pid: f"x{pid}", **kwargs)
    assert len(calls) == 6
    assert all(Path(p).name.startswith("x") for p in renamed.path)
    # A row whose figure is gone is not read back: the patient is mapped again.
    for figure in (tmp_path / "cache").glob("*.png"):
        figure.unlink()
    assert any((tmp_path / "cache").glob("*.json"))
    gradcam_overlays(rois, head=head, out_dir=tmp_path / "redrawn", **kwargs)
    assert len(calls) == 9
