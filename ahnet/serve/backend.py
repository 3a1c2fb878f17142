"""The served models as Triton Python-backend models: the code ``tritonserver``'s Python stubs run.

ahnet.serve.server writes a model repository in which every model's ``1/model.py`` is the one line
``from ahnet.serve.backend import TritonPythonModel``, beside ``1/ahnet.json`` (SPEC), a JSON object that says what
the model is:

- ``{"kind": "windows", "models": DIR, "backend": "pytorch"|"onnx", "folds": [names], "threads": n,
  "max_voxels": n, "lazy": bool}``: the mean over the folds ``folds`` of the export folder DIR of sigmoid(logits)
  per window (one fold: that fold alone); input ``image`` float32 (N, 1, D, H, W), output ``probability`` of the
  same shape; the fold files are loaded at start, or with ``lazy`` on the model's first request (each stub is a
  process of its own: measured, one that holds torch and the tests' five tiny folds 537 MB, an idle one 43 MB; the
  ensemble's stub loads every fold at start, so a broken file still stops the start);
- ``{"kind": "info", "model_json": FILE}``: model.json as one BYTES output ``model_json`` for any ``query``.

Bad requests: each request of a dynamic batch is checked on its own (``check_windows``); one that fails gets an
error reply of its own, the one sentence of its RequestError with Triton's INVALID_ARG status (HTTP 400), while the
other requests of the batch are answered as usual. The stub writes ``bad request (model <name>): <sentence>`` and
the traceback to its stderr, which is the server's log. A failure that is not the request's fault (a runner that
raises) answers every request of its group with one sentence naming the exception type and pointing to the log,
which gets the full traceback. Replies never carry a traceback or a file path.
"""
from __future__ import annotations

import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ahnet.serve import store


SPEC = "ahnet.json"


class RequestError(ValueError):
    """A request the model cannot answer; the message is one sentence naming the problem."""


def check_windows(x: np.ndarray, multiple, max_voxels: int) -> None:
    """Raise RequestError unless ``x`` is (N, 1, D, H, W) float32, sizes multiples of ``multiple``, at most
    ``max_voxels`` per window, and finite."""
    if x.dtype != np.float32:
        raise RequestError(f"input {store.INPUT} has dtype {x.dtype}; expected float32")
    if x.ndim != 5 or x.shape[1] != 1:
        raise RequestError(f"input {store.INPUT} has shape {x.shape}; expected (N, 1, D, H, W)")
    size = tuple(int(s) for s in x.shape[2:])
    if any(s < 1 or s % m for s, m in zip(size, multiple)):
        raise RequestError(f"window size {size} is not a multiple of the model's input multiple "
                           f"{tuple(multiple)}; pad windows to multiples (ahnet.serve.client does)")
    if int(np.prod(size)) > max_voxels:
        raise RequestError(f"window size {size} has {int(np.prod(size))} voxels, over this server's limit of "
                           f"{max_voxels} per window; send smaller windows")
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise RequestError(f"input {store.INPUT} holds {bad} NaN or infinite value(s); expected a [0, 1]-scaled "
                           f"CT window")


def mean_probability(runners, x: np.ndarray) -> np.ndarray:
    """Mean over ``runners`` of sigmoid(logits) in float32, summed in runner order then divided, as
    ahnet.infer averages an ensemble's probabilities."""
    import torch
    total = None
    for run in runners:
        p = torch.sigmoid(torch.from_numpy(run(x)).float())
        total = p if total is None else total + p
    return (total / len(runners)).numpy()


def log(text: str) -> None:
    """One write to stderr (the server's log), so lines of concurrent stubs do not interleave."""
    sys.stderr.write(text if text.endswith("\n") else text + "\n")
    sys.stderr.flush()


@dataclass(frozen=True)
class Failure:
    """Why one request of a batch is not answered: the RequestError's sentence (``bad_request``) or the type of
    another exception, and the traceback as text. Text only: an exception kept past its handler holds, through its
    traceback's frames, the request arrays (views of Triton's shared memory) in a reference cycle; measured, the
    shared memory then grew by each rejected request's size until the garbage collector ran."""
    message: str
    bad_request: bool
    trace: str


def answer_windows(arrays: list, compute, check) -> list:
    """[probabilities or the Failure that answers it] for the request arrays of one dynamic batch: each array
    checked by ``check`` on its own, the valid ones of equal shape computed together by ``compute`` (N, 1, D, H, W)
    -> same shape."""
    out: list = [None] * len(arrays)
    groups: dict = {}
    for i, a in enumerate(arrays):
        try:
            check(a)
        except RequestError as e:
            out[i] = Failure(str(e), True, traceback.format_exc())
            continue
        groups.setdefault(a.shape[1:], []).append(i)
    for idx in groups.values():
        try:
            p = compute(np.ascontiguousarray(np.concatenate([arrays[i] for i in idx]), np.float32))
        except Exception as e:                          # not the request's fault: every request of the group
            failed = Failure(type(e).__name__, False, traceback.format_exc())
            for i in idx:
                out[i] = failed
            continue
        start = 0
        for i in idx:
            n = arrays[i].shape[0]
            out[i] = p[start:start + n]
            start += n
    return out


def error_sentence(failure: Failure, model: str) -> str:
    """What a client is told: a bad request's sentence, else the exception type (its text may hold paths)."""
    if failure.bad_request:
        return failure.message
    return f"model {model} failed on this request ({failure.message}); the server's log has the details"


class TritonPythonModel:
    """A served model for Triton's Python backend (initialize / execute / finalize); see the module docstring."""

    def initialize(self, args: dict) -> None:
        self.name = json.loads(args["model_config"])["name"]
        spec = json.loads((Path(args["model_repository"]) / str(args["model_version"]) / SPEC).read_text("utf-8"))
        self.kind = spec["kind"]
        if self.kind == "info":
            self.payload = np.array([Path(spec["model_json"]).read_bytes()], dtype=object)
            return
        meta = store.read_model_json(spec["models"])
        self.spec, self.runners = spec, None
        self.multiple = tuple(int(m) for m in meta["input_multiple"])
        self.max_voxels = int(spec["max_voxels"])
        if not spec.get("lazy"):
            self._load()

    def _load(self) -> list:
        """The runners of this model's folds, loaded on the first call."""
        if self.runners is None:
            s = self.spec
            if s.get("threads"):
                import torch
                torch.set_num_threads(int(s["threads"]))
            self.runners = [r for _, r in store.load_runners(s["models"], s["backend"], int(s.get("threads") or 0),
                                                             s["folds"])]
        return self.runners

    def execute(self, requests) -> list:
        import triton_python_backend_utils as pb
        if self.kind == "info":
            return [pb.InferenceResponse(output_tensors=[pb.Tensor("model_json", self.payload)]) for _ in requests]
        arrays = [pb.get_input_tensor_by_name(r, store.INPUT).as_numpy() for r in requests]
        answers = answer_windows(arrays, lambda x: mean_probability(self._load(), x),
                                 lambda a: check_windows(a, self.multiple, self.max_voxels))
        responses = []
        for a in answers:
            if isinstance(a, Failure):
                log(f"{'bad' if a.bad_request else 'failed'} request (model {self.name}): {a.message}\n{a.trace}")
                code = pb.TritonError.INVALID_ARG if a.bad_request else pb.TritonError.INTERNAL
                responses.append(pb.InferenceResponse(error=pb.TritonError(error_sentence(a, self.name), code)))
            else:
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(store.OUTPUT, a)]))
        return responses

    def finalize(self) -> None:
        self.runners = []
