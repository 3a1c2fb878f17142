"""Decoder blocks of the 3D AH-Net: anisotropic convolution (AC) dense blocks, the pyramid pooling module,
projections with upsampling, and the output head; and the weight initialisations of the decoders (the
authors' rule for AH-Net's 3D decoder, He normal for the 2D MC-GCN decoder and the 3D U-Net). Tensors are
(N, C, D, H, W).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ahnet.nets.fused import bn_relu_conv, fusable
from ahnet.nets.pooling import adaptive_max_pool3d, grid_max_pool, max_pool3d

UPSAMPLE_MODES = ("trilinear", "transpose", "nearest")


def check_upsample(mode: str) -> str:
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {', '.join(UPSAMPLE_MODES)}; got {mode!r}")
    return mode


def make_upsample(mode: str, channels: int, scale: Tuple[int, int, int]) -> nn.Module:
    """x `scale` over (D, H, W): trilinear / nearest interpolation, or a transposed conv (kernel = stride)."""
    if scale == (1, 1, 1):
        return nn.Identity()
    if mode == "transpose":
        return nn.ConvTranspose3d(channels, channels, scale, scale, bias=False)
    if mode == "trilinear":
        return nn.Upsample(scale_factor=scale, mode="trilinear", align_corners=False)
    return nn.Upsample(scale_factor=scale, mode="nearest")


class BNReLUConv(nn.Sequential):
    """BN -> ReLU -> conv (no bias): the pre-activation unit of the decoder. In a training step it runs as
    ahnet.nets.fused.bn_relu_conv (the same values and gradients, the ReLU's output not kept for backward)."""

    def __init__(self, cin: int, cout: int, kernel: Tuple[int, int, int] = (1, 1, 1)):
        pad = tuple(k // 2 for k in kernel)
        super().__init__(nn.BatchNorm3d(cin), nn.ReLU(inplace=True), nn.Conv3d(cin, cout, kernel, 1, pad, bias=False))

    def forward(self, x):
        if fusable(self[0], self[2], x):
            return bn_relu_conv(self[0], self[2], x)
        return super().forward(x)


class ACLayer(nn.Module):
    """One anisotropic convolution layer of a dense block (the authors' "Pseudo3D" layer).

    x -> BN-ReLU-1x1x1 (to bn_size*g) -> BN-ReLU-(1,3,3) (to g) = a; BN-ReLU-(3,1,1) on a (to g) = b;
    BN-ReLU-1x1x1 on a + b (to g) = new; output concat(x, new): (N, C + g, D, H, W).
    """

    def __init__(self, cin: int, growth: int, bn_size: int = 4, dropout: float = 0.0):
        super().__init__()
        self.reduce = BNReLUConv(cin, bn_size * growth)
        self.inplane = BNReLUConv(bn_size * growth, growth, (1, 3, 3))
        self.through = BNReLUConv(growth, growth, (3, 1, 1))
        self.fuse = BNReLUConv(growth, growth)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        a = self.inplane(self.reduce(x))
        new = self.dropout(self.fuse(a + self.through(a)))
        return torch.cat([x, new], 1)


class ACDenseBlock(nn.Sequential):
    """`layers` densely connected AC layers: (N, C, ...) -> (N, C + layers * growth, ...)."""

    def __init__(self, cin: int, layers: int = 3, growth: int = 20, bn_size: int = 4, dropout: float = 0.0):
        super().__init__(*[ACLayer(cin + i * growth, growth, bn_size, dropout) for i in range(layers)])
        self.out_channels = cin + layers * growth


class UpProjection(nn.Sequential):
    """BN-ReLU-1x1x1 conv to `cout`, then upsample by `scale` (identity when scale is 1)."""

    def __init__(self, cin: int, cout: int, mode: str, scale: Tuple[int, int, int]):
        super().__init__(BNReLUConv(cin, cout), make_upsample(mode, cout, scale))


class PyramidPooling(nn.Module):
    """Pyramid volumetric pooling ("PFN" here), `depth` levels, the coarsest first.

    Level i max-pools the in-plane map to a 2^i x 2^i grid (z kept), projects to one channel with a 1x1x1
    conv (with bias), and resizes back to (D, H, W). Output: concat(level maps, x): (N, depth + C, D, H, W).
    Depth K keeps the K coarsest levels (grids 1, 2, ..., 2^(K-1)): at a 64 x 64 map (a 128 x 128 input)
    depth 4 is the paper's fixed windows 64, 32, 16, 8, and depth K its K largest windows.
    `align_corners` (attribute, default False) of the trilinear resize: MONAI's port sets it True.

    When H and W are multiples of the finest grid the windows nest, and the pooling is done once on the full
    map (to the finest grid) and then on that small map for each coarser grid: the same maxima, and one
    full-size max-pool backward instead of `depth` (each of which writes and accumulates a full-size
    gradient). Other sizes pool each level from the full map (adaptive windows that may overlap). Under
    torch.export (and so ONNX export) the finest grid is pooled by ``grid_max_pool`` instead: the same values,
    with a block size that stays symbolic, so one exported graph serves every window size.
    """

    def __init__(self, cin: int, depth: int = 4, mode: str = "trilinear"):
        super().__init__()
        if depth < 0:
            raise ValueError(f"pyramid depth must be >= 0; got {depth}")
        self.depth = depth
        self.grids = tuple(2 ** i for i in range(depth))
        self.project = nn.ModuleList([nn.Conv3d(cin, 1, 1) for _ in range(depth)])
        # A transposed conv cannot undo an adaptive pool of any size: interpolate instead.
        self.mode = "nearest" if mode == "nearest" else "trilinear"
        self.align_corners = False

    def pooled_maps(self, x: torch.Tensor) -> list:
        """[x max-pooled to (D, g, g) for each grid g] (coarsest first)."""
        d, h, w = x.shape[2:]
        if not self.grids:
            return []
        finest = self.grids[-1]
        if h % finest or w % finest:
            return [adaptive_max_pool3d(x, (d, g, g)) for g in self.grids]
        if torch.compiler.is_exporting():
            maps = [grid_max_pool(x, finest)]
        else:
            maps = [max_pool3d(x, (1, h // finest, w // finest))]
        for g in reversed(self.grids[:-1]):
            maps.insert(0, max_pool3d(maps[0], (1, 2, 2)))
        return maps

    def forward(self, x):
        size = x.shape[2:]
        maps = []
        for pooled, project in zip(self.pooled_maps(x), self.project):
            p = project(pooled)
            if p.shape[-2:] == (1, 1):
                # from one in-plane value, trilinear and nearest resizing both give that value everywhere:
                # broadcast it (exactly equal; and torch.compile's CPU backend fails on this interpolation),
                # stored in x's memory format: a broadcast view would make the concatenation, and with it the
                # head's BN, ReLU and their backward, leave channels-last (measured: performance.md)
                maps.append(p.expand(-1, -1, *size).contiguous(memory_format=memory_format_of(x)))
                continue
            maps.append(F.interpolate(p, size=size, mode=self.mode,
                                      **({"align_corners": self.align_corners} if self.mode == "trilinear" else {})))
        return torch.cat(maps + [x], 1)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d for a 5D tensor stored channels-last (and not also plainly contiguous), else contiguous."""
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


class OutputHead(nn.Sequential):
    """BN-ReLU-(1,3,3) conv to the output channels, then upsample by `scale` to full resolution."""

    def __init__(self, cin: int, cout: int, mode: str, scale: Tuple[int, int, int]):
        super().__init__(BNReLUConv(cin, cout, (1, 3, 3)), make_upsample(mode, cout, scale))


def level_scale(pool_z: bool) -> Tuple[int, int, int]:
    return (2 if pool_z else 1, 2, 2)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_CONVS_3D = (nn.Conv3d, nn.ConvTranspose3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def inplane_fan_out_std(conv: nn.Module) -> float:
    """sqrt(2 / (kh * kw * out_channels)) for a 3D conv or transposed conv with kernel (kd, kh, kw): the
    authors' and MONAI's rule, written there as k0 * k1 * out_channels over their slice-last (X, Y, Z) kernel,
    i.e. the in-plane taps only (a (3, 1, 1) conv counts 1 tap, a (1, 3, 3) conv 9)."""
    _, kh, kw = conv.kernel_size
    return math.sqrt(2.0 / (kh * kw * conv.out_channels))


#: std of the output head's conv weights (one deviation from the authors' rule, see init_ahnet_decoder)
HEAD_INIT_STD = 0.01


@torch.no_grad()
def init_ahnet_decoder(modules: Iterable[nn.Module], head: nn.Module | None = None) -> None:
    """The authors' (and MONAI's) initialisation of AH-Net's 3D decoder, in place, on every module under
    `modules`: Conv3d and ConvTranspose3d weights ~ normal(0, inplane_fan_out_std(conv)); BatchNorm weight 1,
    bias 0; conv biases (the pyramid's projections) keep PyTorch's default, as there. Draws from torch's
    global generator, so it is deterministic under torch.manual_seed. Not for the encoder, whose weights come
    from the 2D transfer or the ResNet initialisation.

    ``head``: the output conv, drawn instead from normal(0, HEAD_INIT_STD) so that every logit starts near 0
    (RetinaNet's and nnDetection's practice for a classifier layer). The authors' fan-out rule gives a
    one-channel (1, 3, 3) head std sqrt(2 / 9) = 0.47: a fresh network's logits then reach +-40 and training
    at lr 1e-3 diverged within 20 steps (paper_notes/architecture.md, "Initialisation").
    """
    for mod in modules:
        for m in mod.modules():
            if isinstance(m, _CONVS_3D):
                m.weight.normal_(0.0, inplane_fan_out_std(m))
            elif isinstance(m, _BATCH_NORMS):
                m.weight.fill_(1.0)
                m.bias.zero_()
    if head is not None:
        head.weight.normal_(0.0, HEAD_INIT_STD)


def conv_fan_in(conv: nn.Module) -> int:
    """Input values that feed one output value: in_channels / groups x kernel taps; for a transposed conv
    divided by the stride taps (with stride = kernel each output sees one tap of each input channel)."""
    taps = math.prod(conv.kernel_size)
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return max(1, conv.in_channels // conv.groups * taps // math.prod(conv.stride))
    return conv.in_channels // conv.groups * taps


@torch.no_grad()
def he_normal_(conv: nn.Module, relu_input: bool = True) -> None:
    """He et al. (2015) normal initialisation of one conv, in place: weight ~ normal(0, gain / sqrt(fan in))
    with gain sqrt(2) when the conv reads a ReLU output (half the inputs zero), 1 when it reads a linear one;
    bias 0."""
    gain = math.sqrt(2.0) if relu_input else 1.0
    conv.weight.normal_(0.0, gain / math.sqrt(conv_fan_in(conv)))
    if conv.bias is not None:
        conv.bias.zero_()



@contextlib.contextmanager
def frozen_bn_stats(modules: Iterable[nn.Module]):
    """BatchNorm layers under `modules` keep their running statistics (and batch counters) while inside."""
    bns = {id(m): m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in bns.values()]
    try:
        for m, _, _ in saved:
            m.momentum = 0.0   # running = (1 - 0) * running + 0 * batch: unchanged
        yield
    finally:
        for m, momentum, nbt in saved:
            m.momentum = momentum
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def checkpointed(fn: Callable, modules: Iterable[nn.Module], *args):
    """fn(*args) with activation checkpointing (non-reentrant) when autograd records; the recomputation in
    backward leaves the BatchNorm running statistics of `modules` as the first pass set them, so outputs,
    gradients and running statistics equal the plain run's (up to float rounding of the recomputation).
    Without grad (inference) it is a plain call.
    """
    if not torch.is_grad_enabled():
        return fn(*args)
    modules = list(modules)
    calls = [0]

    def run(*a):
        calls[0] += 1
        if calls[0] == 1:
            return fn(*a)
        with frozen_bn_stats(modules):
            return fn(*a)

    return _checkpoint(run, *args, use_reentrant=False)
