"""Whole-volume inference: probability maps, masks and one LUNA16 candidates CSV for a set of scans.

    python -m ahnet.predict --input scans/ --runs runs/ahnet_cv --out pred/ [--tta] [--window D H W]

Inputs (``--input``): one image file (.nii, .nii.gz, .mha, .mhd, .nrrd), a DICOM series folder, a folder of image
files (not recursive; other files are ignored), or a Decathlon ``dataset.json`` (``--split`` picks cases; default
all). case_id = the file name without its suffix, the DICOM folder's name, or the dataset's ``case_id``.

Models (``--runs``): run folders (their ``checkpoints/best.pt``), checkpoint files, a folder holding
``fold*/checkpoints/best.pt``, or the name ``runs/X`` of a cross-validation that ``ahnet.train --all-folds``
wrote as sibling folders ``runs/X-fold0 .. runs/X-fold<K-1>`` (every fold model). Several models form an ensemble: the mean of their sigmoid
probabilities. 3D models (ahnet, unet3d) run by Gaussian-blended sliding windows (ahnet.infer); 2D "mcgcn" models
run slice by slice on ``in_slices``-slice stacks. Mixing 2D and 3D models is refused unless ``--allow-mixed``,
which then averages the 2D and 3D probabilities, each model weighted equally.

Per case: HU clipped to [-1000, 400] and scaled to [0, 1] (as the training cache), native spacing; writes
``<out>/<case_id>_prob.nii.gz`` (float32) and ``<out>/<case_id>_mask.nii.gz`` (uint8, prob >= threshold) with the
input's spacing, origin and direction, then drops the case's arrays before the next one. ``<out>/candidates.csv``
holds seriesuid,coordX,coordY,coordZ,probability (world LPS mm) for the whole set.

Window (3D): ``--window``, else the largest ``patch_size`` in the runs' training configs, else DEFAULT_WINDOW;
rounded up to the models' input multiple and never larger than the volume rounded up to that multiple.
Bad input (missing file, folder without images, a file that is not a checkpoint, mismatched runs) prints one
sentence and exits with code 2.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from glob import escape as glob_escape
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .candidates import CandidateInputError, extract_candidates
from .checkpoint import CheckpointError
from .data import io
from .data.preprocess import clip_and_scale
from .evaluate import EvaluateInputError, load_run, predict_case
from .infer import InferenceInputError, input_multiple
from .precision import resolve_amp

DEFAULT_WINDOW = (64, 192, 192)       # (D, H, W) when neither --window nor a run's patch_size says otherwise
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
THREE_D = ("ahnet", "unet3d")
TWO_D = ("mcgcn",)


class PredictInputError(ValueError):
    """An input, run or option that prediction cannot use; the message is one sentence naming it."""


INPUT_ERRORS = (PredictInputError, EvaluateInputError, CheckpointError, io.DataError, InferenceInputError,
                CandidateInputError)


# ----------------------------------------------------------------------------------------------------- cases

@dataclass
class Case:
    """One scan to predict: case_id (output file stem and CSV seriesuid) and image path (file or DICOM folder)."""
    case_id: str
    image: Path


def _image_stem(path: Path):
    """File name without an image suffix, or None when the name has no image suffix."""
    low = path.name.lower()
    for s in IMAGE_SUFFIXES:
        if low.endswith(s) and len(low) > len(s):
            return path.name[: -len(s)]
    return None


def _has_dicom_series(folder: Path) -> bool:
    import SimpleITK as sitk
    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def find_cases(input_path, split=None) -> list:
    """Cases of ``input_path`` (image file, DICOM folder, folder of images, or dataset.json) -> [Case].

    split: for a dataset.json, a split name or comma-separated names (None = every case).
    """
    p = Path(input_path)
    if not p.exists():
        raise PredictInputError(f"input {p} not found; expected an image file, a folder or a dataset.json")
    if split is not None and not (p.is_file() and p.suffix.lower() == ".json"):
        raise PredictInputError(f"--split {split!r} applies to a dataset.json input only; {p} is not one")
    if p.is_file():
        if p.suffix.lower() == ".json":
            entries = io.load_dataset_json(p)
            if split is not None:
                want = {s.strip() for s in str(split).split(",") if s.strip()}
                entries = [e for e in entries if e.get("split") in want]
                if not entries:
                    raise PredictInputError(f"{p} has no case with split {split!r}")
            if not entries:
                raise PredictInputError(f"{p} lists no cases under 'training'")
            return [Case(e["case_id"], Path(e["image"])) for e in entries]
        stem = _image_stem(p)
        if stem is None:
            raise PredictInputError(f"input {p} is not an image file; expected .nii, .nii.gz, .mha, .mhd, .nrrd, "
                                    f"a folder or a dataset.json")
        return [Case(stem, p)]
    files = sorted(f for f in p.iterdir() if f.is_file() and _image_stem(f) is not None)
    if files:
        cases, seen = [], {}
        for f in files:
            cid = _image_stem(f)
            if cid in seen:
                raise PredictInputError(f"folder {p} holds two images of case {cid!r} ({seen[cid].name} and "
                                        f"{f.name}); keep one per case")
            seen[cid] = f
            cases.append(Case(cid, f))
        return cases
    if _has_dicom_series(p):
        return [Case(p.name, p)]
    raise PredictInputError(f"folder {p} holds no images; expected .nii/.nii.gz/.mha/.mhd/.nrrd files or a DICOM "
                            f"series")


# ----------------------------------------------------------------------------------------------------- runs

def _fold_sort(files) -> list:
    """Checkpoint paths sorted by the number in their run folder's name (fold2 before fold10)."""
    def key(f):
        m = re.search(r"(\d+)$", f.parents[1].name)
        return (int(m.group(1)) if m else -1, f.parents[1].name)
    return sorted(files, key=key)


