"""FROC analysis and CPM by the LUNA16 rules, with a scan-level bootstrap and per-group sensitivities.

Inputs are plain rows (dicts, as csv.DictReader gives them; values may be strings):
- nodules (annotations): ``seriesuid, coordX, coordY, coordZ, diameter_mm`` (world LPS mm), optional ``type``,
  ``location`` (or any other grouping key) and an irrelevant flag (column name ``irrelevant_key``; truthy values
  are True, 1, "1", "true", "yes"; a missing column means relevant).
- candidates: ``seriesuid, coordX, coordY, coordZ, probability``.
- scan_ids: every scan of the evaluated set, including scans without nodules and scans without candidates
  (they count in the false-positive rate). A row naming a scan not in ``scan_ids`` is an error.

Matching rules (the LUNA16 evaluation script's, with the differences stated):
- A candidate hits a nodule when its Euclidean distance to the nodule's centre is <= diameter / 2. Inclusive:
  a candidate exactly on the radius hits (the LUNA16 script uses a strict ``<``; the project's protocol says
  "at most the radius").
- Several hits on one relevant nodule count once, with the highest probability (the others are neither TP nor
  FP; their number is reported as ``duplicates``).
- A candidate within the radius of two or more relevant nodules counts as a hit for each of them (as the LUNA16
  script does; reported as ``multi_hits``).
- A candidate that hits no relevant nodule but hits an irrelevant one is dropped (neither TP nor FP; reported
  as ``dropped``). A candidate that hits a relevant nodule is a hit even if it also hits an irrelevant one.
- Every other candidate is a false positive. Missed relevant nodules count in the sensitivity's denominator.

The FROC curve has one vertex per distinct probability (thresholds descending; candidates with equal probability
enter together), starting at (0 FP/scan, 0). Sensitivity at an FP rate f is the linear interpolation between
the last vertex with FP/scan <= f and the next one (that is ``np.interp`` over the curve, as LUNA16 does, with
a vertical segment read at its top); beyond the last vertex the last sensitivity is held (as ``np.interp``).
CPM is the mean sensitivity at FP_RATES. The per-group sensitivity at f uses the same two vertices and weight,
i.e. the operating threshold set by the whole set's false positives (false positives have no type).

Bootstrap: ``n_bootstrap`` resamples of the scans with replacement (numpy ``default_rng(seed)``); each statistic
is recomputed per resample and the interval is the (1-confidence)/2 and (1+confidence)/2 percentiles. The point
estimate is the statistic on the full set (not the bootstrap mean). A group whose resample holds no nodule of
that group has no sensitivity in that resample; that resample is left out of that group's interval (the number
of resamples used is reported as ``n_bootstrap_used``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
_TRUE = {"1", "true", "yes", "y", "t"}


class FROCInputError(ValueError):
    """An annotation or candidate row that the FROC analysis cannot use."""


def _truthy(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in _TRUE
    return bool(v) if v is not None else False


def _xyz(row, what: str, i: int) -> np.ndarray:
    try:
        return np.array([float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise FROCInputError(f"{what} row {i} needs numeric coordX, coordY, coordZ (world mm); got {row!r}") from e


@dataclass
class Matching:
    """Result of matching candidates to nodules over a scan set.

    Arrays over relevant nodules (n,): ``nod_scan`` (scan index), ``nod_score`` (best hit probability, -inf when
    missed), ``nod_groups`` {key: object array of group labels, None where unknown}, ``nod_row`` (index into
    the nodule rows), ``nod_hit_row`` (index into the candidate rows of the best hit, -1 when missed). Arrays
    over false positives (m,): ``fp_scan``, ``fp_score``, ``fp_row`` (index into the candidate rows);
    ``dropped_row``: the candidate rows dropped on irrelevant findings (every other row hits a nodule).
    """

    scan_ids: list
    nod_scan: np.ndarray
    nod_score: np.ndarray
    nod_row: np.ndarray
    nod_groups: dict
    fp_scan: np.ndarray
    fp_score: np.ndarray
    counts: dict = field(default_factory=dict)
    nod_hit_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    fp_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dropped_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def n_scans(self) -> int:
        return len(self.scan_ids)


def _rows_by_scan(nodules, candidates, index: dict, irrelevant_key: str) -> tuple[dict, dict]:
    """Checked rows grouped by scan position: {scan: [(row, xyz, radius_mm, irrelevant)]} for the nodules and
    {scan: [(xyz, probability, row index)]} for the candidates; FROCInputError names the first bad row."""
    nods_by_scan: dict[int, list] = {}
    for i, r in enumerate(nodules):
        s = str(r.get("seriesuid"))
        if s not in index:
            raise FROCInputError(f"annotation row {i} names seriesuid {s!r}, which is not in scan_ids")
        try:
            d = float(r["diameter_mm"])
        except (KeyError, TypeError, ValueError) as e:
            raise FROCInputError(f"annotation row {i} needs a numeric diameter_mm; got {r!r}") from e
        if not d > 0:
            raise FROCInputError(f"annotation row {i} has diameter_mm {d}; expected a positive diameter in mm")
        nods_by_scan.setdefault(index[s], []).append((i, _xyz(r, "annotation", i), d / 2.0,
                                                      _truthy(r.get(irrelevant_key, False))))
    cands_by_scan: dict[int, list] = {}
    for i, r in enumerate(candidates):
        s = str(r.get("seriesuid"))
        if s not in index:
            raise FROCInputError(f"candidate row {i} names seriesuid {s!r}, which is not in scan_ids")
        try:
            p = float(r["probability"])
        except (KeyError, TypeError, ValueError) as e:
            raise FROCInputError(f"candidate row {i} needs a numeric probability; got {r!r}") from e
        if not np.isfinite(p):
            raise FROCInputError(f"candidate row {i} has probability {p}; expected a finite number")
        cands_by_scan.setdefault(index[s], []).append((_xyz(r, "candidate", i), p, i))
    return nods_by_scan, cands_by_scan


def match_candidates(nodules, candidates, scan_ids, irrelevant_key: str = "irrelevant",
                     group_keys=("type",)) -> Matching:
    """Match candidate rows to nodule rows scan by scan by the rules in the module docstring."""
    scan_ids = [str(s) for s in scan_ids]
    if len(set(scan_ids)) != len(scan_ids):
        raise FROCInputError("scan_ids holds duplicates; give each scan of the evaluated set once")
    if not scan_ids:
        raise FROCInputError("scan_ids is empty; give every scan of the evaluated set")
    nods_by_scan, cands_by_scan = _rows_by_scan(nodules, candidates, {s: i for i, s in enumerate(scan_ids)},
                                                irrelevant_key)
    nod_scan, nod_score, nod_row, nod_hit_row = [], [], [], []
    fp_scan, fp_score, fp_row, dropped_row = [], [], [], []
    counts = dict(candidates=len(candidates), tp_candidates=0, fp=0, dropped=0, duplicates=0, multi_hits=0,
                  nodules=0, irrelevant_nodules=0, detected=0)
    for si in range(len(scan_ids)):
        nods = nods_by_scan.get(si, [])
        cands = cands_by_scan.get(si, [])
        rel = [n for n in nods if not n[3]]
        irr = [n for n in nods if n[3]]
        counts["nodules"] += len(rel)
        counts["irrelevant_nodules"] += len(irr)
        if cands:
            cxyz = np.stack([c[0] for c in cands])
            cp = np.array([c[1] for c in cands])
            crow = np.array([c[2] for c in cands], np.int64)
        else:
            cxyz, cp, crow = np.zeros((0, 3)), np.zeros(0), np.zeros(0, np.int64)

        def hits(group):
            if not group:
                return np.zeros((0, len(cands)), bool)
            centres = np.stack([n[1] for n in group])
            radii = np.array([n[2] for n in group])
            dist = np.sqrt(((cxyz[None, :, :] - centres[:, None, :]) ** 2).sum(-1))
            return dist <= radii[:, None]

        h_rel, h_irr = hits(rel), hits(irr)
        n_rel_hits = h_rel.sum(0) if rel else np.zeros(len(cands), int)
        for j, n in enumerate(rel):
            nod_scan.append(si)
            nod_row.append(n[0])
            k = np.flatnonzero(h_rel[j])
            nod_score.append(cp[k].max() if k.size else -np.inf)
            nod_hit_row.append(int(crow[k[np.argmax(cp[k])]]) if k.size else -1)
            counts["detected"] += int(k.size > 0)
            counts["duplicates"] += max(int(k.size) - 1, 0)
        is_hit = n_rel_hits > 0
        dropped = ~is_hit & (h_irr.any(0) if irr else np.zeros(len(cands), bool))
        fp = ~is_hit & ~dropped
        counts["tp_candidates"] += int(is_hit.sum())
        counts["multi_hits"] += int((n_rel_hits > 1).sum())
        counts["dropped"] += int(dropped.sum())
        counts["fp"] += int(fp.sum())
        fp_scan.extend([si] * int(fp.sum()))
        fp_score.extend(cp[fp].tolist())
        fp_row.extend(crow[fp].tolist())
        dropped_row.extend(crow[dropped].tolist())

    nod_row_a = np.array(nod_row, dtype=np.int64)
    groups = {}
    for key in group_keys:
        lab = [nodules[i].get(key) for i in nod_row_a]
        groups[key] = np.array([None if (v is None or v == "") else str(v) for v in lab], dtype=object)
    return Matching(scan_ids=scan_ids, nod_scan=np.array(nod_scan, dtype=np.int64),
                    nod_score=np.array(nod_score, dtype=np.float64), nod_row=nod_row_a, nod_groups=groups,
                    fp_scan=np.array(fp_scan, dtype=np.int64), fp_score=np.array(fp_score, dtype=np.float64),
                    counts=counts, nod_hit_row=np.array(nod_hit_row, dtype=np.int64),
                    fp_row=np.array(fp_row, dtype=np.int64), dropped_row=np.array(dropped_row, dtype=np.int64))


def _ordered_entries(m: Matching):
    """Detected nodules and false positives sorted by score descending, with tie-group ends."""
    det = np.isfinite(m.nod_score)
    score = np.concatenate([m.nod_score[det], m.fp_score])
    scan = np.concatenate([m.nod_scan[det], m.fp_scan])
    is_tp = np.concatenate([np.ones(int(det.sum()), bool), np.zeros(m.fp_score.size, bool)])
    nod_idx = np.concatenate([np.flatnonzero(det), -np.ones(m.fp_score.size, np.int64)])
    order = np.argsort(-score, kind="stable")
    score, scan, is_tp, nod_idx = score[order], scan[order], is_tp[order], nod_idx[order]
    # last index of each run of equal scores = one FROC vertex per distinct threshold
    ends = np.flatnonzero(np.append(score[1:] != score[:-1], True)) if score.size else np.zeros(0, np.int64)
    return score, scan, is_tp, nod_idx, ends


def _operating_points(m: Matching, weights: np.ndarray, fp_rates, masks: dict):
    """Sensitivities at ``fp_rates`` for scan weights (B, S) (counts of each scan in each resample).

    masks: {name: bool array over relevant nodules (n,)} (the whole set and each group).
    Returns {name: (B, len(fp_rates)) sensitivities, NaN where the resample holds no nodule of the mask}.
    """
    B, S = weights.shape
    score, scan, is_tp, nod_idx, ends = _ordered_entries(m)
    f_counts = np.asarray(fp_rates, np.float64) * S   # FP-count budget per resample (S scans each)
    w = weights[:, scan]                              # (B, E)
    fpc = np.concatenate([np.zeros((B, 1)), np.cumsum(w * ~is_tp, axis=1)[:, ends]], axis=1)  # (B, G+1)
    G1 = fpc.shape[1]
    # for each resample and rate: a = last vertex with fp count <= budget, b = the next (or a itself at the end)
    k = (fpc[:, :, None] <= f_counts[None, None, :] + 1e-9).sum(1)     # (B, F) >= 1 (vertex 0 has 0 FP)
    a = k - 1
    b = np.minimum(k, G1 - 1)
    fa = np.take_along_axis(fpc, a, 1)
    fb = np.take_along_axis(fpc, b, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(fb > fa, (f_counts[None, :] - fa) / np.where(fb > fa, fb - fa, 1.0), 0.0)
    out = {}
    for name, mask in masks.items():
        tp_e = is_tp & (nod_idx >= 0)
        sel = np.zeros(is_tp.shape, bool)
        sel[tp_e] = mask[nod_idx[tp_e]]
        tpc = np.concatenate([np.zeros((B, 1)), np.cumsum(w * sel, axis=1)[:, ends]], axis=1)
        ta = np.take_along_axis(tpc, a, 1)
        tb = np.take_along_axis(tpc, b, 1)
        total = weights[:, m.nod_scan[mask]].sum(1) if mask.any() else np.zeros(B)
        with np.errstate(invalid="ignore", divide="ignore"):
            sens = (ta + frac * (tb - ta)) / total[:, None]
        sens[total == 0] = np.nan
        out[name] = sens
    return out


def froc_curve(m: Matching):
    """The FROC vertices of the full set: (fps_per_scan (G+1,), sensitivity (G+1,), thresholds (G+1,)).

    thresholds[0] is +inf (nothing accepted); sensitivity is NaN everywhere when there are no nodules.
    """
    score, scan, is_tp, _, ends = _ordered_entries(m)
    n = m.nod_score.size
    fps = np.concatenate([[0.0], np.cumsum(~is_tp)[ends] / m.n_scans])
    tps = np.concatenate([[0.0], np.cumsum(is_tp)[ends]])
    sens = tps / n if n else np.full(tps.shape, np.nan)
    return fps, sens, np.concatenate([[np.inf], score[ends]])


def found_at(m: Matching, fp_rate: float = 1.0) -> tuple[float, np.ndarray]:
    """The operating point at ``fp_rate`` false positives per scan: (threshold, found (n,) bool over the relevant
    nodules). The threshold is that of the last FROC vertex with at most fp_rate FP/scan (no interpolation: a
    nodule is found when its best hit scores >= it); +inf when even the first vertex has more."""
    fps, _, thr = froc_curve(m)
    k = int(np.flatnonzero(fps <= fp_rate + 1e-12).max())
    return float(thr[k]), m.nod_score >= thr[k]


def _found_summary(m: Matching, fp_rate: float) -> dict:
    """found_at as JSON: {fp_rate, threshold (None for +inf), n_found, n, groups {key: {label: [found, n]}}}."""
    t, found = found_at(m, fp_rate)
    groups = {}
    for key, lab in m.nod_groups.items():
        groups[key] = {g: [int(found[lab == g].sum()), int((lab == g).sum())]
                       for g in sorted({v for v in lab if v is not None})}
    return {"fp_rate": fp_rate, "threshold": t if np.isfinite(t) else None, "n_found": int(found.sum()),
            "n": int(found.size), "groups": groups}


def _masks(m: Matching):
    masks = {("all", None): np.ones(m.nod_score.size, bool)}
    for key, lab in m.nod_groups.items():
        for g in sorted({v for v in lab if v is not None}):
            masks[(key, g)] = lab == g
    return masks


def bootstrap_weights(n_scans: int, n_bootstrap: int, seed: int = 0) -> np.ndarray:
    """(n_bootstrap, n_scans) counts: how often each scan is drawn in each resample (with replacement)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_scans, size=(n_bootstrap, n_scans))
    w = np.zeros((n_bootstrap, n_scans))
    np.add.at(w, (np.repeat(np.arange(n_bootstrap), n_scans), idx.ravel()), 1.0)
    return w


