"""Deep-feature stage: ROI crops → backbone embeddings, through the content-hashed cache."""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from monai.transforms import Compose
from omegaconf import DictConfig, OmegaConf

from pdl1exp.features.backbones import build_backbone
from pdl1exp.features.cache import FeatureCache
from pdl1exp.features.extractor import (
    DeepFeatureExtractor,
    PatientProgress,
    RankWriter,
    ROIDataModule,
    loader_workers,
)
from pdl1exp.features.finetune import (
    FULL,
    crossfit_finetune,
    embedding_alignment,
    finetune_spec,
    finetuned_tag,
    read_summary,
    write_summary,
)
from pdl1exp.features.weights import input_normalisation, load_weights
from pdl1exp.hashing import content_key
from pdl1exp.imaging.preprocess import build_transforms
from pdl1exp.memo import code_key

__all__ = [
    "DEEP_PREFIX",
    "ROI_DESCRIPTORS",
    "Extraction",
    "build_network",
    "extract_features",
    "extractor_code_version",
    "extractor_identity",
    "feature_key",
    "network_config",
    "resolve_precision",
    "roi_transform",
]

log = logging.getLogger(__name__)

DEEP_PREFIX = "dl_"
ROI_DESCRIPTORS = ("roi_volume_ml", "roi_max_diameter_mm")

# Source files whose change must invalidate cached features.
_CODE = ("features/extract.py", "features/extractor.py", "features/backbones.py",
         "features/weights.py", "features/finetune.py", "imaging/preprocess.py",
         "imaging/reader.py", "imaging/crop.py", "data/images.py")


@dataclass(frozen=True)
class Extraction:
    """Result of the deep-feature stage.

    Args:
        table: one row per patient (index patient_id), columns ``dl_0000``... and the ROI
            descriptors ``roi_volume_ml``, ``roi_max_diameter_mm``.
        cache_hit: True when no forward pass ran.
        key: the feature-cache key.
        weights_tag: what was really loaded (``imagenet:``/``file:``/``random:``), with
            ``+finetuned:<sha12>`` after fine-tuning.
        precision: the precision the forward pass used (or would have used).
        patients_per_s: throughput of the forward pass (0 on a cache hit).
        finetune: None without fine-tuning; else the cross-fitting summary of
            :func:`pdl1exp.features.finetune.crossfit_finetune` (``folds``, ``networks`` with
            each network's ``curves``, ``checkpoint``...) plus ``alignment``
            (:func:`pdl1exp.features.finetune.embedding_alignment`): log it as finetune.json.
    """

    table: pd.DataFrame
    cache_hit: bool
    key: str
    weights_tag: str
    precision: str
    patients_per_s: float
    finetune: dict[str, Any] | None = None


def network_config(backbone: DictConfig) -> dict[str, Any]:
    """The backbone settings that, with its weights, define the network's outputs (not batch
    size, workers, devices or precision)."""
    settings = OmegaConf.to_container(backbone, resolve=True)
    return {k: settings[k] for k in ("arch", "spatial_dims", "multi_stage", "input_size")}


def extractor_code_version() -> str:
    """Key of the extractor's source files (:func:`pdl1exp.memo.code_key`)."""
    return code_key(*_CODE)


def extractor_identity(cfg: DictConfig, extraction: Extraction) -> dict[str, Any]:
    """What predict needs to recompute the deep features exactly as in training."""
    configs = {k: OmegaConf.to_container(cfg[k], resolve=True)
               for k in ("backbone", "preprocess", "roi", "segmentation")}
    return {**configs, "seed": cfg.seed, "weights_tag": extraction.weights_tag,
            "precision": extraction.precision, "feature_cache_key": extraction.key,
            "code_version": extractor_code_version()}


def resolve_precision(requested: str) -> str:
    """``bf16-mixed`` (autocast) or ``bf16-true`` (bf16 weights: about 2x autocast on CPUs
    with bf16 matmul) where the hardware supports bf16, else ``16-mixed`` on CUDA or full
    precision (with a warning)."""
    if requested not in ("bf16-mixed", "bf16-true"):
        return requested
    if torch.cuda.is_available():
        return requested if torch.cuda.is_bf16_supported() else "16-mixed"
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return requested
    warnings.warn("this CPU has no bf16 support: extracting in fp32", UserWarning, stacklevel=2)
    return "32-true"


