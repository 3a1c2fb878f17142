"""Loading a MONAI ``AHNet`` state dict into this project's ``AHNet3d`` (keys mapped by structure, weights
turned from MONAI's slice-last layout (N, C, X, Y, Z) into ours (N, C, D, H, W)).

MONAI is not imported here: the mapping works on plain tensors, so the package does not depend on it.

Module pairs (MONAI -> ours):
    conv1 -> encoder.conv1; bn0 -> encoder.bn1; layerK.i.* -> encoder.layerK.i.* except
    layerK.i.downsample.{0: conv, 1: z max-pool (no weights), 2: BN} -> encoder.layerK.i.downsample.{0: conv, 1: BN};
    upK / trans1 / final .{norm, conv, up} -> upK / proj / head .{0.0, 0.2, 1};
    denseK.denselayerJ.{bn1, conv1, bn2, conv2, bn3, conv3, bn4, conv4}
        -> denseK.(J-1).{reduce, inplane, through, fuse}.{0 (BN), 2 (conv)};
    psp.project_modules.i -> pyramid.project.i (only with include_pyramid=True; see below).
Every 5D weight (conv, transposed conv) has its 3 spatial axes reversed: a (7, 7, 3) kernel over (X, Y, Z)
becomes (3, 7, 7) over (D, H, W).

Two operations differ between the implementations without any weights involved; ``match_monai_ops`` makes
our model use MONAI's choice so that both compute the same function:
- MONAI upsamples with ``align_corners=True`` in trilinear mode (as the authors' code did under PyTorch < 0.4);
  ours uses ``align_corners=False``.
- MONAI's first max-pool is 2x2x2 stride 2 in "transpose" / "nearest" mode (3x3x3 stride 2 pad 1 in
  trilinear mode, as ours and the authors' always).
With pyramid levels on the designs differ on purpose (our adaptive pooling to 2^i grids vs MONAI's fixed
windows 8..64 with a projection conv that pads by 1 and window-sized transposed convs): weights can be
carried over with include_pyramid=True, but outputs are not expected to be equal.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Tuple

import torch
from torch import nn

from .pooling import MaxPool3d

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
    (r"psp\.project_modules\.(\d+)\.(weight|bias)", lambda m: f"pyramid.project.{m[1]}.{m[2]}"),
    (r"psp\.up_modules\.\d+\.(weight|bias)", lambda m: None),
)


def monai_key_to_ours(key: str) -> str | None:
    """Our state-dict key for a MONAI AHNet key; None for MONAI's pyramid upsampling convs (no counterpart).

    Raises MonaiPortError for a key of no known MONAI AHNet module.
    """
    for pattern, ours in _KEY_RULES:
        m = re.fullmatch(pattern, key)
        if m:
            return ours(m)
    raise MonaiPortError(f"state-dict key {key!r} is not a MONAI AHNet key this port knows")


def convert_monai_tensor(t: torch.Tensor) -> torch.Tensor:
    """Reverse the 3 spatial axes of a 5D weight ((O, I, X, Y, Z) -> (O, I, Z, Y, X)); other tensors as they are."""
    return t.permute(0, 1, 4, 3, 2).contiguous() if t.dim() == 5 else t.clone()


def convert_monai_state(monai_state: Mapping[str, torch.Tensor],
                        include_pyramid: bool = False) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(our state dict, MONAI keys dropped) for a MONAI AHNet state dict (3D, spatial_dims=3)."""
    out, dropped = {}, []
    for key, value in monai_state.items():
        ours = monai_key_to_ours(key)
        if key.startswith("psp.") and not include_pyramid:
            raise MonaiPortError(
                f"the MONAI state dict has pyramid weights ({key!r}); the pyramids differ by design (adaptive "
                "pooling here): pass include_pyramid=True to carry the projections over anyway, or use "
                "psp_block_num=0 / pfn_depth=0")
        if ours is None:
            dropped.append(key)
            continue
        out[ours] = convert_monai_tensor(value)
    return out, dropped


def load_monai_ahnet_state(model: nn.Module, monai_state_dict: Mapping[str, torch.Tensor],
                           include_pyramid: bool = False) -> List[str]:
    """Load a MONAI ``AHNet(spatial_dims=3)`` state dict into an ``AHNet3d`` with the same structure
    (encoder resnet50, same upsample mode, pfn_depth = psp_block_num, z_pool="paper", default dense blocks).

    Every parameter and buffer of `model` must be given, with the matching shape after the axis reversal;
    otherwise MonaiPortError names the first keys that differ. Returns the MONAI keys that were dropped
    (MONAI's pyramid transposed convs with include_pyramid=True). Use ``match_monai_ops`` as well for outputs
    equal to MONAI's.
    """
    state, dropped = convert_monai_state(monai_state_dict, include_pyramid)
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
    """Switch the two weight-free operations that differ to MONAI's choice, in place (see the module docstring):
    trilinear upsampling with align_corners=True; in transpose / nearest mode a 2x2x2 stride-2 first max-pool.
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
    return model
