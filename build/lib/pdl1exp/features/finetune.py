"""Optional transfer learning of the backbone on the training patients before extraction."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose, RandFlipd, RandRotate90d
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.utilities.seed import isolate_rng
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from pdl1exp.features.backbones import DenseNetBackbone, ResNetBackbone
from pdl1exp.features.extractor import DeepFeatureExtractor

__all__ = [
    "FineTuneDataModule",
    "FineTuneModule",
    "finetune_backbone",
    "finetune_spec",
    "finetuned_tag",
    "read_summary",
    "state_sha",
]

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
# Augmentation acts in the axial plane: the first two spatial axes of every ROI mode.
_PLANE = (0, 1)


def finetune_spec(cfg_finetune: DictConfig, *, train_labels: pd.Series | None, seed: int,
                  patients: pd.Index) -> dict[str, Any] | None:
    """What determines the fine-tuned weights (for the cache key), or None when disabled.

    Args:
        cfg_finetune: the ``backbone.finetune`` config.
        train_labels: 0/1 labels of the training patients (index patient_id).
        seed: seed of the split, the head, the augmentation and the batch order.
        patients: the patients that have an ROI.
    """
    if not cfg_finetune.enabled:
        return None
    if train_labels is None:
        msg = ("backbone.finetune.enabled=true needs the training patients' labels: pass "
               "train_labels (index patient_id, training split only) to extract_features")
        raise ValueError(msg)
    missing = train_labels.index.difference(patients)
    if len(missing):
        msg = f"train_labels name patients without an ROI: {', '.join(map(str, missing[:5]))}"
        raise ValueError(msg)
    return {"config": OmegaConf.to_container(cfg_finetune, resolve=True), "seed": seed,
            "train": {str(pid): int(label) for pid, label in train_labels.sort_index().items()}}


def finetuned_tag(weights_tag: str, summary: dict[str, Any] | None) -> str:
    """``<tag>+finetuned:<sha12>`` after fine-tuning, the loaded weights' tag otherwise."""
    return f"{weights_tag}+finetuned:{summary['weights_sha']}" if summary else weights_tag


