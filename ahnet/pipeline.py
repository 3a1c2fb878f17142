"""The paper's recipe in one command: 2D stage -> transfer (checked) -> 3D stage (``bash run.sh train``).

``python -m ahnet.pipeline --name NAME`` trains MC-GCN into runs/NAME-2d, checks that the 2D -> 3D weight
transfer is exact on its best checkpoint (the table of weights_transfer), then trains AH-Net from the
transferred encoder into runs/NAME-3d. Flags shared by both stages are given once; stage-specific ones have a
-2d / -3d suffix. ``--resume`` picks up whichever stage is unfinished. ``--config FILE``: JSON
{"common": {...}, "2d": {...}, "3d": {...}} of TrainConfig settings, applied before the flags.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ahnet.checkpoint import load_checkpoint
from ahnet.config import TrainConfig
from ahnet.train import TrainError, train

__all__ = ["build_parser", "stage_configs", "run_pipeline", "main"]

SHARED = ("encoder", "data", "cache_dir", "seed", "device", "amp", "num_workers", "batch_size", "steps_per_epoch",
          "loss", "focal_alpha", "focal_gamma", "augment", "pos_fraction", "val_patches", "schedule", "warmup_steps",
          "ckpt_every", "folds", "fold", "max_bad_steps", "grad_clip")


def build_parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS
    p = argparse.ArgumentParser(prog="python -m ahnet.pipeline", argument_default=S, description=(
        "2D stage (MC-GCN on 3-slice stacks) -> exact 2D->3D transfer -> 3D stage (AH-Net), into "
        "<runs>/<name>-2d and <runs>/<name>-3d. Unset flags take python -m ahnet.train's defaults."))
    p.add_argument("--name", default="ahnet", help="run name; folders <runs>/<name>-2d and -3d (default: ahnet)")
    p.add_argument("--runs", default="runs", help="parent folder of the runs (default: runs)")
    p.add_argument("--config", metavar="FILE", help='JSON {"common": {...}, "2d": {...}, "3d": {...}}')
    p.add_argument("--stages", default="2d,3d", help="which stages to run: 2d,3d (default), 2d, or 3d "
                                                      "(3d alone needs the 2D run to exist)")
    p.add_argument("--resume", action="store_true", help="continue unfinished stages; finished ones are skipped")
    g = p.add_argument_group("shared by both stages (see python -m ahnet.train --help)")
    g.add_argument("--encoder", choices=["resnet18", "resnet34", "resnet50"], help="ResNet encoder (default "
                                                                                   "resnet50, the paper's)")
    g.add_argument("--data", help="dataset.json")
    g.add_argument("--cache-dir", help="HDF5 cache folder")
    g.add_argument("--seed", type=int)
    g.add_argument("--device")
    g.add_argument("--amp", choices=["auto", "fp16", "bf16", "off"])
    g.add_argument("--num-workers", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--steps-per-epoch", type=int)
    g.add_argument("--loss", choices=["focal", "dice", "ce", "dice_focal"])
    g.add_argument("--augment", choices=["standard", "randaugment", "none"])
    g.add_argument("--val-patches", type=int)
    g.add_argument("--ckpt-every", type=int)
    g.add_argument("--folds", type=int)
    g.add_argument("--fold", type=int)
    s2 = p.add_argument_group("2D stage")
    s2.add_argument("--epochs-2d", type=int, help="epochs of the 2D stage")
    s2.add_argument("--lr-2d", type=float, help="Adam learning rate of the 2D stage")
    s2.add_argument("--patch-2d", type=int, nargs=2, metavar=("H", "W"), help="in-plane patch; 3 slices")
    s2.add_argument("--imagenet-weights", help="torchvision ResNet state dict for the 2D encoder")
    s3 = p.add_argument_group("3D stage")
    s3.add_argument("--epochs-3d", type=int, help="epochs of the 3D stage")
    s3.add_argument("--lr-3d", type=float, help="Adam learning rate of the new 3D decoder")
    s3.add_argument("--lr-encoder", type=float, help="learning rate of the transferred encoder (default: --lr-3d)")
    s3.add_argument("--patch-3d", type=int, nargs=3, metavar=("D", "H", "W"), help="3D patch")
    s3.add_argument("--pfn-depth", type=int, help="pyramid pooling levels (0 = off, 4 = the paper)")
    s3.add_argument("--channels-last", action="store_true", help="3D network in channels-last 3D memory (a speed "
                                                                 "lever: with --amp bf16 on a CPU, AMP on CUDA)")
    s3.add_argument("--model-kwargs-3d", type=json.loads, metavar="JSON",
                    help='extra AHNet3d kwargs, e.g. \'{"z_pool": "spacing", "spacing": [2.5, 0.8, 0.8]}\'')
    return p


def stage_configs(args: argparse.Namespace) -> tuple[TrainConfig, TrainConfig]:
    """(2D config, 3D config) from the parsed pipeline flags (and --config sections)."""
    a = {k: v for k, v in vars(args).items()}
    file_d = {}
    if a.get("config"):
        from ahnet.config import read_json_config
        file_d = read_json_config(a["config"])
        extra = sorted(set(file_d) - {"common", "2d", "3d"})
        if extra:
            raise ValueError(f"pipeline config {a['config']}: top-level keys must be common, 2d, 3d; got {extra}.")
    common = dict(file_d.get("common", {}))
    common.update({k: a[k] for k in SHARED if k in a})
    runs = Path(a.get("runs", "runs"))
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
    last = Path(cfg.out) / "checkpoints" / "last.pt"
    if not last.is_file():
        return False
    ck = load_checkpoint(last)
    return int(ck["epoch"]) >= cfg.epochs


def check_transfer(cfg2: TrainConfig, size=(5, 64, 64)) -> str:
    """The exactness table of the 2D -> 3D transfer for the 2D run's best checkpoint; TrainError if not exact."""
    try:
        from weights_transfer.transfer import format_table, load_source, verify_transfer
    except ImportError as e:
        raise TrainError(f"the transfer utility (weights_transfer.transfer) is missing ({e}).") from None
    from ahnet.train import resolve_init_checkpoint
    ck = resolve_init_checkpoint(cfg2.out)
    rows = verify_transfer(load_source(ck), size=tuple(size))
    table = format_table(rows)
    if not all(r.ok for r in rows):
        raise TrainError(f"the 2D -> 3D transfer of {ck} is not exact:\n{table}")
    return table


