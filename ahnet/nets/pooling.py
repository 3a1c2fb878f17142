"""Max pooling that keeps its input's dtype under autocast.

CPU autocast runs max pooling in float32: a bfloat16 input comes out float32. The maximum of bfloat16 values is a
bfloat16 value, so nothing is gained, and in AH-Net the float32 result spreads: the pooled stem, the z-pooled
stages and every skip connection added to them turn the decoder float32, doubling its activation memory and
slowing it (paper_notes/performance.md). These pools run with autocast off, in the input's own dtype: the same
values and gradients as float32 pooling of the same inputs, in float32 runs the same op as nn.MaxPool*d.

``DepthMaxPool`` halves the depth (the encoder's z-pooling, a (2, 1, 1) max-pool) as a comparison of the even and
odd slices: the same values and gradients as max_pool3d, for a tenth of the memory kept for backward (below).

``grid_max_pool`` is the pyramid's block pooling written as a reshape and a maximum, for exported graphs (below).
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


class DepthMaxPool(nn.Module):
    """(N, C, D, H, W) -> (N, C, D // 2, H, W): the maximum of slices 2k and 2k + 1, as nn.MaxPool3d((2, 1, 1)) gives
    it (an odd last slice dropped), in x's dtype, with the same gradient: to the first of two equal values, as
    max-pooling's first-index rule, and NaN wins, as there.

    Why: max_pool3d keeps its input and an int64 index per output value for backward (for the stem of a
    32 x 128 x 128 patch: 16 MiB of bf16 input and 32 MiB of indices); this keeps one bool per output value
    (4 MiB there), the choice of ``torch.where``. Where nothing is kept (no grad: inference) max_pool3d is
    faster, and runs instead.
    """

    def forward(self, x):
        if not (torch.is_grad_enabled() and x.requires_grad):
            with _no_autocast(x):
                return F.max_pool3d(x, (2, 1, 1))
        d = x.shape[2] - x.shape[2] % 2
        a, b = x[:, :, 0:d:2], x[:, :, 1:d:2]
        return torch.where((b > a) | torch.isnan(b), b, a)


def max_pool3d(x: torch.Tensor, kernel) -> torch.Tensor:
    """F.max_pool3d(x, kernel) (stride = kernel) in x's dtype."""
    with _no_autocast(x):
        return F.max_pool3d(x, kernel)


def adaptive_max_pool3d(x: torch.Tensor, size) -> torch.Tensor:
    """F.adaptive_max_pool3d(x, size) in x's dtype."""
    with _no_autocast(x):
        return F.adaptive_max_pool3d(x, size)


def grid_max_pool(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, C, D, H, W) -> (N, C, D, grid, grid): the maximum over each of the grid x grid equal in-plane blocks (H
    and W divisible by ``grid``), by a reshape and ``amax``; the same values as max_pool3d(x, (1, H // grid,
    W // grid)), in x's dtype.

    For exported graphs (torch.export, ONNX): a max-pool kernel is a constant there (ONNX MaxPool's kernel_shape
    is an attribute), so a kernel computed from the input size is frozen at the example's size, while this graph
    keeps the block size symbolic. Not for eager runs: on a CPU it is 2-20x slower than max_pool3d (channels-last
    most), and its gradient splits among tied maxima where max_pool3d's goes to the first.
    """
    n, c, d, h, w = x.shape
    return x.reshape(n, c, d, grid, h // grid, grid, w // grid).amax(dim=(4, 6))
