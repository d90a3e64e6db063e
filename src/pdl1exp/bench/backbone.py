"""Throughput of the feature backbones per precision path, against the machine's matmul peak.

The 2D backbone's measures are unprefixed (the ``backbone`` section's contract); the 3D one's
(``fmcib_3d``: FMCIB's trunk on its 50³ patch) carry its name as a prefix. On the CPU
(``backbone``) or a CUDA GPU (``backbone_gpu``, ``device="cuda"``).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from pdl1exp.features.backbones import build_backbone
from pdl1exp.features.extractor import DeepFeatureExtractor
from pdl1exp.paths import CONFIG_DIR

__all__ = ["bf16_supported", "cpu_bf16", "run"]

MATMUL_SIZES = (2048, 4096)  # square sizes large enough to reach the BLAS / oneDNN peak
GPU_MATMUL_SIZES = (8192,)  # one 8192³ product fills an H100/H200's matrix units
GPU_MATMUL_CALLS = 10  # products per timing on a GPU (one takes about a millisecond)
MATMUL_REPEATS = 8  # best of several: short enough to catch a moment without other load
# Each path is timed on at least as many batches, so that the ROI rate and the peak it is
# divided by are both the best of the same number of timings. On a shared 2-core VM,
# ResNet50 2D fp32 read 49 % of the peak on 2 batches and 64-70 % on 8.
MIN_TIMED_BATCHES = MATMUL_REPEATS


def run(
    *,
    n_images: int = 64,
    n_volumes: int = 8,
    threads: int = 2,
    backbone: str = "resnet50_2d",
    backbone_3d: str = "fmcib_3d",
    compile_2d: bool = True,
    matmul_sizes: tuple[int, ...] | None = None,
    overrides: tuple[str, ...] = (),
    overrides_3d: tuple[str, ...] = (),
    conf_dir: str | Path = CONFIG_DIR,
    device: str = "cpu",
) -> dict[str, Any]:
    """Measure ROIs/s per precision path, FLOPs per ROI and the fp32/bf16 matmul peaks.

    Paths, each through :class:`~pdl1exp.features.extractor.DeepFeatureExtractor` as the
    pipeline runs it: ``fp32``; ``autocast`` (Lightning ``bf16-mixed``); ``bf16`` (Lightning
    ``bf16-true``: the network and inputs converted to bf16, the default); ``bf16_compiled``
    (``bf16`` under ``torch.compile``, 2D only; ``bf16_compile_s``: the one-off compile). The
    network, channels, ROI size, batch size and memory format are those of the composed config
    with ``backbone=<name>``. ROIs/s are those of the fastest timed batch (the machine's
    capability: other processes share the cores), of at least :data:`MIN_TIMED_BATCHES`
    batches, as many as the peak's timings per size; ``*_fraction_of_peak`` is the achieved
    FLOP/s over the matmul peak of the same dtype, ``bf16_fraction_of_peak`` that of the
    default ``bf16`` path; ``*_cosine_min``: least cosine similarity to the fp32 features.
    Without bf16 kernels (:func:`bf16_supported` False) only ``fp32`` is timed, and the bf16
    peak and ``*bf16_fraction_of_peak`` are None (not measured). On a CUDA device every timing
    waits for the device (``torch.cuda.synchronize``), and ``fp32`` is what the pipeline's
    ``32-true`` runs there: TF32 convolutions (cuDNN's default), so its peak is the TF32
    matmul's.

    Args:
        n_images: 2D ROIs timed per path (rounded up to whole batches, at least
            :data:`MIN_TIMED_BATCHES`).
        n_volumes: 3D ROIs timed per path (likewise).
        threads: intra-op CPU threads.
        backbone: name of the 2D backbone config.
        backbone_3d: name of the 3D backbone config (measures prefixed with it).
        compile_2d: also time the compiled 2D path (its compile takes about a minute).
        matmul_sizes: square matmul sizes of the peak measurement; None:
            :data:`MATMUL_SIZES` on the CPU, :data:`GPU_MATMUL_SIZES` on a GPU.
        overrides: extra Hydra overrides of the 2D config, e.g. ``("backbone.batch_size=2",)``.
        overrides_3d: extra Hydra overrides of the 3D config.
        conf_dir: the Hydra config folder.
        device: ``cpu`` or a CUDA device (``cuda``, ``cuda:1``).
    """
    device = torch.device(device)
    bf16 = bf16_supported(device)
    if matmul_sizes is None:
        matmul_sizes = GPU_MATMUL_SIZES if device.type == "cuda" else MATMUL_SIZES
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        peaks = {"fp32": _matmul_peak(torch.float32, sizes=matmul_sizes, device=device)}
        if bf16:
            peaks["bf16"] = _matmul_peak(torch.bfloat16, sizes=matmul_sizes, device=device)
        plain = _measure(_compose(conf_dir, backbone, overrides), n_images=n_images,
                         peaks=peaks, compiled=compile_2d, device=device)
        volume = _measure(_compose(conf_dir, backbone_3d, overrides_3d), n_images=n_volumes,
                          peaks=peaks, compiled=False, device=device)
    finally:
        torch.set_num_threads(previous_threads)
    where = ({"device": torch.cuda.get_device_name(device)} if device.type == "cuda"
             else {"threads": threads})
    return {**where, "bf16_supported": bf16,
            "matmul_peak_fp32_gflop_per_s": peaks["fp32"] / 1e9,
            "matmul_peak_bf16_gflop_per_s": peaks["bf16"] / 1e9 if bf16 else None, **plain,
            **{f"{backbone_3d}_{k}": v for k, v in volume.items()}}


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` has bf16 kernels: :func:`cpu_bf16` on the CPU; on a GPU, compute
    capability 8.0 (Ampere) or later (earlier ones emulate bf16)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return cpu_bf16()


def cpu_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (as for extraction's precision).

    Without them bf16 is emulated, orders of magnitude slower: extraction runs in fp32 there
    (:func:`pdl1exp.features.extract.resolve_precision`), so the bf16 paths are not timed.
    """
    return bool(torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _compose(conf_dir: str | Path, backbone: str, overrides: tuple[str, ...]) -> DictConfig:
    """The root config composed with ``backbone=<backbone>`` (its ROI and preprocessing)."""
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        return compose("config", overrides=[f"backbone={backbone}", *overrides])


def _extractor(cfg: DictConfig, *, dtype: torch.dtype, compiled: bool,
               device: torch.device) -> DeepFeatureExtractor:
    """The pipeline's extractor module, converted to ``dtype`` like Lightning's ``*-true``."""
    bb = cfg.backbone
    torch.manual_seed(0)
    net = build_backbone(name=bb.arch, spatial_dims=bb.spatial_dims, in_channels=cfg.roi.channels,
                         multi_stage=bb.multi_stage)
    channels = cfg.roi.channels
    module = DeepFeatureExtractor(net, mean=[0.5] * channels, std=[0.25] * channels,
                                  channels_last=bb.channels_last, compile_backbone=compiled,
                                  fold_batch_norm=bb.fold_batch_norm)
    module = module.to(device=device, dtype=dtype).eval()
    module.on_predict_start()
    return module


def _measure(cfg: DictConfig, *, n_images: int, peaks: dict[str, float],
             compiled: bool, device: torch.device) -> dict[str, Any]:
    """Throughput of ``cfg.backbone``'s paths on random inputs of its ROI's shape: the bf16
    ones only with a bf16 peak in ``peaks`` (else ``bf16_fraction_of_peak`` is None)."""
    bb = cfg.backbone
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(bb.batch_size, cfg.roi.channels, *bb.input_size,
                       generator=generator).to(device)
    reference = _extractor(cfg, dtype=torch.float32, compiled=False, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        reference.backbone(batch[:1])
    flop = counter.get_total_flops()
    n_batches = max(math.ceil(n_images / bb.batch_size), MIN_TIMED_BATCHES)
    bf16 = "bf16" in peaks
    paths = {"fp32": (torch.float32, False, False)}
    if bf16:
        paths |= {"autocast": (torch.float32, True, False),
                  "bf16": (torch.bfloat16, False, False)}
        if compiled:
            paths["bf16_compiled"] = (torch.bfloat16, False, True)
    results: dict[str, Any] = {
        "input_size": "x".join(str(s) for s in bb.input_size), "batch_size": bb.batch_size,
        "images_timed": n_batches * bb.batch_size, "gflop_per_image": flop / 1e9}
    if not bf16:  # a target the report lists as not measured
        results["bf16_fraction_of_peak"] = None
    with torch.inference_mode():
        expected = reference(batch)
    for path, (dtype, autocast, compile_backbone) in paths.items():
        module = reference if path == "fp32" else _extractor(
            cfg, dtype=dtype, compiled=compile_backbone, device=device)
        rate, features, first_s = _rois_per_s(module, batch.to(dtype), n_batches=n_batches,
                                              autocast=autocast)
        if compile_backbone:  # the first call compiles
            results[f"{path}_compile_s"] = first_s - len(batch) / rate
        peak = peaks["fp32" if path == "fp32" else "bf16"]
        results[f"{path}_rois_per_s"] = rate
        results[f"{path}_gflop_per_s"] = rate * flop / 1e9
        results[f"{path}_fraction_of_peak"] = rate * flop / peak
        results[f"{path}_cosine_min"] = float(
            torch.nn.functional.cosine_similarity(features, expected).min())
    return results


def _rois_per_s(module: DeepFeatureExtractor, batch: torch.Tensor, *, n_batches: int,
                autocast: bool) -> tuple[float, torch.Tensor, float]:
    """ROIs/s of the fastest of ``n_batches`` timed forwards, the features, the first call's s.

    The first call (untimed in the rate) lets oneDNN pick and cache its kernels, initialises
    cuDNN and cuBLAS on a GPU, or compiles.
    """
    device = batch.device
    precision = (torch.autocast(device.type, dtype=torch.bfloat16) if autocast
                 else nullcontext())
    seconds = []
    with torch.inference_mode(), precision:
        start = time.perf_counter()
        features = module(batch)
        _wait(device)
        first_s = time.perf_counter() - start
        for _ in range(n_batches):
            start = time.perf_counter()
            module(batch)
            _wait(device)
            seconds.append(time.perf_counter() - start)
    return len(batch) / min(seconds), features.float(), first_s


def _wait(device: torch.device) -> None:
    """Wait for the work queued on a CUDA ``device`` (CPU work is already done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matmul_peak(dtype: torch.dtype, *, sizes: tuple[int, ...], device: torch.device) -> float:
    """Best FLOP/s of square ``torch.matmul`` over ``sizes`` on ``device``: each timing is one
    product on the CPU, :data:`GPU_MATMUL_CALLS` queued ones on a GPU (in fp32 with TF32, as
    its convolutions run)."""
    calls = GPU_MATMUL_CALLS if device.type == "cuda" else 1
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    best = 0.0
    try:
        for n in sizes:
            a = torch.rand(n, n, dtype=dtype, device=device)
            b = torch.rand(n, n, dtype=dtype, device=device)
            torch.matmul(a, b)
            _wait(device)
            for _ in range(MATMUL_REPEATS):
                start = time.perf_counter()
                for _ in range(calls):
                    torch.matmul(a, b)
                _wait(device)
                best = max(best, calls * 2 * n**3 / (time.perf_counter() - start))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return best


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
