"""Fuzzed cohort inputs: every broken file or manifest ends in one CohortError naming the
patient, the column and the reason, never in a library traceback or a hang."""

from __future__ import annotations

import gzip
import struct
from datetime import timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdl1exp.data.manifest import CohortError, load_cohort
from tests.dicom_helpers import write_ct

FUZZ = settings(max_examples=12, deadline=timedelta(seconds=20), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
SHAPE = (8, 16, 16)  # z, y, x
SPACING = (1.0, 1.0, 2.0)
HEADER = "patient_id,image,mask,label"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good patient (image, mask) that every manifest below starts with."""
    root = tmp_path_factory.mktemp("fuzz")
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:5, 6:10, 6:10] = 1
    write(sitk.GetImageFromArray(np.full(SHAPE, 40, np.int16)), root / "good.nii.gz")
    write(sitk.GetImageFromArray(mask), root / "good_mask.nii.gz")
    return root


def write(image: sitk.Image, path: Path) -> Path:
    image.SetSpacing(SPACING[: image.GetDimension()] + (1.0,) * (image.GetDimension() - 3))
    sitk.WriteImage(image, str(path))
    return path


def rows(folder: Path, image: str = "good.nii.gz", mask: str = "good_mask.nii.gz") -> str:
    return f"{HEADER}\nGOOD,good.nii.gz,good_mask.nii.gz,0\nBAD,{image},{mask},1\n"


def expect_one_problem(manifest: Path, *, patient: str, column: str) -> str:
    """Load ``manifest``; it must fail with exactly the problems of ``patient``/``column``."""
    with pytest.raises(CohortError) as caught:
        load_cohort(manifest, n_jobs=1, cache_dir=manifest.parent / "cache")
    problems = caught.value.problems
    assert problems, str(caught.value)
    for problem in problems:
        assert (problem.patient_id, problem.column) == (patient, column), str(caught.value)
        assert problem.reason.strip()
        assert f"patient {patient!r}, column {column!r}: " in str(caught.value)
    return str(caught.value)


def manifest(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / f"{name}.csv"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


@FUZZ
@given(data=st.binary(max_size=2048), compressed=st.booleans())
def test_random_bytes_in_a_nifti(folder: Path, data: bytes, compressed: bool) -> None:
    (folder / "random.nii.gz").write_bytes(gzip.compress(data) if compressed else data)
    expect_one_problem(manifest(folder, "random", rows(folder, "random.nii.gz")),
                       patient="BAD", column="image")


@FUZZ
@given(slice_=st.integers(0, 7), keep=st.floats(0.0, 0.98))
def test_a_truncated_dicom_slice(folder: Path, slice_: int, keep: float) -> None:
    series = folder / f"dicom_{slice_}_{keep:.3f}"
    write_ct(series)
    victim = sorted(series.glob("*.dcm"))[slice_]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(keep * len(data))])
    reason = expect_one_problem(manifest(folder, "dicom", rows(folder, series.name)),
                                patient="BAD", column="image")
    assert victim.name in reason or "unreadable" in reason


@FUZZ
@given(where=st.lists(st.tuples(*(st.integers(0, n - 1) for n in SHAPE)), min_size=1,
                      max_size=5),
       value=st.sampled_from([np.nan, np.inf, -np.inf]), suffix=st.sampled_from(
           [".nii.gz", ".mha", ".nrrd"]), column=st.sampled_from(["image", "mask"]))
def test_nan_or_infinite_voxels(folder: Path, where: list, value: float, suffix: str,
                                column: str) -> None:
    voxels = np.full(SHAPE, 40.0 if column == "image" else 0.0, np.float32)
    if column == "mask":
        voxels[3:5, 6:10, 6:10] = 1.0
    for index in where:
        voxels[index] = value
    name = f"nonfinite{suffix}"
    if suffix == ".nii.gz":  # nibabel: ITK's NIfTI writer and reader turn NaN into 0
        nib.save(nib.Nifti1Image(voxels.transpose(), np.diag([*SPACING, 1.0])), folder / name)
    else:
        write(sitk.GetImageFromArray(voxels), folder / name)
    files = {"image": name} if column == "image" else {"mask": name}
    expect_one_problem(manifest(folder, "nonfinite", rows(folder, **files)), patient="BAD",
                       column=column)


@FUZZ
@given(kind=st.sampled_from(["fraction", "vector"]), fraction=st.floats(0.01, 0.99))
def test_a_mask_that_is_not_a_label_image(folder: Path, kind: str, fraction: float) -> None:
    labels = np.zeros(SHAPE, np.uint8)
    labels[3:5, 6:10, 6:10] = 1
    if kind == "fraction":  # a probability map
        mask = sitk.GetImageFromArray(labels.astype(np.float32) * np.float32(fraction))
    else:  # an RGB picture
        mask = sitk.GetImageFromArray(np.stack([labels] * 3, axis=-1), isVector=True)
    write(mask, folder / "bad_mask.nii.gz")
    expect_one_problem(manifest(folder, "mask", rows(folder, mask="bad_mask.nii.gz")),
                       patient="BAD", column="mask")


@FUZZ
@given(junk=st.binary(min_size=1, max_size=16).filter(
    lambda b: not _is_utf8(b"BAD" + b)))
def test_a_manifest_that_is_not_utf8(folder: Path, junk: bytes) -> None:
    text = rows(folder).encode().replace(b"BAD,", b"BAD" + junk.replace(b",", b"") + b",")
    if _is_utf8(text):  # removing the commas may have left valid UTF-8
        return
    reason = expect_one_problem(manifest(folder, "latin", text), patient="-", column="-")
    assert "UTF-8" in reason


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


@FUZZ
@given(delimiter=st.sampled_from([";", "\t", "|"]))
def test_a_manifest_with_the_wrong_delimiter(folder: Path, delimiter: str) -> None:
    reason = expect_one_problem(manifest(folder, "delimited", rows(folder).replace(
        ",", delimiter)), patient="-", column="patient_id, image, label or pdl1_tps, mask or seed")
    assert f"{delimiter!r}-delimited" in reason


@FUZZ
@given(extra=st.integers(1, 3), row=st.integers(0, 1), quote=st.booleans())
def test_a_manifest_with_ragged_or_unclosed_rows(folder: Path, extra: int, row: int,
                                                 quote: bool) -> None:
    lines = rows(folder).splitlines()
    lines[1 + row] = f'"{lines[1 + row]}' if quote else lines[1 + row] + ",x" * extra
    expect_one_problem(manifest(folder, "ragged", "\n".join(lines) + "\n"), patient="-",
                       column="-")


@FUZZ
@given(size=st.tuples(*(st.integers(1, 2**15 - 1) for _ in range(3))).filter(
    lambda s: np.prod(s, dtype=np.float64) > np.prod(SHAPE)),  # more voxels than stored
       suffix=st.sampled_from([".nii", ".mha"]))
def test_absurd_header_dimensions(folder: Path, size: tuple[int, int, int],
                                  suffix: str) -> None:
    voxels = np.full(SHAPE, 40, np.int16)
    path = folder / f"absurd{suffix}"
    if suffix == ".nii":
        header = nib.Nifti1Header()
        header.set_data_dtype(np.int16)
        block = bytearray(header.binaryblock)
        struct.pack_into("<4h", block, 40, 3, *size)  # dim[0..3]
        path.write_bytes(bytes(block) + b"\0" * 4 + voxels.tobytes())
    else:
        write(sitk.GetImageFromArray(voxels), path)
        text = path.read_bytes().replace(b"DimSize = 16 16 8",
                                         f"DimSize = {' '.join(map(str, size))}".encode())
        path.write_bytes(text)
    expect_one_problem(manifest(folder, "absurd", rows(folder, f"absurd{suffix}")),
                       patient="BAD", column="image")


@FUZZ
@given(dimension=st.sampled_from([2, 4]), extent=st.integers(1, 4))
def test_a_2d_or_4d_image(folder: Path, dimension: int, extent: int) -> None:
    voxels = np.full(SHAPE, 40, np.int16)
    image = sitk.GetImageFromArray(voxels[0]) if dimension == 2 else sitk.JoinSeries(
        [sitk.GetImageFromArray(voxels)] * (extent + 1))
    write(image, folder / "wrong_dimension.nii.gz")
    reason = expect_one_problem(manifest(folder, "dimension", rows(
        folder, "wrong_dimension.nii.gz")), patient="BAD", column="image")
    assert f"got {dimension}-D" in reason
