"""``python -m ahnet.bench``: parse and check the options, run each planned measurement in its own process,
print the table and write ``bench_results/bench-<time>.json``. ``--serving`` runs the serving section instead
(ahnet.bench.serving: in-process inference against Triton + PyTorch and Triton + ONNX Runtime; the serve extra),
with that section's options, ``--serving --load`` the server under load (ahnet.bench.load), and ``--outputs``
the outputs section (ahnet.bench.outputs: what predict writes beside the network's work, the overview picture and
the DICOM SEG and SR included; the dicom extra); errors any way are one line ``ahnet.bench: error: ...`` and exit
code 2."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ahnet import failures
from ahnet.atomic import write_text_atomic
from ahnet.bench.plan import build_plan, lever_name
from ahnet.bench.report import format_table, machine_info, summarise
from ahnet.bench.workers import WORKERS, run_worker
from ahnet.infer import add_window_arguments

PROG = "ahnet.bench"
UPSAMPLE_MODES = ("trilinear", "transpose", "nearest")
DESCRIPTION = "Benchmarks of this project's AHNet3d against MONAI's AHNet, side by side on one machine."


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = failures.Parser(PROG, description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--outputs", action="store_true",
                   help="the outputs section instead: what predict writes per case beside the network's work "
                        "(python -m ahnet.bench --outputs --help)")
    p.add_argument("--serving", action="store_true",
                   help="the serving section instead: in-process inference against Triton + PyTorch and Triton + "
                        "ONNX Runtime for an exported model (needs the serve extra; its options: "
                        "python -m ahnet.bench --serving --help); with --load, the server under concurrent "
                        "clients with bad requests mixed in (python -m ahnet.bench --serving --load --help)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--patch", type=int, nargs=3, default=[32, 128, 128], metavar=("D", "H", "W"),
                   help="training patch in our (D, H, W); MONAI gets W x H x D")
    p.add_argument("--batch", type=int, default=2 if cuda else 1)
    p.add_argument("--pfn", type=int, default=4, help="pyramid levels (paper 4; MONAI needs H, W >= 128 for 4)")
    p.add_argument("--modes", nargs="+", default=["trilinear", "transpose"], choices=UPSAMPLE_MODES)
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--repeats", type=int, default=10 if cuda else 3)
    p.add_argument("--no-amp", action="store_true",
                   help="fp32 only (default: also CUDA float16, or CPU bfloat16 where the CPU computes it natively)")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="bfloat16 rows on a CPU without native bfloat16 too (emulated there: slower than fp32)")
    p.add_argument("--levers", nargs="*", default=["channels_last", "checkpoint=decoder", "checkpoint=all",
                                                   "channels_last+checkpoint=decoder", "channels_last+checkpoint=all"],
                   help="extra rows for ours: channels_last, compile, checkpoint=encoder|decoder|all, joined by +; "
                        "MONAI runs with the part it can take (channels_last, compile) for a like-for-like ratio")
    p.add_argument("--lever-mode", default="trilinear", choices=UPSAMPLE_MODES, help="upsampling mode of the lever rows")
    p.add_argument("--volume", type=int, nargs=3, default=[128, 512, 512] if cuda else [64, 256, 256],
                   metavar=("D", "H", "W"), help="inference volume (the issue's: 128 512 512 at 2.5 x 0.7 x 0.7 mm)")
    p.add_argument("--full-volume", action="store_true", help="inference on 128 x 512 x 512 (slow on a CPU)")
    add_window_arguments(p, batch_default=4 if cuda else 2, window_help="inference window (default: --patch)")
    p.add_argument("--infer-modes", nargs="+", default=["trilinear"], choices=UPSAMPLE_MODES)
    p.add_argument("--infer-levers", nargs="*", default=None,
                   help="extra inference rows, both implementations: channels_last, dtype=amp|bf16, joined by + "
                        "(default: channels_last, and channels_last+dtype=<AMP dtype> where the device has AMP)")
    p.add_argument("--batch-2d", type=int, default=16 if cuda else 4)
    p.add_argument("--size-2d", type=int, nargs=2, default=[256, 256])
    p.add_argument("--data-samples", type=int, default=40)
    p.add_argument("--data-workers", type=int, default=2)
    p.add_argument("--skip-model", action="store_true", help="no forward / training-step rows")
    p.add_argument("--skip-infer", action="store_true")
    p.add_argument("--skip-2d", action="store_true")
    p.add_argument("--skip-data", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in every worker (1 on a shared CPU: process CPU time then measures the work)")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.full_volume:
        args.volume = [128, 512, 512]
    return args



def check_args(args) -> None:
    """ValueError (one sentence) for an option no measurement could use; nothing expensive has run yet."""
    sizes = {"--patch": args.patch, "--volume": args.volume, "--size-2d": args.size_2d}
    for flag, values in sizes.items():
        if min(values) < 1:
            raise ValueError(f"{flag} needs positive sizes; got {' '.join(map(str, values))}")
    at_least = {"--batch": (args.batch, 1), "--repeats": (args.repeats, 1), "--warmup": (args.warmup, 0),
                "--batch-2d": (args.batch_2d, 1),
                "--data-samples": (args.data_samples, 1), "--data-workers": (args.data_workers, 0)}
    for flag, (value, low) in at_least.items():
        if value < low:
            raise ValueError(f"{flag} must be at least {low}; got {value}")
    if not 0 <= args.pfn <= 4:
        raise ValueError(f"--pfn must be between 0 and 4 (MONAI's psp_block_num range); got {args.pfn}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1; got {args.threads}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be positive; got {args.timeout}")
    failures.check_output_dir(args.out, "--out")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asks for CUDA, which this torch build or machine does not have")


def run_plan(plan: list, threads: int | None, timeout: float) -> list:
    """[{"spec", "result"}] for each planned measurement, each in its own process, with a progress line."""
    results = []
    for i, (kind, spec) in enumerate(plan):
        label = f"{kind} {spec.get('impl', '')} {spec.get('mode', '')} {spec.get('dtype', '')} " \
                f"{lever_name(spec.get('levers', {}))}"
        print(f"[bench {i + 1}/{len(plan)}] {label}", flush=True)
        spec["threads"] = threads
        res = run_worker(spec, timeout)
        if "error" in res:
            print(f"    error: {res['error']}", flush=True)
        results.append({"spec": spec, "result": res})
    return results


def write_results(args, device: torch.device, results: list, rows: list, wall_s: float) -> Path:
    """bench_results/bench-<time>.json (ahnet.atomic: a temporary name, then renamed; a full disk is one line)."""
    path = Path(args.out) / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    doc = {"machine": machine_info(device), "args": {k: v for k, v in vars(args).items() if k != "worker"},
           "wall_s": wall_s, "results": results,
           "table": [dict(zip(("figure", "ours", "monai", "ratio", "unit"), r)) for r in rows]}
    return write_text_atomic(path, json.dumps(doc, indent=1))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--serving" in argv:
        argv.remove("--serving")
        return serving_main(argv)
    if "--outputs" in argv:
        argv.remove("--outputs")
        return outputs_main(argv)
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        res = WORKERS[spec["kind"]](spec)
        print("BENCH_RESULT " + json.dumps(res), flush=True)
        return 0
    try:
        check_args(args)
        device = torch.device(args.device)
        plan = build_plan(args, device)
    except ValueError as exc:
        return failures.fail(PROG, exc)
    try:
        import monai  # noqa: F401
    except ImportError:
        return failures.fail(PROG, "the benchmarks need MONAI, the optional extra 'peer' (pip install -e '.[peer]', or "
                              "bash run.sh bench)")
    t0 = time.time()
    results = run_plan(plan, args.threads, args.timeout)
    rows = summarise(results)
    print(format_table(rows))
    path = write_results(args, device, results, rows, time.time() - t0)
    print(f"wrote {path}")
    return 0


def load_main(argv) -> int:
    """``python -m ahnet.bench --serving --load ...``: the server under concurrent clients with bad requests mixed
    in (ahnet.bench.load); exit 1 when a request failed, a bad one got another reply or memory grew too much."""
    from ahnet.bench import load
    ap = failures.Parser(PROG, description=load.__doc__.split("\n\n")[0])
    load.add_options(ap)
    a = ap.parse_args(argv)

    def body() -> int:
        res = load.run_load_bench(a)
        print(load.markdown(res), end="")
        print("wrote " + ", ".join(res["files"]))
        problems = load.verdict(res)
        return failures.fail(PROG, problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                             1) if problems else 0
    return failures.run(PROG, body)


def serving_main(argv) -> int:
    """``python -m ahnet.bench --serving ...``: parse, check and run the serving section (ahnet.bench.serving),
    or with ``--load`` the load run (ahnet.bench.load); errors are one line ``ahnet.bench: error: ...`` and
    exit 2."""
    if "--load" in argv:
        return load_main(argv)
    from ahnet.bench.serving import add_options, run_serving_bench
    ap = failures.Parser(PROG, description=serving_doc())
    add_options(ap)
    a = ap.parse_args(argv)

    def body() -> None:
        res = run_serving_bench(a)
        print(json.dumps(res["rows"], indent=1))
    return failures.run(PROG, body)


def serving_doc() -> str:
    from ahnet.bench import serving
    return serving.__doc__.split("\n\n")[0]


def outputs_main(argv) -> int:
    """``python -m ahnet.bench --outputs ...``: the outputs section (ahnet.bench.outputs); errors are one line
    ``ahnet.bench: error: ...`` and exit 2."""
    from ahnet.bench import outputs
    ap = failures.Parser(PROG, description=outputs.__doc__.split("\n\n")[0])
    outputs.add_options(ap)
    a = ap.parse_args(argv)

    def body() -> None:
        res = outputs.run_outputs_bench(a)
        print(outputs.format_rows(res))
        print(f"wrote {a.out}")
    return failures.run(PROG, body)
