"""Load and validate a cohort manifest (CSV or Parquet) before any heavy work.

(Longer than most modules: every column's validation feeds one problem list, so a user sees
all bad rows in one error.)

Every problem of every row is collected (patient, column, reason) and reported in one error,
so a user fixes the manifest in one pass. With ``on_error="skip"`` the bad patients are
excluded and listed instead; a patient is never dropped silently.

DICOM inputs are resolved here, once, so that every later stage reads plain files: a folder
with several series becomes a folder of links to the chosen series
(``<cache_dir>/series/<uid>``), and an RTSTRUCT/SEG mask becomes a label image on the CT's
grid (``<cache_dir>/masks/<key>.nii.gz``, keyed by file contents and the structure chosen).
The table's ``image`` and ``mask`` columns point at those.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from pdl1exp.data.dicom_masks import DicomMask, DicomMaskError, open_dicom_mask, rasterise
from pdl1exp.data.images import (
    ImageReadError,
    geometry_mismatch,
    label_problem,
    read_image,
    write_image,
)
from pdl1exp.data.series import SERIES_RULES, choose_series, image_series
from pdl1exp.data.target import DEFAULT_TARGET_NAME, Target
from pdl1exp.hashing import content_key, file_digest
from pdl1exp.memo import code_key, read_memo, stat_signature, write_memo
from pdl1exp.workers import n_workers

__all__ = ["Cohort", "CohortError", "Problem", "dataset_options", "load_cohort", "parse_seed",
           "problems_table"]

log = logging.getLogger(__name__)

_SPLITS = ("train", "test", "external")
_UNLABELLED = -1
_PROBLEM_COLUMNS = ["patient_id", "column", "reason"]


@dataclass(frozen=True)
class Problem:
    """One reason why one row cannot be used."""

    patient_id: str
    column: str
    reason: str

    def __str__(self) -> str:
        return f"patient {self.patient_id!r}, column {self.column!r}: {self.reason}"


class CohortError(ValueError):
    """The manifest has rows that cannot be used; ``problems`` lists every one of them."""

    def __init__(self, source: Path, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        patients = {p.patient_id for p in self.problems}
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"{source}: {len(self.problems)} problem(s) in {len(patients)} row(s):\n{lines}\n"
            "Fix these rows, or set dataset.on_error=skip to exclude them (they are then "
            "listed in excluded_patients.csv)."
        )


@dataclass(frozen=True)
class Cohort:
    """A validated cohort.

    Args:
        table: one row per patient (index ``patient_id``) with absolute ``image``/``mask``
            paths (mask may be None; DICOM inputs resolved as in the module docstring),
            ``series_uid`` (the DICOM series read, or None), ``mask_format`` (``label``,
            ``RTSTRUCT``, ``SEG`` or None), ``seed`` as an (x, y, z) tuple or None, integer
            ``label``, ``split`` (None when absent), ``center``, the clinical columns, and the
            content digests ``image_sha``/``mask_sha``.
        numeric: clinical numeric column names.
        categorical: clinical categorical column names.
        source: the manifest file.
        data_hash: hash of labels, clinical values, splits, seeds and file contents.
        problems: why each excluded patient was left out (``on_error=skip``).
        target_name: display name of the outcome ("PD-L1", or ``dataset.target.name``).
    """

    table: pd.DataFrame
    numeric: list[str]
    categorical: list[str]
    source: Path
    data_hash: str
    problems: list[Problem] = field(default_factory=list)
    target_name: str = DEFAULT_TARGET_NAME

    @property
    def clinical(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    @property
    def class_names(self) -> tuple[str, str]:
        """Names of label 0 and 1 ("PD-L1 negative", "PD-L1 positive")."""
        return f"{self.target_name} negative", f"{self.target_name} positive"

    @property
    def excluded(self) -> pd.DataFrame:
        """The problems as a table (patient_id, column, reason)."""
        return problems_table(self.problems)


def problems_table(problems: Sequence[Problem]) -> pd.DataFrame:
    """Problems as rows of patient_id, column, reason (``excluded_patients.csv``)."""
    return pd.DataFrame([vars(p) for p in problems], columns=_PROBLEM_COLUMNS)


def parse_seed(value: str) -> tuple[float, float, float]:
    """Parse ``"x,y,z"`` (world mm) into floats."""
    parts = [p.strip() for p in str(value).strip().strip("()[]").split(",")]
    if len(parts) != 3:
        msg = f"seed must be 'x,y,z' in mm, got {value!r}"
        raise ValueError(msg)
    try:
        return (float(parts[0]), float(parts[1]), float(parts[2]))
    except ValueError as err:
        msg = f"seed must be three numbers 'x,y,z' in mm, got {value!r}"
        raise ValueError(msg) from err


def _read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        msg = f"manifest not found: {path}"
        raise FileNotFoundError(msg)
    if path.suffix.lower() in (".parquet", ".pq"):
        table = pd.read_parquet(path)
    else:
        try:
            with warnings.catch_warnings():
                # index_col=False and this: a row with extra fields is an error, never a
                # silent shift of the columns or a loss of fields
                warnings.simplefilter("error", pd.errors.ParserWarning)
                table = pd.read_csv(path, dtype={"patient_id": str}, keep_default_na=True,
                                    index_col=False)
        except UnicodeDecodeError as err:
            reason = (f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                      f"{err.start}): save the manifest as UTF-8 CSV")
            raise CohortError(path, [Problem("-", "-", reason)]) from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, pd.errors.ParserWarning) as err:
            reason = f"not a readable CSV ({str(err).strip()})"
            raise CohortError(path, [Problem("-", "-", reason)]) from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or \
        str(value).strip() == ""


def _resolve(value: object, root: Path) -> Path:
    path = Path(str(value).strip()).expanduser()
    return path if path.is_absolute() else root / path


def _label(row: pd.Series, tps_cutoff: float, target: Target | None, *,
           required: bool) -> tuple[int | None, Problem | None]:
    pid = str(row["patient_id"])
    if target is not None:
        if target.column in row.index and not _blank(row[target.column]):
            try:
                return target.label(row[target.column]), None
            except ValueError as err:
                return None, Problem(pid, target.column, str(err))
        if not required:
            return _UNLABELLED, None
        return None, Problem(pid, target.column, f"missing value of the target "
                             f"{target.name!r} (dataset.target)")
    if "label" in row.index and not _blank(row["label"]):
        value = str(row["label"]).strip().lower()
        mapping = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}
        if value not in mapping:
            return None, Problem(pid, "label", f"must be 0 or 1, got {row['label']!r}")
        return mapping[value], None
    if "pdl1_tps" in row.index and not _blank(row["pdl1_tps"]):
        try:
            tps = float(row["pdl1_tps"])
        except ValueError:
            return None, Problem(pid, "pdl1_tps", f"not a number: {row['pdl1_tps']!r}")
        if not 0.0 <= tps <= 100.0:
            return None, Problem(pid, "pdl1_tps", f"must be a percentage in [0, 100], got {tps}")
        return int(tps >= tps_cutoff), None
    if not required:
        return _UNLABELLED, None
    return None, Problem(pid, "label", "missing label (give 'label' 0/1 or 'pdl1_tps')")


@dataclass(frozen=True)
class _DicomOptions:
    """How DICOM series and RTSTRUCT/SEG masks are resolved (see :func:`load_cohort`)."""

    roi_name: str | int | None
    segment: str | int | None
    series_rule: str
    plane_tolerance: float
    cache_dir: Path


@dataclass
class _RowCheck:
    problems: list[Problem]
    image_sha: str | None = None
    mask_sha: str | None = None
    image: Path | None = None
    mask: Path | None = None
    series_uid: str | None = None
    mask_format: str | None = None


def _series_folder(folder: Path, series_uid: str | None, referenced: frozenset[str],
                   options: _DicomOptions) -> tuple[Path, str | None]:
    """The folder to read (holding exactly the chosen series) and that series' UID."""
    try:
        series = image_series(folder)
    except (RuntimeError, OSError, InvalidDicomError) as err:
        msg = f"unreadable DICOM headers ({err})"
        raise ImageReadError(msg) from err
    chosen = choose_series(series, series_uid=series_uid, referenced=referenced,
                           rule=options.series_rule)
    if len(series) == 1:
        return folder, chosen.uid
    links = options.cache_dir / "series" / chosen.uid
    if not links.exists():
        links.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{chosen.uid}.", dir=links.parent))
        for file in chosen.files:
            (partial / Path(file).name).symlink_to(Path(file).resolve())
        try:
            os.replace(partial, links)
        except OSError:  # another thread made it first
            shutil.rmtree(partial)
    return links, chosen.uid


