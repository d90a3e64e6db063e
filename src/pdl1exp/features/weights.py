"""Backbone weights: ImageNet, a checkpoint file or seeded random, tagged by what was loaded.

FMCIB's published ``fmcib.torch`` is a user-supplied file (never downloaded here): its trunk
sits under ``trunk_state_dict`` (AIM-Harvard/foundation-cancer-image-biomarker,
``fmcib/models/resnet50.py`` lines 26-27, ``fmcib/models/load_model.py`` ``LoadModel.load``),
and FMCIB feeds the network its [0, 1]-scaled patch without further normalisation
(``fmcib/preprocessing/__init__.py`` ``get_transforms``: ``ScaleIntensityRanged`` is the
last intensity step).
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from pathlib import Path

import torch
from monai.utils import look_up_option
from safetensors.torch import load_file

from pdl1exp.features.backbones import BACKBONES, build_backbone

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGENET_URLS",
    "NEUTRAL_MEAN",
    "NEUTRAL_STD",
    "RAW_MEAN",
    "RAW_STD",
    "input_normalisation",
    "load_weights",
]

logger = logging.getLogger(__name__)

# torchvision's published 2D checkpoints, preferred first (resnet50: IMAGENET1K_V2, then V1).
# The 8 hex digits in each file name are the start of the file's sha256.
IMAGENET_URLS: dict[str, tuple[str, ...]] = {
    "resnet50": (
        "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
        "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    ),
    "resnet18": ("https://download.pytorch.org/models/resnet18-f37072fd.pth",),
    "densenet121": ("https://download.pytorch.org/models/densenet121-a639ec97.pth",),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# An untrained network has no input statistics to match: map a [0, 1] intensity window to
# [-1, 1], zero-centred at roughly the scale ImageNet-normalised inputs have. One value,
# broadcast over any number of input channels.
NEUTRAL_MEAN = (0.5,)
NEUTRAL_STD = (0.5,)
# Checkpoints trained on the [0, 1] window itself (FMCIB) take it unchanged.
RAW_MEAN = (0.0,)
RAW_STD = (1.0,)
_RAW_INPUT_ARCHS = ("fmcib_resnet50",)

WEIGHT_MODES = ("auto", "imagenet", "random")
TAG_KINDS = ("imagenet", "file", "random")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors", ".torch")
# FMCIB (VISSL) keeps its trunk under trunk_state_dict, beside head_state_dict.
_WRAPPER_KEYS = ("trunk_state_dict", "state_dict", "model")
# Classification heads of torchvision (fc, classifier) and MONAI (fc): the embedding has none.
_HEAD_PREFIXES = ("fc.", "classifier.")
# torchvision DenseNet keys `denselayerN.norm1.` (or pre-0.3 `norm.1.`) sit under MONAI's
# `denselayerN.layers.norm1.`.
_TORCHVISION_DENSE_KEY = re.compile(r"^(.*denselayer\d+)\.(norm|relu|conv)\.?([12])\.")
_SHOWN_KEYS = 5  # offending keys quoted per kind when a checkpoint does not fit


def load_weights(
    net: torch.nn.Module,
    *,
    weights: str,
    seed: int,
    arch: str,
    hub_dir: str | Path | None = None,
    allow_download: bool = False,
) -> str:
    """Load weights into ``net`` strictly and return the tag of what was really loaded.

    Tags: ``imagenet:<sha12>`` and ``file:<sha12>`` (first 12 hex digits of the checkpoint
    file's sha256) or ``random:<seed>``. torchvision key layouts are mapped onto MONAI's and
    classification heads dropped; everything else must match in name and shape.

    Args:
        net: a network from :func:`pdl1exp.features.backbones.build_backbone` (or the plain
            MONAI network of the same layout).
        weights: ``auto`` (ImageNet when its checkpoint is cached, else seeded random with a
            warning), ``imagenet``, ``random``, or a ``.pth``/``.pt``/``.safetensors``/``.torch``
            path (FMCIB's ``fmcib.torch``: its ``trunk_state_dict``).
        seed: seed of the random initialisation.
        arch: architecture of ``net``, one of ``BACKBONES``; selects the ImageNet checkpoint.
        hub_dir: torch hub folder holding ``checkpoints/<file>``; default
            ``torch.hub.get_dir()``.
        allow_download: fetch a missing ImageNet checkpoint (hash-checked) into ``hub_dir``.
    """
    arch = look_up_option(arch, BACKBONES)
    if weights == "random":
        return _load_random(net, seed=seed, arch=arch)
    if weights not in WEIGHT_MODES:
        sha = _load_file(net, path=Path(weights), arch=arch)
        return f"file:{sha[:12]}"

    spatial_dims, _ = _stem_geometry(net)
    if weights == "imagenet" and spatial_dims != 2:
        msg = (
            f"weights=imagenet needs a 2D network, got spatial_dims={spatial_dims}: torchvision "
            "publishes only 2D ImageNet checkpoints; use weights=random or a checkpoint file"
        )
        raise ValueError(msg)
    folder = Path(hub_dir if hub_dir is not None else torch.hub.get_dir()) / "checkpoints"
    path = (
        _imagenet_checkpoint(arch=arch, folder=folder, allow_download=allow_download)
        if spatial_dims == 2
        else None
    )
    if path is None:
        names = ", ".join(_file_name(url) for url in IMAGENET_URLS[arch])
        if weights == "imagenet":
            msg = (
                f"ImageNet checkpoint for {arch} not found: put {names} (from "
                f"{IMAGENET_URLS[arch][0]}) into {folder} or set backbone.allow_download=true"
            )
            raise FileNotFoundError(msg)
        msg = (
            f"weights=auto: no ImageNet checkpoint for {arch} with spatial_dims={spatial_dims} "
            f"(looked for {names} in {folder}, allow_download={allow_download}); "
            f"deep features come from an UNTRAINED network with random weights (seed {seed})"
        )
        _warn(msg)
        return _load_random(net, seed=seed, arch=arch)

    sha = _load_file(net, path=path, arch=arch)
    expected_prefix = _hash_prefix(path.name)
    if not sha.startswith(expected_prefix):
        msg = (
            f"{path} is not the published torchvision file: its sha256 {sha[:12]}... does not "
            f"start with {expected_prefix}; loaded anyway and tagged with its own hash"
        )
        _warn(msg)
    return f"imagenet:{sha[:12]}"


def input_normalisation(
    weights_tag: str, *, arch: str = "resnet50"
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` to apply to ``[0, 1]`` inputs for the loaded weights.

    For ``random:`` weights the neutral ``(0.5, 0.5)``, which maps ``[0, 1]`` onto
    ``[-1, 1]``; for ``file:`` weights of ``fmcib_resnet50`` none (``(0, 1)``: FMCIB was
    trained on the [0, 1] window); else ImageNet statistics (checkpoint files are taken to be
    torchvision-style ImageNet networks or their fine-tunes). One-value statistics broadcast
    over any number of channels.

    Args:
        weights_tag: the tag returned by :func:`load_weights`.
        arch: architecture the weights were loaded into, one of ``BACKBONES``.
    """
    kind = look_up_option(weights_tag.partition(":")[0], TAG_KINDS)
    arch = look_up_option(arch, BACKBONES)
    if kind == "random":
        return NEUTRAL_MEAN, NEUTRAL_STD
    if arch in _RAW_INPUT_ARCHS:
        return RAW_MEAN, RAW_STD
    return IMAGENET_MEAN, IMAGENET_STD


def _warn(msg: str) -> None:
    """Warn in the console and in the run's log, so neither reader misses it."""
    warnings.warn(msg, UserWarning, stacklevel=3)
    logger.warning(msg)


def _stem_geometry(net: torch.nn.Module) -> tuple[int, int]:
    """``(spatial_dims, in_channels)`` read from the stem convolution, the first parameter."""
    stem = next(net.parameters())
    return stem.ndim - 2, stem.shape[1]


def _load_random(net: torch.nn.Module, *, seed: int, arch: str) -> str:
    """Give ``net`` the initialisation of a freshly built backbone under ``seed``."""
    spatial_dims, in_channels = _stem_geometry(net)
    # A forked RNG keeps the caller's global random stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = build_backbone(name=arch, spatial_dims=spatial_dims, in_channels=in_channels)
    tag = f"random:{seed}"
    _load_strict(net, fresh.state_dict(), source=tag, arch=arch)
    logger.info("Backbone %s initialised with seeded random weights (%s)", arch, tag)
    return tag


def _imagenet_checkpoint(*, arch: str, folder: Path, allow_download: bool) -> Path | None:
    """The cached ImageNet checkpoint of ``arch``, downloaded when allowed, else None."""
    urls = IMAGENET_URLS[arch]
    for url in urls:
        path = folder / _file_name(url)
        if path.is_file():
            return path
    if not allow_download:
        return None
    path = folder / _file_name(urls[0])
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("Downloading %s to %s", urls[0], path)
    # What torch.hub.load_state_dict_from_url(check_hash=True) does, without loading twice.
    torch.hub.download_url_to_file(urls[0], str(path), hash_prefix=_hash_prefix(path.name))
    return path


def _file_name(url: str) -> str:
    """The checkpoint's file name, as torch.hub caches it."""
    return url.rsplit("/", 1)[-1]


def _hash_prefix(file_name: str) -> str:
    """The sha256 prefix torchvision writes into checkpoint file names."""
    return torch.hub.HASH_REGEX.search(file_name).group(1)


def _load_file(net: torch.nn.Module, *, path: Path, arch: str) -> str:
    """Load the checkpoint at ``path`` strictly into ``net``; return the file's sha256."""
    if not path.is_file():
        msg = (
            f"weights={str(path)!r} is neither one of {', '.join(WEIGHT_MODES)} "
            "nor an existing checkpoint file"
        )
        raise FileNotFoundError(msg)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        msg = f"checkpoint {path} must end in one of {', '.join(CHECKPOINT_SUFFIXES)}"
        raise ValueError(msg)
    sha = _sha256(path)
    try:
        if path.suffix == ".safetensors":
            content = load_file(path)
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # Unpickling arbitrary bytes can fail with almost any exception type (KeyError, ...).
        reason = str(exc).partition("\n")[0]
        msg = f"cannot read checkpoint {path} (corrupt or not a checkpoint): {reason}"
        raise ValueError(msg) from exc
    state = _to_monai_layout(_unwrap(content, path=path))
    _load_strict(net, state, source=str(path), arch=arch)
    logger.info("Backbone %s loaded from %s (sha256 %s)", arch, path, sha[:12])
    return sha


def _unwrap(content: object, *, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers."""
    if isinstance(content, dict):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(content.get(k), dict)), None)
        content = content[wrapper] if wrapper else content
    if not isinstance(content, dict) or not all(
        isinstance(v, torch.Tensor) for v in content.values()
    ):
        msg = f"checkpoint {path} does not hold a state dict (a mapping of names to tensors)"
        raise ValueError(msg)
    return content


def _to_monai_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map torchvision / DataParallel key names onto MONAI's and drop classification heads."""
    mapped = {}
    for key, value in state.items():
        name = _TORCHVISION_DENSE_KEY.sub(r"\1.layers.\2\3.", key.removeprefix("module."))
        if not name.startswith(_HEAD_PREFIXES):
            mapped[name] = value
    return mapped


def _load_strict(
    net: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str, arch: str
) -> None:
    """``net.load_state_dict(state, strict=True)`` with an error that lists what differs."""
    expected = net.state_dict()
    # Checkpoints saved before PyTorch 0.4.1 (densenet121-a639ec97) lack the BatchNorm step
    # counters, which inference never reads.
    state = {
        **{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")},
        **state,
    }
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {list(v.shape)} vs network {list(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:_SHOWN_KEYS])}"
        + (", ..." if len(keys) > _SHOWN_KEYS else "")
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        expected_layout = (
            "FMCIB's fmcib.torch with its trunk_state_dict"
            if arch in _RAW_INPUT_ARCHS
            else f"a torchvision- or MONAI-layout {arch} state dict"
        )
        msg = (
            f"weights from {source} do not fit the {arch} backbone ({expected_layout} is "
            "expected); " + "; ".join(problems)
        )
        raise ValueError(msg)
    net.load_state_dict(state, strict=True)


def _sha256(path: Path) -> str:
    """Hex sha256 of the file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
