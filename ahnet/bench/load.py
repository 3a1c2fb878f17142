"""Serving under load: N concurrent clients for a bounded time against the served ensemble, bad requests mixed in.

    python -m ahnet.bench --serving --load --models models/<name> [--concurrency 1 4 16] [--duration 25]
                          [--bad-fraction 0.1] [--batch 4] [--backend pytorch] [--threads 1]
                          [--max-growth-mb 100] [--out bench_results]

One server (``python -m ahnet.serve`` on free loopback ports, ahnet.serve.process), warmed up (``warm_up``: every
execution size the dynamic batcher can form, twice); then for each N of ``--concurrency``: N client threads, each
with its own HTTP connection, send requests for ``--duration`` seconds (a request in flight at the deadline is
finished and counted). Of each client's requests a share ``--bad-fraction`` is bad, evenly spread (``is_bad``; 0.1:
every tenth), taking BAD_KINDS (the bad requests the serving tests send) in turn over the clients and levels; the
others are ``--batch`` random [0, 1] windows of the served default window for the ensemble. Counted: good requests
that failed (any error, a wrong shape, a non-finite value) and bad requests whose reply was not their sentence (a
success, other words, more than one line, a traceback or a path). Measured per N: p50 / p95 / p99 latency of the
good requests (seconds, client side), throughput (good requests and windows per second of wall time), the server's
memory (RSS summed over the server process and every process below it: tritonserver and its Python stubs, MB) before
and after, and its peak.

Memory rule: the server's RSS after the last level may exceed its RSS after the warm-up by at most
``--max-growth-mb``. The command writes ``<out>/serving-load-<time>.json`` and ``.md`` (the Markdown table) and
exits 1 when a good request failed, a bad one got another reply, or memory grew beyond the bound.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from ahnet.serve import store

BAD_KINDS = ("dtype", "rank", "channels", "multiple", "nan", "batch", "voxels", "model")


class LoadBenchError(ValueError):
    """An option the load benchmark cannot use (one sentence)."""


def one_sentence(msg: str) -> bool:
    """A reply a client can show as it is: one line, no traceback, no file path."""
    return "\n" not in msg and "Traceback" not in msg and ".py" not in msg and "/" not in msg


def bad_request(kind: str, good: np.ndarray, name: str, multiple, max_batch: int, max_voxels: int) -> tuple:
    """(model, array, Triton dtype, words the reply must hold) of one bad request of ``kind`` (BAD_KINDS) built
    from a good batch ``good`` (N, 1, D, H, W) for the served model ``name``."""
    d, h, w = (int(m) for m in multiple)
    if kind == "dtype":
        return name, good.astype(np.float64), "FP64", f"data-type is 'FP64', but model '{name}' expects 'FP32'"
    if kind == "rank":
        return name, good[:, 0], "FP32", "Expected [-1,-1,-1,-1,-1], got"
    if kind == "channels":
        two = np.concatenate([good, good], 1)
        return name, two, "FP32", f"input image has shape {two.shape}; expected (N, 1, D, H, W)"
    if kind == "multiple":       # the issue's: 4 x 30 x 32 where the multiple is 1 x 32 x 32
        size = (max(d, 4), h - 2, w)
        return name, np.zeros((1, 1) + size, np.float32), "FP32", \
            f"window size {size} is not a multiple of the model's input multiple {(d, h, w)}"
    if kind == "nan":
        nan = good.copy()
        nan[-1, 0, 0, 0, 0] = np.nan
        return name, nan, "FP32", "holds 1 NaN or infinite value(s); expected a [0, 1]-scaled CT window"
    if kind == "batch":
        return name, np.zeros((max_batch + 1, 1, d, h, w), np.float32), "FP32", f"batch-size must be <= {max_batch}"
    if kind == "voxels":         # a multiple in every axis, one in-plane step over the limit
        s = int(np.ceil(np.sqrt((max_voxels + 1) / (d * h * w))))
        size = (d, h * s, w * s)
        return name, np.zeros((1, 1) + size, np.float32), "FP32", \
            f"window size {size} has {d * h * w * s * s} voxels, over this server's limit of {max_voxels}"
    if kind == "model":
        return "no-such-model", good, "FP32", "Request for unknown model: 'no-such-model' is not found"
    raise LoadBenchError(f"bad request kind {kind!r} is not one of {', '.join(BAD_KINDS)}")


@dataclass
class Tally:
    """What the clients of one level saw."""
    good_latency_s: list = field(default_factory=list)
    good_failed: list = field(default_factory=list)        # one line per failed good request
    bad_answered: dict = field(default_factory=dict)       # kind -> requests answered with their sentence
    bad_wrong: list = field(default_factory=list)          # one line per bad request answered otherwise
    windows: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _send(client, model: str, arr: np.ndarray, dtype: str) -> np.ndarray:
    import tritonclient.http as tc
    i = tc.InferInput(store.INPUT, list(arr.shape), dtype)
    i.set_data_from_numpy(arr)
    return client.infer(model, [i], outputs=[tc.InferRequestedOutput(store.OUTPUT)]).as_numpy(store.OUTPUT)


def _good(client, name: str, x: np.ndarray, tally: Tally) -> None:
    t0 = time.perf_counter()
    try:
        p = _send(client, name, x, "FP32")
        problem = None if p.shape == x.shape and bool(np.isfinite(p).all()) else f"answered shape {p.shape}"
    except Exception as e:                              # any error fails a good request
        problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    with tally.lock:
        if problem:
            tally.good_failed.append(problem[:300])
        else:
            tally.good_latency_s.append(time.perf_counter() - t0)
            tally.windows += x.shape[0]


def _bad(client, kind: str, req: tuple, tally: Tally) -> None:
    from tritonclient.utils import InferenceServerException
    model, arr, dtype, words = req
    try:
        _send(client, model, arr, dtype)
        wrong = f"{kind}: answered as if it were good"
    except InferenceServerException as e:
        msg = e.message() or ""
        wrong = None if words in msg and one_sentence(msg) else f"{kind}: {msg[:300]!r}"
    with tally.lock:
        if wrong:
            tally.bad_wrong.append(wrong)
        else:
            tally.bad_answered[kind] = tally.bad_answered.get(kind, 0) + 1


def is_bad(i: int, client: int, fraction: float) -> bool:
    """Whether request ``i`` of client ``client`` is a bad one: ``fraction`` of every client's requests, evenly
    spread, the first halfway into the first period (0.1: requests 4, 14, 24, ...), shifted by the client's number."""
    f = Fraction(fraction).limit_denominator(1000)        # exact arithmetic: 0.1 x 30 is 3, not 3.0000000000000004
    if f <= 0:
        return False
    shift = client + int(Fraction(1, 2) / f)
    return (i + 1 + shift) * f // 1 > (i + shift) * f // 1


