"""The paper's comparison as one command: data -> 2D stage -> transfer -> 3D variants -> per-type report.

    python -m ahnet.experiment --preset demo     # `bash run.sh demo`: 2D MC-GCN and AH-Net after transfer
    python -m ahnet.experiment --preset cpu      # the whole comparison at CPU size (under 2 hours, 2 cores)
    python -m ahnet.experiment --preset paper    # the same at the paper's size (ResNet50, GPU)

Models compared: the 2D MC-GCN applied slice by slice; the 3D AH-Net after transfer; the 3D AH-Net from scratch;
a 3D U-Net from scratch; AH-Net after transfer at other pyramid depths ("PFN depth"; cpu: 0). Each
variant is a TrainConfig given to ahnet.train.train (the equivalent ``python -m ahnet.train`` command is printed
for a reader who wants to rerun one); every transferred variant starts with the transfer's exactness check (the training
step that transfers prints the table and refuses an inexact transfer). With ``--rescore`` (the cpu and
paper presets' default) every variant then gets its own second stage, a candidate classifier trained on its
candidates on the training scans (``python -m ahnet.rescore``, printed too; side by side, it starts as soon as
that variant's training has ended), and is evaluated with it.
Evaluation and report: ahnet.evaluate.
Every stage resumes: run the command again after an interruption and finished runs are skipped. On a CPU the
cpu preset trains two variants at a time, each in its own process on one core (``--jobs``; two 1-thread
trainings moved about 11.4 patches/s on this 2-core CPU against 9 for one 2-thread training), a transferred variant
waiting for the 2D stage; lines of their output start with the variant's name.
Under ``torchrun`` (README "Scaling up") every variant trains on all ranks; rank 0 prepares the data first and
alone evaluates; the presets' batches must divide by the number of ranks (checked before any work).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from ahnet import failures, paths
from ahnet.data.cache import cache_dataset
from ahnet.data.io import load_dataset_json, read_scan
from ahnet.commands.evaluate import evaluate_and_report
from ahnet.evaluate.validation import make_validator
from ahnet.precision import resolve_device
from ahnet.report.claims import found_line
from ahnet.train import TrainingDiverged, train
from ahnet.train import dist
from ahnet.train.guard import preflight

PROG = "ahnet.experiment"
from ahnet.commands.jobs import rescore_one_by_one, train_side_by_side, training_jobs
from ahnet.commands.presets import (PRESETS, Preset, command_line, fast_amp, parse_variant, rescore_argv,
                                   variant_config, ALL_VARIANTS)

def data_spacing(dataset_json: Path) -> List[float]:
    """(sz, sy, sx) of the first case: the z-pooling schedule is chosen for it."""
    cases = load_dataset_json(dataset_json)
    if not cases:
        raise ValueError(f"{dataset_json} lists no cases under 'training'")
    return [round(float(s), 4) for s in read_scan(cases[0]["image"]).spacing]


def stored_phantom(dataset_json: Path) -> dict:
    """What a generated phantom's dataset.json says it is: its PhantomOptions, n_cases and seed."""
    meta = json.loads(dataset_json.read_text(encoding="utf-8"))
    return dict(meta.get("options") or {}, n_cases=meta.get("numTraining"), seed=meta.get("seed"))


def prepare_data(data_dir: Path, preset: Preset, seed: int) -> Path:
    """Generate the phantom into ``data_dir`` (unless its dataset.json exists) and build its cache; returns the
    dataset.json."""
    from ahnet.data.phantom import generate_dataset
    dataset_json = data_dir / paths.DATASET
    if not dataset_json.is_file():
        print(f"[experiment] generating {preset.cases} phantom cases in {data_dir}", flush=True)
        generate_dataset(data_dir, preset.cases, seed=seed, size=preset.size, **preset.phantom)
    have = stored_phantom(dataset_json)
    want = dict(preset.phantom, size=preset.size, n_cases=preset.cases, seed=seed)
    differ = {k: have.get(k) for k, v in want.items() if have.get(k) != (list(v) if isinstance(v, tuple) else v)}
    if differ:
        found = ", ".join(f"{k} {v}" for k, v in differ.items())
        wanted = ", ".join(f"{k} {want[k]}" for k in differ)
        failures.warn(PROG, f"{data_dir} holds another phantom than this preset's ({found} instead of {wanted}); using "
                       f"it as it is (move it away to generate the preset's phantom there)")
    cache_dataset(dataset_json)
    return dataset_json


