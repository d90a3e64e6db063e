"""Tests of backbone weight loading: torchvision layouts, tags, errors, seeded random."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pytest
import torch
from monai.networks.nets import resnet50
from safetensors.torch import save_file
from torch.nn.functional import adaptive_avg_pool2d, batch_norm, conv2d, max_pool2d, relu

from pdl1exp.features.backbones import build_backbone
from pdl1exp.features.weights import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NEUTRAL_MEAN,
    NEUTRAL_STD,
    RAW_MEAN,
    RAW_STD,
    input_normalisation,
    load_weights,
)
from tests.conftest import fmcib_checkpoint, fmcib_trunk

BOTTLENECK_LAYERS = (3, 4, 6, 3)  # torchvision resnet50
BASIC_LAYERS = (2, 2, 2, 2)  # torchvision resnet18
STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
BN_EPS = 1e-5  # torch.nn.BatchNorm default, as in torchvision and MONAI


def _bn_shapes(prefix: str, channels: int) -> dict[str, list[int]]:
    stats = {f"{prefix}.{name}": [channels] for name in ("weight", "bias")}
    stats |= {f"{prefix}.{name}": [channels] for name in ("running_mean", "running_var")}
    return stats | {f"{prefix}.num_batches_tracked": []}


def torchvision_resnet_shapes(*, layers: tuple[int, ...], bottleneck: bool) -> dict[str, list[int]]:
    """Key names and shapes of torchvision's resnet18/resnet50 ``state_dict()``, in order."""
    expansion = 4 if bottleneck else 1
    shapes = {"conv1.weight": [64, 3, 7, 7], **_bn_shapes("bn1", 64)}
    in_planes = 64
    for k, (blocks, width) in enumerate(zip(layers, STAGE_WIDTHS, strict=True), start=1):
        for i in range(blocks):
            prefix = f"layer{k}.{i}"
            if bottleneck:
                convs = [(width, in_planes, 1), (width, width, 3), (width * expansion, width, 1)]
            else:
                convs = [(width, in_planes, 3), (width, width, 3)]
            for j, (out_ch, in_ch, size) in enumerate(convs, start=1):
                shapes[f"{prefix}.conv{j}.weight"] = [out_ch, in_ch, size, size]
                shapes |= _bn_shapes(f"{prefix}.bn{j}", out_ch)
            if i == 0 and (k > 1 or in_planes != width * expansion):
                shapes[f"{prefix}.downsample.0.weight"] = [width * expansion, in_planes, 1, 1]
                shapes |= _bn_shapes(f"{prefix}.downsample.1", width * expansion)
            in_planes = width * expansion
    return shapes | {"fc.weight": [1000, in_planes], "fc.bias": [1000]}


