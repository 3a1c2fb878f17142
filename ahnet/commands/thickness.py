"""``python -m ahnet.thickness``: the slice-thickness study from an experiment's final evaluations at each spacing.

    python -m ahnet.experiment --preset cpu --final                      # 2.5 mm: runs/phantom-cpu/report-final
    python -m ahnet.experiment --preset cpu --final --slice-spacing 5    # 5 mm: runs/phantom-cpu-z5/report-final
    python -m ahnet.thickness --preset cpu --spacings 2.5 5              # -> runs/phantom-cpu/report-final-thickness
    python -m ahnet.thickness --name phantom-cpu-main --spacings 2.5 5   # phantom-cpu-main and phantom-cpu-main-z5

Reads the candidates each final evaluation wrote (no prediction, no new look at the final set) and writes, with
ahnet.evaluate.thickness and ahnet.report.thickness: every model's CPM against slice spacing, overall and per
composition group, with intervals; the paired differences of AH-Net after transfer against every other model at
each spacing; and how each difference moves from the thinnest spacing to the others, paired by scan. Bad input (a
spacing whose final evaluation is missing, a model missing at a spacing, an --out that is a file): one line
``ahnet.thickness: error: ...`` on stderr and exit code 2, before any computation.
"""
from __future__ import annotations

import datetime
import shlex
import sys
from pathlib import Path
from typing import Dict, List

from ahnet import commit_label, failures, paths
from ahnet.commands.phantoms import data_spacing
from ahnet.commands.presets import ALL_VARIANTS, PRESETS, parse_variant
from ahnet.evaluate.shifts import read_evaluated_set
from ahnet.evaluate.thickness import thickness_summary
from ahnet.report.thickness import write_thickness_report

PROG = "ahnet.thickness"
STUDY_VARIANTS = ("mcgcn-2d", "ahnet-transfer", "ahnet-scratch", "unet3d-scratch")
REFERENCE = "ahnet-transfer"          # the model every pair compares against the others


def build_parser() -> failures.Parser:
    p = failures.Parser(PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="the experiment's preset (default cpu)")
    p.add_argument("--spacings", nargs="+", type=failures.number(float, 0.5, 10), default=[2.5, 5.0],
                   help="slice spacings in mm whose final evaluations to read, two or more (default 2.5 5)")
    p.add_argument("--variants", nargs="+", choices=ALL_VARIANTS,
                   help=f"models to compare (default: those of {', '.join(STUDY_VARIANTS)} evaluated at every "
                        f"spacing); must include {REFERENCE}")
    p.add_argument("--name", help="the 2.5 mm experiment's --name; at another spacing S the study reads <name>-z<S> "
                                  "(default phantom-<preset>: phantom-cpu, phantom-cpu-z5)")
    add_reading_options(p)
    p.add_argument("--out", type=Path,
                   help="report folder (default runs/<the 2.5 mm experiment>/report-final-thickness)")
    return p


def add_reading_options(p) -> None:
    """--seeds and --bootstrap of a command that reads evaluated runs' candidates (this one, ahnet.lever)."""
    p.add_argument("--seeds", type=failures.number(int, 1, 100), default=1,
                   help="runs per model to read (the experiment's --seeds; default 1)")
    p.add_argument("--bootstrap", type=failures.number(int, 0, 10 ** 6), default=1000,
                   help="bootstrap resamples of scans and seeds (0 = no intervals)")


def _evaluated(ep: paths.ExperimentPaths, variant: str, seeds: int) -> bool:
    return all(paths.report_candidates(ep.report(final=True), r).is_file() for r in ep.run_names(variant, seeds))


def plan_study(args) -> tuple:
    """({spacing: ExperimentPaths}, variants, out folder), every option checked (ValueError, one sentence)."""
    spacings = sorted(set(args.spacings))
    if len(spacings) < 2:
        raise ValueError(f"--spacings: the study compares two or more slice spacings; got {spacings}")
    exps = {s: paths.ExperimentPaths(paths.experiment_name(args.preset, s, args.name)) for s in spacings}
    for s, ep in exps.items():
        final_json = ep.final / paths.DATASET
        if not final_json.is_file() or not ep.report(final=True).is_dir():
            raise ValueError(f"--spacings {s:g}: no final evaluation at {s:g} mm ({ep.report(final=True)}); run "
                             f"python -m ahnet.experiment --preset {args.preset} --name {ep.name} --final"
                             + (f" --slice-spacing {s:g}" if s != 2.5 else ""))
        held = data_spacing(final_json)[0]
        if abs(held - s) > 1e-6:
            raise ValueError(f"--spacings {s:g}: {final_json} holds {held:g} mm slices")
    if args.variants:
        variants = list(dict.fromkeys(args.variants))
        for v in variants:
            parse_variant(v)
            missing = [f"{s:g}" for s, ep in exps.items() if not _evaluated(ep, v, args.seeds)]
            if missing:
                raise ValueError(f"--variants {v}: no final candidates of its {args.seeds} run(s) at "
                                 f"{', '.join(missing)} mm")
    else:
        variants = [v for v in STUDY_VARIANTS if all(_evaluated(ep, v, args.seeds) for ep in exps.values())]
    if REFERENCE not in variants or len(variants) < 2:
        raise ValueError(f"the study compares {REFERENCE} with at least one other model evaluated at every spacing; "
                         f"found {variants or 'none'}")
    out = args.out or exps[2.5 if 2.5 in exps else spacings[0]].thickness_report()
    failures.check_output_dir(out, "--out")
    return exps, variants, out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return failures.run(PROG, lambda: run_study(args, argv))


def run_study(args, argv) -> int:
    exps, variants, out = plan_study(args)
    ep0 = next(iter(exps.values()))
    runs: Dict[str, List[str]] = {v: ep0.run_names(v, args.seeds) for v in variants}
    names = [r for rs in runs.values() for r in rs]
    sets = {s: read_evaluated_set(ep.final / paths.DATASET, ep.report(final=True), names) for s, ep in exps.items()}
    pairs = [(REFERENCE, v) for v in ("unet3d-scratch", "ahnet-scratch", "mcgcn-2d") if v in variants]
    summary = thickness_summary(sets, runs, pairs, n_bootstrap=args.bootstrap, seed=0)
    command = "python -m ahnet.thickness " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    provenance = (f"Command: `{command}`; from " + ", ".join(f"`{ep.report(final=True)}`" for ep in exps.values())
                  + f"; code {commit_label()}; {datetime.date.today().isoformat()}.")
    md = write_thickness_report(summary, out, f"Slice thickness ({args.preset} preset, final set)", provenance)
    print(f"[thickness] report: {md} (also {paths.REPORT_JSON} and the figures)", flush=True)
    return 0