def percentile_interval(values: np.ndarray, confidence: float):
    """Percentile interval over axis 0, ignoring NaN rows; None where no resample is defined."""
    lo_q, hi_q = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    ok = ~np.isnan(values)
    if values.ndim == 1:
        if not ok.any():
            return None
        return [float(np.percentile(values[ok], lo_q)), float(np.percentile(values[ok], hi_q))]
    return [percentile_interval(values[:, j], confidence) for j in range(values.shape[1])]


def _num(x):
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)


def evaluate_detection(nodules, candidates, scan_ids, fp_rates=FP_RATES, n_bootstrap: int = 1000, seed: int = 0,
                       confidence: float = 0.95, irrelevant_key: str = "irrelevant",
                       group_keys=("type", "location"), band_rates=None, chunk: int = 200) -> dict:
    """FROC, CPM and per-group sensitivities with bootstrap intervals; a JSON-ready dict.

    Returns keys: n_scans, n_nodules, fp_rates, sensitivity (list per rate), sensitivity_ci (list of [lo, hi]),
    cpm, cpm_ci, froc {fps, sensitivity} (the curve's vertices), froc_band {fps, lower, upper} (bootstrap
    interval at ``band_rates``, default 33 log-spaced rates 1/8..8), counts (matching counts), found (the
    nodules found at 1 FP/scan: found_at as {fp_rate, threshold, n_found, n, groups {key: {label: [found, n]}}}),
    groups {key: {label: {n, sensitivity, sensitivity_ci, cpm, cpm_ci, n_bootstrap_used}}}, n_bootstrap, seed.
    Sensitivities are None (not NaN) where undefined (no nodules).
    """
    if n_bootstrap < 0:
        raise FROCInputError(f"n_bootstrap is {n_bootstrap}; expected 0 (no intervals) or a positive count")
    fp_rates = tuple(float(f) for f in fp_rates)
    if any(f < 0 for f in fp_rates):
        raise FROCInputError(f"fp_rates {fp_rates} holds a negative rate; expected rates in FP per scan >= 0")
    m = match_candidates(nodules, candidates, scan_ids, irrelevant_key=irrelevant_key, group_keys=group_keys)
    band = np.geomspace(0.125, 8, 33) if band_rates is None else np.asarray(band_rates, float)
    rates = np.concatenate([fp_rates, band])
    F = len(fp_rates)
    masks = _masks(m)
    point = _operating_points(m, np.ones((1, m.n_scans)), rates, masks)
    boot = {k: [] for k in masks}
    if n_bootstrap:
        W = bootstrap_weights(m.n_scans, n_bootstrap, seed)
        for s in range(0, n_bootstrap, chunk):
            part = _operating_points(m, W[s:s + chunk], rates, masks)
            for k in masks:
                boot[k].append(part[k])
        boot = {k: np.concatenate(v, 0) for k, v in boot.items()}

    def summary(key):
        p = point[key][0]
        sens = p[:F]
        res = {"n": int(masks[key].sum()),
               "sensitivity": [_num(x) for x in sens],
               "cpm": _num(float(np.mean(sens))) if not np.isnan(sens).any() else None,
               "sensitivity_ci": None, "cpm_ci": None, "n_bootstrap_used": 0}
        if n_bootstrap:
            bs = boot[key]
            res["sensitivity_ci"] = percentile_interval(bs[:, :F], confidence)
            res["cpm_ci"] = percentile_interval(bs[:, :F].mean(1), confidence)
            res["n_bootstrap_used"] = int((~np.isnan(bs[:, 0])).sum())
        return res, p, (boot[key] if n_bootstrap else None)

    overall, p_all, b_all = summary(("all", None))
    fps, sens_curve, _ = froc_curve(m)
    out = {"n_scans": m.n_scans, "n_nodules": overall["n"], "fp_rates": list(fp_rates),
           "sensitivity": overall["sensitivity"], "sensitivity_ci": overall["sensitivity_ci"],
           "cpm": overall["cpm"], "cpm_ci": overall["cpm_ci"],
           "froc": {"fps": fps.tolist(), "sensitivity": [_num(x) for x in sens_curve]},
           "froc_band": {"fps": band.tolist(), "sensitivity": [_num(x) for x in p_all[F:]],
                         "lower": None, "upper": None},
           "counts": m.counts, "found": _found_summary(m, 1.0),
           "n_bootstrap": int(n_bootstrap), "seed": int(seed), "confidence": confidence,
           "groups": {k: {} for k in group_keys}}
    if n_bootstrap:
        ci = percentile_interval(b_all[:, F:], confidence)
        out["froc_band"]["lower"] = [c[0] if c else None for c in ci]
        out["froc_band"]["upper"] = [c[1] if c else None for c in ci]
    for key in masks:
        if key[0] == "all":
            continue
        out["groups"][key[0]][key[1]] = summary(key)[0]
    return out


