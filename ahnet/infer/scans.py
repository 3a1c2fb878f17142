"""Predicting whole scans: the scans an input names (``find_cases``), their HU scaled as in training, and what
the prediction of each writes (``write_predictions``: probability map, mask, the overview picture, a DICOM SEG and
SR for a DICOM series, one candidates CSV; names in ahnet.paths), atomically and one case in memory at a time.
``python -m ahnet.predict`` (ahnet.commands.predict) and the Triton client both write through here. This module
imports the inference stage only, never the evaluation modules."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ahnet import failures, paths
from ahnet.atomic import DiskFull, atomic_paths, folder_lock, remove_temps
from ahnet.data import io
from ahnet.data.budget import ScanLimit, scan_limit
from ahnet.data.header import ScanHeader, read_header
from ahnet.data.preprocess import clip_and_scale
from ahnet.infer import CandidateRule, Ensemble, WindowSettings, candidate_rule, extract_candidates, predict_volume
from ahnet.infer.outputs import (CaseOutputs, check_outputs, dicom_sources, ranked_findings, write_dicom_files,
                                 write_overview_file)
from ahnet.infer.second_stage import Rescorer, rescore_candidates
from ahnet.infer.spacing import PredictionGrid, prediction_voxels, resolve_inplane



class PredictInputError(ValueError):
    """An input or option that prediction cannot use; the message is one sentence naming it."""


@dataclass
class Case:
    """One scan to predict: case_id (output file stem and CSV seriesuid) and image path (file or DICOM folder)."""
    case_id: str
    image: Path


def _image_stem(path: Path):
    """File name without an image suffix, or None when the name has no image suffix."""
    low = path.name.lower()
    for s in io.IMAGE_SUFFIXES:
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
            raise PredictInputError(f"input {p} is not an image file; expected {', '.join(io.IMAGE_SUFFIXES)}, "
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
    raise PredictInputError(f"folder {p} holds no images; expected {'/'.join(io.IMAGE_SUFFIXES)} files or a "
                            f"DICOM series")


def scale_in_place(hu: np.ndarray, slab: int = 16) -> np.ndarray:
    """HU (z, y, x) float32 -> [0, 1] in place by ahnet.data.preprocess.clip_and_scale, ``slab`` slices at a time
    (its temporaries stay slab-sized instead of four full-size copies). Returns ``hu``."""
    if hu.dtype != np.float32 or not hu.flags.writeable:
        raise PredictInputError(f"scale_in_place needs a writeable float32 array; got {hu.dtype}")
    for z in range(0, hu.shape[0], slab):
        hu[z:z + slab] = clip_and_scale(hu[z:z + slab])
    return hu


def _progress(items, **kw):
    """A progress bar on stderr, unless failures.quiet() (CI, or stderr is no terminal: an error line stays alone)."""
    from tqdm import tqdm
    return tqdm(items, disable=failures.quiet(), file=sys.stderr, **kw)


def check_options(cases, ens: Ensemble, out, window=None, amp: bool | str = "auto", threshold: float = 0.5,
                  skip_bad: bool = False) -> Path:
    """Every option and the output place, before any scan is read (PredictInputError in one sentence; the window
    settings checked themselves when built); without ``skip_bad`` also that every scan exists. Returns --out as a
    Path."""
    out = failures.check_output_dir(out, "--out")
    if not 0.0 <= threshold <= 1.0:
        raise PredictInputError(f"--threshold {threshold} must be a probability in [0, 1]")
    ens.check(window, amp)                                  # --window and --amp before the first case
    missing = [c for c in cases if not Path(c.image).exists()]
    if missing and not skip_bad:
        raise PredictInputError(f"scan {missing[0].image} of case {missing[0].case_id} not found"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                + "; fix the input or pass --skip-bad to predict the others")
    return out


@dataclass(frozen=True)
class CheckedInput:
    """What the up-front checks learnt, for write_predictions to use instead of checking again: the ScanLimit
    the scans passed, each scan's header by image path (check_scan_sizes; none for a bad scan that skip_bad left
    to its turn), the output options as ahnet.infer.outputs.check_outputs returned them, and the in-plane spacing
    (sy, sx) mm the scans are predicted at (ahnet.infer.spacing; None: each on its own grid)."""
    limit: ScanLimit
    headers: dict
    outputs: CaseOutputs
    inplane: tuple | None = None


def check_scan_sizes(cases, limit: ScanLimit, skip_bad: bool = False, inplane: tuple | None = None,
                     known: dict | None = None) -> dict:
    """Every scan's header read once and checked against ``limit`` before any scan is read or anything written
    (PredictInputError naming the case), at the larger of its own grid and the grid it is predicted on
    (``inplane``, ahnet.infer.spacing); with ``skip_bad`` a bad one is left for its turn (skipped then).
    ``known``: headers an earlier call returned, used instead of reading them again. Returns {image Path:
    ScanHeader} of the scans that passed, for their reading (io.read_scan's ``header``)."""
    headers: dict[Path, ScanHeader] = {}
    for case in cases:
        if skip_bad and not Path(case.image).exists():
            continue
        try:
            head = (known or {}).get(Path(case.image)) or read_header(case.image)
            limit.check(head, prediction_voxels(head, [inplane]))
            headers[Path(case.image)] = head
        except ValueError as e:
            if not skip_bad:
                raise PredictInputError(f"case {case.case_id}: {failures.one_line(e).rstrip('.')} (nothing was "
                                        f"written)") from None
    return headers


def _predict_case(case: Case, out: Path, probability, threshold: float, rule: CandidateRule,
                  rescorer: Rescorer | None, outputs: CaseOutputs, limit: ScanLimit | None = None,
                  header: ScanHeader | None = None, inplane: tuple | None = None) -> tuple:
    """One scan (its ``header`` as read up front, else read here) -> its files (ahnet.paths.case_paths: _prob and
    _mask written atomically together, the overview, for a DICOM series the SEG and SR; each written atomically)
    and its candidate rows (rescored by the second stage when ``rescorer`` is given), predicted at in-plane
    spacing ``inplane`` (ahnet.infer.spacing: candidates on that grid, the maps back on the scan's). Returns
    (rows, {"overview": bool, "dicom": bool})."""
    vol = io.read_scan(case.image, limit=limit, header=header)
    dicom = dicom_sources(case, vol, outputs)              # the source headers before the work: fails early
    scale_in_place(vol.array)
    grid = PredictionGrid.for_scan(vol, inplane)
    work = grid.working(vol.array)
    prob_work = probability(work.array)
    rows = extract_candidates(prob_work, work, seriesuid=case.case_id, rule=rule)
    if rescorer is not None:
        rows = rescore_candidates(rescorer, rows, work.array, prob_work, work)
    prob = grid.to_native(prob_work)
    del work, prob_work
    files = paths.case_paths(out, case.case_id)
    findings = ranked_findings(rows, prob, vol, outputs)
    wrote = {"overview": write_overview_file(files.overview, case.case_id, vol.array, prob, vol, findings, outputs)}
    vol.array = None
    mask = prob >= threshold
    with atomic_paths([files.prob, files.mask]) as (prob_tmp, mask_tmp):   # both or neither: a full disk keeps the old
        io.write_image(prob_tmp, prob.astype(np.float32, copy=False), like=vol)
        io.write_image(mask_tmp, mask.astype(np.uint8), like=vol)
    wrote["dicom"] = write_dicom_files(files, mask, findings, dicom, threshold, outputs)
    return rows, wrote


def write_predictions(cases, out, probability, threshold: float = 0.5, candidates: CandidateRule | None = None,
                      skip_bad: bool = False, rescorer: Rescorer | None = None, limit: ScanLimit | None = None,
                      outputs: CaseOutputs | None = None, checked: CheckedInput | None = None,
                      inplane: tuple | None = None) -> dict:
    """Every Case through ``probability`` (a (z, y, x) image scaled to [0, 1] -> (z, y, x) float32 probabilities),
    writing per case <out>/<case_id>_prob.nii.gz, _mask.nii.gz (prob >= threshold), _overview.png and for a
    DICOM series _seg.dcm and _sr.dcm (``outputs``, ahnet.infer.outputs.CaseOutputs: default all of them), and
    <out>/candidates.csv (by the rule ``candidates``, default ahnet.infer.DEFAULT_RULE; rescored by
    ``rescorer``, the run's second stage, when given, the first stage's score kept as probability_stage1), with
    --out locked. Each scan is predicted at in-plane spacing ``inplane`` (sy, sx) mm (ahnet.infer.spacing; None:
    on its own grid; inside ``checked`` when that is given). The output options are checked before anything is written.

    One case in memory at a time; every scan's header checked against ``limit`` (default: ahnet.data.budget's
    "predict" limit) before the first is read, and each read once. ``checked``: what the caller's up-front checks
    learnt (CheckedInput; then no ``limit`` or ``outputs`` beside it), used as it is. A scan that fails: the
    candidates of the scans done are written, then PredictInputError, or with ``skip_bad`` a warning and the next
    scan.
    Returns {"cases": [case_id], "failed": [(case_id, message)], "candidates": n rows, "csv": path,
    "overviews": n, "dicom": [case_id with a SEG and SR]}.
    """
    if checked is None:
        outputs = check_outputs(cases, outputs)
        limit = limit or scan_limit("predict")
        checked = CheckedInput(limit, check_scan_sizes(cases, limit, skip_bad, inplane), outputs, inplane)
    elif limit is not None or outputs is not None or inplane is not None:
        raise TypeError("write_predictions takes limit, outputs and inplane inside checked, not beside it")
    out, rule, outputs, limit = Path(out), candidate_rule(candidates), checked.outputs, checked.limit
    rows, done, failed, dicom, overviews = [], [], [], [], 0
    with folder_lock(out, "--out"):
        remove_temps(out, only_dead=False)
        for case in _progress(cases, desc="predict", unit="case"):
            try:
                case_rows, wrote = _predict_case(case, out, probability, threshold, rule, rescorer, outputs, limit,
                                                 checked.headers.get(Path(case.image)), checked.inplane)
            except DiskFull:
                raise                                        # not the scan's fault: no --skip-bad past it
            except (ValueError, OSError) as e:
                why = failures.one_line(e).rstrip(".")
                failed.append((case.case_id, why))
                if not skip_bad:
                    done_note = ""
                    if done:                                 # the scans that succeeded keep their candidates
                        csv_path = io.write_candidates_csv(out / paths.CANDIDATES_CSV, rows)
                        done_note = f"; the candidates of the {len(done)} case(s) before it are in {csv_path}"
                    raise PredictInputError(f"case {case.case_id}: {why}{done_note} (--skip-bad goes on past bad "
                                            f"scans)") from None
                failures.warn(failures.program(), f"skipped case {case.case_id}: {why}")
                continue
            rows += case_rows
            done.append(case.case_id)
            overviews += wrote["overview"]
            if wrote["dicom"]:
                dicom.append(case.case_id)
        csv_path = io.write_candidates_csv(out / paths.CANDIDATES_CSV, rows,
                                           ["probability_stage1"] if rescorer is not None else ())
    return {"cases": done, "failed": failed, "candidates": len(rows), "csv": csv_path, "overviews": overviews,
            "dicom": dicom}


def predict_cases(cases, ens: Ensemble, out, windows: WindowSettings = WindowSettings(), tta: bool = False,
                  amp: bool | str = "auto", threshold: float = 0.5, candidates: CandidateRule | None = None,
                  channels_last: bool = False, skip_bad: bool = False, rescorer: Rescorer | None = None,
                  limit: ScanLimit | None = None, outputs: CaseOutputs | None = None, workers: int = 1,
                  inplane="auto") -> dict:
    """Predict every Case with the ensemble (ahnet.infer.predict_volume with ``windows``, ``workers`` threads;
    accumulators inside ahnet.infer) at in-plane spacing ``inplane`` (auto, native or mm: ahnet.infer.spacing)
    and write its files (write_predictions, scans up to ``limit``), the options checked first (check_options)."""
    out = check_options(cases, ens, out, windows.window, amp, threshold, skip_bad)
    inplane = resolve_inplane(inplane, ens)
    if rescorer is not None:                  # the second stage computes as the first: precision, layout, threads
        rescorer = dataclasses.replace(rescorer, amp=amp, channels_last=channels_last, workers=workers)

    def probability(image01):
        return predict_volume(ens, image01, **windows.kwargs(), tta=tta, amp=amp, channels_last=channels_last,
                              workers=workers)
    return write_predictions(cases, out, probability, threshold, candidates, skip_bad, rescorer, limit, outputs,
                             inplane=inplane)
