"""The 3D AH-Net: anisotropic ResNet encoder (transferable from the 2D MC-GCN) + 3D decoder.

Decoder (authors' layout, 5 levels, additive skips):
    up0: layer4 -> C(layer3), x2, + layer3, AC dense block
    up1: -> C(layer2), x2, + layer2, dense block
    up2: -> C(layer1), x2, + layer1, dense block
    proj: -> 64, no resize, + max-pooled stem, dense block
    up3: -> 64, x2, + stem, dense block
    pyramid pooling (pfn_depth levels, 0 = off), head (BN-ReLU-(1,3,3) conv) and x2 to full resolution.
Each x2 doubles H and W, and D where the encoder halved D at the mirrored level.
The decoder starts from the authors' initialisation (blocks.init_ahnet_decoder); the encoder from the ResNet
initialisation, until the 2D -> 3D transfer overwrites it.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn

from ahnet.nets.blocks import (ACDenseBlock, OutputHead, PyramidPooling, UpProjection, check_upsample, checkpointed,
                     count_parameters, init_ahnet_decoder, level_scale)
from ahnet.nets.resnet import parse_encoder
from ahnet.nets.resnet3d import ResNet3dEncoder
from ahnet.nets.sizes import ZPool, check_input, input_multiple, z_pool_schedule


CHECKPOINT_MODES = ("none", "encoder", "decoder", "all")
#: pyramid pooling levels: the paper's 4 by default, from 0 (off) to 6 (grids 1 .. 32); the training flag
#: --pfn-depth and weights_transfer read both from here
PFN_DEPTH, PFN_DEPTH_RANGE = 4, (0, 6)


def checkpoint_mode(mode: str | bool) -> str:
    if isinstance(mode, bool):
        return "all" if mode else "none"
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINT_MODES)} (or a bool); got {mode!r}")
    return mode


class AHNet3d(nn.Module):
    """forward(x): (N, in_channels, D, H, W) -> logits (N, out_channels, D, H, W).

    encoder: resnet18 | resnet34 | resnet50 (the 2D network it is transferred from must match).
    pfn_depth: pyramid pooling levels, the coarsest first (0 = off, 4 = paper; K keeps the grids 1 .. 2^(K-1)).
    upsample: trilinear (paper) | transpose (MONAI's default) | nearest.
    z_pool: "paper" (z halved 5 times: D % 32 == 0), "spacing" (needs spacing=(sz, sy, sx)), "none",
        or 5 booleans. growth / layers_per_block: the AC dense blocks (paper 20 / 3).
    Eval mode uses the BatchNorm running statistics (the authors' code ran inference in training mode).
    checkpoint: activation checkpointing in training, a memory / time trade with the same outputs, gradients
        and BN statistics: "none" (paper, default), "encoder" (stem and layer1..4), "decoder" (each level's
        projection + skip add, each AC layer, the pyramid, the head), "all" (both); True = "all", False = "none".
    """

    def __init__(self, encoder: str = "resnet50", in_channels: int = 1, out_channels: int = 1,
                 pfn_depth: int = PFN_DEPTH, upsample: str = "trilinear", z_pool: ZPool = "paper",
                 spacing: Sequence[float] | None = None, growth: int = 20, layers_per_block: int = 3,
                 bn_size: int = 4, dropout: float = 0.0, checkpoint: str | bool = "none"):
        super().__init__()
        depth = parse_encoder(encoder)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1; got {in_channels}, {out_channels}")
        lo, hi = PFN_DEPTH_RANGE
        if not lo <= int(pfn_depth) <= hi:
            raise ValueError(f"pfn_depth must be between {lo} and {hi}; got {pfn_depth}")
        check_upsample(upsample)
        checkpoint = checkpoint_mode(checkpoint)
        z_flags = z_pool_schedule(z_pool, spacing)
        self.config: Dict = dict(encoder=f"resnet{depth}", in_channels=in_channels, out_channels=out_channels,
                                 pfn_depth=int(pfn_depth), upsample=upsample,
                                 z_pool=list(z_flags), spacing=None if spacing is None else [float(s) for s in spacing],
                                 growth=growth, layers_per_block=layers_per_block, bn_size=bn_size, dropout=dropout,
                                 checkpoint=checkpoint)
        self.z_flags = z_flags
        self.in_channels, self.out_channels = in_channels, out_channels
        self.input_multiple = input_multiple(z_flags)

        self.encoder = ResNet3dEncoder(depth, in_channels, z_flags)
        c_stem, c1, c2, c3, c4 = self.encoder.out_channels

        def dense(c):
            return ACDenseBlock(c, layers_per_block, growth, bn_size, dropout)

        self.up0 = UpProjection(c4, c3, upsample, level_scale(z_flags[4]))
        self.dense0 = dense(c3)
        self.up1 = UpProjection(self.dense0.out_channels, c2, upsample, level_scale(z_flags[3]))
        self.dense1 = dense(c2)
        self.up2 = UpProjection(self.dense1.out_channels, c1, upsample, level_scale(z_flags[2]))
        self.dense2 = dense(c1)
        self.proj = UpProjection(self.dense2.out_channels, c_stem, upsample, (1, 1, 1))
        self.dense3 = dense(c_stem)
        self.up3 = UpProjection(self.dense3.out_channels, c_stem, upsample, level_scale(z_flags[1]))
        self.dense4 = dense(c_stem)
        c_top = self.dense4.out_channels
        self.pyramid = PyramidPooling(c_top, int(pfn_depth), upsample) if pfn_depth > 0 else None
        self.head = OutputHead(c_top + int(pfn_depth), out_channels, upsample, level_scale(z_flags[0]))
        init_ahnet_decoder(self.decoder_modules(), head=self.head[0][2])
        self.set_checkpoint(checkpoint)

    def decoder_modules(self):
        """The modules after the encoder (projections, dense blocks, pyramid, head): what the transfer leaves new."""
        return [m for name, m in self.named_children() if name != "encoder"]

    def set_checkpoint(self, mode: str | bool) -> None:
        """Switch activation checkpointing ("none" | "encoder" | "decoder" | "all") on a built model."""
        mode = checkpoint_mode(mode)
        self.config["checkpoint"] = mode
        self.encoder.checkpoint = mode in ("encoder", "all")
        self._ckpt_decoder = mode in ("decoder", "all")

    def _levels(self):
        return ((self.up0, self.dense0), (self.up1, self.dense1), (self.up2, self.dense2),
                (self.proj, self.dense3), (self.up3, self.dense4))

    @staticmethod
    def _up_add(up, d, skip):
        return up(d) + skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.input_multiple, self.in_channels, type(self).__name__)
        stem, pooled, f1, f2, f3, f4 = self.encoder(x)
        if self._ckpt_decoder and self.training:
            # one segment per projection + skip, per AC layer, for the pyramid and for the head: only the
            # segment outputs are kept, and backward recomputes one segment at a time
            d = f4
            for (up, dense), skip in zip(self._levels(), (f3, f2, f1, pooled, stem)):
                d = checkpointed(self._up_add, [up], up, d, skip)
                for layer in dense:
                    d = checkpointed(layer, [layer], d)
            if self.pyramid is not None:
                d = checkpointed(self.pyramid, [self.pyramid], d)
            return checkpointed(self.head, [self.head], d)
        d = self.dense0(self.up0(f4) + f3)
        d = self.dense1(self.up1(d) + f2)
        d = self.dense2(self.up2(d) + f1)
        d = self.dense3(self.proj(d) + pooled)
        d = self.dense4(self.up3(d) + stem)
        if self.pyramid is not None:
            d = self.pyramid(d)
        return self.head(d)

    def parameter_counts(self) -> Dict[str, int]:
        total = count_parameters(self)
        enc = count_parameters(self.encoder)
        return {"encoder": enc, "decoder": total - enc, "total": total}
