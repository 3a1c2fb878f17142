"""A Triton Inference Server for an exported ensemble (``bash run.sh serve --models DIR``).

    python -m ahnet.serve --models models/<name> [--backend pytorch|onnx] [--http-port 8000] [--grpc-port 8001]
                          [--metrics-port 8002] [--address 127.0.0.1] [--max-batch 8] [--queue-delay-us 2000]

Models served (Triton names; ``<name>`` is model.json's name, the export folder's name):
- ``<name>``: the ensemble, the mean over folds of sigmoid(logits) per window (as ahnet.infer averages models);
- ``<name>-fold<k>``: each fold alone, sigmoid(logits);
- ``ahnet-info``: model.json (name, input multiple, window, intensity rule...) for clients (one BYTES output).
Input ``image``: float32 windows (N, 1, D, H, W), N <= --max-batch, D, H, W multiples of the input multiple and at
most --max-window-voxels voxels each (default: 8 x the default window), finite values (the [0, 1]-scaled CT).
Output ``probability``: float32 (N, 1, D, H, W). Dynamic batching merges concurrent requests up to --max-batch
windows, waiting at most --queue-delay-us. Backends: ``pytorch`` runs each fold's TorchScript file (a GPU when torch
sees one), ``onnx`` its ONNX file in ONNX Runtime (CPU). Triton's own endpoints answer as usual: /v2/health/live,
/v2/health/ready, /v2/models/<model>/ready on HTTP, the same over gRPC, and Prometheus metrics on the metrics port.

How: the models are Triton Python-backend models of this package (ahnet.serve.backend), written into a temporary
model repository (``write_repository``) that ``tritonserver`` loads at start; PyTriton (nvidia-pytriton) ships the
``tritonserver`` binary and its Python stub and starts and stops them. Each model runs in a stub process of its
own: the ensemble's loads every fold at start, each fold model its fold on its first request (a stub that holds
torch and models costs hundreds of MB, an idle one ~43 MB). PyTriton's own model binding is not used: it
answers a failed request with its tracebacks, file paths included, and no option turns that off.

Bad requests get one sentence, never a traceback or a path: Triton itself rejects a wrong dtype, rank or channel
count, a batch over --max-batch and an unknown model; the model rejects sizes that are not multiples, oversized
windows and non-finite values (HTTP 400 / gRPC INVALID_ARGUMENT), each request of a dynamic batch on its own, and
writes ``bad request (model <m>): <sentence>`` and the traceback to this server's log.

Shutdown: SIGTERM or SIGINT stops Triton (in-flight requests get --exit-timeout seconds) and every process it
started. The Python stub loads libpython from the library path; the interpreter's own LIBDIR is put first on
LD_LIBRARY_PATH before Triton starts, so a stub under an interpreter built elsewhere (pyenv) loads the matching
libpython (without it: '_thread.RLock' object has no attribute '_recursion_count'); the folder that holds this
package goes first on PYTHONPATH, so the stubs import this checkout's ahnet.
"""
from __future__ import annotations

import json
import os
import signal
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

from ahnet import failures
from ahnet.serve import backend, store
from ahnet.serve.process import READY_LINE, STOPPED_LINE

PROG = "ahnet.serve"
MODEL_PY = ('"""Written by ahnet.serve.server: the model is ahnet.serve.backend (Triton Python backend)."""\n'
            "from ahnet.serve.backend import TritonPythonModel  # noqa: F401\n")


class ServeInputError(ValueError):
    """An option or model folder the server cannot use."""


