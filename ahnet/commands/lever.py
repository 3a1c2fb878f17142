"""``python -m ahnet.lever``: does a training lever pay? One experiment trained with ``--recipe`` or ``--phantom``
(the lever) against the experiment without it (the base), on the same evaluation sets: dev (or, with ``--final``,
the final set) and every shifted rendering both were evaluated on.

    python -m ahnet.experiment --preset cpu --name phantom-cpu-main --shifts smooth inplane0.9
    python -m ahnet.experiment --preset cpu --name phantom-cpu-blur --recipe augment=standard-blur --shifts smooth inplane0.9
    python -m ahnet.lever --base phantom-cpu-main --lever phantom-cpu-blur     # -> runs/phantom-cpu-blur/report-vs-phantom-cpu-main

Reads the candidates each evaluation wrote (no prediction, no new look at the final set) and writes, for every
model evaluated in both: its CPM with and without the lever on each set, overall and per composition group; the
paired difference lever - base on each set; what each shift costs with and without the lever; and how much of the
shift's cost the lever recovers, (lever - base on the shifted set) - (lever - base unshifted), all paired by scan
(ahnet.evaluate.across). Bad input (an experiment or evaluation missing, sets that are not the same scans and
nodules, an --out that is a file): one line ``ahnet.lever: error: ...`` on stderr and exit code 2, before any
computation.
"""
from __future__ import annotations

import datetime
import json
import shlex
import sys
from pathlib import Path
from typing import Dict, List

from ahnet import commit_label, failures, paths
from ahnet.commands.phantoms import SHIFTS
from ahnet.commands.presets import ALL_VARIANTS
from ahnet.commands.thickness import add_reading_options
from ahnet.evaluate.across import across_sets
from ahnet.evaluate.shifts import read_evaluated_set
from ahnet.report.lever import write_lever_report

PROG = "ahnet.lever"


