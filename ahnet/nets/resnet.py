"""2D ResNet encoders (18, 34, 50) with torchvision's state-dict keys, and loading a torchvision checkpoint.

No download anywhere: ImageNet weights come from a file the user already has (for example torchvision's
`resnet50-0676ba61.pth` or `resnet50-11ad3fa6.pth`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

from ahnet.nets.pooling import MaxPool2d

#: depth -> (block kind, blocks per stage)
RESNET_SPECS: Dict[int, Tuple[str, Tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
#: the encoder names every option accepts (--encoder), from RESNET_SPECS
ENCODERS = tuple(f"resnet{d}" for d in sorted(RESNET_SPECS))
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}


def parse_encoder(encoder) -> int:
    """'resnet50' | 'resnet34' | 'resnet18' | 50 | 34 | 18 -> depth."""
    name = str(encoder).lower().replace("resnet", "")
    if not name.isdigit() or int(name) not in RESNET_SPECS:
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}; got {encoder!r}")
    return int(name)


def stage_channels(depth: int) -> Tuple[int, int, int, int, int]:
    """Channels of the stem and of layer1..layer4 (the max-pooled stem has the stem's 64)."""
    kind, _ = RESNET_SPECS[depth]
    return (64,) + tuple(w * EXPANSION[kind] for w in STAGE_WIDTHS)


class BasicBlock2d(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class Bottleneck2d(nn.Module):
    """1x1 -> 3x3 (stride here, as torchvision's ResNet v1.5) -> 1x1 (x4 channels)."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet2d(nn.Module):
    """ResNet trunk without the classifier; keys as torchvision's (conv1, bn1, layer1.0.conv1, ...).

    forward(x): (N, in_channels, H, W) -> list of 6 features
        [stem (64, H/2), pool (64, H/4), layer1 (H/4), layer2 (H/8), layer3 (H/16), layer4 (H/32)].
    The stem feature is taken after conv1-bn1-relu, before the max-pool; pool after the max-pool.
    """

    def __init__(self, depth: int = 50, in_channels: int = 3):
        super().__init__()
        depth = parse_encoder(depth)
        kind, blocks = RESNET_SPECS[depth]
        self.depth, self.kind, self.in_channels = depth, kind, in_channels
        block = Bottleneck2d if kind == "bottleneck" else BasicBlock2d
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, n) in enumerate(zip(STAGE_WIDTHS, blocks)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                                           nn.BatchNorm2d(planes * block.expansion))
            layers = [block(inplanes, planes, stride, downsample)]
            inplanes = planes * block.expansion
            layers += [block(inplanes, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.out_channels = stage_channels(depth)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        stem = self.relu(self.bn1(self.conv1(x)))
        pooled = self.maxpool(stem)
        f1 = self.layer1(pooled)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [stem, pooled, f1, f2, f3, f4]


def torchvision_encoder_state(obj: dict) -> dict:
    """The encoder entries of a torchvision-style checkpoint dict: {"state_dict": ...} unwrapped, a DataParallel
    "module." prefix removed, the classifier (fc.*) dropped."""
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def load_torchvision_weights(encoder: ResNet2d, path: str | Path) -> None:
    """Load a torchvision ResNet checkpoint file (state dict, or {"state_dict": ...}) into `encoder`.

    The classifier (fc.*) is ignored. Any other missing or unexpected key, or a shape that differs, fails
    with a message listing them, so a ResNet34 file is never half-loaded into a ResNet50.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise ValueError(f"{path} is not a readable torch state-dict file ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    state = torchvision_encoder_state(state)
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong_shape:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "") or "none"
        raise ValueError(
            f"{path} does not fit a ResNet{encoder.depth} encoder with {encoder.in_channels} input channels: "
            f"missing keys: {show(missing)}; unexpected keys: {show(unexpected)}; "
            f"shape mismatches: {show([f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in wrong_shape])}")
    encoder.load_state_dict(state, strict=True)
