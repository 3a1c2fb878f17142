"""Evaluate trained runs on the test split and build the per-type report.

    python -m ahnet.evaluate --runs runs/A runs/B --data data/phantom/dataset.json --out report/

For each run folder: load ``checkpoints/best.pt`` (model_name, model_kwargs -> ahnet.nets.build_model), predict
every case of the chosen split (HU clipped to [-1000, 400] and scaled to [0, 1] as the cache does; native
spacing), 3D models by sliding windows (ahnet.infer), models named "mcgcn" slice by slice with
``model_kwargs["in_slices"]``-slice stacks; then candidates (ahnet.candidates) in world mm, FROC/CPM per type
and location (ahnet.froc) against ``annotations.csv`` and Dice/HD95 per nodule (ahnet.segmetrics, mask =
probability >= threshold, nodule k = instance label k of the label file, joined to the annotation row whose
``label`` is k). Writes ``<out>/candidates/<run>.csv`` and the report files (ahnet.report).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .candidates import extract_candidates
from .checkpoint import load_checkpoint
from .data.preprocess import clip_and_scale
from .froc import evaluate_detection
from .infer import sliding_window_predict, slicewise_predict
from .nets import build_model
from .report import build_report
from .segmetrics import aggregate_seg, nodule_seg_metrics


class EvaluateInputError(ValueError):
    """A run folder, dataset or option that the evaluation cannot use."""


def load_run(run_dir, device="cpu"):
    """(model in eval mode, model_name, checkpoint config, model_kwargs) from a checkpoint.

    run_dir: a run folder (its ``checkpoints/best.pt`` is read) or a checkpoint file given directly.
    Raises EvaluateInputError when the file is missing or cannot rebuild its model, CheckpointError (ahnet.checkpoint)
    when it is not a checkpoint.
    """
    path = Path(run_dir)
    if not path.is_file():
        path = path / "checkpoints" / "best.pt"
    if not path.is_file():
        raise EvaluateInputError(f"{path} not found; expected a run folder with checkpoints/best.pt")
    ck = load_checkpoint(path)
    try:
        model = build_model(ck["model_name"], **dict(ck["model_kwargs"]))
        model.load_state_dict(ck["model"])
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvaluateInputError(f"{path}: cannot rebuild model {ck['model_name']!r} from its model_kwargs and "
                                 f"state dict ({first[:160]})") from e
    return model.to(device).eval(), ck["model_name"], dict(ck.get("config") or {}), dict(ck["model_kwargs"])


def predict_case(models, model_name: str, image01: np.ndarray, window=None, overlap: float = 0.5,
                 batch_size: int = 4, flip_tta: bool = False, amp: bool | str = True, in_slices: int = 3,
                 channels_last: bool = False) -> np.ndarray:
    """Foreground probability (z, y, x) float32 of a scaled (z, y, x) image; 'mcgcn' runs slice by slice.
    amp: True / "auto" | "fp16" | "bf16" | False / "off"; channels_last: 3D models only (ahnet.infer)."""
    x = torch.from_numpy(np.ascontiguousarray(image01, np.float32))[None, None]
    if model_name == "mcgcn":
        p = slicewise_predict(models, x, in_slices=in_slices, batch_size=max(batch_size, 1) * 4,
                              flip_tta=flip_tta, amp=amp)
    else:
        p = sliding_window_predict(models, x, window=window, overlap=overlap, batch_size=batch_size,
                                   flip_tta=flip_tta, amp=amp, channels_last=channels_last)
    return p[0, 0].numpy()


def evaluate_predictions(probs: dict, cases: list, annotations: list, threshold: float = 0.5,
                         method: str = "components", n_bootstrap: int = 1000, seed: int = 0,
                         margin_mm: float = 5.0) -> dict:
    """Detection and segmentation results per model, ready for ahnet.report.build_report.

    probs: {model: {case_id: (z, y, x) probabilities}}; cases: [{"case_id", "geometry" (spacing, origin,
    direction [, voxel_to_world]), "label" ((z, y, x) instance mask or None)}]; annotations: LUNA16 rows with
    ``type``, ``location`` and ``label`` (instance label in the case's mask) where known.
    Returns {model: {"detection", "segmentation", "candidates"}}.
    """
    scan_ids = [c["case_id"] for c in cases]
    known = set(scan_ids)
    ann = [a for a in annotations if str(a["seriesuid"]) in known]
    out = {}
    for name, by_case in probs.items():
        missing = [s for s in scan_ids if s not in by_case]
        if missing:
            raise EvaluateInputError(f"model {name!r} has no prediction for cases {missing[:3]}")
        cands, seg_rows = [], []
        for c in cases:
            p = by_case[c["case_id"]]
            cands += extract_candidates(p, c["geometry"], seriesuid=c["case_id"], threshold=threshold,
                                        method=method)
            if c.get("label") is None:
                continue
            rows = [a for a in ann if str(a["seriesuid"]) == c["case_id"] and a.get("label") not in (None, "")]
            if not rows:
                continue
            res = nodule_seg_metrics(p >= threshold, c["label"], c["geometry"].spacing, margin_mm=margin_mm,
                                     labels=[int(a["label"]) for a in rows])
            for a, r in zip(rows, res):
                seg_rows.append(dict(r, seriesuid=c["case_id"], type=a.get("type"), location=a.get("location")))
        out[name] = {"detection": evaluate_detection(ann, cands, scan_ids, n_bootstrap=n_bootstrap, seed=seed),
                     "segmentation": aggregate_seg(seg_rows, n_bootstrap=n_bootstrap, seed=seed) if seg_rows else None,
                     "candidates": cands, "seg_rows": seg_rows}
    return out


def main(argv=None) -> int:
    """The CLI; a bad run folder, dataset or option is one `error:` line and exit code 2."""
    try:
        return _main(argv)
    except (ValueError, FileNotFoundError) as exc:   # EvaluateInputError, DataError, CheckpointError, ...
        print(f"ahnet.evaluate: error: {exc}", file=sys.stderr)
        return 2


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ahnet.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="run folders, each with checkpoints/best.pt")
    ap.add_argument("--data", required=True, help="dataset.json (Decathlon style, with split per case)")
    ap.add_argument("--annotations", default=None, help="annotations CSV (default: annotations.csv beside --data)")
    ap.add_argument("--out", default="report", help="output folder")
    ap.add_argument("--split", default="test", help="which split to evaluate (default test)")
    ap.add_argument("--window", type=int, nargs=3, default=None,
                    help="3D window D H W (default: the run's patch_size; 'whole' volume if none)")
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=2, help="windows per forward pass")
    ap.add_argument("--tta", action="store_true", help="in-plane flip test-time augmentation")
    ap.add_argument("--threshold", type=float, default=0.5, help="probability threshold for masks and candidates")
    ap.add_argument("--method", choices=("components", "maxima"), default="components")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    ap.add_argument("--title", default="AH-Net per-type evaluation")
    a = ap.parse_args(argv)
    from .data.io import load_dataset_json, read_annotations_csv, read_image, write_candidates_csv

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    entries = [e for e in load_dataset_json(a.data) if e.get("split") == a.split]
    if not entries:
        raise EvaluateInputError(f"{a.data} has no case with split {a.split!r}")
    ann_path = Path(a.annotations) if a.annotations else Path(a.data).parent / "annotations.csv"
    annotations = read_annotations_csv(ann_path)
    cases, images = [], {}
    for e in entries:
        vol = read_image(e["image"])
        lab = read_image(e["label"]).array.astype(np.int32) if e.get("label") else None
        images[e["case_id"]] = clip_and_scale(vol.array)
        cases.append({"case_id": e["case_id"], "geometry": vol, "label": lab})
    probs = {}
    names = []
    for run in a.runs:
        name = Path(run).name
        if name in names:
            raise EvaluateInputError(f"two runs are named {name!r}; give run folders with distinct names")
        names.append(name)
        model, mname, cfg, kw = load_run(run, device)
        window = a.window or (cfg.get("patch_size") if mname != "mcgcn" else None)
        probs[name] = {}
        for cid, img in images.items():
            probs[name][cid] = predict_case(model, mname, img, window=window, overlap=a.overlap,
                                            batch_size=a.batch, flip_tta=a.tta, in_slices=int(kw.get("in_slices", 3)))
            print(f"[evaluate] {name}: {cid} done", file=sys.stderr)
    results = evaluate_predictions(probs, cases, annotations, threshold=a.threshold, method=a.method,
                                   n_bootstrap=a.bootstrap, seed=a.seed)
    out = Path(a.out)
    for name, r in results.items():
        write_candidates_csv(out / "candidates" / f"{name}.csv", r["candidates"])
    rep = build_report({k: {"detection": v["detection"], "segmentation": v["segmentation"]}
                        for k, v in results.items()}, out, title=a.title)
    for m in rep["model_order"]:
        r = rep["models"][m]
        print(f"{m}: CPM {r['cpm']}  CI {r['cpm_ci']}  types won {rep['wins'][m]}/{len(rep['types'])}")
    print(f"report: {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
