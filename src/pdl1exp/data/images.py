"""Read CT volumes and masks (NIfTI, NRRD, MetaImage, DICOM series) into SimpleITK images.

Every image leaves this module as a ``SimpleITK.Image`` with its physical geometry (spacing,
origin, direction in ITK/LPS millimetres) and no header metadata: DICOM and NIfTI headers can
carry patient names, IDs and dates, and nothing downstream needs them. Truncated files are
detected here, because ITK's NIfTI reader silently zero-fills a short data block.
"""

from __future__ import annotations

import gzip
import itertools
import os
import threading
import zlib
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from pdl1exp.data.series import choose_series, image_series

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageReadError",
    "checked_files",
    "geometry_mismatch",
    "label_problem",
    "read_image",
    "trust_checked",
    "write_image",
]

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
_CHUNK = 1 << 20
_DICOM_MAGIC_END = 132  # a DICOM file: a 128-byte preamble, then b"DICM"

# ITK prints its own warnings to stderr; we raise our own errors that name the file instead.
sitk.ProcessObject.SetGlobalWarningDisplay(False)


class ImageReadError(ValueError):
    """An image file or DICOM folder that cannot be read as a complete volume."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _check_nifti_complete(path: Path) -> None:
    """Fail on a NIfTI whose data block is shorter than its header promises, or whose
    floating-point data holds NaN/infinity (ITK's reader would turn them into zeros)."""
    try:
        nifti = nib.load(str(path))
    except Exception as err:
        msg = f"{path}: not a readable NIfTI header ({err})"
        raise ImageReadError(msg) from err
    header = nifti.header
    expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * int(
        header.get_data_dtype().itemsize)
    if _suffix(path) == ".nii.gz":
        size = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(_CHUNK):
                    size += len(chunk)
        except (EOFError, OSError, zlib.error) as err:
            msg = f"{path}: truncated or corrupt gzip stream ({err})"
            raise ImageReadError(msg) from err
    else:
        size = path.stat().st_size
    if size < expected:
        msg = f"{path}: truncated NIfTI ({size} bytes of data, header needs {expected})"
        raise ImageReadError(msg)
    if np.issubdtype(header.get_data_dtype(), np.floating):
        _check_finite(path, np.asanyarray(nifti.dataobj))


# The NIfTI file versions (path, size, modification time, inode) checked in this process,
# oldest first, at most _MAX_CHECKED of them (a long-lived process reads ever new files).
_CHECKED: dict[tuple[str, int, int, int], None] = {}
_MAX_CHECKED = 1 << 16
_CHECKED_LOCK = threading.Lock()


def _nifti_complete(path: Path) -> None:
    """:func:`_check_nifti_complete` once per version of a file (name, size, modification
    time, inode) in a process: a run reads an image in several stages, and the check
    decompresses all of it again (17 ms for a 1.5 MB volume). A failing file is checked at
    every read (a failure is not remembered)."""
    stat = path.stat()
    file_version = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if file_version not in _CHECKED:
        _check_nifti_complete(path)
        trust_checked([file_version])


def checked_files() -> frozenset[tuple[str, int, int, int]]:
    """The NIfTI file versions this process has checked, for a worker process's
    :func:`trust_checked` (a spawned worker starts with none)."""
    with _CHECKED_LOCK:
        return frozenset(_CHECKED)


def trust_checked(file_versions: Iterable[tuple[str, int, int, int]]) -> None:
    """Count these file versions (from :func:`checked_files` of the process that checked
    them) as checked here: a file changed since has another version and is checked again.
    Beyond :data:`_MAX_CHECKED` versions the oldest are forgotten (checked again if read)."""
    with _CHECKED_LOCK:
        _CHECKED.update(dict.fromkeys(file_versions))
        for oldest in list(itertools.islice(_CHECKED, max(0, len(_CHECKED) - _MAX_CHECKED))):
            del _CHECKED[oldest]


def _check_header_size(path: Path) -> None:
    """Fail on a header that claims more voxels than this machine's memory holds, before
    ITK tries to allocate them."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = reader.GetSize()
    one = sitk.Image([1] * len(size), reader.GetPixelID(), reader.GetNumberOfComponents())
    needed = int(np.prod(size, dtype=np.float64)) * sitk.GetArrayViewFromImage(one).nbytes
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): ITK will tell
        return
    if needed > memory:
        msg = (f"{path}: the header claims {' x '.join(map(str, size))} voxels "
               f"({needed / 2**30:.0f} GiB), more than this machine's memory")
        raise ImageReadError(msg)


def _check_finite(path: Path, voxels: np.ndarray) -> None:
    if np.issubdtype(voxels.dtype, np.floating) and not np.isfinite(voxels).all():
        msg = f"{path}: {int((~np.isfinite(voxels)).sum())} voxel(s) are NaN or infinite"
        raise ImageReadError(msg)


def _check_dicom_files(folder: Path) -> None:
    """Fail on a DICOM file of ``folder`` (``.dcm`` or with the DICM magic; not DICOMDIR)
    that GDCM could not parse (truncated, corrupt): GDCM leaves it out of every series, and
    the series would be read without that slice."""
    reader = sitk.ImageSeriesReader
    parsed = {Path(f).resolve() for uid in reader.GetGDCMSeriesIDs(str(folder))
              for f in reader.GetGDCMSeriesFileNames(str(folder), uid)}
    broken = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != "DICOMDIR" and path.resolve() not in parsed:
            with path.open("rb") as stream:
                magic = stream.read(_DICOM_MAGIC_END)[_DICOM_MAGIC_END - 4:] == b"DICM"
            if magic or path.suffix.lower() == ".dcm":
                broken.append(path.name)
    if broken:
        msg = (f"{len(broken)} unreadable (truncated or corrupt) DICOM file(s): "
               f"{', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''}")
        raise ImageReadError(msg)


def _read_dicom_series(folder: Path) -> sitk.Image:
    """Read the single CT series in ``folder``; rescale slope/intercept is applied by GDCM.

    A folder with several image series is refused with the list of them; the manifest
    chooses one by ``series_uid`` or ``dataset.series_rule`` (:mod:`pdl1exp.data.series`).
    """
    try:
        chosen = choose_series(image_series(folder))
    except ValueError as err:
        msg = f"{folder}: {err}"
        raise ImageReadError(msg) from err
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(chosen.files))
    reader.MetaDataDictionaryArrayUpdateOff()  # never load per-slice headers (PHI)
    return reader.Execute()


def _strip_metadata(image: sitk.Image) -> sitk.Image:
    for key in image.GetMetaDataKeys():
        image.EraseMetaData(key)
    return image


def read_image(path: str | Path) -> sitk.Image:
    """Read one volume with its physical geometry.

    Args:
        path: a NIfTI/NRRD/MetaImage file or a folder holding one DICOM series.

    Raises:
        ImageReadError: missing, unsupported, truncated or corrupt input (message names it).
    """
    path = Path(path)
    if not path.exists():
        msg = f"{path}: file not found"
        raise ImageReadError(msg)
    if path.is_dir():
        try:
            _check_dicom_files(path)
            image = _read_dicom_series(path)
        except (RuntimeError, OSError, InvalidDicomError) as err:
            msg = f"{path}: unreadable DICOM series ({str(err).splitlines()[-1][:200]})"
            raise ImageReadError(msg) from err
    else:
        suffix = _suffix(path)
        if suffix not in IMAGE_SUFFIXES:
            msg = f"{path}: unsupported image format {suffix!r}; use one of {IMAGE_SUFFIXES}"
            raise ImageReadError(msg)
        try:
            if suffix in (".nii", ".nii.gz"):
                _nifti_complete(path)
            else:
                _check_header_size(path)
            image = sitk.ReadImage(str(path))
        except (RuntimeError, OSError) as err:  # OSError: e.g. removed since exists()
            msg = f"{path}: unreadable or truncated image ({str(err).splitlines()[-1][:200]})"
            raise ImageReadError(msg) from err
    if image.GetDimension() != 3:
        msg = f"{path}: expected a 3-D volume, got {image.GetDimension()}-D"
        raise ImageReadError(msg)
    _check_finite(path, sitk.GetArrayViewFromImage(image))
    return _strip_metadata(image)


def label_problem(mask: sitk.Image) -> str | None:
    """Why ``mask`` is not a label image (one integer label per voxel), or None when it is.

    A probability map or an RGB picture is refused rather than thresholded silently.
    """
    if mask.GetNumberOfComponentsPerPixel() != 1:
        return (f"a label image has one value per voxel, this one has "
                f"{mask.GetNumberOfComponentsPerPixel()} ({mask.GetPixelIDTypeAsString()})")
    voxels = sitk.GetArrayViewFromImage(mask)
    if np.issubdtype(voxels.dtype, np.floating) and (voxels != np.round(voxels)).any():
        return (f"non-integer values in a {mask.GetPixelIDTypeAsString()} mask (a probability "
                "map?): save the labels as integers (non-zero = tumour)")
    return None


def geometry_mismatch(image: sitk.Image, mask: sitk.Image, *, tolerance_mm: float) -> str | None:
    """Describe how ``mask`` is not in ``image``'s physical space, or None when it is.

    Args:
        tolerance_mm: allowed difference of spacing and origin (mm) and of direction cosines.
    """
    if image.GetSize() != mask.GetSize():
        return f"mask size {mask.GetSize()} != image size {image.GetSize()}"
    for name in ("Spacing", "Origin", "Direction"):
        a = np.asarray(getattr(image, f"Get{name}")())
        b = np.asarray(getattr(mask, f"Get{name}")())
        if not np.allclose(a, b, atol=tolerance_mm, rtol=0):
            shown = [tuple(float(v) for v in np.round(x, 4)) for x in (b, a)]
            return f"mask {name.lower()} {shown[0]} != image {shown[1]}"
    return None


def write_image(image: sitk.Image, path: str | Path) -> Path:
    """Write ``image`` (compressed) so that a reader never sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial"
                             f"{_suffix(path)}")
    sitk.WriteImage(image, str(partial), useCompression=True)
    os.replace(partial, path)
    return path
