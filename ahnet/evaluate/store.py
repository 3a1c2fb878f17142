"""Each run's evaluation kept beside the report (``<out>/evaluated/<run>.json``, ahnet.paths.report_evaluated): its
candidates and per-nodule segmentation rows with the fingerprint of everything they depend on, so that an
evaluation killed part way, or run again with one more run, predicts only the runs it has not evaluated yet.

The fingerprint (sha256) covers: the run's checkpoint files and, when rescoring, its second stage, byte for byte;
the split's scans as evaluated (scaled arrays, grids, label masks); the split's annotation rows; every setting that
changes a number (window settings, tta, precision, layout, mask threshold, candidate rule, rescore options, the
in-plane spacing the scans are predicted at, when it resamples any of them); the device type, the torch version
and the source of every stage an evaluation can import (ahnet's top-level modules and data, nets, train, infer and
evaluate: a change there, committed or not, predicts again; a change of the report, serving, benchmarks or
commands does not, since the one-way house keeps them out of evaluate's imports, and documentation and tests do
not). A stored file whose fingerprint differs is recomputed and replaced.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

import ahnet
from ahnet import paths
from ahnet.atomic import write_text_atomic
from ahnet.infer.spacing import PredictionGrid

VERSION = 1


def _feed_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def data_digest(cases: list, images: dict, annotations: list) -> str:
    """sha256 of the split as the evaluation holds it: each case's scaled scan, grid and label mask, in order, and
    the split's annotation rows."""
    h = hashlib.sha256()
    for c in cases:
        g = c["geometry"]
        h.update(json.dumps([c["case_id"], [float(v) for v in g.spacing], [float(v) for v in g.origin],
                             np.asarray(g.direction, float).ravel().tolist()]).encode())
        h.update(np.ascontiguousarray(images[c["case_id"]]).tobytes())
        if c.get("label") is not None:
            h.update(np.ascontiguousarray(c["label"]).tobytes())
    h.update(json.dumps(sorted(json.dumps(a, sort_keys=True, default=str) for a in annotations)).encode())
    return h.hexdigest()


#: the folders of ahnet whose source an evaluation's numbers can depend on, with the package's top-level modules:
#: by the one-way house (tests/test_structure.py) evaluate imports these stages only, never report, serve, bench,
#: gpucheck or the commands, so a change there (a report's new table) does not predict every run again
EVALUATION_SOURCES = ("data", "nets", "train", "infer", "evaluate")


def code_digest(folders: tuple | None = None, root: Path | None = None) -> str:
    """sha256 of the package's source: every ahnet/**/*.py by its path in the package and its bytes; with
    ``folders``, the top-level modules and those folders' only. ``root``: the package folder (default ahnet's)."""
    root = Path(root) if root is not None else Path(ahnet.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if folders is not None and len(rel.parts) > 1 and rel.parts[0] not in folders:
            continue
        h.update(rel.as_posix().encode() + b"\0")
        _feed_file(h, f)
    return h.hexdigest()


def run_fingerprint(run, common: dict, rescorer=None, inplane: tuple | None = None) -> str:
    """sha256 naming one run's evaluation (module docstring): ``common``, what every run of the evaluation shares
    (version, data digest, settings, device, torch, code digest), the in-plane spacing it predicts at, then the
    run's own files."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(common, rescore=rescorer is not None, inplane=inplane), sort_keys=True,
                        default=str).encode())
    for f in paths.resolve_checkpoints(run):
        _feed_file(h, f)
    if rescorer is not None:
        _feed_file(h, Path(rescorer.path))
        h.update(json.dumps(rescorer.settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def load_evaluated(out, name: str, key: str) -> dict | None:
    """{"candidates", "seg_rows"} stored for run ``name`` under ``key``; None when there is none, it was stored
    under another key, or it cannot be read (then it is recomputed)."""
    path = paths.report_evaluated(out, name)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if doc.get("key") != key:
        return None
    return {"candidates": doc["candidates"], "seg_rows": doc["seg_rows"]}


def store_evaluated(out, name: str, key: str, candidates: list, seg_rows: list) -> None:
    """Keep run ``name``'s evaluation under ``key`` (atomically)."""
    path = paths.report_evaluated(out, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"key": key, "candidates": candidates, "seg_rows": seg_rows}
    write_text_atomic(path, json.dumps(doc, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def evaluate_runs(runs, cases: list, images: dict, annotations: list, out, device: torch.device, threshold: float,
                  rule, n_bootstrap: int, seed: int, rescorers: dict | None, predict_kw: dict,
                  inplanes: dict | None = None) -> dict:
    """evaluate_predictions' result for ``runs``, one run at a time (ahnet.evaluate.predict_run_rows; each at
    ``inplanes[name]``, the (sy, sx) mm its scans are predicted at, None or absent: their own grids): a run whose
    evaluation is stored in ``out`` under the same fingerprint is read back, the others are predicted, evaluated
    and stored as soon as each is done (a killed evaluation keeps the runs it finished)."""
    import sys

    import ahnet.evaluate as evaluate

    scan_ids = [c["case_id"] for c in cases]
    known = set(scan_ids)
    ann = [a for a in annotations if str(a["seriesuid"]) in known]
    common = {"version": VERSION, "data": data_digest(cases, images, ann), "device": device.type,
              "torch": torch.__version__, "code": code_digest(EVALUATION_SOURCES),
              "settings": {"predict": predict_kw, "threshold": threshold, "rule": rule.to_dict(),
                           "margin_mm": evaluate.SEG_MARGIN_MM}}
    results = {}
    for name, run in zip(evaluate.run_names(runs), runs):
        rescorer, inplane = (rescorers or {}).get(name), (inplanes or {}).get(name)
        if inplane is not None and not any(PredictionGrid.for_scan(c["geometry"], inplane).resamples for c in cases):
            inplane = None                  # a spacing that resamples none of the scans: their own grids, one key
        key = run_fingerprint(run, common, rescorer, inplane)
        rows = load_evaluated(out, name, key)
        if rows is not None:
            print(f"[evaluate] {name}: the evaluation stored in {paths.report_evaluated(out, name)} holds for it; "
                  f"reused", file=sys.stderr)
            cands, seg_rows = rows["candidates"], rows["seg_rows"]
        else:
            cands, seg_rows = evaluate.predict_run_rows(run, cases, images, ann, device, threshold, rule,
                                                        evaluate.SEG_MARGIN_MM, rescorer, inplane, **predict_kw)
            store_evaluated(out, name, key, cands, seg_rows)
        results[name] = evaluate.summarise_run(cands, seg_rows, ann, scan_ids, n_bootstrap, seed)
    return results
