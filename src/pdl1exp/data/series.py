"""DICOM image series in a folder: list them, describe them, choose one.

Hospital exports put several series in one study folder (scout, thin and thick
reconstructions, lung and soft-tissue kernels). A series is chosen by its
SeriesInstanceUID (manifest column ``series_uid``), else by the series a DICOM mask
references, else by ``dataset.series_rule``: ``error`` (refuse and list the series) or
``thinnest_axial`` (the axial series with the thinnest slice spacing, then the most slices).
Only non-identifying header fields are read (UIDs, description, kernel, geometry).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

__all__ = [
    "NON_IMAGE_MODALITIES",
    "SERIES_RULES",
    "SeriesInfo",
    "choose_series",
    "describe_series",
    "image_series",
]

SERIES_RULES = ("error", "thinnest_axial")
# Series in a study folder that hold no CT slices (structure sets, SEG, plans, reports).
NON_IMAGE_MODALITIES = frozenset({"RTSTRUCT", "SEG", "RTPLAN", "RTDOSE", "RTRECORD", "SR",
                                  "PR", "KO", "REG"})
_HEADER_TAGS = ["Modality", "SeriesDescription", "ConvolutionKernel", "ImageOrientationPatient",
                "ImagePositionPatient", "PixelSpacing"]
# |slice normal · z| above this counts as axial (within ~8 degrees of the patient axis).
_AXIAL_COSINE = 0.99


@dataclass(frozen=True)
class SeriesInfo:
    """One image series of a folder.

    Args:
        uid: SeriesInstanceUID.
        files: its files, in the slice order GDCM sorts them.
        description: SeriesDescription ("" when absent).
        kernel: ConvolutionKernel ("" when absent).
        n_slices: number of files.
        spacing_mm: (column, row, slice) spacing; slice spacing is the median distance of
            neighbouring slice positions (nan for a single slice).
        axial: whether the slice normal runs along the patient's z axis.
    """

    uid: str
    files: tuple[str, ...]
    description: str
    kernel: str
    n_slices: int
    spacing_mm: tuple[float, float, float]
    axial: bool

    def __str__(self) -> str:
        spacing = "x".join(f"{s:g}" for s in self.spacing_mm)
        return (f"series_uid={self.uid} description={self.description!r} "
                f"kernel={self.kernel!r} slices={self.n_slices} spacing_mm={spacing}")


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def _describe(uid: str, files: tuple[str, ...]) -> SeriesInfo | None:
    """Header summary of one series, or None when it holds no image slices."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
               for f in files]
    first = headers[0]
    if str(first.get("Modality", "")).upper() in NON_IMAGE_MODALITIES:
        return None
    orientation = np.asarray(first.get("ImageOrientationPatient") or [1, 0, 0, 0, 1, 0],
                             dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = sorted(float(np.dot(normal, h.ImagePositionPatient)) for h in headers
                       if h.get("ImagePositionPatient") is not None)
    steps = np.diff(positions)
    slice_mm = float(np.median(steps)) if steps.size else float("nan")
    rows_mm, cols_mm = (float(v) for v in (first.get("PixelSpacing") or [np.nan, np.nan]))
    return SeriesInfo(uid=uid, files=files, description=_text(first.get("SeriesDescription")),
                      kernel=_text(first.get("ConvolutionKernel")), n_slices=len(files),
                      spacing_mm=(cols_mm, rows_mm, slice_mm),
                      axial=bool(abs(normal[2]) >= _AXIAL_COSINE))


def image_series(folder: str | Path) -> list[SeriesInfo]:
    """Every image series in ``folder`` (structure sets, SEG and other non-image series
    are left out)."""
    found = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        info = _describe(uid, files)
        if info is not None:
            found.append(info)
    return found


def describe_series(series: Iterable[SeriesInfo]) -> str:
    """One line per series, for error messages that let the user choose."""
    return "\n".join(f"      {s}" for s in series)


def choose_series(series: list[SeriesInfo], *, series_uid: str | None = None,
                  referenced: Iterable[str] = (), rule: str = "error") -> SeriesInfo:
    """Pick the series to read.

    Args:
        series: the folder's image series (:func:`image_series`).
        series_uid: the manifest's ``series_uid``; must be one of them when given.
        referenced: series UIDs a DICOM mask references; used when exactly one of them is
            in the folder.
        rule: ``error`` or ``thinnest_axial`` (module docstring) when the above do not decide.

    Raises:
        ValueError: no series, an unknown UID, or several series under ``rule=error``; the
            message lists the series found.
    """
    if rule not in SERIES_RULES:
        msg = f"dataset.series_rule must be one of {SERIES_RULES}, got {rule!r}"
        raise ValueError(msg)
    if not series:
        msg = "no DICOM image series found in this folder"
        raise ValueError(msg)
    by_uid = {s.uid: s for s in series}
    if series_uid:
        if series_uid not in by_uid:
            msg = (f"series_uid {series_uid} is not in this folder; its series are:\n"
                   f"{describe_series(series)}")
            raise ValueError(msg)
        return by_uid[series_uid]
    if len(series) == 1:
        return series[0]
    hits = [by_uid[uid] for uid in dict.fromkeys(referenced) if uid in by_uid]
    if len(hits) == 1:
        return hits[0]
    if rule == "thinnest_axial":
        axial = [s for s in series if s.axial and s.n_slices > 1]
        if axial:
            return min(axial, key=lambda s: (s.spacing_mm[2], -s.n_slices))
    msg = (f"{len(series)} DICOM series in one folder; name one in the manifest column "
           f"'series_uid' or set dataset.series_rule=thinnest_axial. Series found:\n"
           f"{describe_series(series)}")
    raise ValueError(msg)