def run_clients(url: str, meta: dict, clients: int, duration_s: float, bad_fraction: float, batch: int,
                max_batch: int, max_voxels: int, seed: int = 0, first_kind: int = 0) -> tuple:
    """``clients`` threads sending requests to the ensemble at ``url`` (HOST:PORT, HTTP) for ``duration_s``
    seconds (see the module docstring); the bad requests take BAD_KINDS in turn across the clients, from
    ``first_kind`` on. Returns (Tally, wall seconds)."""
    import itertools
    import tritonclient.http as tc
    tally = Tally()
    name, window = meta["name"], tuple(int(w) for w in meta["window"])
    deadline = time.perf_counter() + duration_s
    turns = itertools.count(first_kind)                  # next() is atomic under the GIL

    def client(k: int) -> None:
        rng = np.random.default_rng(seed * 1000 + k)
        conn = tc.InferenceServerClient(url, network_timeout=600.0, connection_timeout=600.0)
        x = rng.random((batch, 1) + window, dtype=np.float32)
        bad = [(kind, bad_request(kind, x, name, meta["input_multiple"], max_batch, max_voxels))
               for kind in BAD_KINDS]
        i = 0
        try:
            while time.perf_counter() < deadline:
                if is_bad(i, k, bad_fraction):
                    _bad(conn, *bad[next(turns) % len(bad)], tally)
                else:
                    _good(conn, name, x, tally)
                i += 1
        finally:
            conn.close()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally, time.perf_counter() - t0


def level_row(clients: int, tally: Tally, wall_s: float, rss_before: float, rss_after: float, peak: float) -> dict:
    """One row of the table for ``clients`` concurrent clients."""
    lat = np.asarray(tally.good_latency_s, float)
    pct = (lambda q: round(float(np.percentile(lat, q)), 3)) if lat.size else (lambda q: None)
    return {"clients": clients, "wall_s": round(wall_s, 1), "good": int(lat.size) + len(tally.good_failed),
            "good_failed": len(tally.good_failed), "bad": sum(tally.bad_answered.values()) + len(tally.bad_wrong),
            "bad_wrong": len(tally.bad_wrong), "bad_answered": dict(sorted(tally.bad_answered.items())),
            "p50_s": pct(50), "p95_s": pct(95), "p99_s": pct(99),
            "requests_per_s": round(lat.size / wall_s, 2), "windows_per_s": round(tally.windows / wall_s, 2),
            "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_after, 1), "rss_peak_mb": round(peak, 1),
            "failures": tally.good_failed[:5], "wrong_replies": tally.bad_wrong[:5]}


