"""Loading a MONAI ``AHNet`` state dict into this project's ``AHNet3d`` (keys mapped by structure, weights
turned from MONAI's slice-last layout (N, C, X, Y, Z) into ours (N, C, D, H, W)).

MONAI is not imported here: the mapping works on plain tensors, so the package does not depend on it.

Module pairs (MONAI -> ours):
    conv1 -> encoder.conv1; bn0 -> encoder.bn1; layerK.i.* -> encoder.layerK.i.* except
    layerK.i.downsample.{0: conv, 1: z max-pool (no weights), 2: BN} -> encoder.layerK.i.downsample.{0: conv, 1: BN};
    upK / trans1 / final .{norm, conv, up} -> upK / proj / head .{0.0, 0.2, 1};
    denseK.denselayerJ.{bn1, conv1, bn2, conv2, bn3, conv3, bn4, conv4}
        -> denseK.(J-1).{reduce, inplane, through, fuse}.{0 (BN), 2 (conv)};
    psp.project_modules.i -> pyramid.project.(K-1-i) (K levels; see below).
Every 5D weight (conv, transposed conv) has its 3 spatial axes reversed: a (7, 7, 3) kernel over (X, Y, Z)
becomes (3, 7, 7) over (D, H, W).

Pyramid levels are paired by window size. MONAI's ``psp_block_num=K`` keeps the windows 8, 16, ..., 2^(K+2)
(``project_modules.i`` pools windows of 2^(i+3) in-plane voxels) and concatenates them finest first; our
``pfn_depth=K`` keeps the grids 1, 2, ..., 2^(K-1) (the coarsest K levels, adaptive), concatenated coarsest
first. At an in-plane input of 2^(K+3) (the half-resolution map 2^(K+2) wide; 128 x 128 for K = 4) MONAI's
window 2^(i+3) pools to our grid 2^(K-1-i): the same maxima. So ``project_modules.i`` -> ``pyramid.project.(K-1-i)``,
and the head's BN and conv see the K pyramid channels in reverse order (those entries are reversed). At other
sizes the fixed windows and the adaptive grids differ by design; the pairing keeps each weight's role
(largest window <-> coarsest grid). MONAI's pyramid upsamplers in transpose mode (transposed convs with
window-sized kernels) have no counterpart: we resize by interpolation.

The weight-free operations that differ; ``match_monai_ops`` makes our model use MONAI's choice so that both
compute the same function:
- MONAI upsamples with ``align_corners=True`` in trilinear mode (as the authors' code did under PyTorch < 0.4);
  ours uses ``align_corners=False``. The same holds for the pyramid's resize.
- MONAI's pyramid projections pad the pooled map in-plane by 1 (a 1 x 1 pooled map becomes 3 x 3 with
  bias-valued borders before the resize); ours do not pad.
- MONAI's first max-pool is 2x2x2 stride 2 in "transpose" / "nearest" mode (3x3x3 stride 2 pad 1 in
  trilinear mode, as ours and the authors' always).
With these, our output equals MONAI's to float rounding with the pyramid off at any valid size, and with the
pyramid on (trilinear or nearest mode) at the in-plane size ``monai_pyramid_size(K)``.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Tuple

import torch
from torch import nn

from ahnet.nets.pooling import MaxPool3d

_DENSE = {"bn1": "reduce.0", "conv1": "reduce.2", "bn2": "inplane.0", "conv2": "inplane.2",
          "bn3": "through.0", "conv3": "through.2", "bn4": "fuse.0", "conv4": "fuse.2"}
_SEQ = {"norm": "0.0", "conv": "0.2", "up": "1"}
_SEQ_NAMES = {"up0": "up0", "up1": "up1", "up2": "up2", "up3": "up3", "trans1": "proj", "final": "head"}


class MonaiPortError(ValueError):
    """A MONAI state dict that cannot be mapped onto the given AHNet3d."""


#: (MONAI key pattern, our key from its match; None = no counterpart), tried in order
_KEY_RULES = (
    (r"conv1\.(.+)", lambda m: f"encoder.conv1.{m[1]}"),
    (r"bn0\.(.+)", lambda m: f"encoder.bn1.{m[1]}"),
    (r"(layer[1-4]\.\d+)\.downsample\.([02])\.(.+)",
     lambda m: f"encoder.{m[1]}.downsample.{0 if m[2] == '0' else 1}.{m[3]}"),
    (r"(layer[1-4]\.\d+\.(?:conv|bn)[1-3]\..+)", lambda m: f"encoder.{m[1]}"),
    (r"(up[0-3]|trans1|final)\.(norm|conv|up)\.(.+)", lambda m: f"{_SEQ_NAMES[m[1]]}.{_SEQ[m[2]]}.{m[3]}"),
    (r"(dense[0-4])\.denselayer(\d+)\.((?:bn|conv)[1-4])\.(.+)",
     lambda m: f"{m[1]}.{int(m[2]) - 1}.{_DENSE[m[3]]}.{m[4]}"),
    (r"psp\.up_modules\.\d+\.(weight|bias)", lambda m: None),
)
_PSP_PROJECTION = r"psp\.project_modules\.(\d+)\.(weight|bias)"
#: the head's tensors whose first K entries (along the given dim) are the pyramid channels
_HEAD_PYRAMID_DIM = {"final.norm.weight": 0, "final.norm.bias": 0, "final.norm.running_mean": 0,
                     "final.norm.running_var": 0, "final.conv.weight": 1}


def monai_pyramid_size(levels: int) -> int:
    """The in-plane input size (H = W) at which MONAI's pyramid windows 8 .. 2^(levels+2) pool the
    half-resolution map to our grids 2^(levels-1) .. 1: 2^(levels+3) (128 for the paper's 4 levels)."""
    return 2 ** (levels + 3)


def monai_key_to_ours(key: str, pyramid_levels: int = 0) -> str | None:
    """Our state-dict key for a MONAI AHNet key; None for MONAI's pyramid upsampling convs (no counterpart).

    pyramid_levels: MONAI's psp_block_num, needed for the pyramid projections (paired by window size: MONAI's
    level i, window 2^(i+3), is our level pyramid_levels - 1 - i). Raises MonaiPortError for a key of no
    known MONAI AHNet module, or a pyramid level beyond pyramid_levels.
    """
    m = re.fullmatch(_PSP_PROJECTION, key)
    if m:
        level = int(m[1])
        if level >= pyramid_levels:
            raise MonaiPortError(f"{key!r} is pyramid level {level} of MONAI's AHNet; with {pyramid_levels} "
                                 "pyramid levels there is no such level")
        return f"pyramid.project.{pyramid_levels - 1 - level}.{m[2]}"
    for pattern, ours in _KEY_RULES:
        m = re.fullmatch(pattern, key)
        if m:
            return ours(m)
    raise MonaiPortError(f"state-dict key {key!r} is not a MONAI AHNet key this port knows")


def monai_pyramid_levels(monai_state: Mapping[str, torch.Tensor]) -> int:
    """MONAI's psp_block_num, read from its state dict (the number of pyramid projections)."""
    return sum(1 for k in monai_state if re.fullmatch(_PSP_PROJECTION, k) and k.endswith(".weight"))


def convert_monai_tensor(t: torch.Tensor) -> torch.Tensor:
    """Reverse the 3 spatial axes of a 5D weight ((O, I, X, Y, Z) -> (O, I, Z, Y, X)); other tensors as they are."""
    return t.permute(0, 1, 4, 3, 2).contiguous() if t.dim() == 5 else t.clone()


def _reverse_pyramid_entries(t: torch.Tensor, levels: int, dim: int) -> torch.Tensor:
    """t with its first `levels` entries along `dim` in reverse order (MONAI's pyramid channels, finest first,
    into ours, coarsest first)."""
    order = torch.cat([torch.arange(levels - 1, -1, -1), torch.arange(levels, t.shape[dim])])
    return t.index_select(dim, order)


def convert_monai_state(monai_state: Mapping[str, torch.Tensor],
                        allow_dropped: bool = False) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(our state dict, MONAI keys dropped) for a MONAI AHNet state dict (3D, spatial_dims=3).

    The only keys that can be dropped are MONAI's pyramid upsamplers (transpose mode with psp_block_num > 0);
    without allow_dropped=True they raise MonaiPortError, since our model would then not compute MONAI's.
    """
    levels = monai_pyramid_levels(monai_state)
    out, dropped = {}, []
    for key, value in monai_state.items():
        ours = monai_key_to_ours(key, levels)
        if ours is None:
            dropped.append(key)
            continue
        value = convert_monai_tensor(value)
        if key in _HEAD_PYRAMID_DIM and levels:
            value = _reverse_pyramid_entries(value, levels, _HEAD_PYRAMID_DIM[key])
        out[ours] = value
    if dropped and not allow_dropped:
        raise MonaiPortError(
            f"MONAI's pyramid resizes its levels with window-sized transposed convs ({dropped[0]!r} and "
            f"{len(dropped) - 1} more), which have no counterpart here (we interpolate); pass allow_dropped=True "
            "to port everything else, or use psp_block_num=0 / a trilinear or nearest MONAI AHNet")
    return out, dropped


def load_monai_ahnet_state(model: nn.Module, monai_state_dict: Mapping[str, torch.Tensor],
                           allow_dropped: bool = False) -> List[str]:
    """Load a MONAI ``AHNet(spatial_dims=3)`` state dict into an ``AHNet3d`` with the same structure
    (encoder resnet50, same upsample mode, pfn_depth = psp_block_num, z_pool="paper", default dense blocks).

    Every parameter and buffer of `model` must be given, with the matching shape after the axis reversal;
    otherwise MonaiPortError names the first keys that differ. Returns the MONAI keys that were dropped
    (MONAI's pyramid transposed convs, only with allow_dropped=True). Use ``match_monai_ops`` as well for
    outputs equal to MONAI's.
    """
    state, dropped = convert_monai_state(monai_state_dict, allow_dropped)
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    extra = sorted(set(state) - set(target))
    if missing or extra:
        raise MonaiPortError(f"MONAI state dict does not fit this AHNet3d: {len(missing)} of our keys missing "
                             f"(first {missing[:3]}), {len(extra)} mapped keys unknown here (first {extra[:3]}); "
                             "build AHNet3d with the same encoder, upsample mode and pyramid depth")
    bad = [(k, tuple(state[k].shape), tuple(target[k].shape)) for k in target if state[k].shape != target[k].shape]
    if bad:
        k, got, want = bad[0]
        raise MonaiPortError(f"MONAI tensor for {k!r} has shape {got} after the axis reversal; this AHNet3d "
                             f"expects {want} ({len(bad)} shape mismatches in all)")
    model.load_state_dict({k: state[k].to(dtype=target[k].dtype) for k in target})
    return dropped


def match_monai_ops(model: nn.Module) -> nn.Module:
    """Switch the weight-free operations that differ to MONAI's choice, in place (see the module docstring):
    trilinear upsampling with align_corners=True; in transpose / nearest mode a 2x2x2 stride-2 first max-pool;
    in trilinear / nearest mode the pyramid's projections padded in-plane by 1 and its trilinear resize with
    align_corners=True (in transpose mode MONAI's pyramid has weights we lack, and is left as it is).
    Needs z_pool="paper" (MONAI halves z at every level). Returns the model.
    """
    flags = tuple(getattr(model, "z_flags", ()))
    if flags != (True,) * 5:
        raise MonaiPortError(f"match_monai_ops needs an AHNet3d with z_pool='paper'; got z flags {flags}")
    mode = model.config["upsample"]
    for m in model.modules():
        if isinstance(m, nn.Upsample) and m.mode == "trilinear":
            m.align_corners = True
    if mode in ("transpose", "nearest"):
        model.encoder.maxpool = MaxPool3d(2, 2)
    if model.pyramid is not None and mode != "transpose":
        model.pyramid.align_corners = True
        for conv in model.pyramid.project:
            conv.padding = (0, 1, 1)
    return model