def check_test_data(data_dir: Path, preset: Preset, seed: int) -> None:
    """Refuse (ValueError, before any training) a test folder that holds another phantom than the preset's
    held-out test phantom, e.g. one an earlier version generated with other sizes or seed."""
    from ahnet.data.phantom import held_out_seed
    from ahnet.data.phantom.heldout import test_phantom_options
    dataset_json = data_dir / paths.DATASET
    if not preset.test_phantom or not dataset_json.is_file():
        return
    want = test_phantom_options(preset.test_phantom)
    have = stored_phantom(dataset_json)
    keys = ("size", "slices", "thickness", "spacing", "negatives", "exact", "n_cases")
    npc = have.get("nodules_per_case")
    same = all(have.get(k) == want[k] for k in keys) and have["seed"] == held_out_seed(seed) and \
        list(npc if isinstance(npc, list) else [npc, npc]) == [want["nodules_per_case"]] * 2
    if not same:
        raise ValueError(f"{data_dir} holds another phantom than the {preset.test_phantom!r} test phantom of seed "
                         f"{seed}; move it away and run again to generate the test phantom there")


def ensure_test_data(data_dir: Path, preset: Preset, seed: int) -> Path:
    """The extra test-only phantom (seeded apart from the training phantom); returns its dataset.json."""
    from ahnet.data.phantom import generate_dataset, generate_test_phantom
    dataset_json = data_dir / paths.DATASET
    if preset.test_phantom and not dataset_json.is_file():
        print(f"[experiment] generating the {preset.test_phantom!r} test-only phantom in {data_dir}", flush=True)
        generate_test_phantom(data_dir, preset.test_phantom, seed=seed)
    elif not dataset_json.is_file():
        print(f"[experiment] generating {preset.test_cases} test-only phantom cases in {data_dir}", flush=True)
        generate_dataset(data_dir, preset.test_cases, seed=seed + 1_000_003, size=preset.size, split=(0, 0, 1))
    return dataset_json


def build_parser() -> argparse.ArgumentParser:
    p = failures.Parser(PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="experiment size (default demo)")
    p.add_argument("--name", help="experiment name: runs/<name>, data/<name> (default: the preset's)")
    p.add_argument("--data", type=Path, help="an existing dataset.json to use instead of a generated phantom")
    p.add_argument("--variants", nargs="+", help=f"subset of variants to train (default: the preset's); "
                   f"any of {', '.join(ALL_VARIANTS)}")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")
    p.add_argument("--seed", type=failures.number(int, 0, 2 ** 32 - 1), default=0)
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm over the global batch of all ranks (python -m ahnet.train --help)")
    p.add_argument("--jobs", type=failures.number(int, 1, 64),
                   help="trainings side by side on a CPU, each in its own process on its share of the cores "
                        "(default: the preset's, cpu: 2; 1 on CUDA and under torchrun); a transferred variant "
                        "waits for the 2D stage")
    p.add_argument("--rescore", action=argparse.BooleanOptionalAction, default=None,
                   help="give every variant its second stage (python -m ahnet.rescore with the preset's options) "
                        "and evaluate with it, or not (default: the preset's: cpu and paper yes, demo no)")
    p.add_argument("--bootstrap", type=failures.number(int, 0, 10 ** 6), default=1000,
                   help="bootstrap resamples of the report's intervals (0 = none)")
    return p


def with_rescore(preset: Preset, rescore: Optional[bool]) -> Preset:
    """The preset as --rescore / --no-rescore asks (None: as it is; --rescore keeps a preset's own options)."""
    if rescore is None or rescore == (preset.rescore is not None):
        return preset
    return dataclasses.replace(preset, rescore={} if rescore else None)


def check_rescore_options(options: Dict) -> None:
    """ValueError (before any work) for a preset's second-stage option that ``python -m ahnet.rescore`` lacks or
    refuses; run, data, device and amp are the experiment's own."""
    from ahnet.commands.rescore import build_parser
    actions = {a.dest: a for a in build_parser()._actions if a.option_strings}
    for k, v in options.items():
        if k in ("run", "data", "device", "amp", "help") or k not in actions:
            takes = sorted(set(actions) - {"run", "data", "device", "amp", "help"})
            raise ValueError(f"the preset's second-stage option {k!r} is not one python -m ahnet.rescore takes "
                             f"from a preset; it takes {', '.join(takes)}")
        try:
            if actions[k].type is not None:
                actions[k].type(str(v))
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise ValueError(f"the preset's second-stage option {k} = {v!r}: {e}") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return dist.run_command(PROG, lambda: run_experiment(args), codes={TrainingDiverged: 3})


