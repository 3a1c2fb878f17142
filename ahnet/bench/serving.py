"""Serving benchmark: in-process PyTorch vs Triton + PyTorch vs Triton + ONNX Runtime, on one machine.

    python -m ahnet.bench --serving --models models/<name> [--scan 40 192 192] [--window D H W] [--scans 3]
                          [--concurrency 1 4] [--backends pytorch onnx] [--out bench_results/serving.json]

(the serving section of ``python -m ahnet.bench``; ``python -m ahnet.bench.serving`` runs the same.)

For a synthetic CT-like scan of ``--scan`` (z, y, x) voxels, HU scaled as ahnet.commands.predict scales it:
- in-process: ahnet.infer.predict_volume with the ensemble of the folds' checkpoints named in model.json (fp32,
  CPU), the window by the ensemble's own rule;
- Triton + backend: ``python -m ahnet.serve`` started on free local ports (ahnet.serve.process), then clients
  that each run ahnet.serve.client's remote probability (``--batch`` windows per request) on their own copy of the scan,
  ``--concurrency`` clients at once.
Reported per row: seconds per scan (median), windows per second (window positions of the scan x scans / wall time;
each window runs through every fold), p50 / p95 scan latency per concurrency level, and the server's peak memory
(the largest sum of RSS over the server process and every process below it, sampled every 0.2 s).
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ahnet.infer import WindowSettings, add_window_arguments, window_for
from ahnet.serve import store

PROG = "ahnet.serve.bench"


class ServingBenchError(ValueError):
    """An option or model folder the serving benchmark cannot use (one sentence)."""


def synthetic_scan(shape, seed: int = 0) -> np.ndarray:
    """A [0, 1]-scaled CT-like volume (z, y, x): air with noise, a soft-tissue slab, bright blobs."""
    from ahnet.data.preprocess import clip_and_scale
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -850.0, np.float32) + rng.normal(0, 60, shape).astype(np.float32)
    hu[:, shape[1] * 2 // 3:, :] = 30.0
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    for cz, cy, cx in rng.integers(0, shape, size=(6, 3)):
        hu[(z - cz) ** 2 * 9 + (y - cy) ** 2 + (x - cx) ** 2 <= 36] = 60.0
    return clip_and_scale(hu)


def window_count(shape, window, overlap: float) -> int:
    """Window positions of a volume of ``shape`` (ahnet.infer.window_starts on the padded shape)."""
    from ahnet.infer import window_starts
    padded = [max(s, w) for s, w in zip(shape, window)]
    return int(np.prod([len(window_starts(L, w, overlap)) for L, w in zip(padded, window)]))


def _latencies(fn, concurrency: int, scans: int) -> tuple:
    """(per-scan seconds, wall seconds) of ``concurrency`` threads each calling fn(seed) ``scans`` times."""
    lat, errors, lock = [], [], threading.Lock()

    def worker(c):
        try:
            for k in range(scans):
                t0 = time.perf_counter()
                fn(c * 1000 + k)
                with lock:
                    lat.append(time.perf_counter() - t0)
        except Exception as e:                         # re-raised below, in the caller's thread
            errors.append(e)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return lat, time.perf_counter() - t0


def _row(name, lat, wall, n_windows, concurrency, peak_mb=None) -> dict:
    return {"setup": name, "concurrency": concurrency, "scans": len(lat), "s_per_scan_median": float(np.median(lat)),
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
            "windows_per_s": n_windows * len(lat) / wall, "server_peak_rss_mb": peak_mb}


def _served_rows(a, meta, scan, windows: WindowSettings, n_win, backend: str) -> list:
    """Rows of one backend: a server on free ports, then each --concurrency level of clients."""
    from ahnet.serve.client import Connection, RemoteWindows, remote_probability
    from ahnet.serve.process import ServerProcess
    rows = []
    log = Path(tempfile.mkdtemp(prefix="ahnet-serve-bench-")) / f"serve-{backend}.log"
    args = ["--backend", backend, "--threads", str(a.threads), "--max-batch", str(a.max_batch),
            "--max-window-voxels", str(int(np.prod(windows.window)))]
    with ServerProcess(a.models, log, args, sample_rss=True) as srv:
        for c in a.concurrency:
            probs = [remote_probability(RemoteWindows(Connection(srv.url, retries=3), meta["name"],
                                                      meta["input_multiple"]), meta["window"],
                                        windows) for _ in range(c)]
            pick, local = itertools.count(), threading.local()

            def one(seed):
                if not hasattr(local, "probability"):
                    local.probability = probs[next(pick)]
                local.probability(scan(seed))
            for s in range(c):                         # scans made before timing
                for k in range(a.scans):
                    scan(s * 1000 + k)
            lat, wall = _latencies(one, c, a.scans)
            rows.append(_row(f"Triton + {'PyTorch' if backend == 'pytorch' else 'ONNX Runtime'}", lat, wall,
                             n_win, c, round(srv.peak_rss_mb(), 1)))
            print(json.dumps(rows[-1]), flush=True)
    log.unlink(missing_ok=True)
    log.parent.rmdir()
    return rows


def check_options(a) -> tuple[dict, WindowSettings]:
    """The options and the model folder, before anything runs (ServingBenchError); returns model.json and the
    window settings."""
    missing = [m for m in ("pytriton", "tritonclient", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ServingBenchError(f"the serving benchmark needs the serve extra ({', '.join(missing)} missing): "
                                f"pip install -e '.[serve]', or bash run.sh test")
    if min(a.scan) < 1 or a.scans < 1 or a.max_batch < 1 or a.threads < 0:
        raise ServingBenchError("--scan sizes, --scans and --max-batch must be >= 1 and --threads >= 0")
    if not a.concurrency or min(a.concurrency) < 1:
        raise ServingBenchError(f"--concurrency {a.concurrency} must list client counts >= 1")
    windows = WindowSettings.from_arguments(a)
    meta = store.read_model_json(a.models)
    window_for((1, 1, 1), meta["input_multiple"], meta["window"], windows.window)    # --window, by the rule itself
    return meta, windows


def run_serving_bench(a) -> dict:
    """The rows (see the module docstring) for parsed options ``a``; writes --out when given."""
    meta, windows = check_options(a)
    import torch
    from ahnet.infer import load_ensemble, predict_volume
    torch.set_num_threads(a.threads or torch.get_num_threads())
    ens = load_ensemble([f["checkpoint"] for f in meta["folds"]], "cpu")
    shape = tuple(a.scan)
    windows = WindowSettings(ens.window(shape, windows.window), windows.overlap, windows.sw_batch)
    n_win = window_count(shape, windows.window, windows.overlap)
    scans = {}

    def scan(seed):
        if seed not in scans:
            scans[seed] = synthetic_scan(shape, seed)
        return scans[seed]
    for k in range(a.scans):                           # scans are made before any timing
        scan(k)
    lat, wall = _latencies(lambda s: predict_volume(ens, scan(s), **windows.kwargs(), amp="off"), 1, a.scans)
    rows = [_row("in-process PyTorch", lat, wall, n_win, 1)]
    print(json.dumps(rows[-1]), flush=True)
    for backend in a.backends:
        rows += _served_rows(a, meta, scan, windows, n_win, backend)
    res = {"scan": list(shape), "window": list(windows.window), "overlap": windows.overlap, "windows_per_scan": n_win,
           "folds": len(meta["folds"]), "batch": windows.sw_batch, "threads": a.threads,
           "model": meta["architecture"][0],
           "cpu_count": os.cpu_count(), "load_avg_before": os.getloadavg(), "rows": rows}
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(out)
    return res


def add_options(ap) -> None:
    """The serving benchmark's options (python -m ahnet.bench.serving, python -m ahnet.bench --serving)."""
    ap.add_argument("--models", required=True, help="a folder written by python -m ahnet.export (both formats)")
    ap.add_argument("--scan", type=int, nargs=3, default=[40, 192, 192], metavar=("Z", "Y", "X"))
    add_window_arguments(ap, batch_flag="--batch", batch_default=4, batch_help="windows per request / forward pass",
                         window_help="3D window (default: the exported model's window, as ahnet.commands.predict)")
    ap.add_argument("--max-batch", type=int, default=8, help="the server's dynamic batch limit")
    ap.add_argument("--scans", type=int, default=3, help="scans per client")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--backends", nargs="+", choices=tuple(store.BACKENDS), default=list(store.BACKENDS))
    ap.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads (0 = default)")
    ap.add_argument("--out", default="bench_results/serving.json")
