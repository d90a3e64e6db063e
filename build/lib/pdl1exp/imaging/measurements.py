"""Size and position of a tumour mask in physical units (volume, Feret diameters, centroid)."""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import ConvexHull
from scipy.spatial.distance import pdist

__all__ = ["feret_diameter", "roi_measurements"]


def feret_diameter(points: np.ndarray) -> float:
    """Longest distance between any two of ``points`` (n, d), via their convex hull.

    Only hull vertices can be the ends of the longest chord, so the pairwise distances are
    taken over those. Joggling (``QJ``) keeps flat or collinear sets (a one-slice tumour)
    from failing; the distances are still measured on the original points.

    Args:
        points: coordinates in mm, one row per point.
    """
    if len(points) > points.shape[1] + 1:
        points = points[ConvexHull(points, qhull_options="QJ").vertices]
    return float(pdist(points).max()) if len(points) > 1 else 0.0


def _axial_axis(image: sitk.Image) -> int:
    """Numpy axis (of the z, y, x array) whose index direction is closest to world z."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return 2 - int(np.argmax(np.abs(direction[2])))


def roi_measurements(mask: sitk.Image) -> dict[str, Any]:
    """Volume, diameters, centroid and bounding box of the non-zero voxels of ``mask``.

    Diameters are measured between surface voxel centres (face-connected boundary) in
    millimetres, so they are correct for anisotropic spacing and any direction cosines;
    ``max_axial_diameter_mm`` is the longest in-plane diameter over the axial slices.

    Args:
        mask: label image; non-zero is tumour.

    Returns:
        ``volume_ml``, ``max_diameter_mm``, ``max_axial_diameter_mm``, ``centroid_mm``
        (x, y, z physical), ``bbox_index`` (``{"start": (i, j, k), "size": (i, j, k)}``)
        and ``n_voxels``.
    """
    binary = mask != 0
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(binary)
    if not shape.HasLabel(1):
        msg = "roi_measurements: the mask is empty"
        raise ValueError(msg)
    bbox = shape.GetBoundingBox(1)

    tumour = sitk.GetArrayViewFromImage(binary).astype(bool)
    # In scaled index coordinates (index x spacing) distances equal physical distances,
    # because the direction matrix is orthonormal.
    spacing_zyx = np.asarray(mask.GetSpacing()[::-1])
    surface = tumour & ~ndimage.binary_erosion(tumour)
    max_diameter = feret_diameter(np.argwhere(surface) * spacing_zyx)

    axis = _axial_axis(mask)
    in_plane = np.expand_dims(ndimage.generate_binary_structure(2, 1), axis)
    rim = tumour & ~ndimage.binary_erosion(tumour, structure=in_plane)
    rim_points = np.argwhere(rim)
    plane_axes = [a for a in range(3) if a != axis]
    max_axial = max(
        feret_diameter(rim_points[rim_points[:, axis] == k][:, plane_axes]
                       * spacing_zyx[plane_axes])
        for k in np.unique(rim_points[:, axis])
    )
    return {
        "volume_ml": shape.GetPhysicalSize(1) / 1000.0,
        "max_diameter_mm": max_diameter,
        "max_axial_diameter_mm": max_axial,
        "centroid_mm": tuple(float(c) for c in shape.GetCentroid(1)),
        "bbox_index": {"start": tuple(bbox[:3]), "size": tuple(bbox[3:])},
        "n_voxels": int(shape.GetNumberOfPixels(1)),
    }
