"""Segmentation metrics per nodule: Dice and the 95th-percentile Hausdorff distance in mm, and their aggregation.

Definitions (arrays are (z, y, x); spacing is (sz, sy, sx) mm):
- Dice = 2 |P & G| / (|P| + |G|). Both empty -> 1.0; exactly one empty -> 0.0.
- Surface of a mask = its voxels with at least one 6-neighbour outside it (mask minus its erosion by the
  6-connected cross, the array border counting as outside). Distances are between voxel centres, in mm.
- HD_q (q = 95 by default) = max(q-th percentile of the distances from P's surface to G's surface,
  q-th percentile of the distances from G's surface to P's surface) (the symmetric "max of directed
  percentiles" convention; medpy pools both directions instead). q = 100 gives the Hausdorff distance.
  Undefined (None, never NaN) when P or G is empty.

Per nodule k of an instance mask: the box is G_k's bounding box grown by ``margin_mm`` on each side (rounded up
to whole voxels per axis, clipped to the volume); inside it G = (label == k) and P = prediction with the voxels
of other nodules removed (they are neither the nodule nor background for nodule k). Prediction outside the box
is not seen. Status per nodule: "ok"; "missed" (P empty in the box: Dice 0, HD95 None); "no_gt" (label k absent
from the mask: Dice and HD95 None, left out of every mean and counted as n_no_gt).
Aggregation: Dice mean over nodules with a ground truth (missed ones count as 0); HD95 mean over nodules where it
is defined (n_hd95 says how many; missed nodules are not in it). Intervals: percentile bootstrap over nodules.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


class SegMetricsInputError(ValueError):
    """Masks or spacing that the segmentation metrics cannot use."""


def _check(pred, gt, spacing=None):
    pred = np.asarray(pred).astype(bool)
    gt = np.asarray(gt).astype(bool)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise SegMetricsInputError(f"pred {pred.shape} and gt {gt.shape} must be 3-D (z, y, x) of the same shape")
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise SegMetricsInputError(f"spacing {spacing} must be three positive mm values (sz, sy, sx)")
    return pred, gt, spacing


def dice(pred, gt) -> float:
    """Dice of two boolean (z, y, x) masks; 1.0 when both are empty."""
    pred, gt, _ = _check(pred, gt)
    s = int(pred.sum()) + int(gt.sum())
    return 1.0 if s == 0 else 2.0 * int((pred & gt).sum()) / s


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface voxels of a (z, y, x) mask (6-neighbourhood; the array border counts as outside)."""
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


def directed_surface_distances(a, b, spacing) -> np.ndarray:
    """Distances (mm) from each surface voxel of ``a`` to the nearest surface voxel of ``b`` (both non-empty)."""
    sb = surface(b)
    dt = ndimage.distance_transform_edt(~sb, sampling=spacing)
    return dt[surface(a)]


def hausdorff(pred, gt, spacing, percentile: float = 95.0):
    """HD at ``percentile`` in mm (max of the two directed percentiles); None when either mask is empty."""
    pred, gt, spacing = _check(pred, gt, spacing)
    if not (0 < percentile <= 100):
        raise SegMetricsInputError(f"percentile {percentile} must be in (0, 100]")
    if not pred.any() or not gt.any():
        return None
    d1 = directed_surface_distances(pred, gt, spacing)
    d2 = directed_surface_distances(gt, pred, spacing)
    return float(max(np.percentile(d1, percentile), np.percentile(d2, percentile)))


def hd95(pred, gt, spacing):
    """95th-percentile Hausdorff distance in mm; None when either mask is empty."""
    return hausdorff(pred, gt, spacing, 95.0)


def nodule_seg_metrics(pred_mask, instance_mask, spacing, margin_mm: float = 5.0, labels=None) -> list:
    """Dice and HD95 per nodule of an instance mask, inside each nodule's box plus ``margin_mm``.

    pred_mask: (z, y, x) bool (e.g. probability >= 0.5); instance_mask: (z, y, x) ints, 0 background, k nodule k.
    labels: the nodule labels to score (default: every non-zero label present).
    Returns one dict per label: label, status, dice, hd95_mm, gt_voxels, pred_voxels, box (z0, z1, y0, y1, x0, x1).
    """
    inst = np.asarray(instance_mask)
    pred, _, spacing = _check(pred_mask, inst != 0, spacing)
    if margin_mm < 0:
        raise SegMetricsInputError(f"margin_mm {margin_mm} must be >= 0")
    if labels is None:
        labels = [int(v) for v in np.unique(inst) if v != 0]
    grow = [int(np.ceil(margin_mm / s)) for s in spacing]
    objs = ndimage.find_objects(inst.astype(np.int64)) if inst.any() else []
    out = []
    for k in labels:
        k = int(k)
        sl = objs[k - 1] if 0 < k <= len(objs) else None
        if sl is None:
            out.append(dict(label=k, status="no_gt", dice=None, hd95_mm=None, gt_voxels=0, pred_voxels=0, box=None))
            continue
        box = tuple(slice(max(s.start - g, 0), min(s.stop + g, n)) for s, g, n in zip(sl, grow, inst.shape))
        li = inst[box]
        g = li == k
        p = pred[box] & ((li == 0) | g)
        row = dict(label=k, gt_voxels=int(g.sum()), pred_voxels=int(p.sum()),
                   box=[v for s in box for v in (s.start, s.stop)])
        if not p.any():
            row.update(status="missed", dice=0.0, hd95_mm=None)
        else:
            row.update(status="ok", dice=dice(p, g), hd95_mm=hd95(p, g, spacing))
        out.append(row)
    return out


def mean_ci(values, n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Mean and percentile-bootstrap interval of the defined (non-None) values: {n, mean, ci}.

    n = 0 gives mean None and ci None; n = 1 gives a zero-width interval.
    """
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "ci": None}
    res = {"n": int(v.size), "mean": float(v.mean()), "ci": None}
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        means = v[rng.integers(0, v.size, size=(n_bootstrap, v.size))].mean(1)
        q = 100 * (1 - confidence) / 2
        res["ci"] = [float(np.percentile(means, q)), float(np.percentile(means, 100 - q))]
    return res


def aggregate_seg(rows, group_keys=("type", "location"), n_bootstrap: int = 1000, seed: int = 0,
                  confidence: float = 0.95) -> dict:
    """Aggregate per-nodule rows (dicts with dice, hd95_mm, status and group labels) overall and per group.

    Returns {"overall": S, "groups": {key: {label: S}}} with S = {n, n_no_gt, n_missed, dice {n, mean, ci},
    hd95_mm {n, mean, ci}}; rows whose group label is None or "" are only in "overall".
    """
    rows = list(rows)

    def summ(rs):
        scored = [r for r in rs if r.get("status") != "no_gt"]
        return {"n": len(rs), "n_no_gt": len(rs) - len(scored),
                "n_missed": sum(r.get("status") == "missed" for r in scored),
                "dice": mean_ci([r["dice"] for r in scored], n_bootstrap, seed, confidence),
                "hd95_mm": mean_ci([r["hd95_mm"] for r in scored], n_bootstrap, seed, confidence)}

    out = {"overall": summ(rows), "groups": {}}
    for key in group_keys:
        labs = sorted({str(r[key]) for r in rows if r.get(key) not in (None, "")})
        out["groups"][key] = {g: summ([r for r in rows if str(r.get(key)) == g and r.get(key) not in (None, "")])
                              for g in labs}
    return out
