"""``python -m pdl1exp.cohort build-tcia``: a fake TCIA download becomes a manifest that loads
and trains."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from pdl1exp.cohort import main
from pdl1exp.data.manifest import dataset_options, load_cohort
from tests.conftest import tiny_overrides
from tests.dicom_helpers import circle, square, square_contours, write_ct, write_rtstruct, write_seg

HISTOLOGY = ["squamous cell carcinoma", "adenocarcinoma", "large cell", "nos"]


def _download(root: Path, n: int, *, organs: bool = True) -> pd.DataFrame:
    """LUNG1-like tree: <root>/NSCLC-Radiomics/<patient>/<study>/<series>/*.dcm.

    Patient 0 has no structure set, the last one no clinical row; the others have an RTSTRUCT
    (tumour, and a lung when ``organs``) and every third also a SEG."""
    rows = []
    for i in range(n):
        pid = f"LUNG1-{i + 1:03d}"
        study = root / "NSCLC-Radiomics" / pid / f"01-01-2000-StudyID-{i}"
        ct = write_ct(study / "0.000000-NA-CT", patient_id=pid, seed=i)
        if i > 0:
            lung = {"Lung-Left": square_contours(6)} if organs else {}
            write_rtstruct(study / "1.000000-RTSTRUCT" / "1-1.dcm", ct,
                           {**lung, "GTV-1": square_contours(2 + i % 3)})
        if i % 3 == 1:
            write_seg(study / "300.000000-Segmentation" / "1-1.dcm", ct,
                      {"GTV-1": square(2), "Lung": circle()})
        if i < n - 1:
            rows.append({"PatientID": pid, "age": 60 + i, "gender": "male" if i % 2 else
                         "female", "Overall.Stage": ["I", "II", "IIIa"][i % 3],
                         "Histology": HISTOLOGY[i % 4], "label": i % 2,
                         "Survival.time": 100 * i})
    return pd.DataFrame(rows)


def test_build_tcia_pairs_ct_and_mask_and_joins_the_sheet(tmp_path: Path, capsys) -> None:
    sheet = _download(tmp_path / "download", 6)
    sheet.to_csv(tmp_path / "clinical.csv", index=False)
    out = tmp_path / "lung1" / "manifest.csv"
    code = main(["build-tcia", "--layout", "lung1", "--root", str(tmp_path / "download"),
                 "--clinical", str(tmp_path / "clinical.csv"), "--target", "Histology",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "4 patient(s) written" in printed
    assert re.search(r"LUNG1-001 +no RTSTRUCT/SEG referencing one of its 1 image series",
                     printed)
    assert re.search(r"LUNG1-006 +no row in clinical.csv", printed)
    manifest = pd.read_csv(out)
    assert list(manifest.columns) == ["patient_id", "image", "mask", "Histology", "age",
                                      "gender", "Overall.Stage"]  # no survival, no dates
    assert manifest["patient_id"].tolist() == [f"LUNG1-00{i}" for i in range(2, 6)]
    first = manifest.iloc[0]
    assert first["image"] == "../download/NSCLC-Radiomics/LUNG1-002/01-01-2000-StudyID-1/" \
        "0.000000-NA-CT"
    assert first["mask"].endswith("1.000000-RTSTRUCT/1-1.dcm")  # RTSTRUCT preferred to SEG

    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["dataset=lung1", f"dataset.path={out}"])
    cohort = load_cohort(out, **dataset_options(cfg.dataset), cache_dir=tmp_path / "cache")
    assert cohort.target_name == "squamous histology"
    assert cohort.table["label"].to_dict() == {"LUNG1-002": 0, "LUNG1-003": 0, "LUNG1-005": 1}
    assert [p.patient_id for p in cohort.problems] == ["LUNG1-004"]  # histology "nos"
    assert "'nos' is neither positive" in cohort.problems[0].reason
    assert (cohort.table["mask_format"] == "RTSTRUCT").all()
    sizes = cohort.table["mask"].map(lambda p: Path(p).stat().st_size)
    assert sizes.gt(0).all()


@pytest.mark.slow
def test_a_tcia_manifest_trains_end_to_end(compose_cfg, tmp_path: Path) -> None:
    from pdl1exp.pipeline import run

    # One structure per RTSTRUCT and `label` as the target: the run does not depend on
    # cohort_stage passing dataset.roi_name/target (dataset_options) to load_cohort.
    sheet = _download(tmp_path / "download", 22, organs=False)
    sheet.to_csv(tmp_path / "clinical.csv", index=False)
    out = tmp_path / "manifest.csv"
    assert main(["build-tcia", "--layout", "lung1", "--root", str(tmp_path / "download"),
                 "--clinical", str(tmp_path / "clinical.csv"), "--target", "label",
                 "--out", str(out)]) == 0
    cfg = compose_cfg("+experiment=smoke", "dataset=lung1", f"dataset.path={out}",
                      "dataset.target=null", "dataset.generator=null",
                      "tuning.cv_folds=2", *tiny_overrides(tmp_path))
    objective = run(cfg)
    assert 0.0 <= objective <= 1.0
