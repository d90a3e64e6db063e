"""Deep-feature stage: ROI modes, Lightning extraction, determinism, the content-hashed cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from monai.data import MetaTensor
from omegaconf import OmegaConf

from pdl1exp.data.manifest import load_cohort
from pdl1exp.features import extract as extract_module
from pdl1exp.features.cache import FeatureCache
from pdl1exp.features.extract import extract_features, feature_key
from pdl1exp.features.extractor import DeepFeatureExtractor, loader_workers
from pdl1exp.imaging.crop import TumourROId
from pdl1exp.imaging.preprocess import build_transforms
from tests.conftest import fmcib_checkpoint, fmcib_trunk

SMALL = ["backbone=resnet18_2d", "backbone.input_size=[32,32]", "backbone.precision=32-true",
         "backbone.batch_size=4"]


@pytest.fixture(scope="module")
def rois(tiny_cohort: Path) -> pd.DataFrame:
    """Patients of the tiny cohort that come with a mask (no segmentation needed)."""
    table = load_cohort(tiny_cohort).table
    table = table[table["mask"].notna()].head(5)
    return table[["image", "mask", "image_sha"]].assign(mask_key=table["mask_sha"])


def _transform(cfg):
    p = cfg.preprocess
    return build_transforms(spacing_mm=p.spacing_mm, axcodes=p.axcodes,
                            window_width=p.window_width, window_level=p.window_level,
                            roi=instantiate(cfg.roi))


@pytest.mark.parametrize(("cpus", "expected"), [(1, 0), (2, 0), (3, 1), (4, 2), (6, 4), (64, 4)])
def test_auto_loader_workers_leave_two_cores_to_the_network(cpus: int, expected: int) -> None:
    assert loader_workers("auto", cpus=cpus) == expected


def test_a_number_of_loader_workers_is_taken_as_given_and_checked() -> None:
    assert loader_workers(3, cpus=2) == 3
    assert loader_workers(3, cpus=2, threads=True) == 3
    assert loader_workers("auto", cpus=2, threads=True) == 2  # threads: one per core
    assert 0 <= loader_workers("auto") <= 4  # this machine's cores
    assert loader_workers("0") == 0
    with pytest.raises(ValueError, match=r"backbone\.num_workers"):
        loader_workers(-1)


@pytest.mark.parametrize(("roi", "size", "shape"), [
    ("max_slice_2d", "[32,32]", (3, 32, 32)),
    ("adjacent_25d", "[32,32]", (3, 32, 32)),
    ("orthogonal_25d", "[32,32]", (3, 32, 32)),
    ("patch_3d", "[16,16,16]", (3, 16, 16, 16)),
])
def test_roi_modes_shapes(compose_cfg, rois, roi: str, size: str, shape: tuple) -> None:
    cfg = compose_cfg(f"roi={roi}", f"backbone.input_size={size}")
    row = rois.iloc[0]
    crop = _transform(cfg)({"image": row["image"], "mask": row["mask"]})["image"]
    assert tuple(crop.shape) == shape
    assert float(crop.min()) >= 0.0
    assert float(crop.max()) <= 1.0
    centre = crop[(0, *[s // 2 for s in shape[1:]])]
    assert float(centre) > 0.5  # the tumour (soft tissue) is bright in the lung window


def test_adjacent_channels_differ_and_2d_channels_repeat(compose_cfg, rois) -> None:
    row = rois.iloc[0]
    item = {"image": row["image"], "mask": row["mask"]}
    flat = _transform(compose_cfg(*SMALL))(dict(item))["image"]
    assert torch.equal(flat[0], flat[1])
    slab = _transform(compose_cfg(*SMALL, "roi=adjacent_25d"))(dict(item))["image"]
    assert not torch.equal(slab[0], slab[2])
    assert torch.equal(slab[1], flat[0])


def test_extraction_is_deterministic_and_cached(compose_cfg, rois, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_cfg(*SMALL)
    kwargs = {"preprocess": cfg.preprocess, "roi": cfg.roi, "backbone": cfg.backbone,
              "seed": 3, "devices": 1}
    first = extract_features(rois, cache_dir=tmp_path / "a", **kwargs)
    assert not first.cache_hit
    assert first.weights_tag == "random:3"
    assert first.table.shape == (len(rois), 512)
    assert list(first.table.index) == list(rois.index)
    other = extract_features(rois, cache_dir=tmp_path / "b", **kwargs)
    np.testing.assert_array_equal(first.table.to_numpy(), other.table.to_numpy())

    def no_forward(*args, **kwargs):
        raise AssertionError("a cache hit must not run the network")

    monkeypatch.setattr(DeepFeatureExtractor, "forward", no_forward)
    hit = extract_features(rois, cache_dir=tmp_path / "a", **kwargs)
    assert hit.cache_hit
    assert hit.key == first.key
    pd.testing.assert_frame_equal(hit.table, first.table)


def test_bf16_features_match_fp32(compose_cfg, rois, tmp_path: Path) -> None:
    if extract_module.resolve_precision("bf16-mixed") != "bf16-mixed":
        pytest.skip("this CPU has no bf16 support")
    cfg = compose_cfg(*SMALL)
    kwargs = {"preprocess": cfg.preprocess, "roi": cfg.roi, "seed": 0, "devices": 1,
              "cache_dir": tmp_path}
    fp32 = extract_features(rois, backbone=cfg.backbone, **kwargs).table.to_numpy()
    bf16_cfg = OmegaConf.merge(cfg.backbone, {"precision": "bf16-mixed"})
    bf16 = extract_features(rois, backbone=bf16_cfg, **kwargs)
    assert bf16.key != feature_key(rois, preprocess=cfg.preprocess, roi=cfg.roi,
                                   backbone=cfg.backbone, weights_tag="random:0",
                                   precision="32-true", tta_views=1)
    a, b = fp32.ravel(), bf16.table.to_numpy().ravel()
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999


def test_every_key_component_invalidates(compose_cfg, rois,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_cfg(*SMALL)
    base = {"preprocess": cfg.preprocess, "roi": cfg.roi, "backbone": cfg.backbone,
            "weights_tag": "random:0", "precision": "32-true", "tta_views": 1}
    key = feature_key(rois, **base)
    assert feature_key(rois.copy(), **base) == key
    changed_image = rois.assign(image_sha=rois["image_sha"].where(rois.index != rois.index[0],
                                                                  "0" * 64))
    changed_mask = rois.assign(mask_key=rois["mask_key"].where(rois.index != rois.index[0], "x"))
    variants = [
        feature_key(changed_image, **base),
        feature_key(changed_mask, **base),
        feature_key(rois.iloc[1:], **base),
        feature_key(rois, **{**base, "preprocess": OmegaConf.merge(cfg.preprocess,
                                                                    {"window_level": 40.0})}),
        feature_key(rois, **{**base, "roi": OmegaConf.merge(cfg.roi, {"margin_mm": 5.0})}),
        feature_key(rois, **{**base, "backbone": OmegaConf.merge(cfg.backbone,
                                                                  {"arch": "resnet50"})}),
        feature_key(rois, **{**base, "weights_tag": "random:1"}),
        feature_key(rois, **{**base, "precision": "bf16-mixed"}),
        feature_key(rois, **{**base, "tta_views": 4}),
    ]
    # Paths and batch size do not change the features.
    moved = rois.assign(image=rois["image"].str.replace("/", "//"))
    assert feature_key(moved, **{**base, "backbone": OmegaConf.merge(cfg.backbone,
                                                                      {"batch_size": 1})}) == key
    monkeypatch.setattr(extract_module, "extractor_code_version", lambda: "edited")
    variants.append(feature_key(rois, **base))
    assert len({key, *variants}) == len(variants) + 1


def test_a_table_without_seeds_has_a_key(compose_cfg, rois) -> None:
    cfg = compose_cfg(*SMALL)
    base = {"preprocess": cfg.preprocess, "roi": cfg.roi, "backbone": cfg.backbone,
            "weights_tag": "random:0", "precision": "32-true", "tta_views": 1}
    assert "seed" not in rois
    key = feature_key(rois, **base)
    assert key != feature_key(rois.assign(seed=[(1.0, 2.0, 3.0)] * len(rois)), **base)


def test_partial_cache_file_is_never_read(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    table = pd.DataFrame({"dl_0000": [1.0, 2.0]}, index=pd.Index(["a", "b"], name="patient_id"))
    (tmp_path / ".k1.parquet.999.partial").write_bytes(b"half a parquet")
    assert cache.get("k1") is None
    cache.put("k1", table)
    pd.testing.assert_frame_equal(cache.get("k1"), table)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".k1.parquet.999.partial",
                                                          "k1.parquet"]


def test_3d_backbone_extracts(compose_cfg, rois, tmp_path: Path) -> None:
    cfg = compose_cfg("backbone=resnet18_3d", "roi=patch_3d", "backbone.input_size=[16,16,16]",
                      "backbone.precision=32-true")
    result = extract_features(rois.head(2), preprocess=cfg.preprocess, roi=cfg.roi,
                              backbone=cfg.backbone, seed=0, cache_dir=tmp_path, devices=1)
    assert result.table.shape == (2, 512)
    assert np.isfinite(result.table.to_numpy()).all()


def test_tta_averages_views(compose_cfg, rois, tmp_path: Path) -> None:
    cfg = compose_cfg(*SMALL, "backbone.tta.enabled=true", "backbone.tta.n=3")
    plain = compose_cfg(*SMALL)
    kwargs = {"preprocess": cfg.preprocess, "roi": cfg.roi, "seed": 0, "devices": 1,
              "cache_dir": tmp_path}
    tta = extract_features(rois.head(2), backbone=cfg.backbone, **kwargs)
    one = extract_features(rois.head(2), backbone=plain.backbone, **kwargs)
    assert tta.key != one.key
    assert not np.allclose(tta.table.to_numpy(), one.table.to_numpy())


def _sphere(radius: float) -> dict:
    grid = np.stack(np.meshgrid(*[np.arange(48)] * 3, indexing="ij"))
    inside = ((grid - 24) ** 2).sum(axis=0) <= radius**2
    affine = torch.eye(4, dtype=torch.float64)
    return {"image": MetaTensor(torch.as_tensor(inside[None], dtype=torch.float32), affine=affine),
            "mask": MetaTensor(torch.as_tensor(inside[None], dtype=torch.float32), affine=affine)}


def test_fixed_fov_keeps_physical_scale() -> None:
    fitted = TumourROId(size=(32, 32), margin_mm=0.0)
    fixed = TumourROId(size=(32, 32), margin_mm=0.0, fov_mm=40.0)
    small, large = _sphere(4.0), _sphere(10.0)
    area = {name: [float((t(dict(s))["image"][0] > 0.5).float().mean()) for s in (small, large)]
            for name, t in (("fitted", fitted), ("fixed", fixed))}
    assert area["fitted"][1] < 1.6 * area["fitted"][0]  # size mostly scaled away
    assert area["fixed"][1] > 4 * area["fixed"][0]  # (10 / 4)² ≈ 6 in a fixed field of view
    # A tumour wider than the field of view is never cut: the crop widens to fit it.
    huge = TumourROId(size=(32, 32), margin_mm=2.0, fov_mm=10.0)(dict(large))["image"][0]
    assert float(huge[0].max()) < 0.5
    assert float(huge[:, 0].max()) < 0.5


@pytest.mark.slow
def test_two_device_ddp_extraction_gathers_every_patient(compose_cfg, rois,
                                                         tmp_path: Path) -> None:
    """Spawned DDP on two CPU processes gives the single-device features, all patients."""
    cfg = compose_cfg(*SMALL)
    kwargs = {"preprocess": cfg.preprocess, "roi": cfg.roi, "backbone": cfg.backbone,
              "seed": 0}
    single = extract_features(rois, devices=1, cache_dir=tmp_path / "one", **kwargs).table
    ddp = extract_features(rois, devices=2, cache_dir=tmp_path / "two", **kwargs)
    assert not ddp.cache_hit
    assert sorted(ddp.table.index) == sorted(rois.index)
    np.testing.assert_allclose(ddp.table.loc[single.index].to_numpy(), single.to_numpy(),
                               rtol=1e-5, atol=1e-5)


def _coded_volume(shape: tuple[int, int, int], origin: tuple[float, float, float]) -> dict:
    """A volume whose every voxel holds its own (x, y, z) index code, affine RAS at 1 mm."""
    code = np.indices(shape)
    values = code[0] * 10_000 + code[1] * 100 + code[2] + 1.0  # 0 = padding
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, 3] = torch.as_tensor(origin)
    mask = np.zeros(shape, dtype=np.float32)
    return {"image": MetaTensor(torch.as_tensor(values[None], dtype=torch.float32), affine=affine),
            "mask": MetaTensor(torch.as_tensor(mask[None]), affine=affine)}


def _code(index: tuple[int, int, int]) -> float:
    return index[0] * 10_000 + index[1] * 100 + index[2] + 1.0


@pytest.mark.parametrize("layout", ["xyz", "zyx"])
def test_seed_patch_is_centred_on_the_lps_seed(layout: str) -> None:
    origin = (10.0, -5.0, 3.0)
    item = _coded_volume((40, 30, 20), origin)
    voxel = (12, 7, 9)
    # RAS world of the voxel, then ITK/LPS as the manifest gives seeds.
    ras = np.add(voxel, origin)
    seed = (-ras[0], -ras[1], ras[2])
    roi = TumourROId(mode="seed_patch_3d", size=(8, 8, 8), channels=1, layout=layout)
    out = roi({**item, "seed": seed})
    assert set(out) == {"image"}  # seed and mask are consumed
    patch = out["image"]
    assert tuple(patch.shape) == (1, 8, 8, 8)
    assert float(patch[0, 4, 4, 4]) == _code(voxel)  # FMCIB: int(c) - n // 2 starts the cube
    # The first axis runs along x (xyz) or along z (zyx, FMCIB's Transposed order).
    first_step = (8, 7, 9) if layout == "xyz" else (12, 7, 5)
    assert float(patch[0, 0, 4, 4]) == _code(first_step)


def test_seed_patch_pads_at_the_edge_without_moving_the_seed() -> None:
    item = _coded_volume((40, 30, 20), (0.0, 0.0, 0.0))
    voxel = (1, 7, 18)
    seed = (-float(voxel[0]), -float(voxel[1]), float(voxel[2]))
    patch = TumourROId(mode="seed_patch_3d", size=(8, 8, 8), channels=1)(
        {**item, "seed": seed})["image"][0]
    assert float(patch[4, 4, 4]) == _code(voxel)
    assert float(patch[:3].abs().max()) == 0.0  # x below 0 is padding
    assert float(patch[:, :, 6:].abs().max()) == 0.0  # z beyond 19 is padding
    assert float(patch[3:, :, :6].min()) > 0.0


def test_seed_patch_falls_back_to_the_mask_centroid() -> None:
    item = _coded_volume((40, 30, 20), (0.0, 0.0, 0.0))
    mask = np.zeros((40, 30, 20), dtype=np.float32)
    mask[20:25, 10:13, 4:11] = 1.0  # centroid (22, 11, 7)
    item["mask"] = MetaTensor(torch.as_tensor(mask[None]), affine=item["mask"].affine)
    roi = TumourROId(mode="seed_patch_3d", size=(6, 6, 6), channels=2)
    patch = roi({**item, "seed": None})["image"]
    assert tuple(patch.shape) == (2, 6, 6, 6)
    assert float(patch[0, 3, 3, 3]) == _code((22, 11, 7))
    with pytest.raises(ValueError, match="no seed, and the tumour mask is empty"):
        roi({**_coded_volume((40, 30, 20), (0.0, 0.0, 0.0)), "seed": None})


def test_seed_patch_through_fmcibs_preprocessing(compose_cfg, rois) -> None:
    cfg = compose_cfg("backbone=fmcib_3d", "backbone.input_size=[16,16,16]")
    row = rois.iloc[0]
    crop = _transform(cfg)({"image": row["image"], "mask": row["mask"]})["image"]
    assert tuple(crop.shape) == (1, 16, 16, 16)
    # -1024..3072 HU onto [0, 1]: lung sits near 0.04, soft tissue near 0.26.
    assert 0.0 <= float(crop.min()) < 0.1
    assert 0.2 < float(crop[0, 8, 8, 8]) < 0.35  # the tumour's centroid
    assert float(crop.max()) <= 1.0


def test_fmcib_extracts_end_to_end(compose_cfg, rois, tmp_path: Path) -> None:
    """fmcib_3d from a checkpoint in FMCIB's format, through ``extract_features``."""
    torch.manual_seed(1)
    path = fmcib_checkpoint(tmp_path / "fmcib.torch", fmcib_trunk().state_dict())
    cfg = compose_cfg("backbone=fmcib_3d", "backbone.input_size=[16,16,16]",
                      f"backbone.weights={path}", "backbone.precision=32-true",
                      "backbone.num_workers=0")
    result = extract_features(rois.head(2), preprocess=cfg.preprocess, roi=cfg.roi,
                              backbone=cfg.backbone, seed=0, cache_dir=tmp_path, devices=1)
    assert result.weights_tag == f"file:{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    assert result.table.filter(like="dl_").shape == (2, 4096)
    assert np.isfinite(result.table.to_numpy()).all()
    assert result.table.filter(like="dl_").std().max() > 0
