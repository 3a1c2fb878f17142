"""Trained runs as an ensemble, and one volume through it.

    ens = load_ensemble(["runs/A", "runs/B/checkpoints/best.pt", "runs/X"], device="cpu")
    prob = predict_volume(ens, image01)   # (z, y, x) float32 scaled to [0, 1] -> (z, y, x) float32 probabilities

Runs: each argument is resolved by ``ahnet.paths.resolve_checkpoints`` (a checkpoint file, a run folder's
trained checkpoint, or every fold of a cross-validation ``X`` = ``X-fold<k>``). Each checkpoint's model is rebuilt
from its ``model_name`` and ``model_kwargs`` through the registry (``ahnet.nets.MODELS``), in eval mode; the
registry's ``dims`` says how it runs: 3 = 3D sliding windows (``sliding_window_predict``), 2 = slice by slice on
stacks of its ``in_slices`` slices (``slicewise_predict``). The ensemble's probability is the mean over all its
models; a mix of 2D and 3D models only with ``allow_mixed``.

The window rule (3D), the one every caller uses (``window_for``): an explicit window must divide by the
ensemble's input multiple (D, H, W); without one, the largest training ``patch_size`` of the 3D runs (or
``DEFAULT_WINDOW`` for checkpoints without a training config) rounded up to the multiple. Either is then capped
at the volume's shape rounded up to the multiple, so a window never exceeds the padded volume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ahnet import paths
from ahnet.checkpoint import load_checkpoint
from ahnet.nets import build_model, model_spec
from ahnet.nets.fold import fold_batchnorm
from ahnet.precision import AMP_MODES, resolve_amp, resolve_device
from ahnet.infer.windows import (InferenceInputError, WindowSettings, input_multiple, slicewise_predict,
                                 sliding_window_predict)

DEFAULT_WINDOW = (64, 192, 192)   # (D, H, W) voxels: for 3D checkpoints whose training config gives no patch_size

__all__ = ["DEFAULT_WINDOW", "Member", "Ensemble", "load_member", "load_ensemble", "window_for", "predict_volume"]


@dataclass
class Member:
    """One model of an ensemble: the module (eval mode, on the ensemble's device) and where it came from."""
    model: nn.Module
    name: str            # registry name: ahnet, mcgcn, unet3d
    dims: int            # 3: volumes by sliding windows; 2: slice stacks, slice by slice
    kwargs: dict         # model_kwargs: build_model(name, **kwargs) rebuilds it
    config: dict         # the training settings saved in the checkpoint ({} when there are none)
    path: Path           # the checkpoint file
    data_spacing: tuple | None = None   # (sz, sy, sx) mm: the training scans' median spacing, where recorded

    @property
    def in_slices(self) -> int:
        """Slices per stack of a 2D model (its input channels)."""
        return int(self.kwargs.get("in_slices", 3))

    @property
    def patch_size(self) -> tuple | None:
        """The (D, H, W) training patch of a 3D model, when its checkpoint says."""
        ps = self.config.get("patch_size")
        if ps is None or self.dims != 3:
            return None
        if len(ps) != 3:
            raise InferenceInputError(f"checkpoint {self.path} has config patch_size {ps}; expected (D, H, W)")
        return tuple(int(v) for v in ps)


def load_member(checkpoint: str | Path, device: str | torch.device = "cpu") -> Member:
    """The model of one checkpoint file, rebuilt and loaded, in eval mode on ``device``, its BatchNorms folded into
    the convolutions before them where it has such pairs (ahnet.nets.fold; for inference). Raises CheckpointError
    (not a checkpoint) or InferenceInputError (a model that cannot be rebuilt, or is not a 1-channel-in,
    1-channel-out foreground model), each in one sentence naming the file."""
    path = Path(checkpoint)
    ck = load_checkpoint(path)
    name, kw = ck["model_name"], dict(ck["model_kwargs"])
    try:
        spec = model_spec(name)
        model = build_model(name, **kw)
        model.load_state_dict(ck["model"])
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise InferenceInputError(f"{path}: cannot rebuild model {name!r} from its model_kwargs and state dict "
                                  f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__})"
                                  ) from None
    bad = [k for k, v in ck["model"].items() if torch.is_tensor(v) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise InferenceInputError(f"checkpoint {path} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): "
                                  f"the run it comes from diverged; it cannot predict")
    if kw.get("out_channels", 1) != 1:
        raise InferenceInputError(f"checkpoint {path} has out_channels {kw.get('out_channels')}; inference gives "
                                  f"one foreground probability and needs 1")
    if spec.dims == 3 and kw.get("in_channels", 1) != 1:
        raise InferenceInputError(f"checkpoint {path} has in_channels {kw.get('in_channels')}; a CT volume gives 1")
    model = model.to(device).eval()
    fold_batchnorm(model)                         # inference only: BN folded into the conv before it (nets.fold)
    return Member(model, name, spec.dims, kw, dict(ck.get("config") or {}), path, _data_spacing(ck, path))


def _data_spacing(ck: dict, path: Path) -> tuple | None:
    """A checkpoint's ``data_spacing`` (sz, sy, sx) mm, None when it has none; InferenceInputError when it is not
    three values > 0."""
    raw = ck.get("data_spacing")
    if raw is None:
        return None
    try:
        spacing = tuple(float(v) for v in raw)
    except (TypeError, ValueError):
        spacing = ()
    if len(spacing) != 3 or not all(np.isfinite(v) and v > 0 for v in spacing):
        raise InferenceInputError(f"checkpoint {path} records data_spacing {raw!r}; expected three spacings > 0 mm")
    return spacing


@dataclass
class Ensemble:
    """The loaded models of one or more runs; the mean of their probabilities is the ensemble's."""
    members: list

    @property
    def paths(self) -> list:
        return [m.path for m in self.members]

    @property
    def names(self) -> list:
        return [m.name for m in self.members]

    @property
    def n_models(self) -> int:
        return len(self.members)

    @property
    def device(self) -> torch.device:
        p = next(self.members[0].model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def multiple(self) -> tuple:
        """(D, H, W) every 3D window must divide by: the per-axis least common multiple over the 3D models."""
        three = [m.model for m in self.members if m.dims == 3]
        return input_multiple(three, 3) if three else (1, 1, 1)

    @property
    def patch_size(self) -> tuple | None:
        """The largest training patch (D, H, W) per axis among the 3D models (None when none says)."""
        ps = [p for m in self.members if (p := m.patch_size) is not None]
        return tuple(max(p[i] for p in ps) for i in range(3)) if ps else None

    def groups(self) -> dict:
        """Models by how they run: "3d" (sliding windows) or ("2d", in_slices) (slice by slice)."""
        out: dict = {}
        for m in self.members:
            out.setdefault("3d" if m.dims == 3 else ("2d", m.in_slices), []).append(m.model)
        return out

    def window(self, shape: Sequence[int], window: Sequence[int] | None = None) -> tuple:
        """The 3D window (D, H, W) for a volume of ``shape`` (z, y, x): window_for with this ensemble."""
        return window_for(shape, self.multiple, self.patch_size, window)

    def check(self, window: Sequence[int] | None = None, amp: str | bool = "auto") -> None:
        """Check --window and --amp before any volume is read (InferenceInputError in one sentence)."""
        if window is not None:
            self.window((1, 1, 1), window)
        if isinstance(amp, str) and amp not in AMP_MODES:
            raise InferenceInputError(f"--amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
        try:
            resolve_amp(amp, self.device)
        except ValueError as e:
            raise InferenceInputError(str(e)) from None


def load_ensemble(runs: Sequence, device: str | torch.device = "cpu", allow_mixed: bool = False) -> Ensemble:
    """Every checkpoint the ``runs`` arguments name (paths.resolve_checkpoints), loaded on ``device`` (a name
    as --device takes, resolved by ahnet.precision.resolve_device). Refuses a checkpoint named twice, and a 2D/3D
    mix unless ``allow_mixed`` (InferenceInputError / LayoutError / CheckpointError, one sentence each)."""
    device = resolve_device(device)
    files: list[Path] = []
    for r in runs:
        for f in paths.resolve_checkpoints(r):
            if any(f.resolve() == o.resolve() for o in files):
                raise InferenceInputError(f"checkpoint {f} is given twice; an ensemble takes each model once")
            files.append(f)
    if not files:
        raise InferenceInputError("no runs given; pass --runs with run folders or checkpoint files")
    ens = Ensemble([load_member(f, device) for f in files])
    dims = {m.dims for m in ens.members}
    if len(dims) > 1 and not allow_mixed:
        two = sorted({m.name for m in ens.members if m.dims == 2})
        three = sorted({m.name for m in ens.members if m.dims == 3})
        raise InferenceInputError(f"runs mix 2D ({', '.join(two)}) and 3D ({', '.join(three)}) models; give runs "
                                  f"of one kind, or pass --allow-mixed to average their probabilities")
    return ens


def window_for(shape: Sequence[int], multiple: Sequence[int], patch: Sequence[int] | None = None,
               window: Sequence[int] | None = None) -> tuple:
    """THE 3D window rule (module docstring): (D, H, W) voxels for a volume of ``shape`` (z, y, x).

    window: explicit, must be three positive sizes divisible by ``multiple``; else ``patch`` (the runs' training
    patch_size), else DEFAULT_WINDOW, rounded up to ``multiple``. Capped at ``shape`` rounded up to ``multiple``.
    """
    m = tuple(int(v) for v in multiple)
    if window is not None:
        window = tuple(int(v) for v in window)
        if len(window) != 3 or min(window) < 1 or any(w % k for w, k in zip(window, m)):
            raise InferenceInputError(f"--window {window} must be three positive sizes (D, H, W) divisible by the "
                                      f"models' input multiple {m}")
    else:
        window = tuple(patch) if patch is not None else DEFAULT_WINDOW
    up = [int(math.ceil(w / k)) * k for w, k in zip(window, m)]
    cap = [int(math.ceil(s / k)) * k for s, k in zip(shape, m)]
    return tuple(min(a, b) for a, b in zip(up, cap))


def predict_volume(ens: Ensemble, image01: np.ndarray, window: Sequence[int] | None = None,
                   overlap: float = WindowSettings.overlap, sw_batch: int = WindowSettings.sw_batch, tta: bool = False,
                   amp: str | bool = "auto", channels_last: bool = False, workers: int = 1) -> np.ndarray:
    """Foreground probability (z, y, x) float32, the mean over every model of ``ens``, for a (z, y, x) image
    scaled to [0, 1] as the training cache scales HU (ahnet.data.preprocess.clip_and_scale).

    3D models: sliding windows of ``ens.window(image01.shape, window)`` overlapping by ``overlap``, ``sw_batch``
    windows per forward pass, Gaussian blending. 2D models: slice by slice, 4 x ``sw_batch`` slices per forward
    pass. tta: mean over the 4 in-plane flips. amp: one of ahnet.precision.AMP_MODES (auto = float16 on CUDA,
    float32 on a CPU). channels_last: 3D models in channels-last 3D memory (same values, faster with bf16 / AMP).
    workers: threads predicting 3D windows side by side, one intra-op thread each (sliding_window_predict).
    """
    x = torch.from_numpy(np.ascontiguousarray(image01, np.float32))[None, None]
    groups = ens.groups()
    total = None
    for key, models in groups.items():
        if key == "3d":
            p = sliding_window_predict(models, x, window=ens.window(image01.shape, window), overlap=overlap,
                                       batch_size=sw_batch, flip_tta=tta, amp=amp, channels_last=channels_last,
                                       workers=workers)
        else:
            p = slicewise_predict(models, x, in_slices=key[1], batch_size=max(sw_batch, 1) * 4, flip_tta=tta,
                                  amp=amp)
        p = p[0, 0].numpy()
        if len(groups) == 1:
            return p
        p *= len(models)
        total = p if total is None else np.add(total, p, out=total)
    total /= ens.n_models
    return total