def libpython_first() -> str:
    """Put this interpreter's LIBDIR first on LD_LIBRARY_PATH (inherited by tritonserver and its Python stubs);
    returns the new value."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
    os.environ["LD_LIBRARY_PATH"] = ":".join(([libdir] if libdir else []) + parts)
    return os.environ["LD_LIBRARY_PATH"]


def package_first() -> str:
    """Put the folder holding this ahnet package first on PYTHONPATH (the stubs import ahnet.serve.backend from
    it); returns the new value."""
    root = str(Path(backend.__file__).resolve().parents[2])
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    os.environ["PYTHONPATH"] = os.pathsep.join([root] + parts)
    return os.environ["PYTHONPATH"]


# --------------------------------------------------------------------------------------------- the repository

def windows_config(name: str, max_batch: int, queue_delay_us: int) -> str:
    """config.pbtxt of a windows model: image (N, C, D, H, W) float32 -> probability, dynamic batching (C is left
    free, so that a wrong channel count gets the model's own sentence rather than Triton's shape message)."""
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}\n"
            'instance_group [ { count: 1 kind: KIND_CPU } ]\n'
            f'input [ {{ name: "{store.INPUT}" data_type: TYPE_FP32 dims: [ -1, -1, -1, -1 ] }} ]\n'
            f'output [ {{ name: "{store.OUTPUT}" data_type: TYPE_FP32 dims: [ -1, -1, -1, -1 ] }} ]\n')


def info_config(name: str) -> str:
    """config.pbtxt of the info model: any INT32 query -> model.json as one BYTES value, no batching."""
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
            'instance_group [ { count: 1 kind: KIND_CPU } ]\n'
            'input [ { name: "query" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
            'output [ { name: "model_json" data_type: TYPE_STRING dims: [ 1 ] } ]\n')


def _write_model(repo: Path, name: str, config: str, spec: dict) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config, encoding="utf-8")
    (repo / name / "1" / "model.py").write_text(MODEL_PY, encoding="utf-8")
    (repo / name / "1" / backend.SPEC).write_text(json.dumps(spec), encoding="utf-8")


def write_repository(repo: Path, meta: dict, models, how: dict) -> list:
    """The Triton model repository under ``repo``: the ensemble ``meta["name"]``, one model per fold and the info
    model; ``how``: backend, threads, max_batch, queue_delay_us, max_voxels. Returns the model names."""
    repo, name = Path(repo), meta["name"]
    folds = [f["name"] for f in meta["folds"]]
    base = {"kind": "windows", "models": str(Path(models).resolve()), "backend": how["backend"],
            "threads": how["threads"], "max_voxels": how["max_voxels"]}
    served = [(name, folds)] + [(f"{name}-{f}", [f]) for f in folds]
    for model, its_folds in served:
        _write_model(repo, model, windows_config(model, how["max_batch"], how["queue_delay_us"]),
                     dict(base, folds=its_folds, lazy=model != name))
    info = repo / store.INFO_MODEL / "1" / store.MODEL_JSON
    _write_model(repo, store.INFO_MODEL, info_config(store.INFO_MODEL), {"kind": "info", "model_json": str(info)})
    info.write_text(json.dumps(meta), encoding="utf-8")
    return [m for m, _ in served] + [store.INFO_MODEL]


# --------------------------------------------------------------------------------------------- the server

def run_server(a, meta: dict, max_voxels: int) -> int:
    """Serve ``meta`` (model.json, its name the served name) from the folder ``a.models`` with the options ``a``
    until SIGTERM or SIGINT; returns the exit code."""
    libpython_first()
    package_first()
    from pytriton.triton import Triton, TritonConfig
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    how = {"backend": a.backend, "threads": a.threads, "max_batch": a.max_batch, "queue_delay_us": a.queue_delay_us,
           "max_voxels": max_voxels}
    with tempfile.TemporaryDirectory(prefix="ahnet-serve-") as repo:
        names = write_repository(Path(repo), meta, a.models, how)
        cfg = TritonConfig(http_address=a.address, http_port=a.http_port, grpc_address=a.address,
                           grpc_port=a.grpc_port, metrics_address=a.address, metrics_port=a.metrics_port,
                           allow_metrics=True, allow_cpu_metrics=True, exit_timeout_secs=a.exit_timeout,
                           log_verbose=0, model_repository=Path(repo))
        triton = Triton(config=cfg)
        try:
            try:
                triton.run()
            except Exception as e:                      # PyTriton's start errors; the log above has Triton's reason
                return failures.fail(PROG, f"the Triton server did not start ({failures.one_line(e)}); its log "
                                           f"above says why", 1)
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
