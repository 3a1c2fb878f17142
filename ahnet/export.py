"""Export trained runs for serving: every fold as TorchScript and ONNX, verified, with a model.json beside them.

    python -m ahnet.export --runs runs/ahnet_cv --out models/ahnet_cv [--formats torchscript onnx] [--opset 18]

Runs (``--runs``): what ahnet.predict takes (run folders, checkpoint files, a folder of fold*/ runs, or the name X
of sibling folders X-fold<k>); 3D models only (ahnet, unet3d), one input and one output channel. The folder's
layout and model.json are described in ahnet.serve.store.

TorchScript: torch.jit.trace on a window of the model's input multiple (the traced graph keeps every size
symbolic). ONNX: torch.onnx.export through torch.export with the batch and every spatial axis dynamic in
multiples of the model's input multiple (D = m_D * d, ...), opset ``--opset`` (default 18). AH-Net's pyramid
pooling max-pools blocks whose size depends on the input; ONNX's MaxPool needs a fixed kernel, so the exported
copy pools the same blocks by a reshape and a maximum (the same values; checked below at two window sizes).

Verification, for every fold and format, as the file is written: the exported model's logits on random [0, 1]
volumes at two window sizes (the default window with batch 2, and one input multiple more on every axis) against
PyTorch's; the max |difference| is printed, and the export fails (exit 1, nothing written) above ``--tol``
(default 1e-4, fp32). ONNX files also pass ``onnx.checker`` and run in ONNX Runtime (CPU). The output folder is
written under a temporary name and renamed when complete; ``--force`` replaces an existing one.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import shutil
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data.preprocess import HU_MAX, HU_MIN
from .serve import adapter, store

PROG = "python -m ahnet.export"
DEFAULT_OPSET = 18
DEFAULT_TOL = 1e-4


class ExportError(ValueError):
    """A run or option that cannot be exported (one sentence)."""


class VerificationError(RuntimeError):
    """An exported file whose output differs from PyTorch's by more than the tolerance."""


# ------------------------------------------------------------------------------------------------ models

