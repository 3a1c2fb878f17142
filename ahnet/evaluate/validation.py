"""Validation by detection: the CPM of a model in training on whole validation cases.

Training chooses ``best.pt`` and judges ``--patience`` by a score of the model at each epoch's end. Patch Dice is
cheap but says little about a detector (and nothing where the patches hold no nodule), so the default score is
what the evaluation reports: each validation case predicted whole through the inference stage
(``ahnet.infer.predict_volume``: the training patch as the sliding window, overlap 0.5, the run's precision and
memory layout, WindowSettings.sw_batch windows a pass or the batch size if larger), candidates as the evaluation
extracts them (``ahnet.infer.extract_candidates`` with its defaults), and the CPM of the LUNA16 FROC
(``ahnet.evaluate.froc.evaluate_detection``, no bootstrap) against the dataset's annotations
(``ahnet.paths.dataset_annotations``; without that file, the nodules the cache derived from the masks).
Images are read from the run's HDF5 cache (already scaled to [0, 1]), one case at a time.

The training stage cannot import this (inference and evaluation come after it), so the command line builds the
validator (``make_validator(cfg)``) and hands it to ``ahnet.train.train``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ahnet import paths
from ahnet.train.config import TrainConfig
from ahnet.data.cache import cache_dataset, read_cache_attrs
from ahnet.data.io import Volume, load_dataset_json, read_annotations_csv
from ahnet.evaluate.froc import evaluate_detection
from ahnet.infer import Ensemble, Member, WindowSettings, extract_candidates, predict_volume
from ahnet.nets import model_spec
from ahnet.train import TrainError, split_cases

__all__ = ["CPMValidator", "make_validator"]


@dataclass
class _Case:
    case_id: str
    cache_file: Path
    geometry: Volume          # spacing, origin, direction of the cached grid (array left empty)


def _geometry(attrs: dict) -> Volume:
    return Volume(np.zeros((0, 0, 0), np.float32), attrs["spacing"], attrs["origin"], attrs["direction"])


def _nodule_rows(cases: list, dataset_json) -> list[dict]:
    """LUNA16 rows (world mm) of the validation cases: the annotations CSV, else the cache's mask-derived
    nodules."""
    ids = {c.case_id for c in cases}
    ann = paths.dataset_annotations(dataset_json)
    if ann is not None:
        return [r for r in read_annotations_csv(ann) if str(r["seriesuid"]) in ids]
    rows = []
    for c in cases:
        for n in json.loads(read_cache_attrs(c.cache_file).get("nodules", "[]")):
            x, y, z = np.asarray(c.geometry.voxel_to_world(n["center_zyx"]), float).reshape(3)
            rows.append({"seriesuid": c.case_id, "coordX": x, "coordY": y, "coordZ": z,
                         "diameter_mm": n["diameter_mm"]})
    return rows


def validation_window_batch(cfg: TrainConfig) -> int:
    """Windows a forward pass when validating: the inference default, or the training batch if larger."""
    return max(WindowSettings.sw_batch, cfg.batch_size)


class CPMValidator:
    """``validator(model) -> CPM`` on the validation cases of ``cfg`` (see the module docstring)."""

    name = "val_cpm"

    def __init__(self, cfg: TrainConfig, cases: list, nodules: list[dict]):
        self.cfg, self.cases, self.nodules = cfg, cases, nodules
        self.dims = model_spec(cfg.model).dims

    def __call__(self, model: nn.Module) -> float | None:
        import h5py

        cfg = self.cfg
        member = Member(model, cfg.model, self.dims, dict(getattr(model, "config", {}) or {}),
                        {"patch_size": list(cfg.patch_size)}, Path(cfg.out))
        ens = Ensemble([member])
        amp = "auto" if cfg.amp == "auto" else cfg.amp
        rows = []
        for c in self.cases:
            with h5py.File(c.cache_file, "r") as f:
                image = f["image"][...]
            prob = predict_volume(ens, image, sw_batch=validation_window_batch(cfg), amp=amp,
                                  channels_last=cfg.channels_last and self.dims == 3)
            rows += extract_candidates(prob, c.geometry, seriesuid=c.case_id)
        res = evaluate_detection(self.nodules, rows, [c.case_id for c in self.cases], n_bootstrap=0)
        return res["cpm"]


def make_validator(cfg: TrainConfig) -> CPMValidator | None:
    """The validator a run asks for: a CPMValidator for --validation cpm / auto when the dataset's validation
    cases (the split column, or the fold) hold nodules; None for --validation dice, and for auto without any
    (then training scores patch Dice). TrainError for --validation cpm without validation nodules."""
    cfg = cfg.resolved()
    if cfg.validation == "dice":
        return None
    if not Path(cfg.data).is_file():
        raise TrainError(f"--data {cfg.data} does not exist (expected a dataset.json).")
    _, val_ids = split_cases(cfg, load_dataset_json(cfg.data))
    if cfg.val_cases:
        val_ids = val_ids[: cfg.val_cases]
    cases = []
    if val_ids:
        by_case = {}
        for p in cache_dataset(cfg.data, cfg.cache_dir, progress=False):
            attrs = read_cache_attrs(p) or {}
            by_case[str(attrs.get("case_id") or Path(p).stem)] = (Path(p), attrs)
        cases = [_Case(cid, by_case[cid][0], _geometry(by_case[cid][1])) for cid in val_ids if cid in by_case]
    nodules = _nodule_rows(cases, cfg.data) if cases else []
    if not nodules:
        if cfg.validation == "cpm":
            raise TrainError(f"--validation cpm: the validation cases of {cfg.data} hold no nodules to detect; "
                             f"use --validation dice or a split with validation nodules.")
        return None
    return CPMValidator(cfg, cases, nodules)
