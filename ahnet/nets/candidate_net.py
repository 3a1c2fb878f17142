"""The second stage's candidate classifier: a small 3D CNN that tells a nodule from a false positive.

Input (N, 2, D, H, W): channel 0 the scan in the lung window scaled to [0, 1], channel 1 the first stage's
probability map, both cropped around one candidate on the scan's own voxel grid (ahnet.infer.second_stage; default
D, H, W = 8, 32, 32: 20 x 22 x 22 mm at 2.5 mm slices and 0.7 mm pixels). Output (N,) logits (> 0: a nodule).
Anisotropic like the scans: the first block convolves in-plane only and the first pooling halves H and W only;
the head sees the mean and the maximum of the last features, so any D, H, W >= 4, 8, 8 works.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["CandidateNet"]


def _block(cin: int, cout: int, kernel) -> nn.Sequential:
    """Conv (same padding, no bias) -> BatchNorm -> ReLU."""
    return nn.Sequential(nn.Conv3d(cin, cout, kernel, padding=tuple(k // 2 for k in kernel), bias=False),
                         nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class CandidateNet(nn.Module):
    """(N, in_channels, D, H, W) crops -> (N,) logits; ``width`` channels in the first blocks, 4 x in the last
    (width 16: 0.19 M parameters)."""

    def __init__(self, in_channels: int = 2, width: int = 16):
        super().__init__()
        w = int(width)
        self.features = nn.Sequential(
            _block(in_channels, w, (1, 3, 3)), _block(w, w, (3, 3, 3)), nn.MaxPool3d((1, 2, 2)),
            _block(w, 2 * w, (3, 3, 3)), _block(2 * w, 2 * w, (3, 3, 3)), nn.MaxPool3d(2),
            _block(2 * w, 4 * w, (3, 3, 3)), nn.MaxPool3d(2), _block(4 * w, 4 * w, (1, 3, 3)))
        self.head = nn.Linear(8 * w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.head(torch.cat([h.mean((2, 3, 4)), h.amax((2, 3, 4))], dim=1)).squeeze(1)
