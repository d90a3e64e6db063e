"""Grad-CAM of the deep-feature backbone under the DLR model's linear score (overlay PNGs).

The DLR model is an sklearn pipeline (impute → scale → filters → LASSO → classifier) on pooled
embeddings, not a network, so what Grad-CAM differentiates is a linear score of the embedding
(:func:`linear_head`): the logit of the classifier when it is linear in the selected features
(logistic regression: exact up to its intercept), else the LASSO step's logit, a linear
surrogate of the classifier. Both are ``score = sum_j coef_j * (emb_j - mean_j) / sd_j`` with
the scaler's training mean and sd, i.e. ``w . emb - offset`` with ``w_j = coef_j / sd_j``:
centred on the average training patient, so its sign says which class this image argues for.
Imputation does not change the gradient and the filters only drop columns. Grad-CAM keeps
positive evidence only (a ReLU) of one output: the head outputs ``(score, -score)`` and
:func:`explained_class` picks which.

The heat map is MONAI's ``GradCAM`` (ReLU of the gradient-weighted activations of a target
layer, upsampled to the crop) without its default min-max normaliser, which would invert it
and lose the mass that :func:`heat_mass_inside` measures. By default
(``evaluation.gradcam_reference: without_tumour``) the activations are taken relative to those
of the same crop with the dilated tumour blanked (:class:`ReferenceGradCAM`), and the map
explains the direction in which the tumour moves the score away from the blanked crop's. The
crop's background (zero outside a masked crop) normalises to a non-zero input whose
activations are the same for every patient and carry no evidence, yet plain Grad-CAM spreads
heat over them: on the embedded cohort with random weights its share inside the dilated mask
was no more than the region's share of the crop. A blanked crop scores far on the negative
side there, so evidence relative to it is evidence of the tumour itself, whichever class the
patient is predicted. With ``none``, plain Grad-CAM explains the class the crop argues for
(the sign of its centred score). It explains the un-augmented view
(test-time augmentation averages embeddings of flipped views). For the 2.5D modes the map lies
on the crop's pixel grid shared by its channels; the tumour region is then the union of the
channels' masks. Overlays show channel 0 (3D crops: the axial slice of largest tumour area).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from monai.data import MetaTensor
from monai.transforms import Compose
from monai.transforms.utils_morphological_ops import dilate
from monai.visualize import GradCAM
from omegaconf import DictConfig, OmegaConf
from sklearn.pipeline import Pipeline

from pdl1exp.features.backbones import DenseNetBackbone, ResNetBackbone
from pdl1exp.features.extract import (
    DEEP_PREFIX,
    build_network,
    extractor_code_version,
    network_config,
    roi_transform,
)
from pdl1exp.features.extractor import DeepFeatureExtractor
from pdl1exp.features.finetune import load_finetuned
from pdl1exp.features.weights import input_normalisation
from pdl1exp.hashing import content_key
from pdl1exp.imaging.crop import TumourROId
from pdl1exp.memo import code_key, read_memo, write_memo

__all__ = [
    "LinearHead",
    "LinearScore",
    "ReferenceGradCAM",
    "default_target_layer",
    "explained_class",
    "gradcam_maps",
    "gradcam_overlays",
    "heat_mass_inside",
    "linear_head",
]

log = logging.getLogger(__name__)

_ENCODER = "encoder.backbone."
_HEAT_ALPHA = 0.6  # opacity of the hottest pixel
_REFERENCES = ("without_tumour", "none")


@dataclass(frozen=True)
class LinearHead:
    """The score ``weights . x - offset`` on raw features (module docstring).

    Args:
        weights: ``coef_j / sd_j`` per input feature name.
        offset: ``weights . (training mean)``: the score of the average training patient is 0.
        source: ``classifier`` (the classifier's logit) or ``lasso`` (the surrogate).
    """

    weights: pd.Series
    offset: float
    source: str


def linear_head(model: Pipeline) -> LinearHead:
    """The linear score of a fitted DLR model on its raw input features.

    Args:
        model: a fitted selection + classifier pipeline with a ``StandardScaler``-like step
            (``mean_``, ``scale_``, ``feature_names_in_``) and, unless its classifier is linear
            in the selected columns, a LASSO step (``selected_features_``, ``coef_``).

    Returns:
        The weights, offset and source (``classifier``: exact logit, ``lasso``: surrogate).
    """
    steps = [step for _, step in model.steps]
    scaler = next((s for s in steps if hasattr(s, "scale_") and hasattr(s, "mean_")), None)
    if scaler is None:
        msg = "linear_head needs a scaling step (mean_, scale_) in the model's pipeline"
        raise ValueError(msg)
    classifier = steps[-1]
    coef = getattr(classifier, "coef_", None)
    names = getattr(classifier, "feature_names_in_", None)
    if coef is not None and names is not None and np.shape(coef) == (1, len(names)):
        weights, source = pd.Series(np.asarray(coef)[0], index=names), "classifier"
    else:
        lasso = next((s for s in steps if hasattr(s, "selected_features_")
                      and hasattr(s, "coef_")), None)
        if lasso is None:
            msg = (f"the classifier {type(classifier).__name__} is not linear and the pipeline "
                   "has no LASSO step: no linear score to explain (use selection=lasso)")
            raise ValueError(msg)
        weights, source = pd.Series(lasso.coef_, index=lasso.selected_features_), "lasso"
    if not np.any(weights.to_numpy()):
        msg = (f"every {source} coefficient is zero (LASSO kept no feature): the score does not "
               "depend on the image, nothing to explain")
        raise ValueError(msg)
    scale = pd.Series(scaler.scale_, index=scaler.feature_names_in_).loc[weights.index]
    mean = pd.Series(scaler.mean_, index=scaler.feature_names_in_).loc[weights.index]
    raw = weights / scale
    return LinearHead(weights=raw, offset=float(raw @ mean), source=source)


class LinearScore(torch.nn.Module):
    """Backbone (with its input normalisation) and a linear head: ``(score, -score)``.

    Args:
        backbone: a network returning ``(B, D)`` embeddings.
        weight: ``(D,)`` head weights.
        mean: per-channel input mean of the weights (inputs arrive in [0, 1]).
        std: per-channel input standard deviation.
        offset: subtracted from the score.
    """

    def __init__(self, backbone: torch.nn.Module, *, weight: torch.Tensor,
                 mean: Sequence[float], std: Sequence[float], offset: float = 0.0) -> None:
        super().__init__()
        self.encoder = DeepFeatureExtractor(backbone, mean=mean, std=std, channels_last=False)
        self.head = torch.nn.Linear(weight.numel(), 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.stack([weight.reshape(-1), -weight.reshape(-1)]))
            self.head.bias.copy_(torch.tensor([-offset, offset]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 2)``: the score (evidence for positive) and its negative."""
        return self.head(self.encoder(x))


def default_target_layer(net: torch.nn.Module) -> str:
    """The last convolutional stage: ``layer4`` (ResNets), ``class_layers.relu`` (DenseNet)."""
    if isinstance(net, ResNetBackbone):
        return "layer4"
    if isinstance(net, DenseNetBackbone):
        return "class_layers.relu"
    msg = f"no default Grad-CAM layer for {type(net).__name__}: pass target_layer"
    raise TypeError(msg)


class ReferenceGradCAM(GradCAM):
    """MONAI's ``GradCAM`` on activations relative to a reference input's:
    ``ReLU(sum_k alpha_k (A_k(x) - A_k(reference)))``, with ``alpha_k`` the mean gradient of
    the explained class at ``x`` (the class, the gradients and the upsampling are MONAI's).

    Args:
        nn_module: the model to explain.
        target_layers: the layer whose activations are weighted.
        reference: ``(B, C, *spatial)`` inputs the activations are taken relative to.
        **kwargs: passed to ``GradCAM``.
    """

    def __init__(self, nn_module: torch.nn.Module, target_layers: str, *,
                 reference: torch.Tensor, **kwargs: Any) -> None:
        super().__init__(nn_module=nn_module, target_layers=target_layers, **kwargs)
        self.reference = reference

    def compute_map(self, x: torch.Tensor, class_idx: int | None = None,
                    retain_graph: bool = False, layer_idx: int = -1,
                    **kwargs: Any) -> torch.Tensor:
        """The un-upsampled map (``GradCAM.compute_map`` with the reference subtracted)."""
        hooked = self.nn_module
        with torch.no_grad():
            hooked.model(self.reference, **kwargs)
        baseline = hooked.activations[hooked.target_layers[layer_idx]]
        _, acti, grad = hooked(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
        acti, grad = acti[layer_idx], grad[layer_idx]
        b, c, *spatial = grad.shape
        weights = grad.view(b, c, -1).mean(2).view(b, c, *[1] * len(spatial))
        return torch.relu((weights * (acti - baseline)).sum(1, keepdim=True))


def explained_class(model: LinearScore, x: torch.Tensor,
                    reference: torch.Tensor | None = None) -> int:
    """The output of ``model`` a map of the single crop ``x`` explains: 0 (evidence for
    positive) or 1 (negative). Without a reference, the class the crop argues for (the sign
    of its centred score); with one, the direction in which the crop moves the score away
    from the reference's (what its activations relative to the reference can account for).
    """
    return _explained(*_outputs(model, x, reference))


def _outputs(model: LinearScore, x: torch.Tensor,
             reference: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``model``'s outputs on ``x`` and on the reference (None without one), no gradients."""
    with torch.no_grad():
        return model(x.float()), None if reference is None else model(reference.float())


def _explained(out: torch.Tensor, reference_out: torch.Tensor | None) -> int:
    """:func:`explained_class` from the outputs of the crop and of its reference."""
    return int((out if reference_out is None else out - reference_out)[0].argmax())


def gradcam_maps(model: LinearScore, x: torch.Tensor, *, target_layer: str,
                 reference: torch.Tensor | None = None,
                 classes: Sequence[int] | None = None) -> np.ndarray:
    """Grad-CAM heat maps ``(B, *spatial)``, non-negative, unnormalised, one crop at a time,
    each of the class :func:`explained_class` picks.

    Args:
        model: the score to explain.
        x: ``(B, C, *spatial)`` crops in [0, 1].
        target_layer: module name inside the backbone (e.g. ``layer4``).
        reference: crops like ``x`` whose activations are subtracted
            (:class:`ReferenceGradCAM`); None: plain Grad-CAM.
        classes: each crop's :func:`explained_class`, when the caller has it already.
    """
    layers = _ENCODER + target_layer
    post = torch.nn.Identity()
    cam = (GradCAM(nn_module=model, target_layers=layers, postprocessing=post)
           if reference is None else
           ReferenceGradCAM(model, layers, reference=reference[:1].float(), postprocessing=post))
    maps = []
    for i in range(len(x)):
        crop = x[i:i + 1].float()
        ref = None if reference is None else reference[i:i + 1].float()
        if isinstance(cam, ReferenceGradCAM):
            cam.reference = ref
        explains = explained_class(model, crop, ref) if classes is None else classes[i]
        with torch.enable_grad():
            heat = cam(crop, class_idx=explains)
        maps.append(heat[0, 0].detach().cpu().numpy())
    return np.stack(maps)


def heat_mass_inside(heat: np.ndarray, region: np.ndarray) -> float:
    """Fraction of the heat map's mass inside ``region`` (NaN for an all-zero map)."""
    total = float(heat.sum())
    return float(heat[region].sum()) / total if total > 0 else float("nan")


def _crops(item: dict[str, Any], pre: Compose, roi: TumourROId, *,
           filter_size: list[int]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The ROI crop, and the tumour mask and dilated mask cut exactly like it."""
    d = pre(dict(item))
    mask = d["mask"].float()
    dilated = MetaTensor(dilate(mask[None], filter_size=filter_size)[0], meta=mask.meta)

    def cut(image: torch.Tensor) -> torch.Tensor:
        out = roi({**d, "image": image, "seed": item.get("seed")})["image"]
        return torch.as_tensor(out).as_subclass(torch.Tensor)

    inside = [cut(m).numpy() > 0.5 for m in (mask, dilated)]
    return cut(d["image"]), *(m.any(axis=0) for m in inside)


def _largest_plane(mask: np.ndarray, axis: int) -> int:
    """Index of the plane along ``axis`` with the largest tumour area."""
    return int(np.argmax(mask.sum(axis=tuple(a for a in range(mask.ndim) if a != axis))))


def _overlay(path: Path, ct: np.ndarray, heat: np.ndarray, mask: np.ndarray,
             dilated: np.ndarray, *, title: str, dpi: int) -> Path:
    """CT crop in grey, heat map (scaled to its maximum) and the mask contours."""
    fig = Figure(figsize=(4.0, 4.2), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    ax.imshow(ct.T, cmap="gray", vmin=0.0, vmax=1.0, origin="lower", interpolation="nearest")
    peak = heat.max()
    scaled = (heat / peak if peak > 0 else heat).T
    # Opacity follows the heat, so a cold region shows the CT underneath.
    ax.imshow(scaled, cmap="jet", alpha=_HEAT_ALPHA * scaled, vmin=0.0, vmax=1.0,
              origin="lower", interpolation="bilinear")
    for region, style in ((mask, "solid"), (dilated, "dashed")):
        if region.any() and not region.all():
            ax.contour(region.T.astype(np.float32), levels=[0.5], colors="red",
                       linestyles=style, linewidths=1.0)
    ax.set_title(title, fontsize="small")
    ax.set_axis_off()
    fig.savefig(path)
    return path


def gradcam_overlays(rois: pd.DataFrame, *, preprocess: DictConfig, roi: DictConfig,
                     backbone: DictConfig, seed: int, head: LinearHead, n: int,
                     out_dir: str | Path, name: Callable[[str], str] = str,
                     finetune: dict[str, Any] | None = None, target_layer: str | None = None,
                     reference: str = "without_tumour", dpi: int = 100,
                     cache_dir: str | Path | None = None) -> pd.DataFrame:
    """Write Grad-CAM overlay PNGs for a sample of ROIs, ``<out_dir>/<name(patient)>.png``.

    With ``cache_dir``, each patient's overlay and row are kept there under a key of
    everything they depend on (the crop's image, mask and seed, the network's settings,
    weights and fine-tuning, the head, the preprocessing and ROI configs, the name, the code
    and matplotlib's version; not the batch size, workers or devices), and a
    later run copies them instead of mapping the patient again.

    The network is the one that embedded these patients: the configured weights, and with
    ``finetune`` the network fine-tuned on all training patients (pass test ROIs only).

    Args:
        rois: the ROIs to sample from (test patients), as for
            :func:`pdl1exp.features.extract.extract_features` (``image``, ``mask``,
            ``image_sha``, ``mask_key``, optional ``seed``).
        preprocess: the ``preprocess`` config.
        roi: the ``roi`` config.
        backbone: the ``backbone`` config.
        seed: seed of random weights, and of the sample.
        head: the DLR model's linear score (:func:`linear_head`); only its deep features
            (``dl_*``) are explained.
        n: patients to explain (``evaluation.gradcam_n``); all of them when fewer.
        out_dir: folder of the PNGs (created).
        name: patient_id → file stem and title (a pseudonym for shared reports).
        finetune: ``Extraction.finetune`` when the features were fine-tuned.
        target_layer: Grad-CAM layer inside the backbone; None: :func:`default_target_layer`.
        reference: ``without_tumour``: activations relative to the crop with the dilated
            tumour blanked (module docstring); ``none``: plain Grad-CAM.
        dpi: resolution.
        cache_dir: overlays and rows by content key (None: map every patient).

    Returns:
        One row per overlay (index: its name): ``path``, ``heat_mass_inside`` (fraction of
        the heat map's mass inside the tumour mask dilated by ``roi.mask_dilation_mm``) and
        ``area_inside`` (that region's share of the crop: the fraction a uniform map would
        get), ``score`` (the centred score: > 0 argues for the positive class),
        ``reference_score`` (the blanked crop's; NaN without a reference), ``explains``
        (``positive`` or ``negative``: the output the map explains, :func:`explained_class`),
        ``source``.
    """
    if reference not in _REFERENCES:
        msg = f"evaluation.gradcam_reference must be one of {_REFERENCES}, got {reference!r}"
        raise ValueError(msg)
    net, tag = build_network(backbone=backbone, roi=roi, seed=seed)
    if finetune:
        load_finetuned(net, finetune)
    deep = head.weights[head.weights.index.str.startswith(DEEP_PREFIX)]
    weight = torch.zeros(net.embedding_dim)
    weight[[int(c.removeprefix(DEEP_PREFIX)) for c in deep.index]] = torch.tensor(
        deep.to_numpy(), dtype=torch.float32)
    mean, std = input_normalisation(tag, arch=backbone.arch)
    model = LinearScore(net, weight=weight, mean=mean, std=std, offset=head.offset).eval()
    layer = target_layer or default_target_layer(net)
    steps = roi_transform(preprocess=preprocess, roi=roi).flatten().transforms
    cut = next(i for i, step in enumerate(steps) if isinstance(step, TumourROId))
    pre, crop = Compose(steps[:cut]), steps[cut]
    filter_size = [2 * math.ceil(crop.mask_dilation_mm / s) + 1 for s in preprocess.spacing_mm]
    axial = 0 if crop.layout == "zyx" else 2
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    sample = rois.sample(n=min(n, len(rois)), random_state=seed)
    store = None if cache_dir is None else Path(cache_dir)
    inputs = content_key({
        "weights": tag, "finetune": finetune, "head": deep.to_dict(), "offset": head.offset,
        "source": head.source, "layer": layer, "reference": reference, "dpi": dpi,
        "network": network_config(backbone),
        **{k: OmegaConf.to_container(c, resolve=True)
           for k, c in (("preprocess", preprocess), ("roi", roi))},
        "code": [code_key("features/explain.py"), extractor_code_version()],
        "matplotlib": matplotlib.__version__,
    })
    rows = []
    for pid, row in sample.iterrows():
        stem = name(str(pid))
        target = folder / f"{stem}.png"
        key = content_key({"inputs": inputs, "image": row["image_sha"], "mask": row["mask_key"],
                           "seed": row.get("seed"), "name": stem})
        kept = None if store is None else read_memo(store, key)
        if kept is not None and (store / f"{key}.png").is_file():
            shutil.copyfile(store / f"{key}.png", target)
            rows.append({**kept, "path": str(target)})
            continue
        item = {"patient_id": pid, "image": row["image"], "mask": row["mask"],
                "seed": row.get("seed")}
        image, mask, dilated = _crops(item, pre, crop, filter_size=filter_size)
        blanked = (image * torch.as_tensor(~dilated, dtype=image.dtype))[None]
        relative_to = blanked if reference == "without_tumour" else None
        out, reference_out = _outputs(model, image[None], relative_to)
        explains = _explained(out, reference_out)
        heat = gradcam_maps(model, image[None], target_layer=layer, reference=relative_to,
                            classes=[explains])[0]
        score = float(out[0, 0])
        reference_score = float("nan") if reference_out is None else float(reference_out[0, 0])
        inside = heat_mass_inside(heat, dilated)
        views = (image[0].numpy(), heat, mask, dilated)
        if heat.ndim == 3:
            index = _largest_plane(mask, axial)
            views = tuple(np.take(a, index, axis=axial) for a in views)
        title = f"{stem}: {inside:.0%} of the heat in the tumour + {crop.mask_dilation_mm:g} mm"
        _overlay(target, *views, title=title, dpi=dpi)
        result = {"name": stem, "heat_mass_inside": inside,
                  "area_inside": float(dilated.mean()), "score": score,
                  "reference_score": reference_score,
                  "explains": ("positive", "negative")[explains], "source": head.source}
        if store is not None:  # the figure first: a row is only read back beside its figure
            store.mkdir(parents=True, exist_ok=True)
            partial = store / f".{key}.{os.getpid()}.png"
            shutil.copyfile(target, partial)
            os.replace(partial, store / f"{key}.png")  # whole, for a concurrent run
            write_memo(store, key, result)
        rows.append({**result, "path": str(target)})
    log.info("Grad-CAM (%s, %s score) of %d patients: median %.0f%% of the heat in the tumour",
             layer, head.source, len(rows),
             100 * np.nanmedian([r["heat_mass_inside"] for r in rows]))
    return pd.DataFrame(rows).set_index("name")
