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

Per case: HU clipped to [-1000, 400] and scaled to [0, 1] (as the training cache); a scan whose pixels differ from
the models' training spacing (recorded in their checkpoints) by more than 1% is resampled in-plane to it, predicted
there and its maps brought back to its own grid (``--inplane-spacing``, ahnet.infer.spacing; slices never); writes
``<out>/<case_id>_prob.nii.gz`` (float32) and ``<out>/<case_id>_mask.nii.gz`` (uint8, prob >= threshold) with the
input's spacing, origin and direction, then drops the case's arrays before the next one. ``<out>/candidates.csv``
holds seriesuid,coordX,coordY,coordZ,probability (world LPS mm) for the whole set, by the candidate rule of
``--candidates`` and its flags (default ahnet.infer.DEFAULT_RULE: local maxima with p >= 0.02, NMS in world mm,
merging, sub-voxel centres; ``--candidates components --candidate-threshold 0.5`` gives the older components).
With ``--rescore`` (one run folder) its second stage (``RUN/rescorer.pt``, ``python -m ahnet.rescore``) rescores
every candidate to sqrt(p1 x p2), the first stage's score kept in a column ``probability_stage1``.

Where people look (ahnet.infer.outputs): ``<out>/<case_id>_overview.png`` for every case (``--no-preview``: none),
the axial slices through the most probable candidates, each circled with its rank and probability, beside a
coronal projection locating them. A DICOM series in also gets ``<case_id>_seg.dcm`` (the mask as a DICOM
Segmentation referencing the series and each of its slices, the algorithm named "ahnet <runs>" with ahnet's
version) and ``<case_id>_sr.dcm`` (a DICOM SR measurement report, TID 1500: one finding per candidate with
probability >= ``--sr-threshold``, default 0.5: centre in patient coordinates, estimated diameter in mm,
probability), written with highdicom (the ``dicom`` extra); ``--no-dicom-out`` leaves them out, ``--dicom-out``
requires them (every input a DICOM series).

Window (3D): the one rule of ahnet.infer.window_for: ``--window``, else the largest ``patch_size`` in the runs'
training configs, else DEFAULT_WINDOW; rounded up to the models' input multiple and never larger than the volume
rounded up to that multiple. Bad input (missing file, folder without images, a file that is not a checkpoint,
mismatched runs, an option out of range, an --out that is a file or not writable) prints one line
``ahnet.commands.predict: error: ...`` and exits with code 2 before anything is written.

Batches: a scan that fails (corrupt, no sense as CT) stops the run with exit code 2, after writing the candidates
of the scans done before it; with ``--skip-bad`` the run goes on, names each failure in a warning line, and exits
with code 1 at the end (the scans that succeeded have their files and candidates). One predict at a time writes
into an --out folder (a lock; a second one is refused); temporary files of a killed run are removed.

This module imports the inference stage only, never the evaluation modules.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ahnet import failures, paths
from ahnet.data.budget import add_limit_argument, scan_limit
from ahnet.infer import WindowSettings, add_candidate_arguments, add_window_arguments, load_ensemble
from ahnet.infer import rule_from_arguments
from ahnet.infer.outputs import add_output_arguments, check_outputs, outputs_from_arguments
from ahnet.infer.scans import PredictInputError, find_cases, predict_cases
from ahnet.infer.second_stage import load_run_rescorer
from ahnet.infer.spacing import add_inplane_argument
from ahnet.precision import AMP_MODES

PROG = "ahnet.predict"


def build_parser() -> failures.Parser:
    ap = failures.Parser(PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="image file, DICOM folder, folder of images, or dataset.json")
    ap.add_argument("--split", default=None, help="dataset.json split(s) to predict, comma-separated (default all)")
    ap.add_argument("--runs", nargs="+", required=True,
                    help="run folders, checkpoint files, or cross-validations (X for X-fold<k>); ensemble mean")
    ap.add_argument("--out", required=True, help="output folder")
    add_window_arguments(ap)
    add_inplane_argument(ap)
    ap.add_argument("--workers", type=failures.number(int, 1, 256), default=1,
                    help="threads predicting 3D windows side by side, one intra-op thread each (on an N-core CPU, N "
                         "uses the cores better than one forward on N threads; the same result)")
    ap.add_argument("--tta", action="store_true", help="mean over the 4 in-plane flips")
    ap.add_argument("--amp", choices=AMP_MODES, default="auto",
                    help="autocast: auto = float16 on CUDA, float32 on a CPU; bf16 = bfloat16 (about 2x faster on a "
                         "CPU with native bfloat16, e.g. AVX512-BF16 / AMX); fp16 (CUDA); off")
    ap.add_argument("--channels-last", action="store_true",
                    help="3D models in channels-last 3D memory (same values; faster with --amp bf16 / AMP)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    ap.add_argument("--threshold", type=failures.number(float, 0, 1, what="a probability"), default=0.5,
                    help="mask threshold on probability, in [0, 1]")
    add_candidate_arguments(ap)
    ap.add_argument("--rescore", action="store_true",
                    help=f"rescore the candidates by the run's second stage (RUN/{paths.RESCORER}, python -m ahnet.rescore); "
                         "one run folder")
    ap.add_argument("--rescore-any-rule", action="store_true",
                    help="with --rescore: apply the second stage to candidates of another rule than it learnt on")
    add_output_arguments(ap)
    ap.add_argument("--allow-mixed", action="store_true", help="allow 2D and 3D models in one ensemble")
    ap.add_argument("--skip-bad", action="store_true",
                    help="go on past scans that fail (each named in a warning); exit code 1 at the end if any did")
    add_limit_argument(ap)
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    return failures.run(PROG, lambda: _main(a))


def _main(a) -> int:
    failures.check_output_dir(a.out, "--out")
    windows, rule = WindowSettings.from_arguments(a), rule_from_arguments(a)
    cases = find_cases(a.input, a.split)
    outputs = check_outputs(cases, outputs_from_arguments(a, "ahnet " + " ".join(Path(r).name for r in a.runs)))
    ens = load_ensemble(a.runs, a.device, allow_mixed=a.allow_mixed)
    rescorer = None
    if a.rescore:
        if len(a.runs) != 1:
            raise PredictInputError(f"--rescore takes one run folder in --runs: its {paths.RESCORER} learnt that run's "
                                    "candidates")
        rescorer = load_run_rescorer(a.runs[0], ens.device, rule, a.rescore_any_rule)
    res = predict_cases(cases, ens, a.out, windows, tta=a.tta, amp=a.amp, threshold=a.threshold, candidates=rule,
                        channels_last=a.channels_last, skip_bad=a.skip_bad, rescorer=rescorer,
                        limit=scan_limit("predict", a.max_scan_voxels), outputs=outputs, workers=a.workers,
                        inplane=a.inplane_spacing)
    print(f"{len(res['cases'])} case(s), {ens.n_models} model(s) -> {Path(a.out)}; "
          f"{res['candidates']} candidates in {res['csv']}; {res['overviews']} overview picture(s)"
          + (f"; DICOM SEG and SR for {len(res['dicom'])} case(s)" if res["dicom"] else ""))
    if res["failed"]:
        ids = [cid for cid, _ in res["failed"]]
        return failures.fail(PROG, f"{len(ids)} of {len(cases)} case(s) failed ({', '.join(ids[:5])}"
                              f"{', ...' if len(ids) > 5 else ''}); the other {len(res['cases'])} are in {a.out}", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
