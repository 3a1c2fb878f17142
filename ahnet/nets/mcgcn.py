"""The 2D multi-channel global convolution network (MC-GCN) of the paper's first stage.

Input: 3 adjacent slices (z-1, z, z+1) as the 3 channels of an ImageNet-style ResNet, straight into the stem,
which the transfer maps onto the 3D stem's z taps (the authors' MCFCN always puts a 1x1 conv + BN + ReLU in
front, which no 7x7x3 stem can absorb); an N-slice variant maps N slices to 3 with that 1x1 conv + BN + ReLU
first (that variant cannot be transferred exactly to 3D).
Decoder: global convolution (GCN) modules on the stride-32, -16, -8, -4 (max-pooled stem) and -2 (stem)
features, residual boundary refinement, and a top-down path to full resolution. Decoder convs start from He
normal (gain sqrt(2) where the conv reads a ReLU output, 1 for the second conv of a GCN branch, which reads a
linear one), biases 0; the encoder from the ResNet initialisation or ImageNet weights.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ahnet.nets.blocks import he_normal_
from ahnet.nets.resnet import ResNet2d, parse_encoder
from ahnet.nets.sizes import check_input

UPSAMPLE_2D = ("nearest", "bilinear", "bicubic")


class GlobalConv(nn.Module):
    """Large separable kernel: (k x 1 then 1 x k) + (1 x k then k x 1), straight to `cout` channels."""

    def __init__(self, cin: int, cout: int, k: int = 7):
        super().__init__()
        if k < 1 or k % 2 == 0:
            raise ValueError(f"gcn_kernel must be a positive odd number; got {k}")
        p = k // 2
        self.left = nn.Sequential(nn.Conv2d(cin, cout, (k, 1), padding=(p, 0)),
                                  nn.Conv2d(cout, cout, (1, k), padding=(0, p)))
        self.right = nn.Sequential(nn.Conv2d(cin, cout, (1, k), padding=(0, p)),
                                   nn.Conv2d(cout, cout, (k, 1), padding=(p, 0)))
        for branch in (self.left, self.right):
            he_normal_(branch[0], relu_input=True)     # reads the encoder's ReLU features
            he_normal_(branch[1], relu_input=False)    # reads the first conv's linear output

    def forward(self, x):
        return self.left(x) + self.right(x)


class BoundaryRefine(nn.Module):
    """x + conv3x3(ReLU(BN(conv3x3(ReLU(BN(x)))))); the inner conv has no bias (the BN after it cancels one).

    Two BNs, one per use: the authors share one, whose running statistics then mix the two inputs' and fit
    neither in eval mode (paper_notes/architecture.md).
    """

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=False), nn.Conv2d(c, c, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, padding=1))
        he_normal_(self.body[2])
        he_normal_(self.body[5])

    def forward(self, x):
        return x + self.body(x)


class MCGCN(nn.Module):
    """forward(x): (N, in_slices, H, W) -> logits (N, out_channels, H, W); H and W multiples of 32.

    The encoder lives under `encoder` with torchvision's ResNet keys (the part the transfer carries to 3D).
    """

    def __init__(self, encoder: str = "resnet50", in_slices: int = 3, out_channels: int = 1, gcn_kernel: int = 7,
                 upsample: str = "bilinear"):
        super().__init__()
        depth = parse_encoder(encoder)
        if in_slices < 1 or out_channels < 1:
            raise ValueError(f"in_slices and out_channels must be >= 1; got {in_slices}, {out_channels}")
        if upsample not in UPSAMPLE_2D:
            raise ValueError(f"upsample must be one of {', '.join(UPSAMPLE_2D)}; got {upsample!r}")
        self.config: Dict = dict(encoder=f"resnet{depth}", in_slices=in_slices, out_channels=out_channels,
                                 gcn_kernel=gcn_kernel, upsample=upsample)
        self.in_slices, self.out_channels, self.upsample = in_slices, out_channels, upsample
        self.input_multiple = (32, 32)
        # N slices -> 3 channels; absent for the paper's 3-slice input, which feeds the ResNet stem directly.
        self.slice_projection = None
        if in_slices != 3:
            self.slice_projection = nn.Sequential(nn.Conv2d(in_slices, 3, 1, bias=False), nn.BatchNorm2d(3),
                                                  nn.ReLU(inplace=True))
        self.encoder = ResNet2d(depth, 3)
        c_stem, _, c2, c3, c4 = self.encoder.out_channels
        # GCN taps: layer4, layer3, layer2, max-pooled stem, stem (layer1 is not tapped, as the authors).
        self.gcn = nn.ModuleList([GlobalConv(c, out_channels, gcn_kernel) for c in (c4, c3, c2, c_stem, c_stem)])
        self.refine_lateral = nn.ModuleList([BoundaryRefine(out_channels) for _ in range(5)])
        self.refine_topdown = nn.ModuleList([BoundaryRefine(out_channels) for _ in range(5)])

    def _up(self, x, size):
        # align_corners=False (the authors: True): the same half-pixel offset at every map size and position
        kw = {} if self.upsample == "nearest" else {"align_corners": False}
        return F.interpolate(x, size=tuple(size), mode=self.upsample, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.input_multiple, self.in_slices, type(self).__name__)
        size = x.shape[2:]
        if self.slice_projection is not None:
            x = self.slice_projection(x)
        stem, pooled, _, f2, f3, f4 = self.encoder(x)
        lateral = [r(g(f)) for f, g, r in zip((f4, f3, f2, pooled, stem), self.gcn, self.refine_lateral)]
        y = lateral[0]
        for skip, refine in zip(lateral[1:], self.refine_topdown[:4]):
            y = refine(self._up(y, skip.shape[2:]) + skip)
        return self.refine_topdown[4](self._up(y, size))
