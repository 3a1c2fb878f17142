"""Models on several renderings of the same scans (slice spacings, shifted sets, one lever's sets against its
base's): each model's CPM on every set, overall and per composition group; how a model moves from the first set
(the reference) to each other; the paired differences between models on each set and how a difference moves from
the reference set (an interaction, (a - b on s) - (a - b on s0)), all paired by scan.

One bootstrap for everything: each resample draws the scans once (bootstrap_weights(n_scans, B, seed), the same
draws on every set, since the scans are the same) and, for a model trained several times, its runs (a resample of
its seeds, drawn with replacement, per set: seed k on one set and seed k on another may be unrelated trainings).
A difference's interval is the percentile interval of its per-resample values; resamples without a nodule of a
group are left out of that group.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from ahnet.data.nodule_types import TYPE_CODES
from ahnet.evaluate.froc import (FP_RATES, FROCInputError, bootstrap_weights, cpm_draws, match_candidates,
                                 percentile_interval, point_cpm, seed_level)

#: the four composition groups reported beside the overall CPM (types: ahnet.data.nodule_types)
TYPE_GROUPS: Dict[str, Tuple[str, ...]] = {
    "solid": ("T01", "T02", "T03", "T04", "T05", "T06"),
    "part-solid": ("T07", "T08"),
    "ground-glass": ("T09", "T10"),
    "calcified": ("T11", "T12"),
}
GROUP_KEY = "composition"
OVERALL = "overall"

assert sorted(t for g in TYPE_GROUPS.values() for t in g) == list(TYPE_CODES)


def composition(type_code) -> str | None:
    """The composition group of a nodule type code ('T01'..'T12'); None for an unknown or missing code."""
    for group, codes in TYPE_GROUPS.items():
        if type_code in codes:
            return group
    return None


def with_composition(nodules: Sequence[dict]) -> List[dict]:
    """Copies of the annotation rows with their composition group under GROUP_KEY (from their 'type')."""
    return [dict(n, **{GROUP_KEY: composition(n.get("type"))}) for n in nodules]


def _estimate(point: float, draws: np.ndarray, confidence: float, difference: bool) -> dict:
    """{"value", "ci"} (+ "decided": the interval excludes 0, for a difference)."""
    value = None if np.isnan(point) else float(point)
    out = {"value": value, "ci": percentile_interval(draws, confidence) if draws.size else None}
    if difference:
        out["decided"] = bool(out["ci"] is not None and value is not None and (out["ci"][0] > 0 or out["ci"][1] < 0))
    return out


def _model_on_set(nodules, runs: dict, scan_ids, W: np.ndarray, rng, fp_rates, chunk: int) -> Dict[str, tuple]:
    """{group: (point CPM, (B,) draws)} of one model's runs {run: candidate rows} on one set: the point the mean
    over its runs, each resample the mean over a resample of its runs (froc.seed_level; one run: its draws)."""
    names = sorted(runs)
    rows = with_composition(nodules)
    match = [match_candidates(rows, runs[r], scan_ids, group_keys=(GROUP_KEY,)) for r in names]
    labels = match[0].nod_groups[GROUP_KEY]
    masks = {OVERALL: np.ones(labels.size, bool), **{g: labels == g for g in TYPE_GROUPS}}
    points = [point_cpm(m, fp_rates, masks) for m in match]
    draws = seed_level([cpm_draws(m, W, fp_rates, masks, chunk) for m in match], rng, W.shape[0])
    return {g: (float(np.mean([p[g] for p in points])), draws[g]) for g in masks}


def across_sets(sets: Dict[str, tuple], models: Dict[str, List[str]], pairs: Sequence[Tuple[str, str]],
                n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95, fp_rates=FP_RATES,
                chunk: int = 200, what: str = "set") -> dict:
    """sets: {label: (annotations, {run name: candidate rows}, scan ids)} in order, the first the reference, the
    same scan ids in each; models: {model: [its run names]} (the same names on every set); pairs: [(a, b)] the
    differences a - b; ``what`` names a set in messages ("slice spacing").

    Returns {"sets", "models", "groups", "n_scans", "n_bootstrap", "seed", "confidence",
    "runs_per_model": {model: n}, "cpm": {set: {model: {group: E}}}, "change": {set: {model: {group: D}}},
    "pairs": [{"a", "b", "by_set": {set: {group: D}}, "interaction": {set: {group: D}}}]};
    E = {"value", "ci"}, D = E + {"decided"}; for every set s after the first, s0:
    change[s][m] = m on s - m on s0 and interaction[s] = (a - b on s) - (a - b on s0).
    """
    labels = [str(s) for s in sets]
    if len(labels) < 2:
        raise FROCInputError(f"the comparison needs two or more {what}s; got {labels}")
    first, *rest = list(sets)
    scans = [str(s) for s in sets[first][2]]
    for s in rest:
        if [str(x) for x in sets[s][2]] != scans:
            raise FROCInputError(f"the {what} {s} holds other scans than {first}; the comparison pairs the same "
                                 f"scans on every {what}")
    for a, b in pairs:
        if a not in models or b not in models:
            raise FROCInputError(f"pair {a} - {b}: both must be among the models {sorted(models)}")
    W = bootstrap_weights(len(scans), n_bootstrap, seed) if n_bootstrap else np.zeros((0, len(scans)))
    rng = np.random.default_rng([int(seed), 1])
    est = {s: {m: _model_on_set(sets[s][0], {r: sets[s][1][r] for r in runs}, scans, W, rng, fp_rates, chunk)
               for m, runs in models.items()} for s in sets}
    groups = [OVERALL, *TYPE_GROUPS]

    def diff(s, a, b, g):
        return est[s][a][g][0] - est[s][b][g][0], est[s][a][g][1] - est[s][b][g][1]

    def moved(s, a, b, g):
        (p1, d1), (p0, d0) = diff(s, a, b, g), diff(first, a, b, g)
        return _estimate(p1 - p0, d1 - d0, confidence, True)

    out_pairs = [{"a": a, "b": b,
                  "by_set": {str(s): {g: _estimate(*diff(s, a, b, g), confidence, True) for g in groups}
                             for s in sets},
                  "interaction": {str(s): {g: moved(s, a, b, g) for g in groups} for s in rest}}
                 for a, b in pairs]
    change = {str(s): {m: {g: _estimate(est[s][m][g][0] - est[first][m][g][0],
                                        est[s][m][g][1] - est[first][m][g][1], confidence, True)
                           for g in groups} for m in models} for s in rest}
    return {"sets": labels, "models": list(models), "groups": groups, "n_scans": len(scans),
            "n_bootstrap": int(n_bootstrap), "seed": int(seed), "confidence": confidence,
            "cpm": {str(s): {m: {g: _estimate(*est[s][m][g], confidence, False) for g in groups}
                             for m in models} for s in sets},
            "runs_per_model": {m: len(runs) for m, runs in models.items()}, "change": change, "pairs": out_pairs}
