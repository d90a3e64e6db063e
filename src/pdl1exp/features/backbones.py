"""MONAI feature backbones whose forward returns the pooled deep-feature embedding.

``fmcib_resnet50`` is the trunk of FMCIB (Pai et al., Nat Mach Intell 2024), verified against
AIM-Harvard/foundation-cancer-image-biomarker (commit 02a320e2):
``fmcib/models/resnet50.py`` line 15 builds it as ``monai.networks.nets.resnet50(
pretrained=False, n_input_channels=1, widen_factor=2, conv1_t_stride=2, feed_forward=False)``;
everything else is MONAI's ``ResNet`` default (``conv1_t_size=7``, max pool, ``shortcut_type="B"``,
``bias_downsample=True``, which its checkpoint's ``layer*.0.downsample.0.bias`` keys require).
Lines 26-27 read the weights from the checkpoint's ``trunk_state_dict``. Its embedding is
``2048 * widen_factor`` = 4096. The preprocessing it expects is documented in
:mod:`pdl1exp.imaging.crop` (``seed_patch_3d``) and ``conf/preprocess/fmcib.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.nets import DenseNet121, ResNet
from monai.networks.nets.resnet import get_inplanes, resnet_params
from monai.utils import look_up_option

__all__ = ["BACKBONES", "DenseNetBackbone", "ResNetBackbone", "build_backbone"]

BACKBONES = ("resnet18", "resnet50", "densenet121", "fmcib_resnet50")
SPATIAL_DIMS = (2, 3)


@dataclass(frozen=True)
class _ResNetLayout:
    """How a published ResNet checkpoint family builds MONAI's ``ResNet``."""

    depth: str
    widen_factor: float
    bias_downsample: bool
    spatial_dims: tuple[int, ...] = SPATIAL_DIMS


# torchvision (ImageNet): conv+BN shortcuts without bias. FMCIB: MONAI's defaults, widened x2.
_RESNET_LAYOUTS = {
    "resnet18": _ResNetLayout("resnet18", widen_factor=1.0, bias_downsample=False),
    "resnet50": _ResNetLayout("resnet50", widen_factor=1.0, bias_downsample=False),
    "fmcib_resnet50": _ResNetLayout("resnet50", widen_factor=2.0, bias_downsample=True,
                                    spatial_dims=(3,)),
}


class ResNetBackbone(ResNet):
    """MONAI ResNet laid out like its checkpoints' networks, returning the pooled embedding.

    ``resnet18``/``resnet50``: same parameters and key names as ``monai.networks.nets.resnet50(
    spatial_dims=..., feed_forward=False, bias_downsample=False, conv1_t_stride=2,
    conv1_t_size=7)``, the configuration under which torchvision ImageNet checkpoints load
    strictly and give the same features. ``fmcib_resnet50``: FMCIB's trunk (module docstring).

    Args:
        arch: ``"resnet18"``, ``"resnet50"`` or ``"fmcib_resnet50"``.
        spatial_dims: 2 for slices, 3 for volumes.
        in_channels: input channels of the stem convolution.
        multi_stage: return the concatenated global-average-pooled outputs of layer1..layer4
            (as ``monai.networks.nets.ResNetFeatures`` exposes them) instead of layer4 only.
    """

    def __init__(
        self, *, arch: str, spatial_dims: int, in_channels: int, multi_stage: bool
    ) -> None:
        # The shortcut/bias entries of MONAI's table describe MedicalNet checkpoints; ours come
        # from the layout of the checkpoints each arch loads.
        layout = _RESNET_LAYOUTS[arch]
        if spatial_dims not in layout.spatial_dims:
            msg = (f"{arch} exists only with spatial_dims in {layout.spatial_dims}, "
                   f"got {spatial_dims}")
            raise ValueError(msg)
        block, layers, *_ = resnet_params[layout.depth]
        super().__init__(
            block=block,
            layers=layers,
            block_inplanes=get_inplanes(),
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            widen_factor=layout.widen_factor,
            feed_forward=False,
            bias_downsample=layout.bias_downsample,
        )
        self.multi_stage = multi_stage
        stage_dims = [int(planes * layout.widen_factor) * self.layer1[0].expansion
                      for planes in get_inplanes()]
        self.embedding_dim = sum(stage_dims) if multi_stage else stage_dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch ``(B, C, *spatial)`` into ``(B, embedding_dim)``."""
        if not self.multi_stage:
            return super().forward(x)
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        pooled = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            pooled.append(self.avgpool(x).flatten(1))
        return torch.cat(pooled, dim=1)


class DenseNetBackbone(DenseNet121):
    """MONAI DenseNet121 without its linear head: ReLU, global average pool, flatten.

    Args:
        spatial_dims: 2 for slices, 3 for volumes.
        in_channels: input channels of the stem convolution.
    """

    def __init__(self, *, spatial_dims: int, in_channels: int) -> None:
        # out_channels only sizes the linear head, which is removed right after.
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1)
        del self.class_layers.out
        self.embedding_dim = self.features.norm5.num_features


def build_backbone(
    *, name: str, spatial_dims: int, in_channels: int = 3, multi_stage: bool = False
) -> ResNetBackbone | DenseNetBackbone:
    """Build a backbone whose forward gives ``(B, embedding_dim)`` deep features.

    Embedding sizes: resnet50 2048 (multi-stage 256+512+1024+2048 = 3840), resnet18 512
    (multi-stage 960), densenet121 1024, fmcib_resnet50 4096 (3D only; multi-stage 7680).
    Weights are MONAI's initialisation until
    :func:`pdl1exp.features.weights.load_weights` replaces them.

    Args:
        name: architecture, one of ``BACKBONES`` (the ``arch`` key of ``conf/backbone``).
        spatial_dims: 2 or 3.
        in_channels: input channels; ImageNet checkpoints need 3, FMCIB's 1.
        multi_stage: concatenate the pooled outputs of every ResNet stage.
    """
    name = look_up_option(name, BACKBONES)
    spatial_dims = look_up_option(spatial_dims, SPATIAL_DIMS)
    if name == "densenet121":
        if multi_stage:
            msg = "multi_stage=True is only available for the ResNet backbones, not densenet121"
            raise ValueError(msg)
        return DenseNetBackbone(spatial_dims=spatial_dims, in_channels=in_channels)
    return ResNetBackbone(
        arch=name, spatial_dims=spatial_dims, in_channels=in_channels, multi_stage=multi_stage
    )
