"""Where things are on disk: the one owner of the project's file layout. Every module asks here.

Run folder (one training stage, ``python -m ahnet.train --out RUN``)::

    RUN/config.json            settings + versions (ahnet.train.config.save_run_config)
    RUN/log.csv                one row per epoch
    RUN/progress.png           loss, validation Dice and learning rate per epoch
    RUN/checkpoints/last.pt    written at every epoch end (and every --ckpt-every steps): --resume reads it
    RUN/checkpoints/best.pt    the epoch with the best validation score: what inference loads
    RUN/rescorer.pt            the run's second stage (python -m ahnet.rescore), with RUN/rescorer.json beside it
    RUN/rescorer-crops.pt      a second stage in progress: the crops it collected, then its training after the
    RUN/rescorer-fit.pt        last finished epoch (a killed one resumes from them; removed once rescorer.pt is)
    RUN/report/                an evaluation report (ahnet.evaluate): report.json, report.md, report.html, with
                               candidates/<run>.csv and evaluated/<run>.json (each run's evaluation and the
                               fingerprint it holds for: a rerun predicts only what changed)

Cross-validation (``--all-folds``): fold k of RUN is the sibling folder ``RUN-fold<k>``; a folder holding
``fold<k>/`` run folders is read the same way. The trained model of a run is ``best.pt``, else ``last.pt``.

Prediction folder (``python -m ahnet.predict --out PRED``, and ``python -m ahnet.client``), per case <id>::

    PRED/<id>_prob.nii.gz      the probability map (float32), on the input's grid
    PRED/<id>_mask.nii.gz      the mask (uint8, probability >= --threshold)
    PRED/<id>_overview.png     the picture of what the model found (--no-preview: not written)
    PRED/<id>_seg.dcm          for a DICOM series: the mask as a DICOM Segmentation referencing the series
    PRED/<id>_sr.dcm           for a DICOM series: the findings as a DICOM SR measurement report (TID 1500)
    PRED/candidates.csv        every case's candidates (LUNA16 columns, world LPS mm)

Datasets: a Decathlon-style ``dataset.json`` with its LUNA16-style ``annotations.csv`` beside it; the HDF5 cache
of a dataset lives in ``data/cache/<name of the dataset.json's folder>`` (relative to the working directory).

An experiment named N (``python -m ahnet.experiment``)::

    data/N/                    the training phantom (training, validation and its own test split)
    data/N-dev/                the development set: every choice is made on it
    data/N-final/              the sealed final test set, with looks.csv (one row per evaluation of it)
    data/N-final-<shift>/      the final set rendered with one shift (noise, kernel, spacing, vessels, HU)
    data/N-dev-<shift>/        dev rendered with one shift (where a lever that recovers a shift is chosen)
    runs/N/<variant>/          a variant's run (seed index 0); runs/N/<variant>-seed<k>/ its k-th retraining
    runs/N/report/             the report on dev; runs/N/report-final/ and report-final-<shift>/ on the final set
    runs/N/report-<shift>/     the report on a shifted dev set; runs/N/report[-final]-shifts/ the shift summary
    runs/N/report-final-thickness/  the slice-thickness study over N and its N-z<S> siblings (other spacings)
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CONFIG", "LOG", "PROGRESS", "CHECKPOINTS", "LAST", "BEST", "REPORT", "RESCORER", "RESCORER_JSON",
           "RESCORER_CROPS", "RESCORER_FIT",
           "REPORT_JSON", "REPORT_MD", "REPORT_HTML", "DATASET", "ANNOTATIONS", "CANDIDATES_CSV", "CasePaths",
           "case_paths", "DATA_ROOT", "CACHE_ROOT", "RUNS_ROOT", "DEV_SUFFIX", "FINAL_SUFFIX", "FINAL_LOOKS",
           "REPORT_CANDIDATES", "ExperimentPaths", "experiment_name", "report_candidates",
           "LayoutError", "RunPaths", "run_paths", "fold_run", "fold_runs",
           "trained_checkpoint", "resolve_checkpoints", "resolve_checkpoint", "cache_dir", "annotations_csv",
           "dataset_annotations"]

CONFIG = "config.json"
LOG = "log.csv"
PROGRESS = "progress.png"
CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
REPORT = "report"
RESCORER = "rescorer.pt"
RESCORER_JSON = "rescorer.json"
RESCORER_CROPS = "rescorer-crops.pt"
RESCORER_FIT = "rescorer-fit.pt"
REPORT_JSON, REPORT_MD, REPORT_HTML = "report.json", "report.md", "report.html"
REPORT_CANDIDATES = "candidates"        # <report>/candidates/<run>.csv: each evaluated run's candidates
REPORT_EVALUATED = "evaluated"          # <report>/evaluated/<run>.json: each run's evaluation, kept for reuse
DEV_SUFFIX, FINAL_SUFFIX = "-dev", "-final"
FINAL_LOOKS = "looks.csv"
DATASET = "dataset.json"
CANDIDATES_CSV = "candidates.csv"
ANNOTATIONS = "annotations.csv"

DATA_ROOT = Path("data")
CACHE_ROOT = DATA_ROOT / "cache"
RUNS_ROOT = Path("runs")

_FOLD = re.compile(r"fold(\d+)")


class LayoutError(ValueError):
    """A path that is not what the layout says it should be (one sentence naming it and what was expected)."""


@dataclass(frozen=True)
class RunPaths:
    """The files of one run folder (see the module docstring)."""
    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def log(self) -> Path:
        return self.root / LOG

    @property
    def progress(self) -> Path:
        return self.root / PROGRESS

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST

    @property
    def best(self) -> Path:
        return self.checkpoints / BEST

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def rescorer(self) -> Path:
        return self.root / RESCORER

    @property
    def rescorer_json(self) -> Path:
        return self.root / RESCORER_JSON

    @property
    def rescorer_crops(self) -> Path:
        return self.root / RESCORER_CROPS

    @property
    def rescorer_fit(self) -> Path:
        return self.root / RESCORER_FIT


@dataclass(frozen=True)
class CasePaths:
    """The files one predicted case writes into a prediction folder (see the module docstring)."""
    folder: Path
    case_id: str

    def _file(self, tail: str) -> Path:
        return self.folder / f"{self.case_id}{tail}"

    @property
    def prob(self) -> Path:
        return self._file("_prob.nii.gz")

    @property
    def mask(self) -> Path:
        return self._file("_mask.nii.gz")

    @property
    def overview(self) -> Path:
        return self._file("_overview.png")

    @property
    def seg(self) -> Path:
        return self._file("_seg.dcm")

    @property
    def sr(self) -> Path:
        return self._file("_sr.dcm")


def case_paths(folder: str | os.PathLike, case_id: str) -> CasePaths:
    return CasePaths(Path(folder), str(case_id))


def run_paths(run: str | os.PathLike) -> RunPaths:
    return RunPaths(Path(run))


def fold_run(run: str | os.PathLike, k: int) -> Path:
    """The run folder of fold k of a cross-validation named ``run``: ``<run>-fold<k>``."""
    run = Path(run)
    return run.with_name(f"{run.name}-fold{int(k)}")


def _fold_number(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    m = _FOLD.fullmatch(name[len(prefix):])
    return int(m.group(1)) if m else None


def fold_runs(run: str | os.PathLike) -> list[Path]:
    """The fold folders of ``run``, sorted by fold number (fold2 before fold10): the siblings ``<run>-fold<k>``
    that exist, or else the ``fold<k>`` folders inside ``run``. Empty when there are none."""
    run = Path(run)
    found = []
    if run.parent.is_dir():
        found = [(k, p) for p in run.parent.iterdir()
                 if p.is_dir() and (k := _fold_number(p.name, run.name + "-")) is not None]
    if not found and run.is_dir():
        found = [(k, p) for p in run.iterdir() if p.is_dir() and (k := _fold_number(p.name, "")) is not None]
    return [p for _, p in sorted(found)]


def trained_checkpoint(run: str | os.PathLike) -> Path | None:
    """The trained model of a run folder: checkpoints/best.pt, else checkpoints/last.pt, else None."""
    rp = run_paths(run)
    for p in (rp.best, rp.last):
        if p.is_file():
            return p
    return None


def resolve_checkpoints(arg: str | os.PathLike) -> list[Path]:
    """The checkpoint files an argument names: a checkpoint file; a run folder (its trained_checkpoint); a
    cross-validation (``<arg>-fold<k>`` siblings, or a folder of ``fold<k>`` run folders: every fold's trained
    checkpoint, sorted by k). Raises LayoutError naming the argument when it names none of these."""
    p = Path(arg)
    if p.is_file():
        return [p]
    if p.is_dir() and run_paths(p).checkpoints.is_dir():
        ck = trained_checkpoint(p)
        if ck is None:
            raise LayoutError(f"run folder {p} has neither {CHECKPOINTS}/{BEST} nor {CHECKPOINTS}/{LAST}; "
                              f"train it first (python -m ahnet.train --out {p})")
        return [ck]
    folds = fold_runs(p)
    if folds:
        missing = [f for f in folds if trained_checkpoint(f) is None]
        if missing:
            raise LayoutError(f"fold folder {missing[0]} of {p} has no {CHECKPOINTS}/{BEST} or {LAST}; train "
                              f"that fold first")
        return [trained_checkpoint(f) for f in folds]
    if p.is_dir():
        raise LayoutError(f"{p} is neither a run folder (no {CHECKPOINTS}/ inside) nor a folder of fold<k> runs")
    raise LayoutError(f"run {p} not found; expected a run folder, a checkpoint file or the name of "
                      f"{p.name}-fold<k> folders")


def resolve_checkpoint(arg: str | os.PathLike) -> Path:
    """The one checkpoint file of a run folder or checkpoint argument (LayoutError if it names several)."""
    found = resolve_checkpoints(arg)
    if len(found) != 1:
        raise LayoutError(f"{arg} names {len(found)} fold checkpoints; give one run folder or checkpoint file")
    return found[0]


def cache_dir(dataset_json: str | os.PathLike) -> Path:
    """The default HDF5 cache folder of a dataset: data/cache/<name of the folder holding dataset.json>."""
    return CACHE_ROOT / (Path(dataset_json).parent.name or "dataset")


@dataclass(frozen=True)
class ExperimentPaths:
    """The folders of an experiment named ``name`` (see the module docstring)."""
    name: str

    @property
    def runs(self) -> Path:
        return RUNS_ROOT / self.name

    @property
    def train(self) -> Path:
        return DATA_ROOT / self.name

    @property
    def dev(self) -> Path:
        return self.held_out()

    @property
    def final(self) -> Path:
        return self.held_out(final=True)

    def held_out(self, final: bool = False, shift: str | None = None) -> Path:
        """The data folder of dev or the final set (``final``), or of its rendering with ``shift``; the one rule
        (``report`` names the evaluation of each the same way)."""
        return DATA_ROOT / (self.name + (FINAL_SUFFIX if final else DEV_SUFFIX) + (f"-{shift}" if shift else ""))

    def run(self, variant: str, k: int = 0) -> Path:
        """The run folder of a variant's k-th training (k = 0: the variant's own name)."""
        return self.runs / (variant if k == 0 else f"{variant}-seed{k}")

    @staticmethod
    def run_seed(run_name: str) -> tuple:
        """(variant, k) of a run folder's name, ``run``'s inverse: ahnet-transfer-seed2 -> (ahnet-transfer, 2); a
        name that is no retraining's is its own variant, k = 0."""
        head, sep, k = run_name.rpartition("-seed")
        return (head, int(k)) if sep and head and k.isdigit() and int(k) > 0 else (run_name, 0)

    def run_names(self, variant: str, seeds: int) -> list:
        """The run folder names of a variant's first ``seeds`` trainings (the same in every experiment)."""
        return [self.run(variant, k).name for k in range(seeds)]

    def report(self, final: bool = False, shift: str | None = None, pixels: str | None = None) -> Path:
        """The report on dev or the final set (``final``), or on its rendering with ``shift``; ``pixels``: the
        label of a prediction spacing other than the default (ahnet.infer.spacing: "0.7mm", "native")."""
        return self.runs / (REPORT + (FINAL_SUFFIX if final else "") + (f"-{shift}" if shift else "")
                            + (f"-at{pixels}" if pixels else ""))

    def looks(self) -> Path:
        return self.final / FINAL_LOOKS

    def shift_report(self, final: bool = True, pixels: str | None = None) -> Path:
        """Where the summary of every shift of the final set (or of dev) goes (``pixels`` as for report)."""
        return self.runs / f"{REPORT}{FINAL_SUFFIX if final else ''}-shifts{f'-at{pixels}' if pixels else ''}"

    def lever_report(self, base: str, final: bool = False) -> Path:
        """Where this experiment (a lever, trained with --recipe) is compared with experiment ``base``
        (python -m ahnet.lever), on dev or on the final set (``final``) and their shifted renderings."""
        return self.runs / f"{REPORT}{FINAL_SUFFIX if final else ''}-vs-{base}"

    def thickness_report(self) -> Path:
        """Where the slice-thickness study across this experiment's spacings goes (python -m ahnet.thickness)."""
        return self.runs / f"{REPORT}{FINAL_SUFFIX}-thickness"


