"""BatchNorm folded into the convolution before it, for inference.

In evaluation mode a BatchNorm after a conv is a per-channel affine map y = s * conv(x) + (beta - s * mean) with
s = gamma / sqrt(var + eps), so the conv can compute it alone: weight * s per output channel and that bias. The
BN becomes an Identity: one elementwise pass less per conv, the same function up to float rounding (tested).

``fold_batchnorm(model)`` folds, in place, every conv -> BN pair it can prove adjacent: consecutive children of a
plain ``nn.Sequential`` (the U-Net's units, the second stage's blocks), the ResNet blocks' conv_i -> bn_i (the
last pair only where the block does not z-pool between them: max-pooling commutes with the affine map only for
s > 0), their shortcuts and the encoder's stem likewise. The decoder's BN -> ReLU -> conv units have a ReLU between BN and conv and
stay. For inference only: the folded model has other parameters (conv biases, no BN statistics) and trains
differently; ``load_member`` folds the models it loads for inference.
"""
from __future__ import annotations

import torch
from torch import nn

from ahnet.nets.resnet3d import BasicBlock3d, Bottleneck3d, ResNet3dEncoder, _Shortcut


@torch.no_grad()
def _fold(conv: nn.Conv3d, bn: nn.BatchNorm3d) -> None:
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight.mul_(s.view(-1, *([1] * (conv.weight.dim() - 1))).to(conv.weight.dtype))
    bias = bn.bias - bn.running_mean * s
    if conv.bias is not None:
        bias = bias + conv.bias * s
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype))


def _foldable(conv, bn) -> bool:
    return (isinstance(conv, nn.Conv3d) and isinstance(bn, nn.BatchNorm3d) and bn.running_mean is not None
            and conv.out_channels == bn.num_features)


def _pairs(m: nn.Module):
    """(parent, conv name, bn name) of the adjacent pairs of one module (module docstring)."""
    if type(m) is nn.Sequential or (isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward):
        names = [n for n, _ in m.named_children()]
        return [(m, a, b) for a, b in zip(names, names[1:])]
    if isinstance(m, (BasicBlock3d, Bottleneck3d)):
        last = 3 if isinstance(m, Bottleneck3d) else 2
        return [(m, f"conv{i}", f"bn{i}") for i in range(1, last + 1)
                if i < last or isinstance(m.zpool, nn.Identity)]
    if isinstance(m, _Shortcut) and isinstance(m.zpool, nn.Identity):
        return [(m, "0", "1")]
    if isinstance(m, ResNet3dEncoder) and isinstance(m.stem_zpool, nn.Identity):
        return [(m, "conv1", "bn1")]
    return []


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every provable conv -> BN pair of ``model`` (in eval mode) in place; returns how many."""
    if model.training:
        raise ValueError("fold_batchnorm is for inference: put the model in eval mode first")
    n = 0
    for m in list(model.modules()):
        for parent, a, b in _pairs(m):
            conv, bn = getattr(parent, a), getattr(parent, b)
            if _foldable(conv, bn):
                _fold(conv, bn)
                setattr(parent, b, nn.Identity())
                n += 1
    return n
