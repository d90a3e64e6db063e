"""DICOM RTSTRUCT and DICOM SEG masks rasterised onto the CT's voxel grid.

Libraries (checked with numpy 2 and pydicom 3): SEG files are read with ``highdicom``
(``segread`` → ``Segmentation.get_volume``, which places every frame by its plane position,
so cropped, reordered or multi-segment SEGs come out right), then resampled onto the CT grid
with SimpleITK (nearest neighbour: a SEG on the CT's own grid is copied voxel for voxel; a
fractional SEG counts where its fraction is ≥ 0.5). RTSTRUCT files are read with ``pydicom``
and filled with ``matplotlib.path.Path.contains_points``; ``rt-utils`` was not used because
it needs opencv, requires the optional ContourImageSequence, rounds vertices to whole pixels
and swaps row/column spacing on anisotropic pixels.

Geometry: contour vertices (patient LPS mm, the ITK world frame) are mapped through the
image's own origin/spacing/direction, so slice order, flipped or shuffled files and
non-identity directions need no special case. Partial-volume rule: a voxel belongs to the
structure when its centre lies inside a closed planar contour or on it (within
``_ON_CONTOUR`` voxel); contours on one slice combine by the even-odd rule, so an inner
contour cuts a hole. A contour must lie on a slice (within ``plane_tolerance`` of the slice
spacing) and inside the image (within half a voxel).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from matplotlib.path import Path as Polygon
from pydicom.errors import InvalidDicomError

__all__ = ["DICOM_MASK_MODALITIES", "DicomMask", "DicomMaskError", "open_dicom_mask",
           "rasterise"]

DICOM_MASK_MODALITIES = ("RTSTRUCT", "SEG")
# Vertices within this distance (voxels) of a voxel centre count the voxel as inside:
# contours exported from voxel masks run exactly through the boundary voxels' centres.
_ON_CONTOUR = 1e-3
# A fractional SEG voxel belongs to the tumour from this fraction on.
_FRACTION = 0.5


class DicomMaskError(ValueError):
    """An RTSTRUCT or SEG that cannot give this patient's mask (the message says why)."""


@dataclass(frozen=True)
class DicomMask:
    """A DICOM RTSTRUCT or SEG file and the series it references.

    Args:
        path: the file.
        modality: ``RTSTRUCT`` or ``SEG``.
        referenced_series: SeriesInstanceUIDs it references (empty when it names none).
    """

    path: Path
    modality: str
    referenced_series: frozenset[str]


def _modality(path: Path) -> str | None:
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except (InvalidDicomError, OSError):
        return None
    modality = str(header.get("Modality", "")).upper()
    return modality if modality in DICOM_MASK_MODALITIES else None


