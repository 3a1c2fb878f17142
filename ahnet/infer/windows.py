"""Sliding windows over whole volumes: padding, Gaussian blending, flip TTA, model ensembles (tensors in, tensors out).

``sliding_window_predict(models, image)`` returns foreground probabilities (sigmoid of the models' logits) for a
(1, C, D, H, W) volume of any size:
- Sizes: each model's ``input_multiple`` (one int per spatial axis; 1 when a model has none) sets what a window
  must divide by (the least common multiple over the ensemble). ``window=None`` means one window covering the
  whole volume rounded up to that multiple. A given window must already be a multiple (ValueError otherwise).
  The volume is padded at the high end of each axis with ``pad_value`` (0 = air after the cache's [0, 1]
  scaling) to at least the window, and the output is cropped back to the input's size.
- Windows: per axis, ceil((L - w) / (w (1 - overlap))) + 1 starts spread evenly from 0 to L - w (the last
  window ends flush with the volume). They are streamed in batches of ``batch_size`` windows.
- Blending: each window's probabilities are weighted by a Gaussian importance map (sigma = window / 8 per
  axis, centred, max 1, clamped below at 1e-6 so no voxel has zero weight; nnU-Net's choice) or uniformly
  (``blend="constant"``), summed into the float32 output on ``out_device``, and divided by the sum of the
  weights slab by slab (``_Blend``). Memory beyond the output: one slab of the window's depth x H x W for the
  weights, and the batches of windows in flight, so a longer scan needs no more (paper_notes/performance.md).
- Workers (``workers=N``): N threads predict batches of windows side by side, one intra-op thread each (on a
  CPU with small window batches this uses the cores better than one forward pass on N intra-op threads); the
  calling thread blends them in order, so the result is the same.
- TTA (``flip_tta=True``): the mean of the probabilities over the 4 in-plane flips (none, H, W, H and W), each
  flipped back. Ensemble: the mean of the probabilities over all models (and flips), each model in eval mode
  (its previous mode is restored afterwards).
- Device: ``device=None`` uses the first model's parameter device. ``amp``: True / "auto" = float16 autocast on
  CUDA, float32 on a CPU; "bf16" = bfloat16 autocast (CPU or CUDA; 2x faster than float32 on a CPU with native
  bfloat16, see paper_notes/performance.md); "fp16" (CUDA); False / "off". Probabilities are computed and
  accumulated in float32. ``channels_last=True`` (3D) converts the models (in place) and every window batch to
  channels-last 3D memory: the same values, faster with bf16 / AMP.

``slicewise_predict(models, image)`` applies 2D models (input (N, S, H, W) slice stacks, e.g. MC-GCN) slice by
slice with S-slice stacks centred on each slice (edge slices repeated at the volume's ends).

``WindowSettings`` keeps the settings of one sliding-window inference together, as MONAI's SlidingWindowInferer
keeps roi_size, overlap and sw_batch_size: the window (D, H, W) or None (the window rule's choice,
ahnet.infer.window_for), the overlap in [0, 1) and the windows per forward pass (or per request to a server).
Its fields are predict_volume's keywords. Every command that slides windows declares its options with
``add_window_arguments`` (the same flags, types and ranges: argparse refuses a bad value in one line, exit 2,
before anything runs) and reads them back with ``WindowSettings.from_arguments``; a library caller gets the same
ranges when it builds one (InferenceInputError).
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import math
import numbers
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ahnet import failures
from ahnet.precision import AmpSettings, resolve_amp, to_channels_last

FLIPS = ((), (-2,), (-1,), (-2, -1))   # in-plane flips of (..., H, W)


class InferenceInputError(ValueError):
    """A volume, window or option that sliding-window inference cannot use."""


#: the largest window side and the most windows per pass the options take (voxels; windows)
MAX_WINDOW, MAX_WINDOW_BATCH = 4096, 4096


def check_overlap(overlap) -> float:
    """``overlap`` as a float in [0, 1) (the share of a window its neighbour covers); InferenceInputError else."""
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real) or not 0 <= overlap < 1:
        raise InferenceInputError(f"window overlap {overlap!r} must be a fraction in [0, 1) (--overlap)")
    return float(overlap)


def check_window_batch(batch) -> int:
    """``batch`` (windows per forward pass) as an int in [1, MAX_WINDOW_BATCH]; InferenceInputError else."""
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or not 1 <= batch <= MAX_WINDOW_BATCH:
        raise InferenceInputError(f"windows per pass {batch!r} must be an integer in [1, {MAX_WINDOW_BATCH}]")
    return int(batch)


@dataclass(frozen=True)
class WindowSettings:
    """One sliding-window inference's settings (the module docstring); checked when built."""
    window: tuple | None = None    # (D, H, W) voxels, or None: the window rule's choice (ahnet.infer.window_for)
    overlap: float = 0.5           # in [0, 1)
    sw_batch: int = 8              # windows per forward pass (per request to a server; x4 slices for 2D models);
                                   # 8 rather than 2: a demo scan 1.5-2x faster on 2 CPU cores (performance.md)

    def __post_init__(self):
        if self.window is not None:
            w = tuple(self.window)
            if len(w) != 3 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                      and 1 <= v <= MAX_WINDOW for v in w):
                raise InferenceInputError(f"window {self.window!r} must be three sizes D H W in [1, {MAX_WINDOW}] "
                                          f"(--window)")
            object.__setattr__(self, "window", tuple(int(v) for v in w))
        object.__setattr__(self, "overlap", check_overlap(self.overlap))
        object.__setattr__(self, "sw_batch", check_window_batch(self.sw_batch))

    @classmethod
    def from_arguments(cls, a) -> "WindowSettings":
        """The settings of options parsed from add_window_arguments (--overlap alone: the rest at defaults)."""
        d = {k: getattr(a, k) for k in ("window", "overlap", "sw_batch") if hasattr(a, k)}
        if d.get("window") is not None:
            d["window"] = tuple(d["window"])
        return cls(**d)

    @classmethod
    def take(cls, kw: dict) -> "WindowSettings":
        """The settings among keyword arguments ``kw`` (removed from it), the others left for predict_volume."""
        return cls(**{k: kw.pop(k) for k in ("window", "overlap", "sw_batch") if k in kw})

    def kwargs(self) -> dict:
        """{"window", "overlap", "sw_batch"}: predict_volume's keywords."""
        return asdict(self)


