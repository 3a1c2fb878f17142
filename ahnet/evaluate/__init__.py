"""Evaluation of trained runs on a dataset split: detection (FROC / CPM per type and location) and segmentation
(Dice / HD95 per nodule), ready for the report (ahnet.report; ``python -m ahnet.evaluate`` does both).

For each run (``--runs``; a cross-validation ``X`` = the ensemble of its ``X-fold<k>`` runs): the model(s) through
the inference stage (ahnet.infer: load_ensemble, predict_volume with its window rule) on every case of the chosen
split (HU clipped to [-1000, 400] and scaled to [0, 1] as the cache does; each scan resampled in-plane to the
run's training spacing where it differs, ahnet.infer.spacing, the maps brought back to its own grid); then candidates
(ahnet.infer.candidates, by a CandidateRule, default DEFAULT_RULE) in world mm, FROC/CPM per type and location
(ahnet.evaluate.froc) against the dataset's annotations and Dice/HD95 per nodule (ahnet.evaluate.segmetrics, mask = probability >=
threshold, nodule k = instance label k of the label file, joined to the annotation row whose ``label`` is k).
Between models: ``compare_models`` (paired bootstrap CPM differences on the same scan resamples); for the eye:
``gallery_crops`` (module ``gallery``: hits, misses and false positives as crops).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ahnet.data.budget import BYTES_PER_VOXEL, ScanLimit, scan_limit
from ahnet.data.checks import check_inside
from ahnet.data.header import read_header
from ahnet.data.io import load_dataset_json, read_image, read_scan
from ahnet.data.preprocess import clip_and_scale
from ahnet.evaluate.froc import evaluate_detection, paired_bootstrap
from ahnet.infer import CandidateRule, candidate_rule, extract_candidates, load_ensemble, predict_volume
from ahnet.infer.second_stage import rescore_candidates
from ahnet.infer.spacing import PredictionGrid, prediction_voxels
from ahnet.evaluate.segmetrics import aggregate_seg, nodule_seg_metrics
from ahnet.evaluate.crops import gallery_crops

__all__ = ["EvaluateInputError", "evaluation_limit", "check_split_size", "load_cases", "run_names",
           "predict_run_rows", "evaluate_predictions", "run_rows", "case_rows", "case_seg_rows", "summarise_run",
           "compare_models", "compare_stages", "gallery_crops"]


#: mm of margin around each nodule's box in which its segmentation metrics are computed (segmetrics)
SEG_MARGIN_MM = 5.0


class EvaluateInputError(ValueError):
    """A run folder, dataset or option that the evaluation cannot use."""


def evaluation_limit(n_runs: int = 1, override: int | None = None) -> ScanLimit:
    """The ScanLimit of an evaluation of ``n_runs`` runs (from the memory available, or ``override`` voxels of the
    split's scans together): per voxel of every scan it keeps the geometry, scaled image and label, and one
    probability map per run (ahnet.data.budget.BYTES_PER_VOXEL)."""
    bpv = BYTES_PER_VOXEL["evaluate_held"] + BYTES_PER_VOXEL["evaluate_per_run"] * max(1, int(n_runs))
    return scan_limit("evaluate", override, bytes_per_voxel=bpv)


def check_split_size(entries, limit: ScanLimit, what: str, inplanes=()) -> None:
    """The headers of every entry's image and label against ``limit`` before any scan is read: an evaluation
    holds every scan at once (limit.bytes_per_voxel each) and the one it predicts twice over (evaluate_in_hand),
    at the largest of its own grid and its prediction grids at ``inplanes`` ((sy, sx) mm or None each)."""
    heads = [read_header(e["image"]) for e in entries]
    total = sum(h.voxels for h in heads)
    work = [prediction_voxels(h, inplanes) for h in heads]
    i = max(range(len(heads)), key=lambda k: work[k])
    biggest, in_hand = heads[i], BYTES_PER_VOXEL["evaluate_in_hand"]
    grid = f", predicted on {work[i]:.3g} voxels" if work[i] > biggest.voxels else ""
    limit.check(biggest, total, f"{what}: its {len(heads)} scan(s) hold {total:.3g} voxels together (the largest "
                                f"{biggest.path.name}, {biggest.describe()}{grid}) and the evaluation keeps them all",
                need=total * limit.bytes_per_voxel + work[i] * in_hand,
                how=f"{limit.bytes_per_voxel:g} B per voxel of them all and {in_hand:g} more of the one it predicts")
    for e in entries:
        if e.get("label"):
            limit.check(read_header(e["label"]))


def load_cases(dataset_json, split: str = "test", annotations: list | None = None,
               annotations_csv=None, limit: ScanLimit | None = None, inplanes=()) -> tuple[list, dict]:
    """(cases, images) of one split of a dataset.json: cases [{"case_id", "geometry" (the image Volume),
    "label" ((z, y, x) int32 instance mask or None)}], images {case_id: (z, y, x) float32 scaled to [0, 1]}.
    The headers first: the split's voxels together against ``limit`` (default: evaluation_limit() of one run).
    Each scan is checked for sense as CT (ahnet.data.checks); with ``annotations`` (rows of ``annotations_csv``),
    each case's nodules must lie inside its scan. ``inplanes``: the in-plane spacings the runs predict at
    (ahnet.infer.spacing), so the scan in hand is counted at its largest prediction grid."""
    entries = [e for e in load_dataset_json(dataset_json) if e.get("split") == split]
    if not entries:
        raise EvaluateInputError(f"{dataset_json} has no case with split {split!r}")
    limit = limit or evaluation_limit()
    check_split_size(entries, limit, f"split {split!r} of {dataset_json}", inplanes)
    cases, images = [], {}
    for e in entries:
        vol = read_scan(e["image"], limit=limit)
        if annotations is not None:
            check_inside([a for a in annotations if str(a["seriesuid"]) == e["case_id"]], vol, e["case_id"],
                         annotations_csv)
        lab = read_image(e["label"], limit=limit).array.astype(np.int32) if e.get("label") else None
        images[e["case_id"]] = clip_and_scale(vol.array)
        cases.append({"case_id": e["case_id"], "geometry": vol, "label": lab})
    return cases, images


def run_names(runs) -> list[str]:
    """The report's model names: each run's folder name (EvaluateInputError when two are the same)."""
    names = [Path(r).name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvaluateInputError(f"two runs are named {dup[0]!r}; give run folders with distinct names")
    return names


def predict_run_rows(run, cases: list, images: dict, ann: list, device="cpu", threshold: float = 0.5,
                     rule: CandidateRule | None = None, margin_mm: float = SEG_MARGIN_MM, rescorer=None,
                     inplane: tuple | None = None, **predict_kw) -> tuple[list, list]:
    """One run's (candidate rows, per-nodule segmentation rows) on ``cases`` (load_cases; ``images`` their scans
    scaled to [0, 1]), one case's maps in memory at a time: the run (a run folder, checkpoint or cross-validation)
    as one ensemble through predict_volume (``predict_kw``: window, overlap, sw_batch, tta, amp, channels_last) on
    each scan resampled in-plane to ``inplane`` (sy, sx) mm (ahnet.infer.spacing; None: its own grid); candidates
    and the second stage ``rescorer`` on that grid, the mask and Dice on the scan's (run_rows' rules)."""
    ens = load_ensemble([run], device)
    cands, seg_rows = [], []
    for c in cases:
        grid = PredictionGrid.for_scan(c["geometry"], inplane)
        work = grid.working(images[c["case_id"]])
        prob = predict_volume(ens, work.array, **predict_kw)
        found, segs = case_rows(prob, work.array, work, grid.to_native(prob), c, ann, threshold,
                                candidate_rule(rule), margin_mm, rescorer)
        cands += found
        seg_rows += segs
        print(f"[evaluate] {Path(run).name}: {c['case_id']} done", file=sys.stderr)
    return cands, seg_rows


def evaluate_predictions(probs: dict, cases: list, annotations: list, threshold: float = 0.5,
                         candidates: CandidateRule | str | None = None, n_bootstrap: int = 1000, seed: int = 0,
                         margin_mm: float = SEG_MARGIN_MM, rescorers: dict | None = None,
                         images: dict | None = None) -> dict:
    """Detection and segmentation results per model, ready for ahnet.report.build_report.

    probs: {model: {case_id: (z, y, x) probabilities}}; cases: [{"case_id", "geometry" (spacing, origin,
    direction [, voxel_to_world]), "label" ((z, y, x) instance mask or None)}]; annotations: LUNA16 rows with
    ``type``, ``location`` and ``label`` (instance label in the case's mask) where known. threshold: the
    segmentation mask's; candidates: the CandidateRule (or a method name; None = DEFAULT_RULE). rescorers:
    {model: ahnet.infer.second_stage.Rescorer} whose candidates the second stage rescores, with ``images`` {case_id:
    (z, y, x) scan scaled to [0, 1]} to crop from.
    Returns {model: {"detection", "segmentation", "candidates", "seg_rows"}}.
    """
    rule = candidate_rule(method=candidates) if isinstance(candidates, str) else candidate_rule(candidates)
    scan_ids = [c["case_id"] for c in cases]
    known = set(scan_ids)
    ann = [a for a in annotations if str(a["seriesuid"]) in known]
    out = {}
    for name, by_case in probs.items():
        missing = [s for s in scan_ids if s not in by_case]
        if missing:
            raise EvaluateInputError(f"model {name!r} has no prediction for cases {missing[:3]}")
        cands, seg_rows = run_rows(by_case, cases, ann, threshold, rule, margin_mm, (rescorers or {}).get(name),
                                   images)
        out[name] = summarise_run(cands, seg_rows, ann, scan_ids, n_bootstrap, seed)
    return out


def run_rows(by_case: dict, cases: list, ann: list, threshold: float, rule: CandidateRule,
             margin_mm: float = SEG_MARGIN_MM, rescorer=None, images: dict | None = None) -> tuple[list, list]:
    """One model's (candidate rows, per-nodule segmentation rows) from its maps {case_id: (z, y, x)
    probabilities} (evaluate_predictions' arguments; ``rescorer``: its second stage, or None)."""
    cands, seg_rows = [], []
    for c in cases:
        p = by_case[c["case_id"]]
        image = images[c["case_id"]] if rescorer is not None else None
        found, segs = case_rows(p, image, c["geometry"], p, c, ann, threshold, rule, margin_mm, rescorer)
        cands += found
        seg_rows += segs
    return cands, seg_rows


def case_rows(prob: np.ndarray, image, geometry, native_prob: np.ndarray, case: dict, ann: list, threshold: float,
              rule: CandidateRule, margin_mm: float = SEG_MARGIN_MM, rescorer=None) -> tuple[list, list]:
    """One case's (candidate rows, segmentation rows): candidates from ``prob`` on the grid of ``geometry`` (the
    grid it was predicted on), rescored by ``rescorer`` from ``image`` on that grid when given; segmentation rows
    from ``native_prob``, the map on the case's own grid (case_seg_rows)."""
    found = extract_candidates(prob, geometry, seriesuid=case["case_id"], rule=rule)
    if rescorer is not None:
        found = rescore_candidates(rescorer, found, image, prob, geometry)
    return found, case_seg_rows(native_prob, case, ann, threshold, margin_mm)


def case_seg_rows(prob: np.ndarray, case: dict, ann: list, threshold: float,
                  margin_mm: float = SEG_MARGIN_MM) -> list:
    """Per-nodule segmentation rows of one case (load_cases' dict) from its (z, y, x) probabilities on its own
    grid: mask = prob >= threshold against each annotated nodule's instance label; [] without a label."""
    if case.get("label") is None:
        return []
    rows = [a for a in ann if str(a["seriesuid"]) == case["case_id"] and a.get("label") not in (None, "")]
    if not rows:
        return []
    res = nodule_seg_metrics(prob >= threshold, case["label"], case["geometry"].spacing, margin_mm=margin_mm,
                             labels=[int(a["label"]) for a in rows])
    return [dict(r, seriesuid=case["case_id"], type=a.get("type"), location=a.get("location"))
            for a, r in zip(rows, res)]


def summarise_run(cands: list, seg_rows: list, ann: list, scan_ids: list, n_bootstrap: int = 1000,
                  seed: int = 0) -> dict:
    """{"detection", "segmentation", "candidates", "seg_rows"} of one model from its rows (the split's
    annotations ``ann``, its scans ``scan_ids``)."""
    return {"detection": evaluate_detection(ann, cands, scan_ids, n_bootstrap=n_bootstrap, seed=seed),
            "segmentation": aggregate_seg(seg_rows, n_bootstrap=n_bootstrap, seed=seed) if seg_rows else None,
            "candidates": cands, "seg_rows": seg_rows}


def compare_models(results: dict, cases: list, annotations: list, n_bootstrap: int = 1000,
                   seed: int = 0, groups: dict | None = None) -> dict | None:
    """Paired comparisons of every pair of models (ahnet.evaluate.froc.paired_bootstrap on their candidates, on the
    scan resamples of each model's own intervals); None with fewer than two models. ``groups`` {model: [run
    names of results]}: models trained several times (seeds), compared by the bootstrap over seeds and scans
    together; None: every run a model of its own."""
    if groups is None:
        cands = {k: v["candidates"] for k, v in results.items()}
    else:
        cands = {m: {r: results[r]["candidates"] for r in rs} for m, rs in groups.items()}
    if len(cands) < 2:
        return None
    return _paired(cands, cases, annotations, n_bootstrap, seed)


def _paired(cands: dict, cases: list, annotations: list, n_bootstrap: int, seed: int) -> dict:
    """paired_bootstrap of ``cands`` on the cases' scans and the annotations of those scans."""
    scan_ids = [c["case_id"] for c in cases]
    known = set(scan_ids)
    ann = [a for a in annotations if str(a["seriesuid"]) in known]
    return paired_bootstrap(ann, cands, scan_ids, n_bootstrap=n_bootstrap, seed=seed)


FIRST = ":first"          # suffix of a model's first-stage entry in compare_stages


def compare_stages(results: dict, cases: list, annotations: list, n_bootstrap: int = 1000, seed: int = 0,
                   groups: dict | None = None) -> dict | None:
    """Each model's first stage alone beside its system, when a second stage rescored every run (each candidate
    row keeps the first stage's score as ``probability_stage1``): one paired_bootstrap over every system and
    every first stage (``<model>:first``), on the scan resamples of compare_models, so "system - first" and the
    first stages' own pairs come with paired intervals. ``groups`` as for compare_models. None when some row has
    no first-stage score (no second stage) or no run has a candidate."""
    rows = [c for r in results.values() for c in r["candidates"]]
    if not rows or any("probability_stage1" not in c for c in rows):
        return None
    first = {k: [dict(c, probability=c["probability_stage1"]) for c in v["candidates"]] for k, v in results.items()}
    if groups is None:
        cands = {**{k: v["candidates"] for k, v in results.items()}, **{k + FIRST: first[k] for k in results}}
    else:
        cands = {**{m: {r: results[r]["candidates"] for r in rs} for m, rs in groups.items()},
                 **{m + FIRST: {r: first[r] for r in rs} for m, rs in groups.items()}}
    return _paired(cands, cases, annotations, n_bootstrap, seed)
