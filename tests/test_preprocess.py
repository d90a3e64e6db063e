"""Preprocessing keeps physical alignment: resampling and reorientation move no tumour; the
ROI-bounded resampling crops as the whole resampled volume does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from monai.transforms import Compose, LoadImaged, Orientationd, Spacingd

from pdl1exp.imaging.crop import TumourROId
from pdl1exp.imaging.preprocess import AXIS_LABELS, ROISpacingd, build_transforms
from pdl1exp.imaging.reader import SimpleITKReader, lps_affine

SPACING = (0.7, 0.9, 2.5)


def _write_mask(path: Path, *, flipped: bool) -> np.ndarray:
    """An off-centre ellipsoid; returns its centroid in LPS world mm."""
    z, y, x = np.mgrid[:24, :40, :36]
    mask = (((x - 22) / 8.0) ** 2 + ((y - 15) / 6.0) ** 2 + ((z - 9) / 3.0) ** 2 <= 1)
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(SPACING)
    image.SetOrigin((-12.3, 40.1, -70.0))
    if flipped:
        image.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    sitk.WriteImage(image, str(path))
    index = np.argwhere(mask)[:, ::-1].mean(axis=0)  # (x, y, z) voxel centroid
    return (lps_affine(image) @ np.r_[index, 1.0])[:3]


def _centroid_lps(tensor) -> np.ndarray:
    """Centroid of a MONAI (RAS affine) mask in LPS world mm."""
    index = np.argwhere(np.asarray(tensor[0]) > 0.5).mean(axis=0)
    ras = (np.asarray(tensor.affine, dtype=float) @ np.r_[index, 1.0])[:3]
    return ras * np.array([-1.0, -1.0, 1.0])


@pytest.mark.parametrize("flipped", [False, True])
def test_resampling_and_orientation_keep_the_centroid(tmp_path: Path, flipped: bool) -> None:
    path = tmp_path / "mask.nii.gz"
    truth = _write_mask(path, flipped=flipped)
    chain = Compose([
        LoadImaged("mask", reader=SimpleITKReader(), image_only=True, ensure_channel_first=True),
        Orientationd("mask", axcodes="RAS", labels=AXIS_LABELS),
        Spacingd("mask", pixdim=(1.0, 1.0, 1.0), mode="nearest"),
    ])
    resampled = chain({"mask": str(path)})["mask"]
    assert tuple(np.round(np.asarray(resampled.pixdim[:3], dtype=float), 6)) == (1.0, 1.0, 1.0)
    half_voxel = 0.5 * max(SPACING)
    assert np.abs(_centroid_lps(resampled) - truth).max() < half_voxel
    loaded = chain.transforms[0]({"mask": str(path)})["mask"]
    np.testing.assert_allclose(_centroid_lps(loaded), truth, atol=1e-6)


def test_flipped_and_plain_files_give_the_same_canonical_array(tmp_path: Path) -> None:
    chain = Compose([
        LoadImaged("mask", reader=SimpleITKReader(), image_only=True, ensure_channel_first=True),
        Orientationd("mask", axcodes="RAS", labels=AXIS_LABELS),
    ])
    plain = tmp_path / "plain.nii.gz"
    _write_mask(plain, flipped=False)
    image = sitk.ReadImage(str(plain))
    array = sitk.GetArrayFromImage(image)[:, ::-1, ::-1]
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(array))
    flipped.SetSpacing(SPACING)
    extent = (np.array(image.GetSize()) - 1) * np.array(SPACING)
    flipped.SetOrigin(tuple(np.array(image.GetOrigin()) + np.array([extent[0], extent[1], 0.0])))
    flipped.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    sitk.WriteImage(flipped, str(tmp_path / "flipped.nii.gz"))
    a = chain({"mask": str(plain)})["mask"]
    b = chain({"mask": str(tmp_path / "flipped.nii.gz")})["mask"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(a.affine), np.asarray(b.affine), atol=1e-6)


def _write_scan(folder: Path, centre: tuple[int, int, int]) -> dict[str, str]:
    """A 96×96×40 noisy CT (0.8×0.8×2.5 mm, flipped in-plane) with a small ellipsoid tumour
    at voxel ``centre`` (x, y, z), and its mask."""
    z, y, x = np.mgrid[:40, :96, :96]
    cx, cy, cz = centre
    tumour = ((x - cx) / 6.3) ** 2 + ((y - cy) / 4.7) ** 2 + ((z - cz) / 2.2) ** 2 <= 1
    rng = np.random.default_rng(0)
    ct = np.where(tumour, 40.0, -800.0) + rng.normal(0, 60, tumour.shape)
    paths = {}
    for key, array in (("image", ct.astype(np.int16)), ("mask", tumour.astype(np.uint8))):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.8, 0.8, 2.5))
        image.SetOrigin((110.3, -61.7, -300.0))
        image.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
        paths[key] = str(folder / f"{key}.nii.gz")
        sitk.WriteImage(image, paths[key])
    return paths


ROI_CASES = [
    {"mode": "2d", "crop": "masked", "fov_mm": 48.0, "size": (32, 32)},
    {"mode": "2d", "crop": "context", "size": (32, 32)},
    {"mode": "2.5d_adjacent", "size": (32, 32)},
    {"mode": "2.5d_orthogonal", "crop": "masked", "size": (32, 32)},
    {"mode": "3d", "size": (16, 16, 16)},
    {"mode": "seed_patch_3d", "size": (20, 20, 20), "channels": 1},
]


@pytest.mark.parametrize("case", ROI_CASES, ids=lambda c: f"{c['mode']}-{c.get('crop', '')}")
@pytest.mark.parametrize("centre", [(48, 50, 20), (40, 44, 15), (5, 90, 2)],
                         ids=["inside", "inside-half-voxel-centre", "at-the-edge"])
def test_roi_bounded_resampling_crops_as_the_whole_volume(tmp_path: Path, case: dict,
                                                          centre: tuple[int, int, int]) -> None:
    paths = _write_scan(tmp_path, centre)
    roi = TumourROId(("image", "mask"), **case)
    chain = build_transforms(spacing_mm=(1.0, 1.0, 1.0), axcodes="RAS", window_width=1500.0,
                             window_level=-600.0, roi=roi)
    steps = list(chain.transforms)
    at = next(i for i, step in enumerate(steps) if isinstance(step, ROISpacingd))
    whole = Compose([*steps[:at], Spacingd(("image", "mask"), pixdim=(1.0, 1.0, 1.0),
                                            mode=("bilinear", "nearest")), *steps[at + 1:]])
    # A seed 6 mm off the tumour: the seed patch is cut around it, not around the mask.
    seed = None if case["mode"] != "seed_patch_3d" else (110.3 - 0.8 * centre[0] + 6.0,
                                                         -61.7 - 0.8 * centre[1],
                                                         -300.0 + 2.5 * centre[2])
    for item_seed in {seed, None}:
        expected = whole({**paths, "seed": item_seed})["image"]
        got = chain({**paths, "seed": item_seed})["image"]
        assert got.shape == expected.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6)


def test_roi_bounded_resampling_resamples_only_around_the_tumour(tmp_path: Path) -> None:
    paths = _write_scan(tmp_path, (48, 50, 20))
    roi = TumourROId(("image", "mask"), mode="2d", fov_mm=30.0, size=(32, 32))
    load = Compose([
        LoadImaged(("image", "mask"), reader=SimpleITKReader(), image_only=True,
                   ensure_channel_first=True),
        Orientationd(("image", "mask"), axcodes="RAS", labels=AXIS_LABELS),
    ])
    item = load(paths)
    whole = Spacingd(("image", "mask"), pixdim=(1.0, 1.0, 1.0),
                     mode=("bilinear", "nearest"))(dict(item))
    bounded = ROISpacingd(("image", "mask"), pixdim=(1.0, 1.0, 1.0),
                          mode=("bilinear", "nearest"), roi=roi)(dict(item))
    assert bounded["image"].shape == bounded["mask"].shape
    assert np.prod(bounded["image"].shape) < np.prod(whole["image"].shape) / 4
    np.testing.assert_allclose(np.asarray(bounded["image"].pixdim),
                               np.asarray(whole["image"].pixdim))
    # the block is the whole volume's, voxel for voxel, at its offset
    offset = np.linalg.solve(np.asarray(whole["image"].affine, dtype=float),
                             np.asarray(bounded["image"].affine, dtype=float))[:3, 3]
    start = np.round(offset).astype(int)
    np.testing.assert_allclose(offset, start, atol=1e-9)
    block = tuple(slice(a, a + n) for a, n in zip(start, bounded["image"].shape[1:], strict=True))
    for key in ("image", "mask"):
        np.testing.assert_allclose(np.asarray(bounded[key][0]),
                                   np.asarray(whole[key][0])[block], atol=1e-4)
    assert int(np.asarray(bounded["mask"]).sum()) == int(np.asarray(whole["mask"]).sum())


def test_an_empty_mask_without_seed_is_resampled_whole_and_named(tmp_path: Path) -> None:
    paths = _write_scan(tmp_path, (48, 50, 20))
    empty = sitk.ReadImage(paths["mask"]) * 0
    sitk.WriteImage(empty, paths["mask"])
    chain = build_transforms(spacing_mm=(1.0, 1.0, 1.0), axcodes="RAS", window_width=1500.0,
                             window_level=-600.0, roi=TumourROId(("image", "mask"),
                                                                 size=(32, 32)))
    with pytest.raises(RuntimeError) as error:
        chain({**paths, "seed": None})
    assert "mask is empty" in str(error.value.__cause__)
