"""Tumour ROI crops for the backbone: 2D max-area slice, 2.5D (adjacent or orthogonal), 3D.

Crops are squares (cubes) centred on the tumour's bounding box, as wide as its largest
in-plane extent plus a margin in mm on each side, then resized to the backbone input. Grey
CT is stacked to three channels: the same slice three times (2D), neighbouring slices
(2.5D adjacent) or the axial, coronal and sagittal planes (2.5D orthogonal).

``seed_patch_3d`` is FMCIB's input instead (AIM-Harvard/foundation-cancer-image-biomarker,
``fmcib/preprocessing/__init__.py`` ``get_transforms``, lines 16-24, commit 02a320e2):
resample to 1 mm isotropic (line 18, ``Spacingd(pixdim=1)``), scale HU -1024..3072 to
[0, 1] with clipping (line 19), orient LPS (line 20), cut a 50-voxel cube around the seed
given in LPS world mm (line 21, ``SeedBasedPatchCropd``: voxels ``int(c) - 25`` to
``int(c) + 25`` on each axis, ``fmcib/preprocessing/seed_based_crop.py``), transpose the
array to (z, y, x) (line 23, ``Transposed(indices=(0, 3, 2, 1))``) and zero-pad a cube cut by
the volume's edge (line 24). Here the spacing, orientation and window come from
``conf/preprocess/fmcib.yaml``, the cube's voxels from ``size`` with no resizing, the layout
from ``layout``; no mask is applied. Two deliberate differences: the mask's centroid stands in
for a missing seed, and a cube cut by the volume's edge is padded on the cut side (FMCIB's
symmetric pad moves the seed off the cube's centre).
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

__all__ = ["ROI_MODES", "TumourROId", "seed_voxel"]

ROI_MODES = ("2d", "2.5d_adjacent", "2.5d_orthogonal", "3d", "seed_patch_3d")
_VOLUME_MODES = ("3d", "seed_patch_3d")
_CROPS = ("context", "masked")
_LAYOUTS = ("xyz", "zyx")
# MONAI affines map voxels to RAS world mm; manifest seeds are ITK/LPS.
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def seed_voxel(seed_mm: Sequence[float], affine: np.ndarray) -> np.ndarray:
    """The (fractional) voxel index of a manifest seed (LPS world mm) under a RAS ``affine``."""
    ras = np.append(np.asarray(seed_mm, dtype=float) * _LPS_TO_RAS, 1.0)
    return (np.linalg.inv(affine) @ ras)[:3]


def _padded_box(volume: torch.Tensor, lo: Sequence[int], hi: Sequence[int],
                axes: Sequence[int], index: int | None) -> torch.Tensor:
    """Voxels ``lo`` to ``hi`` (exclusive) of ``volume`` on ``axes``, zero outside it.

    With ``index`` set, the remaining axis is fixed at that voxel (a plane).
    """
    pad = [max(0, -low) for low in lo] + [max(0, h - volume.shape[a]) for a, h in zip(axes, hi,
                                                                                    strict=True)]
    slicer: list[slice | int] = [slice(None)] * volume.ndim
    for a, low, high in zip(axes, lo, hi, strict=True):
        slicer[a] = slice(max(low, 0), min(high, volume.shape[a]))
    if index is not None:
        other = ({0, 1, 2} - set(axes)).pop()
        slicer[other] = int(np.clip(index, 0, volume.shape[other] - 1))
    n = len(axes)
    # F.pad takes (last axis low, last axis high, ..., first axis low, first axis high).
    widths = [w for k in reversed(range(n)) for w in (pad[k], pad[n + k])]
    return F.pad(volume[tuple(slicer)], widths, value=0.0)


def _square(volume: torch.Tensor, centre: Sequence[float], half: Sequence[float],
            axes: Sequence[int], index: int | None, size: Sequence[int]) -> torch.Tensor:
    """Resample the box ``centre ± half`` (voxels) of ``volume`` on ``axes`` to ``size``.

    With ``index`` set, the remaining axis is fixed at that voxel (a plane); otherwise the
    box is 3D. Outside the volume counts as background (zero after windowing).
    """
    lo = [int(np.floor(centre[a] - half[a])) for a in axes]
    hi = [int(np.ceil(centre[a] + half[a])) + 1 for a in axes]
    box = _padded_box(volume, lo, hi, axes, index)
    mode = "bilinear" if len(axes) == 2 else "trilinear"
    return F.interpolate(box[None, None], size=tuple(size), mode=mode, align_corners=False)[0, 0]


class TumourROId(MapTransform):
    """Crop the tumour region from a windowed volume and its mask (arrays indexed x, y, z).

    Args:
        keys: the image key and the mask key, in that order.
        mode: one of ``ROI_MODES``; ``seed_patch_3d`` cuts ``size`` voxels at the preprocessed
            spacing around the seed (else the mask's centroid), unresized and unmasked.
        margin_mm: context added on each side of the tumour's largest extent.
        fov_mm: a fixed crop width in mm instead, widened only when the tumour plus margins
            does not fit: tumour size then stays visible to the network, where an
            extent-fitted crop scales every tumour to the same size.
        size: output size, (H, W) for 2D modes or (D, H, W) for the 3D ones.
        crop: ``"context"`` keeps the surroundings, ``"masked"`` zeroes everything outside
            the tumour dilated by ``mask_dilation_mm``.
        mask_dilation_mm: dilation of the mask for ``masked`` crops.
        adjacent_mm: slice offset of the neighbouring slices in ``2.5d_adjacent``.
        channels: output channels (the backbone's input channels).
        seed_key: item key of the seed, ``(x, y, z)`` LPS world mm or None; ``seed_patch_3d``
            centres on it. Removed from every item, so batches collate without it.
        layout: axis order of 3D outputs: ``xyz``, or ``zyx`` as FMCIB feeds its network.
    """

    def __init__(self, keys: KeysCollection = ("image", "mask"), *, mode: str = "2d",
                 margin_mm: float = 10.0, fov_mm: float | None = None,
                 size: Sequence[int] = (224, 224),
                 crop: str = "context", mask_dilation_mm: float = 3.0,
                 adjacent_mm: float = 2.0, channels: int = 3, seed_key: str = "seed",
                 layout: str = "xyz") -> None:
        super().__init__(keys)
        self.mode = look_up_option(mode, ROI_MODES)
        self.crop = look_up_option(crop, _CROPS)
        self.layout = look_up_option(layout, _LAYOUTS)
        expected = 3 if self.mode in _VOLUME_MODES else 2
        if len(size) != expected:
            msg = f"roi.size must have {expected} values for mode {mode!r}, got {list(size)}"
            raise ValueError(msg)
        self.margin_mm = float(margin_mm)
        self.fov_mm = None if fov_mm is None else float(fov_mm)
        self.size = tuple(int(s) for s in size)
        self.mask_dilation_mm = float(mask_dilation_mm)
        self.adjacent_mm = float(adjacent_mm)
        self.channels = int(channels)
        self.seed_key = seed_key

    def _dilated(self, mask: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                 spacing: np.ndarray) -> np.ndarray:
        """The mask dilated by ``mask_dilation_mm``, computed on the tumour's box only."""
        pad = self._dilation_pad(spacing).astype(int)
        start = np.maximum(lo - pad, 0)
        stop = np.minimum(hi + pad + 1, mask.shape)
        box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
        dilated = np.zeros_like(mask)
        distance = ndimage.distance_transform_edt(~mask[box], sampling=spacing)
        dilated[box] = distance <= self.mask_dilation_mm
        return dilated

    def _seed_patch(self, image: torch.Tensor, mask: np.ndarray, affine: np.ndarray,
                    seed_mm: Sequence[float] | None) -> torch.Tensor:
        """The ``size`` cube around the seed's voxel (FMCIB's ``int(c) - n // 2`` start)."""
        if seed_mm is None:
            if not mask.any():
                msg = "no seed, and the tumour mask is empty after resampling"
                raise ValueError(msg)
            centre = np.argwhere(mask).mean(axis=0)
        else:
            centre = seed_voxel(seed_mm, affine)
        lo = [int(np.floor(c)) - n // 2 for c, n in zip(centre, self.size, strict=True)]
        hi = [low + n for low, n in zip(lo, self.size, strict=True)]
        return _padded_box(image, lo, hi, (0, 1, 2), None)

    def support(self, lo: np.ndarray, hi: np.ndarray, spacing: np.ndarray,
                seed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The voxel box (inclusive bounds) that the crop may read, for a tumour mask lying
        within voxels ``lo`` to ``hi`` (inclusive) of a volume of voxel size ``spacing`` mm and
        the seed's voxel ``seed`` (None: no seed).

        :class:`~pdl1exp.imaging.preprocess.ROISpacingd` resamples only this box: the crop is
        then the same as from the whole resampled volume. Bounds wider than the mask's true
        box widen the result.
        """
        lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
        spacing = np.asarray(spacing, dtype=float)
        if self.mode == "seed_patch_3d":  # the cube around the seed, else the mask's centroid
            first, last = (lo, hi) if seed is None else (seed, seed)
            half = np.asarray(self.size, dtype=float) / 2 + 1
            return first - half, last + half
        half = self._half_mm((hi - lo + 1) * spacing) / spacing + 1
        if self.mode in ("2d", "2.5d_adjacent"):  # axial planes within the mask's slices
            half[2] = max(1, round(self.adjacent_mm / spacing[2]))
        if self.crop == "masked":  # the dilation's box (``_dilated``)
            half = np.maximum(half, self._dilation_pad(spacing))
        return lo - half, hi + half

    def _half_mm(self, extent_mm: np.ndarray) -> float:
        """Half the crop's side (mm) for a tumour of extent ``extent_mm`` (x, y, z)."""
        side_mm = float(extent_mm.max() if self.mode == "3d" else extent_mm[:2].max())
        half_mm = side_mm / 2 + self.margin_mm
        if self.fov_mm:  # fixed physical scale, widened only for a tumour that would not fit
            half_mm = max(self.fov_mm / 2, half_mm)
        return half_mm

    def _dilation_pad(self, spacing: np.ndarray) -> np.ndarray:
        """Voxels around the tumour's box that the dilation of ``masked`` crops reaches."""
        return np.ceil(self.mask_dilation_mm / spacing) + 1

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image_key, mask_key = self.keys
        seed_mm = d.pop(self.seed_key, None)
        image = torch.as_tensor(d[image_key])[0].float()
        mask = torch.as_tensor(d[mask_key])[0].numpy() > 0
        if self.mode == "seed_patch_3d":
            patch = self._seed_patch(image, mask, np.asarray(d[image_key].affine, dtype=float),
                                     seed_mm)
            return self._output(d, [patch] * self.channels)
        spacing = np.asarray(d[image_key].pixdim, dtype=float)[:3]
        if not mask.any():
            msg = "the tumour mask is empty after resampling (tumour smaller than a voxel?)"
            raise ValueError(msg)
        coords = np.argwhere(mask)
        lo, hi = coords.min(axis=0), coords.max(axis=0)
        if self.crop == "masked":
            image = image * torch.as_tensor(self._dilated(mask, lo, hi, spacing))
        centre = (lo + hi) / 2
        half = self._half_mm((hi - lo + 1) * spacing) / spacing
        if self.mode == "3d":
            crop = _square(image, centre, half, (0, 1, 2), None, self.size)
            planes = [crop] * self.channels
        else:
            axial = int(np.argmax(mask.sum(axis=(0, 1))))
            if self.mode == "2.5d_orthogonal":
                # Half-voxel centres round up, not to even: the same plane wherever the
                # volume starts (ROISpacingd's block, or the whole scan).
                through = np.floor(centre + 0.5).astype(int)
                planes = [_square(image, centre, half, (0, 1), through[2], self.size),
                          _square(image, centre, half, (0, 2), through[1], self.size),
                          _square(image, centre, half, (1, 2), through[0], self.size)]
            elif self.mode == "2.5d_adjacent":
                step = max(1, round(self.adjacent_mm / spacing[2]))
                planes = [_square(image, centre, half, (0, 1), axial + k, self.size)
                          for k in (-step, 0, step)]
            else:
                planes = [_square(image, centre, half, (0, 1), axial, self.size)] * self.channels
        return self._output(d, planes)

    def _output(self, d: dict[Hashable, torch.Tensor],
                planes: list[torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Stack ``planes`` as the channels of the image in ``layout``; drop the mask."""
        image_key, mask_key = self.keys
        crop = torch.stack(planes[: self.channels])
        if crop.ndim == 4 and self.layout == "zyx":
            crop = crop.permute(0, 3, 2, 1)
        d[image_key] = crop.contiguous()
        d.pop(mask_key)
        return d
