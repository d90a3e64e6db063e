"""Every backbone config composes, builds its network and embeds a tiny input."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from pdl1exp.features.backbones import build_backbone
from pdl1exp.features.weights import input_normalisation, load_weights
from tests.conftest import CONF

BACKBONES = sorted(p.stem for p in (CONF / "backbone").glob("*.yaml"))
# Embedding size of each backbone config: the test fails when a config is added unlisted.
EMBEDDING_DIMS = {"densenet121_2d": 1024, "fmcib_3d": 4096, "resnet18_2d": 512,
                  "resnet18_3d": 512, "resnet50_2d": 2048, "resnet50_3d": 2048}
TINY_SIDE = 32  # the smallest side DenseNet121 pools down to 1 voxel


def test_every_backbone_config_is_listed() -> None:
    assert set(BACKBONES) == set(EMBEDDING_DIMS)


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_config_builds_and_embeds(compose_cfg, name: str) -> None:
    """Build each backbone as the deep-feature stage does, with its composed ROI."""
    cfg = compose_cfg(f"backbone={name}")
    backbone = cfg.backbone
    assert backbone.name == name
    assert len(backbone.input_size) == backbone.spatial_dims
    roi = instantiate(cfg.roi)  # the ROI transform accepts the backbone's input size
    net = build_backbone(name=backbone.arch, spatial_dims=backbone.spatial_dims,
                         in_channels=cfg.roi.channels, multi_stage=backbone.multi_stage).eval()
    tag = load_weights(net, weights="random", seed=0, arch=backbone.arch)
    mean, std = input_normalisation(tag, arch=backbone.arch)
    x = torch.rand(1, roi.channels, *[TINY_SIDE] * backbone.spatial_dims)
    shape = (1, -1) + (1,) * backbone.spatial_dims
    x = (x - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)
    with torch.inference_mode():
        out = net(x)
    assert net.embedding_dim == EMBEDDING_DIMS[name]
    assert out.shape == (1, EMBEDDING_DIMS[name])
    assert torch.isfinite(out).all()


def test_fmcib_selects_fmcibs_preprocessing_and_roi(compose_cfg) -> None:
    cfg = compose_cfg("backbone=fmcib_3d")
    assert cfg.roi.mode == "seed_patch_3d"
    assert list(cfg.roi.size) == [50, 50, 50]
    assert cfg.roi.channels == 1
    pre = cfg.preprocess
    assert list(pre.spacing_mm) == [1.0, 1.0, 1.0]
    assert pre.axcodes == "LPS"
    # FMCIB scales HU -1024..3072 to [0, 1].
    assert pre.window_level - pre.window_width / 2 == -1024.0
    assert pre.window_level + pre.window_width / 2 == 3072.0
    # A command-line choice still wins over the backbone's defaults.
    assert compose_cfg("backbone=fmcib_3d", "roi=patch_3d").roi.mode == "3d"