def run_experiment(args) -> int:
    """Data -> the variants' configs (all checked first) -> training (the 2D stage first) -> evaluation."""
    preset = with_rescore(PRESETS[args.preset], args.rescore)
    name = args.name or f"phantom-{args.preset}"
    runs = paths.RUNS_ROOT / name
    variants = list(args.variants or preset.variants)
    for v in variants:
        parse_variant(v)
    resolve_device(args.device)                       # the options and output places before any data work
    failures.check_output_dir(runs, "--name")
    if not args.data:
        failures.check_output_dir(paths.DATA_ROOT / name, "--name")
    if any(parse_variant(v)[1] == "transfer" for v in variants) and "mcgcn-2d" not in variants:
        variants = ["mcgcn-2d"] + variants
    if preset.rescore is not None:
        check_rescore_options(preset.rescore)
    for v in variants:
        dist.check_batch(preset.batch_2d if parse_variant(v)[0] == "mcgcn" else preset.batch_3d)
    t0 = time.time()
    ctx, device = dist.plan(args.device, resolve_device(args.device))
    dist.start(ctx, device)
    jobs = training_jobs(args.jobs, preset, device, ctx.world_size)
    if args.data:                                     # your data: every check before its cache is written
        dataset_json = Path(args.data)
    else:                                             # the phantom: the test folder checked before generating
        check_test_data(paths.DATA_ROOT / f"{name}-test", preset, args.seed)
        dataset_json = ctx.main_first(lambda: prepare_data(paths.DATA_ROOT / name, preset, args.seed))
    spacing = data_spacing(dataset_json)
    configs = {v: variant_config(v, preset, dataset_json, runs, args.seed, args.device, spacing, args.sync_bn)
               for v in variants}
    for v, cfg in configs.items():                   # every variant's network and places before the first trains
        preflight(cfg, sources=cfg.init != "transfer")
    if args.data:
        ctx.main_first(lambda: cache_dataset(dataset_json))
    print(f"[experiment] {args.preset}: data {dataset_json} (spacing {spacing} mm), runs in {runs}/, "
          f"variants {', '.join(variants)}", flush=True)
    amp = fast_amp(args.device)                        # second stage and evaluation in the runs' precision
    rescore_argvs = {} if preset.rescore is None else {
        v: rescore_argv(runs / v, dataset_json, args.device, amp, preset.rescore) for v in variants}
    if jobs == 1:
        for v, cfg in configs.items():
            print(f"\n[experiment] {v}: {command_line(cfg)}", flush=True)
            t = time.time()
            train(cfg, validator_for=make_validator)
            print(f"[experiment] {v} trained in {time.time() - t:.0f} s", flush=True)
    else:
        failed = train_side_by_side(configs, jobs, rescore_argvs)
        if failed:
            return failed
    if not ctx.is_main:
        return 0
    if jobs == 1 and rescore_argvs:
        t = time.time()
        failed = rescore_one_by_one(rescore_argvs)
        if failed:
            return failed
        print(f"[experiment] second stages trained in {time.time() - t:.0f} s", flush=True)
    report = paths.run_paths(runs).report
    eval_json = dataset_json
    if (preset.test_phantom or preset.test_cases > 0) and not args.data:
        eval_json = ensure_test_data(paths.DATA_ROOT / f"{name}-test", preset, args.seed)
    flags = ["--runs", *[str(runs / v) for v in variants], "--data", str(eval_json), "--out", str(report),
             "--device", args.device, "--bootstrap", str(args.bootstrap)] + (
        ["--window", *map(str, preset.window)] if preset.window else []) + (
        ["--amp", amp, "--channels-last"] if amp != "off" else []) + (
        ["--rescore"] if preset.rescore is not None else [])
    print(f"\n[experiment] evaluation: python -m ahnet.evaluate {' '.join(shlex.quote(f) for f in flags)}",
          flush=True)
    rep = evaluate_and_report([runs / v for v in variants], eval_json, report, device=args.device,
                              n_bootstrap=args.bootstrap, window=preset.window, amp=amp,
                              channels_last=amp != "off", rescore=preset.rescore is not None,
                              title=f"AH-Net per-type evaluation ({args.preset} preset, {name})")
    print(f"\n[experiment] done in {(time.time() - t0) / 60:.1f} min. Report: {report / paths.REPORT_HTML} "
          f"(also {paths.REPORT_MD}, {paths.REPORT_JSON})")
    for m in rep["model_order"]:
        if rep["models"][m]["found"]:
            print("[experiment] " + found_line(m, rep["models"][m]["found"]))
    return 0

if __name__ == "__main__":
    sys.exit(main())
