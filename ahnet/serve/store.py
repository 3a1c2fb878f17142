"""An exported model folder (``python -m ahnet.export``) and the runners that execute its files.

    models/<name>/model.json            what the folder serves (below)
    models/<name>/fold<k>/model.pt      fold k as TorchScript (logits)
    models/<name>/fold<k>/model.onnx    fold k as ONNX, opset in model.json (logits)

model.json: ``name``; ``architecture`` (model_name, model_kwargs of every fold); ``input_multiple`` (D, H, W: every
window size must divide by it); ``window`` (D, H, W: the default window, the runs' training patch_size or
ahnet.infer.DEFAULT_WINDOW, rounded up to the input multiple) and ``window_rule``; ``spacing`` (``training_inplane_mm``:
the pixel spacing scans are resampled to, as ahnet.commands.predict does, or null; the spacing the model's
z-pooling schedule was built for); ``intensity``
(HU clipped to [lo, hi] and scaled to [0, 1]); ``input`` / ``output`` (tensor names, dtype, layout); ``opset``;
``folds`` (files, checkpoint, training config hash and the verification per format: ``max_abs_diff`` in
probability, ``max_abs_logit_diff`` and the largest |logit| ``max_abs_logit``); ``config_hash`` (sha256 over the
folds' training configs).

A runner maps a float32 numpy batch (B, 1, D, H, W) to float32 logits of the same shape, on the CPU (or the
first GPU for TorchScript when one is present).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np

MODEL_JSON = "model.json"
TORCHSCRIPT = "model.pt"
ONNX = "model.onnx"
FORMATS = ("torchscript", "onnx")
BACKENDS = {"pytorch": "torchscript", "onnx": "onnx"}     # server --backend -> the file format it runs
INPUT = "image"
OUTPUT = "probability"
INFO_MODEL = "ahnet-info"                                 # the served model.json
SCHEMA = 1


class StoreError(ValueError):
    """A model folder that cannot be served (one sentence naming the file and the problem)."""


def config_hash(config: dict) -> str:
    """sha256 of a training config as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def fold_file(root: Path, fold: dict, fmt: str) -> Path:
    return Path(root) / fold["files"][fmt]


def read_model_json(root) -> dict:
    """model.json of an exported folder, checked for the fields serving needs."""
    root = Path(root)
    path = root / MODEL_JSON
    if not root.is_dir():
        raise StoreError(f"model folder {root} not found; export one with python -m ahnet.export")
    if not path.is_file():
        raise StoreError(f"{root} holds no {MODEL_JSON}; expected a folder written by python -m ahnet.export")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path} is not readable JSON ({e})") from None
    need = ("name", "input_multiple", "window", "folds", "intensity", "schema")
    missing = [k for k in need if k not in meta]
    if missing:
        raise StoreError(f"{path} lacks {missing}; re-export the runs with python -m ahnet.export")
    if meta["schema"] != SCHEMA:
        raise StoreError(f"{path} has schema {meta['schema']}; this version reads schema {SCHEMA}")
    return meta


def torchscript_runner(path: Path, device=None):
    """A runner for a TorchScript file: logits of torch.jit.load(path) under no_grad, float32."""
    import torch
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with warnings.catch_warnings():                     # torch 2.13 marks TorchScript deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location=dev).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x).to(dev)).float().cpu().numpy()
    return run


def onnx_runner(path: Path, threads: int = 0):
    """A runner for an ONNX file through ONNX Runtime's CPU provider (threads 0 = its default)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(sess.run(None, {name: x})[0], np.float32)
    return run


def fold_files(root, backend: str = "pytorch") -> list:
    """[(fold name, file)] that ``backend`` (pytorch | onnx) runs for every fold of an exported folder, each file
    checked to exist (StoreError naming the first that does not)."""
    if backend not in BACKENDS:
        raise StoreError(f"backend {backend!r} is not known; expected one of {', '.join(BACKENDS)}")
    meta = read_model_json(root)
    fmt = BACKENDS[backend]
    out = []
    for fold in meta["folds"]:
        f = fold_file(root, fold, fmt) if fmt in fold.get("files", {}) else None
        if f is None or not f.is_file():
            raise StoreError(f"{root}: fold {fold['name']} has no {fmt} file; export with --formats {fmt} or "
                             f"serve with the other backend")
        out.append((fold["name"], f))
    return out


def load_runners(root, backend: str = "pytorch", threads: int = 0, folds=None) -> list:
    """[(fold name, runner)] for every fold of an exported folder (or those named in ``folds``, in that order)
    with ``backend`` (pytorch | onnx); threads: ONNX Runtime's intra-op threads (0 = its default; torch's are set
    by torch.set_num_threads)."""
    files = dict(fold_files(root, backend))
    missing = [f for f in folds or () if f not in files]
    if missing:
        raise StoreError(f"{root} has no fold(s) {', '.join(missing)}; it has {', '.join(files)}")
    return [(name, torchscript_runner(files[name]) if BACKENDS[backend] == "torchscript" else
             onnx_runner(files[name], threads)) for name in (folds or files)]
