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
from ahnet.bench.report import format_table, machine_info, markdown_block, run_context, summarise, update_notes
from ahnet.bench.workers import WORKERS, run_worker
from ahnet.infer import add_window_arguments

PROG = "ahnet.bench"
UPSAMPLE_MODES = ("trilinear", "transpose", "nearest")
PRESET_NAMES = ("demo", "cpu", "paper")
PRESET_PARTS = ("profile", "guard", "levers", "batch", "compile", "validation", "calls")
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
    p.add_argument("--op-profile", action="store_true",
                   help="the model rows also say where a training step's CPU time goes (torch.profiler, grouped: "
                        "convolutions, batch norm, pooling, copies; a CPU device only)")
    p.add_argument("--skip-infer", action="store_true")
    p.add_argument("--skip-2d", action="store_true")
    p.add_argument("--skip-data", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in every worker (1 on a shared CPU: process CPU time then measures the work)")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    _add_section_arguments(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.full_volume:
        args.volume = [128, 512, 512]
    return args


def _add_section_arguments(p) -> None:
    """The --preset, --scans and --notes options (sections measured instead of the comparison with MONAI)."""
    p.add_argument("--preset", choices=PRESET_NAMES, default=None,
                   help="instead of the comparison with MONAI: the preset's 3D training step measured on its own data "
                        "(ahnet.bench.preset: the step by phase, the validation of an epoch, the levers alone); needs "
                        "--data")
    p.add_argument("--data", type=Path, default=None,
                   help="--preset: the dataset.json (with its HDF5 cache) the runs train and validate on")
    p.add_argument("--preset-variants", nargs="+", default=["ahnet-scratch", "unet3d-scratch"],
                   help="--preset: the variants measured (ahnet.commands.presets; an AH-Net after transfer is timed as "
                        "its network from scratch)")
    p.add_argument("--preset-parts", nargs="+", choices=PRESET_PARTS, default=list(PRESET_PARTS),
                   help="--preset: profile (the step as trained), guard (float32 guard, no guard), levers (fused "
                        "BN-ReLU-conv off, z-pool as max_pool3d), batch (--preset-batch), compile (training and "
                        "validation), validation, calls (the guard per conv)")
    p.add_argument("--preset-batch", type=int, default=4, help="--preset: the batch of the batch lever")
    p.add_argument("--preset-steps", type=int, default=20, help="--preset: timed steps per measurement")
    p.add_argument("--scans", action="store_true",
                   help="instead of the comparison above: whole scans through ours (first stage, second stage) and "
                        "MONAI's sliding_window_inference (ahnet.bench.scans)")
    p.add_argument("--scan-shapes", nargs="+", type=_shape, default=[(40, 192, 192), (120, 512, 512)],
                   help="--scans: scan sizes, slices x rows x columns (ZxYxX)")
    p.add_argument("--scan-memory-shape", type=_shape, default=(300, 512, 512),
                   help="--scans: the scan whose peak memory is measured (ours with the most workers, and MONAI)")
    p.add_argument("--scan-window", type=int, nargs=3, default=[32, 128, 128], metavar=("D", "H", "W"))
    p.add_argument("--scan-threads", type=int, default=2, help="--scans: the cores (intra-op threads, or workers)")
    p.add_argument("--scan-dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--notes", type=Path, default=None,
                   help="also write this run's table (with the command, commit, machine, date and load) between the "
                        "markers <!-- bench:SECTION --> and <!-- /bench:SECTION --> of this file, SECTION being "
                        "models, preset or scans (paper_notes/performance.md holds one block of each)")


def notes_command(argv) -> str:
    """The command a notes block states: what was measured, without where this machine put the JSON (--out)."""
    argv, shown = list(argv), []
    while argv:
        a = argv.pop(0)
        if a == "--out":
            argv = argv[1:]
        elif not a.startswith("--out="):
            shown.append(a)
    return "python -m ahnet.bench " + " ".join(shown)


def _shape(text: str) -> tuple:
    """'120x512x512' -> (120, 512, 512)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a scan size is three positive sizes ZxYxX (e.g. 120x512x512); got {text!r}")
    return shape


def scans_plan(args) -> list:
    """The --scans section (ahnet.bench.scans): per scan size ours with --scan-threads window workers, MONAI, ours
    on one worker of --scan-threads intra-op threads (the workers lever alone); then the memory scan, ours and
    MONAI."""
    base = dict(kind="scan", window=list(args.scan_window), overlap=args.overlap, sw_batch=args.sw_batch,
                dtype=args.scan_dtype, channels_last=True, threads=args.scan_threads)
    plan = []
    for shape in args.scan_shapes:
        for impl, workers in (("ours", args.scan_threads), ("monai", 1), ("ours", 1)):
            plan.append(("scan", dict(base, impl=impl, workers=workers, shape=list(shape))))
    if args.scan_shapes:                      # BatchNorm folding alone, on the first scan size
        plan.append(("scan", dict(base, impl="ours", workers=args.scan_threads, shape=list(args.scan_shapes[0]),
                                  fold=False)))
    if args.scan_memory_shape:
        for impl, workers in (("ours", args.scan_threads), ("monai", 1)):
            plan.append(("scan", dict(base, impl=impl, workers=workers, shape=list(args.scan_memory_shape))))
    return plan


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
    if args.notes is not None:
        section = "preset" if args.preset else "scans" if args.scans else "models"
        if not Path(args.notes).is_file() or f"<!-- bench:{section} -->" not in Path(args.notes).read_text():
            raise ValueError(f"--notes {args.notes} must be a file holding the markers <!-- bench:{section} --> and "
                             f"<!-- /bench:{section} --> where this run's table goes")
    if args.preset is not None:
        if args.data is None or not Path(args.data).is_file():
            raise ValueError(f"--preset {args.preset} needs --data DATASET.json (the phantom the preset trains on, with "
                             f"its cache); got {args.data}")
        if args.preset_batch < 1 or args.preset_steps < 1:
            raise ValueError("--preset-batch and --preset-steps must be at least 1")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asks for CUDA, which this torch build or machine does not have")
    if args.op_profile and (device.type != "cpu" or args.skip_model):
        raise ValueError("--op-profile profiles the model rows' CPU steps: use it with --device cpu and without "
                         "--skip-model")


def preset_plan(args) -> list:
    """The --preset section's measurements (ahnet.bench.preset): for each variant its training step as the preset
    trains it (the profile), then each lever alone: the float32 guard and no guard, --preset-batch, torch.compile;
    its validation (eager and compiled); the guard's cost per affected conv call."""
    from ahnet.commands.phantoms import data_spacing
    from ahnet.commands.presets import PRESETS, at_slice_spacing, variant_config
    from ahnet.paths import ExperimentPaths

    spacing = data_spacing(args.data)
    preset, parts, plan = at_slice_spacing(PRESETS[args.preset], spacing[0]), set(args.preset_parts), []
    runs = ExperimentPaths(f"bench-{args.preset}")          # run folders named in the configs, never written
    for variant in args.preset_variants:
        try:
            cfg = variant_config(variant.replace("-transfer", "-scratch"), 0, preset, Path(args.data), runs, 0, "cpu",
                                 spacing)
        except ValueError as e:
            raise ValueError(f"--preset-variants {variant}: {e}") from None
        if cfg.stage != "3d":
            raise ValueError(f"--preset-variants {variant} is not a 3D training; choose 3D variants")
        base = dict(variant=variant, config=cfg.to_dict(), warmup=args.warmup + 2, repeats=args.preset_steps)
        steps = [dict(guard="pad")] if "profile" in parts else []
        steps += [dict(guard="float32"), dict(guard="off")] if "guard" in parts else []
        steps += [dict(guard="pad", fused="off"), dict(guard="pad", zpool="maxpool")] if "levers" in parts else []
        steps += [dict(guard="pad", batch=args.preset_batch)] if "batch" in parts else []
        steps += [dict(guard="pad", compile=True)] if "compile" in parts else []
        plan += [("step", dict(base, kind="step", **lv)) for lv in steps]
        vals = ([False] if "validation" in parts else []) + ([True] if "compile" in parts else [])
        plan += [("validation", dict(base, kind="validation", compile=c)) for c in vals]
        if "calls" in parts:
            plan.append(("guard_calls", dict(base, kind="guard_calls", repeats=max(args.preset_steps, 10))))
    return plan


def run_plan(plan: list, threads: int | None, timeout: float, on_result=None) -> list:
    """[{"spec", "result"}] for each planned measurement, each in its own process, with a progress line;
    ``on_result(results so far)`` after each one (main keeps them on disk: a killed bench loses one measurement)."""
    results = []
    for i, (kind, spec) in enumerate(plan):
        label = f"{kind} {spec.get('impl', '')} {spec.get('mode', '')} {spec.get('dtype', '')} " \
                f"{lever_name(spec.get('levers', {}))}"
        if kind == "scan":
            label = f"scan {spec['impl']} {'x'.join(map(str, spec['shape']))} workers={spec['workers']}" + \
                    ("" if spec.get("fold", True) else " fold=off")
        if "variant" in spec:
            label = f"{kind} {spec['variant']} " + " ".join(f"{k}={spec[k]}" for k in ("guard", "fused", "zpool",
                                                                                 "batch", "compile") if k in spec)
        print(f"[bench {i + 1}/{len(plan)}] {label}", flush=True)
        spec["threads"] = spec.get("threads") or threads
        res = run_worker(spec, timeout)
        if "error" in res:
            print(f"    error: {res['error']}", flush=True)
        results.append({"spec": spec, "result": res})
        if on_result is not None:
            on_result(results)
    return results


def write_results(args, device: torch.device, results: list, rows: list, wall_s: float, context: dict,
                  path: Path | None = None, complete: bool = True) -> Path:
    """``path`` (default bench_results/bench-<time>.json) written atomically (ahnet.atomic: a temporary name, then
    renamed; a full disk is one line); ``complete`` False while measurements are still to come."""
    path = Path(path or Path(args.out) / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine_info(device), "context": context, "complete": complete,
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "worker"},
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
        plan = preset_plan(args) if args.preset else scans_plan(args) if args.scans else build_plan(args, device)
    except ValueError as exc:
        return failures.fail(PROG, exc)
    try:
        import monai  # noqa: F401
    except ImportError:
        return failures.fail(PROG, "the benchmarks need MONAI, the optional extra 'peer' (pip install -e '.[peer]', or "
                              "bash run.sh bench)")
    t0, start = time.time(), run_context()
    path = Path(args.out) / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"

    def keep(done):                                   # after each measurement: what is measured is never lost
        write_results(args, device, done, [], time.time() - t0, start, path, complete=False)
    results = run_plan(plan, args.threads, args.timeout, keep)
    rows = summarise(results)
    print(format_table(rows))
    path = write_results(args, device, results, rows, time.time() - t0, start, path)
    print(f"wrote {path}")
    failed = [r for r in results if "error" in r["result"]]
    if failed:                     # the JSON keeps what was measured; the notes never get a table of errors
        return failures.fail(PROG, f"{len(failed)} of {len(results)} measurements failed (the first: "
                                   f"{failed[0]['result']['error']}); {path} keeps the rest"
                                   + (f", {args.notes} left unchanged" if args.notes is not None else ""), code=1)
    if args.notes is not None:
        section = "preset" if args.preset else "scans" if args.scans else "models"
        command = notes_command(argv)
        update_notes(args.notes, section, markdown_block(rows, section, command, machine_info(device), start,
                                                         run_context()))
        print(f"updated the {section} table in {args.notes}")
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
