"""Tiny DICOM studies for tests: a CT series (pydicom), an RTSTRUCT (pydicom) and a SEG
(highdicom's own writer), with the truth defined in world millimetres."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

SPACING = (0.8, 0.7, 2.0)         # x (columns), y (rows), z (slices) in mm
SIZE = (18, 16, 8)                # columns, rows, slices
ORIGIN = (-6.4, -5.6, -7.0)       # centre of the first voxel, axial identity orientation
CENTRE = (ORIGIN[0] + 8 * SPACING[0], ORIGIN[1] + 7 * SPACING[1])  # a voxel centre
SLICES_WITH_TUMOUR = (2, 3, 4, 5)

Shape = Callable[[np.ndarray], np.ndarray]  # world points (n, 3) → inside (n,)


def square(half: int = 4) -> Shape:
    """Axis-aligned prism of (2 * half + 1)² voxels around CENTRE on the tumour slices
    (edges through voxel centres, inclusive)."""
    hx, hy = half * SPACING[0], half * SPACING[1]
    z = [ORIGIN[2] + k * SPACING[2] for k in SLICES_WITH_TUMOUR]

    def inside(p: np.ndarray) -> np.ndarray:
        return (np.abs(p[:, 0] - CENTRE[0]) <= hx + 1e-6) & \
            (np.abs(p[:, 1] - CENTRE[1]) <= hy + 1e-6) & \
            (p[:, 2] >= min(z) - 1e-6) & (p[:, 2] <= max(z) + 1e-6)
    return inside


def circle(radius_mm: float = 3.3) -> Shape:
    """Cylinder of ``radius_mm`` around CENTRE on the tumour slices."""
    z = [ORIGIN[2] + k * SPACING[2] for k in SLICES_WITH_TUMOUR]

    def inside(p: np.ndarray) -> np.ndarray:
        return ((p[:, 0] - CENTRE[0]) ** 2 + (p[:, 1] - CENTRE[1]) ** 2 <= radius_mm ** 2) & \
            (p[:, 2] >= min(z) - 1e-6) & (p[:, 2] <= max(z) + 1e-6)
    return inside


def square_contours(half: float = 4) -> list[np.ndarray]:
    """One closed square polygon per tumour slice (world mm), ``half`` voxels from CENTRE:
    whole numbers put the vertices on voxel centres, halves on voxel edges."""
    cx, cy = CENTRE
    hx, hy = half * SPACING[0], half * SPACING[1]
    return [np.array([[cx - hx, cy - hy, z], [cx + hx, cy - hy, z],
                      [cx + hx, cy + hy, z], [cx - hx, cy + hy, z]])
            for z in (ORIGIN[2] + k * SPACING[2] for k in SLICES_WITH_TUMOUR)]


def circle_contours(radius_mm: float = 3.3, n: int = 64) -> list[np.ndarray]:
    """One 64-gon per tumour slice approximating a circle (world mm)."""
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return [np.column_stack([CENTRE[0] + radius_mm * np.cos(angles),
                             CENTRE[1] + radius_mm * np.sin(angles), np.full(n, z)])
            for z in (ORIGIN[2] + k * SPACING[2] for k in SLICES_WITH_TUMOUR)]


def _pixel_world(ds: Dataset) -> np.ndarray:
    """World position (rows, columns, 3) of every pixel centre of one slice."""
    row_dir = np.asarray(ds.ImageOrientationPatient[:3], dtype=float)
    col_dir = np.asarray(ds.ImageOrientationPatient[3:], dtype=float)
    dy, dx = (float(v) for v in ds.PixelSpacing)
    r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
    return (np.asarray(ds.ImagePositionPatient, dtype=float) + c[..., None] * dx * row_dir
            + r[..., None] * dy * col_dir)


def truth_on_image(image: sitk.Image, shape: Shape) -> np.ndarray:
    """The shape as a (z, y, x) boolean array on ``image``'s voxel grid."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in image.GetSize()[::-1]), indexing="ij")
    index = np.column_stack([i.ravel(), j.ravel(), k.ravel()]).astype(float)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    world = np.asarray(image.GetOrigin()) + (direction * np.asarray(image.GetSpacing())
                                             @ index.T).T
    return shape(world).reshape(k.shape)


