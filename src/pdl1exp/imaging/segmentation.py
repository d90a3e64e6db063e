"""Semi-automatic 3D lung-tumour segmentation from one seed point (seeded region growing).

Method, and why each step: chest wall, mediastinum and vessels have the same attenuation as
a solid tumour, so intensity alone (ConfidenceConnected, a fixed threshold) leaks into them;
geometry separates them.

1. Reorient to LPS (``DICOMOrient``) so the third index axis is axial; the mask is oriented
   back at the end, so any direction cosines work. Smooth with a Gaussian of physical sigma
   to tame quantum noise. The body is the tissue above ``lung_hu`` with its holes filled
   slice by slice (outside air reaches the slice edge; the lungs do not).
2. Lung field: body voxels below ``lung_hu`` (the half-way point between aerated lung and
   soft tissue, so the mask ends at the pleura), their 3D holes filled, then closed with a
   ball whose radius is ``wall_closing_factor`` times the seed's depth: its distance to the
   lung (to lung darker than half-way to ``tumour_hu[0]`` for a ground-glass seed). A
   juxtapleural tumour is a bump on the wall that this ball cannot enter, so it joins the
   field while the wall stays out. From here on the work is cropped to the box the tumour
   and the closing can reach, then to the grown region.
3. Region growing: the seed's connected component of the tumour interval (solid and ground
   glass) within the lung field.
4. Vessel cut: opening with a ball of physical radius (exact Euclidean distance maps, so
   anisotropic slices are handled), keeping the piece at the seed. Vessels thinner than the
   ball fall off.
5. Boundary: half the local contrast between the tumour's inner rim and the surrounding lung,
   the half-maximum edge of a blurred step, which removes the partial-volume halo that the
   wide growing interval leaves; limited to a thin margin around the opened piece so vessel
   stumps stay short. Holes are filled.
6. Plausibility: a result wider than the seed's local extent allows (``extent_factor``
   times its depth, a tumour's radius when the seed is near its centre; at least
   ``min_extent_mm``, at most
   ``max_diameter_mm``) or larger than ``max_volume_ml`` is a leak and raises
   :class:`SegmentationError`; so do a seed outside the volume, in air, or in non-tumour
   tissue. The result is one connected component containing the seed.

Known limit: a tumour that bulges into the mediastinum beyond the aerated lung's hull
(hilar) is cut at that hull (phantom Dice about 0.8: under-segmented, never leaked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pdl1exp.imaging.measurements import roi_size

__all__ = ["SeededSegmenter", "SegmentationError", "segment_seeded"]


class SegmentationError(ValueError):
    """The seeded segmentation cannot give a plausible tumour; the message says why."""


def _distance_to(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance in mm from every voxel to the nearest voxel of ``mask`` (inf if empty)."""
    if not mask.any():
        return np.full(mask.shape, np.inf)
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False,
                                            squaredDistance=False, useImageSpacing=True)
    return np.maximum(sitk.GetArrayViewFromImage(distance), 0.0)


def _open(mask: np.ndarray, radius: float, spacing: np.ndarray) -> np.ndarray:
    """Morphological opening with a ball of ``radius`` mm."""
    core = _distance_to(~mask, spacing) > radius
    return mask & (_distance_to(core, spacing) <= radius)


def _close(mask: np.ndarray, radius: float, spacing: np.ndarray) -> np.ndarray:
    """Morphological closing of a (z, y, x) lung mask with a ball of ``radius`` mm.

    Beyond the in-plane edges lies body or air, never lung: padding with background there
    keeps a chest wall cut by the field of view from being closed over.
    """
    pad = [(0, 0)] + [(n, n) for n in np.ceil(radius / spacing[1:]).astype(int) + 1]
    padded = np.pad(mask, pad)
    grown = _distance_to(padded, spacing) <= radius
    closed = padded | (_distance_to(~grown, spacing) > radius)
    return closed[tuple(slice(lo, n - hi) for (lo, hi), n in zip(pad, closed.shape,
                                                                   strict=True))]


def _box(centre: Sequence[int], half_mm: float, spacing: np.ndarray,
         shape: Sequence[int]) -> tuple[slice, ...]:
    """Slices of the box ``centre`` ± ``half_mm`` clipped to an array of ``shape``."""
    half = np.ceil(half_mm / spacing).astype(int)
    return tuple(slice(max(c - h, 0), min(c + h + 1, n))
                 for c, h, n in zip(centre, half, shape, strict=True))