def _referenced_series(ds: pydicom.Dataset, modality: str) -> frozenset[str]:
    if modality == "SEG":
        return frozenset(str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", []))
    return frozenset(
        str(series.SeriesInstanceUID)
        for frame in ds.get("ReferencedFrameOfReferenceSequence", [])
        for study in frame.get("RTReferencedStudySequence", [])
        for series in study.get("RTReferencedSeriesSequence", []))


def open_dicom_mask(path: str | Path) -> DicomMask | None:
    """The RTSTRUCT/SEG at ``path`` (a file, or a folder holding exactly one such file), or
    None when ``path`` is no DICOM mask (a label image, a CT folder)."""
    path = Path(path)
    if path.is_dir():
        files = [f for f in path.iterdir() if f.is_file()]
        found = [f for f in files if _modality(f)]
        if len(found) != 1 or len(files) != 1:
            return None
        path = found[0]
    modality = _modality(path) if path.is_file() else None
    if modality is None:
        return None
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return DicomMask(path=path, modality=modality,
                     referenced_series=_referenced_series(ds, modality))


def _choose(names: dict[int, str], wanted: str | int | None, *, what: str, key: str) -> int:
    """The number of the one structure/segment ``wanted`` names (number, name or regex)."""
    listing = ", ".join(f"{n}: {name!r}" for n, name in sorted(names.items()))
    if wanted is None or str(wanted).strip() == "":
        if len(names) == 1:
            return next(iter(names))
        msg = f"{len(names)} {what}s in the file; choose one with {key}. Available: {listing}"
        raise DicomMaskError(msg)
    text = str(wanted).strip()
    if text.isdigit() and int(text) in names:
        return int(text)
    pattern = re.compile(text, re.IGNORECASE)
    hits = [n for n, name in names.items() if pattern.fullmatch(name.strip())]
    if len(hits) == 1:
        return hits[0]
    reason = "no" if not hits else f"{len(hits)}"
    msg = f"{reason} {what} matches {key}={text!r}. Available: {listing}"
    raise DicomMaskError(msg)


def _index_points(image: sitk.Image, points_mm: np.ndarray) -> np.ndarray:
    """World (LPS mm) points → continuous (i, j, k) voxel indices of ``image``."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    scale = direction * np.asarray(image.GetSpacing(), dtype=float)
    return np.linalg.solve(scale, (points_mm - np.asarray(image.GetOrigin())).T).T


def _fill(vertices: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Voxel centres (rows j, columns i) inside or on the closed polygon of (i, j) vertices."""
    i, j = vertices[:, 0], vertices[:, 1]
    area = float(np.dot(i, np.roll(j, -1)) - np.dot(j, np.roll(i, -1)))
    filled = np.zeros(shape, dtype=bool)
    lo = np.maximum(np.floor(vertices.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(vertices.max(axis=0)).astype(int), [shape[1] - 1, shape[0] - 1])
    if (hi < lo).any():
        return filled
    cols, rows = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1))
    centres = np.column_stack([cols.ravel(), rows.ravel()]).astype(float)
    # matplotlib grows the polygon by ``radius`` on the side given by its orientation.
    inside = Polygon(vertices).contains_points(centres, radius=_ON_CONTOUR * np.sign(area))
    filled[rows.ravel()[inside], cols.ravel()[inside]] = True
    return filled


def _rtstruct(ds: pydicom.Dataset, image: sitk.Image, *, roi_name: str | int | None,
              plane_tolerance: float) -> np.ndarray:
    names = {int(r.ROINumber): str(r.get("ROIName", "")) for r in
             ds.get("StructureSetROISequence", [])}
    if not names:
        msg = "the RTSTRUCT holds no structure"
        raise DicomMaskError(msg)
    number = _choose(names, roi_name, what="structure", key="dataset.roi_name")
    name = names[number]
    contours = [c for roi in ds.get("ROIContourSequence", [])
                if int(roi.ReferencedROINumber) == number
                for c in roi.get("ContourSequence", [])
                if c.get("ContourGeometricType", "CLOSED_PLANAR") == "CLOSED_PLANAR"
                and len(c.get("ContourData", [])) >= 9]
    if not contours:
        msg = f"structure {name!r} has no closed planar contour (empty contour)"
        raise DicomMaskError(msg)
    size = image.GetSize()
    array = np.zeros(size[::-1], dtype=bool)  # (k, j, i)
    for contour in contours:
        points = _index_points(image, np.asarray(contour.ContourData, dtype=float).reshape(-1, 3))
        k = float(np.median(points[:, 2]))
        if np.abs(points[:, 2] - k).max() > plane_tolerance or \
                abs(k - round(k)) > plane_tolerance:
            z_mm = np.round(np.asarray(contour.ContourData[2::3], dtype=float).mean(), 2)
            msg = (f"structure {name!r}: a contour near z={z_mm} mm lies between the image's "
                   f"slices (slice index {k:.2f}); the RTSTRUCT was drawn on another series")
            raise DicomMaskError(msg)
        low, high = points.min(axis=0), points.max(axis=0)
        if (low < -0.5 - plane_tolerance).any() or \
                (high > np.asarray(size) - 0.5 + plane_tolerance).any():
            msg = (f"structure {name!r}: contour outside the image (voxel index range "
                   f"{np.round(low, 1).tolist()}..{np.round(high, 1).tolist()}, image size "
                   f"{list(size)})")
            raise DicomMaskError(msg)
        array[round(k)] ^= _fill(points[:, :2], (size[1], size[0]))
    if not array.any():
        msg = f"structure {name!r}: its contours enclose no voxel centre (empty contour)"
        raise DicomMaskError(msg)
    return array


