"""Tests of the seeded tumour segmentation on CT-like phantoms with a known tumour mask."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from scipy import ndimage

from pdl1exp import workers
from pdl1exp.data.phantom import Phantom, ScanSpec, TumourSpec, render_ct
from pdl1exp.imaging.rois import prepare_rois
from pdl1exp.imaging.segmentation import SeededSegmenter, SegmentationError, segment_seeded

CONF = Path(__file__).resolve().parents[1] / "conf"


def _segmentation(option: str) -> DictConfig:
    """``conf/segmentation/<option>.yaml`` as composed in the root config (interpolations
    resolved)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"segmentation={option}"])
    GlobalHydra.instance().clear()
    return OmegaConf.create(OmegaConf.to_container(cfg.segmentation, resolve=True))
SMALL = ScanSpec(shape=(96, 96, 32))
# Large masses need a whole hemithorax; the mediastinum has its fat plane.
CHEST = ScanSpec(shape=(160, 160, 56), spacing=(0.9, 0.9, 1.5), mediastinal_fat_mm=3.0)
MIN_DICE = 0.85

# One phantom per kind of tumour that defeats naive region growing (rng seed in the tuple).
CASES = {
    "small": (SMALL, TumourSpec(diameter_mm=7.0), 1),
    "medium": (SMALL, TumourSpec(diameter_mm=15.0), 2),
    "large_spiculated": (ScanSpec(), TumourSpec(diameter_mm=30.0, lobulation=0.3,
                                                n_spicules=6), 3),
    "part_solid": (SMALL, TumourSpec(diameter_mm=20.0, solid_fraction=0.4), 4),
    "pleural": (SMALL, TumourSpec(diameter_mm=15.0, location="pleural"), 5),
    "vessel_attached": (SMALL, TumourSpec(diameter_mm=15.0, vessel_attached=True), 6),
    "anisotropic": (ScanSpec(shape=(96, 96, 20), spacing=(0.8, 0.8, 2.5)),
                    TumourSpec(diameter_mm=15.0), 7),
    "ground_glass": (SMALL, TumourSpec(diameter_mm=18.0, attenuation_hu=-550.0,
                                       heterogeneity_hu=30.0), 15),
    "mediastinal_50mm": (CHEST, TumourSpec(diameter_mm=50.0, location="mediastinal"), 11),
    "pleural_40mm": (CHEST, TumourSpec(diameter_mm=40.0, location="pleural"), 12),
    "central_60mm": (CHEST, TumourSpec(diameter_mm=60.0, lobulation=0.2), 13),
    "cavitary": (CHEST, TumourSpec(diameter_mm=35.0, cavity_fraction=0.4), 14),
}
# Known limit (segmentation.py docstring): cut at the aerated lung's hull, never leaked.
HILAR = (CHEST, TumourSpec(diameter_mm=50.0, location="hilar"), 11)
HILAR_MIN_DICE = 0.75


@pytest.fixture(scope="module")
def params() -> dict[str, Any]:
    """The segmenter's parameters from ``conf/segmentation/seeded.yaml``."""
    segmenter = OmegaConf.to_container(_segmentation("seeded").segmenter)
    segmenter.pop("_target_")
    return segmenter


@pytest.fixture(scope="module")
def medium() -> Phantom:
    scan, tumour, seed = CASES["medium"]
    return render_ct(scan, tumour, np.random.default_rng(seed))


def _image(ct: np.ndarray, phantom: Phantom) -> sitk.Image:
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing(phantom.spacing)
    image.SetOrigin(phantom.origin)
    return image


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("kind", CASES)
def test_segmentation_matches_the_phantom(kind: str, params: dict[str, Any]) -> None:
    scan, tumour, seed = CASES[kind]
    phantom = render_ct(scan, tumour, np.random.default_rng(seed))
    image = _image(phantom.ct, phantom)
    mask = SeededSegmenter(**params)(image, phantom.seed_mm)

    assert mask.GetPixelID() == sitk.sitkUInt8
    assert mask.GetSize() == image.GetSize()
    assert mask.GetSpacing() == image.GetSpacing()
    assert mask.GetOrigin() == image.GetOrigin()
    result = sitk.GetArrayFromImage(mask).astype(bool)
    assert _dice(result, phantom.mask.astype(bool)) >= MIN_DICE
    _, n_components = ndimage.label(result)
    assert n_components == 1
    assert result[image.TransformPhysicalPointToIndex(phantom.seed_mm)[::-1]]


