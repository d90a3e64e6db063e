"""Backbone fine-tuning: cross-fitted over the CV folds, best checkpoint, determinism, keys."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pdl1exp.data.manifest import load_cohort
from pdl1exp.data.splits import assign_splits
from pdl1exp.features import extract as extract_module
from pdl1exp.features import finetune as finetune_module
from pdl1exp.features.backbones import build_backbone
from pdl1exp.features.extract import extract_features, feature_key
from pdl1exp.features.extractor import DeepFeatureExtractor
from pdl1exp.features.finetune import (
    FineTuneModule,
    finetune_backbone,
    finetune_curves_figure,
    finetune_spec,
    read_summary,
    state_sha,
    training_folds,
)
from pdl1exp.features.weights import NEUTRAL_MEAN, NEUTRAL_STD, load_weights
from pdl1exp.imaging.preprocess import build_transforms
from pdl1exp.models.tuning import prepare_folds

SMALL = ["backbone=resnet18_2d", "backbone.input_size=[32,32]", "backbone.precision=32-true",
         "backbone.batch_size=4", "backbone.num_workers=0"]
TUNE = [*SMALL, "backbone.finetune.enabled=true", "backbone.finetune.max_epochs=2",
        "backbone.finetune.batch_size=4", "backbone.finetune.val_fraction=0.25"]


@pytest.fixture(scope="module")
def cohort(tiny_cohort: Path) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """ROIs of the patients with a mask, their labels and a stratified train/test split
    (9 training patients: each of two folds leaves two of each class to fine-tune on)."""
    table = load_cohort(tiny_cohort).table
    table = table[table["mask"].notna()]
    rois = table[["image", "mask", "image_sha"]].assign(mask_key=table["mask_sha"])
    return rois, table["label"], assign_splits(table, test_size=0.2, seed=0)


def _net(seed: int = 0) -> torch.nn.Module:
    net = build_backbone(name="resnet18", spatial_dims=2, in_channels=3)
    load_weights(net, weights="random", seed=seed, arch="resnet18")
    return net


def _finetune(cfg, cohort, folder: Path, net: torch.nn.Module) -> tuple[torch.nn.Module, dict]:
    rois, labels, splits = cohort
    train = splits.index[splits == "train"]
    p = cfg.preprocess
    transform = build_transforms(spacing_mm=p.spacing_mm, axcodes=p.axcodes,
                                 window_width=p.window_width, window_level=p.window_level,
                                 roi=instantiate(cfg.roi))
    items = [{"patient_id": pid, "image": rois.at[pid, "image"], "mask": rois.at[pid, "mask"]}
             for pid in train]
    return finetune_backbone(net, items_train=items, labels=labels.loc[train].to_numpy(),
                             transform=transform, cfg_finetune=cfg.backbone.finetune, seed=0,
                             checkpoint_dir=folder, mean=NEUTRAL_MEAN, std=NEUTRAL_STD)


def test_finetuning_trains_all_but_the_frozen_stem(compose_cfg, cohort, tmp_path: Path) -> None:
    cfg = compose_cfg(*TUNE, "backbone.finetune.freeze_stem=true")
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    tuned, summary = _finetune(cfg, cohort, tmp_path / "ckpt", net)
    after = tuned.state_dict()
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    stem = [k for k in before if k.startswith(("conv1.", "bn1.", "layer1."))]
    assert stem
    assert all(torch.equal(before[k], after[k]) for k in stem)  # BN statistics too
    for name in ("layer4.1.conv2.weight", "layer4.1.bn2.running_mean"):
        assert not torch.equal(before[name], after[name]), name
    assert all(p.requires_grad for p in tuned.parameters())
    assert summary["epochs"] == 2
    assert summary["n_fit"] + summary["n_val"] == 9
    assert 0.0 <= summary["val_auc"] <= 1.0
    assert np.isfinite(summary["best_val_loss"])
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint.is_file()
    assert checkpoint.parent == tmp_path / "ckpt"
    assert read_summary(tmp_path / "ckpt") == summary
    assert summary["weights_sha"] == state_sha(tuned) != state_sha(_net())


def test_early_stopping_returns_the_best_checkpoint(compose_cfg, cohort, tmp_path: Path) -> None:
    # Too large a step for this tiny set: the validation loss soon stops improving.
    cfg = compose_cfg(*TUNE, "backbone.finetune.max_epochs=30", "backbone.finetune.patience=1",
                      "backbone.finetune.lr=0.01", "backbone.finetune.augment=false")
    tuned, summary = _finetune(cfg, cohort, tmp_path, _net())
    assert summary["epochs"] < 30
    assert summary["epochs"] == summary["best_epoch"] + 2  # best, then one without improvement
    saved = torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)
    assert saved["epoch"] == summary["best_epoch"]
    prefix = "encoder.backbone."
    best = {k.removeprefix(prefix): v for k, v in saved["state_dict"].items()
            if k.startswith(prefix)}
    assert best.keys() == tuned.state_dict().keys()
    assert all(torch.equal(v, best[k]) for k, v in tuned.state_dict().items())


def _extract(cfg, rois, folder, **kwargs):
    if "train_labels" in kwargs and "folds" not in kwargs:
        kwargs["folds"] = training_folds(kwargs["train_labels"], cv_folds=2, random_state=0)
    return extract_features(rois, preprocess=cfg.preprocess, roi=cfg.roi, backbone=cfg.backbone,
                            seed=0, cache_dir=folder, devices=1, **kwargs)


def test_finetuned_extraction_is_deterministic_and_cached(compose_cfg, cohort, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    rois, labels, splits = cohort
    train_labels = labels[splits == "train"]
    cfg = compose_cfg(*TUNE)
    first = _extract(cfg, rois, tmp_path / "a", train_labels=train_labels)
    again = _extract(cfg, rois, tmp_path / "b", train_labels=train_labels)
    assert re.fullmatch(r"random:0\+finetuned:[0-9a-f]{12}", first.weights_tag)
    assert first.weights_tag == again.weights_tag  # same seed, same weights
    np.testing.assert_array_equal(first.table.to_numpy(), again.table.to_numpy())
    assert first.finetune["weights_sha"] != state_sha(_net())
    plain = _extract(compose_cfg(*SMALL), rois, tmp_path / "a")
    assert plain.key != first.key
    assert not np.allclose(plain.table.to_numpy(), first.table.to_numpy())

    def never(*args, **kwargs):
        raise AssertionError("a cache hit must neither fine-tune nor run the network")

    monkeypatch.setattr(extract_module, "crossfit_finetune", never)
    monkeypatch.setattr(DeepFeatureExtractor, "forward", never)
    hit = _extract(cfg, rois, tmp_path / "a", train_labels=train_labels)
    assert hit.cache_hit
    assert (hit.key, hit.weights_tag, hit.finetune) == (first.key, first.weights_tag,
                                                        first.finetune)


def test_cache_key_tracks_split_labels_and_config(compose_cfg, cohort) -> None:
    rois, labels, splits = cohort
    cfg = compose_cfg(*TUNE)
    train = labels[splits == "train"]

    def key(backbone, train_labels, random_state=0):
        folds = training_folds(train_labels, cv_folds=2, random_state=random_state)
        spec = finetune_spec(backbone.finetune, train_labels=train_labels, folds=folds, seed=0,
                             patients=rois.index)
        return feature_key(rois, preprocess=cfg.preprocess, roi=cfg.roi, backbone=backbone,
                           weights_tag="random:0", precision="32-true", tta_views=1,
                           finetune=spec)

    base = key(cfg.backbone, train)
    other_split = labels[labels.index.isin([*train.index[1:], splits.index[splits == "test"][0]])]
    flipped = train.where(train.index != train.index[0], 1 - train.iloc[0])
    slower = OmegaConf.merge(cfg.backbone, {"finetune": {"lr": 1e-5}})
    variants = {key(cfg.backbone, other_split), key(cfg.backbone, flipped),
                key(slower, train), key(cfg.backbone, train.iloc[1:]),
                key(cfg.backbone, train, random_state=1)}  # other folds
    assert base not in variants
    assert len(variants) == 5
    # Disabled, the fine-tuning settings and the labels never reach the key.
    off = OmegaConf.merge(cfg.backbone, {"finetune": {"enabled": False}})
    off_slower = OmegaConf.merge(off, {"finetune": {"lr": 1e-5}})
    assert key(off, train) == key(off_slower, flipped) != base


def test_disabled_finetuning_leaves_extraction_unchanged(compose_cfg, cohort, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    rois, labels, splits = cohort
    cfg = compose_cfg(*SMALL)
    plain = _extract(cfg, rois.head(3), tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("fine-tuning is disabled")

    monkeypatch.setattr(extract_module, "crossfit_finetune", never)
    same = _extract(cfg, rois.head(3), tmp_path, train_labels=labels[splits == "train"])
    assert same.cache_hit
    assert (same.key, same.weights_tag, same.finetune) == (plain.key, "random:0", None)


def test_finetuning_needs_training_labels_of_both_classes(compose_cfg, cohort,
                                                         tmp_path: Path) -> None:
    rois, labels, _ = cohort
    cfg = compose_cfg(*TUNE)
    with pytest.raises(ValueError, match="train_labels"):
        _extract(cfg, rois, tmp_path)
    with pytest.raises(ValueError, match="without an ROI"):
        _extract(cfg, rois.iloc[1:], tmp_path, train_labels=labels)
    one_class = labels[labels == 1]
    with pytest.raises(ValueError, match="two training patients of each class"):
        _extract(cfg, rois, tmp_path, train_labels=one_class)


def test_training_folds_are_the_downstream_cv_folds(cohort) -> None:
    _, labels, splits = cohort
    train = labels[splits == "train"]
    X = pd.DataFrame({"x": np.arange(len(train), dtype=float)}, index=train.index)
    tuning = {"cv_folds": 2, "random_state": 3}
    selection = {"steps": {"scale": {"_target_": "sklearn.preprocessing.StandardScaler"}}}
    shared = prepare_folds(X, train.to_numpy(), selection_cfg=selection, tuning_cfg=tuning)
    folds = training_folds(train, cv_folds=2, random_state=3)
    assert [list(train.index[fold.val_index]) for fold in shared.folds] == [
        list(folds.index[folds == k]) for k in range(2)]
    assert not training_folds(train, cv_folds=2, random_state=4).equals(folds)


def test_no_training_patient_is_embedded_by_a_network_that_saw_its_label(
        compose_cfg, cohort, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rois, labels, splits = cohort
    train_labels = labels[splits == "train"]
    folds = training_folds(train_labels, cv_folds=2, random_state=0)
    trained_on: dict[int, set[str]] = {}  # id(backbone) -> patients whose labels it fitted
    pending: list[set[str]] = []
    embedded: dict[str, list[tuple[int, np.ndarray]]] = {}

    class SpyData(finetune_module.FineTuneDataModule):
        def __init__(self, fit_items, val_items, *args, **kwargs) -> None:
            pending.append({item["patient_id"] for item in [*fit_items, *val_items]})
            super().__init__(fit_items, val_items, *args, **kwargs)

    class SpyModule(FineTuneModule):
        def __init__(self, encoder, **kwargs) -> None:
            trained_on[id(encoder.backbone)] = pending.pop()
            super().__init__(encoder, **kwargs)

    predict_step = DeepFeatureExtractor.predict_step
    predict_start = DeepFeatureExtractor.on_predict_start
    network: dict[int, int] = {}  # id(extractor) -> id(the network it was given)

    def spy_start(self):  # before the batch norms are folded into a copy
        network[id(self)] = id(self.backbone)
        predict_start(self)

    def spy_predict(self, batch, batch_idx):
        out = predict_step(self, batch, batch_idx)
        for pid, row in zip(out["patient_id"], out["features"].numpy(), strict=True):
            embedded.setdefault(pid, []).append((network[id(self)], row))
        return out

    monkeypatch.setattr(finetune_module, "FineTuneDataModule", SpyData)
    monkeypatch.setattr(finetune_module, "FineTuneModule", SpyModule)
    monkeypatch.setattr(DeepFeatureExtractor, "predict_step", spy_predict)
    monkeypatch.setattr(DeepFeatureExtractor, "on_predict_start", spy_start)
    result = _extract(compose_cfg(*TUNE), rois, tmp_path, train_labels=train_labels, folds=folds)

    train = set(train_labels.index)
    assert len(trained_on) == 3  # two fold networks and the full one
    for pid in rois.index:
        row = result.table.loc[pid].filter(like="dl_").to_numpy()
        (source,) = [net for net, feats in embedded[pid] if np.array_equal(feats, row)]
        if pid in train:
            assert pid not in trained_on[source]
            assert trained_on[source] == set(folds.index[folds != folds[pid]])
        else:
            assert trained_on[source] == train
    summary = result.finetune
    assert summary["folds"] == {p: int(k) for p, k in folds.items()}
    assert set(summary["networks"]) == {"fold0", "fold1", "full"}
    for net_summary in summary["networks"].values():
        curves = net_summary["curves"]
        assert [c["epoch"] for c in curves] == list(range(net_summary["epochs"]))
        assert all({"train_loss", "val_loss", "val_auc"} <= c.keys() for c in curves)
    assert -1.0 <= summary["alignment"]["median_r"] <= 1.0
    assert finetune_curves_figure(summary, tmp_path / "curves.png").stat().st_size > 0
