"""Crops for the report's gallery: what a model found, missed and wrongly flagged, per nodule type.

``gallery_crops(results, cases, images, annotations)`` returns plain data the report draws (ahnet.report):

- ``types``: {type: [crop]}: for the focus model (AH-Net after transfer when evaluated, else the first model),
  up to ``n_hits`` nodules of that type found at 1 false positive per scan and up to ``n_misses`` missed there,
  in annotation order (the first ones, not the best ones);
- ``false_positives``: {model: [crop]}: each model's highest-scoring false positives;
- ``focus``, ``thresholds`` {model: the 1 FP/scan operating threshold (ahnet.evaluate.froc.found_at)}, ``half_mm``.

A crop: the axial slice through the centre (nodule centre or candidate), ``half_mm`` each side in-plane, HU
(float32, the evaluation's [0, 1] image mapped back, so clipped to the cache's HU range); ``contour``: that slice
of the nodule's own instance mask (a false positive: every nodule in view) or None; ``marks``: the model's
candidates within ``MARK_SLICES`` slices of it, at their sub-voxel in-plane position (row, col in crop pixels),
each with its score, status ("hit", "fp", "dropped") and whether it passes the 1 FP/scan threshold; plus
seriesuid, model, kind ("hit", "miss", "fp"), type, location, diameter_mm, score, centre_zyx, slice,
pixel_mm (sy, sx), found_by (the models that find this nodule at their own 1 FP/scan threshold).
"""
from __future__ import annotations

import numpy as np

from ahnet.data.preprocess import hu_from_scaled
from ahnet.evaluate.froc import found_at, match_candidates
from ahnet.infer import world_to_voxel

FOCUS = "ahnet-transfer"    # the experiment's name for AH-Net after transfer: the model the type rows show
MARK_SLICES = 1             # candidates within this many slices of the crop's slice are marked on it


def _status(m, n_rows: int) -> np.ndarray:
    """Per candidate row: "fp", "dropped" (on an irrelevant finding) or "hit" (within a relevant nodule)."""
    st = np.full(n_rows, "hit", dtype=object)
    st[m.fp_row] = "fp"
    st[m.dropped_row] = "dropped"
    return st


def _to_voxel(xyz, geometry) -> np.ndarray:
    """(n, 3) world mm -> (n, 3) voxel zyx by the case's spacing, origin and direction."""
    return world_to_voxel(np.asarray(xyz, float), geometry.spacing, geometry.origin, geometry.direction)


def _crop(image01, label, geometry, centre_zyx, half_mm):
    """(HU crop (h, w) float32, slice index, (row0, col0) of the crop's corner) through centre_zyx."""
    sp = np.asarray(geometry.spacing, float)
    z = int(np.clip(round(float(centre_zyx[0])), 0, image01.shape[0] - 1))
    hy, hx = (int(np.ceil(half_mm / sp[1])), int(np.ceil(half_mm / sp[2])))
    cy, cx = int(round(float(centre_zyx[1]))), int(round(float(centre_zyx[2])))
    img = np.pad(image01[z], ((hy, hy + 1), (hx, hx + 1)), constant_values=0.0)
    hu = hu_from_scaled(img[cy:cy + 2 * hy + 1, cx:cx + 2 * hx + 1])
    lab = None
    if label is not None:
        lab = np.pad(label[z], ((hy, hy + 1), (hx, hx + 1)))[cy:cy + 2 * hy + 1, cx:cx + 2 * hx + 1]
    return hu.astype(np.float32), lab, z, (cy - hy, cx - hx)


def _marks(rows, status, geometry, z, corner, shape, threshold):
    """The candidates of one scan near slice z, in crop pixels."""
    if not rows:
        return []
    xyz = np.array([[float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])] for _, r in rows])
    zyx = _to_voxel(xyz, geometry)
    out = []
    for (i, r), (cz, cy, cx) in zip(rows, zyx):
        row, col = cy - corner[0], cx - corner[1]
        if abs(cz - z) <= MARK_SLICES + 0.5 and 0 <= row < shape[0] and 0 <= col < shape[1]:
            p = float(r["probability"])
            out.append({"row": float(row), "col": float(col), "score": p, "status": status[i],
                        "above_threshold": bool(p >= threshold)})
    return out


