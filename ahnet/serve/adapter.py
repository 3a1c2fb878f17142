"""The one place where serving touches the in-process inference API (today's ahnet.predict / ahnet.infer /
ahnet.evaluate). When inference becomes a stage of its own (ahnet.infer.load_ensemble, predict_volume, window_for,
ahnet.paths), only this module changes; export, server, client and benchmark import nothing else of it.

What serving needs from it:
- ``load_folds(runs)``: the checkpoints a ``--runs`` argument names (run folder, checkpoint, fold folder, or the
  ``X`` of sibling folders ``X-fold<k>``), each loaded as a ``Fold`` (model in eval mode, name, kwargs, training
  config, checkpoint path), in fold order.
- ``window_for(shape, multiple, patch, window)``: the 3D window rule ahnet.predict uses (D, H, W voxels).
- ``blend(model, image01, window, overlap, batch, tta)``: ahnet.infer's Gaussian-blended sliding windows over a
  (z, y, x) image with any nn.Module that maps windows (B, 1, D, H, W) to probabilities (a remote model too).
- ``predict_in_process(runs, image01, ...)``: ahnet.predict's own probability for a scaled image (reference).
- ``find_cases``, ``read_scaled`` and ``write_case`` / ``write_candidates``: ahnet.predict's inputs and outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import predict as _predict
from ..candidates import extract_candidates
from ..data import io
from ..evaluate import load_run
from ..infer import sliding_window_predict

DEFAULT_WINDOW = _predict.DEFAULT_WINDOW
THREE_D = _predict.THREE_D
INPUT_ERRORS = _predict.INPUT_ERRORS
find_cases = _predict.find_cases


@dataclass
class Fold:
    """One trained model of an ensemble, as a checkpoint gives it."""
    model: nn.Module          # eval mode, CPU
    name: str                 # registry name (ahnet, unet3d, mcgcn)
    kwargs: dict              # model_kwargs: ahnet.nets.build_model(name, **kwargs) rebuilds it
    config: dict              # the training settings saved in the checkpoint ({} when none)
    path: Path                # the checkpoint file


def load_folds(runs) -> list:
    """[Fold] for every checkpoint that ``runs`` names (ahnet.predict.resolve_runs), in fold order."""
    out = []
    for f in _predict.resolve_runs(runs):
        model, name, cfg, kw = load_run(f, "cpu")
        out.append(Fold(model, name, kw, cfg, Path(f)))
    return out


def window_for(shape, multiple, patch=None, window=None) -> tuple:
    """ahnet.predict's 3D window (D, H, W) for a volume of ``shape`` (z, y, x): ``window`` (must divide by
    ``multiple``), else ``patch`` (the runs' training patch_size), else DEFAULT_WINDOW, rounded up to ``multiple``
    and capped at the shape rounded up to it."""
    ens = _predict.Ensemble(groups={}, paths=[], patch_size=None if patch is None else tuple(patch),
                            multiple=tuple(int(m) for m in multiple))
    return _predict.case_window(ens, shape, window)


def blend(model: nn.Module, image01: np.ndarray, window, overlap: float = 0.5, batch: int = 2,
          tta: bool = False) -> np.ndarray:
    """(z, y, x) float32 probabilities: ahnet.infer's sliding windows (padding, starts, Gaussian blending, flip
    TTA) over ``image01`` with ``model``, whose forward maps windows (B, 1, D, H, W) to probabilities (no
    activation is applied on top), ``batch`` windows per call."""
    x = torch.from_numpy(np.ascontiguousarray(image01, np.float32))[None, None]
    p = sliding_window_predict(model, x, window=tuple(window), overlap=overlap, batch_size=batch, flip_tta=tta,
                               amp=False, activation=None)
    return p[0, 0].numpy()


def predict_in_process(runs, image01: np.ndarray, window=None, overlap: float = 0.5, batch: int = 2,
                       tta: bool = False) -> np.ndarray:
    """ahnet.predict's ensemble probability (z, y, x) for a scaled image, fp32 on the CPU (the reference)."""
    ens = _predict.load_ensemble(runs, torch.device("cpu"))
    return _predict.predict_probability(ens, image01, window=window, overlap=overlap, batch=batch, tta=tta,
                                        amp=False)


def read_scaled(image_path):
    """(Volume with its array scaled to [0, 1] in place as ahnet.predict scales HU, the scaled array)."""
    vol = io.read_image(image_path)
    _predict.scale_in_place(vol.array)
    return vol, vol.array


def write_case(out: Path, case_id: str, prob: np.ndarray, like, threshold: float, method: str,
               min_distance_mm: float) -> list:
    """Write <out>/<case_id>_prob.nii.gz and _mask.nii.gz as ahnet.predict does; return the case's candidate
    rows (LUNA16, world LPS mm)."""
    io.write_image(out / f"{case_id}_prob.nii.gz", prob.astype(np.float32, copy=False), like=like)
    io.write_image(out / f"{case_id}_mask.nii.gz", (prob >= threshold).astype(np.uint8), like=like)
    return extract_candidates(prob, like, seriesuid=case_id, threshold=threshold, method=method,
                              min_distance_mm=min_distance_mm)


def write_candidates(out: Path, rows) -> Path:
    """<out>/candidates.csv as ahnet.predict writes it."""
    return io.write_candidates_csv(Path(out) / "candidates.csv", rows)
