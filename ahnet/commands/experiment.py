"""The paper's comparison as one command: data -> 2D stage -> transfer -> 3D variants -> per-type report.

    python -m ahnet.experiment --preset demo     # `bash run.sh demo`: 2D MC-GCN and AH-Net after transfer
    python -m ahnet.experiment --preset cpu      # the whole comparison at CPU size (2 cores)
    python -m ahnet.experiment --preset cpu --seeds 3             # each model trained 3 times (resumes the first)
    python -m ahnet.experiment --preset cpu --seeds 3 --final     # the same models on the sealed final test set
    python -m ahnet.experiment --preset cpu --slice-spacing 5.0   # every phantom at 5 mm slices (runs/phantom-cpu-z5)
    python -m ahnet.experiment --preset cpu --final --shifts all --evaluate-only   # the trained models, shifted sets
    python -m ahnet.experiment --preset cpu --shifts hu+30 --evaluate-only   # the same on dev (to choose a lever)
    python -m ahnet.experiment --preset cpu --name phantom-cpu-blur --recipe augment=standard-blur   # a lever
    python -m ahnet.experiment --preset cpu --name phantom-cpu-kernels --phantom 'psf_sigma=[0.25,1.0]'  # another
    python -m ahnet.experiment --preset cpu --shifts smooth --data-only     # the phantoms alone, rendered again
    python -m ahnet.experiment --preset paper    # the same at the paper's size (ResNet50, GPU)

Models compared: the 2D MC-GCN applied slice by slice; the 3D AH-Net after transfer; the 3D AH-Net from scratch;
a 3D U-Net from scratch; AH-Net after transfer at other pyramid depths ("PFN depth"; cpu: 0). Each
variant is a TrainConfig given to ahnet.train.train (the equivalent ``python -m ahnet.train`` command is printed
for a reader who wants to rerun one); every transferred variant starts with the transfer's exactness check (the
training step that transfers prints the table and refuses an inexact transfer). With ``--rescore`` (the cpu and
paper presets' default) every run then gets its own second stage, a candidate classifier trained on its
candidates on the training scans (``python -m ahnet.rescore``, printed too; side by side, it starts as soon as
that run's training has ended), and is evaluated with it.

Seeds (``--seeds N``): each variant is trained N times on the same data, training seed ``--seed + k`` (run
folders ``<variant>`` for k = 0 and ``<variant>-seed<k>``; the k-th transfer starts from the k-th 2D stage), and
the report compares models over seeds and scans together (ahnet.evaluate.froc.paired_bootstrap's hierarchical
bootstrap): each model's mean and spread over its seeds, the claims as intervals that hold both sources of
variation. A larger N reuses the trainings a smaller one finished.

Evaluation sets: by default the development set (``data/<name>-dev``), on which every choice is made. ``--final``
evaluates the same models on the sealed final test set instead (``data/<name>-final``: shapes from LIDC patients no
other phantom draws from, checked before it is read; every look appended to its looks.csv). ``--shifts`` evaluates
on the set's shifted renderings too (noise, reconstruction kernel, in-plane spacing, vessels, HU offset;
ahnet.commands.phantoms.SHIFTS), each paired against the unshifted set: the final set's with ``--final``, dev's
without (where a training lever that recovers a shift is chosen). ``--slice-spacing S`` renders every phantom at S
mm slices over the same 100 mm (experiment ``<name>-z<S>``), the 3D patch over the same depth in mm.
``--evaluate-only`` evaluates the runs as they stand, trained models and second stages untouched (a model trained
by an earlier commit keeps its second stage even where this commit would train it differently); a run without them
is an error before any work. ``--recipe KEY=VALUE`` changes the preset's training recipe for every run (a lever to
measure: augmentation, sampling, loss), under its own ``--name`` so that its runs never mix with the preset's; its
phantoms are generated again there, the same scans (the same generator and seeds). ``--phantom KEY=VALUE`` changes
the training phantom the same way (noise, reconstruction kernel, vessels, HU offset: a randomised-phantom lever),
never the sets it is evaluated on. ``--inplane-spacing MM`` (or ``native``) predicts every evaluated scan at that
pixel spacing instead of the runs' recorded training spacing (ahnet.infer.spacing; for runs trained before
checkpoints recorded it), its reports in ``report...-at<MM>mm`` and its looks logged with it.

Every stage resumes: run the command again after an interruption and finished runs are skipped. On a CPU the cpu
preset trains two runs at a time, each in its own process on one core (``--jobs``), a transferred run waiting for
its 2D stage; lines of their output start with the run's name. Under ``torchrun`` (README "Scaling up") every run
trains on all ranks; rank 0 prepares the data first and alone evaluates; the presets' batches must divide by the
number of ranks (checked before any work).
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
from ahnet.commands import phantoms
from ahnet.commands.evaluate import evaluate_and_report
from ahnet.commands.jobs import SecondStageJob, rescore_one_by_one, train_side_by_side, training_jobs, training_plan
from ahnet.commands.presets import (ALL_VARIANTS, PRESETS, Preset, at_slice_spacing, command_line, fast_amp,
                                    parse_variant, second_stage_config, variant_config)
from ahnet.data.cache import cache_dataset
from ahnet.evaluate.validation import make_validator
from ahnet.infer.spacing import add_inplane_argument
from ahnet.precision import resolve_device
from ahnet.report.claims import found_line
from ahnet.report.curves import read_curve
from ahnet.train import TrainingDiverged, dist, train
from ahnet.train.config import TrainConfig
from ahnet.train.guard import preflight

PROG = "ahnet.experiment"


def build_parser() -> argparse.ArgumentParser:
    p = failures.Parser(PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="experiment size (default demo)")
    p.add_argument("--name", help="experiment name: runs/<name>, data/<name> (default: the preset's, with -z<S> "
                                  "at another --slice-spacing)")
    p.add_argument("--data", type=Path, help="an existing dataset.json to use instead of a generated phantom")
    p.add_argument("--variants", nargs="+", help=f"subset of variants to train (default: the preset's); "
                   f"any of {', '.join(ALL_VARIANTS)}")
    p.add_argument("--seeds", type=failures.number(int, 1, 100), default=1,
                   help="train each variant this many times (training seeds --seed .. --seed + N - 1, the same data)")
    p.add_argument("--slice-spacing", type=failures.number(float, 0.5, 10), default=2.5,
                   help="slice spacing = thickness of every phantom, mm (default 2.5; the study: 1.25 2.5 5)")
    p.add_argument("--final", action="store_true",
                   help="evaluate on the sealed final test set instead of the development set (its looks are logged)")
    p.add_argument("--shifts", nargs="+", choices=["all", *phantoms.SHIFTS], default=None,
                   help="with --final: also on the final set rendered with each of these shifts")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")
    p.add_argument("--seed", type=failures.number(int, 0, 2 ** 32 - 1), default=0)
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm over the global batch of all ranks (python -m ahnet.train --help)")
    p.add_argument("--jobs", type=failures.number(int, 1, 64),
                   help="trainings side by side on a CPU, each in its own process on its share of the cores "
                        "(default: the preset's, cpu: 2; 1 on CUDA and under torchrun); a transferred run "
                        "waits for its 2D stage")
    p.add_argument("--rescore", action=argparse.BooleanOptionalAction, default=None,
                   help="give every run its second stage (python -m ahnet.rescore with the preset's options) "
                        "and evaluate with it, or not (default: the preset's: cpu and paper yes, demo no)")
    p.add_argument("--recipe", nargs="+", metavar="KEY=VALUE", default=None,
                   help="change the preset's training recipe for every run, e.g. augment=standard-blur "
                        "pos_weighting=inverse-diameter-contrast hard_fraction=0.1 (settings of python -m "
                        "ahnet.train; values as JSON, else text); needs --name")
    p.add_argument("--phantom", nargs="+", metavar="KEY=VALUE", default=None,
                   help="change the training phantom (training and validation scans; dev, final and shifted sets "
                        "stay as they are), e.g. psf_sigma=[0.25,1.0] (a kernel drawn per scan); any of "
                        f"{', '.join(sorted(PHANTOM_LEVERS))}; values as JSON; needs --name")
    p.add_argument("--evaluate-only", action="store_true",
                   help="no training and no second-stage fit: evaluate every run as it stands (each must hold its "
                        "trained model and, with --rescore, its second stage)")
    p.add_argument("--data-only", action="store_true",
                   help="render the experiment's phantoms (training, dev or with --final the final set, and the "
                        "--shifts renderings) and stop: no training, no evaluation, no look at the final set")
    p.add_argument("--bootstrap", type=failures.number(int, 0, 10 ** 6), default=1000,
                   help="bootstrap resamples of the report's intervals (0 = none)")
    add_inplane_argument(p)
    return p


def pixels_label(args) -> Optional[str]:
    """The report folders' suffix for a prediction spacing other than auto ("0.7mm", "native"), else None."""
    s = args.inplane_spacing
    return None if s == "auto" else ("native" if s == "native" else f"{float(s):g}mm")


