"""CPU throughput of a feature backbone in fp32 and bf16, against the machine's matmul peak."""

from __future__ import annotations

import json
import math
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from pdl1exp.features.backbones import build_backbone

__all__ = ["run"]

MATMUL_SIZES = (2048, 4096)  # square sizes large enough to reach the BLAS / oneDNN peak
MATMUL_REPEATS = 8  # best of several: short enough to catch a moment without other load


def run(
    *,
    n_images: int = 64,
    threads: int = 2,
    backbone: str = "resnet50_2d",
    conf_dir: str | Path = "conf",
) -> dict[str, float]:
    """Measure ROIs/s (fp32, bf16 autocast), FLOPs per ROI and the fp32/bf16 matmul peaks.

    The network, ROI size, batch size and memory format are those of
    ``conf/backbone/<backbone>.yaml``; inference runs in eval mode under
    ``torch.inference_mode``. ROIs/s are those of the median timed batch (``*_best_batch``:
    the fastest, the machine's capability when other processes compete for the cores);
    fractions are achieved FLOP/s of the median batch over the matmul peak.

    Args:
        n_images: ROIs timed per precision (rounded up to whole batches).
        threads: intra-op CPU threads.
        backbone: name of the backbone config.
        conf_dir: the Hydra config folder.
    """
    cfg = OmegaConf.load(Path(conf_dir) / "backbone" / f"{backbone}.yaml")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        net = build_backbone(
            name=cfg.arch, spatial_dims=cfg.spatial_dims, multi_stage=cfg.multi_stage
        ).eval()
        batch = torch.rand(cfg.batch_size, 3, *cfg.input_size)
        if cfg.channels_last:
            memory_format = torch.channels_last if cfg.spatial_dims == 2 else torch.channels_last_3d
            net = net.to(memory_format=memory_format)
            batch = batch.contiguous(memory_format=memory_format)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            net(batch[:1])
        flop_per_image = counter.get_total_flops()
        n_batches = math.ceil(n_images / cfg.batch_size)
        fp32, fp32_best = _rois_per_s(net, batch, n_batches=n_batches, bf16=False)
        bf16, bf16_best = _rois_per_s(net, batch, n_batches=n_batches, bf16=True)
        peak_fp32 = _matmul_peak(torch.float32)
        peak_bf16 = _matmul_peak(torch.bfloat16)
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "threads": threads,
        "batch_size": cfg.batch_size,
        "images_timed": n_batches * cfg.batch_size,
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