def resolve_runs(runs) -> list:
    """Checkpoint files for ``runs``: each a checkpoint file, a run folder (checkpoints/best.pt), a folder of
    fold*/checkpoints/best.pt, or a missing path P whose siblings P-fold<k>/checkpoints/best.pt exist (the
    trainer's --all-folds layout); folds sorted by fold number. Raises PredictInputError naming a bad entry."""
    out = []
    for r in runs:
        p = Path(r)
        if p.is_file():
            found = [p]
        elif p.is_dir():
            if (p / "checkpoints" / "best.pt").is_file():
                found = [p / "checkpoints" / "best.pt"]
            else:
                found = _fold_sort(f for f in p.glob("fold*/checkpoints/best.pt") if f.is_file())
                if not found:
                    raise PredictInputError(f"run folder {p} holds neither checkpoints/best.pt nor "
                                            f"fold*/checkpoints/best.pt")
        else:
            found = _fold_sort(f for f in p.parent.glob(f"{glob_escape(p.name)}-fold*/checkpoints/best.pt")
                               if re.fullmatch(re.escape(p.name) + r"-fold\d+", f.parents[1].name))
            if not found:
                raise PredictInputError(f"run {p} not found; expected a run folder, a checkpoint file or the "
                                        f"name of {p.name}-fold<k> folders")
        for f in found:
            if any(f.resolve() == o.resolve() for o in out):
                raise PredictInputError(f"checkpoint {f} is given twice; an ensemble takes each model once")
            out.append(f)
    if not out:
        raise PredictInputError("no runs given; pass --runs with run folders or checkpoint files")
    return out


@dataclass
class Ensemble:
    """Loaded models grouped by how they run: key "3d" (sliding windows) or ("mcgcn", in_slices) (slice-wise)."""
    groups: dict
    paths: list
    patch_size: tuple | None = None            # largest training patch_size among the 3D runs (None if none)
    multiple: tuple = (1, 1, 1)                # (D, H, W) every 3D window must divide by
    n_models: int = 0
    names: list = field(default_factory=list)