def with_rescore(preset: Preset, rescore: Optional[bool]) -> Preset:
    """The preset as --rescore / --no-rescore asks (None: as it is; --rescore keeps a preset's own options)."""
    if rescore is None or rescore == (preset.rescore is not None):
        return preset
    return dataclasses.replace(preset, rescore={} if rescore else None)


@dataclasses.dataclass
class Plan:
    """What one call does, every option checked: the preset, the folders, the variants and their runs."""
    preset: Preset
    name: str
    ep: paths.ExperimentPaths
    variants: List[str]
    trainings: Dict[str, tuple]          # {run name: (variant, k)} in training order
    shifts: List[str]
    amp: str


# TrainConfig settings a run's variant, seed, data and places decide: not a recipe's to change
NOT_RECIPE = frozenset({"data", "cache_dir", "out", "resume", "seed", "device", "stage", "model", "init", "init_from",
                        "encoder", "pfn_depth", "model_kwargs", "patch_size", "batch_size", "epochs",
                        "steps_per_epoch", "amp", "channels_last", "sync_bn"})


def _key_values(items: Optional[List[str]], name: Optional[str], flag: str, what: str, example: str) -> dict:
    """{key: value} of a lever's ``KEY=VALUE`` items (keys with - as _, values as JSON, else text; {} without
    items); ValueError for an item that is not KEY=VALUE, or items without the experiment's own --name."""
    if not items:
        return {}
    if not name:
        raise ValueError(f"{flag} changes {what}; give the experiment its own --name")
    changes = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {example}")
        try:
            changes[key] = json.loads(text)
        except ValueError:
            changes[key] = text
    return changes


