"""``python -m pdl1exp.segment dataset.path=cohort.csv output_dir=DIR``: seeds → masks + QC.

Every row with a seed and no mask is segmented; the masks (``DIR/<patient_id>.nii.gz``, in the
image's physical space), one QC figure each (``DIR/<patient_id>.png``) and ``DIR/manifest.csv``
(the input rows with the ``mask`` column filled) are written for review before training.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import pandas as pd
import SimpleITK as sitk
from hydra.utils import instantiate
from omegaconf import DictConfig

from pdl1exp.data.images import read_image
from pdl1exp.data.manifest import load_cohort
from pdl1exp.imaging.measurements import roi_measurements
from pdl1exp.imaging.qc import qc_figure
from pdl1exp.imaging.segmentation import SegmentationError
from pdl1exp.paths import CONFIG_DIR

__all__ = ["main", "segment_cohort"]

log = logging.getLogger(__name__)


def segment_cohort(cfg: DictConfig) -> pd.DataFrame:
    """Segment the seed-only rows of ``cfg.dataset.path`` into ``cfg.output_dir``.

    Returns the summary table (patient_id, volume_ml, max_diameter_mm, status).
    """
    if cfg.segmentation.method != "seeded":
        msg = "the segment command needs segmentation=seeded"
        raise ValueError(msg)
    ds = cfg.dataset
    cohort = load_cohort(ds.path, tps_cutoff=ds.tps_cutoff, on_error=ds.on_error,
                         air_hu=ds.validation.air_hu,
                         geometry_tolerance_mm=ds.validation.geometry_tolerance_mm,
                         n_jobs=ds.validation.n_jobs, require_label=False)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    segmenter = instantiate(cfg.segmentation.segmenter)
    window = (cfg.preprocess.window_width, cfg.preprocess.window_level)
    todo = cohort.table[cohort.table["mask"].isna()]
    rows, masks = [], {}
    for pid, row in todo.iterrows():
        image = read_image(row["image"])
        try:
            mask = segmenter(image, tuple(row["seed"]))
        except SegmentationError as err:
            rows.append({"patient_id": pid, "volume_ml": None, "max_diameter_mm": None,
                         "status": f"failed: {err}"})
            continue
        path = out / f"{pid}.nii.gz"
        sitk.WriteImage(mask, str(path), useCompression=True)
        sizes = roi_measurements(mask)
        qc_figure(image, mask, out / f"{pid}.png", window=window,
                  title=f"{pid}: {sizes['volume_ml']:.2f} ml, {sizes['max_diameter_mm']:.1f} mm")
        masks[pid] = str(path.resolve())
        rows.append({"patient_id": pid, "volume_ml": round(sizes["volume_ml"], 3),
                     "max_diameter_mm": round(sizes["max_diameter_mm"], 1), "status": "ok"})
    manifest = pd.read_csv(cohort.source, dtype={"patient_id": str})
    manifest["image"] = [cohort.table.loc[p, "image"] if p in cohort.table.index else v
                         for p, v in zip(manifest["patient_id"], manifest["image"], strict=True)]
    if "mask" not in manifest.columns:
        manifest["mask"] = ""
    manifest["mask"] = [masks.get(p, cohort.table.loc[p, "mask"] if p in cohort.table.index
                                  else m) for p, m in zip(manifest["patient_id"],
                                                          manifest["mask"], strict=True)]
    manifest.to_csv(out / "manifest.csv", index=False)
    return pd.DataFrame(rows, columns=["patient_id", "volume_ml", "max_diameter_mm", "status"])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="segment")
def main(cfg: DictConfig) -> None:
    """Segment, print the summary, and exit non-zero when any segmentation failed."""
    logging.getLogger("pdl1exp").setLevel(cfg.log_level)
    summary = segment_cohort(cfg)
    print(summary.to_string(index=False))
    print(f"\nmasks, QC figures and manifest.csv written to {cfg.output_dir}")
    if (summary["status"] != "ok").any():
        sys.exit(1)


if __name__ == "__main__":
    main()