def add_window_arguments(ap, window: bool = True, batch_flag: str | None = "--sw-batch",
                         batch_default: int = WindowSettings.sw_batch, window_help: str | None = None,
                         overlap_help: str | None = None, batch_help: str | None = None) -> None:
    """Add the sliding-window options to parser ``ap``: --window D H W (unless ``window`` is False), --overlap,
    and ``batch_flag`` (dest sw_batch; None: no batch option), each range-checked by argparse. The help texts
    may be given where a command says more (its default window, what a batch is)."""
    if window:
        ap.add_argument("--window", type=failures.number(int, 1, MAX_WINDOW), nargs=3, default=None,
                        metavar=("D", "H", "W"), help=window_help or "3D window (default: the runs' training "
                        "patch_size, else ahnet.infer.DEFAULT_WINDOW; ahnet.infer.window_for)")
    ap.add_argument("--overlap", type=failures.number(float, 0, 1, hi_open=True), default=WindowSettings.overlap,
                    help=overlap_help or "window overlap fraction in [0, 1)")
    if batch_flag:
        ap.add_argument(batch_flag, dest="sw_batch", type=failures.number(int, 1, MAX_WINDOW_BATCH),
                        default=batch_default, help=batch_help or "windows per forward pass (x4 slices for 2D models)")


def _as_models(models):
    if isinstance(models, nn.Module):
        return [models]
    models = list(models)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise InferenceInputError("models must be an nn.Module or a non-empty list of nn.Modules")
    return models


def input_multiple(models, ndim: int = 3) -> tuple:
    """Per-axis least common multiple of the models' ``input_multiple`` (1 for a model without one)."""
    mult = [1] * ndim
    for m in _as_models(models):
        mm = getattr(m, "input_multiple", None)
        if mm is None:
            continue
        mm = tuple(int(v) for v in mm)
        if len(mm) != ndim:
            raise InferenceInputError(f"{type(m).__name__}.input_multiple {mm} has {len(mm)} axes; expected {ndim}")
        mult = [math.lcm(a, b) for a, b in zip(mult, mm)]
    return tuple(mult)


def gaussian_importance(window, sigma_scale: float = 1 / 8, min_value: float = 1e-6) -> torch.Tensor:
    """(D, H, W) float32 Gaussian weights, max 1, sigma = window * sigma_scale per axis, centred at (w - 1) / 2."""
    axes = []
    for w in window:
        t = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
        s = max(w * sigma_scale, 1e-6)
        axes.append(np.exp(-0.5 * (t / s) ** 2))
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    g = g / g.max()
    return torch.from_numpy(np.maximum(g, min_value).astype(np.float32))


def window_starts(length: int, window: int, overlap: float) -> list:
    """Start indices of windows of size ``window`` covering [0, length) (length >= window) with ``overlap``."""
    if length <= window:
        return [0]
    step = max(window * (1.0 - overlap), 1.0)
    n = int(math.ceil((length - window) / step)) + 1
    return sorted({int(round(v)) for v in np.linspace(0, length - window, n)})


def _device_of(model, device):
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _amp_settings(amp, device):
    try:
        return resolve_amp(amp, device)
    except ValueError as e:
        raise InferenceInputError(str(e)) from None


