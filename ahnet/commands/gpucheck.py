"""``python -m ahnet.gpucheck`` (``bash run.sh gpu-check``): parse and check the options, prepare the modules,
run the parts, write the report."""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from ahnet import failures

from ahnet.gpucheck import env, parts, report, training

PROG = "ahnet.gpucheck"
PARTS = ("tests", "bench", "train")
ROOT = Path(__file__).resolve().parents[2]


def build_parser():
    p = failures.Parser(PROG, description=(
        "The GPU proof of the CUDA path in one command: (a) the CUDA-marked tests, (b) speed and memory against "
        "MONAI's AHNet at the paper's size, (c) AH-Net trained for a fixed time with its learning curve; all "
        "figures into --out as gpu_check.json and gpu_check.md (at most 6 files). No network: missing optional "
        "modules come from the wheels in .whl/ (bash run.sh gpu-wheels). --tiny: the same on a CPU, small."))
    p.add_argument("--out", default="gpu_check", help="output folder (default: gpu_check)")
    p.add_argument("--tiny", action="store_true", help="CPU-sized rehearsal of every part (the test suite runs it)")
    p.add_argument("--train-minutes", type=float, default=None,
                   help="minutes of training in part (c) (default 1.5; --tiny: 0.1)")
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts to leave out")
    p.add_argument("--tests-timeout", type=float, default=420.0, help="seconds for part (a) (default 420)")
    p.add_argument("--bench-timeout", type=float, default=240.0, help="seconds per benchmark measurement (240)")
    return p


def check_args(args) -> str:
    """The device ('cuda' or 'cpu'); ValueError (one sentence) for options no check could run with."""
    if args.train_minutes is None:
        args.train_minutes = 0.1 if args.tiny else 1.5
    if not args.train_minutes > 0:
        raise ValueError(f"--train-minutes must be positive, got {args.train_minutes}")
    for flag in ("tests_timeout", "bench_timeout"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if set(args.skip) == set(PARTS):
        raise ValueError("--skip leaves no part to run")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if not torch.cuda.is_available() and not args.tiny:
        raise ValueError("this machine has no CUDA GPU (or this torch has no CUDA); the check is for a GPU "
                         "machine, and --tiny rehearses it on a CPU")
    return "cpu" if args.tiny and not torch.cuda.is_available() else "cuda"


def _part(name: str, fn, log) -> dict:
    """A part's result; a part that raises is recorded (its last line) and the others still run."""
    t0 = time.monotonic()
    log(f"[gpu-check] ({'abc'[PARTS.index(name)]}) {name}")
    try:
        res = fn()
    except Exception as e:        # one part's failure must not lose the others' figures
        res = {"ok": False, "error": failures.one_line(f"{type(e).__name__}: {e}"),
               "traceback": traceback.format_exc()[-4000:]}
    res.setdefault("seconds", round(time.monotonic() - t0, 1))
    log(f"[gpu-check] {name}: {'ok' if res.get('ok') else 'NOT ok'} in {res['seconds']} s")
    return res


def run_check(args, device: str) -> int:
    t0 = time.monotonic()
    if device == "cpu":      # a CPU rehearsal: one thread per process (several threads thrash on a busy machine)
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    site = Path(tempfile.gettempdir()) / "ahnet-gpu-check-site"
    modules = env.prepare_modules(ROOT, site)
    peer_missing = None if modules["monai"]["version"] is not None else modules["monai"]["source"]
    doc = {"command": "bash run.sh gpu-check " + " ".join(sys.argv[1:]), "tiny": bool(args.tiny), "device": device,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": env.machine(), "modules": modules, "parts": {}}
    report.write(out, {**doc, "ok": False, "wall_seconds": 0})      # a first report, in case the run is cut short
    steps = {"tests": lambda: parts.run_tests(ROOT, out, rehearse=device == "cpu", timeout=args.tests_timeout),
             "bench": lambda: parts.run_bench(device, args.tiny, peer_missing, args.bench_timeout, log),
             "train": lambda: training.run_training(out, device, args.tiny, args.train_minutes, log)}
    for name in PARTS:
        if name not in args.skip:
            doc["parts"][name] = _part(name, steps[name], log)
            doc.update(ok=all(p.get("ok") for p in doc["parts"].values()),
                       wall_seconds=round(time.monotonic() - t0, 1))
            report.write(out, doc)
    log(f"[gpu-check] {report.summary(doc)}; {out / report.MD_NAME} ({doc['wall_seconds']} s)")
    return 0 if doc["ok"] else 1


def main(argv=None) -> int:
    """Exit codes: 0 every part passed, 1 a part did not (the report says which), 2 bad options."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        device = check_args(args)
        return run_check(args, device)

    return failures.run(PROG, body)
