"""``python -m ahnet.serve`` (console script ``ahnet-serve``, ``bash run.sh serve``): a Triton server (the
tritonserver PyTriton ships) for a folder that ``python -m ahnet.export`` wrote (the server: ahnet.serve.server).
"""
from __future__ import annotations

import importlib.util
import math
import socket
import sys
from pathlib import Path

from ahnet import failures
from ahnet.serve import store
from ahnet.serve.server import PROG, ServeInputError, run_server

def _port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def check_options(a) -> None:
    ports = {"--http-port": a.http_port, "--grpc-port": a.grpc_port, "--metrics-port": a.metrics_port}
    for flag, p in ports.items():
        if not 1 <= p <= 65535:
            raise ServeInputError(f"{flag} {p} is not a port (1 .. 65535)")
    if len(set(ports.values())) != 3:
        raise ServeInputError(f"--http-port, --grpc-port and --metrics-port must differ; got {list(ports.values())}")
    if not 1 <= a.max_batch <= 1024:
        raise ServeInputError(f"--max-batch {a.max_batch} must lie in 1 .. 1024 windows")
    if a.queue_delay_us < 0:
        raise ServeInputError(f"--queue-delay-us {a.queue_delay_us} must be >= 0")
    if a.max_window_voxels is not None and a.max_window_voxels < 1:
        raise ServeInputError(f"--max-window-voxels {a.max_window_voxels} must be >= 1")
    if a.threads < 0 or a.exit_timeout < 1:
        raise ServeInputError("--threads must be >= 0 and --exit-timeout >= 1 second")
    for flag, p in ports.items():
        if not _port_free(a.address, p):
            raise ServeInputError(f"{flag} {p} is in use on {a.address}; choose a free port")


def build_parser() -> failures.Parser:
    ap = failures.Parser(PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", required=True, help="a folder written by python -m ahnet.export")
    ap.add_argument("--backend", choices=tuple(store.BACKENDS), default="pytorch",
                    help="pytorch: the TorchScript files (default); onnx: the ONNX files in ONNX Runtime")
    ap.add_argument("--address", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--max-batch", type=int, default=8, help="windows per model execution (dynamic batching)")
    ap.add_argument("--queue-delay-us", type=int, default=2000, help="dynamic batcher's longest wait")
    ap.add_argument("--max-window-voxels", type=int, default=None,
                    help="largest window accepted, in voxels (default 8 x the default window)")
    ap.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads (0 = their default)")
    ap.add_argument("--exit-timeout", type=int, default=5, help="seconds in-flight requests get at shutdown")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    return failures.run(PROG, lambda: _main(a))


def _main(a) -> int:
    check_options(a)
    meta = store.read_model_json(a.models)
    if Path(a.models).resolve().name != meta["name"]:
        meta = dict(meta, name=Path(a.models).resolve().name)
    store.fold_files(a.models, a.backend)              # every fold's file is there (the stubs load them)
    need = ["pytriton"] + (["onnxruntime"] if a.backend == "onnx" else ["torch"])
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        raise ServeInputError(f"serving needs the serve extra ({', '.join(missing)} missing): pip install -e "
                              f"'.[serve]', or bash run.sh serve")
    max_voxels = a.max_window_voxels or 8 * math.prod(int(w) for w in meta["window"])
    return run_server(a, meta, max_voxels)


if __name__ == "__main__":
    sys.exit(main())