def write_ct(folder: Path, *, patient_id: str = "P1", study_uid: str | None = None,
             flipped: bool = False, shuffled: bool = False, description: str = "LUNG 1mm",
             kernel: str = "B70f", slice_spacing: float = SPACING[2],
             n_slices: int = SIZE[2], seed: int = 0) -> list[Dataset]:
    """Write a CT series (one file per slice) and return its datasets in file order.

    ``flipped``: rows and columns run towards -x/-y and slices are numbered top-down, so
    every axis of the stored grid is reversed against the identity series (same world grid).
    ``shuffled``: file names in random order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    n_cols, n_rows = SIZE[0], SIZE[1]
    if flipped:
        orientation = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
        corner = (ORIGIN[0] + (n_cols - 1) * SPACING[0], ORIGIN[1] + (n_rows - 1) * SPACING[1])
    else:
        orientation, corner = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], ORIGIN[:2]
    order = np.arange(n_slices)[::-1] if flipped else np.arange(n_slices)
    names = rng.permutation(n_slices) if shuffled else np.arange(n_slices)
    datasets = []
    for number, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality, ds.Manufacturer = "CT", "test"
        ds.PatientName, ds.PatientID = "DOE^JANE", patient_id
        ds.PatientBirthDate, ds.PatientSex = "19500101", "F"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20200101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.SeriesNumber, ds.InstanceNumber = 2, number + 1
        ds.SeriesDescription, ds.ConvolutionKernel = description, kernel
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [corner[0], corner[1], ORIGIN[2] + k * slice_spacing]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = [SPACING[1], SPACING[0]]
        ds.SliceThickness = slice_spacing
        ds.Rows, ds.Columns = n_rows, n_cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1.0, -1024.0, "HU"
        plane = rng.integers(900, 1100, size=(n_rows, n_cols)).astype(np.uint16)
        ds.PixelData = plane.tobytes()
        ds.save_as(folder / f"{names[number]:03d}.dcm", enforce_file_format=True)
        datasets.append(ds)
    return datasets


def write_rtstruct(path: Path, ct: Sequence[Dataset], rois: dict[str, list[np.ndarray]], *,
                   referenced_series: str | None = "ct") -> Path:
    """An RTSTRUCT with one structure per ``rois`` entry (closed planar contours, world mm).

    ``referenced_series``: "ct" references ``ct``'s series, another string that UID, None no
    series at all.
    """
    first = ct[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "FrameOfReferenceUID"):
        setattr(ds, key, getattr(first, key))
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), 3
    ds.StructureSetLabel = "test"
    if referenced_series is not None:
        series = Dataset()
        series.SeriesInstanceUID = first.SeriesInstanceUID if referenced_series == "ct" \
            else referenced_series
        series.ContourImageSequence = DicomSequence()
        for image in ct:
            item = Dataset()
            item.ReferencedSOPClassUID = image.SOPClassUID
            item.ReferencedSOPInstanceUID = image.SOPInstanceUID
            series.ContourImageSequence.append(item)
        study = Dataset()
        study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
        study.ReferencedSOPInstanceUID = first.StudyInstanceUID
        study.RTReferencedSeriesSequence = DicomSequence([series])
        frame = Dataset()
        frame.FrameOfReferenceUID = first.FrameOfReferenceUID
        frame.RTReferencedStudySequence = DicomSequence([study])
        ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])
    ds.StructureSetROISequence = DicomSequence()
    ds.ROIContourSequence = DicomSequence()
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName = number, name
        roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
        roi.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ROIDisplayColor = [255, 0, 0]
        item.ContourSequence = DicomSequence()
        for points in contours:
            contour = Dataset()
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [round(float(v), 6) for v in np.ravel(points)]
            item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_seg(path: Path, ct: Sequence[Dataset], segments: dict[str, Shape]) -> Path:
    """A binary SEG written by highdicom, one segment per ``segments`` entry, each frame the
    shape sampled at the source slice's pixel centres."""
    frames = np.stack([np.stack([shape(_pixel_world(ds).reshape(-1, 3)).reshape(ds.Rows,
                                                                                 ds.Columns)
                                 for shape in segments.values()], axis=-1) for ds in ct])
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for number, label in enumerate(segments, start=1)]
    seg = hd.seg.Segmentation(
        source_images=list(ct), pixel_array=frames.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(),
        series_number=4, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="0",
        device_serial_number="0")
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path