def with_recipe(preset: Preset, items: Optional[List[str]], name: Optional[str]) -> Preset:
    """The preset with ``--recipe KEY=VALUE`` items over its recipe, each checked as a training setting."""
    changes = _key_values(items, name, "--recipe", "how every run trains", "augment=standard-blur")
    if not changes:
        return preset
    for key in changes:
        if key in NOT_RECIPE:
            raise ValueError(f"--recipe {key}: the experiment sets it for each run (variant, seed, data); "
                             f"not a recipe setting")
    recipe = {**preset.recipe, **changes}
    TrainConfig.from_dict(recipe, "--recipe").resolved()
    return dataclasses.replace(preset, recipe=recipe)


# the training phantom's options a lever may change (ahnet.data.phantom.PhantomOptions): how scans are acquired
# and what vessels they hold; sizes, slices, splits and the nodule schedule belong to the preset
PHANTOM_LEVERS = frozenset({"noise", "psf_sigma", "hu_offset", "vessel_density", "vessel_radius"})


def with_phantom(preset: Preset, items: Optional[List[str]], name: Optional[str]) -> Preset:
    """The preset with ``--phantom KEY=VALUE`` items over its training phantom's options, each checked."""
    changes = _key_values(items, name, "--phantom", "the scans every run trains on", "psf_sigma=[0.25,1.0]")
    if not changes:
        return preset
    for key in changes:
        if key not in PHANTOM_LEVERS:
            raise ValueError(f"--phantom {key}: not a phantom option a lever may change; choose from "
                             f"{', '.join(sorted(PHANTOM_LEVERS))}")
    from ahnet.data.phantom.options import PhantomOptions
    phantom = {**preset.phantom, **changes}
    try:
        PhantomOptions(**phantom).validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"--phantom: {e}") from None
    return dataclasses.replace(preset, phantom=phantom)


