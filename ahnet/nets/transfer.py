"""The 2D -> 3D transfer rule: a 2D ResNet encoder (from an MC-GCN checkpoint or a torchvision file) into the
3D AH-Net, and the check that the transfer is exact (``transfer_and_verify``, used by training's transfer step
and by ``python -m weights_transfer``).

Rules (paper, Sec. 2.2): the stem conv (64, 3, 7, 7) over 3 slices becomes (64, 1, 3, 7, 7) over one
channel, the 3 input channels (slices z-1, z, z+1) becoming the 3 taps along z; every other k x k conv
becomes (1, k, k); BatchNorm affine weights AND running statistics are copied (the public implementations
drop the statistics, so a transferred network in eval mode would not compute what the 2D one did).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ahnet.checkpoint import check_digest
from ahnet.nets.ahnet3d import AHNet3d
from ahnet.nets.resnet import RESNET_SPECS, ResNet2d, torchvision_encoder_state
from ahnet.nets.resnet3d import ResNet3dEncoder

TOLERANCE = 1e-4


class TransferError(ValueError):
    """The 2D source and the 3D target do not fit together (one sentence, actionable)."""


@dataclass
class Source2d:
    """A 2D encoder ready to transfer: torchvision-keyed state dict + what it came from."""
    state: Dict[str, torch.Tensor]
    depth: int
    origin: str
    in_slices: int = 3
    meta: Dict = field(default_factory=dict)


def infer_depth(state: Dict[str, torch.Tensor], origin: str = "state dict") -> int:
    """ResNet depth (18, 34, 50) from the keys of a torchvision-layout encoder state dict."""
    if "conv1.weight" not in state:
        raise TransferError(f"{origin} has no ResNet encoder (no 'conv1.weight' key)")
    kind = "bottleneck" if any(k.endswith("conv3.weight") for k in state if k.startswith("layer")) else "basic"
    blocks = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in state for m in [re.match(rf"layer{stage}\.(\d+)\.", k)] if m}
        blocks.append(max(idx) + 1 if idx else 0)
    for depth, (k, b) in RESNET_SPECS.items():
        if k == kind and tuple(blocks) == b:
            return depth
    raise TransferError(f"{origin} holds a ResNet with {kind} blocks {tuple(blocks)}, which is not ResNet18/34/50")


def load_source(path: str | Path) -> Source2d:
    """Read a 2D MC-GCN checkpoint of this project, or a torchvision ResNet state-dict file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"2D checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the user needs one sentence, whatever torch raised
        raise TransferError(f"{path} is not a readable checkpoint ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(obj, dict):
        raise TransferError(f"{path} holds a {type(obj).__name__}, not a checkpoint or state dict")
    check_digest(obj, path)                                         # a project checkpoint carries its digest
    if "model" in obj and isinstance(obj["model"], dict):          # this project's checkpoint
        name = obj.get("model_name")
        if name != "mcgcn":
            raise TransferError(f"{path} is a checkpoint of a {name!r} model; the transfer needs a 2D 'mcgcn' one")
        kwargs = dict(obj.get("model_kwargs") or {})
        in_slices = int(kwargs.get("in_slices", 3))
        state = {k[len("encoder."):]: v for k, v in obj["model"].items() if k.startswith("encoder.")}
        meta = {"model_name": name, "model_kwargs": kwargs, "epoch": obj.get("epoch"), "step": obj.get("step")}
        return Source2d(state, infer_depth(state, str(path)), str(path), in_slices, meta)
    state = {k: v for k, v in torchvision_encoder_state(obj).items() if isinstance(v, torch.Tensor)}
    in_slices = int(state["conv1.weight"].shape[1]) if "conv1.weight" in state else 3
    return Source2d(state, infer_depth(state, str(path)), str(path), in_slices, {"format": "torchvision"})


def source_from_model(encoder: ResNet2d, origin: str = "in-memory 2D encoder") -> Source2d:
    return Source2d({k: v.detach().clone() for k, v in encoder.state_dict().items()}, encoder.depth, origin,
                    encoder.in_channels)


def convert_state(state2d: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """2D encoder state (torchvision keys) -> 3D encoder state (same keys): stem (O, 3, 7, 7) -> (O, 1, 3, 7, 7),
    every other (O, I, k, k) -> (O, I, 1, k, k); BN weights, biases and running statistics as they are."""
    out = {}
    for key, value in state2d.items():
        if key == "conv1.weight":
            out[key] = value.unsqueeze(1).clone()
        elif value.dim() == 4:
            out[key] = value.unsqueeze(2).clone()
        else:
            out[key] = value.clone()
    return out


def check_fit(source: Source2d, depth_3d: int, in_channels_3d: int) -> None:
    if source.in_slices != 3:
        raise TransferError(f"{source.origin} takes {source.in_slices} input slices; the exact 2D -> 3D transfer "
                            f"maps exactly 3 slices onto the 7x7x3 stem (train the 2D stage with --in-slices 3)")
    if source.depth != depth_3d:
        raise TransferError(f"{source.origin} has a ResNet{source.depth} encoder but the 3D network asks for "
                            f"ResNet{depth_3d}: use --encoder resnet{source.depth} (or retrain the 2D stage)")
    if in_channels_3d != 1:
        raise TransferError(f"the 3-slice stem transfers to a 3D network with 1 input channel; got "
                            f"in_channels={in_channels_3d}")


def load_encoder_3d(encoder3d: ResNet3dEncoder, source: Source2d) -> None:
    """Copy `source` into a 3D encoder; every key must be used and every shape must match."""
    check_fit(source, encoder3d.depth, encoder3d.in_channels)
    state3d = convert_state(source.state)
    own = encoder3d.state_dict()
    missing, unexpected = sorted(set(own) - set(state3d)), sorted(set(state3d) - set(own))
    bad = [k for k in set(own) & set(state3d) if own[k].shape != state3d[k].shape]
    if missing or unexpected or bad:
        raise TransferError(f"{source.origin} does not map onto the 3D encoder: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}, shape mismatches {sorted(bad)[:5]}")
    encoder3d.load_state_dict(state3d, strict=True)


def transfer_2d_to_3d(source, **ahnet_kwargs) -> AHNet3d:
    """A new AHNet3d whose encoder carries the 2D weights. `source`: a path, a Source2d, a ResNet2d or an
    MCGCN. ahnet_kwargs go to AHNet3d; `encoder` defaults to the source's depth."""
    source = as_source(source)
    ahnet_kwargs.setdefault("encoder", f"resnet{source.depth}")
    model = AHNet3d(**ahnet_kwargs)
    load_encoder_3d(model.encoder, source)
    return model


def as_source(source) -> Source2d:
    if isinstance(source, Source2d):
        return source
    if isinstance(source, (str, Path)):
        return load_source(source)
    if isinstance(source, ResNet2d):
        return source_from_model(source)
    encoder = getattr(source, "encoder", None)
    if isinstance(encoder, ResNet2d):
        src = source_from_model(encoder, f"in-memory {type(source).__name__}")
        src.in_slices = int(getattr(source, "in_slices", 3))
        return src
    raise TypeError(f"cannot transfer from a {type(source).__name__}")


# ----------------------------------------------------------------------------------------------- verification
@torch.no_grad()
def calibrate_batchnorm(module: torch.nn.Module, inputs: torch.Tensor) -> None:
    """Set every BN's running statistics to the cumulative mean / variance over `inputs` (train-mode pass)."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    module(inputs)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    module.eval()


def fresh_encoder(depth: int, seed: int) -> ResNet2d:
    """A freshly initialised 2D encoder whose BN layers are not the identity, so a verification covers the
    statistics too: affine weights randomised (the last BN of each residual block small, as in trained
    ResNets), then running mean / variance measured on random 3-slice inputs, so features keep the scale a
    trained network has."""
    torch.manual_seed(seed)
    enc = ResNet2d(depth, 3)
    g = torch.Generator().manual_seed(seed)
    last_bn = "bn3" if enc.kind == "bottleneck" else "bn2"
    for name, m in enc.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            low, high = (0.05, 0.3) if name.endswith(last_bn) else (0.5, 1.5)
            m.weight.data = low + (high - low) * torch.rand(m.num_features, generator=g)
            m.bias.data = 0.1 * torch.randn(m.num_features, generator=g)
    calibrate_batchnorm(enc, torch.randn(8, 3, 64, 64, generator=g))
    return enc


@dataclass
class CheckRow:
    """One stage of the verification. Errors are max |3D - 2D| over all slices and channels."""
    check: str
    stage: str
    shape: Tuple[int, ...]
    max_abs_value: float      # max |2D feature|: the scale the errors are read against
    err_float32: float
    err_float64: float

    @property
    def ok(self) -> bool:
        """float32 within TOLERANCE (scaled by the feature magnitude where it exceeds 1: float32 carries about
        7 significant digits) and float64 within 1e-9 of the same scale (the mapping itself is exact)."""
        scale = max(1.0, self.max_abs_value)
        return self.err_float32 < TOLERANCE * scale and self.err_float64 < 1e-9 * scale


def slice_stacks(volume: torch.Tensor) -> torch.Tensor:
    """(D, H, W) -> (D, 3, H, W): for each slice z the stack (z-1, z, z+1), zeros beyond the ends."""
    padded = torch.nn.functional.pad(volume, (0, 0, 0, 0, 1, 1))
    return torch.stack([padded[:-2], padded[1:-1], padded[2:]], 1)


@torch.no_grad()
def _stage_errors(source: Source2d, state3d: Dict[str, torch.Tensor], volume: torch.Tensor, dtype: torch.dtype):
    enc2d = ResNet2d(source.depth, 3).eval()
    enc2d.load_state_dict(source.state, strict=True)
    enc3d = ResNet3dEncoder(source.depth, 1, (False,) * 5).eval()
    enc3d.load_state_dict(state3d, strict=True)
    enc2d, enc3d, volume = enc2d.to(dtype), enc3d.to(dtype), volume.to(dtype)
    stacks = slice_stacks(volume)                       # (D, 3, H, W)
    stem3d = enc3d.relu(enc3d.bn1(enc3d.conv1(volume[None, None])))[0].transpose(0, 1)
    stem2d = enc2d.relu(enc2d.bn1(enc2d.conv1(stacks)))
    pairs = [(stem2d, stem3d)]
    for f2, f3 in zip(enc2d(stacks), enc3d(volume[None, None])):   # (D, C, h, w) and (1, C, D, h, w)
        pairs.append((f2, f3[0].transpose(0, 1)))
    out = []
    for f2, f3 in pairs:
        err = (f3 - f2).abs().max().item() if f3.shape == f2.shape else float("inf")
        out.append((tuple(f3.shape), f2.abs().max().item(), err))
    return out


def verify_transfer(source: Source2d, state3d: Optional[Dict[str, torch.Tensor]] = None,
                    size: Tuple[int, int, int] = (5, 64, 64), seed: int = 0) -> List[CheckRow]:
    """Run the 2D encoder on every 3-slice stack and the transferred 3D encoder (z-pooling off) on the volume.

    (a) stem: each 3D output slice vs the 2D stem (conv1-bn1-relu) on that slice's stack;
    (b) every stage of the encoder (stem, max-pool, layer1..4) at every slice. Both in eval mode (running
    statistics), in float32 and again in float64. `state3d`: the 3D encoder state to check (default: convert
    `source` here).
    """
    state3d = state3d if state3d is not None else convert_state(source.state)
    volume = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    r32 = _stage_errors(source, state3d, volume, torch.float32)
    r64 = _stage_errors(source, state3d, volume, torch.float64)
    names = [("(a) stem 7x7x3", "conv1-bn1-relu")] + [("(b) encoder", n) for n in
                                                      ("stem", "max-pool", "layer1", "layer2", "layer3", "layer4")]
    return [CheckRow(c, n, a[0], a[1], a[2], b[2]) for (c, n), a, b in zip(names, r32, r64)]


def format_table(rows: List[CheckRow]) -> str:
    lines = [f"{'check':<16} {'stage':<16} {'features (D, C, h, w)':<24} {'max |2D|':>9} "
             f"{'max |3D-2D| fp32':>17} {'fp64':>10}  result", "-" * 104]
    for r in rows:
        lines.append(f"{r.check:<16} {r.stage:<16} {str(r.shape):<24} {r.max_abs_value:>9.3g} "
                     f"{r.err_float32:>17.2e} {r.err_float64:>10.1e}  {'ok' if r.ok else 'FAIL'}")
    lines.append(f"pass: fp32 error < {TOLERANCE:g} x max(1, max |2D|) and fp64 error < 1e-9 x max(1, max |2D|); "
                 f"eval mode (BN running statistics)")
    return "\n".join(lines)


def transfer_and_verify(source, check_size: Tuple[int, int, int] = (5, 64, 64), seed: int = 0,
                        **ahnet_kwargs) -> Tuple[AHNet3d, List[CheckRow]]:
    """(the transferred AHNet3d, its verification rows): transfer_2d_to_3d, then verify_transfer of the new
    encoder against the 2D one on a random (D, H, W) = ``check_size`` volume. Whether every row is ``ok`` is for
    the caller to act on (format_table prints them)."""
    source = as_source(source)
    if len(check_size) != 3 or min(int(v) for v in check_size) < 1:
        raise TransferError(f"the check size must be three positive sizes (D, H, W); got {tuple(check_size)}")
    model = transfer_2d_to_3d(source, **ahnet_kwargs)
    return model, verify_transfer(source, model.encoder.state_dict(), tuple(int(v) for v in check_size), seed)