def load_ensemble(runs, device="cpu", allow_mixed: bool = False) -> Ensemble:
    """Load every checkpoint of ``runs`` (see resolve_runs) on ``device`` into an Ensemble.

    Refuses (PredictInputError): models with out_channels != 1 or 3D in_channels != 1, unknown model kinds, and a
    2D/3D mix unless allow_mixed.
    """
    paths = resolve_runs(runs)
    groups, patches, names = {}, [], []
    for f in paths:
        model, name, cfg, kw = load_run(f, device)
        if kw.get("out_channels", 1) != 1:
            raise PredictInputError(f"checkpoint {f} has out_channels {kw.get('out_channels')}; prediction writes "
                                    f"one foreground probability and needs 1")
        if name in THREE_D:
            if kw.get("in_channels", 1) != 1:
                raise PredictInputError(f"checkpoint {f} has in_channels {kw.get('in_channels')}; a CT volume "
                                        f"gives 1")
            key = "3d"
            ps = cfg.get("patch_size")
            if ps is not None:
                if len(ps) != 3:
                    raise PredictInputError(f"checkpoint {f} has config patch_size {ps}; expected (D, H, W)")
                patches.append(tuple(int(v) for v in ps))
        elif name in TWO_D:
            key = ("mcgcn", int(kw.get("in_slices", 3)))
        else:
            raise PredictInputError(f"checkpoint {f} holds model {name!r}; expected one of "
                                    f"{', '.join(THREE_D + TWO_D)}")
        groups.setdefault(key, []).append(model)
        names.append(name)
    if "3d" in groups and len(groups) > 1 and not allow_mixed:
        kinds = sorted(set(names))
        raise PredictInputError(f"runs mix 2D (mcgcn) and 3D ({', '.join(k for k in kinds if k in THREE_D)}) "
                                f"models; give runs of one kind, or pass --allow-mixed to average their "
                                f"probabilities")
    mult = input_multiple(groups["3d"], 3) if "3d" in groups else (1, 1, 1)
    patch = tuple(max(p[i] for p in patches) for i in range(3)) if patches else None
    return Ensemble(groups, paths, patch, mult, len(paths), names)


def case_window(ens: Ensemble, shape, window=None) -> tuple:
    """3D window (D, H, W) for a volume of ``shape``: ``window`` (must divide by ens.multiple), else the runs'
    patch_size, else DEFAULT_WINDOW, rounded up to ens.multiple; capped at the shape rounded up to it."""
    m = ens.multiple
    if window is not None:
        window = tuple(int(v) for v in window)
        if len(window) != 3 or min(window) < 1 or any(w % k for w, k in zip(window, m)):
            raise PredictInputError(f"--window {window} must be three positive sizes (D, H, W) divisible by the "
                                    f"models' input multiple {m}")
    else:
        window = ens.patch_size or DEFAULT_WINDOW
    up = [int(math.ceil(w / k)) * k for w, k in zip(window, m)]
    cap = [int(math.ceil(s / k)) * k for s, k in zip(shape, m)]
    return tuple(min(a, b) for a, b in zip(up, cap))


def predict_probability(ens: Ensemble, image01: np.ndarray, window=None, overlap: float = 0.5, batch: int = 2,
                        tta: bool = False, amp: bool | str = True, channels_last: bool = False) -> np.ndarray:
    """Mean foreground probability (z, y, x) float32 over every model of ``ens`` for a [0, 1]-scaled image.

    Each group runs through ahnet.evaluate.predict_case (3D: sliding windows over case_window; mcgcn: slice by
    slice); groups are averaged weighted by their model counts, so the result is the mean over all models.
    """
    total = None
    for key, models in ens.groups.items():
        if key == "3d":
            p = predict_case(models, "ahnet", image01, window=case_window(ens, image01.shape, window),
                             overlap=overlap, batch_size=batch, flip_tta=tta, amp=amp,
                             channels_last=channels_last)
        else:
            p = predict_case(models, "mcgcn", image01, batch_size=batch, flip_tta=tta, amp=amp, in_slices=key[1])
        if len(ens.groups) == 1:
            return p
        p *= len(models)
        total = p if total is None else np.add(total, p, out=total)
    total /= ens.n_models
    return total


# ----------------------------------------------------------------------------------------------------- driver

def scale_in_place(hu: np.ndarray, slab: int = 16) -> np.ndarray:
    """HU (z, y, x) float32 -> [0, 1] in place by ahnet.data.preprocess.clip_and_scale, ``slab`` slices at a time
    (its temporaries stay slab-sized instead of four full-size copies). Returns ``hu``."""
    if hu.dtype != np.float32 or not hu.flags.writeable:
        raise PredictInputError(f"scale_in_place needs a writeable float32 array; got {hu.dtype}")
    for z in range(0, hu.shape[0], slab):
        hu[z:z + slab] = clip_and_scale(hu[z:z + slab])
    return hu


def _progress(items, **kw):
    from tqdm import tqdm
    quiet = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
    return tqdm(items, disable=quiet, file=sys.stderr, **kw)