def plan_experiment(args) -> Plan:
    """Every option of the call checked before any data work (ValueError, one sentence)."""
    phantoms.slice_options(args.slice_spacing)
    preset = at_slice_spacing(with_rescore(PRESETS[args.preset], args.rescore), args.slice_spacing)
    preset = with_phantom(with_recipe(preset, args.recipe, args.name), args.phantom, args.name)
    name = args.name or paths.experiment_name(args.preset, args.slice_spacing)
    ep = paths.ExperimentPaths(name)
    variants = list(args.variants or preset.variants)
    for v in variants:
        parse_variant(v)
    if any(parse_variant(v)[1] == "transfer" for v in variants) and "mcgcn-2d" not in variants:
        variants = ["mcgcn-2d"] + variants
    shifts = list(phantoms.SHIFTS) if args.shifts and "all" in args.shifts else list(dict.fromkeys(args.shifts or []))
    if shifts and (args.data or not preset.test_phantom):
        raise ValueError("--shifts renders a preset's generated dev or final phantom with shifts; it does not go with "
                         "--data" if args.data else f"--shifts: the {args.preset} preset has no generated dev phantom")
    if args.final and (args.data or f"{preset.test_phantom}-final" not in _test_phantoms()):
        raise ValueError(f"--final: the {args.preset} preset has no sealed final test set" if not args.data else
                         "--final evaluates a preset's generated final set; it does not go with --data")
    if args.data_only and (args.data or args.evaluate_only):
        raise ValueError("--data-only renders the preset's phantoms and stops; it does not go with "
                         + ("--data" if args.data else "--evaluate-only"))
    resolve_device(args.device)
    failures.check_output_dir(ep.runs, "--name")
    if not args.data:
        failures.check_output_dir(ep.train, "--name")
    for v in variants:
        dist.check_batch(preset.batch_2d if parse_variant(v)[0] == "mcgcn" else preset.batch_3d)
    amp = fast_amp(args.device)                         # second stage and evaluation in the runs' precision
    for k in range(args.seeds):
        second_stage_config(preset, amp, args.seed, k)
    trainings = {ep.run(v, k).name: (v, k) for k in range(args.seeds) for v in variants}
    if args.evaluate_only:
        check_trained([ep.runs / name for name in trainings], preset.rescore is not None)
    return Plan(preset, name, ep, variants, trainings, shifts, amp)


def check_trained(runs: List[Path], second_stage: bool) -> None:
    """--evaluate-only: every run holds its trained model, finished by its own rule (step cap or patience, read
    from its log.csv and config.json: a run still training is not evaluated, least of all on the final set), and
    its second stage when the call rescores; ValueError naming the first that does not."""
    for run in runs:
        if paths.trained_checkpoint(run) is None:
            raise ValueError(f"--evaluate-only: {run} holds no trained model ({paths.CHECKPOINTS}/{paths.BEST} or "
                             f"{paths.LAST}); train it first (the same command without --evaluate-only)")
        budget = (read_curve(run) or {}).get("budget")
        if budget and budget["stopped_by"] == "not finished":
            raise ValueError(f"--evaluate-only: {run} has not finished training ({budget['steps_run']} of "
                             f"{budget['cap']} steps, patience not spent); let it finish first (the same command "
                             f"without --evaluate-only resumes it)")
        if second_stage and not paths.run_paths(run).rescorer.is_file():
            raise ValueError(f"--evaluate-only: {run} holds no second stage ({paths.RESCORER}); train it first "
                             f"(the same command without --evaluate-only) or add --no-rescore")


def _test_phantoms() -> dict:
    from ahnet.data.phantom import TEST_PHANTOMS
    return TEST_PHANTOMS


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return dist.run_command(PROG, lambda: run_experiment(args), codes={TrainingDiverged: 3})