def _component_at(mask: np.ndarray, seed: tuple[int, ...], what: str) -> np.ndarray:
    """The face-connected component of ``mask`` that contains ``seed``."""
    labels, _ = ndimage.label(mask)
    if labels[seed] == 0:
        msg = f"the seed is not inside the {what}; place it in the solid part of the tumour"
        raise SegmentationError(msg)
    return labels == labels[seed]


def _seed_index(image: sitk.Image, seed_mm: Sequence[float]) -> tuple[int, int, int]:
    """Voxel index (z, y, x) of ``seed_mm``; raises when it lies outside the volume."""
    index = image.TransformPhysicalPointToIndex(tuple(float(c) for c in seed_mm))
    if not all(0 <= i < n for i, n in zip(index, image.GetSize(), strict=True)):
        msg = (f"seed {tuple(seed_mm)} mm is outside the image volume "
               f"(voxel index {index}, size {image.GetSize()})")
        raise SegmentationError(msg)
    return index[::-1]


@dataclass(frozen=True, kw_only=True)
class SeededSegmenter:
    """Seeded tumour segmenter, instantiable from ``conf/segmentation/seeded.yaml``.

    The image must show the body outline in the axial plane (a chest CT, not a tight crop):
    a lung cut by the slice edge is taken for outside air. Place the seed near the centre of
    the tumour's solid part; the closing radius and the vessel cut scale with its depth.

    Args:
        tumour_hu: (lower, upper) attenuation of tumour, solid and ground glass, for the
            region growing.
        lung_hu: aerated lung and air lie below this, soft tissue above (half-way between
            the two, so the lung mask ends at the pleura); ground glass counts as lung here.
        air_hu: a seed darker than this is in air.
        smoothing_mm: Gaussian sigma applied before any threshold (0 disables it).
        vessel_radius_mm: radius of the opening ball that cuts attached vessels.
        vessel_cut_max_fraction: the opening ball is at most this fraction of the seed's
            distance to the lung, so small nodules survive it.
        wall_closing_factor: lung-field closing radius as a multiple of the seed's distance
            to the lung; larger keeps more of a broad pleural contact, and closes over more
            of the mediastinal corners.
        band_mm: (inner, outer) distance from the grown region's border of the rims whose
            median HU give the local tumour and lung attenuation.
        edge_fraction: where between lung (0) and tumour (1) attenuation the border lies.
        margin_mm: the final border may lie at most this far outside the opened region.
        extent_factor: results wider than this multiple of the seed's depth (its distance
            to the lung) are leaks: small nodules get tight limits, large masses wide ones.
        min_extent_mm: the depth rule never allows less than this (a small spiculated
            nodule reaches far beyond its solid depth).
        max_diameter_mm: larger results are leaks, whatever the seed's depth.
        max_volume_ml: larger results are leaks.
    """

    tumour_hu: tuple[float, float]
    lung_hu: float
    air_hu: float
    smoothing_mm: float
    vessel_radius_mm: float
    vessel_cut_max_fraction: float
    wall_closing_factor: float
    band_mm: tuple[float, float]
    edge_fraction: float
    margin_mm: float
    extent_factor: float
    min_extent_mm: float
    max_diameter_mm: float
    max_volume_ml: float

    def __post_init__(self) -> None:
        for name in ("tumour_hu", "band_mm"):
            # Hydra passes lists (ListConfig); store plain float tuples.
            pair = tuple(float(v) for v in getattr(self, name))
            if len(pair) != 2 or not pair[0] < pair[1]:
                msg = f"SeededSegmenter.{name} must be (lower, upper), lower < upper: {pair}"
                raise ValueError(msg)
            object.__setattr__(self, name, pair)
        if not self.air_hu < self.tumour_hu[0]:
            msg = f"SeededSegmenter.air_hu ({self.air_hu}) must be below tumour_hu[0]"
            raise ValueError(msg)
        positive = ("vessel_radius_mm", "wall_closing_factor", "margin_mm", "max_diameter_mm",
                    "max_volume_ml", "vessel_cut_max_fraction", "extent_factor", "min_extent_mm")
        for name in positive:
            if not getattr(self, name) > 0:
                msg = f"SeededSegmenter.{name} must be > 0, got {getattr(self, name)}"
                raise ValueError(msg)
        if self.smoothing_mm < 0 or not 0 < self.edge_fraction < 1:
            msg = (f"SeededSegmenter needs smoothing_mm >= 0 and 0 < edge_fraction < 1, got "
                   f"{self.smoothing_mm} and {self.edge_fraction}")
            raise ValueError(msg)

    def __call__(self, image: sitk.Image, seed_mm: Sequence[float]) -> sitk.Image:
        """Segment the tumour at ``seed_mm`` (world mm, x, y, z) in a CT ``image`` in HU.

        Returns:
            uint8 mask (1 = tumour) with the geometry of ``image``.
        """
        orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            image.GetDirection())
        lps = sitk.DICOMOrient(image, "LPS")
        seed = _seed_index(lps, seed_mm)
        spacing = np.asarray(lps.GetSpacing()[::-1])
        # Axial slices as far as the largest tumour plus the widest closing could reach; the
        # body is found on whole slices, because outside air must reach the slice edge.
        reach = self.max_diameter_mm * (1 + self.wall_closing_factor / 2)
        slab = _box(seed, reach, spacing, lps.GetSize()[::-1])[0]
        hu_image = sitk.Cast(lps[:, :, slab], sitk.sitkFloat32)
        if self.smoothing_mm > 0:
            hu_image = sitk.SmoothingRecursiveGaussian(hu_image, self.smoothing_mm)
        hu = sitk.GetArrayFromImage(hu_image)
        body = ndimage.binary_fill_holes(
            hu >= self.lung_hu, structure=ndimage.generate_binary_structure(2, 1)[None])

        full = np.zeros(lps.GetSize()[::-1], dtype=np.uint8)
        full[slab] = self._segment(hu, body, spacing, (seed[0] - slab.start, *seed[1:]))
        mask = sitk.GetImageFromArray(full)
        mask.CopyInformation(lps)
        return sitk.DICOMOrient(mask, orientation)

    def _segment(self, hu: np.ndarray, body: np.ndarray, spacing: np.ndarray,
                 seed: tuple[int, ...]) -> np.ndarray:
        """Steps 2-6 of the module docstring on (z, y, x) arrays; returns the tumour mask."""
        lower, upper = self.tumour_hu
        seed_hu = float(hu[seed])
        if seed_hu < self.air_hu:
            msg = f"the seed is in air ({seed_hu:.0f} HU < air_hu {self.air_hu:.0f})"
            raise SegmentationError(msg)
        if not lower <= seed_hu <= upper:
            msg = (f"the seed is not in tumour-like tissue ({seed_hu:.0f} HU outside "
                   f"tumour_hu [{lower:.0f}, {upper:.0f}])")
            raise SegmentationError(msg)
        lung = body & (hu < self.lung_hu)
        # A ground-glass seed lies below lung_hu itself: measure its depth to darker lung.
        darker = min(self.lung_hu, (seed_hu + lower) / 2)
        depth = self._depth(lung & (hu < darker), seed, spacing)

        # Work in the box the tumour and the lung-field closing can reach.
        closing = self.wall_closing_factor * depth
        box = _box(seed, self.max_diameter_mm + closing, spacing, hu.shape)
        seed = tuple(s - b.start for s, b in zip(seed, box, strict=True))
        hu, lung = hu[box], lung[box]
        field = _close(ndimage.binary_fill_holes(lung), closing, spacing)
        if not field[seed]:
            msg = "the seed lies outside the lung field (chest wall or mediastinum?)"
            raise SegmentationError(msg)
        grown = _component_at(field & (hu >= lower) & (hu <= upper), seed, "grown region")

        # The rest only needs the grown region and the bands around it.
        points = np.argwhere(grown)
        reach = max(self.band_mm[1], self.margin_mm) + spacing.max()
        local = tuple(slice(max(lo - h, 0), hi + h + 1) for lo, hi, h in zip(
            points.min(0), points.max(0), np.ceil(reach / spacing).astype(int), strict=True))
        seed = tuple(s - b.start for s, b in zip(seed, local, strict=True))
        radius = min(self.vessel_radius_mm, self.vessel_cut_max_fraction * depth)
        tumour = self._boundary(hu[local], lung[local], grown[local], radius, spacing, seed)

        self._check_plausible(tumour, spacing, depth)
        out = np.zeros(body.shape, dtype=np.uint8)
        out[box][local] = tumour
        return out

    def _depth(self, lung: np.ndarray, seed: tuple[int, ...], spacing: np.ndarray) -> float:
        """Distance in mm from the seed to the nearest lung voxel; raises beyond a radius."""
        limit = self.max_diameter_mm / 2
        near = _box(seed, limit, spacing, lung.shape)
        offsets = (np.argwhere(lung[near]) + [b.start for b in near] - seed) * spacing
        depth = float(np.sqrt((offsets**2).sum(1)).min()) if len(offsets) else np.inf
        if depth > limit:
            msg = (f"no lung or air within {limit:.0f} mm (max_diameter_mm / 2) of the seed: "
                   "it is not in a lung tumour")
            raise SegmentationError(msg)
        return depth

    def _boundary(self, hu: np.ndarray, lung: np.ndarray, grown: np.ndarray, radius: float,
                  spacing: np.ndarray, seed: tuple[int, ...]) -> np.ndarray:
        """Steps 4-5: vessel cut, half-contrast edge, margin and hole filling."""
        edge = self._edge_hu(hu, lung, self._cut_vessels(grown, radius, spacing, seed),
                             spacing, seed)
        # The vessel cut again at the final edge, where vessels have their true width.
        region = _component_at(grown & (hu >= edge), seed, "region above the edge")
        near = _distance_to(self._cut_vessels(region, radius, spacing, seed), spacing)
        tumour = region & (near <= self.margin_mm)
        return _component_at(ndimage.binary_fill_holes(tumour), seed, "final region")

    @staticmethod
    def _cut_vessels(region: np.ndarray, radius: float, spacing: np.ndarray,
                     seed: tuple[int, ...]) -> np.ndarray:
        """The piece of ``region`` at the seed after an opening that drops thin vessels."""
        return _component_at(_open(region, radius, spacing), seed, "region left after the "
                             "vessel cut (a structure thinner than the cut ball)")

    def _edge_hu(self, hu: np.ndarray, lung: np.ndarray, core: np.ndarray,
                 spacing: np.ndarray, seed: tuple[int, ...]) -> float:
        """Attenuation ``edge_fraction`` of the way from the lung to the tumour's rim."""
        inside = _distance_to(~core, spacing)
        outside = _distance_to(core, spacing)
        low, high = self.band_mm
        inner_band = core & (inside >= low) & (inside <= high)
        inner_band[seed] = True
        outer_band = lung & (outside >= low) & (outside <= high)
        if not outer_band.any():
            msg = "no lung around the grown region to measure the tumour's contrast against"
            raise SegmentationError(msg)
        tumour_level = float(np.median(hu[inner_band]))
        lung_level = float(np.median(hu[outer_band]))
        edge = lung_level + self.edge_fraction * (tumour_level - lung_level)
        # Never looser than the growing interval; never so strict that the seed drops out.
        return min(max(edge, self.tumour_hu[0]), float(hu[seed]))

    def _check_plausible(self, tumour: np.ndarray, spacing: np.ndarray, depth: float) -> None:
        """Raise a leak error when ``tumour`` is bigger than the seed's extent allows."""
        image = sitk.GetImageFromArray(tumour.astype(np.uint8))
        image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
        size = roi_size(image)
        max_diameter = min(self.max_diameter_mm,
                           max(self.min_extent_mm, self.extent_factor * depth))
        if size["volume_ml"] > self.max_volume_ml or size["max_diameter_mm"] > max_diameter:
            msg = (f"leak: the region grew to {size['volume_ml']:.1f} ml and "
                   f"{size['max_diameter_mm']:.1f} mm across (allowed: {max_diameter:.0f} mm = "
                   f"min(max_diameter_mm, max(min_extent_mm, extent_factor x the seed's "
                   f"{depth:.1f} mm depth)), "
                   f"max_volume_ml {self.max_volume_ml:.0f}); it has merged with neighbouring "
                   "tissue: place the seed at the centre of the tumour's solid part, or draw "
                   "a mask")
            raise SegmentationError(msg)


def segment_seeded(image: sitk.Image, seed_mm: Sequence[float], **params: Any) -> sitk.Image:
    """Segment the lung tumour at ``seed_mm`` in ``image``; see :class:`SeededSegmenter`.

    Args:
        image: CT in HU with its physical geometry.
        seed_mm: a point inside the tumour, world mm (x, y, z; ITK/LPS).
        params: the keyword arguments of :class:`SeededSegmenter`
            (``conf/segmentation/seeded.yaml``).

    Returns:
        uint8 mask (1 = tumour) with the geometry of ``image``.
    """
    return SeededSegmenter(**params)(image, seed_mm)
