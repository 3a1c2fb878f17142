"""Export trained runs for serving: every fold as TorchScript and ONNX, verified, with a model.json beside them.

    python -m ahnet.export --runs runs/ahnet_cv --out models/ahnet_cv [--formats torchscript onnx] [--opset 18]

Runs (``--runs``): what ahnet.commands.predict takes, loaded by ahnet.infer.load_ensemble (run folders, checkpoint files,
a folder of fold<k> runs, or the name X of sibling folders X-fold<k>; ahnet.paths resolves them), 3D models only
(registry dims 3: ahnet, unet3d). The folder's layout and model.json are described in ahnet.serve.store; its
default window is the ensemble's own (ahnet.infer's window rule before the cap at a volume's shape).

TorchScript: torch.jit.trace on windows of twice the model's input multiple (the traced graph keeps every size
symbolic). ONNX: torch.onnx.export through torch.export with the batch and every spatial axis dynamic in
multiples of the model's input multiple (D = m_D * d, ...), opset ``--opset`` (default 18). The network itself
pools its pyramid by reshape and maximum under torch.export (ahnet.nets.blocks.PyramidPooling), so one graph
holds at every window size; the verification at two window sizes checks exactly that.

Verification, for every fold and format, as the file is written: the exported model on random [0, 1] volumes at
two window sizes (the default window with batch 2, and one input multiple more on every axis) against PyTorch;
the max |differences| are printed, and the export fails (exit 1, nothing written) when the served output (the
sigmoid probability) differs by more than ``--tol`` (default 1e-4, fp32), or the logits by more than ``--tol``
times their largest magnitude (at least 1). Float32 rounding grows with the logits: the tests' untrained folds
reach |logit| 68, where PyTorch's own float32 logits are 9e-5 off float64 and ONNX Runtime's 9e-5 too, 1.2e-4
apart, while a frozen window size or wrong weights are off by far more. ONNX files also pass ``onnx.checker``
and run in ONNX Runtime (CPU). The output folder is written under a temporary name and renamed when complete;
``--force`` replaces an existing one. Bad input: one line ``ahnet.serve.export: error: ...``, exit 2; a failed
verification: the same line, exit 1.

Every model the registry builds for volumes (AH-Net, 3D U-Net) exports in both formats with every option a
training accepts that shapes the graph (pyramid depth 0-4, every z-pooling schedule, every upsampling mode; the
tests run each): sizes stay symbolic in the models' own checks (ahnet.nets.sizes.check_input), so no axis is
frozen at the example's size. What cannot be served is refused before anything is written, in one line naming the
option: a 2D model (MC-GCN), a pyramid grid that some windows do not divide, a 1-channel rule broken (ahnet.infer's
own checks). Should torch.onnx.export fail on some other model, the line names the model and its graph options
(exit 2), and an exported file that fails to run at a verification size is a failed verification (exit 1): never a
traceback. TorchScript needs no serving dependency; ``--formats onnx`` needs onnx, onnxscript and onnxruntime (the
serve extra), checked first.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from ahnet import failures
from ahnet.data.preprocess import HU_MAX, HU_MIN
from ahnet.infer import Ensemble, Member, load_ensemble
from ahnet.infer.spacing import training_inplane
from ahnet.nets.blocks import PyramidPooling
from ahnet.serve import store

PROG = "ahnet.export"
UNCAPPED = (1 << 30,) * 3       # a volume shape no window is capped at: the ensemble's default window
DEFAULT_OPSET = 18
DEFAULT_TOL = 1e-4
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")     # torch.onnx.export (dynamo) needs onnxscript


class ExportError(ValueError):
    """A run or option that cannot be exported (one sentence)."""


class VerificationError(ValueError):
    """An exported file whose output differs from PyTorch's by more than the tolerance."""


# ------------------------------------------------------------------------------------------------ models