def markdown(res: dict) -> str:
    """The Markdown table of a load run."""
    head = ("| clients | s | good requests | failed | bad requests | bad answered otherwise | p50 s | p95 s | "
            "p99 s | requests / s | windows / s | server RSS before -> after (peak), MB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = "".join(f"| {r['clients']} | {r['wall_s']} | {r['good']} | {r['good_failed']} | {r['bad']} | "
                   f"{r['bad_wrong']} | {r['p50_s']} | {r['p95_s']} | {r['p99_s']} | {r['requests_per_s']} | "
                   f"{r['windows_per_s']} | {r['rss_before_mb']} -> {r['rss_after_mb']} ({r['rss_peak_mb']}) |\n"
                   for r in res["rows"])
    m = res["memory"]
    parts = "; ".join(f"{k} {m['start_by_process'][k]} -> {m['end_by_process'][k]}" for k in
                      ("server", "tritonserver", "largest_stub", "other_stubs"))
    return (head + rows + f"\nServer RSS after warm-up {m['start_mb']} MB, after the last level {m['end_mb']} MB: "
            f"growth {m['growth_mb']} MB (bound {m['bound_mb']} MB: {'held' if m['held'] else 'EXCEEDED'}). By "
            f"process, MB: {parts} ({m['end_by_process']['stubs']} Python stubs; the largest is the ensemble's).\n")


def verdict(res: dict) -> list:
    """The sentences that make a load run a failure (empty: none failed, bad ones answered, memory held)."""
    out = [f"{r['good_failed']} good request(s) failed at {r['clients']} clients (e.g. {r['failures'][0]})"
           for r in res["rows"] if r["good_failed"]]
    out += [f"{r['bad_wrong']} bad request(s) got another reply at {r['clients']} clients (e.g. "
            f"{r['wrong_replies'][0]})" for r in res["rows"] if r["bad_wrong"]]
    if not res["memory"]["held"]:
        out.append(f"the server's memory grew by {res['memory']['growth_mb']} MB, over the bound of "
                   f"{res['memory']['bound_mb']} MB")
    return out


def warm_up(url: str, meta: dict, batch: int, max_batch: int) -> None:
    """Every execution size the dynamic batcher can form from requests of ``batch`` windows (batch, 2 batch, ...
    up to ``max_batch``), twice each, to the ensemble: TorchScript's profiling executor builds a plan per input
    shape on its second call and the allocators grow to each size, a one-off cost per size that would otherwise
    be counted as growth (measured: warming every size took the ensemble's stub from 672 MB, warmed at one size,
    to 825-842 MB)."""
    import tritonclient.http as tc
    conn = tc.InferenceServerClient(url, network_timeout=600.0)
    for n in list(range(batch, max_batch + 1, batch)) * 2:
        _send(conn, meta["name"], np.full((n, 1) + tuple(int(w) for w in meta["window"]), 0.5, np.float32), "FP32")
    conn.close()


def _rss_mb(pid: int) -> float:
    """VmRSS of one process, MB (0 when it is gone)."""
    try:
        line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return 0.0


