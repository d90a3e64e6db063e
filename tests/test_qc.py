"""Tests of ROI measurements (analytic ellipsoids) and of the QC figure."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from matplotlib.image import imread

from pdl1exp.imaging import qc as qc_module
from pdl1exp.imaging.measurements import feret_diameter, roi_measurements, roi_size
from pdl1exp.imaging.qc import qc_figure, qc_figures

ANISOTROPIC = (0.7, 0.9, 2.5)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# Index axis 0 runs along world z, axis 2 along world x: axial planes are index planes i.
PERMUTED = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0)


def _ellipsoid(semi_axes_mm: tuple[float, float, float], *, size: tuple[int, int, int],
               spacing: tuple[float, ...] = ANISOTROPIC,
               direction: tuple[float, ...] = IDENTITY,
               centre_mm: tuple[float, float, float] = (3.0, -7.0, 11.0)) -> sitk.Image:
    """uint8 image of the world-aligned ellipsoid (x, y, z semi-axes) about ``centre_mm``."""
    image = sitk.Image(size, sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    matrix = np.asarray(direction).reshape(3, 3)
    # Put the volume's centre on the ellipsoid's centre.
    half = (np.asarray(size) - 1) / 2 * np.asarray(spacing)
    image.SetOrigin(tuple(np.asarray(centre_mm) - matrix @ half))
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1)
    world = np.asarray(image.GetOrigin()) + (index * spacing) @ matrix.T
    level = (((world - centre_mm) / semi_axes_mm) ** 2).sum(axis=-1)
    # meshgrid "ij" gives (i, j, k) order; SimpleITK arrays are (k, j, i).
    mask = sitk.GetImageFromArray((level <= 1.0).transpose(2, 1, 0).astype(np.uint8))
    mask.CopyInformation(image)
    return mask


@pytest.mark.parametrize(
    ("semi_axes", "axial"),
    [((15.0, 15.0, 15.0), 30.0), ((20.0, 12.0, 8.0), 40.0), ((8.0, 12.0, 25.0), 24.0)],
)
@pytest.mark.parametrize("direction", [IDENTITY, PERMUTED])
def test_measurements_of_analytic_ellipsoids(semi_axes: tuple[float, float, float],
                                             axial: float,
                                             direction: tuple[float, ...]) -> None:
    # Odd sizes put the centre on a voxel centre, so an axial slice runs through it.
    size = (81, 71, 41) if direction == IDENTITY else (41, 71, 81)
    spacing = ANISOTROPIC if direction == IDENTITY else ANISOTROPIC[::-1]
    mask = _ellipsoid(semi_axes, size=size, spacing=spacing, direction=direction)
    result = roi_measurements(mask)
    assert roi_size(mask) == {k: result[k] for k in ("volume_ml", "max_diameter_mm")}

    a, b, c = semi_axes
    assert result["volume_ml"] == pytest.approx(4 / 3 * np.pi * a * b * c / 1000, rel=0.03)
    # Voxel centres lie inside the surface by at most one voxel.
    assert 2 * max(semi_axes) - max(spacing) <= result["max_diameter_mm"] <= 2 * max(semi_axes)
    in_plane = np.hypot(*sorted(spacing)[:2])
    assert axial - in_plane <= result["max_axial_diameter_mm"] <= axial
    np.testing.assert_allclose(result["centroid_mm"], (3.0, -7.0, 11.0), atol=0.05)
    assert result["n_voxels"] == int(sitk.GetArrayViewFromImage(mask).sum())
    volume = sitk.GetArrayViewFromImage(mask).transpose(2, 1, 0)
    start, extent = result["bbox_index"]["start"], result["bbox_index"]["size"]
    box = volume[tuple(slice(s, s + n) for s, n in zip(start, extent, strict=True))]
    assert box.sum() == volume.sum()
    assert all(box.take(0, axis=k).any() and box.take(-1, axis=k).any() for k in range(3))


def test_feret_diameter_matches_itk_on_an_irregular_blob() -> None:
    rng = np.random.default_rng(0)
    blob = np.zeros((20, 40, 40), dtype=np.uint8)
    for _ in range(6):
        z, y, x = rng.integers((5, 10, 10), (15, 30, 30))
        blob[z - 3:z + 3, y - 5:y + 4, x - 2:x + 7] = 1
    mask = sitk.GetImageFromArray(blob)
    mask.SetSpacing(ANISOTROPIC)
    itk = sitk.LabelShapeStatisticsImageFilter()
    itk.ComputeFeretDiameterOn()
    itk.Execute(mask)
    assert roi_measurements(mask)["max_diameter_mm"] == pytest.approx(
        itk.GetFeretDiameter(1), abs=1e-6)


def test_feret_diameter_of_degenerate_shapes() -> None:
    point = sitk.Image((6, 6), sitk.sitkUInt8)
    point[2, 3] = 1
    assert feret_diameter(point) == 0.0
    line = sitk.Image((6, 6, 6), sitk.sitkUInt8)
    for k in range(5):
        line[k, k, k] = 1
    assert feret_diameter(line) == pytest.approx(4 * np.sqrt(3))
    assert feret_diameter(sitk.Image((6, 6), sitk.sitkUInt8)) == 0.0


@pytest.mark.parametrize("measure", [roi_measurements, roi_size])
def test_measurements_of_an_empty_mask_fail(measure: Callable[[sitk.Image], dict]) -> None:
    with pytest.raises(ValueError, match="empty"):
        measure(sitk.Image((8, 8, 8), sitk.sitkUInt8))


def _ct_with(mask: sitk.Image) -> sitk.Image:
    """Lung (-850 HU) with a soft-tissue tumour (30 HU) where ``mask`` is set."""
    ct = sitk.Cast(mask, sitk.sitkInt16) * 880 - 850
    ct.CopyInformation(mask)
    return ct


def _red(png: np.ndarray) -> np.ndarray:
    return (png[..., 0] > 0.8) & (png[..., 1] < 0.3) & (png[..., 2] < 0.3)


def test_qc_figure_is_written_with_physical_aspect(tmp_path: Path) -> None:
    # A sphere on 0.8 x 0.8 x 2.5 mm voxels: drawn in mm, its outlines are round.
    mask = _ellipsoid((10.0, 10.0, 10.0), size=(65, 65, 25), spacing=(0.8, 0.8, 2.5))
    path = qc_figure(_ct_with(mask), mask, tmp_path / "qc" / "p1.png", title="case 1",
                     figsize_in=(12.0, 4.0), dpi=80)

    assert path == tmp_path / "qc" / "p1.png"
    assert path.stat().st_size > 0
    png = imread(path)
    assert png.shape[:2] == (4 * 80, 12 * 80)
    assert png[..., :3].std() > 0.1
    width = png.shape[1]
    for panel in range(3):
        red = np.argwhere(_red(png[:, panel * width // 3:(panel + 1) * width // 3]))
        assert len(red) > 0, f"no outline in panel {panel}"
        height, across = red.max(0) - red.min(0)
        assert height / across == pytest.approx(1.0, rel=0.15)


def test_qc_figure_scale_bars_measure_millimetres(tmp_path: Path) -> None:
    # A 20 mm sphere: in every panel, its outline's width over the scale bar's length is
    # 20 mm over the bar's length in mm, one of 1, 2, 5, 10, 20, 50 ... mm.
    mask = _ellipsoid((10.0, 10.0, 10.0), size=(65, 65, 25), spacing=(0.8, 0.8, 2.5))
    png = imread(qc_figure(_ct_with(mask), mask, tmp_path / "p1.png", dpi=80))
    width = png.shape[1]
    for panel in range(3):
        third = png[:, panel * width // 3:(panel + 1) * width // 3, :3]
        red = np.argwhere(_red(third))
        diameter_px = red[:, 1].max() - red[:, 1].min() + 1
        below = (third[red[:, 0].max() + 1:] < 0.1).all(axis=-1)  # black, under the tumour
        edges = [np.flatnonzero(np.diff(np.r_[0, row, 0])) for row in below.astype(int)]
        bar_px = max((e[1::2] - e[::2]).max(initial=0) for e in edges)  # longest black run
        # Every panel shows 52 mm across: the longest bar within a third of it is 10 mm.
        assert 20.0 * bar_px / diameter_px == pytest.approx(10.0, rel=0.08), panel


def test_qc_figure_puts_anterior_and_superior_at_the_top(tmp_path: Path) -> None:
    # The sphere moved 8 voxels anterior (LPS y down) and 4 superior (z up): its outline
    # lies above the middle of every plane, and left of it in the sagittal one (anterior
    # on the left, as the axial plane's columns run right to left).
    sphere = _ellipsoid((10.0, 10.0, 10.0), size=(65, 65, 25), spacing=(0.8, 0.8, 2.5))
    moved = sitk.GetImageFromArray(np.roll(sitk.GetArrayFromImage(sphere), (4, -8, 0),
                                           axis=(0, 1, 2)))
    moved.CopyInformation(sphere)
    png = imread(qc_figure(_ct_with(moved), moved, tmp_path / "p1.png", dpi=80))[..., :3]
    width = png.shape[1]
    for panel in range(3):
        third = png[:, panel * width // 3:(panel + 1) * width // 3]
        lung = (np.ptp(third, axis=-1) < 0.01) & (np.abs(third[..., 0] - 0.33) < 0.05)
        lung &= lung.sum(axis=1, keepdims=True) > 20  # not the grey edges of the text
        lung = np.argwhere(lung)
        middle = (lung.min(0) + lung.max(0)) / 2
        red = np.argwhere(_red(third)).mean(0)
        assert red[0] < middle[0] - 5, f"panel {panel}: the tumour is not in the upper half"
        if panel == 2:
            assert red[1] < middle[1] - 5, "sagittal: the tumour is not anterior (left)"
        else:
            assert red[1] == pytest.approx(middle[1], abs=3)


def test_qc_figure_outlines_a_mask_thinner_than_a_pixel(tmp_path: Path) -> None:
    # A rod one voxel thick, drawn at a quarter of a pixel a voxel: every plane shows it.
    rod = np.zeros((61, 301, 301), dtype=np.uint8)  # z, y, x
    rod[31, 151, 25:275] = 1  # rows and columns that nearest-neighbour scaling skips
    mask = sitk.GetImageFromArray(rod)
    mask.SetSpacing((0.8, 0.8, 2.5))
    png = imread(qc_figure(_ct_with(mask), mask, tmp_path / "p1.png", dpi=40,
                           figsize_in=(6.0, 2.0), context_mm=200.0))
    assert png.shape[:2] == (80, 240)
    for panel in range(3):
        assert _red(png[:, panel * 80:(panel + 1) * 80]).any(), panel


def test_qc_figure_rejects_a_figure_too_small_for_its_text(tmp_path: Path) -> None:
    mask = _ellipsoid((5.0, 5.0, 5.0), size=(33, 33, 13))
    with pytest.raises(ValueError, match="dpi"):
        qc_figure(_ct_with(mask), mask, tmp_path / "small.png", dpi=20)
    assert not (tmp_path / "small.png").exists()


def test_qc_figure_rejects_a_mask_on_another_grid(tmp_path: Path) -> None:
    mask = _ellipsoid((5.0, 5.0, 5.0), size=(33, 33, 13))
    other = _ellipsoid((5.0, 5.0, 5.0), size=(33, 33, 13), spacing=(0.8, 0.9, 2.5))
    with pytest.raises(ValueError, match="geometry"):
        qc_figure(_ct_with(mask), other, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_qc_figures_are_drawn_once_and_then_served_from_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mask = _ellipsoid((5.0, 5.0, 5.0), size=(33, 33, 13))
    sitk.WriteImage(_ct_with(mask), str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    rois = pd.DataFrame({"image": str(tmp_path / "ct.nii.gz"),
                         "mask": str(tmp_path / "mask.nii.gz"), "image_sha": "a",
                         "mask_key": ["m1", "m2"], "roi_source": "seeded",
                         "roi_volume_ml": 0.5, "roi_max_diameter_mm": 10.0},
                        index=["P1", "P2"])
    drawn: list[str] = []
    real = qc_module.qc_figure
    monkeypatch.setattr(qc_module, "qc_figure",
                        lambda *a, **k: drawn.append(k["title"]) or real(*a, **k))
    options = {"which": "seeded", "window": (1500.0, -600.0), "name": str.lower,
               "cache_dir": tmp_path / "cache"}
    first = qc_figures(rois, tmp_path / "run1", **options)
    assert [p.name for p in first] == ["p1.png", "p2.png"]
    assert len(drawn) == 2
    again = qc_figures(rois, tmp_path / "run2", **options)
    assert len(drawn) == 2  # nothing drawn again
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in first]
    qc_figures(rois.assign(mask_key=["m1", "m3"]), tmp_path / "run3", **options)
    assert len(drawn) == 3  # a changed mask is drawn again
    qc_figures(rois, tmp_path / "run4", **{**options, "window": (350.0, 40.0)})
    assert len(drawn) == 5  # so is every figure in another window
    assert not list((tmp_path / "cache").glob("*.partial*"))


def test_qc_figures_drawn_in_worker_processes_are_those_drawn_here(tmp_path: Path) -> None:
    mask = _ellipsoid((5.0, 4.0, 3.0), size=(33, 33, 13))
    sitk.WriteImage(_ct_with(mask), str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    rois = pd.DataFrame({"image": str(tmp_path / "ct.nii.gz"),
                         "mask": str(tmp_path / "mask.nii.gz"), "image_sha": "a",
                         "mask_key": ["m1", "m2", "m3"], "roi_source": "seeded",
                         "roi_volume_ml": [0.5, 0.6, 0.7], "roi_max_diameter_mm": 10.0},
                        index=["P1", "P2", "P3"])
    options = {"which": "seeded", "window": (1500.0, -600.0), "name": str.lower}
    here = qc_figures(rois, tmp_path / "here", n_jobs=1, **options)
    pooled = qc_figures(rois, tmp_path / "pooled", n_jobs=2, **options)  # a pool on any machine
    assert [p.name for p in pooled] == ["p1.png", "p2.png", "p3.png"]
    assert [p.read_bytes() for p in pooled] == [p.read_bytes() for p in here]