def _pooled_maps_by_blocks(self, x: torch.Tensor) -> list:
    """PyramidPooling.pooled_maps for in-plane sizes divisible by the finest grid g: the max over each of the
    g x g blocks by reshape + amax (ONNX-exportable with dynamic sizes), coarser grids by 2 x 2 pools of it."""
    if not self.grids:
        return []
    n, c, d, h, w = x.shape
    g = self.grids[-1]
    maps = [x.reshape(n, c, d, g, h // g, g, w // g).amax(dim=(4, 6))]
    for _ in self.grids[:-1]:
        maps.insert(0, F.max_pool3d(maps[0], (1, 2, 2)))
    return maps


def _pyramids(model):
    from .nets.blocks import PyramidPooling
    return [m for m in model.modules() if isinstance(m, PyramidPooling)]


def check_exportable(fold: adapter.Fold, multiple) -> None:
    """Refuse models whose exported graph would hold for some window sizes only. AH-Net's pyramid pools the map
    at half the input's in-plane size into grids up to g x g: exact blocks only when g divides multiple / 2."""
    if fold.name not in adapter.THREE_D:
        raise ExportError(f"{fold.path} holds a {fold.name!r} model; export serves 3D models "
                          f"({', '.join(adapter.THREE_D)}) by sliding windows")
    for key in ("in_channels", "out_channels"):
        if int(fold.kwargs.get(key, 1)) != 1:
            raise ExportError(f"{fold.path} has {key} {fold.kwargs[key]}; serving takes one CT channel in and "
                              f"gives one foreground probability")
    for p in _pyramids(fold.model):
        if p.grids and any((m // 2) % p.grids[-1] for m in multiple[1:]):
            raise ExportError(f"{fold.path}: pyramid depth {p.depth} pools into a {p.grids[-1]} x "
                              f"{p.grids[-1]} grid that windows of multiple {tuple(multiple)} do not always "
                              f"divide; an exported graph would be right for some window sizes only")


def onnx_ready(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose pyramid pooling uses fixed-shape operations (same values)."""
    m = copy.deepcopy(model).eval()
    for p in _pyramids(m):
        p.pooled_maps = types.MethodType(_pooled_maps_by_blocks, p)
    return m


def export_torchscript(model, example: torch.Tensor, path: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))


def export_onnx(model, example: torch.Tensor, multiple, path: Path, opset: int) -> None:
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=1024)
    axes = {0: batch}
    for i, (name, m) in enumerate(zip(("d", "h", "w"), multiple)):
        axes[2 + i] = int(m) * Dim(name, min=1, max=max(2, 4096 // int(m)))
    with torch.no_grad(), warnings.catch_warnings(), open(os.devnull, "w") as null:
        warnings.simplefilter("ignore")
        so, sys.stdout = sys.stdout, null                   # torch.onnx prints its progress to stdout
        log = logging.getLogger("torch.onnx")               # and warns about torchvision ops it skips
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            torch.onnx.export(onnx_ready(model), (example,), str(path), input_names=[store.INPUT],
                              output_names=["logits"], dynamic_shapes={"x": axes}, opset_version=opset,
                              dynamo=True, external_data=False, verbose=False)
        finally:
            sys.stdout = so
            log.setLevel(level)
    import onnx
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def verify(model, runner, shapes, seed: int) -> float:
    """Max |exported - PyTorch| logits over random [0, 1] inputs of ``shapes`` (B, 1, D, H, W)."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for s in shapes:
        x = torch.rand(s, generator=g)
        with torch.no_grad():
            ref = model(x).float().numpy()
        out = runner(x.numpy())
        if out.shape != ref.shape:
            raise VerificationError(f"exported output shape {out.shape} != PyTorch's {ref.shape} for input {s}")
        worst = max(worst, float(np.abs(out - ref).max()))
    return worst


# ------------------------------------------------------------------------------------------------ driver

def _model_json(name, folds, multiple, window, window_source, opset, fold_entries) -> dict:
    spacing = sorted({tuple(f.kwargs["spacing"]) for f in folds if f.kwargs.get("spacing")})
    return {
        "schema": store.SCHEMA, "name": name,
        "architecture": [{"model_name": f.name, "model_kwargs": f.kwargs} for f in folds],
        "input_multiple": list(multiple), "window": list(window), "window_source": window_source,
        "window_rule": "--window (a multiple of input_multiple), else window; rounded up to input_multiple and "
                       "capped at the volume's shape rounded up to it (ahnet.predict's rule)",
        "overlap_default": 0.5, "blend": "gaussian, sigma = window / 8 (ahnet.infer)",
        "spacing": {"inference": "native spacing of each scan, no resampling (as ahnet.predict)",
                    "model_spacing_mm": [list(s) for s in spacing]},
        "intensity": {"clip_hu": [HU_MIN, HU_MAX], "scale_to": [0.0, 1.0],
                      "rule": "(clip(hu, lo, hi) - lo) / (hi - lo), float32 (ahnet.data.preprocess.clip_and_scale)"},
        "input": {"name": store.INPUT, "dtype": "float32", "layout": "(N, 1, D, H, W), D = slices"},
        "output": {"name": store.OUTPUT, "dtype": "float32", "layout": "(N, 1, D, H, W)",
                   "meaning": "sigmoid of the logits; the ensemble serves the mean over folds"},
        "opset": opset, "torch": torch.__version__,
        "config_hash": store.config_hash([f.config for f in folds]),
        "folds": fold_entries,
    }


def export_runs(runs, out, formats=store.FORMATS, opset: int = DEFAULT_OPSET, tol: float = DEFAULT_TOL,
                force: bool = False, seed: int = 0, log=print) -> dict:
    """Export every fold of ``runs`` into ``out`` (see the module docstring); returns model.json's dict."""
    out = Path(out)
    formats = tuple(dict.fromkeys(formats))
    bad = [f for f in formats if f not in store.FORMATS]
    if bad or not formats:
        raise ExportError(f"--formats {' '.join(formats)}: expected one or more of {', '.join(store.FORMATS)}")
    if not 0 < tol < 1:
        raise ExportError(f"--tol {tol} must lie in (0, 1)")
    if not 9 <= opset <= 23:
        raise ExportError(f"--opset {opset} must lie in 9 .. 23")
    if out.exists() and not force:
        raise ExportError(f"--out {out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; expected a folder")
    folds = adapter.load_folds(runs)
    multiple = [1, 1, 1]
    for f in folds:
        multiple = [math.lcm(a, int(b)) for a, b in zip(multiple, getattr(f.model, "input_multiple", (1, 1, 1)))]
    for f in folds:
        check_exportable(f, multiple)
    patches = [tuple(int(v) for v in f.config["patch_size"]) for f in folds if f.config.get("patch_size")]
    patch = tuple(max(p[i] for p in patches) for i in range(3)) if patches else None
    window = adapter.window_for((10 ** 6,) * 3, multiple, patch)
    example = torch.rand((2, 1) + tuple(2 * m for m in multiple), generator=torch.Generator().manual_seed(seed))
    shapes = [(2, 1) + tuple(window), (1, 1) + tuple(w + m for w, m in zip(window, multiple))]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    for left in out.parent.glob(f".{out.name}.tmp-*"):     # leftovers of a killed export
        shutil.rmtree(left, ignore_errors=True)
    entries = []
    try:
        for k, f in enumerate(folds):
            fname = f"fold{k}"
            (tmp / fname).mkdir(parents=True)
            entry = {"name": fname, "checkpoint": str(f.path.resolve()), "model_name": f.name,
                     "config_hash": store.config_hash(f.config), "files": {}, "max_abs_diff": {}}
            for fmt in formats:
                rel = f"{fname}/{store.TORCHSCRIPT if fmt == 'torchscript' else store.ONNX}"
                if fmt == "torchscript":
                    export_torchscript(f.model, example, tmp / rel)
                    runner = store.torchscript_runner(tmp / rel, "cpu")
                else:
                    export_onnx(f.model, example, multiple, tmp / rel, opset)
                    runner = store.onnx_runner(tmp / rel)
                diff = verify(f.model, runner, shapes, seed + k)
                log(f"[export] {fname} {fmt}: max |diff| {diff:.3e} vs PyTorch (fp32) over inputs "
                    f"{', '.join(str(s) for s in shapes)}" + (f", opset {opset}" if fmt == "onnx" else ""))
                if not diff <= tol:
                    raise VerificationError(f"{fname} {fmt}: max |diff| {diff:.3e} exceeds --tol {tol:g}")
                entry["files"][fmt], entry["max_abs_diff"][fmt] = rel, diff
            entries.append(entry)
        meta = _model_json(out.name, folds, multiple, window, "training patch_size" if patch else
                           "DEFAULT_WINDOW of ahnet.predict", opset if "onnx" in formats else None, entries)
        import json
        (tmp / store.MODEL_JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"[export] {len(folds)} fold(s) -> {out} ({', '.join(formats)}); window {tuple(window)}, input multiple "
        f"{tuple(multiple)}")
    return meta


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True,
                    help="run folders, checkpoint files, a folder of fold*/ runs, or X of X-fold<k> folders")
    ap.add_argument("--out", required=True, help="output folder, e.g. models/<name> (the name served)")
    ap.add_argument("--formats", nargs="+", default=list(store.FORMATS), help="torchscript and/or onnx")
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    ap.add_argument("--tol", type=float, default=DEFAULT_TOL, help="max |diff| allowed (default %(default)g)")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument("--seed", type=int, default=0, help="seed of the verification volumes")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        export_runs(a.runs, a.out, a.formats, a.opset, a.tol, a.force, a.seed)
    except adapter.INPUT_ERRORS + (ExportError,) as e:
        print(f"ahnet.export: error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"ahnet.export: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
