"""Synthetic cohort: deterministic bytes, exact prevalence, labels from the latent model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from pdl1exp.data import phantom as phantoms
from pdl1exp.data.manifest import load_cohort
from pdl1exp.data.phantom import (
    HU,
    ScanSpec,
    TumourSpec,
    _distance_inside,
    _grid,
    _near_segment,
    _tumour_box,
    _tumour_shape,
    render_ct,
)
from pdl1exp.hashing import file_digest
from tests.conftest import TINY


def _generator(cfg, root: Path, **changes):
    return instantiate(cfg.dataset.generator, cache_dir=str(root), **{**TINY, **changes})


def test_same_seed_same_bytes_in_any_workers_other_seed_other_cohort(compose_cfg,
                                                                      tmp_path: Path) -> None:
    cfg = compose_cfg()
    first = _generator(cfg, tmp_path / "a", n_patients=6).write().parent
    # rendered in two worker processes (a chunk each), the same bytes as in this process
    again = _generator(cfg, tmp_path / "b", n_patients=6, n_jobs=2).write().parent
    other = _generator(cfg, tmp_path / "c", n_patients=6, seed=7).write().parent
    assert first.name == again.name != other.name
    assert file_digest(first) == file_digest(again)
    assert file_digest(first) != file_digest(other)


def test_prevalence_labels_and_metadata(tiny_cohort: Path) -> None:
    manifest = pd.read_csv(tiny_cohort)
    metadata = json.loads((tiny_cohort.parent / "metadata.json").read_text())
    n_pos = round(metadata["params"]["prevalence"] * len(manifest))
    assert len(manifest) == TINY["n_patients"]
    assert int((manifest["pdl1_tps"] >= 1).sum()) == n_pos == metadata["n_positive"]
    assert set(manifest.loc[manifest["pdl1_tps"] < 1, "pdl1_tps"]) == {0.0}
    ceilings = metadata["bayes_auc"]
    assert 0.5 < ceilings["clinical"] < ceilings["combined"]
    assert 0.5 < ceilings["image"] < ceilings["combined"] < 1.0
    # Both ROI kinds and several formats, all through the public loader.
    assert manifest["mask"].notna().any()
    assert manifest["seed"].notna().any()
    cohort = load_cohort(tiny_cohort, numeric=["age", "pack_years", "cea"],
                         categorical=["sex", "smoking", "histology", "stage"])
    assert cohort.table["label"].sum() == n_pos


def test_prevalence_follows_config(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg()
    path = _generator(cfg, tmp_path, n_patients=10, prevalence=0.3).write()
    assert int((pd.read_csv(path)["pdl1_tps"] >= 1).sum()) == 3


def test_phantom_is_ct_like() -> None:
    phantom = render_ct(ScanSpec(shape=(64, 64, 20), spacing=(1.0, 1.0, 2.0)),
                        TumourSpec(diameter_mm=14.0), np.random.default_rng(3))
    ct, mask = phantom.ct, phantom.mask.astype(bool)
    assert ct[0, 0, 0] == pytest.approx(HU.air, abs=100)  # the corner is outside the body
    lung = np.median(ct[ct.shape[0] // 2, 28:36, 28:36])
    assert -950 < lung < -700
    assert -100 < np.median(ct[mask]) < 150
    volume_ml = mask.sum() * 2.0 / 1000
    assert 0.5 * (4 / 3 * np.pi * 0.7**3) < volume_ml < 2.0 * (4 / 3 * np.pi * 0.7**3)
    index = np.round((np.array(phantom.seed_mm) - phantom.origin) / phantom.spacing).astype(int)
    assert mask[index[2], index[1], index[0]]


_SPECS = [
    TumourSpec(diameter_mm=30.0, lobulation=0.45, n_spicules=0),   # the widest margin
    TumourSpec(diameter_mm=30.0, lobulation=0.05, n_spicules=20),  # spicules reach furthest
    TumourSpec(diameter_mm=16.0, lobulation=-0.3, n_spicules=1),   # a negative amplitude
    TumourSpec(diameter_mm=24.0, lobulation=0.6, n_spicules=2),    # margin may vanish
]


@pytest.mark.parametrize("spec", _SPECS)
def test_the_tumour_box_holds_every_voxel_of_the_whole_volume_shape(spec: TumourSpec) -> None:
    x, y, z, _ = _grid(ScanSpec(shape=(96, 96, 60), spacing=(1.0, 1.0, 1.5)))
    centre = np.array([4.0, -3.0, 2.0], dtype=np.float32)
    radius = spec.diameter_mm / 2
    box = _tumour_box(x, y, z, centre, radius, spec)
    if abs(spec.lobulation) < 0.5:  # else the whole volume, by design
        assert np.zeros(x.shape)[box].size < x.size / 3
    for seed in range(10):
        region, rho = _tumour_shape(x, y, z, centre, radius, spec, np.random.default_rng(seed))
        inner, inner_rho = _tumour_shape(x[box], y[box], z[box], centre, radius, spec,
                                         np.random.default_rng(seed))
        outside = region.copy()
        outside[box] = False
        assert not outside.any()
        np.testing.assert_array_equal(inner, region[box])
        np.testing.assert_array_equal(inner_rho, rho[box])


@pytest.mark.parametrize("spec", [*_SPECS[:3], TumourSpec(diameter_mm=22.0, n_spicules=3,
                                                          vessel_attached=True,
                                                          location="hilar")])
def test_a_phantom_computed_in_boxes_is_the_whole_volume_phantom(spec: TumourSpec,
                                                                  monkeypatch) -> None:
    """Every box (tumour, vessels, spicules) widened to the whole volume: the same bits."""
    scan = ScanSpec(shape=(80, 80, 32), spacing=(0.9, 0.9, 1.5))
    boxed = [render_ct(scan, spec, np.random.default_rng(seed)) for seed in range(3)]
    monkeypatch.setattr(phantoms, "_box", lambda *_: (slice(None),) * 3)
    for seed, phantom in enumerate(boxed):
        whole = render_ct(scan, spec, np.random.default_rng(seed))
        np.testing.assert_array_equal(phantom.ct, whole.ct)
        np.testing.assert_array_equal(phantom.mask, whole.mask)
        assert phantom.seed_mm == whole.seed_mm


def test_the_distance_inside_a_mask_equals_the_whole_volumes_transform() -> None:
    """Computed in the mask's box: the same values as scipy's transform of the whole volume,
    for blobs inside the volume or cut by its faces, anisotropic voxels, and no mask."""
    rng = np.random.default_rng(3)
    sampling = np.array([1.5, 0.7, 0.9])
    shape = (20, 30, 26)
    masks = [np.zeros(shape, dtype=bool), np.ones(shape, dtype=bool)]
    for _ in range(6):
        blobs = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
        lo = [rng.integers(0, n // 2) for n in shape]
        hi = [rng.integers(n // 2 + 1, n + 1) for n in shape]
        mask = np.zeros(shape, dtype=bool)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        mask[box] = blobs[box] > -0.05
        masks.append(mask)
    for mask in masks:
        np.testing.assert_array_equal(_distance_inside(mask, sampling),
                                      ndimage.distance_transform_edt(mask, sampling=sampling))


def test_near_segment_matches_the_distance_by_projection() -> None:
    x, y, z, _ = _grid(ScanSpec(shape=(40, 36, 30), spacing=(0.8, 0.8, 1.5)))
    rng = np.random.default_rng(5)
    points = np.stack([x, y, z], axis=-1).astype(np.float64)
    for radius in (0.6, 1.3, 2.0, 2.0, 3.5, 3.5):
        a, b = (rng.uniform(-15, 15, 3).astype(np.float32) for _ in range(2))
        # every voxel's distance to the segment, by projection on the whole volume
        t = np.clip((points - a) @ (b - a) / float((b - a) @ (b - a)), 0.0, 1.0)
        exact = np.linalg.norm(points - (a + t[..., None] * (b - a)), axis=-1)
        near = _near_segment(x, y, z, a, b, radius)
        clear = np.abs(exact - radius) > 1e-4  # away from float round-off at the boundary
        assert near.any()
        np.testing.assert_array_equal(near[clear], (exact < radius)[clear])


def test_bad_generator_parameters(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg()
    with pytest.raises(InstantiationException, match="prevalence"):
        _generator(cfg, tmp_path, prevalence=1.2)
    with pytest.raises(InstantiationException, match="unknown format"):
        _generator(cfg, tmp_path, formats={"png": 1.0})
    with pytest.raises(InstantiationException, match=r"dataset\.generator\.n_jobs=0"):
        _generator(cfg, tmp_path, n_jobs=0)


def test_oracle_scores_replay_the_written_truth(compose_cfg, tmp_path: Path) -> None:
    generator = _generator(compose_cfg(), tmp_path, n_patients=8)
    folder = generator.write().parent
    written = pd.read_csv(folder / "truth" / "oracle.csv", index_col="patient_id")
    replayed = generator.oracle()
    pd.testing.assert_frame_equal(replayed, written, check_exact=False, rtol=1e-12)
    metadata = json.loads((folder / "metadata.json").read_text())
    labels = (pd.read_csv(folder / "manifest.csv", index_col="patient_id")["pdl1_tps"] >= 1)
    auc = roc_auc_score(labels.loc[replayed.index], replayed["combined"])
    assert auc == pytest.approx(metadata["cohort_oracle_auc"]["combined"])
