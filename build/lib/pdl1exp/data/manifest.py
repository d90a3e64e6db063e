"""Load and validate a cohort manifest (CSV or Parquet) before any heavy work.

Every problem of every row is collected (patient, column, reason) and reported in one error,
so a user fixes the manifest in one pass. With ``on_error="skip"`` the bad patients are
excluded and listed instead; a patient is never dropped silently.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from pdl1exp.data.images import ImageReadError, geometry_mismatch, read_image
from pdl1exp.hashing import file_digest

__all__ = ["Cohort", "CohortError", "Problem", "load_cohort", "parse_seed", "problems_table"]

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
            paths (mask may be None), ``seed`` as an (x, y, z) tuple or None, integer ``label``,
            ``split`` (None when absent), ``center``, the clinical columns, and the content
            digests ``image_sha``/``mask_sha``.
        numeric: clinical numeric column names.
        categorical: clinical categorical column names.
        source: the manifest file.
        data_hash: hash of labels, clinical values, splits, seeds and file contents.
        problems: why each excluded patient was left out (``on_error=skip``).
    """

    table: pd.DataFrame
    numeric: list[str]
    categorical: list[str]
    source: Path
    data_hash: str
    problems: list[Problem] = field(default_factory=list)

    @property
    def clinical(self) -> list[str]:
        return [*self.numeric, *self.categorical]

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
        table = pd.read_csv(path, dtype={"patient_id": str}, keep_default_na=True)
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or \
        str(value).strip() == ""


def _resolve(value: object, root: Path) -> Path:
    path = Path(str(value).strip()).expanduser()
    return path if path.is_absolute() else root / path


def _label(row: pd.Series, tps_cutoff: float, *,
           required: bool) -> tuple[int | None, Problem | None]:
    pid = str(row["patient_id"])
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


@dataclass
class _RowCheck:
    problems: list[Problem]
    image_sha: str | None = None
    mask_sha: str | None = None


def _check_images(pid: str, image_path: Path, mask_path: Path | None,
                  seed: tuple[float, float, float] | None, *, air_hu: float,
                  tolerance_mm: float) -> _RowCheck:
    """Read the image (and mask) of one row and check everything that needs the pixels."""
    try:
        image = read_image(image_path)
    except ImageReadError as err:
        return _RowCheck([Problem(pid, "image", str(err))])
    check = _RowCheck([], image_sha=file_digest(image_path))
    if mask_path is not None:
        try:
            mask = read_image(mask_path)
        except ImageReadError as err:
            check.problems.append(Problem(pid, "mask", str(err)))
        else:
            check.mask_sha = file_digest(mask_path)
            mismatch = geometry_mismatch(image, mask, tolerance_mm=tolerance_mm)
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


def load_cohort(path: str | Path, *, tps_cutoff: float = 1.0,
                numeric: Sequence[str] = (), categorical: Sequence[str] = (),
                on_error: str = "raise", air_hu: float = -900.0,
                geometry_tolerance_mm: float = 1e-3, n_jobs: int = 1,
                require_label: bool = True) -> Cohort:
    """Read, resolve and validate a manifest.

    Args:
        path: CSV or Parquet manifest (columns as in DESIGN.md).
        tps_cutoff: TPS (percent) at or above which a patient is PD-L1 positive.
        numeric: clinical numeric columns.
        categorical: clinical categorical columns.
        on_error: ``"raise"`` (report all problems in one error) or ``"skip"`` (exclude them).
        air_hu: a seed below this attenuation is rejected as being in air/lung.
        geometry_tolerance_mm: allowed mask/image spacing and origin difference.
        n_jobs: threads reading images in parallel.
        require_label: False for scoring new patients, whose labels may be unknown (a label
            that is given must still be valid; an absent one becomes -1).
    """
    if on_error not in ("raise", "skip"):
        msg = f"dataset.on_error must be 'raise' or 'skip', got {on_error!r}"
        raise ValueError(msg)
    source = Path(path).resolve()
    table = _read_table(source)
    root = source.parent
    missing = [c for c in ("patient_id", "image") if c not in table.columns]
    if require_label and "label" not in table.columns and "pdl1_tps" not in table.columns:
        missing.append("label or pdl1_tps")
    if "mask" not in table.columns and "seed" not in table.columns:
        missing.append("mask or seed")
    absent = [c for c in [*numeric, *categorical] if c not in table.columns]
    if missing or absent:
        detail = [f"required column(s) missing: {missing}"] if missing else []
        if absent:
            detail.append(f"clinical column(s) named in dataset.clinical but absent: {absent}")
        msg = f"{source}: " + "; ".join(detail) + f". Columns present: {list(table.columns)}"
        raise ValueError(msg)

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
        label, problem = _label(row, tps_cutoff, required=require_label)
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
        if image is None:
            problems.append(Problem(pid, "image", "missing image path"))
        else:
            jobs.append((pid, image, mask, seed))
        record.update(image=str(image) if image else None, mask=str(mask) if mask else None,
                      seed=seed)
        rows.append(record)

    def check(job: tuple) -> tuple[str, _RowCheck]:
        pid, image, mask, seed = job
        return pid, _check_images(pid, image, mask, seed, air_hu=air_hu,
                                  tolerance_mm=geometry_tolerance_mm)

    with ThreadPoolExecutor(max(1, n_jobs)) as pool:
        checks = dict(pool.map(check, jobs))
    for record in rows:
        found = checks.get(record["patient_id"])
        record["image_sha"] = found.image_sha if found else None
        record["mask_sha"] = found.mask_sha if found else None
        problems.extend(found.problems if found else [])

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
        msg = f"{source}: every usable patient has label {frame['label'].iloc[0]}; need both"
        raise ValueError(msg)
    return Cohort(table=frame, numeric=list(numeric),
                  categorical=list(categorical), source=source,
                  data_hash=_data_hash(frame, [*numeric, *categorical]), problems=problems)


def _data_hash(frame: pd.DataFrame, clinical: list[str]) -> str:
    """Hash of everything that defines the data (not the paths: moving a folder is fine)."""
    columns = ["label", "split", "center", "seed", "image_sha", "mask_sha", *clinical]
    canonical = frame[columns].sort_index().astype(str).to_csv().encode()
    return hashlib.sha256(canonical).hexdigest()