def _seg(path: Path, image: sitk.Image, *, segment: str | int | None) -> np.ndarray:
    seg = hd.seg.segread(path)
    names = {int(s.SegmentNumber): str(s.get("SegmentLabel", "")) for s in seg.SegmentSequence}
    number = _choose(names, segment, what="segment", key="dataset.segment")
    volume = seg.get_volume(segment_numbers=[number], combine_segments=True, relabel=True) \
        if seg.segmentation_type != hd.seg.SegmentationTypeValues.FRACTIONAL \
        else seg.get_volume(segment_numbers=[number]).squeeze_channel()
    found = volume.array >= (_FRACTION if volume.array.dtype.kind == "f" else 1)
    if not found.any():
        msg = f"segment {number} ({names[number]!r}) is empty"
        raise DicomMaskError(msg)
    voxels = np.argwhere(found)
    low, high = voxels.min(axis=0), voxels.max(axis=0)
    box = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1])
                    for z in (low[2], high[2])], dtype=float)
    world = (volume.affine @ np.column_stack([box, np.ones(len(box))]).T).T[:, :3]
    index = _index_points(image, world)
    size = np.asarray(image.GetSize())
    if (index < -0.5).any() or (index > size - 0.5).any():
        msg = (f"segment {number} ({names[number]!r}) lies outside the image (voxel index "
               f"range {np.round(index.min(0), 1).tolist()}..{np.round(index.max(0), 1).tolist()}"
               f", image size {size.tolist()})")
        raise DicomMaskError(msg)
    source = volume.with_array(found.astype(np.uint8)).to_simpleitk()
    resampled = sitk.Resample(source, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                              sitk.sitkUInt8)
    return sitk.GetArrayFromImage(resampled) > 0


def rasterise(mask: DicomMask, image: sitk.Image, *, image_series_uid: str | None,
              roi_name: str | int | None = None, segment: str | int | None = None,
              plane_tolerance: float = 0.1) -> sitk.Image:
    """The chosen structure/segment as a 0/1 ``uint8`` label image on ``image``'s grid.

    Args:
        mask: from :func:`open_dicom_mask`.
        image: the CT it belongs to.
        image_series_uid: the CT's SeriesInstanceUID (None when the CT is not DICOM: then
            only the geometry links the two).
        roi_name: RTSTRUCT structure name or regex (case-insensitive, whole name), or its
            ROI number; None takes the only one.
        segment: SEG segment number or label (regex); None takes the only one.
        plane_tolerance: how far (fraction of a voxel) a contour may lie off a slice.

    Raises:
        DicomMaskError: structure/segment not found (the available names are listed),
            referenced series missing or not the image's, contour outside the image,
            empty contour.
    """
    if not mask.referenced_series:
        msg = f"{mask.path}: the {mask.modality} references no image series"
        raise DicomMaskError(msg)
    if image_series_uid is not None and image_series_uid not in mask.referenced_series:
        msg = (f"{mask.path}: the {mask.modality} references series "
               f"{sorted(mask.referenced_series)}, but the image is series {image_series_uid}")
        raise DicomMaskError(msg)
    try:
        if mask.modality == "SEG":
            array = _seg(mask.path, image, segment=segment)
        else:
            array = _rtstruct(pydicom.dcmread(mask.path), image, roi_name=roi_name,
                              plane_tolerance=plane_tolerance)
    except DicomMaskError as err:
        msg = f"{mask.path}: {err}"
        raise DicomMaskError(msg) from err
    labels = sitk.GetImageFromArray(array.astype(np.uint8))
    labels.CopyInformation(image)
    return labels
