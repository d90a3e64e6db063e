"""RTSTRUCT and SEG masks land on the CT's voxels; every failure names the patient and why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from pdl1exp.data.dicom_masks import DicomMaskError, open_dicom_mask, rasterise
from pdl1exp.data.images import read_image
from pdl1exp.data.manifest import CohortError, load_cohort
from tests.dicom_helpers import (
    SPACING,
    circle,
    circle_contours,
    square,
    square_contours,
    truth_on_image,
    write_ct,
    write_rtstruct,
    write_seg,
)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def _mask(path: Path, ct: Path, **kwargs) -> np.ndarray:
    image = read_image(ct)
    mask = open_dicom_mask(path)
    assert mask is not None
    (uid,) = mask.referenced_series
    labels = rasterise(mask, image, image_series_uid=uid, **kwargs)
    assert labels.GetSize() == image.GetSize()
    assert labels.GetDirection() == image.GetDirection()
    return sitk.GetArrayFromImage(labels) > 0


@pytest.mark.parametrize(("flipped", "shuffled"), [(False, False), (True, True)])
def test_square_circle_and_seg_give_the_expected_voxels(tmp_path: Path, flipped: bool,
                                                       shuffled: bool) -> None:
    ct = write_ct(tmp_path / "ct", flipped=flipped, shuffled=shuffled)
    rt = write_rtstruct(tmp_path / "rt.dcm", ct, {
        "Lung-Left": circle_contours(radius_mm=6.0),
        "GTV-1": square_contours(4),
        "GTV-edges": square_contours(4.5),
        "GTV-circle": circle_contours()})
    seg = write_seg(tmp_path / "seg.dcm", ct, {"Tumour": square(4), "Disc": circle()})
    image = read_image(tmp_path / "ct")
    if flipped:
        assert np.diag(np.asarray(image.GetDirection()).reshape(3, 3)).tolist() == [-1, -1, 1]
    truth_square, truth_circle = truth_on_image(image, square(4)), truth_on_image(image, circle())
    assert truth_square.sum() == 9 * 9 * 4

    from_rt = _mask(rt, tmp_path / "ct", roi_name="gtv-1")
    assert _dice(from_rt, truth_square) == 1.0
    assert _dice(_mask(rt, tmp_path / "ct", roi_name="GTV-edges"), truth_square) == 1.0
    assert _dice(_mask(rt, tmp_path / "ct", roi_name="GTV-c.*"), truth_circle) >= 0.95
    from_seg = _mask(seg, tmp_path / "ct", segment="tumour")
    np.testing.assert_array_equal(from_seg, from_rt)
    assert _dice(_mask(seg, tmp_path / "ct", segment=2), truth_circle) == 1.0


def test_wrong_names_list_what_is_there(tmp_path: Path) -> None:
    ct = write_ct(tmp_path / "ct")
    rt = write_rtstruct(tmp_path / "rt.dcm", ct, {"GTV-1": square_contours(),
                                                   "Lung-Left": circle_contours()})
    seg = write_seg(tmp_path / "seg.dcm", ct, {"Tumour": square()})
    with pytest.raises(DicomMaskError, match=r"no structure matches dataset.roi_name='GTV-2'"
                       r".*1: 'GTV-1', 2: 'Lung-Left'"):
        _mask(rt, tmp_path / "ct", roi_name="GTV-2")
    with pytest.raises(DicomMaskError, match=r"2 structures in the file; choose one"):
        _mask(rt, tmp_path / "ct")
    with pytest.raises(DicomMaskError, match=r"no segment matches dataset.segment='7'.*"
                       r"1: 'Tumour'"):
        _mask(seg, tmp_path / "ct", segment=7)
    assert _mask(seg, tmp_path / "ct").sum() == 9 * 9 * 4  # the only segment


def test_every_mask_failure_is_a_problem_of_its_patient(tmp_path: Path) -> None:
    rows = []

    def row(pid: str, mask: Path, **extra) -> None:
        rows.append({"patient_id": pid, "image": f"{pid}/ct", "mask": str(mask.relative_to(
            tmp_path)), "label": len(rows) % 2, **extra})

    ct = write_ct(tmp_path / "ok" / "ct")
    row("ok", write_rtstruct(tmp_path / "ok" / "rt.dcm", ct, {"GTV-1": square_contours()}))
    ct = write_ct(tmp_path / "seg" / "ct")
    row("seg", write_seg(tmp_path / "seg" / "seg.dcm", ct, {"GTV-1": square()}))
    ct = write_ct(tmp_path / "name" / "ct")
    row("name", write_rtstruct(tmp_path / "name" / "rt.dcm", ct, {"GTV1": square_contours(),
                                                                 "Heart": circle_contours()}))
    ct = write_ct(tmp_path / "other" / "ct")
    row("other", write_rtstruct(tmp_path / "other" / "rt.dcm", ct, {"GTV-1": square_contours()},
                                referenced_series="1.2.3.4"))
    ct = write_ct(tmp_path / "noref" / "ct")
    row("noref", write_rtstruct(tmp_path / "noref" / "rt.dcm", ct, {"GTV-1": square_contours()},
                                referenced_series=None))
    ct = write_ct(tmp_path / "outside" / "ct")
    far = [c + np.array([30.0, 0.0, 0.0]) for c in square_contours()]
    row("outside", write_rtstruct(tmp_path / "outside" / "rt.dcm", ct, {"GTV-1": far}))
    ct = write_ct(tmp_path / "between" / "ct")
    shifted = [c + np.array([0.0, 0.0, SPACING[2] / 2]) for c in square_contours()]
    row("between", write_rtstruct(tmp_path / "between" / "rt.dcm", ct, {"GTV-1": shifted}))
    ct = write_ct(tmp_path / "empty" / "ct")
    row("empty", write_rtstruct(tmp_path / "empty" / "rt.dcm", ct, {"GTV-1": []}))
    pd.DataFrame(rows).to_csv(tmp_path / "cohort.csv", index=False)

    with pytest.raises(CohortError) as caught:
        load_cohort(tmp_path / "cohort.csv", roi_name="GTV-1", segment="GTV-1",
                    cache_dir=tmp_path / "cache")
    problems = {p.patient_id: p for p in caught.value.problems}
    assert set(problems) == {"name", "other", "noref", "outside", "between", "empty"}
    assert all(p.column == "mask" for p in problems.values())
    assert "1: 'GTV1', 2: 'Heart'" in problems["name"].reason
    assert "references series ['1.2.3.4'], but the image is series" in problems["other"].reason
    assert "references no image series" in problems["noref"].reason
    assert "contour outside the image" in problems["outside"].reason
    assert "between the image's slices" in problems["between"].reason
    assert "empty contour" in problems["empty"].reason

    cohort = load_cohort(tmp_path / "cohort.csv", roi_name="GTV-1", segment="GTV-1",
                         cache_dir=tmp_path / "cache", on_error="skip")
    table = cohort.table
    assert table["mask_format"].to_dict() == {"ok": "RTSTRUCT", "seg": "SEG"}
    for pid in ("ok", "seg"):
        assert Path(table.loc[pid, "mask"]).parent == tmp_path / "cache" / "masks"
        assert read_image(table.loc[pid, "mask"]).GetSize() == read_image(
            table.loc[pid, "image"]).GetSize()
    other = load_cohort(tmp_path / "cohort.csv", roi_name="GTV1|GTV-1", segment="GTV-1",
                        cache_dir=tmp_path / "cache", on_error="skip")
    assert "name" in other.table.index
    assert other.data_hash != cohort.data_hash


def test_several_series_are_listed_and_chosen(tmp_path: Path) -> None:
    folder = tmp_path / "P1"
    thin = write_ct(folder / "thin", description="LUNG 2mm", kernel="B70f")
    thick = write_ct(folder / "thick", description="MEDIASTINUM 4mm", kernel="B30f",
                     slice_spacing=4.0, n_slices=4, study_uid=thin[0].StudyInstanceUID)
    for sub in ("thin", "thick"):
        for f in (folder / sub).iterdir():
            f.rename(folder / f"{sub}_{f.name}")
        (folder / sub).rmdir()
    write_rtstruct(tmp_path / "rt" / "rt.dcm", thin, {"GTV-1": square_contours()})
    rows = [{"patient_id": "P1", "image": "P1", "seed": "0,0,0", "label": 1},
            {"patient_id": "P2", "image": "P1", "seed": "0,0,0", "label": 0,
             "series_uid": thick[0].SeriesInstanceUID},
            {"patient_id": "P3", "image": "P1", "mask": "rt/rt.dcm", "label": 0}]
    pd.DataFrame(rows).to_csv(tmp_path / "cohort.csv", index=False)

    with pytest.raises(CohortError) as caught:
        load_cohort(tmp_path / "cohort.csv", roi_name="GTV-1", cache_dir=tmp_path / "cache")
    (problem,) = caught.value.problems
    assert problem.patient_id == "P1"
    assert problem.column == "image"
    for text in ("2 DICOM series in one folder", thin[0].SeriesInstanceUID,
                 thick[0].SeriesInstanceUID, "'LUNG 2mm'", "'B30f'", "slices=8", "slices=4",
                 "spacing_mm=0.8x0.7x2", "spacing_mm=0.8x0.7x4"):
        assert text in problem.reason, text

    cohort = load_cohort(tmp_path / "cohort.csv", roi_name="GTV-1",
                         cache_dir=tmp_path / "cache", series_rule="thinnest_axial")
    uids = cohort.table["series_uid"].to_dict()
    assert uids == {"P1": thin[0].SeriesInstanceUID, "P2": thick[0].SeriesInstanceUID,
                    "P3": thin[0].SeriesInstanceUID}  # P3: the series its RTSTRUCT references
    assert read_image(cohort.table.loc["P1", "image"]).GetSize() == (18, 16, 8)
    assert read_image(cohort.table.loc["P2", "image"]).GetSize() == (18, 16, 4)
    assert cohort.table.loc["P1", "image_sha"] != cohort.table.loc["P2", "image_sha"]

    pd.DataFrame([{**rows[0], "series_uid": "9.9.9"}]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(CohortError, match=r"series_uid 9.9.9 is not in this folder"):
        load_cohort(tmp_path / "bad.csv", require_label=False, cache_dir=tmp_path / "cache")
