"""Tests of the MONAI feature backbones: embedding sizes, multi-stage pooling, layout."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import resnet18, resnet50

from pdl1exp.features.backbones import build_backbone


@pytest.mark.parametrize(
    ("name", "spatial_dims", "multi_stage", "dim"),
    [
        ("resnet50", 2, False, 2048),
        ("resnet18", 2, False, 512),
        ("densenet121", 2, False, 1024),
        ("resnet50", 3, False, 2048),
        ("resnet18", 3, False, 512),
        ("resnet50", 2, True, 256 + 512 + 1024 + 2048),
        ("resnet18", 3, True, 64 + 128 + 256 + 512),
    ],
)
def test_embedding_dims(name, spatial_dims, multi_stage, dim):
    net = build_backbone(name=name, spatial_dims=spatial_dims, multi_stage=multi_stage).eval()
    assert net.embedding_dim == dim
    x = torch.rand(2, 3, *([32] * spatial_dims))
    with torch.inference_mode():
        out = net(x)
    assert out.shape == (2, dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_multi_stage_concatenates_pooled_stages_in_order(spatial_dims):
    torch.manual_seed(0)
    multi = build_backbone(name="resnet18", spatial_dims=spatial_dims, multi_stage=True).eval()
    single = build_backbone(name="resnet18", spatial_dims=spatial_dims).eval()
    single.load_state_dict(multi.state_dict())
    x = torch.rand(1, 3, *([32] * spatial_dims))
    with torch.inference_mode():
        stages = multi(x)
        last = single(x)
        stem = multi.maxpool(multi.act(multi.bn1(multi.conv1(x))))
        layer1 = multi.layer1(stem).mean(dim=tuple(range(2, 2 + spatial_dims)))
    torch.testing.assert_close(stages[:, :64], layer1)
    torch.testing.assert_close(stages[:, -512:], last)


@pytest.mark.parametrize(("name", "factory"), [("resnet50", resnet50), ("resnet18", resnet18)])
def test_resnet_layout_is_monais_torchvision_compatible_configuration(name, factory):
    ours = build_backbone(name=name, spatial_dims=2)
    monai_net = factory(
        spatial_dims=2,
        feed_forward=False,
        bias_downsample=False,
        conv1_t_stride=2,
        conv1_t_size=7,
        n_input_channels=3,
    )
    expected = {k: v.shape for k, v in monai_net.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected
    assert ours.conv1.stride == (2, 2)


def test_densenet_has_no_classification_head():
    net = build_backbone(name="densenet121", spatial_dims=2)
    assert not any(key.startswith("class_layers") for key in net.state_dict())


def test_in_channels_sets_the_stem():
    net = build_backbone(name="resnet18", spatial_dims=3, in_channels=1)
    assert net.conv1.weight.shape == (64, 1, 7, 7, 7)


def test_invalid_options_are_rejected_with_the_valid_values():
    with pytest.raises(ValueError, match="'resnet34' is not a valid value") as info:
        build_backbone(name="resnet34", spatial_dims=2)
    assert all(f"'{name}'" in str(info.value) for name in ("resnet18", "resnet50", "densenet121"))
    with pytest.raises(ValueError, match=r"(?s)'1' is not a valid value.*\{2, 3\}"):
        build_backbone(name="resnet50", spatial_dims=1)
    with pytest.raises(ValueError, match="only available for the ResNet backbones"):
        build_backbone(name="densenet121", spatial_dims=2, multi_stage=True)


def test_fmcib_trunk_is_monais_resnet50_with_fmcibs_hyper_parameters():
    # fmcib/models/resnet50.py: resnet50(n_input_channels=1, widen_factor=2, conv1_t_stride=2,
    # feed_forward=False); MONAI's defaults otherwise (bias_downsample=True, shortcut B).
    ours = build_backbone(name="fmcib_resnet50", spatial_dims=3, in_channels=1)
    reference = resnet50(n_input_channels=1, widen_factor=2, conv1_t_stride=2, feed_forward=False,
                         bias_downsample=True, shortcut_type="B", conv1_t_size=7)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}
    assert ours.embedding_dim == 4096
    assert ours.conv1.stride == (2, 2, 2)
    with pytest.raises(ValueError, match="fmcib_resnet50 exists only with spatial_dims"):
        build_backbone(name="fmcib_resnet50", spatial_dims=2, in_channels=1)


@pytest.mark.parametrize(
    ("name", "spatial_dims", "multi_stage", "in_channels", "left"),
    [
        ("resnet50", 2, False, 3, 0),
        ("resnet50", 2, True, 3, 0),
        ("resnet18", 3, False, 3, 0),
        ("fmcib_resnet50", 3, False, 1, 0),
        ("densenet121", 2, False, 3, 62),  # pre-activation norms precede their convolutions
    ],
)
def test_folded_batch_norms_give_the_same_features(name, spatial_dims, multi_stage,
                                                   in_channels, left):
    from pdl1exp.features.extractor import DeepFeatureExtractor

    torch.manual_seed(0)
    net = build_backbone(name=name, spatial_dims=spatial_dims, in_channels=in_channels,
                         multi_stage=multi_stage)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:  # trained-looking statistics, so that folding has work to do
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-0.2, 0.2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    kwargs = {"mean": [0.5] * in_channels, "std": [0.25] * in_channels}
    plain = DeepFeatureExtractor(net, **kwargs)
    folded = DeepFeatureExtractor(net, fold_batch_norm=True, **kwargs)
    folded.on_predict_start()
    remaining = [m for m in folded.backbone.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(remaining) == left < len(norms)
    x = torch.rand(2, in_channels, *([32 if spatial_dims == 2 else 24] * spatial_dims))
    with torch.inference_mode():
        a, b = plain(x), folded(x)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99999
    assert not torch.equal(a, b) or left == len(norms)
    # the caller's network is untouched: still its norms, still its weights
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