def predict_cases(cases, ens: Ensemble, out, window=None, overlap: float = 0.5, batch: int = 2, tta: bool = False,
                  amp: bool | str = True, threshold: float = 0.5, method: str = "components",
                  min_distance_mm: float = 5.0, channels_last: bool = False) -> dict:
    """Predict every Case, writing <out>/<case_id>_prob.nii.gz, _mask.nii.gz and <out>/candidates.csv.

    One case in memory at a time (image, scaled image, probability map; accumulators inside ahnet.infer).
    Returns {"cases": [case_id], "candidates": n rows, "csv": path}.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PredictInputError(f"--out {out} is a file; expected a folder (created if missing)")
    if not 0.0 <= threshold <= 1.0:
        raise PredictInputError(f"--threshold {threshold} must be a probability in [0, 1]")
    if window is not None:
        case_window(ens, (1, 1, 1), window)                 # check --window before the first case
    first = next(iter(ens.groups.values()))[0]
    try:                                                    # and --amp
        resolve_amp(amp, next(first.parameters()).device)
    except ValueError as e:
        raise PredictInputError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    rows, done = [], []
    for case in _progress(cases, desc="predict", unit="case"):
        vol = io.read_image(case.image)
        scale_in_place(vol.array)
        prob = predict_probability(ens, vol.array, window=window, overlap=overlap, batch=batch, tta=tta, amp=amp,
                                   channels_last=channels_last)
        vol.array = None
        io.write_image(out / f"{case.case_id}_prob.nii.gz", prob.astype(np.float32, copy=False), like=vol)
        io.write_image(out / f"{case.case_id}_mask.nii.gz", (prob >= threshold).astype(np.uint8), like=vol)
        rows += extract_candidates(prob, vol, seriesuid=case.case_id, threshold=threshold, method=method,
                                   min_distance_mm=min_distance_mm)
        del prob, vol
        done.append(case.case_id)
    csv_path = io.write_candidates_csv(out / "candidates.csv", rows)
    return {"cases": done, "candidates": len(rows), "csv": csv_path}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise PredictInputError(f"--device {name!r} is not a device; expected auto, cpu or cuda[:i]") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PredictInputError(f"--device {name} asked for CUDA but torch sees no GPU; use --device cpu or auto")
    return dev


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ahnet.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="image file, DICOM folder, folder of images, or dataset.json")
    ap.add_argument("--split", default=None, help="dataset.json split(s) to predict, comma-separated (default all)")
    ap.add_argument("--runs", nargs="+", required=True,
                    help="run folders, checkpoint files, or a folder of fold*/checkpoints/best.pt (ensemble mean)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--window", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                    help="3D window (default: the runs' patch_size, else %s)" % (DEFAULT_WINDOW,))
    ap.add_argument("--overlap", type=float, default=0.5, help="window overlap fraction in [0, 1)")
    ap.add_argument("--batch", type=int, default=2, help="windows per forward pass (x4 slices for 2D models)")
    ap.add_argument("--tta", action="store_true", help="mean over the 4 in-plane flips")
    ap.add_argument("--amp", choices=("auto", "fp16", "bf16", "off"), default="auto",
                    help="autocast: auto = float16 on CUDA, float32 on a CPU; bf16 = bfloat16 (about 2x faster on a "
                         "CPU with native bfloat16, e.g. AVX512-BF16 / AMX); fp16 (CUDA); off")
    ap.add_argument("--channels-last", action="store_true",
                    help="3D models in channels-last 3D memory (same values; faster with --amp bf16 / AMP)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    ap.add_argument("--threshold", type=float, default=0.5, help="mask and candidate threshold on probability")
    ap.add_argument("--candidates", choices=("components", "maxima"), default="components")
    ap.add_argument("--min-distance-mm", type=float, default=5.0, help="local-maxima neighbourhood half size")
    ap.add_argument("--allow-mixed", action="store_true", help="allow 2D and 3D models in one ensemble")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        cases = find_cases(a.input, a.split)
        ens = load_ensemble(a.runs, _device(a.device), allow_mixed=a.allow_mixed)
        res = predict_cases(cases, ens, a.out, window=a.window, overlap=a.overlap, batch=a.batch, tta=a.tta,
                            amp=a.amp, threshold=a.threshold, method=a.candidates,
                            min_distance_mm=a.min_distance_mm, channels_last=a.channels_last)
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(res['cases'])} case(s), {ens.n_models} model(s) -> {Path(a.out)}; "
          f"{res['candidates']} candidates in {res['csv']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
