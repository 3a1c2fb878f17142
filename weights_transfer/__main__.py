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

from ahnet.checkpoint import save_checkpoint
from ahnet.nets.blocks import UPSAMPLE_MODES
from ahnet.nets.resnet import ResNet2d, parse_encoder

from .transfer import (Source2d, TransferError, calibrate_batchnorm, format_table, load_source, source_from_model,
                       transfer_2d_to_3d, verify_transfer)


def newest_2d_checkpoint(runs: Path) -> Optional[Path]:
    """The most recently written checkpoint under `runs` whose model is the 2D MC-GCN (best.pt preferred)."""
    if not runs.is_dir():
        return None
    candidates = sorted(runs.glob("**/*.pt"), key=lambda p: (p.stat().st_mtime, p.name == "best.pt"), reverse=True)
    for path in candidates:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - unreadable files are simply not candidates
            continue
        if isinstance(obj, dict) and obj.get("model_name") == "mcgcn":
            return path
    return None


def fresh_encoder(depth: int, seed: int) -> ResNet2d:
    """A freshly initialised 2D encoder whose BN layers are not the identity, so the verification covers the
    statistics too: affine weights randomised (the last BN of each residual block small, as in trained
    ResNets), then running mean / variance measured on random 3-slice inputs, so features keep the scale a
    trained network has."""
    torch.manual_seed(seed)
    enc = ResNet2d(depth, 3)
    g = torch.Generator().manual_seed(seed)
    last_bn = "bn3" if enc.kind == "bottleneck" else "bn2"
    for name, m in enc.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            low, high = (0.05, 0.3) if name.endswith(last_bn) else (0.5, 1.5)
            m.weight.data = low + (high - low) * torch.rand(m.num_features, generator=g)
            m.bias.data = 0.1 * torch.randn(m.num_features, generator=g)
    calibrate_batchnorm(enc, torch.randn(8, 3, 64, 64, generator=g))
    return enc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m weights_transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, help="2D checkpoint (this project's mcgcn run, best.pt/last.pt) or a "
                   "torchvision ResNet state-dict file; default: newest mcgcn checkpoint under --runs")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="where to look for 2D runs (default: runs/)")
    p.add_argument("--out", type=Path, help="3D checkpoint to write (default: next to the source, "
                   "'ahnet3d_transferred.pt'; runs/transfer-fresh/ for a fresh network)")
    p.add_argument("--encoder", help="resnet18 | resnet34 | resnet50 (default: the source's)")
    p.add_argument("--fresh-encoder", default="resnet18", help="encoder of the fresh 2D network used when no "
                   "checkpoint is found (default resnet18)")
    p.add_argument("--pfn-depth", type=int, default=4, help="pyramid pooling levels of the 3D net (0 = off, 4 = paper)")
    p.add_argument("--upsample", default="trilinear", choices=UPSAMPLE_MODES)
    p.add_argument("--z-pool", default="paper", choices=("paper", "spacing", "none"))
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SZ", "SY", "SX"), help="voxel spacing in mm, "
                   "for --z-pool spacing")
    p.add_argument("--out-channels", type=int, default=1)
    p.add_argument("--check-size", type=int, nargs=3, default=(5, 64, 64), metavar=("D", "H", "W"),
                   help="volume size of the verification (default 5 64 64)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.source is not None:
            source = load_source(args.source)
            print(f"source: {args.source} (ResNet{source.depth})")
        else:
            found = newest_2d_checkpoint(args.runs)
            if found is not None:
                source = load_source(found)
                print(f"source: newest 2D checkpoint under {args.runs}/: {found} (ResNet{source.depth})")
            else:
                depth = parse_encoder(args.fresh_encoder)
                source = source_from_model(fresh_encoder(depth, args.seed),
                                           f"fresh ResNet{depth} (no 2D checkpoint under {args.runs}/)")
                print(f"source: no 2D checkpoint under {args.runs}/, so a freshly initialised 2D ResNet{depth} "
                      f"(BN statistics measured on random inputs, affine weights randomised). Train one with "
                      f"`python -m ahnet.train --stage 2d` for a useful 3D start.")
        kwargs = dict(pfn_depth=args.pfn_depth, upsample=args.upsample, z_pool=args.z_pool, spacing=args.spacing,
                      out_channels=args.out_channels)
        if args.encoder:
            kwargs["encoder"] = args.encoder
        model = transfer_2d_to_3d(source, **kwargs)
    except (TransferError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    t0 = time.time()
    rows = verify_transfer(source, model.encoder.state_dict(), tuple(args.check_size), args.seed)
    print(format_table(rows))
    print(f"verified in {time.time() - t0:.1f} s")
    out = args.out or default_out(source)
    save_checkpoint({"model": model.state_dict(), "model_name": "ahnet", "model_kwargs": model.config,
                     "transfer": {"source": source.origin, "source_depth": source.depth,
                                  "max_abs_err_float32": max(r.err_float32 for r in rows),
                                  "max_abs_err_float64": max(r.err_float64 for r in rows),
                                  "ok": all(r.ok for r in rows)}}, out)
    counts = model.parameter_counts()
    print(f"3D AH-Net ({model.config['encoder']}, pfn_depth {model.config['pfn_depth']}, {model.config['upsample']}): "
          f"{counts['total']:,} parameters ({counts['encoder']:,} transferred) -> {out}")
    if not all(r.ok for r in rows):
        print("error: the transferred encoder does not reproduce the 2D encoder (see FAIL rows above)", file=sys.stderr)
        return 1
    return 0


def default_out(source: Source2d) -> Path:
    origin = Path(source.origin)
    if origin.is_file():
        return origin.parent / "ahnet3d_transferred.pt"
    return Path("runs") / "transfer-fresh" / "ahnet3d_transferred.pt"


if __name__ == "__main__":
    sys.exit(main())
