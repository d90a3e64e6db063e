"""PHI hygiene: identifying DICOM header values never reach a log, the run folder, a cache
or the MLflow store (database and artifacts)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from pdl1exp.data.images import read_image
from pdl1exp.data.manifest import load_cohort
from pdl1exp.data.series import describe_series, image_series
from tests.conftest import CONF, TINY, tiny_overrides
from tests.dicom_helpers import write_ct

SRC = Path(__file__).resolve().parents[1] / "src"

# One canary per identifying tag; dates are valid DICOM dates no real study has.
CANARIES = {
    "PatientName": "ZQXPATNAME^ZQXGIVEN",
    "PatientID": "ZQXPATID77",
    "OtherPatientIDs": "ZQXOTHERID",
    "PatientBirthDate": "18870304",
    "PatientAddress": "ZQXADDRESS",
    "StudyDate": "18880415",
    "SeriesDate": "18890526",
    "AcquisitionDate": "18900607",
    "ContentDate": "18910718",
    "InstitutionName": "ZQXHOSPITAL",
    "InstitutionAddress": "ZQXINSTADDR",
    "ReferringPhysicianName": "ZQXREFERRING^ZQXREFGIVEN",
    "PerformingPhysicianName": "ZQXPERFORMING^ZQXPERFGIVEN",
    "OperatorsName": "ZQXOPERATOR^ZQXOPGIVEN",
    "AccessionNumber": "ZQXACC123",
    "StudyID": "ZQXSTUDY",
    "StationName": "ZQXSTATION",
}


def needles() -> list[bytes]:
    """Every canary as it could be written: raw, per name component, dates as ISO."""
    found = set()
    for value in CANARIES.values():
        found.update(part for part in value.split("^"))
        if value.isdigit():
            found.add(f"{value[:4]}-{value[4:6]}-{value[6:]}")
    return sorted(v.encode() for v in found)


def add_canaries(folder: Path) -> None:
    """Overwrite every identifying tag of every DICOM file in ``folder`` with a canary."""
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for tag, value in CANARIES.items():
            setattr(ds, tag, value)
        ds.save_as(path, enforce_file_format=True)


def leaks(text: bytes | str) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [n.decode() for n in needles() if n in data]


def test_the_data_layer_reads_no_canary(tmp_path: Path, caplog) -> None:
    series = tmp_path / "ct"
    write_ct(series)
    add_canaries(series)
    assert leaks(b"".join(p.read_bytes() for p in series.glob("*.dcm")))  # they are there
    image = read_image(series)
    assert image.GetMetaDataKeys() == ()
    assert not leaks(describe_series(image_series(series)))

    mask = read_image(series) > -10000  # a whole-volume mask in the image's geometry
    import SimpleITK as sitk
    sitk.WriteImage(sitk.Cast(mask, sitk.sitkUInt8), str(tmp_path / "mask.nii.gz"))
    assert not leaks((tmp_path / "mask.nii.gz").read_bytes())
    pd.DataFrame({"patient_id": ["S1", "S2"], "image": ["ct", "absent"],
                  "mask": ["mask.nii.gz", "mask.nii.gz"], "label": [1, 0]}
                 ).to_csv(tmp_path / "cohort.csv", index=False)
    with caplog.at_level(logging.DEBUG):
        cohort = load_cohort(tmp_path / "cohort.csv", on_error="skip", require_label=False,
                             cache_dir=tmp_path / "cache")
    assert list(cohort.table.index) == ["S1"]
    assert not leaks(cohort.table.to_csv())
    assert not leaks(caplog.text)
    assert "S2" in caplog.text  # the log did capture the validation


@pytest.mark.slow
def test_the_pipeline_leaks_no_canary(tmp_path: Path) -> None:
    """A smoke run on DICOM series carrying canaries in every identifying tag: not one
    byte of the store, run folder, caches or output may hold one."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config")
    GlobalHydra.instance().clear()
    generator = instantiate(cfg.dataset.generator, cache_dir=str(tmp_path / "cohort"),
                            **{**TINY, "n_patients": 20, "formats": {"dicom": 1.0},
                               "seed_fraction": 0.0})
    manifest = generator.write()
    for folder in (manifest.parent / "images").iterdir():
        add_canaries(folder)
        assert len(leaks(next(folder.glob("*.dcm")).read_bytes())) == len(needles())
    out = tmp_path / "out"
    clinical = cfg.dataset.clinical
    overrides = [
        "+experiment=smoke", "dataset=manifest", f"dataset.path={manifest}",
        "dataset.generator=null",  # the smoke experiment sizes the synthetic one
        f"dataset.clinical.numeric=[{','.join(clinical.numeric)}]",
        f"dataset.clinical.categorical=[{','.join(clinical.categorical)}]",
        f"dataset.clinical.log=[{','.join(clinical.log)}]", "tracking.qc=all",
        f"hydra.run.dir={out}/run", "log_level=DEBUG", *tiny_overrides(out),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get(
        "PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "pdl1exp", *overrides], cwd=tmp_path,
                          env=env, capture_output=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-3000:].decode(errors="replace")
    assert not leaks(done.stdout + done.stderr)
    files = [p for p in out.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".db" for p in files)
    assert any(p.name == "report.html" for p in files)
    assert any(p.suffix == ".log" for p in files)
    leaked = {str(p.relative_to(out)): found for p in files if (found := leaks(p.read_bytes()))}
    assert not leaked
