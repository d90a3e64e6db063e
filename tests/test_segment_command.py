"""``python -m pdl1exp.segment``: masks, QC figures and a manifest the training run accepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from hydra import compose, initialize_config_dir

from pdl1exp.data.images import geometry_mismatch, read_image
from pdl1exp.data.manifest import load_cohort
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
