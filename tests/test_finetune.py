"""Backbone fine-tuning: training-patients only, best checkpoint, determinism, cache keys."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pdl1exp import pipeline
from pdl1exp.data.manifest import load_cohort
from pdl1exp.data.splits import assign_splits
from pdl1exp.features import extract as extract_module
from pdl1exp.features import finetune as finetune_module
from pdl1exp.features.backbones import build_backbone
from pdl1exp.features.extract import extract_features, feature_key
from pdl1exp.features.extractor import DeepFeatureExtractor
from pdl1exp.features.finetune import finetune_backbone, finetune_spec, read_summary, state_sha
from pdl1exp.features.weights import NEUTRAL_MEAN, NEUTRAL_STD, load_weights
from pdl1exp.imaging.preprocess import build_transforms

SMALL = ["backbone=resnet18_2d", "backbone.input_size=[32,32]", "backbone.precision=32-true",
         "backbone.batch_size=4", "backbone.num_workers=0"]
TUNE = [*SMALL, "backbone.finetune.enabled=true", "backbone.finetune.max_epochs=2",
        "backbone.finetune.batch_size=4", "backbone.finetune.val_fraction=0.25"]


@pytest.fixture(scope="module")
def cohort(tiny_cohort: Path) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """ROIs of the patients with a mask, their labels and a stratified train/test split."""
    table = load_cohort(tiny_cohort).table
    table = table[table["mask"].notna()]
    rois = table[["image", "mask", "image_sha"]].assign(mask_key=table["mask_sha"])
    return rois, table["label"], assign_splits(table, test_size=0.3, seed=0)


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
    assert summary["n_fit"] + summary["n_val"] == 8
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

    monkeypatch.setattr(extract_module, "finetune_backbone", never)
    monkeypatch.setattr(DeepFeatureExtractor, "forward", never)
    hit = _extract(cfg, rois, tmp_path / "a", train_labels=train_labels)
    assert hit.cache_hit
    assert (hit.key, hit.weights_tag, hit.finetune) == (first.key, first.weights_tag,
                                                        first.finetune)


def test_cache_key_tracks_split_labels_and_config(compose_cfg, cohort) -> None:
    rois, labels, splits = cohort
    cfg = compose_cfg(*TUNE)
    train = labels[splits == "train"]

    def key(backbone, train_labels):
        spec = finetune_spec(backbone.finetune, train_labels=train_labels, seed=0,
                             patients=rois.index)
        return feature_key(rois, preprocess=cfg.preprocess, roi=cfg.roi, backbone=backbone,
                           weights_tag="random:0", precision="32-true", tta_views=1,
                           finetune=spec)

    base = key(cfg.backbone, train)
    other_split = labels[labels.index.isin([*train.index[1:], splits.index[splits == "test"][0]])]
    flipped = train.where(train.index != train.index[0], 1 - train.iloc[0])
    slower = OmegaConf.merge(cfg.backbone, {"finetune": {"lr": 1e-5}})
    variants = {key(cfg.backbone, other_split), key(cfg.backbone, flipped),
                key(slower, train), key(cfg.backbone, train.iloc[1:])}
    assert base == key(cfg.backbone, train.sample(frac=1.0, random_state=0))  # order-free
    assert base not in variants
    assert len(variants) == 4
    # Disabled, the fine-tuning settings and the labels never reach the key.
    off = OmegaConf.merge(cfg.backbone, {"finetune": {"enabled": False}})
    off_slower = OmegaConf.merge(off, {"finetune": {"lr": 1e-5}})
    assert key(off, train) == key(off_slower, flipped) == key(off, None) != base


def test_disabled_finetuning_leaves_extraction_unchanged(compose_cfg, cohort, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    rois, labels, splits = cohort
    cfg = compose_cfg(*SMALL)
    plain = _extract(cfg, rois.head(3), tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("fine-tuning is disabled")

    monkeypatch.setattr(extract_module, "finetune_backbone", never)
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


@pytest.mark.slow
def test_pipeline_finetunes_on_training_patients_only(compose_cfg, cohort, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    rois, labels, _ = cohort
    cfg = compose_cfg(*TUNE, "feature_sets=[dlr]", f"paths.cache_dir={tmp_path}")
    table = pd.DataFrame({"label": labels, "center": "", "split": None})
    splits = assign_splits(table, test_size=cfg.dataset.test_size, seed=cfg.seed)
    seen: list[str] = []

    class StopError(Exception):
        """Raised once the fit data is known: no need to train."""

    class Spy(finetune_module.FineTuneDataModule):
        def __init__(self, fit_items, val_items, *args, **kwargs) -> None:
            seen.extend(item["patient_id"] for item in [*fit_items, *val_items])
            raise StopError

    monkeypatch.setattr(finetune_module, "FineTuneDataModule", Spy)
    with pytest.raises(StopError):
        pipeline._fit_models(cfg, SimpleNamespace(), rois, table, splits)
    assert sorted(seen) == sorted(splits.index[splits == "train"])
    assert not set(seen) & set(splits.index[splits != "train"])
