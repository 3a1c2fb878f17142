"""Input-size rules: the z-pooling schedule and the divisibility a network configuration needs.

The AH-Net encoder halves the in-plane size 5 times (stem stride, max-pool, layer2..4). The authors halve z
at the same 5 places ("paper" schedule), so z must be a multiple of 32. The "spacing" schedule halves z at a
level only when the voxel there stays within 2x of isotropic, so thick-slice patches need fewer slices.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

#: Number of resolution levels of the ResNet encoder (stem, max-pool, layer2, layer3, layer4).
NUM_LEVELS = 5

ZPool = Union[str, Sequence[bool]]


def z_pool_schedule(z_pool: ZPool = "paper", spacing: Sequence[float] | None = None,
                    max_aspect: float = 2.0) -> Tuple[bool, ...]:
    """Whether z is halved at each of the 5 encoder levels.

    z_pool: "paper" (all 5), "none" (never: the encoder then computes slice by slice), "spacing"
        (needs spacing), or an explicit sequence of 5 booleans.
    spacing: (sz, sy, sx) in mm of the input voxels, for "spacing".
    max_aspect: with "spacing", z is halved at a level when the z spacing after halving is at most
        max_aspect times the in-plane spacing at that level.
    """
    if isinstance(z_pool, str):
        if z_pool == "paper":
            return (True,) * NUM_LEVELS
        if z_pool == "none":
            return (False,) * NUM_LEVELS
        if z_pool == "spacing":
            if spacing is None or len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
                raise ValueError(f"z_pool='spacing' needs spacing=(sz, sy, sx) in mm, all > 0; got {spacing!r}")
            sz, sy, sx = (float(s) for s in spacing)
            s_inplane = max(sy, sx)
            flags = []
            for _ in range(NUM_LEVELS):
                s_inplane *= 2.0
                pool = 2.0 * sz <= max_aspect * s_inplane + 1e-9
                if pool:
                    sz *= 2.0
                flags.append(pool)
            return tuple(flags)
        raise ValueError(f"z_pool must be 'paper', 'spacing', 'none' or 5 booleans; got {z_pool!r}")
    flags = tuple(bool(f) for f in z_pool)
    if len(flags) != NUM_LEVELS:
        raise ValueError(f"z_pool needs {NUM_LEVELS} booleans (one per encoder level); got {len(flags)}")
    return flags


def input_multiple(z_flags: Sequence[bool], inplane_levels: int = NUM_LEVELS) -> Tuple[int, int, int]:
    """The (D, H, W) multiples an input must have for a schedule of z halvings."""
    return (2 ** sum(bool(f) for f in z_flags), 2 ** inplane_levels, 2 ** inplane_levels)


def padded_shape(model_or_multiple, shape: Sequence[int]) -> Tuple[int, ...]:
    """Smallest spatial shape >= `shape` that the model accepts (pad with ahnet.nets.sizes.pad_to)."""
    multiple = getattr(model_or_multiple, "input_multiple", model_or_multiple)
    if len(shape) != len(multiple):
        raise ValueError(f"shape {tuple(shape)} has {len(shape)} axes; the model takes {len(multiple)} spatial axes")
    return tuple(-(-int(s) // int(m)) * int(m) for s, m in zip(shape, multiple))


def check_input(x: torch.Tensor, multiple: Sequence[int], channels: int, name: str) -> None:
    """Raise a ValueError that names the shape and the rule when `x` does not fit the network."""
    nd = len(multiple)
    if x.dim() != nd + 2:
        raise ValueError(f"{name} takes a {nd + 2}D tensor (N, C, {', '.join('DHW'[-nd:])}); "
                         f"got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name} takes {channels} input channel(s); got shape {tuple(x.shape)} "
                         f"with {x.shape[1]} channel(s)")
    # sizes stay symbolic under torch.export (int() of one would freeze that axis in an exported graph)
    if any(s % m for s, m in zip(x.shape[2:], multiple)):
        spatial = tuple(int(s) for s in x.shape[2:])
        raise ValueError(f"{name} needs spatial sizes divisible by {tuple(multiple)}; got input of shape "
                         f"{tuple(x.shape)}: pad to {padded_shape(multiple, spatial)} "
                         f"(ahnet.nets.sizes.padded_shape / pad_to)")


def pad_to(x: torch.Tensor, shape: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad the trailing spatial axes of `x` at their end up to `shape` (crop back with x[..., :d, :h, :w])."""
    pads = []
    for have, want in zip(reversed(x.shape[-len(shape):]), reversed(tuple(shape))):
        if want < have:
            raise ValueError(f"cannot pad size {have} down to {want}")
        pads += [0, int(want) - int(have)]
    return torch.nn.functional.pad(x, pads, value=value)
