"""CPU throughput of the feature backbones in fp32 and bf16, against the machine's matmul peak.

The 2D backbone's measures are unprefixed (the ``backbone`` section's contract); the 3D one's
(``fmcib_3d``: FMCIB's trunk on its 50³ patch) carry its name as a prefix.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from pdl1exp.features.backbones import build_backbone

__all__ = ["run"]

MATMUL_SIZES = (2048, 4096)  # square sizes large enough to reach the BLAS / oneDNN peak
MATMUL_REPEATS = 8  # best of several: short enough to catch a moment without other load


def run(
    *,
    n_images: int = 64,
    n_volumes: int = 8,
    threads: int = 2,
    backbone: str = "resnet50_2d",
    backbone_3d: str = "fmcib_3d",
    conf_dir: str | Path = "conf",
) -> dict[str, float]:
    """Measure ROIs/s (fp32, bf16 autocast), FLOPs per ROI and the fp32/bf16 matmul peaks.

    The network, input channels, ROI size, batch size and memory format are those of the
    composed config with ``backbone=<name>``; inference runs in eval mode under
    ``torch.inference_mode``. ROIs/s are those of the median timed batch (``*_best_batch``:
    the fastest, the machine's capability when other processes compete for the cores);
    fractions are achieved FLOP/s of the median batch over the matmul peak.

    Args:
        n_images: 2D ROIs timed per precision (rounded up to whole batches).
        n_volumes: 3D ROIs timed per precision (rounded up to whole batches).
        threads: intra-op CPU threads.
        backbone: name of the 2D backbone config.
        backbone_3d: name of the 3D backbone config (measures prefixed with it).
        conf_dir: the Hydra config folder.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        peaks = {"fp32": _matmul_peak(torch.float32), "bf16": _matmul_peak(torch.bfloat16)}
        plain = _measure(_compose(conf_dir, backbone), n_images=n_images, peaks=peaks)
        volume = _measure(_compose(conf_dir, backbone_3d), n_images=n_volumes, peaks=peaks)
    finally:
        torch.set_num_threads(previous_threads)
    return {"threads": threads, **plain,
            **{f"{backbone_3d}_{k}": v for k, v in volume.items() if not k.startswith("matmul")}}


def _compose(conf_dir: str | Path, backbone: str) -> DictConfig:
    """The root config composed with ``backbone=<backbone>`` (its ROI and preprocessing)."""
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        return compose("config", overrides=[f"backbone={backbone}"])


def _measure(cfg: DictConfig, *, n_images: int, peaks: dict[str, float]) -> dict[str, float]:
    """Throughput of ``cfg.backbone`` on random inputs of its ROI's shape."""
    bb = cfg.backbone
    net = build_backbone(name=bb.arch, spatial_dims=bb.spatial_dims, in_channels=cfg.roi.channels,
                         multi_stage=bb.multi_stage).eval()
    batch = torch.rand(bb.batch_size, cfg.roi.channels, *bb.input_size)
    if bb.channels_last:
        memory_format = torch.channels_last if bb.spatial_dims == 2 else torch.channels_last_3d
        net = net.to(memory_format=memory_format)
        batch = batch.contiguous(memory_format=memory_format)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(batch[:1])
    flop_per_image = counter.get_total_flops()
    n_batches = math.ceil(n_images / bb.batch_size)
    fp32, fp32_best = _rois_per_s(net, batch, n_batches=n_batches, bf16=False)
    bf16, bf16_best = _rois_per_s(net, batch, n_batches=n_batches, bf16=True)
    peak_fp32, peak_bf16 = peaks["fp32"], peaks["bf16"]
    return {
        "input_size": "x".join(str(s) for s in bb.input_size),
        "batch_size": bb.batch_size,
        "images_timed": n_batches * bb.batch_size,
        "gflop_per_image": flop_per_image / 1e9,
        "fp32_rois_per_s": fp32,
        "bf16_rois_per_s": bf16,
        "fp32_rois_per_s_best_batch": fp32_best,
        "bf16_rois_per_s_best_batch": bf16_best,
        "fp32_gflop_per_s": fp32 * flop_per_image / 1e9,
        "bf16_gflop_per_s": bf16 * flop_per_image / 1e9,
        "matmul_peak_fp32_gflop_per_s": peak_fp32 / 1e9,
        "matmul_peak_bf16_gflop_per_s": peak_bf16 / 1e9,
        "fp32_fraction_of_peak": fp32 * flop_per_image / peak_fp32,
        "bf16_fraction_of_peak": bf16 * flop_per_image / peak_bf16,
    }


def _rois_per_s(
    net: torch.nn.Module, batch: torch.Tensor, *, n_batches: int, bf16: bool
) -> tuple[float, float]:
    """ROIs per second of the median and of the fastest of ``n_batches`` timed forwards."""
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    seconds = []
    with torch.inference_mode(), precision:
        net(batch)  # oneDNN picks and caches its kernels on the first call
        for _ in range(n_batches):
            start = time.perf_counter()
            net(batch)
            seconds.append(time.perf_counter() - start)
    return len(batch) / statistics.median(seconds), len(batch) / min(seconds)


def _matmul_peak(dtype: torch.dtype) -> float:
    """Best FLOP/s of square ``torch.matmul`` over ``MATMUL_SIZES``."""
    best = 0.0
    for n in MATMUL_SIZES:
        a = torch.rand(n, n, dtype=dtype)
        b = torch.rand(n, n, dtype=dtype)
        torch.matmul(a, b)
        for _ in range(MATMUL_REPEATS):
            start = time.perf_counter()
            torch.matmul(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