def interp_curve(fps, sens, fp_rates=FP_RATES) -> np.ndarray:
    """Sensitivity of a FROC polyline (vertices with non-decreasing fps) at each rate in ``fp_rates``.

    Linear between the last vertex with fps <= f and the next vertex; a vertical segment (equal fps) is read
    at its last (top) vertex; beyond the last vertex the last sensitivity is held; below the first vertex the
    first one. This is ``np.interp`` made well defined for repeated x.
    """
    fps = np.asarray(fps, np.float64)
    sens = np.asarray(sens, np.float64)
    if fps.ndim != 1 or fps.shape != sens.shape or fps.size == 0:
        raise FROCInputError("fps and sens must be 1-D arrays of the same non-zero length")
    if np.any(np.diff(fps) < 0):
        raise FROCInputError("fps must be non-decreasing (a FROC curve sorted by threshold)")
    f = np.asarray(fp_rates, np.float64)
    k = np.searchsorted(fps, f, side="right")          # number of vertices with fps <= f
    a = np.clip(k - 1, 0, fps.size - 1)
    b = np.clip(k, 0, fps.size - 1)
    a = np.where(k == 0, 0, a)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where((fps[b] > fps[a]) & (k > 0), (f - fps[a]) / np.where(fps[b] > fps[a], fps[b] - fps[a], 1), 0)
    return sens[a] + frac * (sens[b] - sens[a])


