"""The experiment's presets and variants: sizes, recipes and the TrainConfig of every variant, and the
``python -m ahnet.train`` command line that trains one."""
from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ahnet import paths
from ahnet.commands.phantoms import slice_options
from ahnet.commands.rescore import SecondStageConfig
from ahnet.train.config import TrainConfig
from ahnet.precision import cpu_native_bf16, resolve_device

PROG = "ahnet.experiment"

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
    test_phantom: Optional[str] = None   # evaluate on this held-out test phantom (ahnet.data.phantom.TEST_PHANTOMS:
                                         # every type equally often); wins over test_cases
    unet_base: int = 16
    window: Optional[List[int]] = None   # evaluation window; None = each run's training patch (the adaptive
                                         # pyramid pools over the window, so it sees what it saw in training)
    jobs: int = 1                        # trainings side by side on a CPU (each on its share of the cores)
    phantom: Dict = field(default_factory=dict)  # options of the training phantom (PhantomOptions fields)
    recipe: Dict = field(default_factory=dict)   # TrainConfig settings of every variant (sampling, validation,
                                                 # early stopping); paper_notes/results.md measures them
    rescore: Optional[Dict] = None       # options of every variant's second stage (python -m ahnet.rescore,


# Variant names: "<model>-<init>[-pfn<K>]"; "mcgcn-2d" is the 2D stage itself.
ALL_VARIANTS = ["mcgcn-2d", "ahnet-transfer", "ahnet-scratch", "unet3d-scratch",
                "ahnet-transfer-pfn0", "ahnet-transfer-pfn1", "ahnet-transfer-pfn2", "ahnet-transfer-pfn3"]


# The cpu preset's comparison within its 2-hour budget (two trainings side by side, one core each, ~38 min a
# 3D run of 6,000 steps; the 2D stage's 2,400 steps run beside AH-Net from scratch, off the critical path;
# each second stage, at window overlap 0.25, as soon as its training has ended):
# the pyramid ablated (depth 0) against the paper's depth 4; depths 1-3 with --variants.
CPU_VARIANTS = ["mcgcn-2d", "ahnet-transfer", "ahnet-scratch", "unet3d-scratch", "ahnet-transfer-pfn0"]