def test_hilar_mass_is_cut_at_the_lung_hull_not_leaked(params: dict[str, Any]) -> None:
    scan, tumour, seed = HILAR
    phantom = render_ct(scan, tumour, np.random.default_rng(seed))
    truth = phantom.mask.astype(bool)
    result = sitk.GetArrayFromImage(
        segment_seeded(_image(phantom.ct, phantom), phantom.seed_mm, **params)).astype(bool)
    assert HILAR_MIN_DICE <= _dice(result, truth) < MIN_DICE
    assert result.sum() < truth.sum()  # under-segmented: the mediastinal part is missing


def test_pleural_tumour_stays_out_of_the_chest_wall(params: dict[str, Any]) -> None:
    scan, tumour, seed = CASES["pleural"]
    phantom = render_ct(scan, tumour, np.random.default_rng(seed))
    truth = phantom.mask.astype(bool)
    # Chest wall and mediastinum: the soft tissue connected to the body at the image's
    # left and right faces, away from the tumour.
    tissue, _ = ndimage.label(phantom.ct > -400)
    body = np.union1d(tissue[:, :, 0], tissue[:, :, -1])
    wall = np.isin(tissue, body[body > 0]) & ~ndimage.binary_dilation(truth, iterations=3)
    # The case is a real one: the tumour touches the wall.
    assert (ndimage.binary_dilation(truth, iterations=4) & wall).any()
    result = sitk.GetArrayFromImage(
        segment_seeded(_image(phantom.ct, phantom), phantom.seed_mm, **params)).astype(bool)
    assert not (result & wall).any()


def test_flipped_direction_gives_the_same_physical_mask(params: dict[str, Any],
                                                       medium: Phantom) -> None:
    image = _image(medium.ct, medium)
    flipped = sitk.GetImageFromArray(medium.ct[:, :, ::-1].copy())
    flipped.SetSpacing(medium.spacing)
    nx = medium.ct.shape[2]
    flipped.SetOrigin((medium.origin[0] + (nx - 1) * medium.spacing[0], *medium.origin[1:]))
    flipped.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    mask = segment_seeded(image, medium.seed_mm, **params)
    mask_flipped = segment_seeded(flipped, medium.seed_mm, **params)
    assert mask_flipped.GetDirection() == flipped.GetDirection()
    assert mask_flipped.GetOrigin() == flipped.GetOrigin()
    on_grid = sitk.Resample(mask_flipped, mask, sitk.Transform(), sitk.sitkNearestNeighbor)
    assert sitk.GetArrayFromImage(mask).sum() > 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_grid),
                                  sitk.GetArrayFromImage(mask))


