"""Quality-control figure of a tumour mask: contour over three lung-window planes (PNG)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import SimpleITK as sitk
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pdl1exp.data.images import read_image
from pdl1exp.hashing import content_key, file_digest
from pdl1exp.imaging.measurements import roi_measurements
from pdl1exp.workers import n_workers

__all__ = ["qc_figure", "qc_figures"]


def _check_geometry(image: sitk.Image, mask: sitk.Image) -> None:
    """Raise unless ``mask`` lies on the voxel grid of ``image``."""
    same = image.GetSize() == mask.GetSize() and all(
        np.allclose(getattr(image, g)(), getattr(mask, g)())
        for g in ("GetSpacing", "GetOrigin", "GetDirection"))
    if not same:
        msg = ("qc_figure: the mask's geometry (size, spacing, origin, direction) differs "
               "from the image's; resample the mask onto the image first")
        raise ValueError(msg)


def _panel(ax: Axes, ct: np.ndarray, tumour: np.ndarray, spacing: tuple[float, float],
           window: tuple[float, float], context: tuple[slice, slice], *, name: str,
           rows_down: bool) -> None:
    """One plane (rows, columns) at its physical aspect ratio, cropped to ``context``."""
    ct, tumour = ct[context], tumour[context]
    rows = (np.arange(context[0].start, context[0].stop)) * spacing[0]
    cols = (np.arange(context[1].start, context[1].stop)) * spacing[1]
    width, level = window
    # Extent is given by voxel edges, the contour by voxel centres: both in mm, so they
    # overlay exactly and aspect="equal" is the physical aspect.
    extent = (cols[0] - spacing[1] / 2, cols[-1] + spacing[1] / 2,
              rows[0] - spacing[0] / 2, rows[-1] + spacing[0] / 2)
    ax.imshow(ct, cmap="gray", vmin=level - width / 2, vmax=level + width / 2,
              extent=extent, origin="lower", interpolation="nearest", aspect="equal")
    if tumour.any():
        ax.contour(cols, rows, tumour.astype(np.float32), levels=[0.5], colors="red",
                   linewidths=1.0)
    if rows_down:
        ax.invert_yaxis()
    ax.set_title(name)
    ax.set_xlabel("mm")


def qc_figure(image: sitk.Image, mask: sitk.Image, path: str | Path, *,
              window: tuple[float, float] = (1500.0, -600.0), title: str = "",
              context_mm: float = 40.0, figsize_in: tuple[float, float] = (12.0, 4.5),
              dpi: int = 100) -> Path:
    """Write a PNG: the axial slice of largest tumour area, and the coronal and sagittal
    slices through the tumour centroid, with the mask contour over a windowed CT.

    The title carries volume and diameters; nothing else about the patient is drawn, so
    ``title`` is the only identifier on the figure.

    Args:
        image: CT in HU.
        mask: tumour mask on the image's voxel grid (non-zero = tumour).
        path: where to write the PNG (parent folders are created).
        window: (width, level) in HU; the default is the lung window.
        title: text put before the measurements, e.g. the patient id.
        context_mm: tissue shown around the tumour's bounding box on each side.
        figsize_in: figure size in inches.
        dpi: pixels per inch of the PNG.

    Returns:
        The path written.
    """
    if window[0] <= 0 or context_mm < 0:
        msg = f"qc_figure needs window width > 0 and context_mm >= 0, got {window}, {context_mm}"
        raise ValueError(msg)
    _check_geometry(image, mask)
    size = roi_measurements(mask)
    # LPS arrays (z, y, x): rows of an axial slice run anterior to posterior, columns
    # patient right to left (radiological view); z runs inferior to superior.
    lps_mask = sitk.DICOMOrient(mask, "LPS")
    ct = sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))
    tumour = sitk.GetArrayFromImage(lps_mask) != 0
    sx, sy, sz = lps_mask.GetSpacing()
    centre = np.clip(lps_mask.TransformPhysicalPointToIndex(size["centroid_mm"])[::-1], 0,
                     np.asarray(tumour.shape) - 1)
    axial = int(np.argmax(tumour.sum(axis=(1, 2))))

    points = np.argwhere(tumour)
    pad = np.ceil(context_mm / np.array([sz, sy, sx])).astype(int)
    box = [slice(max(lo - p, 0), min(hi + p + 1, n)) for lo, hi, p, n in
           zip(points.min(0), points.max(0), pad, tumour.shape, strict=True)]

    # Fixed margins, set for the default figure size: a layout engine measures every tick
    # label and took 40 % of the time.
    fig = Figure(figsize=figsize_in, dpi=dpi)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.12, top=0.84, wspace=0.25)
    axes = fig.subplots(1, 3)
    _panel(axes[0], ct[axial], tumour[axial], (sy, sx), window, (box[1], box[2]),
           name="axial (largest area)", rows_down=True)
    _panel(axes[1], ct[:, centre[1]], tumour[:, centre[1]], (sz, sx), window,
           (box[0], box[2]), name="coronal (centroid)", rows_down=False)
    _panel(axes[2], ct[:, :, centre[2]], tumour[:, :, centre[2]], (sz, sy), window,
           (box[0], box[1]), name="sagittal (centroid)", rows_down=False)
    fig.suptitle(f"{title}  volume {size['volume_ml']:.2f} ml, max diameter "
                 f"{size['max_diameter_mm']:.1f} mm, axial {size['max_axial_diameter_mm']:.1f} mm"
                 .strip())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _qc_one(image: str, mask: str, path: Path, window: tuple[float, float], title: str) -> Path:
    """Draw one figure to a temporary name beside ``path``, then rename (never half-read)."""
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.png")
    qc_figure(read_image(image), read_image(mask), partial, window=window, title=title)
    os.replace(partial, path)
    return path


def qc_figures(rois: pd.DataFrame, folder: str | Path, *, which: str,
               window: tuple[float, float], name: Callable[[str], str],
               n_jobs: int = 1, cache_dir: str | Path | None = None) -> list[Path]:
    """QC figures of the ROI table into ``folder``, drawn in worker processes (``n_jobs``).

    With ``cache_dir``, each figure is kept there under a key of its inputs (image and mask
    content, window, title, this module's source and matplotlib's version), and a later run
    copies it instead of drawing it again.

    Args:
        rois: the ROI stage's table (``image``, ``mask``, ``image_sha``, ``mask_key``,
            ``roi_source``, descriptors).
        folder: output folder; one ``<name(patient_id)>.png`` per patient.
        which: ``all``, ``seeded`` (segmented ROIs only) or ``none``.
        window: CT window (width, level).
        name: patient_id → the name written on the file and the figure (a pseudonym).
        n_jobs: worker processes (:func:`~pdl1exp.workers.n_workers`: -1 one per core).
        cache_dir: drawn figures, by content key (None: draw every figure).
    """
    chosen = rois if which == "all" else rois[rois["roi_source"] == "seeded"]
    if which == "none" or chosen.empty:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    store = Path(cache_dir) if cache_dir is not None else folder
    store.mkdir(parents=True, exist_ok=True)
    code = {"source": file_digest(__file__), "matplotlib": matplotlib.__version__}
    targets, jobs = [], []
    for pid, row in chosen.iterrows():
        label = name(str(pid))
        title = (f"{label}: {row['roi_volume_ml']:.2f} ml, {row['roi_max_diameter_mm']:.1f} mm "
                 f"({row['roi_source']})")
        target = folder / f"{label}.png"
        drawn = target if cache_dir is None else store / (content_key(
            {"image": row["image_sha"], "mask": row["mask_key"], "window": list(window),
             "title": title, **code}) + ".png")
        targets.append((drawn, target))
        if not drawn.exists():
            jobs.append((row["image"], row["mask"], drawn, window, title))
    workers = min(n_workers(n_jobs, setting="tracking.qc_jobs"), len(jobs))
    if workers <= 1:
        for job in jobs:
            _qc_one(*job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_qc_one, *zip(*jobs, strict=True)))
    for drawn, target in targets:
        if drawn != target:
            shutil.copyfile(drawn, target)
    return [target for _, target in targets]