def feature_key(rois: pd.DataFrame, *, preprocess: DictConfig, roi: DictConfig,
                backbone: DictConfig, weights_tag: str, precision: str, tta_views: int,
                finetune: dict[str, Any] | None = None) -> str:
    """Content hash of everything that determines the features (not paths, not batch size).

    ``finetune`` (from :func:`pdl1exp.features.finetune.finetune_spec`) adds the fine-tuning
    config, seed and training labels; without it the key is that of the loaded weights.
    """
    return content_key({
        **({"finetune": finetune} if finetune else {}),
        # A table without a seed column (masks only) keys with NaN seeds.
        "patients": rois.reindex(columns=["image_sha", "mask_key", "seed"]).sort_index()
        .to_dict("index"),
        "preprocess": OmegaConf.to_container(preprocess, resolve=True),
        "roi": OmegaConf.to_container(roi, resolve=True),
        "backbone": network_config(backbone),
        "weights": weights_tag, "precision": precision, "tta_views": tta_views,
        "code": extractor_code_version(),
    })


def _predict_distributed(module: DeepFeatureExtractor, data: ROIDataModule, *,
                         devices: int | str, precision: str,
                         progress: PatientProgress) -> list[dict]:
    """Predict on several devices (spawned DDP); every rank's share is gathered from disk.

    Lightning returns only the local rank's predictions under DDP, so each rank writes its
    batches and the calling process merges them.
    """
    with tempfile.TemporaryDirectory() as folder:
        writer = RankWriter(folder)
        trainer = pl.Trainer(accelerator="auto", devices=devices, strategy="ddp_spawn",
                             precision=precision, logger=False, enable_checkpointing=False,
                             enable_model_summary=False, enable_progress_bar=False,
                             callbacks=[writer, progress], inference_mode=True)
        trainer.predict(module, datamodule=data, return_predictions=False)
        return [batch for path in sorted(Path(folder).glob("rank*.pt"))
                for batch in torch.load(path, weights_only=False)]


def _merge(batches: list[dict]) -> tuple[list[str], np.ndarray]:
    """Patient ids and embeddings in first-seen order (DDP pads ranks with repeats)."""
    seen: dict[str, np.ndarray] = {}
    for batch in batches:
        for pid, row in zip(batch["patient_id"], batch["features"].numpy(), strict=True):
            seen.setdefault(pid, row)
    return list(seen), np.stack(list(seen.values()))


def _items(rois: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"patient_id": pid, "image": row["image"], "mask": row["mask"],
             "seed": row.get("seed")} for pid, row in rois.iterrows()]


def build_network(*, backbone: DictConfig, roi: DictConfig,
                  seed: int) -> tuple[torch.nn.Module, str]:
    """The configured backbone with its weights loaded, and the weights tag.

    Args:
        backbone: the ``backbone`` config.
        roi: the ``roi`` config (its ``channels`` are the input channels).
        seed: seed of random weights.
    """
    net = build_backbone(name=backbone.arch, spatial_dims=backbone.spatial_dims,
                         in_channels=roi.channels, multi_stage=backbone.multi_stage)
    tag = load_weights(net, weights=str(backbone.weights), seed=seed, arch=backbone.arch,
                       hub_dir=backbone.hub_dir, allow_download=backbone.allow_download)
    return net, tag


def roi_transform(*, preprocess: DictConfig, roi: DictConfig) -> Compose:
    """The preprocessing chain of the configs, ending in the ROI crop."""
    return build_transforms(spacing_mm=preprocess.spacing_mm, axcodes=preprocess.axcodes,
                            window_width=preprocess.window_width,
                            window_level=preprocess.window_level, roi=instantiate(roi))


def _embed(net: torch.nn.Module, items: list[dict[str, Any]], transform: Compose, *,
           backbone: DictConfig, mean: Sequence[float], std: Sequence[float], precision: str,
           tta_views: int, devices: str | int) -> pd.DataFrame:
    """Embeddings of ``items`` by ``net`` (Lightning predict), one row per patient."""
    module = DeepFeatureExtractor(net, mean=mean, std=std,
                                  channels_last=backbone.channels_last, tta_views=tta_views,
                                  compile_backbone=bool(backbone.get("compile", False)),
                                  fold_batch_norm=bool(backbone.get("fold_batch_norm", False)))
    data = ROIDataModule(items, transform, batch_size=backbone.batch_size,
                         num_workers=loader_workers(backbone.num_workers))
    progress = PatientProgress(len(items))
    if devices in (1, "1"):
        trainer = pl.Trainer(accelerator="auto", devices=1, precision=precision, logger=False,
                             enable_checkpointing=False, enable_model_summary=False,
                             enable_progress_bar=False, callbacks=[progress],
                             inference_mode=True)
        batches = trainer.predict(module, datamodule=data)
    else:
        batches = _predict_distributed(module, data, devices=devices, precision=precision,
                                       progress=progress)
    ids, features = _merge(batches)
    return pd.DataFrame(features, index=pd.Index(ids, name="patient_id"),
                        columns=[f"{DEEP_PREFIX}{i:04d}" for i in range(features.shape[1])])


