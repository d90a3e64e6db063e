"""The one preprocessing chain (MONAI transforms) used for training and for ``predict``."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from itertools import product

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data.utils import affine_to_spacing, compute_shape_offset, zoom_affine
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from pdl1exp.imaging.crop import TumourROId, seed_voxel
from pdl1exp.imaging.reader import SimpleITKReader

__all__ = ["AXIS_LABELS", "ROISpacingd", "build_transforms"]

# Axis labels of the reader's RAS affines (as NIfTI's), named rather than left to a MONAI
# default that is changing.
AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


class ROISpacingd(MapTransform):
    """``Spacingd`` of an image and its tumour mask, resampled only where the crop reads.

    The output grid is ``Spacingd``'s (its affine and shape); of it, only the
    box that ``roi`` may read (:meth:`~pdl1exp.imaging.crop.TumourROId.support`, around the
    mask's voxels mapped from the input grid, and the seed) is resampled, both volumes on the
    image's grid. The crop is then the one of the whole resampled volume, for a fraction of
    the resampling: the whole grid took 2/3 of the chain's time on the embedded cohort's small
    volumes, and grows with the scan, not the tumour. The sampling positions are the same up
    to rounding, which can break a nearest-neighbour tie of the mask (a position halfway
    between two input voxels) the other way. A mask with no voxel and no seed resamples the
    whole grid (the crop then names the problem).

    Args:
        keys: the image key and the mask key, in that order.
        pixdim: output voxel size in mm.
        mode: interpolation of the image and of the mask.
        roi: the crop that follows (after pointwise intensity transforms only).
    """

    def __init__(self, keys: KeysCollection, *, pixdim: Sequence[float],
                 mode: Sequence[str], roi: TumourROId) -> None:
        super().__init__(keys)
        self.spacing = Spacingd(keys, pixdim=pixdim, mode=mode)
        self.roi = roi

    def _box(self, mask: torch.Tensor, native: np.ndarray, grid: np.ndarray,
             shape: np.ndarray, seed_mm: Sequence[float] | None) -> tuple[np.ndarray, ...]:
        """Start and stop (exclusive) of the output voxels the crop may read (``native``:
        the mask's affine; ``grid``, ``shape``: the whole output grid's)."""
        voxels = np.argwhere(np.asarray(mask[0]) > 0)
        seed = None if seed_mm is None else seed_voxel(seed_mm, grid)
        if len(voxels) == 0 and seed is None:
            return np.zeros(3, dtype=int), shape
        if len(voxels):  # the input box's corners, one voxel out, on the output grid
            corners = np.array(list(product(*zip(voxels.min(0) - 1, voxels.max(0) + 1,
                                                 strict=True))), dtype=float)
            to_output = np.linalg.solve(grid, native)
            mapped = corners @ to_output[:3, :3].T + to_output[:3, 3]
            lo, hi = mapped.min(0), mapped.max(0)
        else:
            lo = hi = seed
        first, last = self.roi.support(lo, hi, affine_to_spacing(grid), seed)
        start = np.clip(np.floor(first).astype(int) - 1, 0, shape)
        stop = np.clip(np.ceil(last).astype(int) + 2, start + 1, shape)
        return start, stop

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image_key, mask_key = self.keys
        spacing = self.spacing.spacing_transform
        native = np.asarray(d[image_key].affine, dtype=float)
        # Spacing's output grid, as it computes it (monai.transforms.Spacing.__call__): the
        # very matrix, so that voxel sizes match the whole-grid resampling to the last bit.
        grid = zoom_affine(native, spacing.pixdim, diagonal=spacing.diagonal)
        shape, offset = compute_shape_offset(d[image_key].shape[1:], native, grid,
                                             spacing.scale_extent)
        grid[:3, 3] = offset[:3]
        shape = np.asarray(shape, dtype=int)
        start, stop = self._box(d[mask_key], np.asarray(d[mask_key].affine, dtype=float), grid,
                                shape, d.get(self.roi.seed_key))
        box = grid.copy()
        box[:3, 3] = grid[:3, :3] @ start + grid[:3, 3]
        for key, mode, padding, corners, dtype in self.key_iterator(
                d, self.spacing.mode, self.spacing.padding_mode, self.spacing.align_corners,
                self.spacing.dtype):
            d[key] = spacing.sp_resample(d[key], dst_affine=torch.as_tensor(box),
                                         spatial_size=(stop - start).tolist(), mode=mode,
                                         padding_mode=padding, align_corners=corners,
                                         dtype=dtype)
        return d


def build_transforms(*, spacing_mm: Sequence[float], axcodes: str, window_width: float,
                     window_level: float, roi: TumourROId) -> Compose:
    """Load → canonical orientation → resample → HU window to [0, 1] → tumour ROI crop.

    Items are dictionaries with ``image`` and ``mask`` paths; the output ``image`` is the
    crop tensor of ``roi``. CT is resampled linearly, masks with nearest neighbour, both only
    where the crop reads (:class:`ROISpacingd`).

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
        ROISpacingd(keys, pixdim=tuple(spacing_mm), mode=("bilinear", "nearest"), roi=roi),
        ScaleIntensityRanged("image", a_min=window_level - window_width / 2,
                             a_max=window_level + window_width / 2, b_min=0.0, b_max=1.0,
                             clip=True),
        roi,
        EnsureTyped("image", track_meta=False),
    ])
