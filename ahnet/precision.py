"""Where and how a run computes: the device (``--device``), the autocast choice (``--amp``) and channels-last 3D.

Device: ``resolve_device`` is the one reader of ``--device`` (auto = CUDA when torch sees a GPU, else the CPU).

AMP modes: ``auto`` (float16 + GradScaler on CUDA, float32 on a CPU), ``fp16`` (CUDA only), ``bf16`` (a CPU or a
bfloat16-capable GPU; no scaler: bfloat16 has float32's exponent range), ``off`` (float32). On a CPU, bfloat16
pays where the CPU computes it natively (AVX512-BF16 or AMX: ``cpu_native_bf16()``); elsewhere it is emulated
and slower than float32. ``auto`` stays float32 on every CPU so that CPU results do not depend on the CPU model.

channels-last 3D (N, C, D, H, W stored as N, D, H, W, C): oneDNN's and cuDNN's preferred layout for reduced
precision convolutions; the same values in another order (``to_channels_last``), a speed lever only.

Kernels (``configure_kernels``, ``--deterministic``): by default cuDNN autotunes (benchmark mode: the fastest
algorithm per shape, timed at its first use; the choice, and with it the rounding, can differ from run to run),
and the backward of overlapping max-pooling (AH-Net's stem) accumulates with atomic adds. Deterministic: no
autotuning, cuDNN's deterministic algorithms, CUBLAS_WORKSPACE_CONFIG=:4096:8 for cuBLAS (read when CUDA starts
in this process) and torch.use_deterministic_algorithms(warn_only=True), which switches max-pooling's backward to
its deterministic kernel. Two CUDA kernels of AH-Net's backward pass have no deterministic version and stay
run-to-run variable (atomic adds; torch warns naming them): the trilinear upsampling (decoder and pyramid,
``upsample="trilinear"``, the default) and adaptive max-pooling where a pyramid grid does not divide the map.
``upsample="nearest"`` at the usual sizes avoids both (paper_notes/training.md "Determinism on CUDA").
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: the values of --amp, in every CLI and in TrainConfig
AMP_MODES = ("auto", "fp16", "bf16", "off")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when torch sees a GPU, else cpu; otherwise a torch device name (cpu, cuda, cuda:1, ...).

    Raises ValueError in one sentence for a name that is not a device, or a CUDA device this torch cannot see.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a torch device; use auto, cpu, cuda or cuda:<index>.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} asked for a GPU but this torch ({torch.__version__}) sees none; use "
                             f"--device cpu or auto.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), numbered from "
                             f"0; use cuda:0 .. cuda:{torch.cuda.device_count() - 1}.")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {name}: this torch has no Apple GPU (MPS) backend here; use --device cpu.")
    elif dev.type != "cpu":
        raise ValueError(f"--device {name}: only cpu, cuda and mps devices are supported; use auto, cpu or cuda.")
    return dev


@dataclass(frozen=True)
class AmpSettings:
    dtype: torch.dtype | None     # autocast dtype; None = float32, autocast off
    scaler: bool                  # use a GradScaler (fp16 only)

    @property
    def name(self) -> str:
        return {None: "off", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    def autocast(self, device: torch.device):
        """The autocast context of these settings on ``device`` (a no-op for float32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def cpu_native_bf16() -> bool:
    """True when oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 / AMX), where bf16 beats float32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(amp: str | bool | None, device: torch.device, flag: str = "--amp") -> AmpSettings:
    """auto (or True): fp16 + scaler on CUDA, off on CPU; fp16 needs CUDA; bf16 on CPU or a bf16-capable GPU;
    off (or False / None): float32. Raises ValueError with the fix in one sentence, naming the option ``flag``."""
    if amp is True:
        amp = "auto"
    if amp is False or amp is None:
        amp = "off"
    if amp == "auto":
        amp = "fp16" if device.type == "cuda" else "off"
    if amp == "off":
        return AmpSettings(None, False)
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError(f"{flag} fp16 needs a CUDA device (GradScaler); on CPU use {flag} bf16 or {flag} off.")
        return AmpSettings(torch.float16, True)
    if amp == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"{flag} bf16: this GPU has no bfloat16 support; use {flag} fp16 or {flag} off.")
        return AmpSettings(torch.bfloat16, False)
    raise ValueError(f"{flag} must be one of {', '.join(AMP_MODES)}, got {amp!r}.")


def configure_kernels(device: torch.device, deterministic: bool = False) -> None:
    """cuDNN autotuning on CUDA (the default), or deterministic kernels wherever they exist (module docstring).
    Call before the first CUDA operation of the process so that the cuBLAS setting takes effect."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = bool(deterministic)


#: how a DepthGuardedConv3d computes an affected call: "pad" (the default: the depth padding applied to the input
#: first, the convolution then unpadded in depth, all in bfloat16), "float32" (the first guard: the call in
#: float32), "off" (the plain kernel and its wrong weight gradient; for measuring what a guard costs only)
GUARD_MODES = ("pad", "float32", "off")


def bf16_depth_bug(x: torch.Tensor, kernel_depth: int) -> bool:
    """True where PyTorch's CPU bfloat16 Conv3d gets the weight gradient wrong: CPU bf16 autocast and an input
    depth D (the first spatial axis) with 1 < D < kernel depth (DepthGuardedConv3d)."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and 1 < x.shape[2] < kernel_depth)


class DepthGuardedConv3d(nn.Conv3d):
    """A Conv3d that avoids PyTorch's CPU bfloat16 kernel where it gets the weight gradient wrong.

    Found here (torch 2.13 CPU, oneDNN): under CPU bf16 autocast, a Conv3d whose input depth D satisfies
    1 < D < kernel depth (a 3x1x1 or 3x3x3 conv on a 2-slice feature map, the deepest levels of a thin patch)
    returns a weight gradient of 1e16..inf or NaN (fp32 is exact, the forward is fine). One such step writes
    inf into Adam's moments and the run diverges (the issue's "20 non-finite losses in a row"). Only the depth
    axis: the same kernel along H or W (MONAI's slice-last layout puts depth last) is right.

    ``guard_mode`` (GUARD_MODES) says what an affected call does. "pad" (default): zero-pad the input in depth by
    the conv's own depth padding and convolve with depth padding 0. That is the same convolution (the same
    products and sums, in bfloat16), and the kernel then sees a depth D + 2p >= kernel depth, where it is right
    (tested against float32 gradients); it costs one small copy of a deep, thin map. A conv with depth stride or
    dilation other than 1, or a padding mode other than zeros, takes "float32" instead: the call in float32,
    as the first guard did for every affected call (what each costs: paper_notes/performance.md).
    """

    guard_mode = "pad"

    def forward(self, x):
        if self.guard_mode == "off" or not bf16_depth_bug(x, self.kernel_size[0]):
            return super().forward(x)
        if self.guard_mode == "pad" and self._pads_in_depth():
            p = self.padding[0]
            return F.conv3d(F.pad(x, (0, 0, 0, 0, p, p)), self.weight, self.bias, self.stride,
                            (0, self.padding[1], self.padding[2]), self.dilation, self.groups)
        with torch.autocast("cpu", enabled=False):
            return super().forward(x.float())

    def _pads_in_depth(self) -> bool:
        return (self.padding_mode == "zeros" and isinstance(self.padding, tuple) and self.stride[0] == 1
                and self.dilation[0] == 1)


def guard_cpu_bf16_convs(model: nn.Module, mode: str = "pad") -> int:
    """Turn every plain nn.Conv3d of ``model`` into a DepthGuardedConv3d (in place: same parameters and
    state-dict keys) computing affected calls by ``mode`` (GUARD_MODES); returns how many were turned. Training
    on CPU under bf16 calls it; inference does not need it (the forward is right). A second call sets ``mode``
    on the guarded convs again."""
    if mode not in GUARD_MODES:
        raise ValueError(f"guard mode must be one of {', '.join(GUARD_MODES)}; got {mode!r}")
    n = 0
    for m in model.modules():
        if type(m) is nn.Conv3d:
            m.__class__ = DepthGuardedConv3d
            n += 1
        if isinstance(m, DepthGuardedConv3d):
            m.guard_mode = mode
    return n


def guard_training(model: nn.Module, amp: AmpSettings, device: torch.device) -> int:
    """What a training does before its first step: the depth guard on every Conv3d of ``model`` when it trains on
    a CPU under bf16 (where the kernel bug lives), nothing otherwise; returns how many convs were turned."""
    if device.type == "cpu" and amp.dtype == torch.bfloat16:
        return guard_cpu_bf16_convs(model)
    return 0


def to_channels_last(obj):
    """A 5D tensor or a module with 5D parameters in channels-last 3D (modules in place, returned); 4D and
    other tensors unchanged."""
    if isinstance(obj, nn.Module):
        return obj.to(memory_format=torch.channels_last_3d)
    if isinstance(obj, torch.Tensor) and obj.ndim == 5:
        return obj.contiguous(memory_format=torch.channels_last_3d)
    return obj