def build_parser() -> failures.Parser:
    p = failures.Parser(PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the experiment without the lever (its --name, e.g. phantom-cpu)")
    p.add_argument("--lever", required=True,
                   help="the experiment trained with the lever (--recipe or --phantom ... under its own --name)")
    p.add_argument("--final", action="store_true",
                   help="compare on the final set and its shifts (default: dev, where a lever is chosen)")
    p.add_argument("--shifts", nargs="+", choices=sorted(SHIFTS),
                   help="shifted sets to compare on (default: every shift both experiments were evaluated on)")
    p.add_argument("--variants", nargs="+", choices=ALL_VARIANTS,
                   help="models to compare (default: every model evaluated in both on every set)")
    add_reading_options(p)
    p.add_argument("--out", type=Path, help="report folder (default runs/<lever>/report[-final]-vs-<base>)")
    return p


def _set_paths(ep: paths.ExperimentPaths, final: bool, shift: str | None) -> tuple:
    """(dataset.json, report folder) of an experiment's evaluation on dev or the final set, or a shift of it."""
    return ep.held_out(final, shift) / paths.DATASET, ep.report(final, shift)


def _evaluated(ep: paths.ExperimentPaths, final: bool, shift: str | None, runs: List[str]) -> bool:
    data, report = _set_paths(ep, final, shift)
    return data.is_file() and all(paths.report_candidates(report, r).is_file() for r in runs)


def plan_comparison(args) -> tuple:
    """(base paths, lever paths, [shift], [variant], out folder), every option checked (ValueError, one sentence)."""
    if args.base == args.lever:
        raise ValueError(f"--base and --lever both name {args.base}; a lever is compared with another experiment")
    eps = {flag: paths.ExperimentPaths(name) for flag, name in (("--base", args.base), ("--lever", args.lever))}
    where = "final set" if args.final else "dev set"
    for flag, ep in eps.items():
        data, report = _set_paths(ep, args.final, None)
        if not data.is_file() or not report.is_dir():
            raise ValueError(f"{flag} {ep.name}: no evaluation on its {where} ({report}); run python -m "
                             f"ahnet.experiment --name {ep.name}" + (" --final" if args.final else ""))
    base = eps["--base"]

    def both(shift, runs):
        return all(_evaluated(ep, args.final, shift, runs) for ep in eps.values())

    variants = [v for v in dict.fromkeys(args.variants or ALL_VARIANTS) if both(None, base.run_names(v, args.seeds))]
    for v in args.variants or []:
        if v not in variants:
            raise ValueError(f"--variants {v}: its {args.seeds} run(s) are not evaluated on the {where} of both "
                             f"{args.base} and {args.lever}")
    if not variants:
        raise ValueError(f"no model is evaluated on the {where} of both {args.base} and {args.lever}")
    runs = [r for v in variants for r in base.run_names(v, args.seeds)]
    shifts = [s for s in dict.fromkeys(args.shifts or SHIFTS) if both(s, runs)]
    for s in args.shifts or []:
        if s not in shifts:
            raise ValueError(f"--shifts {s}: not evaluated for every model in both experiments; run python -m "
                             f"ahnet.experiment --name <each> --shifts {s}" + (" --final" if args.final else ""))
    out = args.out or eps["--lever"].lever_report(args.base, args.final)
    failures.check_output_dir(out, "--out")
    return base, eps["--lever"], shifts, variants, out


def _same_set(a: tuple, b: tuple, label: str) -> None:
    """Refuses two evaluated sets (read_evaluated_set) that are not the same scans with the same nodules."""
    if [str(s) for s in a[2]] != [str(s) for s in b[2]] or a[0] != b[0]:
        raise ValueError(f"the {label} set differs between the two experiments (other scans or nodules); a lever is "
                         f"compared on the same phantoms, which --recipe keeps")


def read_sets(base, lever, final: bool, shifts: List[str], runs: List[str]) -> Dict[str, tuple]:
    """{set label: (annotations, {"<experiment>/<run>": candidate rows}, scan ids)}: the unshifted set first."""
    sets = {}
    for shift in [None, *shifts]:
        label = shift or ("final" if final else "dev")
        got = [read_evaluated_set(*_set_paths(ep, final, shift), runs) for ep in (base, lever)]
        _same_set(got[0], got[1], label)
        rows = {f"{ep.name}/{r}": got[i][1][r] for i, ep in enumerate((base, lever)) for r in runs}
        sets[label] = (got[0][0], rows, got[0][2])
    return sets


# a run's settings that name its experiment's folders, not how it trains
_PLACES = frozenset({"data", "cache_dir", "out", "init_from"})


def _training(run: Path) -> tuple:
    """(training settings of a run's config.json, its training phantom's options) or None where either is
    absent or unreadable (an evidence copy holds candidates alone)."""
    try:
        cfg = json.loads(paths.run_paths(run).config.read_text())["config"]
        phantom = json.loads(Path(cfg["data"]).read_text()).get("options", {})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {k: v for k, v in cfg.items() if k not in _PLACES}, phantom


def lever_changes(base: paths.ExperimentPaths, lever: paths.ExperimentPaths, variant: str) -> List[str] | None:
    """What the lever changes against the base, read from one model's runs: "setting: base -> lever" for each
    training setting and each training phantom option that differ; None where a run's files are not here."""
    got = [_training(ep.run(variant)) for ep in (base, lever)]
    if None in got:
        return None
    out = []
    for what, a, b in (("", got[0][0], got[1][0]), ("phantom ", got[0][1], got[1][1])):
        out += [f"{what}{k}: {json.dumps(a.get(k))} -> {json.dumps(b.get(k))}"
                for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return failures.run(PROG, lambda: run_comparison(args, argv))


def run_comparison(args, argv) -> int:
    base, lever, shifts, variants, out = plan_comparison(args)
    runs = {v: base.run_names(v, args.seeds) for v in variants}
    sets = read_sets(base, lever, args.final, shifts, [r for rs in runs.values() for r in rs])
    models = {f"{ep.name}/{v}": [f"{ep.name}/{r}" for r in runs[v]] for v in variants for ep in (base, lever)}
    pairs = [(f"{lever.name}/{v}", f"{base.name}/{v}") for v in variants]
    summary = across_sets(sets, models, pairs, n_bootstrap=args.bootstrap, seed=0)
    summary.update(base=base.name, lever=lever.name, variants=variants,
                   changes=lever_changes(base, lever, variants[0]), changes_of=variants[0])
    command = "python -m ahnet.lever " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    provenance = (f"Command: `{command}`; from `{base.report(args.final)}` and `{lever.report(args.final)}` and "
                  f"their shifted reports; code {commit_label()}; {datetime.date.today().isoformat()}.")
    md = write_lever_report(summary, out, f"{lever.name} against {base.name} ({summary['sets'][0]} set)", provenance)
    print(f"[lever] report: {md} (also {paths.REPORT_JSON} and the figure)", flush=True)
    return 0
