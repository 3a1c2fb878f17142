"""The paper's recipe in one command: 2D stage -> transfer (checked) -> 3D stage (``bash run.sh train``).

``python -m ahnet.pipeline --name NAME`` trains MC-GCN into runs/NAME-2d, then AH-Net from its transferred
encoder into runs/NAME-3d; the 3D stage's transfer step checks that the transfer is exact on the 2D run's
trained checkpoint and prints the table (ahnet.nets.transfer) before any 3D step. Flags shared by both stages
are given once (each as ``python -m ahnet.train`` defines it); stage-specific ones have a -2d / -3d suffix.
``--resume`` picks up whichever stage is unfinished. ``--config FILE``: JSON {"common": {...}, "2d": {...},
"3d": {...}} of TrainConfig settings, applied before the flags. Under ``torchrun`` both stages train on every
rank (ahnet.train.dist); both stages' batches are checked against the number of ranks before the first step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ahnet import failures, paths
from ahnet.checkpoint import load_checkpoint
from ahnet.train.config import TrainConfig, add_setting_flag, read_json_config
from ahnet.evaluate.validation import make_validator
from ahnet.train import TrainingDiverged, train
from ahnet.train.dist import check_batch, run_command
from ahnet.train.guard import check_resume, preflight

__all__ = ["build_parser", "stage_configs", "run_pipeline", "main"]

PROG = "ahnet.pipeline"

SHARED = ("encoder", "data", "cache_dir", "seed", "device", "amp", "num_workers", "batch_size", "steps_per_epoch",
          "loss", "focal_alpha", "focal_gamma", "dice_per_patch", "dice_per_nodule", "augment", "pos_fraction",
          "pos_weighting", "val_patches", "schedule", "warmup_steps", "ckpt_every", "folds", "fold", "max_bad_steps",
          "grad_clip", "deterministic", "sync_bn", "dist_backend", "dist_timeout")


def build_parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS
    p = failures.Parser(PROG, argument_default=S, description=(
        "2D stage (MC-GCN on 3-slice stacks) -> exact 2D->3D transfer -> 3D stage (AH-Net), into "
        "<runs-dir>/<name>-2d and <runs-dir>/<name>-3d. Unset flags take python -m ahnet.train's defaults."))
    p.add_argument("--name", default="ahnet", help="run name; folders <runs-dir>/<name>-2d and -3d (default: ahnet)")
    p.add_argument("--runs-dir", default=str(paths.RUNS_ROOT),
                   help="parent folder of the two run folders (default: runs)")
    p.add_argument("--config", metavar="FILE", help='JSON {"common": {...}, "2d": {...}, "3d": {...}}')
    p.add_argument("--stages", default="2d,3d", help="which stages to run: 2d,3d (default), 2d, or 3d "
                                                      "(3d alone needs the 2D run to exist)")
    p.add_argument("--resume", action="store_true", help="continue unfinished stages; finished ones are skipped")
    g = p.add_argument_group("shared by both stages (as python -m ahnet.train)")
    for name in SHARED:
        add_setting_flag(g, name)
    s2 = p.add_argument_group("2D stage")
    add_setting_flag(s2, "epochs", "--epochs-2d", help="epochs of the 2D stage")
    add_setting_flag(s2, "lr", "--lr-2d", help="Adam learning rate of the 2D stage")
    s2.add_argument("--patch-2d", type=int, nargs=2, metavar=("H", "W"), help="in-plane patch; 3 slices")
    add_setting_flag(s2, "imagenet_weights")
    s3 = p.add_argument_group("3D stage")
    add_setting_flag(s3, "epochs", "--epochs-3d", help="epochs of the 3D stage")
    add_setting_flag(s3, "lr", "--lr-3d", help="Adam learning rate of the new 3D decoder")
    add_setting_flag(s3, "lr_encoder", help="learning rate of the transferred encoder (default: --lr-3d)")
    add_setting_flag(s3, "patch_size", "--patch-3d", help="3D patch D H W")
    add_setting_flag(s3, "pfn_depth")
    add_setting_flag(s3, "channels_last")
    add_setting_flag(s3, "model_kwargs", "--model-kwargs-3d", help='extra AHNet3d kwargs, e.g. \'{"z_pool": '
                     '"spacing", "spacing": [2.5, 0.8, 0.8]}\'')
    return p


def stage_configs(args: argparse.Namespace) -> tuple[TrainConfig, TrainConfig]:
    """(2D config, 3D config) from the parsed pipeline flags (and --config sections)."""
    a = {k: v for k, v in vars(args).items()}
    file_d = {}
    if a.get("config"):
        file_d = read_json_config(a["config"])
        extra = sorted(set(file_d) - {"common", "2d", "3d"})
        if extra:
            raise ValueError(f"pipeline config {a['config']}: top-level keys must be common, 2d, 3d; got {extra}.")
    common = dict(file_d.get("common", {}))
    common.update({k: a[k] for k in SHARED if k in a})
    runs = Path(a.get("runs_dir", paths.RUNS_ROOT))
    name = a.get("name", "ahnet")
    d2 = {**common, **file_d.get("2d", {}), "stage": "2d", "model": "mcgcn", "out": str(runs / f"{name}-2d")}
    for src, dst in (("epochs_2d", "epochs"), ("lr_2d", "lr"), ("imagenet_weights", "imagenet_weights")):
        if src in a:
            d2[dst] = a[src]
    if "patch_2d" in a:
        d2["patch_size"] = [3, *a["patch_2d"]]
    d3 = {**common, **file_d.get("3d", {}), "stage": "3d", "model": "ahnet", "init": "transfer",
          "init_from": str(runs / f"{name}-2d"), "out": str(runs / f"{name}-3d")}
    for src, dst in (("epochs_3d", "epochs"), ("lr_3d", "lr"), ("lr_encoder", "lr_encoder"),
                     ("pfn_depth", "pfn_depth"), ("model_kwargs_3d", "model_kwargs"),
                     ("channels_last", "channels_last")):
        if src in a:
            d3[dst] = a[src]
    if "patch_3d" in a:
        d3["patch_size"] = list(a["patch_3d"])
    resume = bool(a.get("resume"))
    return (TrainConfig.from_dict({**d2, "resume": resume}, "2D stage").resolved(),
            TrainConfig.from_dict({**d3, "resume": resume}, "3D stage").resolved())


def _finished(cfg: TrainConfig) -> bool:
    """The stage's run has all its epochs; TrainError when its settings differ from this call's (a resume may
    not change what was trained, finished or not)."""
    last = paths.run_paths(cfg.out).last
    if not last.is_file():
        return False
    ck = load_checkpoint(last)
    check_resume(ck.get("config") or {}, cfg, last)
    return int(ck["epoch"]) >= cfg.epochs


def run_pipeline(cfg2: TrainConfig, cfg3: TrainConfig, stages: Sequence[str] = ("2d", "3d"),
                 **train_kw) -> dict:
    """Run the chosen stages in order; returns {"2d": summary or "skipped", "3d": ...}. Both stages' settings,
    output places and networks are checked before the first stage starts (ahnet.train.guard.preflight); the 3D
    stage's transfer step (ahnet.train) checks the transfer and prints its table before the first 3D step."""
    for stage, cfg in (("2d", cfg2), ("3d", cfg3)):
        if stage in stages:
            preflight(cfg, train_kw.get("builder"), sources=not (stage == "3d" and "2d" in stages))
    out: dict = {}
    for stage, cfg in (("2d", cfg2), ("3d", cfg3)):
        if stage not in stages:
            continue
        if cfg.resume and _finished(cfg):
            print(f"[pipeline] {stage.upper()} stage already finished in {cfg.out}; skipping it.")
            out[stage] = "skipped"
            continue
        print(f"[pipeline] {stage.upper()} stage -> {cfg.out}" + (f" (encoder from {cfg.init_from})"
                                                                  if stage == "3d" else ""))
        out[stage] = train(cfg, validator_for=make_validator, **train_kw)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: _main(args), codes={TrainingDiverged: 3})


def _main(args) -> int:
    cfg2, cfg3 = stage_configs(args)
    stages = [s.strip() for s in getattr(args, "stages", "2d,3d").split(",") if s.strip()]
    bad = [s for s in stages if s not in ("2d", "3d")]
    if bad or not stages:
        raise ValueError(f"--stages takes 2d, 3d or 2d,3d; got {getattr(args, 'stages', '')!r}.")
    for stage, cfg in (("2d", cfg2), ("3d", cfg3)):
        if stage in stages:
            check_batch(cfg.batch_size)
    res = run_pipeline(cfg2, cfg3, stages)
    if "3d" in res:
        print(f"[pipeline] done: 3D model in {paths.run_paths(cfg3.out).checkpoints}; next: evaluation "
              f"(python -m ahnet.evaluate --help).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
