"""Radiomics stage: PyRadiomics on analytic phantoms, the cache, perturbations, failures."""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from omegaconf import OmegaConf

from pdl1exp.features import radiomics
from pdl1exp.features.radiomics import (
    RADIOMICS_PREFIX,
    extract_radiomics,
    extract_replicates,
    feature_name,
)
from pdl1exp.hashing import file_digest

SIZE = 32


@pytest.fixture
def params(compose_cfg) -> dict:
    """``conf/radiomics/ct.yaml`` on the original image with shape and first-order only."""
    cfg = compose_cfg("radiomics=ct")
    params = OmegaConf.to_container(cfg.radiomics.params, resolve=True)
    params["imageType"] = {"Original": {}}
    params["featureClass"] = {"shape": [], "firstorder": []}
    return params


def _write(folder: Path, pid: str, image: np.ndarray, mask: np.ndarray,
           spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict:
    paths = {}
    for name, array in (("image", image.astype(np.float32)), ("mask", mask.astype(np.uint8))):
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing(spacing)
        paths[name] = folder / f"{pid}_{name}.nii.gz"
        sitk.WriteImage(volume, str(paths[name]))
    return {"patient_id": pid, "image": str(paths["image"]), "mask": str(paths["mask"]),
            "image_sha": file_digest(paths["image"]), "mask_key": file_digest(paths["mask"])}


def _rois(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows)).set_index("patient_id")


def _sphere(radius: float) -> np.ndarray:
    z, y, x = np.mgrid[:SIZE, :SIZE, :SIZE]
    centre = (SIZE - 1) / 2
    return ((z - centre) ** 2 + (y - centre) ** 2 + (x - centre) ** 2) <= radius**2


def _cube(edge: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE, SIZE), dtype=bool)
    mask[8:8 + edge, 8:8 + edge, 8:8 + edge] = True
    return mask


def test_feature_names_are_sanitised() -> None:
    assert feature_name("log-sigma-1-0-mm-3D_glcm_Contrast") == \
        "rad_log_sigma_1_0_mm_3d_glcm_contrast"
    assert feature_name("original_shape_MeshVolume") == "rad_original_shape_meshvolume"


def test_wavelet_preset_adds_wavelet_to_ct(compose_cfg) -> None:
    cfg = compose_cfg("radiomics=ct_wavelet")
    assert set(cfg.radiomics.params.imageType) == {"Original", "LoG", "Wavelet"}
    assert cfg.radiomics.params.setting.binWidth == 25


def test_shape_of_sphere_and_cube_match_geometry(tmp_path: Path, params: dict) -> None:
    radius, edge = 8.0, 12
    blank = np.zeros((SIZE, SIZE, SIZE))
    rois = _rois(_write(tmp_path, "sphere", blank, _sphere(radius)),
                 # 2 mm slices: the cube is resampled to 1 mm before measuring
                 _write(tmp_path, "cube", blank[::2], _cube(edge)[::2], (1.0, 1.0, 2.0)))
    table = extract_radiomics(rois, params=params, cache_dir=tmp_path / "cache", n_jobs=1).table
    sphere, cube = table.loc["sphere"], table.loc["cube"]
    assert sphere["rad_original_shape_meshvolume"] == pytest.approx(
        4 / 3 * math.pi * radius**3, rel=0.02)
    # Marching cubes on a binary voxel sphere overestimates its area (staircase): ~+10 %.
    assert sphere["rad_original_shape_surfacearea"] == pytest.approx(
        4 * math.pi * radius**2, rel=0.15)
    assert sphere["rad_original_shape_sphericity"] == pytest.approx(1.0, rel=0.15)
    assert cube["rad_original_shape_voxelvolume"] == edge**3
    assert cube["rad_original_shape_meshvolume"] == pytest.approx(edge**3, rel=0.02)
    # The mesh chamfers the cube's edges and corners.
    assert cube["rad_original_shape_surfacearea"] == pytest.approx(6 * edge**2, rel=0.06)


def test_two_level_region_gives_first_order_mean_and_sd(tmp_path: Path, params: dict) -> None:
    image = np.zeros((SIZE, SIZE, SIZE))
    image[:, :, 14:] = 100.0  # the cube spans columns 8-19: half at 0 HU, half at 100 HU
    rois = _rois(_write(tmp_path, "p", image, _cube(12)))
    row = extract_radiomics(rois, params=params, cache_dir=tmp_path, n_jobs=1).table.loc["p"]
    assert row["rad_original_firstorder_mean"] == pytest.approx(50.0)
    assert math.sqrt(row["rad_original_firstorder_variance"]) == pytest.approx(50.0)
    assert row["rad_original_firstorder_minimum"] == 0.0
    assert row["rad_original_firstorder_maximum"] == 100.0
    assert not _has_foreign_columns(row.index)


