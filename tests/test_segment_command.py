"""``python -m pdl1exp.segment``: masks, QC figures and a manifest the training run accepts."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import SimpleITK as sitk
from hydra import compose, initialize_config_dir

from pdl1exp.data.images import geometry_mismatch, read_image
from pdl1exp.data.manifest import load_cohort
from pdl1exp.imaging import rois as rois_module
from pdl1exp.imaging.rois import roi_stage
from pdl1exp.segment import segment_cohort
from tests.conftest import CONF


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_segment_writes_masks_qc_and_a_trainable_manifest(tiny_cohort: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "seg"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("segment", overrides=[f"dataset.path={tiny_cohort}", f"output_dir={out}"])
        summary = segment_cohort(cfg)
        train_cfg = compose("config", overrides=["dataset=manifest",
                                                 f"dataset.path={out / 'manifest.csv'}",
                                                 f"paths.cache_dir={tmp_path / 'cache'}"])
    original = pd.read_csv(tiny_cohort, dtype={"patient_id": str})
    seeded = original.loc[original["mask"].isna(), "patient_id"].tolist()
    assert seeded
    assert sorted(summary["patient_id"]) == sorted(seeded)
    assert (summary["status"] == "ok").all()
    for pid in seeded:
        mask = read_image(out / f"{pid}.nii.gz")
        image = read_image(tiny_cohort.parent / original.set_index("patient_id").loc[pid, "image"])
        assert geometry_mismatch(image, mask, tolerance_mm=1e-4) is None
        truth = read_image(tiny_cohort.parent / "truth" / f"{pid}.nii.gz")
        dice = _dice(sitk.GetArrayFromImage(mask) > 0, sitk.GetArrayFromImage(truth) > 0)
        assert dice > 0.7, (pid, dice)
        assert (out / f"{pid}.png").stat().st_size > 5_000
    manifest = pd.read_csv(out / "manifest.csv")
    assert manifest["mask"].notna().all()
    assert len(manifest) == len(original)
    cohort = load_cohort(out / "manifest.csv")
    rois, problems = roi_stage(train_cfg, cohort)
    assert not problems
    assert (rois["roi_source"] == "provided").all()


def test_segment_writes_rtstruct_and_seg_rows_for_review(tmp_path: Path) -> None:
    from tests.dicom_helpers import (
        square,
        square_contours,
        truth_on_image,
        write_ct,
        write_rtstruct,
        write_seg,
    )

    ct_a, ct_b = write_ct(tmp_path / "A" / "ct"), write_ct(tmp_path / "B" / "ct", flipped=True)
    write_rtstruct(tmp_path / "A" / "rt.dcm", ct_a, {"GTV-1": square_contours(),
                                                     "Heart": square_contours(1)})
    write_seg(tmp_path / "B" / "seg.dcm", ct_b, {"GTV-1": square()})
    pd.DataFrame([{"patient_id": "A", "image": "A/ct", "mask": "A/rt.dcm", "label": 1},
                  {"patient_id": "B", "image": "B/ct", "mask": "B/seg.dcm", "label": 0}]
                 ).to_csv(tmp_path / "cohort.csv", index=False)
    out = tmp_path / "review"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("segment", overrides=[f"dataset.path={tmp_path / 'cohort.csv'}",
                                            f"output_dir={out}", "dataset.roi_name=gtv-1"])
        summary = segment_cohort(cfg)
    assert summary.set_index("patient_id")["source"].to_dict() == {"A": "RTSTRUCT", "B": "SEG"}
    assert (summary["status"] == "ok").all()
    manifest = pd.read_csv(out / "manifest.csv").set_index("patient_id")
    for pid in ("A", "B"):
        assert manifest.loc[pid, "mask"] == str(out / f"{pid}.nii.gz")
        image, mask = read_image(tmp_path / pid / "ct"), read_image(out / f"{pid}.nii.gz")
        assert geometry_mismatch(image, mask, tolerance_mm=1e-4) is None
        assert _dice(sitk.GetArrayFromImage(mask) > 0, truth_on_image(image, square())) == 1.0
        assert (out / f"{pid}.png").stat().st_size > 5_000
    assert len(load_cohort(out / "manifest.csv").table) == 2


def test_a_rerun_measures_no_roi_again(tiny_cohort: Path, tmp_path: Path) -> None:
    """Seeded and provided masks: the second ROI stage reads no mask and has the same sizes."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["dataset=manifest", f"dataset.path={tiny_cohort}",
                                           f"paths.cache_dir={tmp_path / 'cache'}"])
    cohort = load_cohort(tiny_cohort)
    first, _ = roi_stage(cfg, cohort)
    assert set(first["roi_source"]) == {"provided", "seeded"}
    unread = AssertionError("a mask was read or measured again")
    with mock.patch.object(rois_module, "read_image", side_effect=unread), \
            mock.patch.object(rois_module, "roi_size", side_effect=unread):
        again, _ = roi_stage(cfg, cohort)
    pd.testing.assert_frame_equal(again, first)
