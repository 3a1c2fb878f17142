"""The paper's comparison as one command: data -> 2D stage -> transfer -> 3D variants -> per-type report.

    python -m ahnet.experiment --preset demo     # `bash run.sh demo`: 2D MC-GCN and AH-Net after transfer
    python -m ahnet.experiment --preset cpu      # the whole comparison at CPU size (about an hour, 2 cores)
    python -m ahnet.experiment --preset paper    # the same at the paper's size (ResNet50, GPU)

Models compared (evaluation.md): the 2D MC-GCN applied slice by slice; the 3D AH-Net after transfer; the 3D
AH-Net from scratch; a 3D U-Net from scratch; AH-Net after transfer at pyramid depths 0..4 ("PFN depth").
Every stage resumes: run the command again after an interruption and finished runs are skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from .data.io import load_dataset_json, read_image


@dataclass
class Preset:
    """Sizes of one experiment. Patches are (D, H, W) voxels; epochs x steps x batch patches per run."""
    cases: int
    size: int
    encoder: str
    patch_2d: List[int]
    batch_2d: int
    epochs_2d: int
    steps_2d: int
    patch_3d: List[int]
    batch_3d: int
    epochs_3d: int
    steps_3d: int
    lr: float
    variants: List[str]
    z_pool: str = "spacing"
    test_cases: int = 0          # > 0: evaluate on an extra phantom of this many test-only cases (more nodules
                                 # per type than the training phantom's own test split); its shapes come from
                                 # the LIDC scans reserved for testing, as the test split's always do
    unet_base: int = 16
    window: Optional[List[int]] = None   # evaluation window; None = each run's training patch (the adaptive
                                         # pyramid pools over the window, so it sees what it saw in training)
    extra: Dict = field(default_factory=dict)


# Variant names: "<model>-<init>[-pfn<K>]"; "mcgcn-2d" is the 2D stage itself.
ALL_VARIANTS = ["mcgcn-2d", "ahnet-transfer", "ahnet-scratch", "unet3d-scratch",
                "ahnet-transfer-pfn0", "ahnet-transfer-pfn1", "ahnet-transfer-pfn2", "ahnet-transfer-pfn3"]

PRESETS: Dict[str, Preset] = {
    "demo": Preset(cases=16, size=192, encoder="resnet18", patch_2d=[3, 128, 128], batch_2d=8, epochs_2d=3,
                   steps_2d=40, patch_3d=[16, 64, 64], batch_3d=2, epochs_3d=3, steps_3d=40, lr=1e-3,
                   variants=["mcgcn-2d", "ahnet-transfer"]),
    "cpu": Preset(cases=32, test_cases=30, size=192, encoder="resnet18", patch_2d=[3, 128, 128], batch_2d=8, epochs_2d=8,
                  steps_2d=40, patch_3d=[16, 64, 64], batch_3d=2, epochs_3d=6, steps_3d=50, lr=1e-3,
                  variants=ALL_VARIANTS),
    "paper": Preset(cases=120, test_cases=120, size=384, encoder="resnet50", patch_2d=[3, 256, 256], batch_2d=16, epochs_2d=20,
                    steps_2d=200, patch_3d=[32, 128, 128], batch_3d=4, epochs_3d=30, steps_3d=200, lr=3e-4,
                    variants=ALL_VARIANTS, z_pool="paper", unet_base=32),
}


def parse_variant(name: str):
    """'ahnet-transfer-pfn2' -> ('ahnet', 'transfer', 2); pyramid depth 4 (the paper's) when not named."""
    parts = name.split("-")
    if name == "mcgcn-2d":
        return "mcgcn", "2d", None
    if len(parts) not in (2, 3) or parts[0] not in ("ahnet", "unet3d") or parts[1] not in ("transfer", "scratch"):
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(ALL_VARIANTS)}")
    if parts[0] == "unet3d" and parts[1] == "transfer":
        raise ValueError("unet3d has no 2D counterpart to transfer from: use unet3d-scratch")
    pfn = 4
    if len(parts) == 3:
        if not parts[2].startswith("pfn") or not parts[2][3:].isdigit():
            raise ValueError(f"unknown variant {name!r}: the third part must be pfnK")
        pfn = int(parts[2][3:])
    return parts[0], parts[1], pfn


def data_spacing(dataset_json: Path) -> List[float]:
    """(sz, sy, sx) of the first case: the z-pooling schedule is chosen for it."""
    first = load_dataset_json(dataset_json)[0]
    return [round(float(s), 4) for s in read_image(first["image"]).spacing]


def ensure_data(data_dir: Path, preset: Preset, seed: int) -> Path:
    """Generate the phantom (unless its dataset.json exists) and build its cache."""
    from .data.cache import build_cache
    from .data.phantom import generate_dataset
    dataset_json = data_dir / "dataset.json"
    if not dataset_json.is_file():
        print(f"[experiment] generating {preset.cases} phantom cases in {data_dir}", flush=True)
        generate_dataset(data_dir, preset.cases, seed=seed, size=preset.size)
    build_cache(dataset_json, Path("data/cache") / data_dir.name, annotations_csv=data_dir / "annotations.csv")
    return dataset_json