def run_pipeline(cfg2: TrainConfig, cfg3: TrainConfig, stages: Sequence[str] = ("2d", "3d"),
                 **train_kw) -> dict:
    """Run the chosen stages in order; returns {"2d": summary or "skipped", "3d": ...}."""
    out: dict = {}
    if "2d" in stages:
        if cfg2.resume and _finished(cfg2):
            print(f"[pipeline] 2D stage already finished in {cfg2.out}; skipping it.")
            out["2d"] = "skipped"
        else:
            print(f"[pipeline] 2D stage -> {cfg2.out}")
            out["2d"] = train(cfg2, **train_kw)
    if "3d" in stages:
        if cfg3.resume and _finished(cfg3):
            print(f"[pipeline] 3D stage already finished in {cfg3.out}; skipping it.")
            out["3d"] = "skipped"
            return out
        if not (cfg3.resume and (Path(cfg3.out) / "checkpoints" / "last.pt").is_file()):
            print("[pipeline] transfer check (2D encoder vs transferred 3D encoder, slice by slice):")
            print(check_transfer(cfg2))
        print(f"[pipeline] 3D stage -> {cfg3.out} (encoder from {cfg3.init_from})")
        out["3d"] = train(cfg3, **train_kw)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg2, cfg3 = stage_configs(args)
        stages = [s.strip() for s in getattr(args, "stages", "2d,3d").split(",") if s.strip()]
        bad = [s for s in stages if s not in ("2d", "3d")]
        if bad or not stages:
            raise ValueError(f"--stages takes 2d, 3d or 2d,3d; got {getattr(args, 'stages', '')!r}.")
        res = run_pipeline(cfg2, cfg3, stages)
    except (TrainError, ValueError) as e:
        print(f"ahnet.pipeline: error: {e}", file=sys.stderr)
        return 2
    if "3d" in res:
        print(f"[pipeline] done: 3D model in {cfg3.out}/checkpoints/best.pt; next: evaluation "
              f"(python -m ahnet.evaluate --help).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
