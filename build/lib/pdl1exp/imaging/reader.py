"""A MONAI ``ImageReader`` over the project's SimpleITK reader (all formats, integrity checks)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from monai.data.image_reader import ImageReader
from monai.utils import MetaKeys, SpaceKeys

from pdl1exp.data.images import IMAGE_SUFFIXES, read_image

__all__ = ["SimpleITKReader", "lps_affine"]

# ITK's world frame is LPS; MONAI's MetaTensor affines are RAS.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_affine(image: sitk.Image) -> np.ndarray:
    """Voxel (x, y, z) index → LPS world mm, as a 4×4 matrix."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)
    affine[:3, 3] = image.GetOrigin()
    return affine


class SimpleITKReader(ImageReader):
    """Read NIfTI/NRRD/MetaImage files and DICOM series folders for ``LoadImage(d)``.

    Arrays come out indexed (x, y, z) with a RAS affine, as MONAI's own readers do, so
    ``Orientationd`` and ``Spacingd`` work on them unchanged.
    """

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        names = [filename] if isinstance(filename, str | Path) else list(filename)
        return all(Path(n).is_dir() or str(n).lower().endswith(IMAGE_SUFFIXES) for n in names)

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs) -> sitk.Image:
        if not isinstance(data, str | Path):
            if len(data) != 1:
                msg = f"SimpleITKReader reads one volume per key, got {len(data)} paths"
                raise ValueError(msg)
            data = data[0]
        self.filename = str(data)
        return read_image(data)

    def get_data(self, img: sitk.Image) -> tuple[np.ndarray, dict]:
        array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
        affine = _LPS_TO_RAS @ lps_affine(img)
        meta = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            "filename_or_obj": self.filename,
        }
        return array, meta