def ensure_test_data(data_dir: Path, preset: Preset, seed: int) -> Path:
    """The extra test-only phantom (seeded apart from the training phantom); returns its dataset.json."""
    from .data.phantom import generate_dataset
    dataset_json = data_dir / "dataset.json"
    if not dataset_json.is_file():
        print(f"[experiment] generating {preset.test_cases} test-only phantom cases in {data_dir}", flush=True)
        generate_dataset(data_dir, preset.test_cases, seed=seed + 1_000_003, size=preset.size, split=(0, 0, 1))
    return dataset_json


def train_argv(variant: str, preset: Preset, dataset_json: Path, runs: Path, seed: int, device: str,
               spacing: List[float]) -> List[str]:
    """The `python -m ahnet.train` flags of one variant (printed, so a reader can rerun any single run)."""
    model, init, pfn = parse_variant(variant)
    common = ["--data", str(dataset_json), "--cache-dir", str(Path("data/cache") / dataset_json.parent.name),
              "--encoder", preset.encoder, "--seed", str(seed), "--device", device, "--lr", str(preset.lr),
              "--out", str(runs / variant), "--resume"]
    if model == "mcgcn":
        return common + ["--stage", "2d", "--model", "mcgcn", "--patch-size", *map(str, preset.patch_2d),
                         "--batch-size", str(preset.batch_2d), "--epochs", str(preset.epochs_2d),
                         "--steps-per-epoch", str(preset.steps_2d)]
    kwargs = {"z_pool": preset.z_pool}
    if preset.z_pool == "spacing":
        kwargs["spacing"] = spacing
    if model == "unet3d":
        kwargs["base_channels"] = preset.unet_base
    argv = common + ["--stage", "3d", "--model", model, "--patch-size", *map(str, preset.patch_3d),
                     "--batch-size", str(preset.batch_3d), "--epochs", str(preset.epochs_3d),
                     "--steps-per-epoch", str(preset.steps_3d), "--model-kwargs", json.dumps(kwargs)]
    if model == "ahnet":
        argv += ["--pfn-depth", str(pfn), "--init", init]
        if init == "transfer":
            argv += ["--init-from", str(runs / "mcgcn-2d")]
    return argv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ahnet.experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="experiment size (default demo)")
    p.add_argument("--name", help="experiment name: runs/<name>, data/<name> (default: the preset's)")
    p.add_argument("--data", type=Path, help="an existing dataset.json to use instead of a generated phantom")
    p.add_argument("--variants", nargs="+", help=f"subset of variants to train (default: the preset's); "
                   f"any of {', '.join(ALL_VARIANTS)}")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the report's intervals")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from . import evaluate, train

    preset = PRESETS[args.preset]
    name = args.name or f"phantom-{args.preset}"
    runs = Path("runs") / name
    variants = args.variants or preset.variants
    try:
        for v in variants:
            parse_variant(v)
        if any(parse_variant(v)[1] == "transfer" for v in variants) and "mcgcn-2d" not in variants:
            variants = ["mcgcn-2d"] + list(variants)
        t0 = time.time()
        dataset_json = args.data if args.data else ensure_data(Path("data") / name, preset, args.seed)
        if args.data:
            from .data.cache import build_cache
            ann = Path(args.data).parent / "annotations.csv"
            build_cache(args.data, Path("data/cache") / Path(args.data).parent.name,
                        annotations_csv=ann if ann.is_file() else None)
        spacing = data_spacing(dataset_json)
    except (ValueError, FileNotFoundError) as exc:
        print(f"ahnet.experiment: error: {exc}", file=sys.stderr)
        return 2
    print(f"[experiment] {args.preset}: data {dataset_json} (spacing {spacing} mm), runs in {runs}/, "
          f"variants {', '.join(variants)}", flush=True)
    for v in variants:
        flags = train_argv(v, preset, dataset_json, runs, args.seed, args.device, spacing)
        print(f"\n[experiment] {v}: python -m ahnet.train {' '.join(flags)}", flush=True)
        t = time.time()
        rc = train.main(flags)
        if rc != 0:
            print(f"ahnet.experiment: error: training {v} failed (exit {rc}); fix and rerun the same command "
                  f"to resume", file=sys.stderr)
            return rc
        print(f"[experiment] {v} trained in {time.time() - t:.0f} s", flush=True)
    report = runs / "report"
    eval_json = dataset_json
    if preset.test_cases > 0 and not args.data:
        eval_json = ensure_test_data(Path("data") / f"{name}-test", preset, args.seed)
    eval_flags = ["--runs", *[str(runs / v) for v in variants], "--data", str(eval_json), "--out", str(report),
                  "--device", args.device, "--bootstrap", str(args.bootstrap),
                  "--title", f"AH-Net per-type evaluation ({args.preset} preset, {name})"]
    if preset.window:
        eval_flags += ["--window", *map(str, preset.window)]
    print(f"\n[experiment] python -m ahnet.evaluate {' '.join(eval_flags)}", flush=True)
    rc = evaluate.main(eval_flags)
    if rc != 0:
        return rc
    print(f"\n[experiment] done in {(time.time() - t0) / 60:.1f} min. Report: {report / 'report.html'} "
          f"(also report.md, report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