def cpm_from_curve(fps, sens, fp_rates=FP_RATES) -> float:
    """CPM of a given FROC curve: the mean of ``interp_curve`` at ``fp_rates``."""
    return float(np.mean(interp_curve(fps, sens, fp_rates)))


# ------------------------------------------------------------------------------------------ paired comparisons
def point_cpm(m: Matching, fp_rates, masks: dict) -> dict:
    """{mask key: CPM of the whole set (every scan once), NaN where the mask holds no nodule}."""
    return {k: float(v.mean(1)[0]) for k, v in _operating_points(m, np.ones((1, m.n_scans)), fp_rates,
                                                                  masks).items()}


def cpm_draws(m: Matching, weights: np.ndarray, fp_rates, masks: dict, chunk: int = 200) -> dict:
    """{mask key: (B,) CPM per resample of ``weights`` (B, S), NaN where the resample has no nodule of it}."""
    parts = {k: [] for k in masks}
    for s in range(0, weights.shape[0], chunk):
        for k, v in _operating_points(m, weights[s:s + chunk], fp_rates, masks).items():
            parts[k].append(v.mean(1))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


def _difference(a: str, b: str, point: dict, draws: dict, key, confidence: float) -> dict:
    """One pair on one group: the CPM difference a - b, its paired interval and which model it decides for."""
    pa, pb = point[a][key][0], point[b][key][0]
    diff = pa - pb if not (np.isnan(pa) or np.isnan(pb)) else np.nan
    d = draws[a][key] - draws[b][key]
    ci = percentile_interval(d, confidence) if d.size else None
    winner = None
    if ci is not None and not np.isnan(diff):
        winner = a if ci[0] > 0 else b if ci[1] < 0 else None
    return {"cpm_a": _num(pa), "cpm_b": _num(pb), "diff": _num(diff), "ci": ci, "winner": winner,
            "n_bootstrap_used": int((~np.isnan(d)).sum())}