def _rasterised(mask: DicomMask, image: sitk.Image, *, series_uid: str | None, image_sha: str,
                options: _DicomOptions) -> tuple[Path, str]:
    """The cached label image of an RTSTRUCT/SEG on this image's grid, and its key."""
    key = content_key({"mask": file_digest(mask.path), "image": image_sha,
                       "roi_name": options.roi_name, "segment": options.segment,
                       "plane_tolerance": options.plane_tolerance})
    path = options.cache_dir / "masks" / f"{key}.nii.gz"
    if not path.exists():
        write_image(rasterise(mask, image, image_series_uid=series_uid,
                              roi_name=options.roi_name, segment=options.segment,
                              plane_tolerance=options.plane_tolerance), path)
    return path, key


# The modules whose code decides a row's image check: a memo of another version is not read.
_CHECK_CODE = ("data/manifest.py", "data/images.py", "data/dicom_masks.py", "data/series.py")


def _checked(pid: str, image_path: Path, mask_path: Path | None,
             seed: tuple[float, float, float] | None, series_uid: str | None, *,
             air_hu: float, tolerance_mm: float, options: _DicomOptions) -> _RowCheck:
    """:func:`_check_images`, read back from ``<cache_dir>/checks`` when a clean check of the
    same files (names, sizes, modification times), settings and code is stored there."""
    folder = options.cache_dir / "checks"
    key = content_key({
        "code": code_key(*_CHECK_CODE), "image": stat_signature(image_path),
        "mask": stat_signature(mask_path), "seed": seed, "series_uid": series_uid,
        "air_hu": air_hu, "tolerance_mm": tolerance_mm,
        "dicom": [options.roi_name, options.segment, options.series_rule,
                  options.plane_tolerance]})
    stored = read_memo(folder, key)
    if stored is not None and all(Path(stored[f]).exists() for f in ("image", "mask")
                                  if stored[f] is not None):
        return _RowCheck([], **{f: Path(v) if f in ("image", "mask") and v is not None else v
                                for f, v in stored.items()})
    check = _check_images(pid, image_path, mask_path, seed, series_uid, air_hu=air_hu,
                          tolerance_mm=tolerance_mm, options=options)
    if not check.problems:  # a bad row is read again: its report stays current
        write_memo(folder, key, {f: str(v) if isinstance(v, Path) else v
                                 for f, v in vars(check).items() if f != "problems"})
    return check