def extract_features(rois: pd.DataFrame, *, preprocess: DictConfig, roi: DictConfig,
                     backbone: DictConfig, seed: int, cache_dir: str | Path,
                     devices: str | int | None = None,
                     train_labels: pd.Series | None = None,
                     folds: pd.Series | None = None) -> Extraction:
    """Embed every patient's ROI, or read the embeddings from the cache.

    With ``backbone.finetune.enabled`` the features are cross-fitted
    (:mod:`pdl1exp.features.finetune`): the training patients of fold k are embedded by a
    network fine-tuned on the other folds' patients, every other patient by a network
    fine-tuned on all of ``train_labels`` (never pass test or external patients there).

    Args:
        rois: index patient_id; columns ``image``, ``mask`` (paths), ``image_sha``,
            ``mask_key`` (content identity of the mask).
        preprocess: the ``preprocess`` config (spacing, orientation, window).
        roi: the ``roi`` config (a ``TumourROId`` target).
        backbone: the ``backbone`` config.
        seed: seed of random weights.
        cache_dir: the feature cache folder.
        devices: Lightning devices; None takes ``backbone.devices``.
        train_labels: 0/1 labels of the training patients (index patient_id); required
            when fine-tuning.
        folds: the downstream CV fold of each training patient, from
            :func:`pdl1exp.features.finetune.training_folds`; required when fine-tuning.
    """
    net, tag = build_network(backbone=backbone, roi=roi, seed=seed)
    precision = resolve_precision(str(backbone.precision))
    tta_views = int(backbone.tta.n) if backbone.tta.enabled else 1
    spec = finetune_spec(backbone.finetune, train_labels=train_labels, folds=folds, seed=seed,
                         patients=rois.index)
    key = feature_key(rois, preprocess=preprocess, roi=roi, backbone=backbone,
                      weights_tag=tag, precision=precision, tta_views=tta_views, finetune=spec)
    cache = FeatureCache(cache_dir)
    tuned_dir = cache.folder / "finetune" / key
    tuned = read_summary(tuned_dir) if spec else None
    cached = cache.get(key)
    if cached is not None and (tuned or not spec):
        log.info("Feature cache hit %s (%d patients, %d features)", key, *cached.shape)
        return Extraction(cached, True, key, finetuned_tag(tag, tuned), precision, 0.0, tuned)

    transform = roi_transform(preprocess=preprocess, roi=roi)
    mean, std = input_normalisation(tag, arch=backbone.arch)
    items = {item["patient_id"]: item for item in _items(rois)}
    embed = {"backbone": backbone, "mean": mean, "std": std, "precision": precision,
             "tta_views": tta_views,
             "devices": backbone.devices if devices is None else devices}
    log.info("Extracting %s features (%s, %s) for %d patients", backbone.name, tag, precision,
             len(rois))
    start = time.perf_counter()
    if spec:
        networks, tuned = crossfit_finetune(
            net, items=items, labels=train_labels, folds=folds, checkpoint_dir=tuned_dir,
            transform=transform, cfg_finetune=backbone.finetune, seed=seed, mean=mean, std=std,
            # Training keeps fp32 master weights: bf16-true is for inference only.
            precision="bf16-mixed" if precision == "bf16-true" else precision,
            num_workers=loader_workers(backbone.num_workers, threads=True),
            channels_last=backbone.channels_last)
        start = time.perf_counter()
        parts = {n.name: _embed(n.net, [items[p] for p in n.patients], transform, **embed)
                 for n in networks}
        n_embedded = sum(len(n.patients) for n in networks)
        full = parts.pop(FULL)
        oof = pd.concat(parts.values())
        features = pd.concat([oof, full.drop(oof.index)])
        tuned["alignment"] = embedding_alignment(oof, full)
        write_summary(tuned_dir, tuned)
        tag = finetuned_tag(tag, tuned)
        log.info("Cross-fitted features: fold networks vs full network, median per-feature "
                 "r = %.3f", tuned["alignment"]["median_r"])
    else:
        features = _embed(net, list(items.values()), transform, **embed)
        n_embedded = len(features)
    patients_per_s = n_embedded / (time.perf_counter() - start)
    table = features.loc[rois.index]
    # ROI descriptors ride along (useful covariates); models read the deep columns only.
    table = table.join(rois[[c for c in ROI_DESCRIPTORS if c in rois.columns]])
    cache.put(key, table)
    log.info("Extracted %d patients at %.1f patients/s; cached as %s", len(table),
             patients_per_s, key)
    return Extraction(table, False, key, tag, precision, patients_per_s, tuned)
