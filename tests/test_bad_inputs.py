"""The drill: a table of bad inputs over every command line (predict, train, evaluate, data.cache, pipeline,
data.phantom, weights_transfer, experiment, bench).

Each row runs the command's ``main(argv)`` in-process in a fresh folder (a few rows as ``python -m`` subprocesses)
and asserts what a user relies on: exit code 2, exactly one line on stderr, ``<prog>: error: ...`` naming the
problem, no traceback, and no new or changed file anywhere in the row's folder (outputs, caches, run folders,
the inputs themselves). "Not writable" rows inject a denying ``os.access`` (root writes anywhere);
tests/test_reliability.py runs one as an unprivileged user.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from ._drill import HU, Ctx, busy, ca, ev, ph, pl, pr, tr, tr_ahnet, wt
from ._drill import world  # noqa: F401  (the rows' fixture)

ROOT = Path(__file__).resolve().parents[1]
MAINS = {"predict": "ahnet.commands.predict", "train": "ahnet.commands.train", "evaluate": "ahnet.commands.evaluate",
         "cache": "ahnet.commands.cache", "pipeline": "ahnet.commands.pipeline", "phantom": "ahnet.commands.phantom",
         "transfer": "weights_transfer.__main__", "experiment": "ahnet.commands.experiment",
         "bench": "ahnet.commands.bench", "rescore": "ahnet.commands.rescore", "client": "ahnet.commands.client"}
PROG = {"predict": "ahnet.predict", "train": "ahnet.train", "evaluate": "ahnet.evaluate", "cache": "ahnet.commands.cache",
        "pipeline": "ahnet.pipeline", "phantom": "ahnet.data.phantom", "transfer": "weights_transfer",
        "experiment": "ahnet.experiment", "bench": "ahnet.bench", "rescore": "ahnet.rescore", "client": "ahnet.client"}


ROWS: list[tuple[str, str, Callable[[Ctx], list], str]] = [
    # --------------------------------------------------------------------------------------------- phantom
    ("phantom", "out is a file", lambda c: ph(c, "--out", c.file()), "is a file"),
    ("phantom", "out not writable", lambda c: ph(c, "--out", c.read_only()), "permission denied"),
    ("phantom", "noise negative", lambda c: ph(c, "--noise", "-5"), "noise must be (min, max) HU"),
    ("phantom", "kernel range reversed", lambda c: ph(c, "--psf-sigma", "1.0,0.2"), "psf_sigma must be a sigma or a"),
    ("phantom", "thickness nan", lambda c: ph(c, "--thickness", "nan"), "argument --thickness"),
    ("phantom", "vessel density inf", lambda c: ph(c, "--vessel-density", "inf"), "argument --vessel-density"),
    ("phantom", "z extent negative", lambda c: ph(c, "--z-extent", "-1"), "argument --z-extent"),
    ("phantom", "seed negative", lambda c: ph(c, "--seed", "-1"), "argument --seed"),
    ("phantom", "size absurd", lambda c: ph(c, "--size", "100000"), "argument --size"),
    ("phantom", "slices absurd", lambda c: ph(c, "--slices", "100000"), "argument --slices"),
    ("phantom", "no cases", lambda c: ph(c, "--cases", "0"), "--cases must be >= 1"),
    ("phantom", "nodules reversed", lambda c: ph(c, "--nodules-per-case", "3,1"), "nodules_per_case must be"),
    ("phantom", "split all zero", lambda c: ph(c, "--split", "0,0,0"), "split must be three fractions"),
    # ----------------------------------------------------------------------------------------------- cache
    ("cache", "out is a file", lambda c: ca(c, "--out", c.file()), "is a file"),
    ("cache", "out not writable", lambda c: ca(c, "--out", c.read_only()), "permission denied"),
    ("cache", "spacing 0", lambda c: ca(c, "--spacing", "0", "0"), "argument --spacing"),
    ("cache", "spacing nan", lambda c: ca(c, "--spacing", "nan", "nan"), "argument --spacing"),
    ("cache", "spacing 1e-4 (TiB)", lambda c: ca(c, "--spacing", "1e-4", "1e-4"), "argument --spacing"),
    ("cache", "image is a number", lambda c: ca(c, data=c.dataset({"training": [{"image": 5}]})),
     '"image" is a number 5'),
    ("cache", "image is a list", lambda c: ca(c, data=c.dataset({"training": [{"image": ["a", "b"]}]})),
     '"image" is a list'),
    ("cache", "label is a number", lambda c: ca(c, data=c.dataset({"training": [{"image": "a.nii", "label": 3}]})),
     '"label" is a number 3'),
    ("cache", "case_id is a list", lambda c: ca(c, data=c.dataset({"training": [{"image": "a.nii", "case_id": []}]})),
     '"case_id" is a list'),
    ("cache", "dataset is a list", lambda c: ca(c, data=c.dataset([1, 2])), "holds a list"),
    ("cache", "dataset latin-1", lambda c: ca(c, data=c.latin1()), "not UTF-8 text (byte 0xe9"),
    ("cache", "dataset not JSON", lambda c: ca(c, data=c.dataset(raw=b"{")), "not valid JSON"),
    ("cache", "dataset missing", lambda c: ca(c, data=c.t / "nope.json"), "dataset.json not found"),
    ("cache", "diameter negative", lambda c: ca(c, data=c.ann(diameter_mm=-3)), "diameter_mm = -3.0"),
    ("cache", "diameter zero", lambda c: ca(c, data=c.ann(diameter_mm=0)), "diameter_mm = 0.0"),
    ("cache", "diameter text", lambda c: ca(c, data=c.ann(diameter_mm="abc")), "diameter_mm = 'abc' is not a"),
    ("cache", "coordinate nan", lambda c: ca(c, data=c.ann(coordX="nan")), "coordX = nan is not a finite"),
    ("cache", "seriesuid unknown", lambda c: ca(c, data=c.ann(seriesuid="ghost")), "seriesuid ghost is not a case"),
    ("cache", "nodule outside", lambda c: ca(c, data=c.ann(coordX=1e6)), "lies outside its scan"),
    ("cache", "annotations latin-1", lambda c: ca(c, data=c.dataset(
        ann="seriesuid,coordX,coordY,coordZ,diameter_mm\ncaf\xe9,1,2,3,4\n".encode("latin-1"))),
     "annotations.csv: not UTF-8"),
    ("cache", "image missing", lambda c: ca(c, data=c.dataset({"training": [{"image": str(c.t / "n.nii.gz")}]},
                                                              ann="")),
     "cannot read the source files of case n"),
    ("cache", "spacing 1e30 mm", lambda c: ca(c, data=c.scan_dataset(HU, (1e30, 0.8, 0.8))), "not a CT voxel size"),
    ("cache", "intensities in [0, 1]", lambda c: ca(c, data=c.scan_dataset(np.clip(HU / 1000 + 0.5, 0, 1))),
     "not Hounsfield units"),
    ("cache", "mask label negative", lambda c: ca(c, data=c.negative_label()), "mask values span [-1, -1]"),
    ("cache", "case_id twice", lambda c: ca(c, data=c.dataset({"training": [{"image": "a.nii", "case_id": "a"},
                                                                           {"image": "b.nii", "case_id": "a"}]})),
     "case_id 'a' appears twice"),
    ("cache", "nan policy bogus", lambda c: ca(c, "--nan-policy", "bogus"), "argument --nan-policy"),
    ("cache", "scan over --max-scan-voxels", lambda c: ca(c, "--max-scan-voxels", "1000"),
     "(2.76e+04 voxels); more than --max-scan-voxels 1000"),
    ("cache", "resampled over --max-scan-voxels", lambda c: ca(c, "--spacing", "0.05", "0.05", "--max-scan-voxels",
                                                               "1000000"), "voxels once resampled; more than"),
    ("cache", "header promises 4000^3 voxels in 2 kB", lambda c: ca(c, data=c.dataset(
        {"training": [{"image": str(c.header_4000())}]}, ann="")), "4000 x 4000 x 4000 int16 voxels (128000000000 "
                                                                   "bytes after byte 0) but the file has 2400 bytes"),
    ("cache", "fourth case NaN: none cached", lambda c: ca(c, data=c.last_case_nan()), "nan.nii.gz: 1 voxels are NaN"),
    ("cache", "max scan voxels 0", lambda c: ca(c, "--max-scan-voxels", "0"), "argument --max-scan-voxels"),
    # ----------------------------------------------------------------------------------------------- train
    ("train", "lr inf", lambda c: tr(c, "--lr", "inf"), "--lr inf is not a finite number"),
    ("train", "lr nan", lambda c: tr(c, "--lr", "nan"), "--lr nan is not a finite number"),
    ("train", "focal gamma nan", lambda c: tr(c, "--focal-gamma", "nan"), "--focal-gamma nan"),
    ("train", "max steps negative", lambda c: tr(c, "--max-steps", "-1"), "--max-steps must be >= 1"),
    ("train", "ckpt every negative", lambda c: tr(c, "--ckpt-every", "-1"), "--ckpt-every must be >= 0"),
    ("train", "val patches negative", lambda c: tr(c, "--val-patches", "-1"), "--val-patches must be >= 0"),
    ("train", "warmup negative", lambda c: tr(c, "--warmup-steps", "-5"), "--warmup-steps must be >= 0"),
    ("train", "grad clip negative", lambda c: tr(c, "--grad-clip", "-1"), "--grad-clip must be >= 0"),
    ("train", "focal alpha 2", lambda c: tr(c, "--focal-alpha", "2"), "--focal-alpha must be in [0, 1]"),
    ("train", "dice unit without dice", lambda c: tr(c, "--loss", "focal", "--dice-per-patch"),
     "--dice-per-patch shapes the Dice term, and --loss focal has none"),
    ("train", "two dice units", lambda c: tr(c, "--dice-per-patch", "--dice-per-nodule"), "choose one"),
    ("train", "fold outside folds", lambda c: tr(c, "--folds", "2", "--fold", "3"), "--fold must lie in 0 .. 1"),
    ("train", "patch absurd", lambda c: tr(c, "--patch-size", "100000", "100000", "100000"), "voxels per step"),
    ("train", "model kwargs unknown", lambda c: tr_ahnet(c, "--model-kwargs", '{"bogus": 1}'), "ahnet takes no bogus"),
    ("train", "model kwargs of 3D in 2D", lambda c: tr(c, "--stage", "2d", "--model", "mcgcn", "--encoder",
                                                       "resnet18", "--patch-size", "3", "32", "32", "--model-kwargs",
                                                       '{"z_pool": "none"}'), "mcgcn takes no z_pool"),
    ("train", "pfn depth 9", lambda c: tr_ahnet(c, "--pfn-depth", "9"), "--pfn-depth must be in [0, 6], got 9"),
    ("train", "pfn depth for the U-Net", lambda c: tr(c, "--pfn-depth", "2"), "--model unet3d has none; drop it"),
    ("train", "pfn depth for MC-GCN", lambda c: tr(c, "--stage", "2d", "--model", "mcgcn", "--encoder", "resnet18",
                                                   "--patch-size", "3", "32", "32", "--model-kwargs", "{}",
                                                   "--pfn-depth", "1"), "--model mcgcn has none; drop it"),
    ("train", "model kwargs shadow --pfn-depth", lambda c: tr_ahnet(c, "--model-kwargs", '{"pfn_depth": 2}'),
     "--model-kwargs sets pfn_depth, which --pfn-depth sets; give it there"),
    ("train", "model kwargs shadow --encoder", lambda c: tr_ahnet(c, "--model-kwargs", '{"encoder": "resnet34"}'),
     "--model-kwargs sets encoder, which --encoder sets"),
    ("train", "model kwargs out channels", lambda c: tr(c, "--model-kwargs", '{"out_channels": 2}'),
     "--model-kwargs sets out_channels, which training fixes at 1"),
    ("train", "device bogus", lambda c: tr(c, "--device", "bogus"), "'bogus' is not a torch device"),
    ("train", "out is a file", lambda c: tr(c, "--out", c.file()), "is a file"),
    ("train", "out not writable", lambda c: tr(c, "--out", c.read_only()), "permission denied"),
    ("train", "cache dir is a file", lambda c: tr(c, "--cache-dir", c.file()), "--cache-dir"),
    ("train", "dataset image number", lambda c: tr(c, data=c.dataset({"training": [{"image": 5}]})),
     '"image" is a number 5'),
    ("train", "config latin-1", lambda c: tr(c, "--config", c.file("c.json", '{"lr": "\xe9"}'.encode("latin-1"))),
     "not UTF-8 text"),
    ("train", "config wrong type", lambda c: tr(c, "--config", c.file("c.json", '{"lr": "abc"}')),
     "setting lr = 'abc': expected float"),
    ("train", "config unknown key", lambda c: tr(c, "--config", c.file("c.json", '{"bogus": 1}')),
     "unknown setting(s) ['bogus']"),
    ("train", "model kwargs wrong type", lambda c: tr_ahnet(c, "--model-kwargs", '{"growth": "x"}'),
     "do not build ahnet"),
    ("train", "patch not a multiple", lambda c: tr_ahnet(c, "--patch-size", "4", "30", "30"),
     "must divide by (1, 32, 32); try --patch-size 4 32 32"),
    ("train", "fp16 on a CPU", lambda c: tr(c, "--amp", "fp16"), "--amp fp16 needs a CUDA device"),
    ("train", "workers absurd", lambda c: tr(c, "--num-workers", "100000"), "--num-workers must be in [0, 256]"),
    ("train", "all folds without folds", lambda c: tr(c, "--all-folds"), "--all-folds needs --folds K"),
    ("train", "init-from missing", lambda c: tr_ahnet(c, "--init", "transfer", "--init-from", c.t / "no2d"),
     "--init-from: run"),
    ("train", "imagenet weights missing", lambda c: tr(c, "--stage", "2d", "--model", "mcgcn", "--encoder", "resnet18",
                                                       "--patch-size", "3", "32", "32", "--model-kwargs", "{}",
                                                       "--imagenet-weights", c.t / "none.pth"),
     "--imagenet-weights"),
    ("train", "resume a truncated last.pt", lambda c: tr(c, "--resume", "--out", c.run_with(
        c.w.run.joinpath("checkpoints", "best.pt").read_bytes()[:1000])), "last.pt is not a readable torch checkpoint"),
    ("train", "resume a pickle", lambda c: tr(c, "--resume", "--out", c.run_with(b"\x80\x04K\x01.")),
     "last.pt is not a readable torch checkpoint"),
    ("train", "no training split: no cache", lambda c: tr(c, data=c.only_validation()), "has no training cases"),
    ("train", "fourth case NaN: no cache", lambda c: tr(c, data=c.last_case_nan()), "nan.nii.gz: 1 voxels are NaN"),
    ("train", "resume a last.pt with a flipped bit", lambda c: tr(c, "--resume", "--out", c.run_with(
        c.flipped_run().joinpath("checkpoints", "best.pt").read_bytes())), "last.pt is corrupt: its content no"),
    # -------------------------------------------------------------------------------------------- pipeline
    ("pipeline", "pfn depth negative", lambda c: pl(c, "--pfn-depth", "-3"), "--pfn-depth must be in [0, 6]"),
    ("pipeline", "3d model kwargs shadow --pfn-depth", lambda c: pl(c, "--model-kwargs-3d", '{"pfn_depth": 1}'),
     "--model-kwargs sets pfn_depth, which --pfn-depth sets"),
    ("pipeline", "3d model kwargs unknown", lambda c: pl(c, "--model-kwargs-3d", '{"bogus": 1}'),
     "ahnet takes no bogus"),
    ("pipeline", "lr 3d nan", lambda c: pl(c, "--lr-3d", "nan"), "--lr nan"),
    ("pipeline", "runs dir is a file", lambda c: pl(c, "--runs-dir", c.file()), "is a file"),
    ("pipeline", "stages bogus", lambda c: pl(c, "--stages", "4d"), "--stages takes"),
    ("pipeline", "config sections", lambda c: pl(c, "--config", c.file("c.json", '{"bogus": {}}')),
     "top-level keys must be common, 2d, 3d"),
    ("pipeline", "config wrong type", lambda c: pl(c, "--config", c.file("c.json", '{"common": {"lr": "x"}}')),
     "setting lr = 'x': expected float"),
    # --------------------------------------------------------------------------------------------- predict
    ("predict", "threshold 2", lambda c: pr(c, "--threshold", "2"), "argument --threshold"),
    ("predict", "min distance nan", lambda c: pr(c, "--min-distance-mm", "nan"), "min_distance_mm nan must be > 0"),
    ("predict", "overlap 1", lambda c: pr(c, "--overlap", "1"), "argument --overlap"),
    ("predict", "sw batch 0", lambda c: pr(c, "--sw-batch", "0"), "argument --sw-batch"),
    ("predict", "window 0", lambda c: pr(c, "--window", "0", "0", "0"), "argument --window"),
    ("predict", "device bogus", lambda c: pr(c, "--device", "bogus"), "'bogus' is not a torch device"),
    ("predict", "fp16 on a CPU", lambda c: pr(c, "--amp", "fp16"), "--amp fp16 needs a CUDA device"),
    ("predict", "out is a file", lambda c: pr(c, "--out", c.file()), "is a file"),
    ("predict", "out not writable", lambda c: pr(c, "--out", c.read_only()), "permission denied"),
    ("predict", "out in use", lambda c: pr(c, "--out", busy(c)), "is in use by pid"),
    ("predict", "dataset image number", lambda c: pr(c, inp=c.dataset({"training": [{"image": 5}]})),
     '"image" is a number 5'),
    ("predict", "dataset latin-1", lambda c: pr(c, inp=c.latin1()), "not UTF-8 text"),
    ("predict", "dataset scan missing", lambda c: pr(c, inp=c.dataset({"test": [str(c.t / "gone.nii.gz")]})),
     "gone.nii.gz of case gone not found"),
    ("predict", "spacing 1e30 mm", lambda c: pr(c, inp=c.scan(HU, (1e30, 0.8, 0.8))), "not a CT voxel size"),
    ("predict", "intensities in [0, 1]", lambda c: pr(c, inp=c.scan(np.clip(HU / 1000 + 0.5, 0, 1))),
     "not Hounsfield units"),
    ("predict", "constant volume", lambda c: pr(c, inp=c.scan(np.full((12, 48, 48), -700, np.float32))),
     "constant volume"),
    ("predict", "1x1x1 volume", lambda c: pr(c, inp=c.scan(np.full((1, 1, 1), -700, np.float32))), "too small"),
    ("predict", "complex voxels", lambda c: pr(c, inp=c.scan(HU.astype(np.complex64))), "complex voxels"),
    ("predict", "truncated scan", lambda c: pr(c, inp=c.truncated()), "cannot read as NIfTI"),
    ("predict", "runs not a checkpoint", lambda c: pr(c, runs=c.file("m.pt")), "m.pt is not a"),
    ("predict", "split of an image", lambda c: pr(c, "--split", "test", inp=c.w.image(0)), "dataset.json input only"),
    ("predict", "DICOM slice missing", lambda c: pr(c, inp=c.dicom_missing_slice()),
     "slices 2 and 3 are 5 mm apart where the others are 2.5 mm (a missing slice?)"),
    ("predict", "4D volume", lambda c: pr(c, inp=c.four_d()), "expected a 3D volume, got 4D"),
    ("predict", "NaN voxel", lambda c: pr(c, inp=c.scan(np.where(HU == HU.max(), np.nan, HU))), "1 voxels are NaN"),
    ("predict", "a mask as the scan", lambda c: pr(c, inp=c.scan((HU > 0).astype(np.uint8))), "not Hounsfield"),
    ("predict", "test list a string", lambda c: pr(c, inp=c.dataset({"test": "imagesTs"})),
     "'test' holds a string; expected a list"),
    ("predict", "test entry without image", lambda c: pr(c, inp=c.dataset({"test": [{"label": "x"}]})),
     "entry 0 of 'test': \"image\" is null"),
    ("predict", "run with NaN weights", lambda c: pr(c, runs=c.diverged_run()), "holds non-finite weights"),
    ("predict", "scan over --max-scan-voxels", lambda c: pr(c, "--max-scan-voxels", "1000", inp=c.w.image(0)),
     "case_000.nii.gz: the header says 12 x 48 x 48 float32 (2.76e+04 voxels); more than --max-scan-voxels 1000"),
    ("predict", "header promises 4000^3 voxels in 2 kB", lambda c: pr(c, inp=c.header_4000()),
     "the header promises 4000 x 4000 x 4000 int16 voxels (128000000000 bytes after byte 0) but the file has 2400"),
    ("predict", "header promises 4000^3 voxels in a 77-byte .nii.gz", lambda c: pr(c, inp=c.header_4000(".nii.gz")),
     "but a gzip file of 77 bytes inflates to at most 1032 x that"),
    ("predict", "max scan voxels not an integer", lambda c: pr(c, "--max-scan-voxels", "1e11"),
     "argument --max-scan-voxels: expected an integer >= 1, got '1e11'"),
    ("predict", "second scan bad: nothing written", lambda c: pr(c, inp=c.folder_second_bad()),
     "case b: "),
    ("predict", "run with a flipped bit", lambda c: pr(c, runs=c.flipped_run()), "best.pt is corrupt"),
    ("predict", "run given twice", lambda c: pr(c, runs=c.w.run)[:3] + [c.w.run] + pr(c)[3:], "is given twice"),
    ("predict", "sr threshold 2", lambda c: pr(c, "--sr-threshold", "2"), "argument --sr-threshold"),
    ("predict", "dicom out of a NIfTI", lambda c: pr(c, "--dicom-out"), "--dicom-out needs DICOM series inputs"),
    # -------------------------------------------------------------------------------------------- evaluate
    ("evaluate", "threshold 2", lambda c: ev(c, "--threshold", "2"), "argument --threshold"),
    ("evaluate", "bootstrap negative", lambda c: ev(c, "--bootstrap", "-1"), "argument --bootstrap"),
    ("evaluate", "overlap nan", lambda c: ev(c, "--overlap", "nan"), "argument --overlap"),
    ("evaluate", "device bogus", lambda c: ev(c, "--device", "bogus"), "'bogus' is not a torch device"),
    ("evaluate", "out is a file", lambda c: ev(c, "--out", c.file()), "is a file"),
    ("evaluate", "out not writable", lambda c: ev(c, "--out", c.read_only()), "permission denied"),
    ("evaluate", "out in use", lambda c: ev(c, "--out", busy(c)), "is in use by pid"),
    ("evaluate", "coordinate nan", lambda c: ev(c, data=c.ann(coordX="nan")), "coordX = nan"),
    ("evaluate", "seriesuid unknown", lambda c: ev(c, data=c.ann(seriesuid="ghost")), "seriesuid ghost is not"),
    ("evaluate", "nodule outside", lambda c: ev(c, data=c.ann(row=1, coordZ=1e6)), "lies outside its scan"),
    ("evaluate", "diameter negative", lambda c: ev(c, data=c.ann(diameter_mm=-2)), "diameter_mm = -2.0"),
    ("evaluate", "annotations missing", lambda c: ev(c, "--annotations", c.t / "no.csv"), "CSV file not found"),
    ("evaluate", "dataset image list", lambda c: ev(c, data=c.dataset({"training": [{"image": [1]}]})),
     '"image" is a list'),
    ("evaluate", "split absent", lambda c: ev(c, "--split", "nosuch"), "no case with split 'nosuch'"),
    ("evaluate", "run missing", lambda c: ["--runs", c.t / "norun", "--data", c.w.ds, "--out", c.out],
     "norun not found"),
    ("evaluate", "two runs of one name", lambda c: ev(c)[:2] + [c.w.run] + ev(c)[2:], "two runs are named 'run'"),
    ("evaluate", "label not an integer", lambda c: ev(c, data=c.dataset(
        ann="seriesuid,coordX,coordY,coordZ,diameter_mm,label\ncase_001,-40,-30,-90,6,abc\n")), "label = 'abc'"),
    ("evaluate", "annotation columns missing", lambda c: ev(c, data=c.dataset(ann="seriesuid,coordX\nx,1\n")),
     "missing columns ['coordY', 'coordZ', 'diameter_mm']"),
    ("evaluate", "annotation row too long", lambda c: ev(c, data=c.dataset(
        ann="seriesuid,coordX,coordY,coordZ,diameter_mm\ncase_001,1,2,3,4,5\n")), "line 2 has more fields"),
    # -------------------------------------------------------------------------------------------- transfer
    ("transfer", "check size 0", lambda c: wt(c, "--check-size", "0", "0", "0"), "argument --check-size"),
    ("transfer", "check size huge", lambda c: wt(c, "--check-size", "1024", "1024", "1024"), "is more than"),
    ("transfer", "pfn depth negative", lambda c: wt(c, "--pfn-depth", "-1"),
     "argument --pfn-depth: expected an integer in [0, 6], got '-1'"),
    ("transfer", "pfn depth 7", lambda c: wt(c, "--pfn-depth", "7"), "argument --pfn-depth"),
    ("transfer", "spacing nan", lambda c: wt(c, "--z-pool", "spacing", "--spacing", "nan", "1", "1"),
     "argument --spacing"),
    ("transfer", "out channels 0", lambda c: wt(c, "--out-channels", "0"), "out_channels must be >= 1"),
    ("transfer", "out is a folder", lambda c: wt(c, out=c.t), "is a folder"),
    ("transfer", "out not writable", lambda c: wt(c, out=c.read_only()), "permission denied"),
    ("transfer", "source not a checkpoint", lambda c: ["--source", c.file(), "--out", c.t / "o.pt"],
     "not a readable checkpoint"),
    ("transfer", "source a 3D checkpoint", lambda c: ["--source", c.checkpoint_3d(), "--out", c.t / "o.pt"],
     "the transfer needs a 2D 'mcgcn' one"),
    ("transfer", "source missing", lambda c: ["--source", c.t / "none.pt", "--out", c.t / "o.pt"],
     "2D checkpoint not found"),
    # ------------------------------------------------------------------------------------------ experiment
    ("experiment", "data missing", lambda c: ["--data", c.t / "nope.json"], "dataset.json not found"),
    ("experiment", "data image number", lambda c: ["--data", c.dataset({"training": [{"image": 5}]})],
     '"image" is a number 5'),
    ("experiment", "variant bogus", lambda c: ["--variants", "bogus"], "unknown variant 'bogus'"),
    ("experiment", "device bogus", lambda c: ["--device", "bogus", "--data", c.w.ds], "not a torch device"),
    ("experiment", "bootstrap negative", lambda c: ["--bootstrap", "-1"], "argument --bootstrap"),
    ("experiment", "jobs zero", lambda c: ["--jobs", "0"], "argument --jobs"),
    ("experiment", "runs folder is a file", lambda c: c.file("runs") and ["--data", c.w.ds], "runs is a file"),
    ("experiment", "preset bogus", lambda c: ["--preset", "huge"], "argument --preset: invalid choice"),
    ("experiment", "unet3d transfer", lambda c: ["--variants", "unet3d-transfer"], "unet3d has no 2D counterpart"),
    ("experiment", "evaluate-only untrained", lambda c: ["--evaluate-only"],
     "--evaluate-only: runs/phantom-demo/mcgcn-2d holds no trained model (checkpoints/best.pt or last.pt)"),
    ("experiment", "shifts of --data", lambda c: ["--data", c.w.ds, "--shifts", "noise2x"],
     "--shifts renders a preset's generated dev or final phantom with shifts; it does not go with --data"),
    ("experiment", "shift bogus", lambda c: ["--shifts", "noise9x"], "argument --shifts: invalid choice"),
    ("experiment", "recipe without --name", lambda c: ["--recipe", "augment=standard-blur"],
     "--recipe changes how every run trains; give the experiment its own --name"),
    ("experiment", "recipe value bogus", lambda c: ["--name", "x", "--recipe", "pos_weighting=big"],
     "pos_weighting must be one of"),
    ("experiment", "phantom without --name", lambda c: ["--phantom", "psf_sigma=[0.25,1.0]"],
     "--phantom changes the scans every run trains on; give the experiment its own --name"),
    ("experiment", "phantom key bogus", lambda c: ["--name", "x", "--phantom", "slices=8"],
     "--phantom slices: not a phantom option a lever may change"),
    # --------------------------------------------------------------------------------------------- rescore
    ("rescore", "run missing", lambda c: ["--run", c.t / "none", "--data", c.w.ds], "is not a run folder"),
    ("rescore", "data missing", lambda c: ["--run", c.w.run, "--data", c.t / "none.json"], "does not exist"),
    ("rescore", "crop too small", lambda c: ["--run", c.w.run, "--data", c.w.ds, "--crop", "2", "32", "32"],
     "crop 2 32 32: CandidateNet pools three times; use 4 8 8 .. 512 512 512"),
    ("rescore", "overlap 1", lambda c: ["--run", c.w.run, "--data", c.w.ds, "--overlap", "1"], "argument --overlap"),
    ("rescore", "epochs 0", lambda c: ["--run", c.w.run, "--data", c.w.ds, "--epochs", "0"], "argument --epochs"),
    ("rescore", "fit-amp unknown", lambda c: ["--run", c.w.run, "--data", c.w.ds, "--fit-amp", "fp8"],
     "argument --fit-amp"),
    ("rescore", "fit-amp fp16 on a CPU", lambda c: ["--run", c.w.run, "--data", c.w.ds, "--fit-amp", "fp16",
                                                    "--device", "cpu"], "--fit-amp fp16 needs a CUDA device"),
    ("rescore", "split without cases", lambda c: ["--run", c.w.run, "--data", c.w.ds, "--split", "nosuch"],
     "has no case with split 'nosuch'"),
    ("rescore", "run without a model", lambda c: (c.t / "empty").mkdir() or ["--run", c.t / "empty", "--data", c.w.ds],
     "empty"),
    ("rescore", "rescorer.pt truncated", lambda c: ["--run", c.run_with_rescorer(
        (c.w.run / "checkpoints" / "best.pt").read_bytes()[:1000]), "--data", c.w.ds],
     "not a readable torch checkpoint"),
    ("evaluate", "split over --max-scan-voxels", lambda c: ev(c, "--max-scan-voxels", "1000"),
     "its 1 scan(s) hold 2.76e+04 voxels together (the largest case_001.nii.gz, 12 x 48 x 48 float32)"),
    ("evaluate", "run with a flipped bit", lambda c: ev(c)[:1] + [c.flipped_run()] + ev(c)[2:], "best.pt is corrupt"),
    ("rescore", "rescorer.pt with a flipped bit", lambda c: ["--run", c.flipped_rescorer(), "--data", c.w.ds],
     "rescorer.pt is corrupt"),
    ("evaluate", "rescore without a second stage", lambda c: ev(c, "--rescore"), "has no second stage yet"),
    # ---------------------------------------------------------------------------------------------- client
    ("client", "scan over --max-scan-voxels", lambda c: ["--url", "localhost:9", "--input", c.w.image(0), "--out",
                                                         c.out, "--max-scan-voxels", "1000", "--retries", "0"],
     "case case_000: "),
    # ----------------------------------------------------------------------------------------------- bench
    ("bench", "unknown flag", lambda c: ["--bogus"], "unrecognized arguments: --bogus"),
    ("bench", "overlap 1.5", lambda c: ["--device", "cpu", "--overlap", "1.5"], "argument --overlap"),
    ("bench", "device bogus", lambda c: ["--device", "gpu7"], "not a torch device"),
    ("bench", "timeout nan", lambda c: ["--device", "cpu", "--timeout", "nan"], "--timeout must be positive"),
    ("bench", "out is a file", lambda c: ["--device", "cpu", "--out", c.file()], "is a file"),
    ("bench", "patch 0", lambda c: ["--device", "cpu", "--patch", "0", "1", "1"], "--patch needs positive sizes"),
]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in root.rglob("*")}


def _run_main(prog: str, argv: list, capsys) -> tuple[int, str]:
    main = importlib.import_module(MAINS[prog]).main
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:                    # argparse usage errors
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("prog, what, argv, says", ROWS, ids=[f"{r[0]}: {r[1]}" for r in ROWS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(prog, what, argv, says, world, tmp_path, monkeypatch,
                                                         capsys):
    if "bogus" not in what and "cuda" in says and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("CI", "true")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out_parent").mkdir()
    with contextlib.ExitStack() as stack:
        args = argv(Ctx(tmp_path, world, stack, monkeypatch))
        before = _snapshot(tmp_path)
        rc, err = _run_main(prog, args, capsys)
        after = _snapshot(tmp_path)
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{PROG[prog]}: error: ") and says in lines[0], lines[0]
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, changed


def test_the_table_covers_every_command_and_enough_rows():
    assert {r[0] for r in ROWS} == set(MAINS) and len(ROWS) >= 60


@pytest.mark.parametrize("module, argv, says", [
    ("ahnet.train", ["--lr", "inf", "--out", "{t}/r"], "ahnet.train: error: --lr inf is not a finite number."),
    ("ahnet.commands.cache", ["--data", "{t}/none.json", "--spacing", "nan", "1"],
     "ahnet.commands.cache: error: argument --spacing: expected a finite number in [0.05, 20], got 'nan'"),
    ("ahnet.commands.predict", ["--input", "{t}", "--runs", "{t}", "--out", "{t}/f"],
     "ahnet.predict: error: --out {t}/f is a file; expected a folder (created if missing)"),
])
def test_the_module_entry_points_say_the_same(module, argv, says, tmp_path):
    """A few rows through ``python -m``: the same one line, exit 2, nothing written (the others run in-process)."""
    (tmp_path / "f").write_text("x", encoding="utf-8")
    before = _snapshot(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT), CI="true", PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, "-m", module, *[a.format(t=tmp_path) for a in argv]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [says.format(t=tmp_path)], r.stderr
    assert _snapshot(tmp_path) == before
