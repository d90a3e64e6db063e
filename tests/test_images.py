"""Image readers: every format with its geometry, DICOM rescale, truncation, no PHI."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pdl1exp.data import images
from pdl1exp.data.images import ImageReadError, geometry_mismatch, read_image

SPACING = (0.7, 0.8, 2.5)
ORIGIN = (-12.5, 30.25, -100.0)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def _volume(shape=(5, 6, 7)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.int16).reshape(shape) - 500


def _write(path: Path, array: np.ndarray, *, compress: bool = False) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_each_format_keeps_geometry_and_values(tmp_path: Path, suffix: str) -> None:
    array = _volume()
    image = read_image(_write(tmp_path / f"ct{suffix}", array, compress=suffix != ".nii"))
    assert image.GetSpacing() == pytest.approx(SPACING, abs=1e-5)
    assert image.GetOrigin() == pytest.approx(ORIGIN, abs=1e-5)
    assert image.GetDirection() == pytest.approx(DIRECTION, abs=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)


def _dicom_series(folder: Path, planes: np.ndarray, *, slope: float, intercept: float) -> None:
    """A CT series written slice by slice with pydicom (position, spacing, rescale)."""
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    for k, plane in enumerate(planes):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality = "CT"
        ds.PatientName = "DOE^JANE"
        ds.PatientID = "MRN-123456"
        ds.PatientBirthDate = "19500101"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], ORIGIN[2] + k * SPACING[2]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [SPACING[1], SPACING[0]]
        ds.SliceThickness = SPACING[2]
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = plane.astype(np.uint16).tobytes()
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)


def test_dicom_series_geometry_rescale_and_no_phi(tmp_path: Path) -> None:
    stored = np.random.default_rng(0).integers(0, 2000, size=(3, 4, 5)).astype(np.uint16)
    _dicom_series(tmp_path / "series", stored, slope=2.0, intercept=-1024.0)
    image = read_image(tmp_path / "series")
    assert image.GetSize() == (5, 4, 3)
    assert image.GetSpacing() == pytest.approx(SPACING, abs=1e-4)
    assert image.GetOrigin() == pytest.approx(ORIGIN, abs=1e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), stored * 2.0 - 1024.0)
    assert image.GetMetaDataKeys() == ()
    assert pydicom.dcmread(tmp_path / "series" / "000.dcm").PatientName == "DOE^JANE"


def test_two_series_in_one_folder_are_refused(tmp_path: Path) -> None:
    planes = np.zeros((2, 4, 4), dtype=np.uint16)
    _dicom_series(tmp_path / "a", planes, slope=1.0, intercept=0.0)
    _dicom_series(tmp_path / "b", planes, slope=1.0, intercept=0.0)
    for f in (tmp_path / "b").iterdir():
        f.rename(tmp_path / "a" / f"b_{f.name}")
    with pytest.raises(ImageReadError, match="2 DICOM series"):
        read_image(tmp_path / "a")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_file_is_detected(tmp_path: Path, suffix: str) -> None:
    path = _write(tmp_path / f"ct{suffix}", _volume((20, 30, 40)), compress=suffix != ".nii")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageReadError, match=path.name):
        read_image(path)


def test_a_file_checked_once_is_checked_again_when_it_changes(tmp_path: Path,
                                                             monkeypatch) -> None:
    """The completeness check runs once per version of a file: not at every read of the
    same file, but again after it is rewritten (here truncated in place)."""
    checked = []
    check = images._check_nifti_complete
    monkeypatch.setattr(images, "_check_nifti_complete",
                        lambda path: (checked.append(path), check(path)))
    monkeypatch.setattr(images, "_CHECKED", {})  # an earlier test's file may share the key
    path = _write(tmp_path / "ct.nii.gz", _volume((20, 30, 40)), compress=True)
    for _ in range(3):
        read_image(path)
    assert len(checked) == 1
    path.write_bytes(path.read_bytes()[:-400])
    for _ in range(2):  # a failed check is not remembered: the error at every read
        with pytest.raises(ImageReadError, match="truncated or corrupt gzip"):
            read_image(path)
    assert len(checked) == 3


def test_files_another_process_checked_are_not_checked_again_unless_changed(
        tmp_path: Path, monkeypatch) -> None:
    """A worker given the parent's checked file versions reads them without the check; a
    file rewritten since is another version, and is checked."""
    path = _write(tmp_path / "ct.nii.gz", _volume((20, 30, 40)), compress=True)
    monkeypatch.setattr(images, "_CHECKED", {})
    read_image(path)  # the parent's read
    parent = images.checked_files()
    assert {version[0] for version in parent} == {str(path)}
    checked = []
    check = images._check_nifti_complete
    monkeypatch.setattr(images, "_check_nifti_complete",
                        lambda path: (checked.append(path), check(path)))
    monkeypatch.setattr(images, "_CHECKED", {})  # a fresh worker
    images.trust_checked(parent)
    read_image(path)
    assert checked == []
    path.write_bytes(path.read_bytes()[:-400])
    with pytest.raises(ImageReadError, match="truncated or corrupt gzip"):
        read_image(path)
    assert checked == [path]


def test_the_checked_files_are_bounded_oldest_forgotten_first(monkeypatch) -> None:
    monkeypatch.setattr(images, "_CHECKED", {})
    monkeypatch.setattr(images, "_MAX_CHECKED", 3)
    versions = [(f"/f{i}.nii.gz", 1, 1, i) for i in range(5)]
    for version in versions:
        images.trust_checked([version])
    assert images.checked_files() == frozenset(versions[2:])


def test_gzip_with_short_payload_is_detected(tmp_path: Path) -> None:
    """A complete gzip stream whose NIfTI data block is short (e.g. a cut-off export)."""
    path = _write(tmp_path / "ct.nii", _volume((20, 30, 40)))
    raw = path.read_bytes()
    target = tmp_path / "short.nii.gz"
    target.write_bytes(gzip.compress(raw[: len(raw) - 1000]))
    with pytest.raises(ImageReadError, match="truncated NIfTI"):
        read_image(target)


def test_garbage_and_unsupported_files(tmp_path: Path) -> None:
    junk = tmp_path / "ct.nii.gz"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match=r"ct\.nii\.gz"):
        read_image(junk)
    other = tmp_path / "ct.png"
    other.write_bytes(b"x")
    with pytest.raises(ImageReadError, match="unsupported image format"):
        read_image(other)
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "missing.nii.gz")


def test_geometry_mismatch_names_the_field() -> None:
    a = sitk.Image(4, 4, 4, sitk.sitkInt16)
    b = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    assert geometry_mismatch(a, b, tolerance_mm=1e-3) is None
    b.SetOrigin((0.0, 0.0, 0.5))
    assert "origin" in geometry_mismatch(a, b, tolerance_mm=1e-3)
    c = sitk.Image(4, 4, 5, sitk.sitkUInt8)
    assert "size" in geometry_mismatch(a, c, tolerance_mm=1e-3)


def test_a_file_removed_while_read_is_one_clear_error(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A file gone between the existence check and its reading: the reader's error, naming it."""
    path = _write(tmp_path / "gone.nii.gz", _volume(), compress=True)

    def removed(*_args) -> None:
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(images, "_nifti_complete", removed)
    with pytest.raises(ImageReadError, match=r"gone\.nii\.gz: unreadable or truncated image"):
        read_image(path)
