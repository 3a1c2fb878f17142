"""Part (c) of the GPU check: AH-Net trained for a fixed number of minutes on synthetic chest-like cases, and its
learning curve (one row per epoch: loss, validation Dice, samples per second).

The paper's configuration (ResNet50 encoder from scratch, 4 pyramid levels, 32 x 128 x 128 patches, batch 2,
float16 AMP with a GradScaler, Dice + focal loss, Adam at a constant 3e-4 after 20 warm-up steps) through
``ahnet.train.train``, on 12 training and 3 validation cases of 64 x 256 x 256 at 2.5 x 0.7 x 0.7 mm written
straight into the HDF5 cache format (ahnet.gpucheck.synth). The time box is checked at the first step of each
epoch, so every logged epoch is whole; the run folder lives in a temporary folder and only log.csv and
progress.png are kept (learning_curve.csv / .png).
"""
from __future__ import annotations

import csv
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ahnet import paths
from ahnet.atomic import atomic_path
from ahnet.train.config import TrainConfig
from ahnet.data.augment import Augment
from ahnet.data.sampling import PatchDataset
from ahnet.train import train

from ahnet.gpucheck.synth import write_cases

CURVE_CSV, CURVE_PNG = "learning_curve.csv", "learning_curve.png"
PAPER = dict(cases=(12, 3), shape=(64, 256, 256), patch=[32, 128, 128], encoder="resnet50", pfn_depth=4,
             model_kwargs={"z_pool": "paper"}, steps_per_epoch=60, val_patches=16, warmup_steps=20, workers=4)
TINY = dict(cases=(3, 1), shape=(16, 96, 96), patch=[4, 32, 32], encoder="resnet18", pfn_depth=1,
            model_kwargs={"z_pool": "none"}, steps_per_epoch=2, val_patches=2, warmup_steps=0, workers=0)
SPACING = (2.5, 0.7, 0.7)


class _TimeUp(Exception):
    pass


def _config(size: dict, device: str, out: Path) -> TrainConfig:
    return TrainConfig(stage="3d", model="ahnet", encoder=size["encoder"], pfn_depth=size["pfn_depth"],
                       model_kwargs=dict(size["model_kwargs"]), patch_size=list(size["patch"]), batch_size=2,
                       epochs=100_000, steps_per_epoch=size["steps_per_epoch"], lr=3e-4, schedule="constant",
                       warmup_steps=size["warmup_steps"], val_patches=size["val_patches"], device=device,
                       amp="auto", num_workers=size["workers"], seed=0, out=str(out))


def _read_curve(log_csv: Path) -> list[dict]:
    if not log_csv.is_file():
        return []
    with open(log_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    keep = ("epoch", "step", "loss", "val_dice", "samples_per_s", "seconds")
    return [{k: (float(r[k]) if r[k] not in ("", None) else None) for k in keep} for r in rows]


def run_training(out: Path, device: str, tiny: bool, minutes: float, log) -> dict:
    """Train for ``minutes``; out/learning_curve.csv and .png; returns the figures."""
    size = TINY if tiny else PAPER
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ahnet-gpu-check-") as tmp:
        tmp = Path(tmp)
        n_train, n_val = size["cases"]
        log(f"[gpu-check] train: writing {n_train} + {n_val} synthetic cases of {size['shape']}")
        train_paths = write_cases(tmp / "cache", n_train, size["shape"], SPACING, seed=0, split="train")
        val_paths = write_cases(tmp / "cache", n_val, size["shape"], SPACING, seed=1000, split="validation")
        cfg = _config(size, device, tmp / "run")
        train_ds = PatchDataset(train_paths, size["patch"], samples_per_epoch=cfg.steps_per_epoch * cfg.batch_size,
                                augment=Augment(), seed=0)
        val_ds = PatchDataset(val_paths, size["patch"], samples_per_epoch=cfg.val_patches, augment=None, seed=99)
        data_s = time.monotonic() - t0
        deadline = time.monotonic() + minutes * 60.0

        def time_box(step: int) -> None:        # at an epoch's first step: the epochs before it are logged
            if step > cfg.steps_per_epoch and (step - 1) % cfg.steps_per_epoch == 0 and time.monotonic() > deadline:
                raise _TimeUp

        log(f"[gpu-check] train: AH-Net {cfg.encoder}, patch {cfg.patch_size}, batch {cfg.batch_size}, "
            f"{minutes:g} min on {device}")
        t1 = time.monotonic()
        try:
            train(cfg, datasets=(train_ds, val_ds), on_step=time_box)
        except _TimeUp:
            pass
        train_s = time.monotonic() - t1
        run = paths.run_paths(cfg.out)
        curve = _read_curve(run.log)
        for src, dst in ((run.log, CURVE_CSV), (run.progress, CURVE_PNG)):
            if src.is_file():
                with atomic_path(out / dst) as t:
                    shutil.copyfile(src, t)
        train_ds.close()
        val_ds.close()
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None
    last = curve[-1] if curve else {}
    return {"ok": bool(curve), "minutes": minutes, "data_seconds": round(data_s, 1), "train_seconds": round(train_s, 1),
            "epochs": len(curve), "steps": int(last.get("step") or 0), "curve": curve,
            "best_val_dice": max((r["val_dice"] for r in curve if r["val_dice"] is not None), default=None),
            "peak_gpu_mb": peak, "config": {k: v for k, v in cfg.to_dict().items() if k not in ("out", "data")},
            "data": {"train_cases": n_train, "validation_cases": n_val, "shape": list(size["shape"]),
                     "spacing": list(SPACING)}}