def _check_images(pid: str, image_path: Path, mask_path: Path | None,
                  seed: tuple[float, float, float] | None, series_uid: str | None, *,
                  air_hu: float, tolerance_mm: float, options: _DicomOptions) -> _RowCheck:
    """Read the image (and mask) of one row and check everything that needs the pixels."""
    dicom_mask = open_dicom_mask(mask_path) if mask_path is not None and mask_path.exists() \
        else None
    referenced = dicom_mask.referenced_series if dicom_mask else frozenset()
    try:
        if image_path.is_dir():
            image_path, series_uid = _series_folder(image_path, series_uid, referenced,
                                                    options)
        elif series_uid:
            return _RowCheck([Problem(pid, "series_uid", f"{image_path} is a file, not a "
                                      "DICOM folder: series_uid applies to folders only")])
        image = read_image(image_path)
    except ValueError as err:  # ImageReadError, or no/ambiguous/unknown series
        column = "series_uid" if series_uid and "series_uid" in str(err) else "image"
        return _RowCheck([Problem(pid, column, f"{image_path}: {err}")])
    check = _RowCheck([], image_sha=file_digest(image_path), image=image_path,
                      series_uid=series_uid if image_path.is_dir() else None)
    if mask_path is not None:
        mask = None
        try:
            if dicom_mask is None:
                mask = read_image(mask_path)
                check.mask, check.mask_sha = mask_path, file_digest(mask_path)
                check.mask_format = "label"
            else:
                check.mask, check.mask_sha = _rasterised(
                    dicom_mask, image, series_uid=check.series_uid, image_sha=check.image_sha,
                    options=options)
                check.mask_format = dicom_mask.modality
                mask = read_image(check.mask)
        except (ImageReadError, DicomMaskError) as err:
            check.problems.append(Problem(pid, "mask", str(err)))
        if mask is not None:
            mismatch = label_problem(mask) or geometry_mismatch(image, mask,
                                                                tolerance_mm=tolerance_mm)
            if mismatch:
                check.problems.append(Problem(pid, "mask", f"{mask_path}: {mismatch}"))
            elif not sitk.GetArrayViewFromImage(mask).any():
                check.problems.append(Problem(pid, "mask", f"{mask_path}: empty mask "
                                              "(no non-zero voxel)"))
    if seed is not None:
        index = image.TransformPhysicalPointToContinuousIndex(seed)
        size = image.GetSize()
        if not all(-0.5 <= i <= s - 0.5 for i, s in zip(index, size, strict=True)):
            check.problems.append(Problem(pid, "seed", f"{seed} mm lies outside the image "
                                          f"volume (continuous index {np.round(index, 1)})"))
        else:
            voxel = tuple(round(i) for i in index)
            hu = float(image[voxel])
            if hu < air_hu:
                check.problems.append(Problem(pid, "seed", f"{seed} mm lies in air/lung "
                                              f"({hu:.0f} HU < {air_hu:.0f} HU): click "
                                              "inside the tumour"))
    return check