def seed_level(run_draws: list, rng, n_bootstrap: int) -> dict:
    """The seed level of the hierarchical bootstrap: {mask key: (B,) mean of the draws of a resample of the runs,
    drawn with replacement} (resample b of every run scored on the same scan resample b). One run: its draws."""
    if len(run_draws) == 1:
        return run_draws[0]
    pick = rng.integers(0, len(run_draws), size=(n_bootstrap, len(run_draws)))
    return {k: np.take_along_axis(np.stack([d[k] for d in run_draws], axis=1), pick, axis=1).mean(1)
            for k in run_draws[0]}


def _by_runs(candidates: dict) -> dict:
    """{model: {run: rows}} from {model: rows} (one run, named as the model) or {model: {run: rows}}."""
    return {m: (dict(v) if isinstance(v, dict) else {m: v}) for m, v in candidates.items()}


def paired_bootstrap(nodules, candidates: dict, scan_ids, n_bootstrap: int = 1000, seed: int = 0,
                     confidence: float = 0.95, fp_rates=FP_RATES, irrelevant_key: str = "irrelevant",
                     group_keys=("type", "location"), chunk: int = 200) -> dict:
    """CPM differences between models evaluated on the same scans, with paired bootstrap intervals.

    candidates: {model: candidate rows}, or {model: {run: candidate rows}} for a model trained several times
    (seeds); two or more models, every row on ``scan_ids``. Each resample of the scans
    (``bootstrap_weights(len(scan_ids), n_bootstrap, seed)``: the draws evaluate_detection makes with the same
    seed) is scored for EVERY run, so each pair gets one difference per resample. A model with several runs is
    scored, in each resample, by the mean over a resample of its runs (drawn with replacement, its own draw):
    a hierarchical bootstrap over seeds and scans together, its point estimate the mean over the runs. The
    interval is the percentile interval of the differences (resamples without a nodule of a group are left out
    of that group). A pair's ``winner`` is the model with the higher CPM when the interval excludes 0, else None
    (no decision); a model is ``best`` on a group when it is the winner against every other model.

    Returns {"models", "n_scans", "n_bootstrap", "seed", "confidence", "fp_rates",
    "cpm": {model: {"overall": cpm, "groups": {key: {label: cpm}}}}, "cpm_ci": the same with each model's own
    interval, "runs": {model: {run: {"overall", "groups"}}} (each run's CPM),
    "pairs": [{"a", "b", "overall": D, "groups": {key: {label: D}}}] for every pair in model order, D =
    {"cpm_a", "cpm_b", "diff" (a - b), "ci", "winner", "n_bootstrap_used"},
    "best": {"overall": model or None, "groups": {key: {label: model or None}}},
    "best_counts": {model: {key: groups where it is best}}}.
    """
    runs = _by_runs(candidates)
    models = list(runs)
    if len(models) < 2:
        raise FROCInputError(f"paired comparisons need two or more models; got {models}")
    if n_bootstrap < 0:
        raise FROCInputError(f"n_bootstrap is {n_bootstrap}; expected 0 (no intervals) or a positive count")
    if any(not r for r in runs.values()):
        raise FROCInputError(f"every model needs at least one run; got {({m: len(r) for m, r in runs.items()})}")
    fp_rates = tuple(float(f) for f in fp_rates)
    match = {m: {r: match_candidates(nodules, rows, scan_ids, irrelevant_key=irrelevant_key, group_keys=group_keys)
                 for r, rows in by_run.items()} for m, by_run in runs.items()}
    first = next(iter(match[models[0]].values()))
    masks = _masks(first)
    W = bootstrap_weights(first.n_scans, n_bootstrap, seed) if n_bootstrap else np.zeros((0, first.n_scans))
    run_point = {m: {r: {k: v.mean(1) for k, v in _operating_points(x, np.ones((1, x.n_scans)), fp_rates,
                                                                       masks).items()}
                     for r, x in by_run.items()} for m, by_run in match.items()}
    point = {m: {k: np.mean([p[k] for p in rp.values()], axis=0) for k in masks}   # NaN for every run or none
             for m, rp in run_point.items()}
    seed_rng = np.random.default_rng([int(seed), 1])
    draws = {m: seed_level([cpm_draws(x, W, fp_rates, masks, chunk) for x in by_run.values()], seed_rng,
                            n_bootstrap) for m, by_run in match.items()}
    labels = [k for k in masks if k[0] != "all"]

    def by_group(fn):
        out = {"overall": fn(("all", None)), "groups": {key: {} for key in group_keys}}
        for k in labels:
            out["groups"][k[0]][k[1]] = fn(k)
        return out

    pairs = []
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            pairs.append({"a": a, "b": b, **by_group(lambda k: _difference(a, b, point, draws, k, confidence))})

    def best(k):                                   # the winner of every pair it is in, if any
        for cand in models:
            if all(_pick(p, k)["winner"] == cand for p in pairs if cand in (p["a"], p["b"])):
                return cand
        return None

    best_of = by_group(best)
    counts = {m: {key: sum(v == m for v in best_of["groups"][key].values()) for key in group_keys}
              for m in models}
    return {"models": models, "n_scans": first.n_scans, "n_bootstrap": int(n_bootstrap), "seed": int(seed),
            "confidence": confidence, "fp_rates": list(fp_rates),
            "cpm": {n: by_group(lambda k, n=n: _num(point[n][k][0])) for n in models},
            "cpm_ci": {n: by_group(lambda k, n=n: percentile_interval(draws[n][k], confidence)
                                   if draws[n][k].size else None) for n in models},
            "runs": {n: {r: by_group(lambda k, p=p: _num(p[k][0])) for r, p in run_point[n].items()}
                     for n in models},
            "pairs": pairs, "best": best_of, "best_counts": counts}


