"""The one preprocessing chain (MONAI transforms) used for training and for ``predict``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from pdl1exp.imaging.crop import TumourROId
from pdl1exp.imaging.reader import SimpleITKReader

__all__ = ["AXIS_LABELS", "build_transforms"]

# Axis labels of the reader's RAS affines (as NIfTI's), named rather than left to a MONAI
# default that is changing.
AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def build_transforms(*, spacing_mm: Sequence[float], axcodes: str, window_width: float,
                     window_level: float, roi: TumourROId) -> Compose:
    """Load → canonical orientation → resample → HU window to [0, 1] → tumour ROI crop.

    Items are dictionaries with ``image`` and ``mask`` paths; the output ``image`` is the
    crop tensor of ``roi``. CT is resampled linearly, masks with nearest neighbour.

    Args:
        spacing_mm: target voxel size (x, y, z).
        axcodes: canonical orientation, e.g. ``"RAS"``.
        window_width: HU window width (lung W1500, mediastinal W350).
        window_level: HU window level (lung L-600, mediastinal L40).
        roi: the crop transform.
    """
    keys = ("image", "mask")
    return Compose([
        LoadImaged(keys, reader=SimpleITKReader(), image_only=True, ensure_channel_first=True,
                   dtype=np.float32),
        Orientationd(keys, axcodes=axcodes, labels=AXIS_LABELS),
        Spacingd(keys, pixdim=tuple(spacing_mm), mode=("bilinear", "nearest")),
        ScaleIntensityRanged("image", a_min=window_level - window_width / 2,
                             a_max=window_level + window_width / 2, b_min=0.0, b_max=1.0,
                             clip=True),
        roi,
        EnsureTyped("image", track_meta=False),
    ])
