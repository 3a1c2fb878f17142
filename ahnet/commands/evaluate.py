"""``python -m ahnet.evaluate`` (console script ``ahnet-evaluate``): evaluate runs on a split and write the report.

    python -m ahnet.evaluate --runs runs/A runs/B --data data/phantom/dataset.json --out report/
    python -m ahnet.evaluate --from-candidates runs/X/report-final/candidates --group-seeds \
        --data data/X-final/dataset.json --out again/      # the detection report again from kept candidates

Writes ``<out>/candidates/<run>.csv`` (LUNA16 rows, world mm; the candidate rule of ``--candidates``, default
ahnet.infer.DEFAULT_RULE), ``<out>/evaluated/<run>.json`` (each run's evaluation with its fingerprint, stored as
soon as the run is done: run again, with a run added or after a kill, only the runs without a matching one are
predicted; ahnet.evaluate.store) and the report files (ahnet.report: tables, paired comparisons between the runs,
learning curves from the runs' logs, a gallery of crops), each atomically, with --out locked against a second
writer. Bad input (an option out of range, an --out that is a file or not writable, a dataset.json or annotations
CSV that does not check, a scan that makes no sense as CT): one line ``ahnet.evaluate: error: ...`` on stderr and
exit code 2, before any prediction and with nothing written.

``--from-candidates DIR`` predicts nothing: it reads the candidate files an evaluation wrote (or the gzipped copies
kept in paper_notes/evidence) and writes the same detection report (CPMs, intervals, paired claims over seeds with
``--group-seeds``, first stages beside systems), without Dice, learning curves or gallery.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ahnet import failures, paths
from ahnet.atomic import folder_lock, remove_temps
from ahnet.commands.presets import ALL_VARIANTS
from ahnet.data.io import candidates_csv_text, load_dataset_json, read_annotations_csv, read_candidates_csv
from ahnet.infer import CandidateRule, WindowSettings, add_candidate_arguments, add_window_arguments, candidate_rule
from ahnet.infer import load_ensemble, rule_from_arguments
from ahnet.infer.second_stage import load_run_rescorer
from ahnet.infer.spacing import add_inplane_argument, resolve_inplane
from ahnet.precision import AMP_MODES, resolve_device
from ahnet.report import build_report
from ahnet.report.claims import claim_sentence, found_line
from ahnet.data.budget import add_limit_argument
from ahnet.evaluate import (compare_models, compare_stages, evaluation_limit, gallery_crops, load_cases, run_names,
                            summarise_run)
from ahnet.evaluate.store import evaluate_runs

PROG = "ahnet.evaluate"
SECOND_STAGE = (f"; then each run's second stage (RUN/{paths.RESCORER}, a candidate classifier on crops of the scan and "
                "the map) rescores every candidate to sqrt(p1 x p2)")


def build_parser() -> failures.Parser:
    ap = failures.Parser(PROG, description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--runs", nargs="+",
                     help="run folders, checkpoint files or cross-validations (X for X-fold<k>), one model each")
    src.add_argument("--from-candidates", type=Path, metavar="DIR",
                     help="no prediction: the detection report of the candidate files an evaluation wrote (DIR/<run>"
                          ".csv or .csv.gz, e.g. paper_notes/evidence/<experiment>/report-final/candidates) on the "
                          "scans of --data's --split; first stages beside systems when the rows keep them")
    ap.add_argument("--group-seeds", action="store_true",
                    help="with --from-candidates: runs <model>-seed<k> are trainings of <model>, compared over seeds "
                         "and scans together")
    ap.add_argument("--data", required=True, help="dataset.json (Decathlon style, with split per case)")
    ap.add_argument("--annotations", default=None,
                    help=f"annotations CSV (default: the {paths.ANNOTATIONS} beside --data)")
    ap.add_argument("--out", default=paths.REPORT, help="output folder")
    ap.add_argument("--split", default="test", help="which split to evaluate (default test)")
    add_window_arguments(ap)
    add_inplane_argument(ap)
    ap.add_argument("--tta", action="store_true", help="in-plane flip test-time augmentation")
    ap.add_argument("--amp", choices=AMP_MODES, default="auto",
                    help="autocast: auto = float16 on CUDA, float32 on a CPU; bf16; fp16 (CUDA); off")
    ap.add_argument("--channels-last", action="store_true",
                    help="3D models in channels-last 3D memory (same values; faster with --amp bf16)")
    ap.add_argument("--threshold", type=failures.number(float, 0, 1, what="a probability"), default=0.5,
                    help="probability threshold of the segmentation masks, in [0, 1]")
    add_candidate_arguments(ap)
    ap.add_argument("--bootstrap", type=failures.number(int, 0, 10 ** 6), default=1000,
                    help="bootstrap resamples of the confidence intervals (0 = none)")
    ap.add_argument("--seed", type=failures.number(int, 0, 2 ** 32 - 1), default=0)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    ap.add_argument("--title", default="AH-Net per-type evaluation")
    ap.add_argument("--rescore", action="store_true",
                    help=f"rescore each run's candidates by its second stage (RUN/{paths.RESCORER}, python -m ahnet.rescore)")
    ap.add_argument("--rescore-any-rule", action="store_true",
                    help="with --rescore: apply a second stage to candidates of another rule than it learnt on")
    add_limit_argument(ap, "the split's scans together (evaluate holds them all)")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    return failures.run(PROG, lambda: _main(a))


def _main(a) -> int:
    if a.from_candidates is not None:
        report_from_candidates(a.from_candidates, a.data, a.out, annotations=a.annotations, split=a.split,
                               n_bootstrap=a.bootstrap, seed=a.seed, title=a.title, group_seeds=a.group_seeds,
                               predicting=_predicting_options(a))
        return 0
    if a.group_seeds:
        raise ValueError("--group-seeds reads run names of --from-candidates; evaluating --runs, give one model each")
    evaluate_and_report(a.runs, a.data, a.out, annotations=a.annotations, split=a.split, device=a.device,
                        threshold=a.threshold, candidates=rule_from_arguments(a), n_bootstrap=a.bootstrap,
                        seed=a.seed, title=a.title, **WindowSettings.from_arguments(a).kwargs(), tta=a.tta,
                        amp=a.amp, channels_last=a.channels_last, rescore=a.rescore,
                        rescore_any_rule=a.rescore_any_rule, max_scan_voxels=a.max_scan_voxels,
                        inplane_spacing=a.inplane_spacing)
    return 0


def evaluate_and_report(runs, data, out, annotations=None, split: str = "test", device="auto",
                        threshold: float = 0.5, candidates: CandidateRule | None = None, n_bootstrap: int = 1000,
                        seed: int = 0, title: str = "AH-Net per-type evaluation", rescore: bool = False,
                        rescore_any_rule: bool = False, groups: dict | None = None,
                        max_scan_voxels: int | None = None, inplane_spacing="auto", **predict_kw) -> dict:
    """Evaluate ``runs`` on the ``split`` cases of dataset.json ``data`` and write candidates and the report into
    ``out``; returns the report dict. Every option, run, the annotations and the scans are checked before the
    first prediction, and nothing is written before then. threshold: the masks'; candidates: the candidate rule
    (None = ahnet.infer.DEFAULT_RULE); rescore: each run's candidates rescored by its second stage
    (ahnet.infer.second_stage; the CSVs keep the first stage's score as probability_stage1). ``predict_kw``: window,
    overlap, sw_batch (ahnet.infer.WindowSettings, checked first), tta, amp, channels_last (predict_volume).
    groups: {model: [run names]} for models trained several times (seeds): the comparisons and claims are the
    models', over seeds and scans. max_scan_voxels: the voxels of the split's scans together (default:
    evaluation_limit from the memory available). inplane_spacing: auto, native or mm (ahnet.infer.spacing): the
    pixel spacing each run predicts the scans at, its maps brought back to their grids for the masks."""
    out = failures.check_output_dir(out, "--out")
    windows = WindowSettings.take(predict_kw)
    device = resolve_device(device)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold {threshold} must be a probability in [0, 1]")
    if int(n_bootstrap) < 0:
        raise ValueError(f"--bootstrap {n_bootstrap} must be >= 0 (0 = no intervals)")
    rule = candidate_rule(candidates)
    inplanes = {}
    for name, run in zip(run_names(runs), runs):                # each run loads and takes the window and --amp
        ens = load_ensemble([run], device)
        ens.check(windows.window, predict_kw.get("amp", "auto"))
        inplanes[name] = resolve_inplane(inplane_spacing, ens)
    rescorers = {name: load_run_rescorer(run, device, rule, rescore_any_rule)
                 for name, run in zip(run_names(runs), runs)} if rescore else None
    ann_csv = Path(annotations) if annotations else paths.annotations_csv(data)
    ann = read_annotations_csv(ann_csv, [e["case_id"] for e in load_dataset_json(data)], data)
    # one run's maps in memory at a time (ahnet.evaluate.store.evaluate_runs), however many runs
    cases, images = load_cases(data, split, ann, ann_csv, evaluation_limit(1, max_scan_voxels),
                               inplanes=list(inplanes.values()))
    with folder_lock(out, "--out"):                             # one evaluation at a time writes into --out
        remove_temps(out, recursive=True, only_dead=False)
        results = evaluate_runs(runs, cases, images, ann, out, device, threshold, rule, n_bootstrap, seed, rescorers,
                                {**windows.kwargs(), **predict_kw}, inplanes)
        stage1 = ["probability_stage1"] if rescorers else []
        csvs = {paths.report_candidates(out, name).relative_to(out): candidates_csv_text(r["candidates"], stage1)
                for name, r in results.items()}                 # written with the report, all or none
        rep = build_report({k: {"detection": v["detection"], "segmentation": v["segmentation"]}
                            for k, v in results.items()}, out, title=title,
                           comparisons=compare_models(results, cases, ann, n_bootstrap=n_bootstrap, seed=seed,
                                                      groups=groups),
                           stages=compare_stages(results, cases, ann, n_bootstrap=n_bootstrap, seed=seed,
                                                 groups=groups) if rescorers else None,
                           runs=dict(zip(run_names(runs), runs)), gallery=gallery_crops(results, cases, images, ann),
                           candidates=rule.describe() + (SECOND_STAGE if rescorers else ""), extra_files=csvs)
    print_summary(rep, out)
    return rep


def print_summary(rep: dict, out: Path) -> None:
    """Each model's CPM, interval, types won and nodules found, the claim's sentence and where the report is."""
    for m in rep["model_order"]:
        r = rep["models"][m]
        print(f"{m}: CPM {r['cpm']}  CI {r['cpm_ci']}  types won {rep['wins'][m]}/{len(rep['types'])}")
        if r["found"]:
            print("  " + found_line(m, r["found"]))
    if claim_sentence(rep["comparisons"]):
        print(claim_sentence(rep["comparisons"]))
    print(f"report: {out / paths.REPORT_HTML}")


# options that only a prediction reads (the candidate rule's too)
PREDICTING = ("threshold", "window", "overlap", "sw_batch", "inplane_spacing", "tta", "amp", "channels_last",
              "rescore", "rescore_any_rule", "device", "max_scan_voxels", "candidates", "candidate_threshold",
              "min_distance_mm", "max_candidates")


def _predicting_options(a) -> list:
    """The flags of ``a`` given away from the parser's defaults that only a prediction reads."""
    parser = build_parser()
    return ["--" + d.replace("_", "-") for d in PREDICTING if getattr(a, d) != parser.get_default(d)]


def report_from_candidates(folder, data, out, annotations=None, split: str = "test", n_bootstrap: int = 1000,
                           seed: int = 0, title: str = "AH-Net per-type evaluation", group_seeds: bool = False,
                           predicting=()) -> dict:
    """The detection report (no Dice: masks are not kept) of the candidate files in ``folder`` (<run>.csv or
    <run>.csv.gz, LUNA16 rows in world mm) on the ``split`` scans of dataset.json ``data``: each run's FROC and
    CPM, paired comparisons, and with ``probability_stage1`` in every row each first stage beside its system.
    ``group_seeds``: runs <model>-seed<k> are compared as trainings of <model> (ahnet.paths.ExperimentPaths.run).
    Checked before any computation: the folder, the files, every row's scan in the split."""
    if predicting:
        raise ValueError(f"{', '.join(predicting)}: no effect with --from-candidates (nothing is predicted)")
    out = failures.check_output_dir(out, "--out")
    cands = _read_candidate_folder(Path(folder))
    ann_csv = Path(annotations) if annotations else paths.annotations_csv(data)
    entries = load_dataset_json(data)
    ann = read_annotations_csv(ann_csv, [e["case_id"] for e in entries], data)
    cases = [{"case_id": e["case_id"]} for e in entries if e.get("split") == split]
    if not cases:
        raise ValueError(f"{data}: no case in split {split!r}")
    known = {c["case_id"] for c in cases}
    for name, rows in cands.items():
        stray = sorted({str(r["seriesuid"]) for r in rows} - known)
        if stray:
            raise ValueError(f"{folder}/{name}: candidates on {len(stray)} scan(s) not in split {split!r} of {data} "
                             f"(first: {stray[0]}); candidates of another set?")
    groups = _seed_groups(list(cands)) if group_seeds else None
    scan_ids = [c["case_id"] for c in cases]
    ann_split = [a for a in ann if str(a["seriesuid"]) in known]
    results = {k: summarise_run(rows, [], ann_split, scan_ids, n_bootstrap=n_bootstrap, seed=seed)
               for k, rows in cands.items()}
    comparisons = compare_models(results, cases, ann, n_bootstrap=n_bootstrap, seed=seed, groups=groups)
    stages = compare_stages(results, cases, ann, n_bootstrap=n_bootstrap, seed=seed, groups=groups)
    with folder_lock(out, "--out"):
        remove_temps(out, recursive=True, only_dead=False)
        rep = build_report({k: {"detection": v["detection"], "segmentation": None} for k, v in results.items()},
                           out, title=title, comparisons=comparisons, stages=stages,
                           candidates=f"read from {folder} (no prediction)")
    print_summary(rep, out)
    return rep


def _read_candidate_folder(folder: Path) -> dict:
    """{run name: candidate rows} of every <run>.csv and <run>.csv.gz in ``folder``, in _run_order; ValueError
    when it holds none or the same run twice."""
    if not folder.is_dir():
        raise ValueError(f"--from-candidates {folder}: not a folder")
    files = sorted(folder.glob("*.csv")) + sorted(folder.glob("*.csv.gz"))
    names = [f.name[:-len(".csv.gz")] if f.name.endswith(".gz") else f.stem for f in files]
    if not files:
        raise ValueError(f"--from-candidates {folder}: no <run>.csv or <run>.csv.gz in it")
    if len(set(names)) < len(names):
        raise ValueError(f"--from-candidates {folder}: a run with both a .csv and a .csv.gz file")
    return {n: read_candidates_csv(f) for n, f in sorted(zip(names, files), key=lambda nf: _run_order(nf[0]))}


def _run_order(name: str) -> tuple:
    """Where a run goes in the report: the experiment's variant order (presets.ALL_VARIANTS), then other models by
    name, each model's runs by seed. The hierarchical bootstrap draws each model's seeds in this order, so a
    report of an experiment's candidates gets the experiment's own intervals."""
    variant, k = paths.ExperimentPaths.run_seed(name)
    known = ALL_VARIANTS.index(variant) if variant in ALL_VARIANTS else len(ALL_VARIANTS)
    return known, variant, k


def _seed_groups(names: list) -> dict:
    """{model: [its runs]} from run names (<model>, <model>-seed<k>); ValueError when models differ in seeds."""
    groups: dict = {}
    for n in names:
        groups.setdefault(paths.ExperimentPaths.run_seed(n)[0], []).append(n)
    counts = {m: len(rs) for m, rs in groups.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"--group-seeds: the models hold different numbers of runs ({counts}); compare "
                         "models trained as often")
    return groups


if __name__ == "__main__":
    sys.exit(main())