def run_experiment(args) -> int:
    """Options -> data -> every run's config (all checked first) -> training (2D stages first) -> evaluation."""
    plan = plan_experiment(args)
    preset, ep = plan.preset, plan.ep
    t0 = time.time()
    ctx, device = dist.plan(args.device, resolve_device(args.device))
    dist.start(ctx, device)
    jobs = training_jobs(args.jobs, preset, device, ctx.world_size)
    if args.data:                                     # your data: every check before its cache is written
        dataset_json = Path(args.data)
    else:                                             # the phantom: the held-out folders checked before generating
        _check_eval_sets(plan, args)
        dataset_json = ctx.main_first(lambda: phantoms.prepare_training(ep.train, preset.cases, preset.size,
                                                                        preset.phantom, args.seed))
    if args.data_only:
        held_out = [str(look[0].parent) for look in evaluation_sets(plan, args)]
        print(f"[experiment] phantoms rendered: {dataset_json.parent}, {', '.join(held_out)}", flush=True)
        return 0
    spacing = phantoms.data_spacing(dataset_json)
    configs = {name: variant_config(v, k, preset, dataset_json, ep, args.seed, args.device, spacing, args.sync_bn)
               for name, (v, k) in plan.trainings.items()}
    for cfg in configs.values():                         # every run's network and places before the first trains
        preflight(cfg, sources=cfg.init != "transfer")
    if args.data:
        ctx.main_first(lambda: cache_dataset(dataset_json))
    print(f"[experiment] {args.preset}: data {dataset_json} (spacing {spacing} mm), runs in {ep.runs}/, "
          f"variants {', '.join(plan.variants)}, {args.seeds} seed(s)", flush=True)
    second = {} if preset.rescore is None else {
        name: SecondStageJob(ep.runs / name, dataset_json, args.device,
                             second_stage_config(preset, plan.amp, args.seed, k))
        for name, (v, k) in plan.trainings.items()}
    failed = 0 if args.evaluate_only else train_all(configs, training_plan(plan.trainings), jobs, second, ctx.is_main)
    if failed or not ctx.is_main:
        return failed
    looks = evaluation_sets(plan, args)
    for look in looks:
        evaluate_set(plan, args, *look)
    if plan.shifts:
        summarize_shifts(plan, args, looks)
    print(f"\n[experiment] done in {(time.time() - t0) / 60:.1f} min.", flush=True)
    return 0


def _check_eval_sets(plan: Plan, args) -> None:
    """The dev and final folders hold the phantoms this call would generate there (ValueError before training)."""
    preset, ep, opts = plan.preset, plan.ep, _held_out_overrides(plan)
    if preset.test_phantom:
        phantoms.check_held_out(ep.dev, preset.test_phantom, args.seed, opts)
        if args.final:
            phantoms.check_held_out(ep.final, f"{preset.test_phantom}-final", args.seed, opts)
        for s in plan.shifts:
            phantoms.check_held_out(ep.held_out(args.final, s), _held_out_name(plan, args.final), args.seed,
                                    {**opts, **phantoms.SHIFTS[s]})


def _held_out_name(plan: Plan, final: bool) -> str:
    """The test phantom (ahnet.data.phantom.TEST_PHANTOMS) of dev or of the final set."""
    return plan.preset.test_phantom + ("-final" if final else "")


def _set_label(final: bool) -> str:
    """How logs and the shift report name the evaluation set."""
    return "the final set" if final else "dev"


def _shifted_looks(plan: Plan, args, opts: dict) -> list:
    """[(dataset.json, report folder, label, shift)] of the evaluation set rendered with each of plan.shifts."""
    where = _set_label(args.final)
    return [(phantoms.ensure_held_out(plan.ep.held_out(args.final, s), _held_out_name(plan, args.final), args.seed,
                                      {**opts, **phantoms.SHIFTS[s]}),
             plan.ep.report(args.final, s, pixels_label(args)), f"{where}, shifted: {s}", s) for s in plan.shifts]


def _held_out_overrides(plan: Plan) -> dict:
    """The test phantoms' options that follow the training phantom's slice spacing."""
    return {k: plan.preset.phantom[k] for k in ("thickness", "slices") if k in plan.preset.phantom}


def train_all(configs: dict, order: Dict[str, Optional[str]], jobs: int, second: Dict[str, SecondStageJob],
              is_main: bool) -> int:
    """Every run's training, then (one job at a time) its second stage; side by side with ``jobs`` > 1.
    Returns 0 or the exit code of the first failure."""
    if jobs > 1:
        return train_side_by_side(configs, order, jobs, second)
    for name, cfg in configs.items():
        print(f"\n[experiment] {name}: {command_line(cfg)}", flush=True)
        t = time.time()
        train(cfg, validator_for=make_validator)
        print(f"[experiment] {name} trained in {time.time() - t:.0f} s", flush=True)
    if is_main and second:
        t = time.time()
        rescore_one_by_one(second)
        print(f"[experiment] second stages trained in {time.time() - t:.0f} s", flush=True)
    return 0


