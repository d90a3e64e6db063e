"""A cohort manifest from a TCIA download: CT + RTSTRUCT/SEG per patient + the clinical sheet.

The download is walked folder by folder (TCIA's patient/study/series layout, classic or
descriptive names alike); each series folder is identified by its DICOM headers, not its
name. For every patient the CT series that a mask of the layout's preferred modality
references is paired with that mask, and the patient's row of the clinical sheet is joined.
Only the target and the layout's clinical columns are copied (never dates or names).
Nothing is downloaded here: the user fetches the collection with the NBIA Data Retriever.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

from pdl1exp.data.dicom_masks import DICOM_MASK_MODALITIES, open_dicom_mask

__all__ = ["TciaLayout", "build_manifest", "scan_series"]

_SKIPPED_COLUMNS = ["patient_id", "reason"]


@dataclass(frozen=True)
class TciaLayout:
    """How one TCIA collection is organised (from ``conf/dataset/<layout>.yaml``'s ``tcia``).

    Args:
        clinical_id: the clinical sheet's patient column (matches the DICOM PatientID).
        masks: mask modalities in order of preference (``RTSTRUCT``, ``SEG``).
        columns: clinical columns copied into the manifest (besides the target).
    """

    clinical_id: str
    masks: tuple[str, ...]
    columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [m for m in self.masks if m not in DICOM_MASK_MODALITIES]
        if unknown or not self.masks:
            msg = f"tcia.masks must list some of {DICOM_MASK_MODALITIES}, got {list(self.masks)}"
            raise ValueError(msg)


def scan_series(root: str | Path) -> pd.DataFrame:
    """One row per DICOM series folder under ``root``: patient_id, modality, series_uid,
    path (the folder for images, the file for RTSTRUCT/SEG) and referenced (series UIDs)."""
    rows = []
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            path = Path(folder) / name
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
                    "PatientID", "Modality", "SeriesInstanceUID"])
            except (InvalidDicomError, OSError):
                continue
            modality = str(header.get("Modality", "")).upper()
            row = {"patient_id": str(header.get("PatientID", "")).strip(), "modality": modality,
                   "series_uid": str(header.get("SeriesInstanceUID", "")),
                   "path": str(path), "referenced": frozenset()}
            if modality in DICOM_MASK_MODALITIES:
                mask = open_dicom_mask(path)
                rows.append({**row, "referenced": mask.referenced_series if mask else frozenset()})
                continue
            rows.append({**row, "path": folder})
            break  # one header identifies an image series folder
    return pd.DataFrame(rows, columns=["patient_id", "modality", "series_uid", "path",
                                       "referenced"])


def _relative(path: str, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def build_manifest(*, root: str | Path, clinical: str | Path, target: str, out: str | Path,
                   layout: TciaLayout) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write the manifest of a TCIA download and return it with the patients left out.

    Args:
        root: the download folder (the collection's patient folders anywhere below it).
        clinical: the collection's clinical CSV.
        target: the clinical column to predict (copied as is; ``dataset.target`` says how
            it becomes 0/1).
        out: the manifest CSV to write; image and mask paths are relative to its folder.
        layout: the collection's :class:`TciaLayout`.

    Returns:
        The manifest and a table (patient_id, reason) of patients without a usable CT/mask
        pair or clinical row.
    """
    out = Path(out)
    sheet = pd.read_csv(clinical, dtype=str)
    sheet.columns = [str(c).strip() for c in sheet.columns]
    wanted = list(dict.fromkeys([target, *layout.columns]))
    missing = [c for c in [layout.clinical_id, *wanted] if c not in sheet.columns]
    if missing:
        msg = f"{clinical}: column(s) {missing} not found; columns present: {list(sheet.columns)}"
        raise ValueError(msg)
    sheet[layout.clinical_id] = sheet[layout.clinical_id].str.strip()
    sheet = sheet.drop_duplicates(layout.clinical_id).set_index(layout.clinical_id)

    series = scan_series(root)
    if series.empty:
        msg = f"{root}: no DICOM files found below this folder"
        raise ValueError(msg)
    rows, skipped = [], []
    for pid, found in series.groupby("patient_id", sort=True):
        images = found[~found["modality"].isin(DICOM_MASK_MODALITIES)] \
            .drop_duplicates("series_uid").set_index("series_uid")
        pair = _pair(found, images, layout.masks)
        if pid not in sheet.index:
            skipped.append({"patient_id": pid, "reason": f"no row in {Path(clinical).name}"})
        elif pair is None:
            skipped.append({"patient_id": pid, "reason": f"no {'/'.join(layout.masks)} "
                            f"referencing one of its {len(images)} image series"})
        else:
            image, mask = pair
            rows.append({"patient_id": pid, "image": _relative(image, out.parent),
                         "mask": _relative(mask, out.parent),
                         **sheet.loc[pid, wanted].to_dict()})
    for pid in sorted(set(sheet.index) - set(series["patient_id"])):
        skipped.append({"patient_id": pid, "reason": f"no DICOM series below {root}"})
    manifest = pd.DataFrame(rows, columns=["patient_id", "image", "mask", *wanted])
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(out, index=False)
    return manifest, pd.DataFrame(skipped, columns=_SKIPPED_COLUMNS)


def _pair(found: pd.DataFrame, images: pd.DataFrame,
          preference: Sequence[str]) -> tuple[str, str] | None:
    """(image folder, mask file) of the first preferred mask whose CT is present."""
    for modality in preference:
        masks = found[found["modality"] == modality].sort_values("path")
        for _, mask in masks.iterrows():
            hits = sorted(uid for uid in mask["referenced"] if uid in images.index)
            if hits:
                return images.loc[hits[0], "path"], mask["path"]
    return None