PRESETS: Dict[str, Preset] = {
    "demo": Preset(cases=32, size=192, encoder="resnet18", patch_2d=[3, 128, 128], batch_2d=8, epochs_2d=4,
                   steps_2d=100, patch_3d=[16, 64, 64], batch_3d=2, epochs_3d=6, steps_3d=250, lr=1e-3,
                   variants=["mcgcn-2d", "ahnet-transfer"], test_phantom="demo",
                   phantom=dict(nodules_per_case=[4, 10], negatives=0.1),
                   recipe=dict(hard_fraction=0.3, val_cases=4, dice_per_patch=True,
                               pos_weighting="inverse-diameter")),
    "cpu": Preset(cases=96, test_phantom="cpu", size=192, encoder="resnet18", patch_2d=[3, 128, 128], batch_2d=8,
                  epochs_2d=10, steps_2d=240, patch_3d=[16, 64, 64], batch_3d=2, epochs_3d=6, steps_3d=1000, lr=1e-3,
                  variants=CPU_VARIANTS, jobs=2, phantom=dict(nodules_per_case=[4, 10], negatives=0.1),
                  recipe=dict(hard_fraction=0.3, val_cases=10, patience=3, dice_per_patch=True,
                              pos_weighting="inverse-diameter"), rescore=dict(overlap=0.25)),
    "paper": Preset(cases=120, test_cases=120, size=384, encoder="resnet50", patch_2d=[3, 256, 256], batch_2d=16, epochs_2d=20,
                    steps_2d=200, patch_3d=[32, 128, 128], batch_3d=4, epochs_3d=30, steps_3d=200, lr=3e-4,
                    variants=ALL_VARIANTS, z_pool="paper", unet_base=32, rescore={}),
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


def at_slice_spacing(preset: Preset, spacing: float) -> Preset:
    """The preset's phantoms at another slice spacing (thickness = spacing, the same 100 mm of z) and its 3D patch
    over the same depth in mm (16 slices of 2.5 mm = 32 of 1.25 mm = 8 of 5 mm); 2.5 mm: the preset itself."""
    if spacing == 2.5:
        return preset
    depth = preset.patch_3d[0] * 2.5 / spacing
    if depth != int(depth) or depth < 1:
        raise ValueError(f"--slice-spacing {spacing:g}: the {preset.patch_3d[0]}-slice 3D patch of 2.5 mm slices "
                         f"is {depth:g} slices of {spacing:g} mm; choose a spacing that gives whole slices")
    return dataclasses.replace(preset, phantom={**preset.phantom, **slice_options(spacing)},
                               patch_3d=[int(depth)] + list(preset.patch_3d[1:]))


def variant_config(variant: str, k: int, preset: Preset, dataset_json: Path, ep: paths.ExperimentPaths, seed: int,
                   device: str, spacing: List[float], sync_bn: bool = False) -> TrainConfig:
    """The training configuration of a variant's k-th training (training seed ``seed + k``, the same data; a
    transferred variant starts from the k-th 2D stage), resolved: every check done before any training starts."""
    model, init, pfn = parse_variant(variant)
    d = dict(data=str(dataset_json), cache_dir=str(paths.cache_dir(dataset_json)), encoder=preset.encoder,
             seed=seed + k, device=device, lr=preset.lr, out=str(ep.run(variant, k)), resume=True, sync_bn=sync_bn,
             amp=fast_amp(device), **preset.recipe)
    name = ep.run(variant, k).name
    if model == "mcgcn":
        d.update(stage="2d", model="mcgcn", patch_size=list(preset.patch_2d), batch_size=preset.batch_2d,
                 epochs=preset.epochs_2d, steps_per_epoch=preset.steps_2d)
        return TrainConfig.from_dict(d, name).resolved()
    kwargs: dict = {"z_pool": preset.z_pool}
    if preset.z_pool == "spacing":
        kwargs["spacing"] = spacing
    if model == "unet3d":
        kwargs["base_channels"] = preset.unet_base
    d.update(stage="3d", model=model, patch_size=list(preset.patch_3d), batch_size=preset.batch_3d,
             epochs=preset.epochs_3d, steps_per_epoch=preset.steps_3d, model_kwargs=kwargs,
             channels_last=d["amp"] != "off")
    if model == "ahnet":
        d.update(pfn_depth=pfn, init=init)
        if init == "transfer":
            d["init_from"] = str(ep.run("mcgcn-2d", k))
    return TrainConfig.from_dict(d, name).resolved()


def second_stage_config(preset: Preset, amp: str, seed: int, k: int) -> Optional[SecondStageConfig]:
    """The k-th training's second stage (the preset's options, the runs' precision for its maps and its own
    training, seed ``seed + k``), checked; None when the preset has none."""
    if preset.rescore is None:
        return None
    try:
        return SecondStageConfig.from_dict({"seed": seed + k, **preset.rescore, "amp": amp, "fit_amp": amp})
    except ValueError as e:
        raise ValueError(f"the preset's {e}") from None


def fast_amp(device: str) -> str:
    """The experiment's precision: fp16 + GradScaler on CUDA, bf16 on a CPU that computes bfloat16 natively
    (with channels-last 3D: 0.22 s instead of 0.54 s a step, paper_notes/performance.md), else float32."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return "fp16"
    return "bf16" if dev.type == "cpu" and cpu_native_bf16() else "off"


def command_line(cfg: TrainConfig) -> str:
    """The ``python -m ahnet.train`` command that trains ``cfg`` (the settings that differ from the defaults)."""
    default = TrainConfig().to_dict()
    if cfg.cache_dir == str(paths.cache_dir(cfg.data)):
        default["cache_dir"] = cfg.cache_dir
    flags = []
    for k, v in cfg.to_dict().items():
        if k == "model" or v == default[k]:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else f"--no-{k.replace('_', '-')}")
        elif isinstance(v, list):
            flags += [flag, *map(str, v)]
        elif isinstance(v, dict):
            flags += [flag, json.dumps(v)]
        else:
            flags += [flag, str(v)]
    if cfg.model != {"2d": "mcgcn", "3d": "ahnet"}[cfg.stage]:
        flags += ["--model", cfg.model]
    return "python -m ahnet.train " + " ".join(shlex.quote(f) for f in flags)
