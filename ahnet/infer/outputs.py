"""What a predicted case writes beside its probability map and mask: the overview picture and, for a DICOM series
in, a DICOM SEG of the mask and a DICOM SR of the findings (ahnet.infer.scans calls this per case).

Options (``CaseOutputs``; the command-line flags of ahnet.commands.predict and ahnet.commands.client through
``add_output_arguments``): ``dicom`` "auto" (default: a DICOM series in gets a SEG and an SR, other inputs are
unchanged), "on" (``--dicom-out``: every input must be a DICOM series and highdicom installed) or "off"
(``--no-dicom-out``); ``sr_threshold`` (``--sr-threshold``, default 0.5: the operating point, the candidate
probability from which a finding is reported in the SR and drawn solid in the overview; the threshold at 1
false positive per scan is not known at predict time, so a fixed default, equal to the mask's); ``preview``
(``<case>_overview.png``, ``--no-preview`` off); ``algorithm`` (the name and version the SEG and SR carry).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ahnet import __version__, failures
from ahnet.data import dicom_out
from ahnet.infer.findings import add_diameters, rank_candidates
from ahnet.infer.overview import TOP_MARKED, write_overview

DICOM_MODES = ("auto", "on", "off")
SR_THRESHOLD = 0.5


class OutputOptionError(ValueError):
    """An output option prediction cannot honour (one sentence)."""


@dataclass(frozen=True)
class CaseOutputs:
    """The options of the module docstring."""
    dicom: str = "auto"
    sr_threshold: float = SR_THRESHOLD
    preview: bool = True
    algorithm: dicom_out.Algorithm = dicom_out.Algorithm("ahnet", __version__)


def add_output_arguments(parser) -> None:
    """--dicom-out / --no-dicom-out, --sr-threshold and --no-preview on an argparse parser."""
    parser.add_argument("--dicom-out", dest="dicom", action="store_const", const="on", default="auto",
                        help="write a DICOM SEG and SR per case (default: for DICOM series inputs only); every "
                             "input must be a DICOM series")
    parser.add_argument("--no-dicom-out", dest="dicom", action="store_const", const="off",
                        help="no DICOM SEG and SR, even for DICOM series inputs")
    parser.add_argument("--sr-threshold", type=failures.number(float, 0, 1, what="a probability"),
                        default=SR_THRESHOLD,
                        help="operating point: candidates with probability >= this are the SR's findings "
                             "(default %(default)s)")
    parser.add_argument("--no-preview", dest="preview", action="store_false",
                        help="do not write the overview picture of each case")


def outputs_from_arguments(args, algorithm_name: str) -> CaseOutputs:
    """CaseOutputs from add_output_arguments' flags; ``algorithm_name``: what the SEG and SR name as their
    algorithm (the run or served model), with ahnet's version."""
    return CaseOutputs(dicom=args.dicom, sr_threshold=args.sr_threshold, preview=args.preview,
                       algorithm=dicom_out.Algorithm(algorithm_name, __version__))


def check_outputs(cases, outputs: CaseOutputs | None) -> CaseOutputs:
    """The options checked against the cases before anything is written (OutputOptionError in one sentence).
    "auto" without highdicom, while some input is a DICOM series: a warning, and DICOM out off."""
    outputs = outputs or CaseOutputs()
    if outputs.dicom not in DICOM_MODES:
        raise OutputOptionError(f"dicom output mode {outputs.dicom!r} is not one of {', '.join(DICOM_MODES)}")
    if not 0.0 <= outputs.sr_threshold <= 1.0:
        raise OutputOptionError(f"--sr-threshold {outputs.sr_threshold} must be a probability in [0, 1]")
    series = [c for c in cases if Path(c.image).is_dir()]
    if outputs.dicom == "on":
        other = [c for c in cases if not Path(c.image).is_dir()]
        if other:
            raise OutputOptionError(f"--dicom-out needs DICOM series inputs; case {other[0].case_id} is "
                                    f"{other[0].image} (pass --no-dicom-out, or leave both out: DICOM series only)")
        missing = dicom_out.highdicom_missing()
        if missing:
            raise OutputOptionError(f"--dicom-out: {missing}")
    elif outputs.dicom == "auto" and series and dicom_out.highdicom_missing():
        failures.warn(failures.program(), f"no DICOM SEG/SR for the DICOM series: {dicom_out.highdicom_missing()} "
                                          f"(--no-dicom-out silences this)")
        outputs = replace(outputs, dicom="off")
    return outputs


def dicom_sources(case, vol, outputs: CaseOutputs):
    """(series, source datasets) to write the case's SEG and SR about, read before the case is predicted; None
    when it gets none (not a DICOM series, DICOM out off, or under "auto" a series that cannot be referenced:
    a warning names why). Under "on" such a series is an error of the case (DicomOutError)."""
    if outputs.dicom == "off" or vol.dicom is None:
        if outputs.dicom == "on":
            raise dicom_out.DicomOutError(f"--dicom-out: {case.image} was not read as a DICOM series")
        return None
    try:
        return vol.dicom, dicom_out.source_datasets(vol.dicom)
    except dicom_out.DicomOutError as e:
        if outputs.dicom == "on":
            raise
        failures.warn(failures.program(), f"case {case.case_id}: no DICOM SEG/SR: {failures.one_line(e)}")
        return None


def ranked_findings(rows: list, prob: np.ndarray, geometry, outputs: CaseOutputs) -> list:
    """One case's candidates ranked (ahnet.infer.findings), with estimated diameters for the ones the overview
    circles and the SR reports."""
    findings = rank_candidates(rows, geometry)
    add_diameters([f for f in findings if f["rank"] <= TOP_MARKED or float(f["probability"]) >= outputs.sr_threshold],
                  prob, geometry.spacing)
    return findings


def write_overview_file(path, case_id: str, image01, prob, geometry, findings, outputs: CaseOutputs) -> bool:
    """The case's overview picture when ``outputs.preview``; True when written."""
    if outputs.preview:
        write_overview(path, image01, prob, geometry, findings, case_id, outputs.sr_threshold)
    return outputs.preview


def write_dicom_files(files, mask: np.ndarray, findings: list, dicom, threshold: float,
                      outputs: CaseOutputs) -> bool:
    """The case's SEG (``files.seg``) and SR (``files.sr``) when ``dicom`` (dicom_sources' pair); True when
    written."""
    if dicom is None:
        return False
    series, sources = dicom
    dicom_out.write_seg(files.seg, mask, series, outputs.algorithm, threshold, sources)
    dicom_out.write_sr(files.sr, findings, series, outputs.algorithm, outputs.sr_threshold, sources)
    return True
