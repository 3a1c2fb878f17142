"""Max pooling that keeps its input's dtype under autocast.

CPU autocast runs max pooling in float32: a bfloat16 input comes out float32. The maximum of bfloat16 values is a
bfloat16 value, so nothing is gained, and in AH-Net the float32 result spreads: the pooled stem, the z-pooled
stages and every skip connection added to them turn the decoder float32, doubling its activation memory and
slowing it (paper_notes/performance.md). These pools run with autocast off, in the input's own dtype: the same
values and gradients as float32 pooling of the same inputs, in float32 runs the same op as nn.MaxPool*d.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _no_autocast(x: torch.Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


class MaxPool2d(nn.MaxPool2d):
    def forward(self, x):
        with _no_autocast(x):
            return super().forward(x)


class MaxPool3d(nn.MaxPool3d):
    def forward(self, x):
        with _no_autocast(x):
            return super().forward(x)


def max_pool3d(x: torch.Tensor, kernel) -> torch.Tensor:
    """F.max_pool3d(x, kernel) (stride = kernel) in x's dtype."""
    with _no_autocast(x):
        return F.max_pool3d(x, kernel)


def adaptive_max_pool3d(x: torch.Tensor, size) -> torch.Tensor:
    """F.adaptive_max_pool3d(x, size) in x's dtype."""
    with _no_autocast(x):
        return F.adaptive_max_pool3d(x, size)