@pytest.mark.parametrize(
    ("where", "match"),
    [
        ("outside", "outside the image volume"),
        ("corner", "in air"),
        ("lung", "not in tumour-like tissue"),
        ("chest_wall", "outside the lung field"),
    ],
)
def test_bad_seed_is_an_error(where: str, match: str, params: dict[str, Any],
                              medium: Phantom) -> None:
    image = _image(medium.ct, medium)
    truth = medium.mask.astype(bool)
    lung = np.argwhere((medium.ct < -800) & ~ndimage.binary_dilation(truth, iterations=5))
    # Soft tissue next to the lung, on the row through the tumour's seed.
    _, row, _ = image.TransformPhysicalPointToIndex(medium.seed_mm)[::-1]
    wall_x = np.flatnonzero(medium.ct[:, row].max(axis=0) > -200)
    index = {
        "outside": None,
        "corner": (0, 0, 0),
        "lung": tuple(int(i) for i in lung[len(lung) // 2][::-1]),
        "chest_wall": (int(wall_x[-1]) - 2, row, medium.ct.shape[0] // 2),
    }[where]
    seed = ((1e4, 0.0, 0.0) if index is None
            else image.TransformIndexToPhysicalPoint(index))
    with pytest.raises(SegmentationError, match=match):
        segment_seeded(image, seed, **params)


def test_growing_into_the_lung_is_reported_as_a_leak(params: dict[str, Any],
                                                    medium: Phantom) -> None:
    # A tumour interval that admits aerated lung: the region fills the lung field.
    too_low = {**params, "tumour_hu": (-950.0, 400.0), "air_hu": -990.0}
    with pytest.raises(SegmentationError, match="leak"):
        segment_seeded(_image(medium.ct, medium), medium.seed_mm, **too_low)


def test_merging_with_a_thick_band_is_reported_as_a_leak(params: dict[str, Any]) -> None:
    phantom = render_ct(ScanSpec(), TumourSpec(diameter_mm=15.0), np.random.default_rng(8))
    image = _image(phantom.ct, phantom)
    # A soft-tissue band 10 mm thick across the whole lung through the tumour (a
    # consolidation): thicker than any vessel, so only the size limits can catch it.
    _, y, z = np.asarray(image.TransformPhysicalPointToIndex(phantom.seed_mm))
    zz, yy = np.indices(phantom.ct.shape[:2])
    band = (((yy - y) * phantom.spacing[1]) ** 2 + ((zz - z) * phantom.spacing[2]) ** 2) < 25.0
    ct = phantom.ct.copy()
    ct[band[:, :, None] & (ct < -600)] = 40
    with pytest.raises(SegmentationError, match="leak"):
        segment_seeded(_image(ct, phantom), phantom.seed_mm, **params)


def test_config_instantiates_the_segmenter(params: dict[str, Any]) -> None:
    seeded = _segmentation("seeded")
    assert seeded.method == "seeded"
    segmenter = instantiate(seeded.segmenter)
    assert isinstance(segmenter, SeededSegmenter)
    assert segmenter.tumour_hu == tuple(params["tumour_hu"])
    masks_only = _segmentation("mask")
    assert masks_only.method == "mask"
    assert masks_only.segmenter is None


@pytest.mark.parametrize(
    "change",
    [{"tumour_hu": (0.0, -100.0)}, {"band_mm": (1.0,)}, {"air_hu": -500.0},
     {"vessel_radius_mm": 0.0}, {"edge_fraction": 1.5}, {"smoothing_mm": -1.0}],
)
def test_invalid_parameters_are_rejected(change: dict[str, Any],
                                         params: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="SeededSegmenter"):
        SeededSegmenter(**{**params, **change})


def test_segmentation_threads_share_the_cores_among_itks_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "cpu_count", lambda: 8)
    image = sitk.Image(16, 16, 8, sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    seen: list[int] = []

    def segmenter(ct: sitk.Image, seed: tuple[float, float, float]) -> sitk.Image:
        seen.append(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())  # what a filter gets
        mask = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
        mask.CopyInformation(ct)
        mask[4:8, 4:8, 2:5] = 1
        return mask

    table = pd.DataFrame({"image": str(tmp_path / "ct.nii.gz"), "mask": None,
                          "seed": [(5.0, 5.0, 3.0), (6.0, 6.0, 3.0)], "image_sha": ["a", "b"],
                          "mask_sha": None}, index=["P1", "P2"])
    default = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(3)  # a default no share equals
    try:
        rois, problems = prepare_rois(table, segmenter=segmenter, segmentation_params={},
                                      mask_dir=tmp_path / "masks", n_jobs=2)
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 3  # then restored
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(default)
    assert not problems
    assert list(rois["roi_source"]) == ["seeded", "seeded"]
    assert seen == [4, 4]  # 8 cores, 2 threads: 4 ITK threads each
