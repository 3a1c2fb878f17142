"""Converting between this project's layout (N, C, D, H, W) = (z, y, x) and MONAI's slice-last layout.

MONAI's AHNet takes (N, C, X, Y, Z): the spatial axes of a SimpleITK-ordered array reversed. The conversion
is a reversal of the three spatial axes, so it is its own inverse; it applies to conv weights as well.
"""
from __future__ import annotations

import torch


def to_monai_layout(x: torch.Tensor) -> torch.Tensor:
    """(N, C, D, H, W) -> (N, C, W, H, D), i.e. (z, y, x) -> (x, y, z). Also for 5D conv weights."""
    if x.dim() != 5:
        raise ValueError(f"expected a 5D tensor; got shape {tuple(x.shape)}")
    return x.permute(0, 1, 4, 3, 2)


def from_monai_layout(x: torch.Tensor) -> torch.Tensor:
    """(N, C, X, Y, Z) -> (N, C, Z, Y, X); the inverse of to_monai_layout (the same permutation)."""
    return to_monai_layout(x)