def _pick(pair: dict, key) -> dict:
    """The entry of a pair (paired_bootstrap) for mask key ("all", None) or (group key, label)."""
    return pair["overall"] if key[0] == "all" else pair["groups"][key[0]][key[1]]


def paired_across_sets(nodules_a, runs_a: dict, nodules_b, runs_b: dict, scan_ids, n_bootstrap: int = 1000,
                       seed: int = 0, confidence: float = 0.95, fp_rates=FP_RATES, chunk: int = 200) -> dict:
    """One model on two renderings of the same scans (a shifted set b against the original a): its overall CPM on
    each, the mean over its runs ({run: candidate rows}, the same runs on both), and the difference b - a with an
    interval paired by scan and by run (each resample draws the scans, bootstrap_weights(len(scan_ids),
    n_bootstrap, seed), and the runs, rng [seed, 1], once for both sets).
    Returns {"cpm_a", "cpm_b", "diff", "ci", "n_bootstrap"}."""
    if set(runs_a) != set(runs_b) or not runs_a:
        raise FROCInputError(f"the two sets need the same runs; got {sorted(runs_a)} and {sorted(runs_b)}")
    fp_rates = tuple(float(f) for f in fp_rates)
    W = bootstrap_weights(len(scan_ids), n_bootstrap, seed) if n_bootstrap else np.zeros((0, len(scan_ids)))
    pick = np.random.default_rng([int(seed), 1]).integers(0, len(runs_a), size=(n_bootstrap, len(runs_a)))
    out = {}
    for key, nodules, runs in (("a", nodules_a, runs_a), ("b", nodules_b, runs_b)):
        match = [match_candidates(nodules, runs[r], scan_ids) for r in sorted(runs)]
        masks = {("all", None): np.ones(match[0].nod_score.size, bool)}
        point = np.mean([_operating_points(m, np.ones((1, m.n_scans)), fp_rates, masks)[("all", None)].mean(1)
                         for m in match])
        draws = np.stack([cpm_draws(m, W, fp_rates, masks, chunk)[("all", None)] for m in match], axis=1)
        out[key] = (float(point), np.take_along_axis(draws, pick, axis=1).mean(1) if n_bootstrap else draws[:, 0])
    d = out["b"][1] - out["a"][1]
    return {"cpm_a": out["a"][0], "cpm_b": out["b"][0], "diff": out["b"][0] - out["a"][0],
            "ci": percentile_interval(d, confidence) if d.size else None, "n_bootstrap": int(n_bootstrap)}
