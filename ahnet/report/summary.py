"""The per-type comparison's numbers: who wins each type, nodule location and the whole (``summarize``).

Input: ``results = {model_name: {"detection": <ahnet.evaluate.froc.evaluate_detection dict>,
"segmentation": <ahnet.evaluate.segmetrics.aggregate_seg dict or None>}}`` (all models on the same test scans).

Winners: on each type the best model is the one with the highest per-type CPM (point estimate). Models whose
CPM is within ``tie_tol`` (1e-9) of the best are tied: all of them are listed as winners of that type and each
one's ``wins`` count includes it (``wins_outright`` counts only types won alone). A type with no nodules (or no
model with a defined CPM on it) has no winner and counts for nobody. ``margin`` = best CPM minus the best CPM of
the models not among the winners (None when there is no such model). The same rule gives the overall winner.
Note that winners are point estimates; the intervals in the tables say whether a difference is resolved.
"""
from __future__ import annotations

import numpy as np

from ahnet.data.nodule_types import LOCATIONS, TYPE_CODES, TYPE_NAMES
from ahnet.report.claims import found_summary, summarize_comparisons
from ahnet.report.stages import summarize_stages
from ahnet.report.gallery import gallery_json

TIE_TOL = 1e-9


class ReportInputError(ValueError):
    """Results that the report cannot be built from."""


def _seg(seg, group_key, label):
    if not seg:
        return None, None
    s = seg["overall"] if label is None else seg.get("groups", {}).get(group_key, {}).get(label)
    if not s:
        return None, None
    return s.get("dice"), s.get("hd95_mm")


def _group_entry(det_group, seg, key, label):
    g = det_group or {}
    dice, hd = _seg(seg, key, label)
    return {"n": int(g.get("n", 0)), "sensitivity": g.get("sensitivity"), "sensitivity_ci": g.get("sensitivity_ci"),
            "cpm": g.get("cpm"), "cpm_ci": g.get("cpm_ci"), "dice": dice, "hd95_mm": hd}


def pick_winners(scores: dict, tie_tol: float = TIE_TOL) -> dict:
    """{model: score or None} -> {"models": [best, tied...], "score", "tie", "margin"} by the module's rule."""
    valid = {m: s for m, s in scores.items() if s is not None and np.isfinite(s)}
    if not valid:
        return {"models": [], "score": None, "tie": False, "margin": None}
    best = max(valid.values())
    if best <= 0:   # nobody detects this type: no model "wins" it
        return {"models": [], "score": float(best), "tie": False, "margin": None}
    win = sorted(m for m, s in valid.items() if best - s <= tie_tol)
    rest = [s for m, s in valid.items() if m not in win]
    return {"models": win, "score": float(best), "tie": len(win) > 1,
            "margin": float(best - max(rest)) if rest else None}


def summarize(results: dict, types=TYPE_CODES, locations=LOCATIONS, tie_tol: float = TIE_TOL,
              comparisons: dict | None = None, curves: dict | None = None, gallery: dict | None = None,
              candidates: str | None = None, stages: dict | None = None) -> dict:
    """The report.json content (see the module docstring for the winner and tie rules and the optional parts;
    ``stages``: ahnet.evaluate.compare_stages's result, the first stages beside the systems)."""
    if not results:
        raise ReportInputError("results is empty; give {model_name: {'detection': ..., 'segmentation': ...}}")
    fp_rates = None
    models = {}
    for name, r in results.items():
        det = r.get("detection") if isinstance(r, dict) else None
        if not det or "cpm" not in det:
            raise ReportInputError(f"results[{name!r}] needs a 'detection' dict from ahnet.evaluate.froc.evaluate_detection")
        if fp_rates is None:
            fp_rates = det["fp_rates"]
        elif list(det["fp_rates"]) != list(fp_rates):
            raise ReportInputError(f"results[{name!r}] uses fp_rates {det['fp_rates']}; the others use {fp_rates}")
        seg = r.get("segmentation")
        dice, hd = _seg(seg, None, None)
        groups = det.get("groups", {})
        present_locs = [l for l in locations if l in groups.get("location", {})]
        present_locs += sorted(set(groups.get("location", {})) - set(locations))
        models[name] = {
            "n_scans": det["n_scans"], "n_nodules": det["n_nodules"], "cpm": det["cpm"], "cpm_ci": det["cpm_ci"],
            "sensitivity": det["sensitivity"], "sensitivity_ci": det["sensitivity_ci"], "dice": dice, "hd95_mm": hd,
            "counts": det.get("counts"), "found": found_summary(det, types),
            "types": {t: _group_entry(groups.get("type", {}).get(t), seg, "type", t) for t in types},
            "locations": {l: _group_entry(groups.get("location", {}).get(l), seg, "location", l)
                          for l in present_locs},
            "froc": det.get("froc"), "froc_band": det.get("froc_band")}
    names = list(models)
    n_scans = {models[m]["n_scans"] for m in names}
    winners = {t: pick_winners({m: models[m]["types"][t]["cpm"] for m in names}, tie_tol) for t in types}
    wins = {m: sum(m in w["models"] for w in winners.values()) for m in names}
    outright = {m: sum(w["models"] == [m] for w in winners.values()) for m in names}
    return {"version": 1, "fp_rates": list(fp_rates), "types": list(types),
            "type_names": {t: TYPE_NAMES.get(t, t) for t in types}, "model_order": names,
            "same_scan_count": len(n_scans) == 1, "models": models, "winners": winners, "wins": wins,
            "wins_outright": outright, "n_types_with_winner": sum(bool(w["models"]) for w in winners.values()),
            "overall_winner": pick_winners({m: models[m]["cpm"] for m in names}, tie_tol),
            "candidates": candidates, "comparisons": summarize_comparisons(comparisons, types, locations),
            "stages": summarize_stages(stages),
            "learning_curves": curves or {}, "gallery": gallery_json(gallery),
            "rules": {"winner": "highest per-type CPM (point estimate); ties within %g share the type and each "
                                "counts it in wins; no nodules, or every model at 0 -> no winner" % tie_tol,
                      "ci": "percentile bootstrap over scans (detection) / nodules (Dice)"}}