def _base(model, kind, cid, geometry, centre_zyx, img, lab_full, label_id, half_mm, rows, status, thr):
    hu, lab, z, corner = _crop(img, lab_full, geometry, centre_zyx, half_mm)
    contour = None
    if lab is not None:
        contour = (lab == label_id) if label_id is not None else (lab > 0)
    return {"model": model, "kind": kind, "seriesuid": cid, "centre_zyx": [float(v) for v in centre_zyx],
            "slice": z, "pixel_mm": [float(geometry.spacing[1]), float(geometry.spacing[2])], "image": hu,
            "contour": contour, "marks": _marks(rows, status, geometry, z, corner, hu.shape, thr)}


def gallery_crops(results: dict, cases: list, images: dict, annotations: list, focus: str | None = None,
                  n_hits: int = 2, n_misses: int = 2, n_false_positives: int = 4, half_mm: float = 20.0) -> dict:
    """The gallery's crops (module docstring). results: evaluate_predictions' {model: {"candidates", ...}};
    cases / images: load_cases'; annotations: the rows evaluated (with type, location, label)."""
    scan_ids = [c["case_id"] for c in cases]
    by_id = {c["case_id"]: c for c in cases}
    ann = [a for a in annotations if str(a["seriesuid"]) in by_id]
    models = list(results)
    focus = focus if focus in results else (FOCUS if FOCUS in results else models[0])
    match, thr, found, status, rows_by_scan = {}, {}, {}, {}, {}
    for name in models:
        cands = results[name]["candidates"]
        match[name] = m = match_candidates(ann, cands, scan_ids, group_keys=("type", "location"))
        thr[name], found[name] = found_at(m, 1.0)
        status[name] = _status(m, len(cands))
        rows_by_scan[name] = {}
        for i, r in enumerate(cands):
            rows_by_scan[name].setdefault(str(r["seriesuid"]), []).append((i, r))
    out = {"focus": focus, "thresholds": {k: (v if np.isfinite(v) else None) for k, v in thr.items()},
           "half_mm": half_mm, "types": {}, "false_positives": {}}
    m = match[focus]
    for j in range(m.nod_scan.size):
        a = ann[m.nod_row[j]]
        t, kind = a.get("type"), ("hit" if found[focus][j] else "miss")
        row = out["types"].setdefault(t, [])
        if sum(c["kind"] == kind for c in row) >= (n_hits if kind == "hit" else n_misses):
            continue
        c = by_id[scan_ids[m.nod_scan[j]]]
        geo = c["geometry"]
        centre = _to_voxel([[float(a["coordX"]), float(a["coordY"]), float(a["coordZ"])]], geo)[0]
        label_id = int(a["label"]) if a.get("label") not in (None, "") else None
        crop = _base(focus, kind, c["case_id"], geo, centre, images[c["case_id"]], c.get("label"), label_id,
                     half_mm, rows_by_scan[focus].get(c["case_id"], []), status[focus], thr[focus])
        score = m.nod_score[j]
        crop.update(type=t, location=a.get("location"), diameter_mm=float(a["diameter_mm"]),
                    score=float(score) if np.isfinite(score) else None,
                    found_by=[n for n in models if found[n][j]])
        row.append(crop)
    for name in models:
        mm = match[name]
        cands = results[name]["candidates"]
        picks = []
        for k in np.argsort(-mm.fp_score, kind="stable")[:n_false_positives]:
            r = cands[mm.fp_row[k]]
            c = by_id[str(r["seriesuid"])]
            geo = c["geometry"]
            centre = _to_voxel([[float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])]], geo)[0]
            crop = _base(name, "fp", c["case_id"], geo, centre, images[c["case_id"]], c.get("label"), None,
                         half_mm, rows_by_scan[name].get(c["case_id"], []), status[name], thr[name])
            crop.update(type=None, location=None, diameter_mm=None, score=float(mm.fp_score[k]), found_by=[])
            picks.append(crop)
        out["false_positives"][name] = picks
    return out