@contextlib.contextmanager
def _eval_mode(models):
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, t in zip(models, modes):
            m.train(t)


def _activate(logits, activation):
    logits = logits.float()
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    if activation == "softmax":
        return torch.softmax(logits, dim=1)
    if activation is None or activation == "none":
        return logits
    raise InferenceInputError(f"activation {activation!r} is not known; expected 'sigmoid', 'softmax' or None")


def _predict_batch(models, x, flips, device, amp: AmpSettings, activation):
    """Mean probability over models x flips for a batch x (B, C, *spatial) already on ``device``."""
    total = None
    for m in models:
        for f in flips:
            xi = torch.flip(x, f) if f else x
            with amp.autocast(device):
                y = m(xi)
            if y.shape[2:] != xi.shape[2:]:
                raise InferenceInputError(f"{type(m).__name__} returned spatial size {tuple(y.shape[2:])} for "
                                          f"input {tuple(xi.shape[2:])}; expected the same size")
            p = _activate(y, activation)
            if f:
                p = torch.flip(p, f)
            total = p if total is None else total + p
    return total / (len(models) * len(flips))


def _as_volume(image, ndim_spatial):
    x = torch.as_tensor(image)
    if x.ndim != ndim_spatial + 2 or x.shape[0] != 1:
        want = "(1, C, D, H, W)" if ndim_spatial == 3 else "(1, C, H, W)"
        raise InferenceInputError(f"image has shape {tuple(x.shape)}; expected {want} (one volume, N = 1)")
    return x.float()


def _window_batches(models, x, sls_batches, window_weight, flips, dev, amp, activation, channels_last, workers):
    """(window slices, weighted probabilities (B, C, *window)) of every batch, in order: computed in this thread, or
    by ``workers`` threads with one intra-op thread each (at most 2 x workers batches ahead), each under its own
    no-grad and autocast (both are per thread)."""
    def predict(sls):
        xb = torch.cat([x[(slice(None), slice(None)) + sl] for sl in sls], 0).to(dev)
        if channels_last:
            xb = to_channels_last(xb)
        with torch.no_grad():
            return sls, _predict_batch(models, xb, flips, dev, amp, activation) * window_weight

    if workers <= 1:
        yield from map(predict, sls_batches)
        return
    pending = collections.deque()
    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for sls in sls_batches:
            pending.append(pool.submit(predict, sls))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _Blend:
    """The weighted sum of the windows' probabilities, written into the output itself, and the sum of their
    weights over a rolling slab of one window's depth: the windows come in order of their depth start, so once
    one starts at z every slice before z is complete and is divided by its weights there. Beyond the output
    (the result, the volume's size), memory is one slab (window depth x H x W) and a batch of windows."""

    def __init__(self, channels: int, padded, window, device):
        self.out = torch.zeros((channels,) + tuple(padded), dtype=torch.float32, device=device)
        self.depth = window[0]
        self.wsum = torch.zeros((1, self.depth) + tuple(padded[1:]), dtype=torch.float32, device=device)
        self.z0 = 0                                        # the volume slice that wsum[:, 0] holds

    def _finish_to(self, z: int) -> None:
        """Divide slices [z0, z) by their weights and move the slab to start at z."""
        n = min(z, self.out.shape[1]) - self.z0
        if n <= 0:
            return
        self.out[:, self.z0:self.z0 + n] /= self.wsum[:, :n]
        self.wsum = torch.cat([self.wsum[:, n:], torch.zeros_like(self.wsum[:, :n])], 1)
        self.z0 += n

    def add(self, sl, prob, weight) -> None:
        self._finish_to(sl[0].start)
        self.out[(slice(None),) + sl] += prob
        local = (slice(None), slice(sl[0].start - self.z0, sl[0].stop - self.z0)) + sl[1:]
        self.wsum[local] += weight

    def result(self) -> torch.Tensor:
        self._finish_to(self.out.shape[1])
        return self.out