def _program(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def rss_by_process(pid: int) -> dict:
    """RSS (MB) of the server process ``pid``, of its tritonserver, of the largest of its Python stubs (the
    ensemble's) and the sum of the other stubs."""
    from ahnet.serve.process import process_tree
    kids = [(p, _program(p), _rss_mb(p)) for p in sorted(process_tree(pid))]
    stubs = sorted((r for _, prog, r in kids if "stub" in Path(prog).name), reverse=True)
    return {"server": round(_rss_mb(pid), 1),
            "tritonserver": round(sum(r for _, prog, r in kids if Path(prog).name == "tritonserver"), 1),
            "largest_stub": round(stubs[0], 1) if stubs else 0.0, "other_stubs": round(sum(stubs[1:]), 1),
            "stubs": len(stubs)}


def run_levels(srv, meta: dict, a, max_voxels: int, log=print) -> dict:
    """Every --concurrency level against the running server ``srv`` (an ahnet.serve.process.ServerProcess with
    sample_rss); returns {"rows", "memory"}."""
    from ahnet.serve.process import tree_rss_mb
    warm_up(srv.url, meta, a.batch, a.max_batch)
    start, start_parts = tree_rss_mb(srv.proc.pid), rss_by_process(srv.proc.pid)
    rows, bad_sent = [], 0
    for k, n in enumerate(a.concurrency):
        before = tree_rss_mb(srv.proc.pid)
        tally, wall = run_clients(srv.url, meta, n, a.duration, a.bad_fraction, a.batch, a.max_batch, max_voxels,
                                  seed=k, first_kind=bad_sent)
        rows.append(level_row(n, tally, wall, before, tree_rss_mb(srv.proc.pid), srv.peak_rss_mb()))
        bad_sent += rows[-1]["bad"]
        log(json.dumps({k: v for k, v in rows[-1].items() if k not in ("failures", "wrong_replies")}))
    end = tree_rss_mb(srv.proc.pid)
    memory = {"start_mb": round(start, 1), "end_mb": round(end, 1), "growth_mb": round(end - start, 1),
              "bound_mb": a.max_growth_mb, "held": end - start <= a.max_growth_mb, "start_by_process": start_parts,
              "end_by_process": rss_by_process(srv.proc.pid)}
    return {"rows": rows, "memory": memory}


# --------------------------------------------------------------------------------------------- the command

def add_options(ap) -> None:
    """The load benchmark's options (python -m ahnet.bench --serving --load)."""
    ap.add_argument("--load", action="store_true", help="this benchmark (the serving section's load run)")
    ap.add_argument("--models", required=True, help="a folder written by python -m ahnet.export")
    ap.add_argument("--backend", choices=tuple(store.BACKENDS), default="pytorch")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="clients at once, per level")
    ap.add_argument("--duration", type=float, default=25.0, help="seconds of requests per level")
    ap.add_argument("--bad-fraction", type=float, default=0.1, help="share of bad requests")
    ap.add_argument("--batch", type=int, default=4, help="windows per good request")
    ap.add_argument("--max-batch", type=int, default=8, help="the server's dynamic batch limit (windows)")
    ap.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads per model (0 = default)")
    ap.add_argument("--max-growth-mb", type=float, default=100.0, help="memory growth allowed over the run, MB")
    ap.add_argument("--out", default="bench_results", help="folder of serving-load-<time>.json and .md")


def check_options(a) -> dict:
    """The options and the model folder, before anything starts (LoadBenchError); returns model.json."""
    import importlib.util
    missing = [m for m in ("pytriton", "tritonclient") if importlib.util.find_spec(m) is None]
    if missing:
        raise LoadBenchError(f"the load benchmark needs the serve extra ({', '.join(missing)} missing): pip "
                             f"install -e '.[serve]', or bash run.sh test")
    if not a.concurrency or min(a.concurrency) < 1:
        raise LoadBenchError(f"--concurrency {a.concurrency} must list client counts >= 1")
    if not 0 < a.duration <= 3600:
        raise LoadBenchError(f"--duration {a.duration} must lie in (0, 3600] seconds")
    if not 0 <= a.bad_fraction <= 1:
        raise LoadBenchError(f"--bad-fraction {a.bad_fraction} must lie in [0, 1]")
    if not 1 <= a.batch <= a.max_batch:
        raise LoadBenchError(f"--batch {a.batch} must lie in 1 .. --max-batch {a.max_batch}")
    if a.threads < 0 or not a.max_growth_mb >= 0:
        raise LoadBenchError("--threads and --max-growth-mb must be >= 0")
    from ahnet import failures
    failures.check_output_dir(a.out, "--out")
    meta = store.read_model_json(a.models)
    store.fold_files(a.models, a.backend)
    return dict(meta, name=Path(a.models).resolve().name)


def run_load_bench(a, log=print) -> dict:
    """Start a server for --models, run every level, write the JSON and Markdown files; returns the result."""
    import os
    import tempfile
    from ahnet.atomic import write_text_atomic
    from ahnet.serve.process import ServerProcess
    meta = check_options(a)
    max_voxels = 8 * int(np.prod(meta["window"]))          # the server's default limit
    args = ["--backend", a.backend, "--threads", str(a.threads), "--max-batch", str(a.max_batch)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads or os.cpu_count()))
    with tempfile.TemporaryDirectory(prefix="ahnet-load-") as tmp:
        with ServerProcess(a.models, Path(tmp) / "serve.log", args, env=env, sample_rss=True) as srv:
            res = run_levels(srv, meta, a, max_voxels, log)
    res.update({"models": str(Path(a.models).resolve()), "folds": len(meta["folds"]), "backend": a.backend,
                "window": meta["window"], "batch": a.batch, "max_batch": a.max_batch, "threads": a.threads,
                "duration_s": a.duration, "bad_fraction": a.bad_fraction, "cpu_count": os.cpu_count(),
                "load_avg_end": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    stem = Path(a.out) / f"serving-load-{time.strftime('%Y%m%d-%H%M%S')}"
    Path(a.out).mkdir(parents=True, exist_ok=True)
    write_text_atomic(stem.with_suffix(".json"), json.dumps(res, indent=1))
    write_text_atomic(stem.with_suffix(".md"), markdown(res))
    res["files"] = [str(stem.with_suffix(".json")), str(stem.with_suffix(".md"))]
    return res
