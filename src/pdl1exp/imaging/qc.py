"""Quality-control figure of a tumour mask: outline over three lung-window planes (PNG)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont
from PIL import __version__ as pillow_version
from scipy import ndimage

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


def _panel(ct: np.ndarray, tumour: np.ndarray, spacing: tuple[float, float],
           window: tuple[float, float], context: tuple[slice, slice], *, rows_down: bool,
           box: tuple[int, int], edge_px: int) -> tuple[Image.Image, float]:
    """One plane (rows, columns), cropped to ``context``, windowed to grey and scaled to
    its physical aspect within ``box`` (width, height in pixels), the tumour's outline
    painted red (``edge_px`` thick, open where the tumour meets the image's edge); also the
    pixels per mm."""
    ct, tumour = ct[context], tumour[context]
    if not rows_down:  # superior at the top
        ct, tumour = ct[::-1], tumour[::-1]
    width, level = window
    grey = np.clip((ct - (level - width / 2)) * (255.0 / width), 0, 255).astype(np.uint8)
    height_mm, width_mm = ct.shape[0] * spacing[0], ct.shape[1] * spacing[1]
    per_mm = min(box[0] / width_mm, box[1] / height_mm)
    size = (max(round(width_mm * per_mm), 1), max(round(height_mm * per_mm), 1))

    def scaled(array: np.ndarray, resample: Image.Resampling) -> np.ndarray:
        return np.asarray(Image.fromarray(array).resize(size, resample))

    rgb = np.repeat(scaled(grey, Image.Resampling.NEAREST)[..., None], 3, axis=2)
    # Below a pixel a voxel, a pixel is inside where any voxel under it is: thin parts of
    # the mask keep an outline.
    shrink = per_mm * min(spacing) < 1
    inside = scaled(tumour.astype(np.uint8) * 255, Image.Resampling.BOX if shrink
                    else Image.Resampling.NEAREST) > 0
    edge = inside & ~ndimage.binary_erosion(inside, iterations=edge_px, border_value=1)
    rgb[edge] = (255, 0, 0)
    return Image.fromarray(rgb), per_mm


def _scale_bar_mm(width_mm: float) -> float:
    """The longest of 1, 2, 5, 10, 20, 50 ... mm that fits in a third of the panel."""
    bars = [m * 10.0 ** e for e in range(4) for m in (1, 2, 5)]
    return max([b for b in bars if b <= width_mm / 3] or [bars[0]])


def qc_figure(image: sitk.Image, mask: sitk.Image, path: str | Path, *,
              window: tuple[float, float] = (1500.0, -600.0), title: str = "",
              context_mm: float = 40.0, figsize_in: tuple[float, float] = (12.0, 4.5),
              dpi: int = 100) -> Path:
    """Write a PNG: the axial slice of largest tumour area, and the coronal and sagittal
    slices through the tumour centroid, the mask's outline over a windowed CT, each plane
    at its physical aspect with a scale bar in mm.

    The title carries volume and diameters; nothing else about the patient is drawn, so
    ``title`` is the only identifier on the figure. The figure is composed with Pillow,
    voxels as nearest-neighbour blocks.

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
    if dpi < 36 or figsize_in[0] < 3 or figsize_in[1] < 1.5:
        msg = f"qc_figure needs dpi >= 36 and a figure of at least 3 x 1.5 in, got {dpi} dpi, " \
              f"{figsize_in} in"
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

    width, height = round(figsize_in[0] * dpi), round(figsize_in[1] * dpi)
    text = ImageFont.load_default(size=max(round(12 * dpi / 72), 6))  # 12 pt
    small = ImageFont.load_default(size=max(round(10 * dpi / 72), 5))
    line = round(text.size * 4 / 3)  # one line of titles with its spacing
    figure = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(figure)
    draw.text((width / 2, line / 2), f"{title}  volume {size['volume_ml']:.2f} ml, max "
              f"diameter {size['max_diameter_mm']:.1f} mm, axial "
              f"{size['max_axial_diameter_mm']:.1f} mm".strip(), fill="black", font=text,
              anchor="mt")
    top, column = 3 * line, width // 3
    panel_box = (round(column * 0.9), height - top - 2 * line)
    planes = [("axial (largest area)", ct[axial], tumour[axial], (sy, sx), (box[1], box[2]),
               True),
              ("coronal (centroid)", ct[:, centre[1]], tumour[:, centre[1]], (sz, sx),
               (box[0], box[2]), False),
              ("sagittal (centroid)", ct[:, :, centre[2]], tumour[:, :, centre[2]], (sz, sy),
               (box[0], box[1]), False)]
    for i, (name, plane, inside, spacing, context, rows_down) in enumerate(planes):
        panel, per_mm = _panel(plane, inside, spacing, window, context, rows_down=rows_down,
                               box=panel_box, edge_px=max(round(dpi / 80), 1))
        left = i * column + (column - panel.width) // 2
        figure.paste(panel, (left, top))
        draw.text((left + panel.width / 2, top - line / 4), name, fill="black", font=text,
                  anchor="md")
        bar_mm = _scale_bar_mm(panel.width / per_mm)
        bar_px, thick = round(bar_mm * per_mm), max(dpi // 40, 2)
        bar_top = top + panel.height + line // 2
        # Pillow's rectangle includes both corners: bar_px pixels long, thick rows high.
        draw.rectangle((left, bar_top, left + bar_px - 1, bar_top + thick - 1), fill="black")
        draw.text((left + bar_px + line / 2, bar_top + thick / 2), f"{bar_mm:g} mm",
                  fill="black", font=small, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path, format="PNG")
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
    content, window, title, this module's source and Pillow's version), and a later run
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
    code = {"source": file_digest(__file__), "pillow": pillow_version}
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