def read_summary(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The summary a finished fine-tuning left in ``checkpoint_dir``, or None."""
    path = Path(checkpoint_dir) / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def state_sha(net: torch.nn.Module) -> str:
    """First 12 hex digits of the sha256 of a state dict (names and tensor bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:12]


def _stem(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The stem and first stage: ``conv1``/``bn1``/``layer1`` (DenseNet: its equivalents)."""
    if isinstance(net, ResNetBackbone):
        return [net.conv1, net.bn1, net.layer1]
    if isinstance(net, DenseNetBackbone):
        return [net.features.conv0, net.features.norm0, net.features.denseblock1]
    msg = f"freeze_stem supports ResNetBackbone and DenseNetBackbone, not {type(net).__name__}"
    raise TypeError(msg)


class FineTuneDataModule(pl.LightningDataModule):
    """Fit and inner-validation ROIs, preprocessed once (MONAI ``CacheDataset``).

    Args:
        fit_items: dictionaries with ``patient_id``, ``image``, ``mask`` and ``label``.
        val_items: the same for the inner validation patients.
        transform: the preprocessing chain producing the ROI crop under ``image``.
        augment: random transforms applied to the fit crops only.
        batch_size: ROIs per optimisation step.
        num_workers: threads preprocessing the ROIs into the cache.
    """

    def __init__(self, fit_items: Sequence[dict], val_items: Sequence[dict], transform: Compose,
                 *, augment: Sequence, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.fit_items = list(fit_items)
        self.val_items = list(val_items)
        # Flattened so that CacheDataset caches every deterministic step before augmentation.
        steps = list(transform.flatten().transforms)
        self.fit_transform = Compose([*steps, *augment])
        self.val_transform = Compose(steps)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.fit_set: CacheDataset | None = None
        self.val_set: CacheDataset | None = None

    def setup(self, stage: str) -> None:
        if self.fit_set is None:
            cache = {"cache_rate": 1.0, "num_workers": self.num_workers, "progress": False}
            self.fit_set = CacheDataset(self.fit_items, self.fit_transform, **cache)
            self.val_set = CacheDataset(self.val_items, self.val_transform, **cache)

    def _loader(self, dataset: CacheDataset, *, shuffle: bool, drop_last: bool) -> DataLoader:
        # In-process: flipping cached crops is cheap, and MONAI's DataLoader then seeds the
        # augmentation from torch's seeded generator, independent of backbone.num_workers.
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle,
                          drop_last=drop_last, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        # A lone last sample would make BatchNorm fail in training mode.
        return self._loader(self.fit_set, shuffle=True,
                            drop_last=len(self.fit_items) % self.batch_size == 1)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, drop_last=False)


class FineTuneModule(pl.LightningModule):
    """Backbone plus a linear head trained with BCE-with-logits; validation loss and AUC.

    Args:
        encoder: the backbone wrapped with its input normalisation.
        embedding_dim: width of the backbone's embedding.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        frozen: submodules of the backbone kept fixed (weights and BatchNorm statistics).
    """

    def __init__(self, encoder: DeepFeatureExtractor, *, embedding_dim: int, lr: float,
                 weight_decay: float, frozen: Sequence[torch.nn.Module] = ()) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(embedding_dim, 1)
        self.lr = lr
        self.weight_decay = weight_decay
        self.frozen = list(frozen)  # a plain list: already registered inside the encoder
        for module in self.frozen:
            module.requires_grad_(False)
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def train(self, mode: bool = True) -> FineTuneModule:
        super().train(mode)
        for module in self.frozen:
            module.train(False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).squeeze(1).float()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labels = batch["label"].float()
        loss = F.binary_cross_entropy_with_logits(self(batch["image"]), labels)
        self.log("train_loss", loss, batch_size=len(labels))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        labels = batch["label"].float()
        logits = self(batch["image"])
        self.log("val_loss", F.binary_cross_entropy_with_logits(logits, labels),
                 batch_size=len(labels))
        self._val.append((logits.detach().cpu(), labels.cpu()))

    def on_validation_epoch_end(self) -> None:
        logits, labels = (torch.cat(parts).numpy() for parts in zip(*self._val, strict=True))
        self.log("val_auc", float(roc_auc_score(labels, logits)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.lr, weight_decay=self.weight_decay)


def _inner_split(items: list[dict], labels: np.ndarray, *, val_fraction: float,
                 seed: int) -> tuple[list[dict], list[dict]]:
    """Label-stratified fit/validation split of the training patients."""
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) != 2 or counts.min() < 2 or not 0 < val_fraction < 1:
        msg = (f"fine-tuning needs 0 < val_fraction < 1 (got {val_fraction}) and at least two "
               f"training patients of each class (got {dict(zip(classes, counts, strict=True))})")
        raise ValueError(msg)
    n_val = min(max(len(classes), round(val_fraction * len(items))), len(items) - len(classes))
    fit, val = train_test_split(np.arange(len(items)), test_size=n_val, random_state=seed,
                                stratify=labels)
    tagged = [{**item, "label": np.float32(label)} for item, label in zip(items, labels,
                                                                         strict=True)]
    return [tagged[i] for i in fit], [tagged[i] for i in val]


def finetune_backbone(net: torch.nn.Module, *, items_train: list[dict], labels: Sequence[int],
                      transform: Compose, cfg_finetune: DictConfig, seed: int,
                      checkpoint_dir: str | Path, mean: Sequence[float], std: Sequence[float],
                      precision: str = "32-true", num_workers: int = 0,
                      channels_last: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fine-tune ``net`` with a linear head on training patients; keep the best epoch.

    An inner, label-stratified validation split of ``items_train`` drives early stopping and
    checkpointing on its BCE loss. The global random state is left as it was.

    Args:
        net: a backbone from :func:`pdl1exp.features.backbones.build_backbone`, weights
            loaded; updated in place.
        items_train: one dictionary per training patient (``patient_id``, ``image``, ``mask``).
        labels: 0/1 labels aligned with ``items_train``.
        transform: the preprocessing chain producing the ROI crop under ``image``.
        cfg_finetune: the ``backbone.finetune`` config.
        seed: seed of the split, the head, the augmentation and the batch order.
        checkpoint_dir: folder of the best checkpoint and ``summary.json``.
        mean: per-channel input mean of the loaded weights.
        std: per-channel input standard deviation of the loaded weights.
        precision: Lightning training precision.
        num_workers: threads preprocessing the ROIs (once, before the first epoch).
        channels_last: feed inputs in the channels-last memory format.

    Returns:
        ``net`` with the best checkpoint's weights (head dropped) and a summary: ``epochs``
        run, ``best_epoch``, ``best_val_loss``, ``val_auc`` (of the best epoch),
        ``checkpoint``, ``n_fit``, ``n_val``, ``weights_sha``.
    """
    cfg = cfg_finetune
    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.ckpt"):  # from an interrupted run with the same inputs
        stale.unlink()
    fit, val = _inner_split(list(items_train), np.asarray(labels), val_fraction=cfg.val_fraction,
                            seed=seed)
    augment = [*(RandFlipd("image", prob=cfg.augment_prob, spatial_axis=axis) for axis in _PLANE),
               RandRotate90d("image", prob=cfg.augment_prob, spatial_axes=_PLANE)]
    data = FineTuneDataModule(fit, val, transform, augment=augment if cfg.augment else [],
                              batch_size=cfg.batch_size, num_workers=num_workers)
    frozen = _stem(net) if cfg.freeze_stem else []
    early = EarlyStopping(monitor="val_loss", mode="min", patience=cfg.patience)
    best = ModelCheckpoint(dirpath=folder, filename="best-{epoch:03d}", monitor="val_loss",
                           mode="min", save_top_k=1, save_weights_only=True)
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    with isolate_rng():
        pl.seed_everything(seed, verbose=False)
        try:
            encoder = DeepFeatureExtractor(net, mean=mean, std=std, channels_last=channels_last)
            module = FineTuneModule(encoder, embedding_dim=net.embedding_dim, lr=cfg.lr,
                                    weight_decay=cfg.weight_decay, frozen=frozen)
            module.train()  # Lightning keeps the modes it finds; the extractor sets eval
            # One device: the validation AUC needs every validation patient in one process.
            # deterministic="warn": CUDA has no deterministic adaptive-pooling backward.
            trainer = pl.Trainer(accelerator="auto", devices=1, precision=precision,
                                 max_epochs=cfg.max_epochs, callbacks=[early, best],
                                 logger=False, deterministic="warn", num_sanity_val_steps=0,
                                 enable_progress_bar=False, enable_model_summary=False,
                                 default_root_dir=folder)
            log.info("Fine-tuning the backbone on %d + %d training patients (%s)", len(fit),
                     len(val), precision)
            trainer.fit(module, datamodule=data)
            epochs = trainer.current_epoch
            (scores,) = trainer.validate(module, datamodule=data, ckpt_path=best.best_model_path,
                                         verbose=False)
        finally:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
            for part in frozen:
                part.requires_grad_(True)
    summary = {"epochs": epochs, "best_epoch": epochs - 1 - early.wait_count,
               "best_val_loss": float(scores["val_loss"]), "val_auc": float(scores["val_auc"]),
               "checkpoint": str(best.best_model_path), "n_fit": len(fit), "n_val": len(val),
               "weights_sha": state_sha(net)}
    (folder / SUMMARY).write_text(json.dumps(summary, indent=2))
    log.info("Fine-tuned for %d epochs: best val loss %.4f (epoch %d), val AUC %.3f",
             epochs, summary["best_val_loss"], summary["best_epoch"], summary["val_auc"])
    return net, summary
