"""Serving benchmark: in-process PyTorch vs Triton + PyTorch vs Triton + ONNX Runtime, on one machine.

    python -m ahnet.serve.bench --models models/<name> [--scan 40 192 192] [--window D H W] [--scans 3]
                                [--concurrency 1 4] [--backends pytorch onnx] [--out bench_results/serving.json]

(``run_serving_bench(argv)`` is the entry point a ``--serving`` flag of ``python -m ahnet.bench`` can call.)

For a synthetic CT-like scan of ``--scan`` (z, y, x) voxels, HU scaled as ahnet.predict scales it:
- in-process: ahnet.predict's own ensemble probability (the folds' checkpoints named in model.json, fp32, CPU);
- Triton + backend: ``python -m ahnet.serve`` started on free local ports, then clients that each run ahnet.client's
  windows (``--batch`` windows per request) on their own copy of the scan, ``--concurrency`` clients at once.
Reported per row: seconds per scan (median), windows per second (window positions of the scan x scans / wall time;
each window runs through every fold), p50 / p95 scan latency per concurrency level, and the server's peak memory
(the largest sum of RSS over the server process and every process below it, sampled every 0.2 s).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from . import adapter, store

PROG = "python -m ahnet.serve.bench"


def synthetic_scan(shape, seed: int = 0) -> np.ndarray:
    """A [0, 1]-scaled CT-like volume (z, y, x): air with noise, a soft-tissue slab, bright blobs."""
    from ..data.preprocess import clip_and_scale
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -850.0, np.float32) + rng.normal(0, 60, shape).astype(np.float32)
    hu[:, shape[1] * 2 // 3:, :] = 30.0
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    for cz, cy, cx in rng.integers(0, shape, size=(6, 3)):
        hu[(z - cz) ** 2 * 9 + (y - cy) ** 2 + (x - cx) ** 2 <= 36] = 60.0
    return clip_and_scale(hu)


def window_count(shape, window, overlap: float) -> int:
    from ..infer import window_starts
    padded = [max(s, w) for s, w in zip(shape, window)]
    return int(np.prod([len(window_starts(L, w, overlap)) for L, w in zip(padded, window)]))


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _tree_rss_mb(pid: int) -> float:
    kids: dict = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                kids.setdefault(int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
        todo += kids.get(p, [])
    return total


class ServerProcess:
    """``python -m ahnet.serve`` in its own session on free ports, its peak tree memory sampled; stop() always."""

    def __init__(self, models, backend: str, threads: int, max_batch: int, max_voxels: int,
                 timeout_s: float = 300):
        self.http, self.grpc, self.metrics = _free_ports(3)
        self.log = Path(models) / f".bench-serve-{backend}.log"
        self.fh = open(self.log, "w")
        cmd = [sys.executable, "-m", "ahnet.serve", "--models", str(models), "--backend", backend,
               "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
               "--threads", str(threads), "--max-batch", str(max_batch),
               "--max-window-voxels", str(max_voxels)]
        self.proc = subprocess.Popen(cmd, stdout=self.fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.peak_mb, self._stop = 0.0, threading.Event()
        deadline = time.monotonic() + timeout_s
        while "[serve] ready" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self):
        while not self._stop.wait(0.2):
            self.peak_mb = max(self.peak_mb, _tree_rss_mb(self.proc.pid))

    def stop(self):
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=30)
        self.fh.close()
        self.log.unlink(missing_ok=True)


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


def run_serving_bench(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    import torch
    torch.set_num_threads(a.threads or torch.get_num_threads())
    meta = store.read_model_json(a.models)
    shape = tuple(a.scan)
    window = adapter.window_for(shape, meta["input_multiple"], meta["window"], a.window)
    n_win = window_count(shape, window, a.overlap)
    scans = {}

    def scan(seed):
        if seed not in scans:
            scans[seed] = synthetic_scan(shape, seed)
        return scans[seed]
    rows = []
    runs = [f["checkpoint"] for f in meta["folds"]]
    for k in range(a.scans):                           # scans are made before any timing
        scan(k)
    lat, wall = _latencies(lambda s: adapter.predict_in_process(runs, scan(s), window=window, overlap=a.overlap,
                                                                batch=a.batch), 1, a.scans)
    rows.append(_row("in-process PyTorch", lat, wall, n_win, 1))
    print(json.dumps(rows[-1]), flush=True)
    from ..client import Connection, RemoteWindows
    for backend in a.backends:
        srv = ServerProcess(a.models, backend, a.threads, a.max_batch, int(np.prod(window)))
        try:
            for c in a.concurrency:
                conns = [Connection(f"127.0.0.1:{srv.http}", retries=3) for _ in range(c)]
                remotes = [RemoteWindows(k, meta["name"], meta["input_multiple"]) for k in conns]
                pick = itertools.count()
                local = threading.local()

                def one(seed):
                    if not hasattr(local, "remote"):
                        local.remote = remotes[next(pick)]
                    adapter.blend(local.remote, scan(seed), window, overlap=a.overlap, batch=a.batch)
                for s in range(c):                     # scans made before timing
                    for k in range(a.scans):
                        scan(s * 1000 + k)
                lat, wall = _latencies(one, c, a.scans)
                rows.append(_row(f"Triton + {'PyTorch' if backend == 'pytorch' else 'ONNX Runtime'}", lat, wall,
                                 n_win, c, round(srv.peak_mb, 1)))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            srv.stop()
    res = {"scan": list(shape), "window": list(window), "overlap": a.overlap, "windows_per_scan": n_win,
           "folds": len(meta["folds"]), "batch": a.batch, "threads": a.threads, "model": meta["architecture"][0],
           "cpu_count": os.cpu_count(), "load_avg_before": os.getloadavg(), "rows": rows}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", required=True, help="a folder written by python -m ahnet.export (both formats)")
    ap.add_argument("--scan", type=int, nargs=3, default=[40, 192, 192], metavar=("Z", "Y", "X"))
    ap.add_argument("--window", type=int, nargs=3, default=None, metavar=("D", "H", "W"))
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=4, help="windows per request / forward pass")
    ap.add_argument("--max-batch", type=int, default=8, help="the server's dynamic batch limit")
    ap.add_argument("--scans", type=int, default=3, help="scans per client")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--backends", nargs="+", choices=tuple(store.BACKENDS), default=list(store.BACKENDS))
    ap.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads (0 = default)")
    ap.add_argument("--out", default="bench_results/serving.json")
    return ap


def main(argv=None) -> int:
    try:
        res = run_serving_bench(argv)
    except (store.StoreError,) + adapter.INPUT_ERRORS as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res["rows"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
