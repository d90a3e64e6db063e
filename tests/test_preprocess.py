"""Preprocessing keeps physical alignment: resampling and reorientation move no tumour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from monai.transforms import Compose, LoadImaged, Orientationd, Spacingd

from pdl1exp.imaging.preprocess import AXIS_LABELS
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
