"""Optional transfer learning of the backbone, cross-fitted over the downstream CV folds.

A network fine-tuned on a patient's label and then used to embed that same patient leaks the
label into every later step (LASSO, the sweep, the CV AUC, the threshold, the combined
signature). So the training patients of fold k are embedded by a network fine-tuned on the
other folds only (out-of-fold features), with exactly the folds the downstream CV uses
(:func:`training_folds`); test and external patients by one network fine-tuned on all training
patients. Every network starts from the same loaded weights and seed, so with a gentle learning
rate their embedding axes stay aligned; the summary reports how well (``alignment``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose, RandFlipd, RandRotate90d
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.utilities.seed import isolate_rng
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, train_test_split

from pdl1exp.features.backbones import DenseNetBackbone, ResNetBackbone
from pdl1exp.features.extractor import DeepFeatureExtractor
from pdl1exp.hashing import content_key

__all__ = [
    "FineTuneDataModule",
    "FineTuneModule",
    "Network",
    "crossfit_finetune",
    "embedding_alignment",
    "finetune_backbone",
    "finetune_curves_figure",
    "finetune_spec",
    "finetuned_tag",
    "load_finetuned",
    "read_summary",
    "state_sha",
    "training_folds",
    "write_summary",
]

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
# Augmentation acts in the axial plane: the first two spatial axes of every ROI mode.
_PLANE = (0, 1)
_CURVES = ("train_loss", "val_loss", "val_auc")
FULL = "full"


def training_folds(labels: pd.Series, *, cv_folds: int, random_state: int | None) -> pd.Series:
    """The downstream CV fold of every training patient.

    Exactly the validation parts of ``StratifiedKFold(cv_folds, shuffle=True,
    random_state=random_state)`` over the rows in the order of ``labels``, which is how
    :func:`pdl1exp.models.tuning.prepare_folds` splits the training feature table (its rows in
    the same order): the splitter uses only the row count and the labels.

    Args:
        labels: 0/1 labels of the training patients (index patient_id), in the order of the
            training rows downstream.
        cv_folds: ``cfg.tuning.cv_folds``.
        random_state: ``cfg.tuning.random_state``.

    Returns:
        The fold index (0..cv_folds-1) of each patient, indexed like ``labels``.
    """
    splitter = StratifiedKFold(cv_folds, shuffle=True, random_state=random_state)
    fold = np.empty(len(labels), dtype=int)
    for k, (_, val) in enumerate(splitter.split(np.zeros((len(labels), 1)), labels.to_numpy())):
        fold[val] = k
    return pd.Series(fold, index=labels.index, name="fold")


def finetune_spec(cfg_finetune: DictConfig, *, train_labels: pd.Series | None,
                  folds: pd.Series | None, seed: int, patients: pd.Index) -> dict[str, Any] | None:
    """What determines the fine-tuned weights (for the cache key), or None when disabled.

    Args:
        cfg_finetune: the ``backbone.finetune`` config.
        train_labels: 0/1 labels of the training patients (index patient_id).
        folds: CV fold of each training patient (:func:`training_folds`).
        seed: seed of the splits, the heads, the augmentation and the batch order.
        patients: the patients that have an ROI.
    """
    if not cfg_finetune.enabled:
        return None
    if train_labels is None or folds is None:
        msg = ("backbone.finetune.enabled=true needs the training patients' labels and CV "
               "folds: pass train_labels (index patient_id, training split only) and "
               "folds=training_folds(train_labels, cv_folds=..., random_state=...) to "
               "extract_features")
        raise ValueError(msg)
    missing = train_labels.index.difference(patients)
    if len(missing):
        msg = f"train_labels name patients without an ROI: {', '.join(map(str, missing[:5]))}"
        raise ValueError(msg)
    unfolded = train_labels.index.symmetric_difference(folds.index)
    if len(unfolded):
        msg = (f"folds must give a fold to exactly the patients of train_labels; these differ: "
               f"{', '.join(map(str, unfolded[:5]))}")
        raise ValueError(msg)
    if folds.nunique() < 2:
        msg = f"cross-fitted fine-tuning needs at least two CV folds, got {folds.nunique()}"
        raise ValueError(msg)
    return {"config": OmegaConf.to_container(cfg_finetune, resolve=True), "seed": seed,
            "train": {str(pid): int(label) for pid, label in train_labels.sort_index().items()},
            "folds": {str(pid): int(k) for pid, k in folds.sort_index().items()}}


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
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(labels))
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


class EpochCurves(pl.Callback):
    """Per-epoch mean training loss, validation loss and validation AUC (the fine-tune curves)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self.rows.append({"epoch": trainer.current_epoch,
                          **{k: float(metrics[k]) for k in _CURVES if k in metrics}})


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
        ``checkpoint``, ``n_fit``, ``n_val``, ``weights_sha`` and ``curves`` (one dictionary
        per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``val_auc``).
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
    curves = EpochCurves()
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
                                 max_epochs=cfg.max_epochs, callbacks=[early, best, curves],
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
               "weights_sha": state_sha(net), "curves": curves.rows}
    write_summary(folder, summary)
    log.info("Fine-tuned for %d epochs: best val loss %.4f (epoch %d), val AUC %.3f",
             epochs, summary["best_val_loss"], summary["best_epoch"], summary["val_auc"])
    return net, summary


