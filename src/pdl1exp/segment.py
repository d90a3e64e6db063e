"""``python -m pdl1exp.segment dataset.path=cohort.csv output_dir=DIR``: seeds → masks + QC.

Every row with a seed and no mask is segmented, and every DICOM RTSTRUCT/SEG mask is
rasterised onto its CT (``dataset.roi_name`` / ``dataset.segment``); the masks
(``DIR/<patient_id>.nii.gz``, in the image's physical space), one QC figure each
(``DIR/<patient_id>.png``) and ``DIR/manifest.csv`` (the input rows with the ``mask`` column
filled) are written for review before training.
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

from pdl1exp.cli import run_command, user_errors
from pdl1exp.data.images import read_image
from pdl1exp.data.manifest import dataset_options, load_cohort
from pdl1exp.imaging.measurements import roi_size
from pdl1exp.imaging.qc import qc_figure
from pdl1exp.imaging.segmentation import SegmentationError
from pdl1exp.paths import CONFIG_DIR

__all__ = ["main", "segment_cohort"]

log = logging.getLogger(__name__)


def segment_cohort(cfg: DictConfig) -> pd.DataFrame:
    """Segment the seed-only rows and convert the RTSTRUCT/SEG rows of ``cfg.dataset.path``
    into ``cfg.output_dir``.

    Returns the summary table (patient_id, source, volume_ml, max_diameter_mm, status).
    """
    ds = cfg.dataset
    options = {**dataset_options(ds), "numeric": [], "categorical": []}
    cohort = load_cohort(ds.path, **options, require_label=False, cache_dir=cfg.cache_dir)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = cohort.table[cohort.table["mask"].isna() |
                        cohort.table["mask_format"].isin(["RTSTRUCT", "SEG"])]
    if todo["mask"].isna().any() and cfg.segmentation.method != "seeded":
        msg = "rows with only a seed need segmentation=seeded"
        raise ValueError(msg)
    segmenter = instantiate(cfg.segmentation.segmenter) if todo["mask"].isna().any() else None
    window = (cfg.preprocess.window_width, cfg.preprocess.window_level)
    rows, masks = [], {}
    for pid, row in todo.iterrows():
        image = read_image(row["image"])
        source = row["mask_format"] if isinstance(row["mask"], str) else "seed"
        if source != "seed":
            mask = read_image(row["mask"])
        else:
            try:
                mask = segmenter(image, tuple(row["seed"]))
            except SegmentationError as err:
                rows.append({"patient_id": pid, "source": source, "volume_ml": None,
                             "max_diameter_mm": None, "status": f"failed: {err}"})
                continue
        path = out / f"{pid}.nii.gz"
        sitk.WriteImage(mask, str(path), useCompression=True)
        sizes = roi_size(mask)
        qc_figure(image, mask, out / f"{pid}.png", window=window,
                  title=f"{pid} ({source}): {sizes['volume_ml']:.2f} ml, "
                        f"{sizes['max_diameter_mm']:.1f} mm")
        masks[pid] = str(path.resolve())
        rows.append({"patient_id": pid, "source": source,
                     "volume_ml": round(sizes["volume_ml"], 3),
                     "max_diameter_mm": round(sizes["max_diameter_mm"], 1), "status": "ok"})
    manifest = pd.read_csv(cohort.source, dtype={"patient_id": str})
    known = cohort.table.index
    # The original image folder plus the series read, not the cache's folder of links.
    manifest["image"] = [str(cohort.source.parent / Path(str(v)).expanduser())
                         if p in known else v
                         for p, v in zip(manifest["patient_id"], manifest["image"], strict=True)]
    if cohort.table["series_uid"].notna().any():
        manifest["series_uid"] = [cohort.table.loc[p, "series_uid"] if p in known else None
                                  for p in manifest["patient_id"]]
    if "mask" not in manifest.columns:
        manifest["mask"] = ""
    manifest["mask"] = [masks.get(p, cohort.table.loc[p, "mask"] if p in known else m)
                        for p, m in zip(manifest["patient_id"], manifest["mask"], strict=True)]
    manifest.to_csv(out / "manifest.csv", index=False)
    return pd.DataFrame(rows, columns=["patient_id", "source", "volume_ml", "max_diameter_mm",
                                       "status"])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="segment")
@user_errors("segment")
def command(cfg: DictConfig) -> None:
    """Segment, print the summary, and exit non-zero when any segmentation failed."""
    logging.getLogger("pdl1exp").setLevel(cfg.log_level)
    summary = segment_cohort(cfg)
    print(summary.to_string(index=False))
    print(f"\nmasks, QC figures and manifest.csv written to {cfg.output_dir}")
    if (summary["status"] != "ok").any():
        sys.exit(1)


def main() -> None:
    """``python -m pdl1exp.segment``: a user error prints its message alone and exits 2."""
    run_command(command)


if __name__ == "__main__":
    main()