def sliding_window_predict(models, image, window=None, overlap: float = 0.5, batch_size: int = 4,
                           flip_tta: bool = False, amp: bool | str = True, device=None, out_device="cpu",
                           activation="sigmoid", blend: str = "gaussian", pad_value: float = 0.0,
                           channels_last: bool = False, workers: int = 1) -> torch.Tensor:
    """Probabilities (1, C_out, D, H, W) float32 on ``out_device`` for a (1, C, D, H, W) volume.

    models: one nn.Module or a list (ensemble, mean probability); window: (D, H, W) or None (whole volume).
    workers: threads that predict batches of windows side by side, one intra-op thread each (1: the calling
    thread, with its own thread count); the same windows and blending, so the same result.
    """
    models = _as_models(models)
    x = _as_volume(image, 3)
    overlap, batch_size = check_overlap(overlap), check_window_batch(batch_size)
    if int(workers) < 1:
        raise InferenceInputError(f"workers {workers} must be >= 1")
    if blend not in ("gaussian", "constant"):
        raise InferenceInputError(f"blend {blend!r} is not known; expected 'gaussian' or 'constant'")
    shape = tuple(x.shape[2:])
    mult = input_multiple(models, 3)
    if window is None:
        window = tuple(int(math.ceil(s / m)) * m for s, m in zip(shape, mult))
    window = tuple(int(w) for w in window)
    if len(window) != 3 or min(window) < 1:
        raise InferenceInputError(f"window {window} must be three positive sizes (D, H, W)")
    bad = [(w, m) for w, m in zip(window, mult) if w % m]
    if bad:
        raise InferenceInputError(f"window {window} must divide by the models' input_multiple {mult} on every axis")
    padded = tuple(max(s, w) for s, w in zip(shape, window))
    pad = [0, 0] * 3
    for ax in range(3):                                    # F.pad order: last axis first
        pad[2 * (2 - ax) + 1] = padded[ax] - shape[ax]
    if any(pad):
        x = torch.nn.functional.pad(x, pad, value=pad_value)
    dev = _device_of(models[0], device)
    amp = _amp_settings(amp, dev)
    if channels_last:
        for m in models:
            to_channels_last(m)
    out_device = torch.device(out_device)
    imp = gaussian_importance(window) if blend == "gaussian" else torch.ones(window)
    starts = list(itertools.product(*(window_starts(L, w, overlap) for L, w in zip(padded, window))))
    sls = [tuple(slice(s, s + w) for s, w in zip(st, window)) for st in starts]
    batches = [sls[b:b + batch_size] for b in range(0, len(sls), batch_size)]
    acc, w_out = None, imp.to(out_device)
    with torch.no_grad(), _eval_mode(models):
        for chunk, pb in _window_batches(models, x, batches, imp.to(dev), FLIPS if flip_tta else ((),), dev, amp,
                                         activation, channels_last, int(workers)):
            if acc is None:
                acc = _Blend(pb.shape[1], padded, window, out_device)
            pb = pb.to(out_device)
            for i, sl in enumerate(chunk):
                acc.add(sl, pb[i], w_out)
    out = acc.result()
    if padded != shape:
        out = out[(slice(None),) + tuple(slice(0, s) for s in shape)].contiguous()
    return out.unsqueeze(0)


def slicewise_predict(models, image, in_slices: int = 3, batch_size: int = 8, flip_tta: bool = False,
                      amp: bool | str = True, device=None, out_device="cpu", activation="sigmoid",
                      pad_value: float = 0.0) -> torch.Tensor:
    """Apply 2D models slice by slice: (1, 1, D, H, W) -> probabilities (1, C_out, D, H, W) float32.

    Each slice z is predicted from the stack of slices z - in_slices//2 .. z + in_slices//2 (indices clamped to
    the volume, so end slices repeat) given as channels (N, in_slices, H, W). In-plane sizes are padded at the
    high end to the models' 2-axis input_multiple and cropped back.
    """
    models = _as_models(models)
    x = _as_volume(image, 3)
    if x.shape[1] != 1:
        raise InferenceInputError(f"image has {x.shape[1]} channels; slice-by-slice inference expects 1")
    if in_slices < 1 or in_slices % 2 == 0:
        raise InferenceInputError(f"in_slices {in_slices} must be odd and >= 1 (a stack centred on each slice)")
    D, H, W = x.shape[2:]
    mh, mw = input_multiple(models, 2)
    Hp, Wp = int(math.ceil(H / mh)) * mh, int(math.ceil(W / mw)) * mw
    vol = x[0, 0]
    if (Hp, Wp) != (H, W):
        vol = torch.nn.functional.pad(vol, [0, Wp - W, 0, Hp - H], value=pad_value)
    dev = _device_of(models[0], device)
    amp = _amp_settings(amp, dev)
    out_device = torch.device(out_device)
    half = in_slices // 2
    out = None
    with torch.no_grad(), _eval_mode(models):
        for z0 in range(0, D, batch_size):
            zs = range(z0, min(z0 + batch_size, D))
            idx = torch.tensor([[min(max(z + o, 0), D - 1) for o in range(-half, half + 1)] for z in zs])
            xb = vol[idx].to(dev)                                    # (B, S, Hp, Wp)
            pb = _predict_batch(models, xb, flips=FLIPS if flip_tta else ((),), device=dev, amp=amp,
                                activation=activation).to(out_device)
            if out is None:
                out = torch.zeros((pb.shape[1], D, H, W), dtype=torch.float32, device=out_device)
            out[:, z0:z0 + len(zs)] = pb[:, :, :H, :W].permute(1, 0, 2, 3)
    return out.unsqueeze(0)
