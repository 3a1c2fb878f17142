"""`python -m weights_transfer` (behind `bash run.sh transfer`): 2D MC-GCN / torchvision ResNet -> 3D AH-Net.

With no --source it takes the newest 2D (mcgcn) checkpoint under runs/, or else a freshly initialised 2D
network (and says so). It writes the 3D checkpoint, prints the verification table, and exits non-zero when
the transfer is not exact (1) or the input does not fit (2).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ahnet import failures, paths
from ahnet.checkpoint import save_checkpoint
from ahnet.nets import AHNet3d
from ahnet.nets.ahnet3d import PFN_DEPTH, PFN_DEPTH_RANGE
from ahnet.nets.blocks import UPSAMPLE_MODES
from ahnet.nets.resnet import ENCODERS, parse_encoder
from ahnet.nets.transfer import (Source2d, format_table, fresh_encoder, load_source, source_from_model,
                                 transfer_and_verify)

PROG = "weights_transfer"
MAX_CHECK_VOXELS = 2 ** 20     # the verification volume: a ResNet50 encoder on 1M voxels already takes GBs


def newest_2d_checkpoint(runs: Path) -> Optional[Path]:
    """The most recently written checkpoint under `runs` whose model is the 2D MC-GCN (best.pt preferred)."""
    if not runs.is_dir():
        return None
    candidates = sorted(runs.glob("**/*.pt"), key=lambda p: (p.stat().st_mtime, p.name == paths.BEST), reverse=True)
    for path in candidates:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - unreadable files are simply not candidates
            continue
        if isinstance(obj, dict) and obj.get("model_name") == "mcgcn":
            return path
    return None


def build_parser() -> argparse.ArgumentParser:
    p = failures.Parser(PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, help="2D checkpoint (this project's mcgcn run, its checkpoints/*.pt) or a "
                   "torchvision ResNet state-dict file; default: newest mcgcn checkpoint under --runs-dir")
    p.add_argument("--runs-dir", type=Path, default=paths.RUNS_ROOT,
                   help="the folder to search for 2D runs when --source is not given (default: runs/)")
    p.add_argument("--out", type=Path, help="3D checkpoint to write (default: next to the source, "
                   "'ahnet3d_transferred.pt'; runs/transfer-fresh/ for a fresh network)")
    p.add_argument("--encoder", choices=ENCODERS, help="ResNet encoder of the 3D network (default: the source's)")
    p.add_argument("--fresh-encoder", default="resnet18", choices=ENCODERS, help="encoder of the fresh 2D network "
                   "used when no checkpoint is found (default resnet18)")
    p.add_argument("--pfn-depth", type=failures.number(int, *PFN_DEPTH_RANGE), default=PFN_DEPTH,
                   help=f"pyramid pooling levels of the 3D net, {PFN_DEPTH_RANGE[0]} .. {PFN_DEPTH_RANGE[1]}, 0 = off "
                        f"(default {PFN_DEPTH}, the paper's)")
    p.add_argument("--upsample", default="trilinear", choices=UPSAMPLE_MODES)
    p.add_argument("--z-pool", default="paper", choices=("paper", "spacing", "none"))
    p.add_argument("--spacing", type=failures.number(float, 0.05, 20), nargs=3, metavar=("SZ", "SY", "SX"),
                   help="voxel spacing in mm (0.05 to 20), for --z-pool spacing")
    p.add_argument("--out-channels", type=int, default=1)
    p.add_argument("--check-size", type=failures.number(int, 1, 1024), nargs=3, default=(5, 64, 64), metavar=("D", "H", "W"),
                   help="volume size of the verification, at most %d voxels (default 5 64 64)" % MAX_CHECK_VOXELS)
    p.add_argument("--seed", type=failures.number(int, 0, 2 ** 32 - 1), default=0)
    return p


def choose_source(args) -> Source2d:
    """--source, else the newest 2D checkpoint under --runs, else a fresh 2D encoder (each said on stdout)."""
    if args.source is not None:
        source = load_source(args.source)
        print(f"source: {args.source} (ResNet{source.depth})")
        return source
    found = newest_2d_checkpoint(args.runs_dir)
    if found is not None:
        source = load_source(found)
        print(f"source: newest 2D checkpoint under {args.runs_dir}/: {found} (ResNet{source.depth})")
        return source
    depth = parse_encoder(args.fresh_encoder)
    print(f"source: no 2D checkpoint under {args.runs_dir}/, so a freshly initialised 2D ResNet{depth} (BN statistics "
          f"measured on random inputs, affine weights randomised). Train one with `python -m ahnet.train --stage "
          f"2d` for a useful 3D start.")
    return source_from_model(fresh_encoder(depth, args.seed), f"fresh ResNet{depth} (no 2D checkpoint under "
                                                               f"{args.runs_dir}/)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return failures.run(PROG, lambda: _main(args))


def _main(args) -> int:
    if args.out is not None:
        failures.check_output_file(args.out, "--out")
    if args.check_size[0] * args.check_size[1] * args.check_size[2] > MAX_CHECK_VOXELS:
        raise ValueError(f"--check-size {' '.join(map(str, args.check_size))} is more than {MAX_CHECK_VOXELS} voxels; "
                         f"the verification needs no more than the default 5 64 64")
    kwargs = dict(pfn_depth=args.pfn_depth, upsample=args.upsample, z_pool=args.z_pool, spacing=args.spacing,
                  out_channels=args.out_channels)
    if args.encoder:
        kwargs["encoder"] = args.encoder
    with torch.random.fork_rng(devices=[]):     # the 3D options, before a source is read or a fresh one measured
        AHNet3d(**{"encoder": args.encoder or args.fresh_encoder, **kwargs})
    source = choose_source(args)
    out = failures.check_output_file(args.out or default_out(source), "--out")
    t0 = time.time()
    model, rows = transfer_and_verify(source, tuple(args.check_size), args.seed, **kwargs)
    print(format_table(rows))
    print(f"verified in {time.time() - t0:.1f} s")
    save_checkpoint({"model": model.state_dict(), "model_name": "ahnet", "model_kwargs": model.config,
                     "transfer": {"source": source.origin, "source_depth": source.depth,
                                  "max_abs_err_float32": max(r.err_float32 for r in rows),
                                  "max_abs_err_float64": max(r.err_float64 for r in rows),
                                  "ok": all(r.ok for r in rows)}}, out)
    counts = model.parameter_counts()
    print(f"3D AH-Net ({model.config['encoder']}, pfn_depth {model.config['pfn_depth']}, {model.config['upsample']}): "
          f"{counts['total']:,} parameters ({counts['encoder']:,} transferred) -> {out}")
    if not all(r.ok for r in rows):
        return failures.fail(PROG, "the transferred encoder does not reproduce the 2D encoder (see the FAIL rows above)",
                        code=1)
    return 0


def default_out(source: Source2d) -> Path:
    origin = Path(source.origin)
    if origin.is_file():
        return origin.parent / "ahnet3d_transferred.pt"
    return paths.RUNS_ROOT / "transfer-fresh" / "ahnet3d_transferred.pt"


if __name__ == "__main__":
    sys.exit(main())
