"""A 3D U-Net baseline trained from scratch (the paper's "3D network without transfer" comparison).

Six stages of two (3x3x3 conv - BN - ReLU) units, channels base * 2^i capped at `max_channels` (as nnU-Net),
5 down-samplings that halve H and W and halve D where the z-pooling schedule says (the same schedules as
AH-Net, so both see the same patches), transposed-conv up-sampling, concatenated skips, 1x1x1 output conv.
With base 32 and cap 320 it has about 30 M parameters, comparable to the paper's AH-Net (27 M).
Initialisation as nnU-Net's: He normal on every conv (each reads a ReLU output), biases 0.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn

from ahnet.nets.blocks import count_parameters, he_normal_
from ahnet.nets.pooling import MaxPool3d
from ahnet.nets.sizes import NUM_LEVELS, ZPool, check_input, input_multiple, z_pool_schedule


class ConvUnit(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv3d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
                         nn.Conv3d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class UNet3d(nn.Module):
    """forward(x): (N, in_channels, D, H, W) -> logits (N, out_channels, D, H, W)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 32,
                 max_channels: int = 320, z_pool: ZPool = "paper", spacing: Sequence[float] | None = None):
        super().__init__()
        if in_channels < 1 or out_channels < 1 or base_channels < 1:
            raise ValueError("in_channels, out_channels and base_channels must be >= 1")
        z_flags = z_pool_schedule(z_pool, spacing)
        self.config: Dict = dict(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                                 max_channels=max_channels, z_pool=list(z_flags),
                                 spacing=None if spacing is None else [float(s) for s in spacing])
        self.in_channels, self.out_channels = in_channels, out_channels
        self.z_flags = z_flags
        self.input_multiple = input_multiple(z_flags)
        widths = [min(base_channels * 2 ** i, max_channels) for i in range(NUM_LEVELS + 1)]
        self.down = nn.ModuleList([ConvUnit(in_channels, widths[0])] +
                                  [ConvUnit(widths[i], widths[i + 1]) for i in range(NUM_LEVELS)])
        self.pools = nn.ModuleList([MaxPool3d((2 if f else 1, 2, 2)) for f in z_flags])
        self.ups = nn.ModuleList([nn.ConvTranspose3d(widths[i + 1], widths[i], (2 if z_flags[i] else 1, 2, 2),
                                                     (2 if z_flags[i] else 1, 2, 2), bias=False)
                                  for i in range(NUM_LEVELS)])
        self.up_units = nn.ModuleList([ConvUnit(2 * widths[i], widths[i]) for i in range(NUM_LEVELS)])
        self.out = nn.Conv3d(widths[0], out_channels, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                he_normal_(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.input_multiple, self.in_channels, type(self).__name__)
        skips = []
        for i, unit in enumerate(self.down):
            x = unit(x)
            if i < NUM_LEVELS:
                skips.append(x)
                x = self.pools[i](x)
        for i in reversed(range(NUM_LEVELS)):
            x = self.up_units[i](torch.cat([self.ups[i](x), skips[i]], 1))
        return self.out(x)

    def parameter_counts(self) -> Dict[str, int]:
        return {"total": count_parameters(self)}