def write_summary(checkpoint_dir: str | Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` into ``checkpoint_dir`` (what :func:`read_summary` reads)."""
    (Path(checkpoint_dir) / SUMMARY).write_text(json.dumps(summary, indent=2))


@dataclass(frozen=True)
class Network:
    """One fine-tuned network of a cross-fitting and the patients it embeds.

    Args:
        name: ``fold<k>`` (fine-tuned without fold k) or ``full`` (all training patients).
        net: the fine-tuned backbone.
        patients: the patients it embeds: fold k's training patients, or every patient.
    """

    name: str
    net: torch.nn.Module
    patients: list[str]


def crossfit_finetune(net: torch.nn.Module, *, items: dict[Any, dict], labels: pd.Series,
                      folds: pd.Series, checkpoint_dir: str | Path,
                      **finetune: Any) -> tuple[list[Network], dict[str, Any]]:
    """Fine-tune a copy of ``net`` per CV fold on the other folds, and one on all of them.

    Args:
        net: the backbone with its loaded weights (left unchanged; every network starts here).
        items: one dictionary per patient to embed (``patient_id``, ``image``, ``mask``),
            keyed by patient_id: the training patients and the held-out ones.
        labels: 0/1 labels of the training patients (index patient_id).
        folds: CV fold of each training patient (:func:`training_folds`).
        checkpoint_dir: parent folder of the networks' folders ``fold<k>/`` and ``full/``.
        **finetune: the remaining keyword arguments of :func:`finetune_backbone`
            (``transform``, ``cfg_finetune``, ``seed``, ``mean``, ``std``, ...).

    Returns:
        The networks, each with the patients it embeds (``full`` embeds every patient; its
        features of training patients serve the alignment check only), and the summary:
        ``scheme`` (``crossfit``), ``folds`` (patient_id → fold), ``networks`` (name → the
        summary of :func:`finetune_backbone`) and ``weights_sha`` (of all networks).
    """
    folder = Path(checkpoint_dir)
    plan = [(f"fold{k}", labels.index[folds != k], labels.index[folds == k])
            for k in sorted(folds.unique())]
    plan.append((FULL, labels.index, pd.Index(list(items))))
    networks, summaries = [], {}
    for name, fit, embed in plan:
        log.info("Cross-fitted fine-tuning: network %s on %d training patients, embeds %d",
                 name, len(fit), len(embed))
        tuned, summary = finetune_backbone(copy.deepcopy(net), items_train=[items[p] for p in fit],
                                           labels=labels.loc[fit].to_numpy(),
                                           checkpoint_dir=folder / name, **finetune)
        networks.append(Network(name, tuned, list(embed)))
        summaries[name] = {**summary, "n_embedded": len(embed)}
    summary = {"scheme": "crossfit",
               "folds": {str(p): int(k) for p, k in folds.sort_index().items()},
               "networks": summaries,
               "weights_sha": content_key({n: s["weights_sha"] for n, s in summaries.items()})[:12]}
    return networks, summary


def embedding_alignment(oof: pd.DataFrame, full: pd.DataFrame) -> dict[str, float]:
    """How well the fold networks' embedding axes match the full network's.

    Test patients are embedded by the full network and training patients by the fold networks,
    so one classifier reads both: feature j must mean the same in both. Per feature, the
    Pearson correlation over the training patients between their out-of-fold and full-network
    values; near 1 means aligned axes.

    Args:
        oof: out-of-fold features of the training patients.
        full: the full network's features of the same patients and columns.

    Returns:
        ``median_r`` and ``p10_r`` (10th percentile) over features that vary in both.
    """
    a, b = oof.to_numpy(float), full.loc[oof.index, oof.columns].to_numpy(float)
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    norm = np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0)
    r = (a * b).sum(axis=0)[norm > 0] / norm[norm > 0]
    if not len(r):
        return {"median_r": float("nan"), "p10_r": float("nan")}
    return {"median_r": float(np.median(r)), "p10_r": float(np.percentile(r, 10))}


def load_finetuned(net: torch.nn.Module, summary: dict[str, Any], *,
                   network: str = FULL) -> torch.nn.Module:
    """Load one network of a cross-fitting (default: ``full``) from its best checkpoint.

    Args:
        net: a backbone of the same architecture (its weights are replaced).
        summary: the fine-tuning summary (``Extraction.finetune``).
        network: ``full`` or ``fold<k>``.
    """
    checkpoint = summary["networks"][network]["checkpoint"]
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    prefix = "encoder.backbone."
    net.load_state_dict({k.removeprefix(prefix): v for k, v in saved.items()
                         if k.startswith(prefix)})
    return net


def finetune_curves_figure(summary: dict[str, Any], path: str | Path, *,
                           dpi: int = 100) -> Path:
    """PNG of the fine-tune curves: training and validation loss, validation AUC per epoch,
    one line per network of the cross-fitting.

    Args:
        summary: the fine-tuning summary (``Extraction.finetune``).
        path: the PNG to write.
        dpi: resolution.
    """
    fig = Figure(figsize=(12.0, 3.6), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, len(_CURVES))
    for name, net_summary in summary["networks"].items():
        curves = pd.DataFrame(net_summary["curves"])
        for ax, metric in zip(axes, _CURVES, strict=True):
            if metric in curves:
                ax.plot(curves["epoch"], curves[metric], marker="o", markersize=3, label=name,
                        linewidth=2.0 if name == FULL else 1.0)
    for ax, metric in zip(axes, _CURVES, strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].legend(fontsize="small")
    path = Path(path)
    fig.savefig(path)
    return path