def check_exportable(member: Member, multiple) -> None:
    """Refuse models whose exported graph would hold for some window sizes only. AH-Net's pyramid pools the map
    at half the input's in-plane size into grids up to g x g: equal blocks only when g divides multiple / 2."""
    if member.dims != 3:
        raise ExportError(f"{member.path} holds a 2D {member.name!r} model; export serves 3D models by sliding "
                          f"windows")
    for p in member.model.modules():
        if isinstance(p, PyramidPooling) and p.grids and any((m // 2) % p.grids[-1] for m in multiple[1:]):
            raise ExportError(f"{member.path}: pyramid depth {p.depth} pools into a {p.grids[-1]} x "
                              f"{p.grids[-1]} grid that windows of multiple {tuple(multiple)} do not always "
                              f"divide; an exported graph would be right for some window sizes only")


def describe(kwargs: dict) -> str:
    """The options that shape a model's graph, for messages: 'pfn_depth 2, upsample nearest, z_pool [...]'."""
    keys = ("pfn_depth", "upsample", "z_pool", "base_channels")
    return ", ".join(f"{k} {kwargs[k]}" for k in keys if k in kwargs) or "its options"


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
            torch.onnx.export(model, (example,), str(path), input_names=[store.INPUT],
                              output_names=["logits"], dynamic_shapes={"x": axes}, opset_version=opset,
                              dynamo=True, external_data=False, verbose=False)
        finally:
            sys.stdout = so
            log.setLevel(level)
    import onnx
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def verify(model, runner, shapes, seed: int) -> dict:
    """Exported against PyTorch over random [0, 1] inputs of ``shapes`` (B, 1, D, H, W): max |difference| of the
    probabilities (sigmoid, what is served) and of the logits, and the largest |logit| (at least 1)."""
    g = torch.Generator().manual_seed(seed)
    worst = {"probability": 0.0, "logits": 0.0, "logit_scale": 1.0}
    for s in shapes:
        x = torch.rand(s, generator=g)
        with torch.no_grad():
            ref = model(x).double()
        try:
            out = torch.from_numpy(runner(x.numpy())).double()
        except Exception as e:                          # ONNX Runtime's and TorchScript's errors have no common type
            raise VerificationError(f"the exported file fails on an input of shape {tuple(s)} that PyTorch runs "
                                    f"({type(e).__name__}: {failures.one_line(e)})") from None
        if out.shape != ref.shape:
            raise VerificationError(f"exported output shape {tuple(out.shape)} != PyTorch's {tuple(ref.shape)} for "
                                    f"input {s}")
        prob = (torch.sigmoid(out) - torch.sigmoid(ref)).abs()
        worst = {"probability": max(worst["probability"], float(prob.max())),
                 "logits": max(worst["logits"], float((out - ref).abs().max())),
                 "logit_scale": max(worst["logit_scale"], float(ref.abs().max()))}
    return worst


def check_verified(what: str, diff: dict, tol: float) -> None:
    """VerificationError unless probabilities agree within ``tol`` and logits within ``tol`` x their scale."""
    if not diff["probability"] <= tol:
        raise VerificationError(f"{what}: max |diff| {diff['probability']:.3e} in probability exceeds --tol {tol:g}")
    if not diff["logits"] <= tol * diff["logit_scale"]:
        raise VerificationError(f"{what}: max |diff| {diff['logits']:.3e} in logits exceeds --tol {tol:g} x max "
                                f"|logit| {diff['logit_scale']:.3g}")


# ------------------------------------------------------------------------------------------------ driver

def _model_json(name: str, ens: Ensemble, window, opset, fold_entries) -> dict:
    members = ens.members
    spacing = sorted({tuple(m.kwargs["spacing"]) for m in members if m.kwargs.get("spacing")})
    inplane = training_inplane(ens)
    return {
        "schema": store.SCHEMA, "name": name,
        "architecture": [{"model_name": m.name, "model_kwargs": m.kwargs} for m in members],
        "input_multiple": list(ens.multiple), "window": list(window),
        "window_source": "training patch_size" if ens.patch_size else "DEFAULT_WINDOW of ahnet.infer",
        "window_rule": "ahnet.infer.window_for(volume shape, input_multiple, window, --window): --window (a "
                       "multiple of input_multiple), else window; rounded up to input_multiple and capped at the "
                       "volume's shape rounded up to it",
        "overlap_default": 0.5, "blend": "gaussian, sigma = window / 8 (ahnet.infer.sliding_window_predict)",
        "spacing": {"inference": "each scan resampled in-plane to training_inplane_mm where its pixels differ by more "
                                 "than 1%, its maps brought back to its grid (ahnet.infer.spacing, as "
                                 "ahnet.commands.predict); null: each scan's own grid",
                    "training_inplane_mm": list(inplane) if inplane is not None else None,
                    "model_spacing_mm": [list(s) for s in spacing]},
        "intensity": {"clip_hu": [HU_MIN, HU_MAX], "scale_to": [0.0, 1.0],
                      "rule": "(clip(hu, lo, hi) - lo) / (hi - lo), float32 (ahnet.data.preprocess.clip_and_scale)"},
        "input": {"name": store.INPUT, "dtype": "float32", "layout": "(N, 1, D, H, W), D = slices"},
        "output": {"name": store.OUTPUT, "dtype": "float32", "layout": "(N, 1, D, H, W)",
                   "meaning": "sigmoid of the logits; the ensemble serves the mean over folds"},
        "opset": opset, "torch": torch.__version__,
        "config_hash": store.config_hash([m.config for m in members]),
        "folds": fold_entries,
    }


def check_options(out: Path, formats, opset: int, tol: float, force: bool) -> tuple:
    """The options, checked before any model is loaded (ExportError); returns the formats without repeats."""
    formats = tuple(dict.fromkeys(formats))
    bad = [f for f in formats if f not in store.FORMATS]
    if bad or not formats:
        raise ExportError(f"--formats {' '.join(formats)}: expected one or more of {', '.join(store.FORMATS)}")
    if not 0 < tol < 1:
        raise ExportError(f"--tol {tol} must lie in (0, 1)")
    if not 9 <= opset <= 23:
        raise ExportError(f"--opset {opset} must lie in 9 .. 23")
    missing = [m for m in ONNX_MODULES if "onnx" in formats and importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"--formats onnx needs the serve extra ({', '.join(missing)} missing): pip install -e "
                          f"'.[serve]', or export --formats torchscript")
    if out.exists() and not force:
        raise ExportError(f"--out {out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; expected a folder")
    return formats


def export_fold(member: Member, k: int, root: Path, formats, multiple, shapes, opset: int, tol: float, seed: int,
                log) -> dict:
    """Fold k's files under ``root``/fold<k>, traced on a batch of 2 windows of twice the input ``multiple``,
    each verified on ``shapes`` as it is written; returns its model.json entry."""
    example = torch.rand((2, 1) + tuple(2 * m for m in multiple), generator=torch.Generator().manual_seed(seed))
    fname = f"fold{k}"
    (root / fname).mkdir(parents=True)
    entry = {"name": fname, "checkpoint": str(member.path.resolve()), "model_name": member.name,
             "config_hash": store.config_hash(member.config), "files": {}, "max_abs_diff": {},
             "max_abs_logit_diff": {}, "max_abs_logit": {}}
    for fmt in formats:
        rel = f"{fname}/{store.TORCHSCRIPT if fmt == 'torchscript' else store.ONNX}"
        if fmt == "torchscript":
            export_torchscript(member.model, example, root / rel)
            runner = store.torchscript_runner(root / rel, "cpu")
        else:
            try:
                export_onnx(member.model, example, multiple, root / rel, opset)
            except Exception as e:                      # torch.export's and torch.onnx's errors share no type
                raise ExportError(f"{fname} onnx: torch.onnx.export cannot carry {member.name} with "
                                  f"{describe(member.kwargs)} ({type(e).__name__}: {failures.one_line(e)}); "
                                  f"export --formats torchscript") from None
            runner = store.onnx_runner(root / rel)
        try:
            diff = verify(member.model, runner, shapes, seed + k)
        except VerificationError as e:
            raise VerificationError(f"{fname} {fmt}: {e}") from None
        log(f"[export] {fname} {fmt}: max |diff| {diff['probability']:.3e} in probability, {diff['logits']:.3e} in "
            f"logits (max |logit| {diff['logit_scale']:.3g}) vs PyTorch (fp32) over inputs "
            f"{', '.join(str(s) for s in shapes)}" + (f", opset {opset}" if fmt == "onnx" else ""))
        check_verified(f"{fname} {fmt}", diff, tol)
        entry["files"][fmt] = rel
        entry["max_abs_diff"][fmt] = diff["probability"]
        entry["max_abs_logit_diff"][fmt], entry["max_abs_logit"][fmt] = diff["logits"], diff["logit_scale"]
    return entry


def export_runs(runs, out, formats=store.FORMATS, opset: int = DEFAULT_OPSET, tol: float = DEFAULT_TOL,
                force: bool = False, seed: int = 0, log=print) -> dict:
    """Export every fold of ``runs`` into ``out`` (see the module docstring); returns model.json's dict."""
    out = Path(out)
    formats = check_options(out, formats, opset, tol, force)
    ens = load_ensemble(runs, "cpu", allow_mixed=True)
    multiple = ens.multiple
    for m in ens.members:
        check_exportable(m, multiple)
    window = ens.window(UNCAPPED)
    shapes = [(2, 1) + tuple(window), (1, 1) + tuple(w + m for w, m in zip(window, multiple))]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    for left in out.parent.glob(f".{out.name}.tmp-*"):     # leftovers of a killed export
        shutil.rmtree(left, ignore_errors=True)
    try:
        entries = [export_fold(m, k, tmp, formats, multiple, shapes, opset, tol, seed, log)
                   for k, m in enumerate(ens.members)]
        meta = _model_json(out.name, ens, window, opset if "onnx" in formats else None, entries)
        (tmp / store.MODEL_JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"[export] {ens.n_models} fold(s) -> {out} ({', '.join(formats)}); window {tuple(window)}, input multiple "
        f"{tuple(multiple)}")
    return meta