def evaluation_sets(plan: Plan, args) -> list:
    """[(dataset.json, report folder, label, shift)] this call evaluates: dev or the final set, and its shifts
    (generated when missing; the final set's seal checked, each look logged)."""
    preset, ep, opts = plan.preset, plan.ep, _held_out_overrides(plan)
    if args.data:
        return [(Path(args.data), ep.report(pixels=pixels_label(args)), "its own test split", None)]
    if not args.final:
        if preset.test_phantom:
            dev = phantoms.ensure_held_out(ep.dev, preset.test_phantom, args.seed, opts)
        elif preset.test_cases > 0:
            dev = phantoms.ensure_generated_dev(ep.dev, preset.test_cases, preset.size, preset.phantom, args.seed)
        else:
            dev = ep.train / paths.DATASET
        return [(dev, ep.report(pixels=pixels_label(args)), "the development set", None)] + \
            _shifted_looks(plan, args, opts)
    final = phantoms.ensure_held_out(ep.final, _held_out_name(plan, True), args.seed, opts)
    dev = phantoms.ensure_held_out(ep.dev, preset.test_phantom, args.seed, opts)
    n = phantoms.check_sealed(final, [ep.train / paths.DATASET, dev])
    print(f"[experiment] the final set {ep.final} holds shapes of {n} LIDC patients, none in training, validation "
          f"or dev", flush=True)
    return [(final, ep.report(True, pixels=pixels_label(args)), "the sealed final test set", None)] + \
        _shifted_looks(plan, args, opts)


def evaluate_set(plan: Plan, args, data_json: Path, report: Path, label: str, shift: Optional[str]) -> dict:
    """Every run on one evaluation set, the models compared over their seeds; the report into ``report``."""
    preset, ep = plan.preset, plan.ep
    runs = [ep.runs / name for name in plan.trainings]
    groups = {v: ep.run_names(v, args.seeds) for v in plan.variants} if args.seeds > 1 else None
    if args.final:
        n = phantoms.log_look(ep.looks(), args.preset, plan.name, runs, shift, args.inplane_spacing)
        print(f"[experiment] look {n} at the sealed final set (logged in {ep.looks()})", flush=True)
    flags = ["--runs", *map(str, runs), "--data", str(data_json), "--out", str(report), "--device", args.device,
             "--bootstrap", str(args.bootstrap)] + (
        ["--window", *map(str, preset.window)] if preset.window else []) + (
        ["--amp", plan.amp, "--channels-last"] if plan.amp != "off" else []) + (
        ["--rescore"] if preset.rescore is not None else []) + (
        ["--inplane-spacing", str(args.inplane_spacing)] if args.inplane_spacing != "auto" else [])
    print(f"\n[experiment] evaluation on {label}: python -m ahnet.evaluate "
          f"{' '.join(shlex.quote(f) for f in flags)}", flush=True)
    rep = evaluate_and_report(runs, data_json, report, device=args.device, n_bootstrap=args.bootstrap,
                              window=preset.window, amp=plan.amp, channels_last=plan.amp != "off",
                              rescore=preset.rescore is not None, groups=groups,
                              inplane_spacing=args.inplane_spacing,
                              title=f"AH-Net per-type evaluation ({args.preset} preset, {plan.name}, {label})")
    print(f"[experiment] report on {label}: {report / paths.REPORT_HTML} (also {paths.REPORT_MD}, "
          f"{paths.REPORT_JSON})", flush=True)
    for m in rep["model_order"]:
        if rep["models"][m]["found"]:
            print("[experiment] " + found_line(m, rep["models"][m]["found"]))
    return rep


def summarize_shifts(plan: Plan, args, looks: list) -> None:
    """The shift study's report (ahnet.report.shifts) from the candidates each evaluation wrote."""
    from ahnet.evaluate.shifts import read_evaluated_set, shift_summary
    from ahnet.report.shifts import write_shift_report
    names = list(plan.trainings)
    sets = {shift: read_evaluated_set(data_json, report, names) for data_json, report, _, shift in looks}
    groups = {v: plan.ep.run_names(v, args.seeds) for v in plan.variants}
    summary = shift_summary(sets.pop(None), sets, groups, n_bootstrap=args.bootstrap, seed=0)
    where = _set_label(args.final)
    md = write_shift_report(summary, plan.ep.shift_report(args.final, pixels_label(args)),
                            f"Shifts of {where} ({args.preset} preset, {plan.name})", where)
    print(f"[experiment] the models under shifts of {where}: {md}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
