"""Whole-volume inference: probability maps, masks and one LUNA16 candidates CSV for a set of scans.

    python -m ahnet.predict --input scans/ --runs runs/ahnet_cv --out pred/ [--tta] [--window D H W]

Inputs (``--input``): one image file (.nii, .nii.gz, .mha, .mhd, .nrrd), a DICOM series folder, a folder of image
files (not recursive; other and hidden files are ignored), or a Decathlon ``dataset.json``: its "training" cases and
its "test" list (paths or objects, as the Medical Segmentation Decathlon's test-only datasets; split "test"),
``--split`` picks (default all). case_id = the file name without its suffix, the DICOM folder's name, or the
dataset's ``case_id``. Every scan is checked for sense as CT in HU (ahnet.data.checks) when it is read.

Models (``--runs``): run folders (their trained checkpoint), checkpoint files, a folder of ``fold<k>`` runs, or
the name ``runs/X`` of a cross-validation that ``ahnet.train --all-folds`` wrote as sibling folders
``runs/X-fold0 .. runs/X-fold<K-1>`` (every fold model; ahnet.paths resolves them). Several models form an
ensemble (ahnet.infer): the mean of their sigmoid probabilities. 3D models run by Gaussian-blended sliding
windows, 2D models (registry dims 2, e.g. mcgcn) slice by slice on ``in_slices``-slice stacks. Mixing 2D and 3D
models is refused unless ``--allow-mixed``, which then averages them, each model weighted equally.

Per case: HU clipped to [-1000, 400] and scaled to [0, 1] (as the training cache), native spacing; writes
``<out>/<case_id>_prob.nii.gz`` (float32) and ``<out>/<case_id>_mask.nii.gz`` (uint8, prob >= threshold) with the
input's spacing, origin and direction, then drops the case's arrays before the next one. ``<out>/candidates.csv``
holds seriesuid,coordX,coordY,coordZ,probability (world LPS mm) for the whole set, by the candidate rule of
``--candidates`` and its flags (default ahnet.infer.DEFAULT_RULE: local maxima with p >= 0.02, NMS in world mm,
merging, sub-voxel centres; ``--candidates components --candidate-threshold 0.5`` gives the older components).
With ``--rescore`` (one run folder) its second stage (``RUN/rescorer.pt``, ``python -m ahnet.rescore``) rescores
every candidate to sqrt(p1 x p2), the first stage's score kept in a column ``probability_stage1``.

Window (3D): the one rule of ahnet.infer.window_for: ``--window``, else the largest ``patch_size`` in the runs'
training configs, else DEFAULT_WINDOW; rounded up to the models' input multiple and never larger than the volume
rounded up to that multiple. Bad input (missing file, folder without images, a file that is not a checkpoint,
mismatched runs, an option out of range, an --out that is a file or not writable) prints one line
``ahnet.predict: error: ...`` and exits with code 2 before anything is written.

Batches: a scan that fails (corrupt, no sense as CT) stops the run with exit code 2, after writing the candidates
of the scans done before it; with ``--skip-bad`` the run goes on, names each failure in a warning line, and exits
with code 1 at the end (the scans that succeeded have their files and candidates). One predict at a time writes
into an --out folder (a lock; a second one is refused); temporary files of a killed run are removed.

This module imports the inference stage only, never the evaluation modules.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ahnet import cli
from ahnet.atomic import folder_lock, remove_temps
from ahnet.data import io
from ahnet.data.preprocess import clip_and_scale
from ahnet.infer import (DEFAULT_WINDOW, CandidateRule, Ensemble, add_candidate_arguments, candidate_rule,
                    extract_candidates, load_ensemble, predict_volume, rule_from_arguments)
from ahnet.infer.rescore import Rescorer, load_run_rescorer, rescore_candidates
from ahnet.precision import AMP_MODES

PROG = "ahnet.predict"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


class PredictInputError(ValueError):
    """An input or option that prediction cannot use; the message is one sentence naming it."""


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
            entries = io.load_dataset_json(p, ("training", "test"))
            if split is not None:
                want = {s.strip() for s in str(split).split(",") if s.strip()}
                entries = [e for e in entries if e.get("split") in want]
                if not entries:
                    raise PredictInputError(f"{p} has no case with split {split!r}")
            if not entries:
                raise PredictInputError(f"{p} lists no cases under 'training' or 'test'")
            return [Case(e["case_id"], Path(e["image"])) for e in entries]
        stem = _image_stem(p)
        if stem is None:
            raise PredictInputError(f"input {p} is not an image file; expected .nii, .nii.gz, .mha, .mhd, .nrrd, "
                                    f"a folder or a dataset.json")
        return [Case(stem, p)]
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and _image_stem(f) is not None)
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
    """A progress bar on stderr, unless cli.quiet() (CI, or stderr is no terminal: an error line stays alone)."""
    from tqdm import tqdm
    return tqdm(items, disable=cli.quiet(), file=sys.stderr, **kw)


def check_options(cases, ens: Ensemble, out, window=None, amp: bool | str = "auto", threshold: float = 0.5,
                  overlap: float = 0.5, sw_batch: int = 2, skip_bad: bool = False) -> Path:
    """Every option and the output place, before any scan is read (PredictInputError in one sentence); without
    ``skip_bad`` also that every scan exists. Returns --out as a Path."""
    out = cli.check_output_dir(out, "--out")
    if not 0.0 <= threshold <= 1.0:
        raise PredictInputError(f"--threshold {threshold} must be a probability in [0, 1]")
    if not 0.0 <= overlap < 1.0:
        raise PredictInputError(f"--overlap {overlap} must be a fraction in [0, 1)")
    if int(sw_batch) < 1:
        raise PredictInputError(f"--sw-batch {sw_batch} must be >= 1")
    ens.check(window, amp)                                  # --window and --amp before the first case
    missing = [c for c in cases if not Path(c.image).exists()]
    if missing and not skip_bad:
        raise PredictInputError(f"scan {missing[0].image} of case {missing[0].case_id} not found"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                + "; fix the input or pass --skip-bad to predict the others")
    return out


def _predict_case(case: Case, out: Path, probability, threshold: float, rule: CandidateRule,
                  rescorer: Rescorer | None = None) -> list:
    """One scan -> its _prob and _mask files (each written atomically) and its candidate rows (rescored by the
    second stage when ``rescorer`` is given)."""
    vol = io.read_scan(case.image)
    scale_in_place(vol.array)
    prob = probability(vol.array)
    rows = extract_candidates(prob, vol, seriesuid=case.case_id, rule=rule)
    if rescorer is not None:
        rows = rescore_candidates(rescorer, rows, vol.array, prob, vol)
    vol.array = None
    io.write_image(out / f"{case.case_id}_prob.nii.gz", prob.astype(np.float32, copy=False), like=vol)
    io.write_image(out / f"{case.case_id}_mask.nii.gz", (prob >= threshold).astype(np.uint8), like=vol)
    return rows


def write_predictions(cases, out, probability, threshold: float = 0.5, candidates: CandidateRule | None = None,
                      skip_bad: bool = False, rescorer: Rescorer | None = None) -> dict:
    """Every Case through ``probability`` (a (z, y, x) image scaled to [0, 1] -> (z, y, x) float32 probabilities),
    writing <out>/<case_id>_prob.nii.gz, _mask.nii.gz (prob >= threshold) and <out>/candidates.csv (by the rule
    ``candidates``, default ahnet.infer.DEFAULT_RULE; rescored by ``rescorer``, the run's second stage, when
    given, the first stage's score kept as probability_stage1), with --out locked.

    One case in memory at a time. A scan that fails: the candidates of the scans done are written, then
    PredictInputError, or with ``skip_bad`` a warning and the next scan.
    Returns {"cases": [case_id], "failed": [(case_id, message)], "candidates": n rows, "csv": path}.
    """
    out, rule = Path(out), candidate_rule(candidates)
    rows, done, failed = [], [], []
    with folder_lock(out, "--out"):
        remove_temps(out, only_dead=False)
        for case in _progress(cases, desc="predict", unit="case"):
            try:
                rows += _predict_case(case, out, probability, threshold, rule, rescorer)
            except (ValueError, OSError) as e:
                why = cli.one_line(e).rstrip(".")
                failed.append((case.case_id, why))
                if not skip_bad:
                    done_note = ""
                    if done:                                 # the scans that succeeded keep their candidates
                        csv_path = io.write_candidates_csv(out / "candidates.csv", rows)
                        done_note = f"; the candidates of the {len(done)} case(s) before it are in {csv_path}"
                    raise PredictInputError(f"case {case.case_id}: {why}{done_note} (--skip-bad goes on past bad "
                                            f"scans)") from None
                cli.warn(PROG, f"skipped case {case.case_id}: {why}")
                continue
            done.append(case.case_id)
        csv_path = io.write_candidates_csv(out / "candidates.csv", rows,
                                           ["probability_stage1"] if rescorer is not None else ())
    return {"cases": done, "failed": failed, "candidates": len(rows), "csv": csv_path}


def predict_cases(cases, ens: Ensemble, out, window=None, overlap: float = 0.5, sw_batch: int = 2,
                  tta: bool = False, amp: bool | str = "auto", threshold: float = 0.5,
                  candidates: CandidateRule | None = None, channels_last: bool = False, skip_bad: bool = False,
                  rescorer: Rescorer | None = None) -> dict:
    """Predict every Case with the ensemble (ahnet.infer.predict_volume; accumulators inside ahnet.infer) and
    write its files (write_predictions), the options checked first (check_options)."""
    out = check_options(cases, ens, out, window, amp, threshold, overlap, sw_batch, skip_bad)

    def probability(image01):
        return predict_volume(ens, image01, window=window, overlap=overlap, sw_batch=sw_batch, tta=tta, amp=amp,
                              channels_last=channels_last)
    return write_predictions(cases, out, probability, threshold, candidates, skip_bad, rescorer)


def build_parser() -> cli.Parser:
    ap = cli.Parser(PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="image file, DICOM folder, folder of images, or dataset.json")
    ap.add_argument("--split", default=None, help="dataset.json split(s) to predict, comma-separated (default all)")
    ap.add_argument("--runs", nargs="+", required=True,
                    help="run folders, checkpoint files, or cross-validations (X for X-fold<k>); ensemble mean")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--window", type=cli.number(int, 1, 4096), nargs=3, default=None, metavar=("D", "H", "W"),
                    help="3D window (default: the runs' patch_size, else %s)" % (DEFAULT_WINDOW,))
    ap.add_argument("--overlap", type=cli.number(float, 0, 1, hi_open=True), default=0.5,
                    help="window overlap fraction in [0, 1)")
    ap.add_argument("--sw-batch", type=cli.number(int, 1, 4096), default=2,
                    help="windows per forward pass (x4 slices for 2D models)")
    ap.add_argument("--tta", action="store_true", help="mean over the 4 in-plane flips")
    ap.add_argument("--amp", choices=AMP_MODES, default="auto",
                    help="autocast: auto = float16 on CUDA, float32 on a CPU; bf16 = bfloat16 (about 2x faster on a "
                         "CPU with native bfloat16, e.g. AVX512-BF16 / AMX); fp16 (CUDA); off")
    ap.add_argument("--channels-last", action="store_true",
                    help="3D models in channels-last 3D memory (same values; faster with --amp bf16 / AMP)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    ap.add_argument("--threshold", type=cli.number(float, 0, 1, what="a probability"), default=0.5,
                    help="mask threshold on probability, in [0, 1]")
    add_candidate_arguments(ap)
    ap.add_argument("--rescore", action="store_true",
                    help="rescore the candidates by the run's second stage (RUN/rescorer.pt, python -m ahnet.rescore); "
                         "one run folder")
    ap.add_argument("--allow-mixed", action="store_true", help="allow 2D and 3D models in one ensemble")
    ap.add_argument("--skip-bad", action="store_true",
                    help="go on past scans that fail (each named in a warning); exit code 1 at the end if any did")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    return cli.run(PROG, lambda: _main(a))


def _main(a) -> int:
    cli.check_output_dir(a.out, "--out")
    rule = rule_from_arguments(a)
    cases = find_cases(a.input, a.split)
    ens = load_ensemble(a.runs, a.device, allow_mixed=a.allow_mixed)
    rescorer = None
    if a.rescore:
        if len(a.runs) != 1:
            raise PredictInputError("--rescore takes one run folder in --runs: its rescorer.pt learnt that run's "
                                    "candidates")
        rescorer = load_run_rescorer(a.runs[0], ens.device)
    res = predict_cases(cases, ens, a.out, window=a.window, overlap=a.overlap, sw_batch=a.sw_batch, tta=a.tta,
                        amp=a.amp, threshold=a.threshold, candidates=rule, channels_last=a.channels_last,
                        skip_bad=a.skip_bad, rescorer=rescorer)
    print(f"{len(res['cases'])} case(s), {ens.n_models} model(s) -> {Path(a.out)}; "
          f"{res['candidates']} candidates in {res['csv']}")
    if res["failed"]:
        ids = [cid for cid, _ in res["failed"]]
        return cli.fail(PROG, f"{len(ids)} of {len(cases)} case(s) failed ({', '.join(ids[:5])}"
                              f"{', ...' if len(ids) > 5 else ''}); the other {len(res['cases'])} are in {a.out}", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