def dataset_options(dataset: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`load_cohort` keyword arguments from a ``dataset`` config (conf/dataset/*.yaml).

    The path, ``cache_dir`` and ``require_label`` are the caller's.
    """
    validation = dataset["validation"]
    options = {
        "tps_cutoff": dataset["tps_cutoff"],
        "numeric": list(dataset["clinical"]["numeric"]),
        "categorical": list(dataset["clinical"]["categorical"]),
        "on_error": dataset["on_error"],
        "air_hu": validation["air_hu"],
        "geometry_tolerance_mm": validation["geometry_tolerance_mm"],
        "n_jobs": validation["n_jobs"],
    }
    # Keys added with DICOM masks and targets; configs saved before them keep the defaults.
    optional = {"target": dataset, "roi_name": dataset, "segment": dataset,
                "series_rule": dataset, "contour_plane_tolerance": validation}
    options.update({key: source[key] for key, source in optional.items() if key in source})
    return options


def load_cohort(path: str | Path, *, tps_cutoff: float = 1.0,
                numeric: Sequence[str] = (), categorical: Sequence[str] = (),
                on_error: str = "raise", air_hu: float = -900.0,
                geometry_tolerance_mm: float = 1e-3, n_jobs: int = 1,
                require_label: bool = True, target: Mapping[str, Any] | None = None,
                roi_name: str | int | None = None, segment: str | int | None = None,
                series_rule: str = "error", contour_plane_tolerance: float = 0.1,
                cache_dir: str | Path | None = None) -> Cohort:
    """Read, resolve and validate a manifest.

    Args:
        path: CSV or Parquet manifest (columns as in DESIGN.md).
        tps_cutoff: TPS (percent) at or above which a patient is PD-L1 positive.
        numeric: clinical numeric columns.
        categorical: clinical categorical columns.
        on_error: ``"raise"`` (report all problems in one error) or ``"skip"`` (exclude them).
        air_hu: a seed below this attenuation is rejected as being in air/lung.
        geometry_tolerance_mm: allowed mask/image spacing and origin difference.
        n_jobs: threads reading images in parallel (:func:`~pdl1exp.workers.n_workers`:
            -1 one per core).
        require_label: False for scoring new patients, whose labels may be unknown (a label
            that is given must still be valid; an absent one becomes -1).
        target: ``dataset.target`` (:mod:`pdl1exp.data.target`); None → label/pdl1_tps.
        roi_name: RTSTRUCT structure (name, regex or number); None → the only one.
        segment: DICOM SEG segment (number or label); None → the only one.
        series_rule: ``error`` or ``thinnest_axial`` for folders with several series and no
            ``series_uid`` (:mod:`pdl1exp.data.series`).
        contour_plane_tolerance: how far (fraction of a slice) an RTSTRUCT contour may lie
            off the image's slices.
        cache_dir: where series links and rasterised RTSTRUCT/SEG masks go (content-keyed),
            and each clean row's image check (keyed by its files' names, sizes and
            modification times: a rerun reads no unchanged image);
            None → a ``pdl1exp-dicom`` folder in the system's temporary directory.
    """
    if on_error not in ("raise", "skip"):
        msg = f"dataset.on_error must be 'raise' or 'skip', got {on_error!r}"
        raise ValueError(msg)
    if series_rule not in SERIES_RULES:
        msg = f"dataset.series_rule must be one of {SERIES_RULES}, got {series_rule!r}"
        raise ValueError(msg)
    outcome = Target.from_config(target)
    options = _DicomOptions(
        roi_name=roi_name, segment=segment, series_rule=series_rule,
        plane_tolerance=contour_plane_tolerance,
        cache_dir=Path(cache_dir) if cache_dir is not None
        else Path(tempfile.gettempdir()) / "pdl1exp-dicom")
    source = Path(path).resolve()
    table = _read_table(source)
    root = source.parent
    missing = [c for c in ("patient_id", "image") if c not in table.columns]
    if require_label and outcome is not None and outcome.column not in table.columns:
        missing.append(f"{outcome.column} (dataset.target.column)")
    elif require_label and outcome is None and "label" not in table.columns \
            and "pdl1_tps" not in table.columns:
        missing.append("label or pdl1_tps")
    if "mask" not in table.columns and "seed" not in table.columns:
        missing.append("mask or seed")
    absent = [c for c in [*numeric, *categorical] if c not in table.columns]
    if missing or absent:
        present = f"columns present: {list(table.columns)}"
        if len(table.columns) == 1 and (delimiter := next(
                (d for d in ";\t|" if d in table.columns[0]), None)):
            present += f" (the file looks {delimiter!r}-delimited: save it comma-separated)"
        problems = [Problem("-", ", ".join(missing), f"required column(s) missing; {present}")
                    ] if missing else []
        if absent:
            problems.append(Problem("-", ", ".join(absent),
                                    f"named in dataset.clinical but absent; {present}"))
        raise CohortError(source, problems)

    problems: list[Problem] = []
    table["patient_id"] = [
        f"<row {i + 2}>" if _blank(v) else str(v).strip() for i, v in enumerate(table["patient_id"])
    ]
    for pid in table.loc[table["patient_id"].str.startswith("<row "), "patient_id"]:
        problems.append(Problem(pid, "patient_id", "missing patient_id"))
    for pid in table.loc[table["patient_id"].duplicated(keep=False), "patient_id"].unique():
        problems.append(Problem(pid, "patient_id", "duplicate patient_id"))

    rows, jobs = [], []
    for _, row in table.iterrows():
        pid = row["patient_id"]
        record: dict[str, object] = {"patient_id": pid}
        label, problem = _label(row, tps_cutoff, outcome, required=require_label)
        record["label"] = label
        problems.extend([problem] if problem else [])
        split = None
        if "split" in row.index:
            split = str(row["split"]).strip().lower() if not _blank(row["split"]) else ""
            if split not in _SPLITS:
                problems.append(Problem(pid, "split", f"must be one of {_SPLITS}, got "
                                        f"{row['split']!r}"))
        record["split"] = split
        record["center"] = "" if "center" not in row.index or _blank(row["center"]) \
            else str(row["center"]).strip()
        for col in numeric:
            value = row[col]
            try:
                record[col] = np.nan if _blank(value) else float(value)
            except ValueError:
                problems.append(Problem(pid, col, f"not a number: {value!r}"))
                record[col] = np.nan
        for col in categorical:
            record[col] = np.nan if _blank(row[col]) else str(row[col]).strip()

        image = None if _blank(row["image"]) else _resolve(row["image"], root)
        mask = None if "mask" not in row.index or _blank(row["mask"]) \
            else _resolve(row["mask"], root)
        seed = None
        if "seed" in row.index and not _blank(row["seed"]):
            try:
                seed = parse_seed(row["seed"])
            except ValueError as err:
                problems.append(Problem(pid, "seed", str(err)))
        elif mask is None:
            problems.append(Problem(pid, "mask/seed", "neither a mask nor a seed is given"))
        series_uid = None if "series_uid" not in row.index or _blank(row["series_uid"]) \
            else str(row["series_uid"]).strip()
        if image is None:
            problems.append(Problem(pid, "image", "missing image path"))
        else:
            jobs.append((pid, image, mask, seed, series_uid))
        record.update(image=str(image) if image else None, mask=str(mask) if mask else None,
                      seed=seed)
        rows.append(record)

    def check(job: tuple) -> tuple[str, _RowCheck]:
        pid, image, mask, seed, series_uid = job
        return pid, _checked(pid, image, mask, seed, series_uid, air_hu=air_hu,
                             tolerance_mm=geometry_tolerance_mm, options=options)

    with ThreadPoolExecutor(n_workers(n_jobs, setting="dataset.validation.n_jobs")) as pool:
        checks = dict(pool.map(check, jobs))
    for record in rows:
        found = checks.get(record["patient_id"]) or _RowCheck([])
        if found.image is not None:
            record["image"] = str(found.image)
        if found.mask is not None:
            record["mask"] = str(found.mask)
        record.update(series_uid=found.series_uid, mask_format=found.mask_format,
                      image_sha=found.image_sha, mask_sha=found.mask_sha)
        problems.extend(found.problems)

    if problems and on_error == "raise":
        raise CohortError(source, problems)
    bad = {p.patient_id for p in problems}
    if bad:
        log.warning("Excluding %d patient(s) with problems (on_error=skip):\n%s", len(bad),
                    "\n".join(f"  - {p}" for p in problems))
    frame = pd.DataFrame([r for r in rows if r["patient_id"] not in bad])
    if frame.empty:
        raise CohortError(source, problems or [Problem("-", "-", "the manifest has no rows")])
    frame = frame.set_index("patient_id")
    frame["label"] = frame["label"].astype(int)
    if require_label and frame["label"].nunique() < 2:
        reason = f"every usable patient has label {frame['label'].iloc[0]}; need both"
        raise CohortError(source, [*problems, Problem("-", "label", reason)])
    return Cohort(table=frame, numeric=list(numeric),
                  categorical=list(categorical), source=source,
                  data_hash=_data_hash(frame, [*numeric, *categorical]), problems=problems,
                  target_name=outcome.name if outcome else DEFAULT_TARGET_NAME)


def _data_hash(frame: pd.DataFrame, clinical: list[str]) -> str:
    """Hash of everything that defines the data (not the paths: moving a folder is fine)."""
    columns = ["label", "split", "center", "seed", "image_sha", "mask_sha", *clinical]
    canonical = frame[columns].sort_index().astype(str).to_csv().encode()
    return hashlib.sha256(canonical).hexdigest()
