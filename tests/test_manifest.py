"""Manifest loading: label rules, clinical typing, every bad-row kind named in one error."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from pdl1exp.data import manifest as manifest_module
from pdl1exp.data.manifest import CohortError, load_cohort, parse_seed

SHAPE = (10, 12, 12)  # z, y, x


def _image(path: Path, array: np.ndarray, origin=(0.0, 0.0, 0.0)) -> str:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.0))
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path.name


def _ct() -> np.ndarray:
    ct = np.full(SHAPE, -850, dtype=np.int16)
    ct[:, :, :2] = -1000  # air strip at x = 0, 1
    ct[4:7, 4:8, 4:8] = 40  # tumour
    return ct


def _mask() -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[4:7, 4:8, 4:8] = 1
    return mask


def _good_row(root: Path, pid: str, **extra) -> dict:
    return {"patient_id": pid, "image": _image(root / f"{pid}.nii.gz", _ct()),
            "mask": _image(root / f"{pid}_m.nii.gz", _mask()), "seed": "",
            "pdl1_tps": 60.0, "age": 61, "sex": "F", **extra}


def _write(root: Path, rows: list[dict], name: str = "cohort.csv") -> Path:
    path = root / name
    frame = pd.DataFrame(rows)
    if name.endswith(".parquet"):
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    return path


def _cohort(root: Path, rows: list[dict], **kwargs):
    return load_cohort(_write(root, rows), numeric=["age"], categorical=["sex"], **kwargs)


def test_valid_manifest_loads_with_labels_and_types(tmp_path: Path) -> None:
    rows = [_good_row(tmp_path, "P1", pdl1_tps=0.0), _good_row(tmp_path, "P2", pdl1_tps=0.5),
            _good_row(tmp_path, "P3", pdl1_tps=1.0, age=""),
            {**_good_row(tmp_path, "P4", pdl1_tps=80.0), "mask": "", "seed": "6.0, 5.0, 10.0"}]
    cohort = _cohort(tmp_path, rows)
    assert cohort.table["label"].to_dict() == {"P1": 0, "P2": 0, "P3": 1, "P4": 1}
    assert np.isnan(cohort.table.loc["P3", "age"])  # missing kept, imputed later
    assert cohort.table.loc["P4", "seed"] == (6.0, 5.0, 10.0)
    assert cohort.table.loc["P1", "image"] == str(tmp_path / "P1.nii.gz")
    assert pd.isna(cohort.table.loc["P4", "mask_sha"])
    assert len(cohort.table.loc["P1", "image_sha"]) == 64
    high = _cohort(tmp_path, rows, tps_cutoff=50.0)
    assert high.table["label"].to_dict() == {"P1": 0, "P2": 0, "P3": 0, "P4": 1}


def test_parquet_and_explicit_label(tmp_path: Path) -> None:
    rows = [{**_good_row(tmp_path, f"P{i}"), "label": i % 2, "split": s}
            for i, s in enumerate(["train", "TRAIN", "test", "external"])]
    path = _write(tmp_path, rows, "cohort.parquet")
    cohort = load_cohort(path)
    assert cohort.table["label"].tolist() == [0, 1, 0, 1]
    assert cohort.table["split"].tolist() == ["train", "train", "test", "external"]


def test_every_bad_row_kind_is_named_in_one_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty_m.nii.gz"
    _image(empty, np.zeros(SHAPE, dtype=np.uint8))
    shifted = tmp_path / "shift_m.nii.gz"
    _image(shifted, _mask(), origin=(0.0, 0.0, 5.0))
    truncated = tmp_path / "trunc.nii.gz"
    _image(truncated, _ct())
    truncated.write_bytes(truncated.read_bytes()[:60])
    rows = [
        _good_row(tmp_path, "OK1"), _good_row(tmp_path, "OK2", pdl1_tps=0.0),
        {**_good_row(tmp_path, "MISSINGFILE"), "image": "nowhere.nii.gz"},
        {**_good_row(tmp_path, "CORRUPT"), "image": truncated.name},
        {**_good_row(tmp_path, "GEOMETRY"), "mask": shifted.name},
        {**_good_row(tmp_path, "EMPTY"), "mask": empty.name},
        {**_good_row(tmp_path, "OUTSIDE"), "mask": "", "seed": "500,0,0"},
        {**_good_row(tmp_path, "AIR"), "mask": "", "seed": "0,5,10"},
        {**_good_row(tmp_path, "BADSEED"), "mask": "", "seed": "1;2"},
        {**_good_row(tmp_path, "NOROI"), "mask": "", "seed": ""},
        {**_good_row(tmp_path, "NOLABEL"), "pdl1_tps": ""},
        {**_good_row(tmp_path, "BADTPS"), "pdl1_tps": 140},
        {**_good_row(tmp_path, "BADAGE"), "age": "sixty"},
        _good_row(tmp_path, "DUP"), _good_row(tmp_path, "DUP"),
    ]
    with pytest.raises(CohortError) as caught:
        _cohort(tmp_path, rows)
    found = {(p.patient_id, p.column) for p in caught.value.problems}
    expected = {("MISSINGFILE", "image"), ("CORRUPT", "image"), ("GEOMETRY", "mask"),
                ("EMPTY", "mask"), ("OUTSIDE", "seed"), ("AIR", "seed"), ("BADSEED", "seed"),
                ("NOROI", "mask/seed"), ("NOLABEL", "label"), ("BADTPS", "pdl1_tps"),
                ("BADAGE", "age"), ("DUP", "patient_id")}
    assert found == expected
    message = str(caught.value)
    for pid, _ in expected:
        assert pid in message
    assert "OK1" not in message
    assert "dataset.on_error=skip" in message


def test_skip_excludes_and_records(tmp_path: Path) -> None:
    rows = [_good_row(tmp_path, "OK1"), _good_row(tmp_path, "OK2", pdl1_tps=0.0),
            {**_good_row(tmp_path, "BAD"), "image": "nowhere.nii.gz"}]
    cohort = _cohort(tmp_path, rows, on_error="skip")
    assert list(cohort.table.index) == ["OK1", "OK2"]
    assert cohort.excluded.to_dict("records")[0]["patient_id"] == "BAD"
    assert cohort.excluded.columns.tolist() == ["patient_id", "column", "reason"]


def test_bad_split_and_bad_label(tmp_path: Path) -> None:
    rows = [{**_good_row(tmp_path, "A"), "split": "validation", "label": 1},
            {**_good_row(tmp_path, "B"), "split": "train", "label": "yes"}]
    with pytest.raises(CohortError) as caught:
        _cohort(tmp_path, rows)
    assert {(p.patient_id, p.column) for p in caught.value.problems} == {("A", "split"),
                                                                         ("B", "label")}


def test_missing_columns_are_listed(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"patient_id": "A", "image": "a.nii.gz"}])
    with pytest.raises(ValueError, match=r"label or pdl1_tps.*mask or seed"):
        load_cohort(path)
    path = _write(tmp_path, [_good_row(tmp_path, "A")])
    with pytest.raises(CohortError, match=r"'smoking': named in dataset.clinical but absent"):
        load_cohort(path, categorical=["smoking"])


def test_parse_seed() -> None:
    assert parse_seed("(1, -2.5, 3e1)") == (1.0, -2.5, 30.0)
    with pytest.raises(ValueError, match="x,y,z"):
        parse_seed("1,2")


def test_any_binary_target_by_class_or_cutoff(tmp_path: Path) -> None:
    rows = [_good_row(tmp_path, f"P{i}", egfr=value, pdl1_tps=tps)
            for i, (value, tps) in enumerate([(" Mutant", 0.0), ("wildtype", 0.5),
                                              ("MUTANT", 50.0), ("Wildtype", 1.0)])]
    egfr = {"column": "egfr", "positive": "mutant", "negative": "wildtype",
            "name": "EGFR mutation"}
    cohort = _cohort(tmp_path, rows, target=egfr)
    assert cohort.table["label"].tolist() == [1, 0, 1, 0]
    assert cohort.target_name == "EGFR mutation"
    assert cohort.class_names == ("EGFR mutation negative", "EGFR mutation positive")
    default = _cohort(tmp_path, rows)
    assert default.table["label"].tolist() == [0, 0, 1, 1]
    assert default.class_names == ("PD-L1 negative", "PD-L1 positive")
    by_cutoff = _cohort(tmp_path, rows, target={"column": "pdl1_tps", "cutoff": 1.0})
    assert by_cutoff.table["label"].tolist() == default.table["label"].tolist()
    assert by_cutoff.data_hash == default.data_hash
    other_only = _cohort(tmp_path, rows, target={"column": "egfr", "positive": "Mutant"})
    assert other_only.table["label"].tolist() == [1, 0, 1, 0]

    rows += [_good_row(tmp_path, "P8", egfr="Unknown"), _good_row(tmp_path, "P9", egfr="")]
    with pytest.raises(CohortError) as caught:
        _cohort(tmp_path, rows, target=egfr)
    problems = {p.patient_id: (p.column, p.reason) for p in caught.value.problems}
    assert problems == {
        "P8": ("egfr", "'Unknown' is neither positive ['mutant'] nor negative ['wildtype']"),
        "P9": ("egfr", "missing value of the target 'EGFR mutation' (dataset.target)")}
    rows[-1]["pdl1_tps"] = "high"
    with pytest.raises(CohortError, match=r"'P9', column 'pdl1_tps': not a number: 'high'"):
        _cohort(tmp_path, rows, target={"column": "pdl1_tps", "cutoff": 1.0})
    unlabelled = _cohort(tmp_path, rows[:4] + rows[-1:], target=egfr, require_label=False)
    assert unlabelled.table["label"].tolist() == [1, 0, 1, 0, -1]


@pytest.mark.parametrize("spec", [{"column": "egfr"}, {"positive": "x"},
                                  {"column": "egfr", "positive": "x", "cutoff": 1.0},
                                  {"column": "egfr", "cutoff": 1.0, "negative": "x"},
                                  {"column": "egfr", "positives": "x"},
                                  {"column": "egfr", "positive": "X", "negative": ["x", "y"]}])
def test_bad_target_configs_are_refused(tmp_path: Path, spec: dict) -> None:
    with pytest.raises(ValueError, match=r"dataset.target: .*e.g. \{column: egfr"):
        _cohort(tmp_path, [_good_row(tmp_path, "P1")], target=spec)


def test_missing_target_column_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"kras \(dataset.target.column\)"):
        _cohort(tmp_path, [_good_row(tmp_path, "P1")], target={"column": "kras", "cutoff": 1})


def test_a_rerun_reads_no_unchanged_image_and_rereads_a_changed_one(tmp_path: Path) -> None:
    rows = [_good_row(tmp_path, "P1", pdl1_tps=0.0), _good_row(tmp_path, "P2", pdl1_tps=50.0)]
    cache = tmp_path / "cache"
    first = _cohort(tmp_path, rows, cache_dir=cache)
    with mock.patch.object(manifest_module, "read_image", side_effect=AssertionError("read")):
        again = _cohort(tmp_path, rows, cache_dir=cache)
    pd.testing.assert_frame_equal(again.table, first.table)
    assert again.data_hash == first.data_hash
    # A changed file (new modification time) is read again: its new content is digested.
    ct = _ct()
    ct[4:7, 4:8, 4:8] = 60
    _image(tmp_path / "P2.nii.gz", ct)
    changed = _cohort(tmp_path, rows, cache_dir=cache).table
    assert changed.loc["P1", "image_sha"] == first.table.loc["P1", "image_sha"]
    assert changed.loc["P2", "image_sha"] != first.table.loc["P2", "image_sha"]