def test_columns_in_the_configured_order_and_an_extractor_reused_without_state(
        tmp_path: Path, params: dict) -> None:
    """Image types and classes keep the configured order (neither alphabetical), and the
    extractor shared by a process's patients gives a patient what a fresh one gives."""
    params = {**params, "imageType": {"Original": {}, "LoG": {"sigma": [2.0]}},
              "featureClass": {"shape": [], "firstorder": []}}
    rng = np.random.default_rng(1)
    rows = [_write(tmp_path, f"p{i}", rng.normal(40, 20 * (i + 1), (SIZE,) * 3),
                   _sphere(5 + 2 * i)) for i in range(2)]
    radiomics._extractor.cache_clear()
    both = extract_radiomics(_rois(*rows), params=params, cache_dir=tmp_path / "both",
                             n_jobs=1).table
    order = ("original_shape", "original_firstorder", "log_sigma_2_0_mm_3d_firstorder")
    groups = [next(g for g in order if c.startswith(RADIOMICS_PREFIX + g)) for c in both.columns]
    assert list(dict.fromkeys(groups)) == list(order)
    radiomics._extractor.cache_clear()
    alone = extract_radiomics(_rois(rows[1]), params=params, cache_dir=tmp_path / "alone",
                              n_jobs=1).table
    pd.testing.assert_series_equal(both.loc["p1"], alone.loc["p1"])


def _has_foreign_columns(columns: pd.Index) -> bool:
    return any("diagnostics" in c or not c.startswith(RADIOMICS_PREFIX) for c in columns)


def test_second_call_is_served_by_the_cache(tmp_path: Path, params: dict) -> None:
    rng = np.random.default_rng(0)
    rois = _rois(*(_write(tmp_path, f"p{i}", rng.normal(40, 20, (SIZE,) * 3), _sphere(6 + i))
                   for i in range(2)))
    first = extract_radiomics(rois, params=params, cache_dir=tmp_path / "cache", n_jobs=1)
    second = extract_radiomics(rois, params=params, cache_dir=tmp_path / "cache", n_jobs=1)
    assert not first.cache_hit
    assert second.cache_hit
    assert second.key == first.key
    pd.testing.assert_frame_equal(second.table, first.table)
    changed = {**params, "setting": {**params["setting"], "binWidth": 10}}
    third = extract_radiomics(rois, params=changed, cache_dir=tmp_path / "cache", n_jobs=1)
    assert not third.cache_hit
    assert third.key != first.key


def test_failing_patient_is_a_problem_not_a_crash(tmp_path: Path, params: dict) -> None:
    one_voxel = np.zeros((SIZE,) * 3, dtype=bool)
    one_voxel[16, 16, 16] = True
    blank = np.zeros((SIZE,) * 3)
    rois = _rois(_write(tmp_path, "good", blank, _sphere(6)),
                 _write(tmp_path, "tiny", blank, one_voxel))
    first = extract_radiomics(rois, params=params, cache_dir=tmp_path / "cache", n_jobs=1)
    assert list(first.table.index) == ["good"]
    [problem] = first.problems
    assert (problem.patient_id, problem.column) == ("tiny", "mask")
    assert "radiomics extraction failed" in problem.reason
    # The good patient's row was cached on its own; only the failing one is retried.
    again = extract_radiomics(rois, params=params, cache_dir=tmp_path / "cache", n_jobs=1)
    pd.testing.assert_frame_equal(again.table, first.table)
    assert [p.patient_id for p in again.problems] == ["tiny"]


def test_perturbed_replicates_move_the_roi(tmp_path: Path, params: dict) -> None:
    rois = _rois(_write(tmp_path, "p", np.zeros((SIZE,) * 3), _cube(10)))
    replicates = extract_replicates(rois, params=params, cache_dir=tmp_path, n_jobs=1,
                                    shift_fraction=0.5)
    volume = {name: r.table.loc["p", "rad_original_shape_voxelvolume"]
              for name, r in replicates.items()}
    assert volume["original"] == 1000
    assert volume["erode"] == 8**3
    assert volume["dilate"] > 1000
    assert volume["shift"] == pytest.approx(1000, rel=0.35)
    assert len({r.key for r in replicates.values()}) == 4
    with pytest.raises(ValueError, match="perturbation='blur'"):
        extract_radiomics(rois, params=params, cache_dir=tmp_path, perturbation="blur")


@pytest.mark.slow
def test_parallel_extraction_equals_serial(tmp_path: Path, params: dict) -> None:
    rng = np.random.default_rng(1)
    rois = _rois(*(_write(tmp_path, f"p{i}", rng.normal(0, 30, (SIZE,) * 3), _sphere(5 + i))
                   for i in range(3)))
    serial = extract_radiomics(rois, params=params, cache_dir=tmp_path / "a", n_jobs=1)
    pools = []

    def pool(*args, **kwargs):  # the real pool, its arguments kept
        pools.append(kwargs)
        return ProcessPoolExecutor(*args, **kwargs)

    with mock.patch.object(radiomics, "ProcessPoolExecutor", side_effect=pool):
        parallel = extract_radiomics(rois, params=params, cache_dir=tmp_path / "b", n_jobs=2)
    pd.testing.assert_frame_equal(parallel.table, serial.table)
    # The spawned workers trust the files this process checked (the serial run read them).
    trusted = {version[0] for version in pools[0]["initargs"][0]}
    assert {*rois["image"], *rois["mask"]} <= trusted


def test_patient_rows_are_reused_under_their_own_id(tmp_path: Path, params: dict) -> None:
    row = _write(tmp_path, "p0", np.zeros((SIZE,) * 3), _sphere(6))
    first = extract_radiomics(_rois(row), params=params, cache_dir=tmp_path, n_jobs=1)
    # A rescan filed twice: same files, two ids; the twin is served from p0's cached row.
    both = extract_radiomics(_rois(row, {**row, "patient_id": "twin"}), params=params,
                             cache_dir=tmp_path, n_jobs=1)
    assert both.cache_hit
    assert list(both.table.index) == ["p0", "twin"]
    np.testing.assert_array_equal(both.table.loc["twin"], first.table.loc["p0"])