def experiment_name(preset: str, slice_spacing: float = 2.5, base: str | None = None) -> str:
    """The name of an experiment at a slice spacing: ``base`` (default phantom-<preset>) at 2.5 mm, with -z<S> at
    another spacing S (phantom-cpu-z5; the thickness study reads phantom-cpu-main and phantom-cpu-main-z5 as one)."""
    return (base or f"phantom-{preset}") + (f"-z{slice_spacing:g}" if slice_spacing != 2.5 else "")


def report_candidates(report_dir, run_name: str) -> Path:
    """The candidates CSV an evaluation wrote for one run into its report folder."""
    return Path(report_dir) / REPORT_CANDIDATES / f"{run_name}.csv"


def report_evaluated(report_dir, run_name: str) -> Path:
    """One run's stored evaluation (candidates, segmentation rows, fingerprint) in a report folder."""
    return Path(report_dir) / REPORT_EVALUATED / f"{run_name}.json"


def annotations_csv(dataset_json: str | os.PathLike) -> Path:
    """Where a dataset's annotations are: annotations.csv beside its dataset.json."""
    return Path(dataset_json).parent / ANNOTATIONS


def dataset_annotations(dataset_json: str | os.PathLike) -> Path | None:
    """annotations_csv(dataset_json) when that file exists, else None (then nodules come from the masks)."""
    p = annotations_csv(dataset_json)
    return p if p.is_file() else None
