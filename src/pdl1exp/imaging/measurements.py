"""Size and position of a tumour mask in physical units (volume, Feret diameters, centroid)."""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk

__all__ = ["feret_diameter", "roi_measurements", "roi_size"]


def feret_diameter(binary: sitk.Image) -> float:
    """Longest distance (mm) between two voxels of a 0/1 image (SimpleITK's Feret diameter).

    Args:
        binary: 2-D or 3-D image, 1 inside the object.
    """
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.ComputeFeretDiameterOn()
    shape.Execute(binary)
    return float(shape.GetFeretDiameter(1)) if shape.HasLabel(1) else 0.0


def _axial_axis(image: sitk.Image) -> int:
    """Numpy axis (of the z, y, x array) whose index direction is closest to world z."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return 2 - int(np.argmax(np.abs(direction[2])))


def _shape(mask: sitk.Image) -> tuple[sitk.Image, sitk.LabelShapeStatisticsImageFilter]:
    """The 0/1 image of the non-zero voxels of ``mask`` and its shape statistics (Feret
    diameter included); an empty mask raises ValueError."""
    binary = mask != 0
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.ComputeFeretDiameterOn()
    shape.Execute(binary)
    if not shape.HasLabel(1):
        msg = "the mask is empty: no non-zero voxel to measure"
        raise ValueError(msg)
    return binary, shape


def _size(shape: sitk.LabelShapeStatisticsImageFilter) -> dict[str, float]:
    return {"volume_ml": shape.GetPhysicalSize(1) / 1000.0,
            "max_diameter_mm": float(shape.GetFeretDiameter(1))}


def roi_size(mask: sitk.Image) -> dict[str, float]:
    """``volume_ml`` and ``max_diameter_mm`` of :func:`roi_measurements`, without its
    per-slice diameters (which take two thirds of its time): what each patient's ROI keeps."""
    return _size(_shape(mask)[1])


def roi_measurements(mask: sitk.Image) -> dict[str, Any]:
    """Volume, diameters, centroid and bounding box of the non-zero voxels of ``mask``.

    Diameters are Feret diameters between voxel centres in millimetres (SimpleITK), so they
    are correct for anisotropic spacing and any direction cosines; ``max_axial_diameter_mm``
    is the longest in-plane diameter over the axial slices.

    Args:
        mask: label image; non-zero is tumour.

    Returns:
        ``volume_ml``, ``max_diameter_mm``, ``max_axial_diameter_mm``, ``centroid_mm``
        (x, y, z physical), ``bbox_index`` (``{"start": (i, j, k), "size": (i, j, k)}``)
        and ``n_voxels``.
    """
    binary, shape = _shape(mask)
    bbox = shape.GetBoundingBox(1)

    # Axial slices through the tumour: the in-plane Feret diameter of each.
    axis = 2 - _axial_axis(mask)  # image index axis (x, y, z order)
    slices = range(bbox[axis], bbox[axis] + bbox[3 + axis])
    cut = [slice(None)] * 3
    in_plane = []
    for k in slices:
        cut[axis] = k
        in_plane.append(feret_diameter(binary[tuple(cut)]))
    return {
        **_size(shape),
        "max_axial_diameter_mm": max(in_plane),
        "centroid_mm": tuple(float(c) for c in shape.GetCentroid(1)),
        "bbox_index": {"start": tuple(bbox[:3]), "size": tuple(bbox[3:])},
        "n_voxels": int(shape.GetNumberOfPixels(1)),
    }
