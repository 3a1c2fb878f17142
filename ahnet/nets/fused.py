"""BN -> ReLU -> conv in training without keeping the ReLU's output for backward.

Autograd keeps, for each BN-ReLU-conv unit of the decoder, the BN's input (the unit's input, kept anyway: it is
the output of the layer before or a concatenation of them) and the ReLU's output (the conv's input): two tensors
of the input's size. ``bn_relu_conv`` keeps the first and the BN's batch statistics only, and in backward
recomputes the ReLU's output from them (one elementwise pass, ``native_batch_norm`` in evaluation form with the
saved mean and variance, which reproduces the forward's values), then runs the conv's, the ReLU's and the BN's
backward as autograd would. Outputs, gradients and BatchNorm running statistics are those of the three modules
(tested); what differs is the memory kept between forward and backward (for the paper's ResNet50 AH-Net on a
32 x 128 x 128 patch in bf16 + channels-last: performance.md) and one more elementwise pass per unit in backward.

Under autocast the conv runs in the autocast dtype (its weight cast as autocast casts it), BN and ReLU in the
input's dtype, as the modules do there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ahnet.precision import bf16_depth_bug


_ENABLED = [True]


def use_fused(enabled: bool) -> bool:
    """Switch bn_relu_conv on or off for the whole process (on by default; the benchmark measures the lever
    alone by switching it off); returns the previous setting."""
    before, _ENABLED[0] = _ENABLED[0], bool(enabled)
    return before


def _conv_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _BNReLUConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bn_w, bn_b, conv_w, running_mean, running_var, factor, eps, conv_dtype, geometry):
        stride, padding, dilation, groups = geometry
        with torch.autocast(x.device.type, enabled=False):
            a, mean, invstd = torch.ops.aten.native_batch_norm(x, bn_w, bn_b, running_mean, running_var, True,
                                                               factor, eps)
            y = F.conv3d(a.relu_().to(conv_dtype), conv_w.to(conv_dtype), None, stride, padding, dilation, groups)
        ctx.save_for_backward(x, bn_w, bn_b, conv_w, mean, invstd)
        ctx.eps, ctx.conv_dtype, ctx.geometry = eps, conv_dtype, geometry
        return y

    @staticmethod
    def backward(ctx, gy):
        x, bn_w, bn_b, conv_w, mean, invstd = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        with torch.autocast(x.device.type, enabled=False):
            var = invstd.reciprocal().square_().sub_(ctx.eps)          # the batch variance the forward used
            a, _, _ = torch.ops.aten.native_batch_norm(x, bn_w, bn_b, mean, var, False, 0.0, ctx.eps)
            a = a.relu_()
            ga, gw, _ = torch.ops.aten.convolution_backward(
                gy.to(ctx.conv_dtype), a.to(ctx.conv_dtype), conv_w.to(ctx.conv_dtype), None, stride, padding,
                dilation, False, [0, 0, 0], groups, [True, ctx.needs_input_grad[3], False])
            ga = torch.ops.aten.threshold_backward(ga.to(x.dtype), a, 0)
            gx, gbw, gbb = torch.ops.aten.native_batch_norm_backward(
                ga, x, bn_w, None, None, mean, invstd, True, ctx.eps,
                [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        gw = None if gw is None else gw.to(conv_w.dtype)
        return gx, gbw, gbb, gw, None, None, None, None, None, None


def fusable(bn: nn.BatchNorm3d, conv: nn.Conv3d, x: torch.Tensor) -> bool:
    """Whether bn_relu_conv can stand in for bn -> ReLU -> conv on x: a training step (grad on, BN in training
    mode with running statistics and affine parameters), a conv without bias or string padding, and no call
    that the bf16 depth guard must handle (precision.bf16_depth_bug): those keep the modules."""
    return (_ENABLED[0] and torch.is_grad_enabled() and bn.training and bn.track_running_stats and bn.affine
            and conv.bias is None and isinstance(conv.padding, tuple) and conv.padding_mode == "zeros"
            and x.dim() == 5 and not bf16_depth_bug(x, conv.kernel_size[0]))


def bn_relu_conv(bn: nn.BatchNorm3d, conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """conv(relu(bn(x))) for a training step (``fusable``), keeping x and the batch statistics only."""
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)
    return _BNReLUConv.apply(x, bn.weight, bn.bias, conv.weight, bn.running_mean, bn.running_var, factor, bn.eps,
                             _conv_dtype(x), geometry)
