"""Tumour ROI crops for the backbone: 2D max-area slice, 2.5D (adjacent or orthogonal), 3D.

Crops are squares (cubes) centred on the tumour's bounding box, as wide as its largest
in-plane extent plus a margin in mm on each side, then resized to the backbone input. Grey
CT is stacked to three channels: the same slice three times (2D), neighbouring slices
(2.5D adjacent) or the axial, coronal and sagittal planes (2.5D orthogonal).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import look_up_option
from scipy import ndimage

__all__ = ["ROI_MODES", "TumourROId"]

ROI_MODES = ("2d", "2.5d_adjacent", "2.5d_orthogonal", "3d")
_CROPS = ("context", "masked")


def _square(volume: torch.Tensor, centre: Sequence[float], half: Sequence[float],
            axes: Sequence[int], index: int | None, size: Sequence[int]) -> torch.Tensor:
    """Resample the box ``centre ± half`` (voxels) of ``volume`` on ``axes`` to ``size``.

    With ``index`` set, the remaining axis is fixed at that voxel (a plane); otherwise the
    box is 3D. Outside the volume counts as background (zero after windowing).
    """
    lo = [int(np.floor(centre[a] - half[a])) for a in axes]
    hi = [int(np.ceil(centre[a] + half[a])) + 1 for a in axes]
    pad = [max(0, -low) for low in lo] + [max(0, h - volume.shape[a]) for a, h in zip(axes, hi,
                                                                                    strict=True)]
    slicer: list[slice | int] = [slice(None)] * volume.ndim
    for a, low, high in zip(axes, lo, hi, strict=True):
        slicer[a] = slice(max(low, 0), min(high, volume.shape[a]))
    if index is not None:
        other = ({0, 1, 2} - set(axes)).pop()
        slicer[other] = int(np.clip(index, 0, volume.shape[other] - 1))
    box = volume[tuple(slicer)]
    n = len(axes)
    # F.pad takes (last axis low, last axis high, ..., first axis low, first axis high).
    widths = [w for k in reversed(range(n)) for w in (pad[k], pad[n + k])]
    box = F.pad(box, widths, value=0.0)
    mode = "bilinear" if n == 2 else "trilinear"
    return F.interpolate(box[None, None], size=tuple(size), mode=mode, align_corners=False)[0, 0]


class TumourROId(MapTransform):
    """Crop the tumour region from a windowed volume and its mask (arrays indexed x, y, z).

    Args:
        keys: the image key and the mask key, in that order.
        mode: one of ``ROI_MODES``.
        margin_mm: context added on each side of the tumour's largest extent.
        fov_mm: a fixed crop width in mm instead, widened only when the tumour plus margins
            does not fit: tumour size then stays visible to the network, where an
            extent-fitted crop scales every tumour to the same size.
        size: output size, (H, W) for 2D modes or (D, H, W) for ``3d``.
        crop: ``"context"`` keeps the surroundings, ``"masked"`` zeroes everything outside
            the tumour dilated by ``mask_dilation_mm``.
        mask_dilation_mm: dilation of the mask for ``masked`` crops.
        adjacent_mm: slice offset of the neighbouring slices in ``2.5d_adjacent``.
        channels: output channels (the backbone's input channels).
    """

    def __init__(self, keys: KeysCollection = ("image", "mask"), *, mode: str = "2d",
                 margin_mm: float = 10.0, fov_mm: float | None = None,
                 size: Sequence[int] = (224, 224),
                 crop: str = "context", mask_dilation_mm: float = 3.0,
                 adjacent_mm: float = 2.0, channels: int = 3) -> None:
        super().__init__(keys)
        self.mode = look_up_option(mode, ROI_MODES)
        self.crop = look_up_option(crop, _CROPS)
        expected = 3 if self.mode == "3d" else 2
        if len(size) != expected:
            msg = f"roi.size must have {expected} values for mode {mode!r}, got {list(size)}"
            raise ValueError(msg)
        self.margin_mm = float(margin_mm)
        self.fov_mm = None if fov_mm is None else float(fov_mm)
        self.size = tuple(int(s) for s in size)
        self.mask_dilation_mm = float(mask_dilation_mm)
        self.adjacent_mm = float(adjacent_mm)
        self.channels = int(channels)

    def _dilated(self, mask: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                 spacing: np.ndarray) -> np.ndarray:
        """The mask dilated by ``mask_dilation_mm``, computed on the tumour's box only."""
        pad = np.ceil(self.mask_dilation_mm / spacing).astype(int) + 1
        start = np.maximum(lo - pad, 0)
        stop = np.minimum(hi + pad + 1, mask.shape)
        box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
        dilated = np.zeros_like(mask)
        distance = ndimage.distance_transform_edt(~mask[box], sampling=spacing)
        dilated[box] = distance <= self.mask_dilation_mm
        return dilated

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image_key, mask_key = self.keys
        image = torch.as_tensor(d[image_key])[0].float()
        mask = torch.as_tensor(d[mask_key])[0].numpy() > 0
        spacing = np.asarray(d[image_key].pixdim, dtype=float)[:3]
        if not mask.any():
            msg = "the tumour mask is empty after resampling (tumour smaller than a voxel?)"
            raise ValueError(msg)
        coords = np.argwhere(mask)
        lo, hi = coords.min(axis=0), coords.max(axis=0)
        if self.crop == "masked":
            image = image * torch.as_tensor(self._dilated(mask, lo, hi, spacing))
        centre = (lo + hi) / 2
        extent_mm = (hi - lo + 1) * spacing
        side_mm = float(extent_mm.max() if self.mode == "3d" else extent_mm[:2].max())
        half_mm = side_mm / 2 + self.margin_mm
        if self.fov_mm:  # fixed physical scale, widened only for a tumour that would not fit
            half_mm = max(self.fov_mm / 2, half_mm)
        half = half_mm / spacing
        if self.mode == "3d":
            crop = _square(image, centre, half, (0, 1, 2), None, self.size)
            planes = [crop] * self.channels
        else:
            axial = int(np.argmax(mask.sum(axis=(0, 1))))
            if self.mode == "2.5d_orthogonal":
                planes = [_square(image, centre, half, (0, 1), round(centre[2]), self.size),
                          _square(image, centre, half, (0, 2), round(centre[1]), self.size),
                          _square(image, centre, half, (1, 2), round(centre[0]), self.size)]
            elif self.mode == "2.5d_adjacent":
                step = max(1, round(self.adjacent_mm / spacing[2]))
                planes = [_square(image, centre, half, (0, 1), axial + k, self.size)
                          for k in (-step, 0, step)]
            else:
                planes = [_square(image, centre, half, (0, 1), axial, self.size)] * self.channels
        d[image_key] = torch.stack(planes[: self.channels]).contiguous()
        d.pop(mask_key)
        return d