def torchvision_densenet121_shapes(*, legacy: bool) -> dict[str, list[int]]:
    """Key names and shapes of torchvision's densenet121; ``legacy`` uses ``norm.1`` names."""
    growth, bottleneck = 32, 128
    shapes = {"features.conv0.weight": [64, 3, 7, 7], **_bn_shapes("features.norm0", 64)}
    channels = 64
    for b, n_layers in enumerate((6, 12, 24, 16), start=1):
        for n in range(1, n_layers + 1):
            prefix = f"features.denseblock{b}.denselayer{n}"
            sep = "." if legacy else ""
            shapes |= _bn_shapes(f"{prefix}.norm{sep}1", channels)
            shapes[f"{prefix}.conv{sep}1.weight"] = [bottleneck, channels, 1, 1]
            shapes |= _bn_shapes(f"{prefix}.norm{sep}2", bottleneck)
            shapes[f"{prefix}.conv{sep}2.weight"] = [growth, bottleneck, 3, 3]
            channels += growth
        if b < 4:
            shapes |= _bn_shapes(f"features.transition{b}.norm", channels)
            shapes[f"features.transition{b}.conv.weight"] = [channels // 2, channels, 1, 1]
            channels //= 2
    shapes |= _bn_shapes("features.norm5", channels)
    return shapes | {"classifier.weight": [1000, channels], "classifier.bias": [1000]}


def random_state(shapes: dict[str, list[int]], *, seed: int) -> dict[str, torch.Tensor]:
    """Seeded values of torchvision's dtypes; He-scaled convs keep deep activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith(("running_mean", "bias")):
            state[key] = 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:  # BatchNorm scale
            state[key] = 0.5 + 0.5 * torch.rand(shape, generator=gen)
        else:
            fan_in = torch.Size(shape[1:]).numel()
            state[key] = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
    return state


def _bn(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return batch_norm(
        x,
        sd[f"{prefix}.running_mean"],
        sd[f"{prefix}.running_var"],
        sd[f"{prefix}.weight"],
        sd[f"{prefix}.bias"],
        training=False,
        eps=BN_EPS,
    )


def reference_resnet50(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet50 (v1.5: stride on the 3x3 conv) up to the pooled embedding."""
    x = relu(_bn(conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1"))
    x = max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for k, (blocks, stride) in enumerate(zip(BOTTLENECK_LAYERS, STAGE_STRIDES, strict=True), 1):
        for i in range(blocks):
            p = f"layer{k}.{i}"
            s = stride if i == 0 else 1
            out = relu(_bn(conv2d(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
            out = conv2d(out, sd[f"{p}.conv2.weight"], stride=s, padding=1)
            out = relu(_bn(out, sd, f"{p}.bn2"))
            out = _bn(conv2d(out, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
            if i == 0:
                shortcut = conv2d(x, sd[f"{p}.downsample.0.weight"], stride=s)
                x = _bn(shortcut, sd, f"{p}.downsample.1")
            x = relu(out + x)
    return adaptive_avg_pool2d(x, 1).flatten(1)


def _sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@pytest.fixture(scope="module")
def resnet50_torchvision() -> dict[str, torch.Tensor]:
    shapes = torchvision_resnet_shapes(layers=BOTTLENECK_LAYERS, bottleneck=True)
    return random_state(shapes, seed=11)


@pytest.fixture(scope="module")
def resnet18_torchvision() -> dict[str, torch.Tensor]:
    return random_state(torchvision_resnet_shapes(layers=BASIC_LAYERS, bottleneck=False), seed=5)


def test_torchvision_resnet50_matches_reference_forward(tmp_path, resnet50_torchvision):
    path = tmp_path / "resnet50_tv.pth"
    torch.save(resnet50_torchvision, path)
    net = build_backbone(name="resnet50", spatial_dims=2)
    tag = load_weights(net, weights=str(path), seed=0, arch="resnet50")
    assert tag == f"file:{_sha12(path)}"

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sd64 = {k: v.double() for k, v in resnet50_torchvision.items()}
    with torch.no_grad():
        ours = net.double().eval()(x)
        reference = reference_resnet50(sd64, x)
    assert ours.shape == (2, 2048)
    assert reference.abs().max() > 0.1  # a vanishing embedding would make the match vacuous
    assert (ours - reference).abs().max() < 1e-9

    # MONAI's default stem stride 1 loads the same keys strictly but computes other features.
    stride1 = resnet50(
        spatial_dims=2, feed_forward=False, bias_downsample=False, conv1_t_stride=1, conv1_t_size=7
    )
    load_weights(stride1, weights=str(path), seed=0, arch="resnet50")
    with torch.no_grad():
        other = stride1.double().eval()(x)
    assert (other - reference).abs().max() > 1e-2


def test_safetensors_round_trip_and_wrappers(tmp_path, resnet18_torchvision):
    st_path = tmp_path / "r18.safetensors"
    save_file(resnet18_torchvision, st_path)
    net = build_backbone(name="resnet18", spatial_dims=2)
    assert load_weights(net, weights=str(st_path), seed=0, arch="resnet18") == (
        f"file:{_sha12(st_path)}"
    )
    loaded = net.state_dict()
    for key, value in resnet18_torchvision.items():
        if not key.startswith("fc."):
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)

    wrapped = tmp_path / "r18_ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet18_torchvision.items()}}, wrapped)
    other = build_backbone(name="resnet18", spatial_dims=2)
    load_weights(other, weights=str(wrapped), seed=0, arch="resnet18")
    torch.testing.assert_close(other.state_dict(), loaded, rtol=0, atol=0)


@pytest.mark.parametrize("legacy", [False, True])
def test_torchvision_densenet121_layout_loads_strictly(tmp_path, legacy):
    state = random_state(torchvision_densenet121_shapes(legacy=legacy), seed=2)
    if legacy:  # checkpoints older than PyTorch 0.4.1 have no BatchNorm step counters
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "densenet121.pth"
    torch.save(state, path)
    net = build_backbone(name="densenet121", spatial_dims=2)
    load_weights(net, weights=str(path), seed=0, arch="densenet121")
    sep = "." if legacy else ""
    source = state[f"features.denseblock3.denselayer7.conv{sep}2.weight"]
    target = net.features.denseblock3.denselayer7.layers.conv2.weight
    torch.testing.assert_close(target, source, rtol=0, atol=0)


def test_mismatched_checkpoint_lists_offending_keys(tmp_path, resnet18_torchvision):
    state = dict(resnet18_torchvision)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    del state["layer4.1.bn2.running_var"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    net = build_backbone(name="resnet18", spatial_dims=2)
    with pytest.raises(ValueError, match="do not fit the resnet18 backbone") as info:
        load_weights(net, weights=str(path), seed=0, arch="resnet18")
    message = str(info.value)
    assert str(path) in message
    assert "missing keys (1): layer4.1.bn2.running_var" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "layer1.0.conv1.weight: checkpoint [64, 64, 1, 1] vs network [64, 64, 3, 3]" in message


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_file_error_names_the_file(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(bytes(range(256)) * 8)
    net = build_backbone(name="resnet18", spatial_dims=2)
    with pytest.raises(ValueError, match="cannot read checkpoint") as info:
        load_weights(net, weights=str(path), seed=0, arch="resnet18")
    assert str(path) in str(info.value)


def test_missing_file_and_bad_suffix(tmp_path):
    net = build_backbone(name="resnet18", spatial_dims=2)
    with pytest.raises(FileNotFoundError, match="neither one of auto, imagenet, random"):
        load_weights(net, weights=str(tmp_path / "absent.pth"), seed=0, arch="resnet18")
    npz = tmp_path / "weights.npz"
    npz.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"must end in one of \.pth, \.pt, \.safetensors"):
        load_weights(net, weights=str(npz), seed=0, arch="resnet18")


def test_auto_without_cached_checkpoint_falls_back_to_seeded_random(tmp_path):
    net = build_backbone(name="resnet18", spatial_dims=2)
    with pytest.warns(UserWarning, match="UNTRAINED network with random weights"):
        tag = load_weights(net, weights="auto", seed=42, arch="resnet18", hub_dir=tmp_path)
    assert tag == "random:42"
    with pytest.raises(FileNotFoundError, match=r"resnet18-f37072fd\.pth"):
        load_weights(net, weights="imagenet", seed=42, arch="resnet18", hub_dir=tmp_path)


@pytest.mark.parametrize("weights", ["auto", "imagenet"])
def test_cached_imagenet_checkpoint_is_found_offline(tmp_path, resnet18_torchvision, weights):
    cached = tmp_path / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir()
    torch.save(resnet18_torchvision, cached)
    net = build_backbone(name="resnet18", spatial_dims=2)
    # A stand-in file cannot carry the published hash; the loader must say so.
    with pytest.warns(UserWarning, match="not the published torchvision file"):
        tag = load_weights(net, weights=weights, seed=0, arch="resnet18", hub_dir=tmp_path)
    assert tag == f"imagenet:{_sha12(cached)}"
    torch.testing.assert_close(net.conv1.weight, resnet18_torchvision["conv1.weight"])


def test_imagenet_is_a_config_error_in_3d(tmp_path):
    net = build_backbone(name="resnet18", spatial_dims=3)
    with pytest.raises(ValueError, match="weights=imagenet needs a 2D network"):
        load_weights(net, weights="imagenet", seed=0, arch="resnet18", hub_dir=tmp_path)
    with pytest.warns(UserWarning, match="spatial_dims=3"):
        assert load_weights(net, weights="auto", seed=1, arch="resnet18") == "random:1"


def test_random_weights_are_reproducible_per_seed():
    nets = [build_backbone(name="resnet18", spatial_dims=2) for _ in range(3)]
    before = torch.random.get_rng_state()
    tags = [
        load_weights(n, weights="random", seed=s, arch="resnet18")
        for n, s in zip(nets, [7, 7, 8], strict=True)
    ]
    assert tags == ["random:7", "random:7", "random:8"]
    assert torch.equal(torch.random.get_rng_state(), before)  # caller's RNG untouched
    first, same, other = (n.state_dict() for n in nets)
    torch.testing.assert_close(first, same, rtol=0, atol=0)
    assert not torch.equal(first["layer2.0.conv1.weight"], other["layer2.0.conv1.weight"])
    # Seeded random is MONAI's own initialisation, not a flat or default one.
    std = first["layer3.1.conv2.weight"].std().item()
    assert std == pytest.approx((2.0 / (256 * 3 * 3)) ** 0.5, rel=0.05)


def test_input_normalisation_follows_the_weights():
    assert input_normalisation("imagenet:0123456789ab") == (IMAGENET_MEAN, IMAGENET_STD)
    assert input_normalisation("file:0123456789ab") == (IMAGENET_MEAN, IMAGENET_STD)
    assert input_normalisation("random:0") == (NEUTRAL_MEAN, NEUTRAL_STD)
    # FMCIB was trained on the [0, 1] window itself; its random trunk is neutral.
    assert input_normalisation("file:0123456789ab", arch="fmcib_resnet50") == (RAW_MEAN, RAW_STD)
    assert input_normalisation("random:0", arch="fmcib_resnet50") == (NEUTRAL_MEAN, NEUTRAL_STD)
    with pytest.raises(ValueError, match="imagenet"):
        input_normalisation("medicalnet:0")


def test_fmcib_checkpoint_loads_strictly(tmp_path):
    torch.manual_seed(7)
    trunk = fmcib_trunk()
    path = fmcib_checkpoint(tmp_path / "fmcib.torch", trunk.state_dict())
    net = build_backbone(name="fmcib_resnet50", spatial_dims=3, in_channels=1)
    tag = load_weights(net, weights=str(path), seed=0, arch="fmcib_resnet50")
    assert tag == f"file:{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    for key, value in trunk.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(net.eval()(x), trunk.eval()(x))


def test_fmcib_checkpoint_that_does_not_fit_lists_the_keys(tmp_path):
    state = fmcib_trunk().state_dict()
    bias = state.pop("layer2.0.downsample.0.bias")  # a trunk without bias_downsample
    state["layer9.extra"] = bias
    state["conv1.weight"] = torch.zeros(128, 3, 7, 7, 7)  # three input channels
    path = fmcib_checkpoint(tmp_path / "fmcib.torch", state)
    net = build_backbone(name="fmcib_resnet50", spatial_dims=3, in_channels=1)
    with pytest.raises(ValueError, match="fit the fmcib_resnet50 backbone") as info:
        load_weights(net, weights=str(path), seed=0, arch="fmcib_resnet50")
    message = str(info.value)
    assert "trunk_state_dict" in message
    assert "missing keys (1): layer2.0.downsample.0.bias" in message
    assert "unexpected keys (1): layer9.extra" in message
    assert "conv1.weight: checkpoint [128, 3, 7, 7, 7] vs network [128, 1, 7, 7, 7]" in message


def test_explicit_random_emits_no_warning():
    net = build_backbone(name="resnet18", spatial_dims=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_weights(net, weights="random", seed=3, arch="resnet18") == "random:3"
