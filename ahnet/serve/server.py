"""A Triton Inference Server for an exported ensemble, through PyTriton (``bash run.sh serve --models DIR``).

    python -m ahnet.serve --models models/<name> [--backend pytorch|onnx] [--http-port 8000] [--grpc-port 8001]
                          [--metrics-port 8002] [--address 127.0.0.1] [--max-batch 8] [--queue-delay-us 2000]

Models served (Triton names; ``<name>`` is model.json's name, the export folder's name):
- ``<name>``: the ensemble, the mean over folds of sigmoid(logits) per window (as ahnet.infer averages models);
- ``<name>-fold<k>``: each fold alone, sigmoid(logits);
- ``ahnet-info``: model.json (name, input multiple, window, intensity rule...) for clients (one BYTES output).
Input ``image``: float32 windows (N, 1, D, H, W), N <= --max-batch, D, H, W multiples of the input multiple and at
most --max-window-voxels voxels each (default: 8 x the default window), finite values (the [0, 1]-scaled CT).
Output ``probability``: float32 (N, 1, D, H, W). Dynamic batching merges concurrent requests of the same shape up
to --max-batch windows, waiting at most --queue-delay-us. Backends: ``pytorch`` runs each fold's TorchScript file
(a GPU when torch sees one), ``onnx`` its ONNX file in ONNX Runtime (CPU). Triton's own endpoints answer as usual:
/v2/health/live, /v2/health/ready, /v2/models/<model>/ready on HTTP, the same over gRPC, and Prometheus metrics on
the metrics port (/metrics).

Bad requests: Triton itself rejects a wrong dtype, rank or channel count, a batch over --max-batch and an unknown
model; the model rejects sizes that are not multiples, oversized windows and non-finite values, each with one
sentence: ``RequestError: <sentence>`` in the reply (PyTriton wraps it in its tracebacks, which no option turns
off; ``ahnet.serve.client.server_message`` takes the sentence out, and the client prints it alone), and one line
``bad request: <sentence>`` in this server's log instead of PyTriton's traceback. A request that fails fails the
dynamic batch it was merged into (PyTriton answers one error per batch); Triton merges only requests of equal
shape.

Shutdown: SIGTERM or SIGINT stops Triton (in-flight requests get --exit-timeout seconds) and every process it
started. PyTriton's model stub loads libpython from the library path; the interpreter's own LIBDIR is put first on
LD_LIBRARY_PATH before Triton starts, so a stub under an interpreter built elsewhere (pyenv) loads the matching
libpython (without it: '_thread.RLock' object has no attribute '_recursion_count').
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sysconfig
import threading
import time

import numpy as np
import torch

from ahnet import failures
from ahnet.serve import store
from ahnet.serve.process import READY_LINE, STOPPED_LINE

PROG = "ahnet.serve"


class RequestError(ValueError):
    """A request the model cannot answer; the message is one sentence naming the problem."""


class ServeInputError(ValueError):
    """An option or model folder the server cannot use."""


class OneLineRequestErrors(logging.Filter):
    """PyTriton logs every failed request with its traceback: a RequestError (the client's fault, answered with
    its sentence) becomes one line ``bad request: <sentence>``; other failures keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        found = re.search(r"RequestError: ([^\n]+)", record.getMessage())
        if found:
            record.msg, record.args = "bad request: %s", (found.group(1),)
            record.exc_info = record.exc_text = None
        return True


def libpython_first() -> str:
    """Put this interpreter's LIBDIR first on LD_LIBRARY_PATH (inherited by tritonserver and its Python stubs);
    returns the new value."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
    os.environ["LD_LIBRARY_PATH"] = ":".join(([libdir] if libdir else []) + parts)
    return os.environ["LD_LIBRARY_PATH"]


# --------------------------------------------------------------------------------------------- the models

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
    total = None
    for run in runners:
        p = torch.sigmoid(torch.from_numpy(run(x)).float())
        total = p if total is None else total + p
    return (total / len(runners)).numpy()


def make_infer(runners, multiple, max_voxels: int):
    """PyTriton inference callable: a list of requests -> a list of {probability}; requests of one shape run as
    one batch."""
    lock = threading.Lock()

    def infer(requests):
        arrays = [np.asarray(r[store.INPUT]) for r in requests]
        for a in arrays:
            check_windows(a, multiple, max_voxels)
        out = [None] * len(arrays)
        groups: dict = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.shape[1:], []).append(i)
        for idx in groups.values():
            x = np.ascontiguousarray(np.concatenate([arrays[i] for i in idx]), np.float32)
            with lock:
                p = mean_probability(runners, x)
            start = 0
            for i in idx:
                n = arrays[i].shape[0]
                out[i] = {store.OUTPUT: p[start:start + n]}
                start += n
        return out
    return infer


def make_info(meta: dict):
    payload = np.array([json.dumps(meta).encode()], dtype=object)

    def info(requests):
        return [{"model_json": payload} for _ in requests]
    return info


def bind_models(triton, meta: dict, runners, max_batch: int, queue_delay_us: int, max_voxels: int) -> list:
    """Bind the ensemble, every fold and the info model to a pytriton Triton; returns the model names."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    name, multiple = meta["name"], meta["input_multiple"]
    io_in = [Tensor(name=store.INPUT, dtype=np.float32, shape=(1, -1, -1, -1))]
    io_out = [Tensor(name=store.OUTPUT, dtype=np.float32, shape=(1, -1, -1, -1))]
    cfg = ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=queue_delay_us))
    models = [(name, [r for _, r in runners])] + [(f"{name}-{fold}", [r]) for fold, r in runners]
    for model_name, rs in models:
        triton.bind(model_name=model_name, infer_func=make_infer(rs, multiple, max_voxels), inputs=io_in,
                    outputs=io_out, config=cfg, strict=True)
    triton.bind(model_name=store.INFO_MODEL, infer_func=make_info(meta),
                inputs=[Tensor(name="query", dtype=np.int32, shape=(1,))],
                outputs=[Tensor(name="model_json", dtype=bytes, shape=(1,))],
                config=ModelConfig(batching=False))
    return [m for m, _ in models] + [store.INFO_MODEL]


# --------------------------------------------------------------------------------------------- the CLI


def run_server(a, meta, runners, max_voxels) -> int:
    libpython_first()
    from pytriton.triton import Triton, TritonConfig
    logging.getLogger("pytriton.proxy.inference").addFilter(OneLineRequestErrors())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cfg = TritonConfig(http_address=a.address, http_port=a.http_port, grpc_address=a.address,
                       grpc_port=a.grpc_port, metrics_address=a.address, metrics_port=a.metrics_port,
                       allow_metrics=True, allow_cpu_metrics=True, exit_timeout_secs=a.exit_timeout,
                       log_verbose=0)
    triton = Triton(config=cfg)
    try:
        names = bind_models(triton, meta, runners, a.max_batch, a.queue_delay_us, max_voxels)
        triton.run()
        print(f"{READY_LINE}: {', '.join(names)} ({a.backend}) on http {a.address}:{a.http_port}, grpc "
              f"{a.address}:{a.grpc_port}, metrics {a.address}:{a.metrics_port}/metrics", flush=True)
        while not stop.wait(1.0):
            if not triton.is_alive():
                return failures.fail(PROG, "the Triton server stopped on its own", 1)
    finally:
        t0 = time.monotonic()
        triton.stop()
        print(f"{STOPPED_LINE} {time.monotonic() - t0:.1f} s", flush=True)
    return 0
