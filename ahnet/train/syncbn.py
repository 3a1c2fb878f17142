"""Batch normalisation over the global batch of a data-parallel run, on any process-group backend.

torch.nn.SyncBatchNorm synchronises BatchNorm statistics over the ranks on GPUs only; ``GlobalBatchNorm`` does
the same through autograd-aware all-reduces (``all_reduce_sum``: the sum over the ranks, whose gradient with
respect to each rank's term is the sum of the ranks' incoming gradients), so it runs over gloo on CPUs as well.
In training mode with a process group of more than one rank it normalises with the mean and the biased variance
of all ranks' inputs (two all-reduces: per-channel sums and the count, then the centred sums of squares, which
keeps the variance accurate where mean >> std) and updates the running statistics as nn.BatchNorm does for that
whole batch (running_var from the unbiased variance, momentum or the cumulative average); the backward pass
reaches every rank's inputs through the all-reduces. Otherwise (eval mode, or one process) it is nn.BatchNorm.
Statistics are computed in float32 whatever the input dtype; the output has the input's dtype. Parameters and
buffers keep BatchNorm's names, so checkpoints load into the plain network.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["GlobalBatchNorm", "convert_batchnorm", "all_reduce_sum"]


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over every rank, on every rank, differentiable: each rank's loss depends on every rank's
    x, so the gradient reaching a rank's x is the sum of the gradients all ranks send back (another all-reduce)."""
    return _AllReduceSum.apply(x)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over (N, C, *spatial) inputs whose training statistics are those of the global batch."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, *spatial), got shape {tuple(x.shape)}.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float32, device=x.device)
        sums = all_reduce_sum(torch.cat([xf.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = xf - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.float().view(shape) + self.bias.float().view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var * (n / torch.clamp(n - 1, min=1))
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out.to(x.dtype)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm1d/2d/3d in ``module`` replaced (in place) by a GlobalBatchNorm that shares its parameters
    and buffers (an optimiser made before still holds the right tensors); returns ``module``, or the
    replacement when ``module`` itself is a BatchNorm."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new = convert_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module
