"""The anisotropic 3D ResNet encoder of AH-Net, mirroring a 2D ResNet key for key.

Every 2D k x k conv becomes (1, k, k) over (D, H, W); the stem's 3 input channels (slices z-1, z, z+1) become
a (3, 7, 7) kernel over one input channel. z is halved (max-pool (2, 1, 1)) at the levels the schedule
names: after the stem conv, in the max-pool (then 3x3x3 stride 2, as the authors), and in the first block of
layer2..layer4 (on both the residual and the shortcut paths). With no z halving the encoder computes, at
every slice, exactly what the 2D encoder computes on that slice's 3-slice stack.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from ahnet.nets.blocks import checkpointed
from ahnet.nets.pooling import DepthMaxPool, MaxPool3d
from ahnet.nets.resnet import EXPANSION, RESNET_SPECS, STAGE_WIDTHS, parse_encoder, stage_channels
from ahnet.nets.sizes import NUM_LEVELS


def _zpool(enabled: bool) -> nn.Module:
    return DepthMaxPool() if enabled else nn.Identity()


class _Shortcut(nn.Sequential):
    """conv (stride in-plane) -> optional z max-pool -> BN; indices 0 and 1 as torchvision's downsample."""

    def __init__(self, inplanes: int, outplanes: int, stride: int, pool_z: bool):
        super().__init__(nn.Conv3d(inplanes, outplanes, 1, (1, stride, stride), bias=False),
                         nn.BatchNorm3d(outplanes))
        self.zpool = _zpool(pool_z)

    def forward(self, x):
        return self[1](self.zpool(self[0](x)))


class BasicBlock3d(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 pool_z: bool = False):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(planes, planes, (1, 3, 3), 1, (0, 1, 1), bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.zpool = _zpool(pool_z)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.zpool(self.bn2(self.conv2(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class Bottleneck3d(nn.Module):
    """1x1x1 -> (1, 3, 3) (in-plane stride) -> 1x1x1, the authors' "Bottleneck3x3x1"."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 pool_z: bool = False):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.zpool = _zpool(pool_z)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.zpool(self.bn3(self.conv3(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet3dEncoder(nn.Module):
    """forward(x): (N, in_channels, D, H, W) -> 6 features
    [stem (64, H/2), pool (64, H/4, after the max-pool), layer1 (H/4), layer2 (H/8), layer3 (H/16), layer4 (H/32)];
    D is divided by 2 at each level whose z_flags entry is True (levels: stem, max-pool, layer2..4).
    checkpoint (attribute, default False): activation checkpointing of the stem and of each of layer1..layer4
    in training (recomputed in backward; same outputs and gradients, less memory, more time).
    """

    def __init__(self, depth: int = 50, in_channels: int = 1, z_flags: Sequence[bool] = (True,) * NUM_LEVELS):
        super().__init__()
        depth = parse_encoder(depth)
        kind, blocks = RESNET_SPECS[depth]
        if len(z_flags) != NUM_LEVELS:
            raise ValueError(f"z_flags needs {NUM_LEVELS} entries; got {len(z_flags)}")
        self.depth, self.kind, self.in_channels = depth, kind, in_channels
        self.z_flags = tuple(bool(f) for f in z_flags)
        block = Bottleneck3d if kind == "bottleneck" else BasicBlock3d
        self.conv1 = nn.Conv3d(in_channels, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False)
        self.stem_zpool = _zpool(self.z_flags[0])
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        if self.z_flags[1]:
            self.maxpool = MaxPool3d(3, 2, 1)
        else:
            self.maxpool = MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        inplanes = 64
        for i, (planes, n) in enumerate(zip(STAGE_WIDTHS, blocks)):
            stride = 1 if i == 0 else 2
            pool_z = i > 0 and self.z_flags[i + 1]
            outplanes = planes * EXPANSION[kind]
            downsample = None
            if stride != 1 or inplanes != outplanes or pool_z:
                downsample = _Shortcut(inplanes, outplanes, stride, pool_z)
            layers = [block(inplanes, planes, stride, downsample, pool_z)]
            inplanes = outplanes
            layers += [block(inplanes, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.out_channels = stage_channels(depth)
        self.checkpoint = False
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stem(self, x):
        return self.relu(self.bn1(self.stem_zpool(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.checkpoint and self.training:
            stem = checkpointed(self._stem, [self.bn1], x)
            feats = [stem, self.maxpool(stem)]
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                feats.append(checkpointed(layer, [layer], feats[-1]))
            return feats
        stem = self._stem(x)
        pooled = self.maxpool(stem)
        f1 = self.layer1(pooled)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [stem, pooled, f1, f2, f3, f4]
