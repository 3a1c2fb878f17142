"""One training configuration per run: defaults, then a JSON file (``--config FILE``), then CLI flags.

``TrainConfig`` is a dataclass whose fields carry their own help text; ``build_parser`` turns them into the
flags of ``python -m ahnet.train`` (``--pfn-depth`` for ``pfn_depth``), and ``load_config(argv)`` applies
the three layers in order. ``save_run_config`` writes ``config.json`` into the run folder with the versions
of python, torch, CUDA / cuDNN and the package, and the git commit when the source is a git checkout.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from ahnet import failures, paths
from ahnet.atomic import write_text_atomic
from ahnet.data.checks import read_json
from ahnet.data.sampling import POS_WEIGHTINGS
from ahnet.train.losses import LOSSES
from ahnet.nets import ENCODERS, MODELS
from ahnet.nets.ahnet3d import PFN_DEPTH, PFN_DEPTH_RANGE
from ahnet.precision import AMP_MODES

__all__ = ["TrainConfig", "build_parser", "load_config", "save_run_config", "environment_info",
           "read_run_config", "step_cap", "patience_spent"]


def _f(default: Any, help: str, choices: Sequence[str] | None = None, shown: str | None = None, **kw) -> Any:
    """A field with its help text and choices; ``shown``: the default as the flag's help states it (when the
    field's own default, None, stands for another owner's)."""
    meta = {"help": help, "choices": choices, "shown": shown}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


#: the network a stage trains when --model is not given
DEFAULT_MODEL = {"2d": "mcgcn", "3d": "ahnet"}

#: the range of each numeric setting: (low, high, low end open, high end open); None = unbounded. Every float
#: setting must also be finite. Checked by TrainConfig.resolved(), so flags, --config files and from_dict alike.
LIMITS = {
    "lr": (0, None, True, False), "lr_encoder": (0, None, False, False),
    "weight_decay": (0, None, False, False), "min_lr_ratio": (0, 1, False, False),
    "poly_power": (0, None, True, False), "grad_clip": (0, None, False, False),
    "focal_alpha": (0, 1, False, False), "focal_gamma": (0, None, False, False),
    "dice_smooth": (0, None, False, False), "pos_fraction": (0, 1, False, False),
    "warmup_steps": (0, None, False, False), "max_steps": (1, None, False, False),
    "ckpt_every": (0, None, False, False), "val_patches": (0, None, False, False),
    "num_workers": (0, 256, False, False), "max_bad_steps": (1, None, False, False),
    "seed": (0, 2 ** 63 - 1, False, False), "pfn_depth": (*PFN_DEPTH_RANGE, False, False),
    "batch_size": (1, None, False, False), "epochs": (1, None, False, False),
    "steps_per_epoch": (1, None, False, False), "hard_fraction": (0, 1, False, False),
    "val_cases": (0, None, False, False), "patience": (0, None, False, False), "min_delta": (0, None, False, False),
    "dist_timeout": (0, None, True, False), "ema_decay": (0, 1, False, True),
}
#: the most voxels of one step's patches (batch x D x H x W: 2^28, e.g. 1 x 256 x 1024 x 1024); more is a typo
MAX_PATCH_VOXELS = 2 ** 28


@dataclass
class TrainConfig:
    """Every setting of one training run (one stage). Saved verbatim in runs/<name>/config.json."""

    # what to train
    stage: str = _f("3d", "training stage: 2d = MC-GCN on 3-slice stacks (slices as channels), "
                          "3d = AH-Net or the 3D U-Net on volumes", ["2d", "3d"])
    model: str | None = _f(None, "network; default mcgcn for --stage 2d, ahnet for --stage 3d "
                                 "(unet3d = the from-scratch 3D baseline)", tuple(MODELS))
    encoder: str = _f("resnet50", "ResNet encoder of MC-GCN / AH-Net (resnet50 is the paper's)", ENCODERS)
    pfn_depth: int | None = _f(None, f"AH-Net's pyramid pooling (PVP) levels in the decoder, {PFN_DEPTH_RANGE[0]} .. "
                                     f"{PFN_DEPTH_RANGE[1]}, 0 = off; --model ahnet only",
                               shown=f"{PFN_DEPTH}, the paper's, for --model ahnet; none for the others")
    init: str = _f("scratch", "3D stage start: transfer = encoder from a 2D run (--init-from) via "
                              "weights_transfer, scratch = random init", ["transfer", "scratch"])
    init_from: str | None = _f(None, "the 2D run folder (or its .pt checkpoint) to transfer from with "
                                     "--init transfer; a folder means its trained checkpoint "
                                     f"({paths.CHECKPOINTS}/{paths.BEST}, else {paths.LAST})")
    imagenet_weights: str | None = _f(None, "2D stage: torchvision ResNet state-dict file to start the "
                                            "encoder from (optional; no download happens)")
    model_kwargs: dict = _f({}, "extra keyword arguments for build_model as JSON, e.g. "
                                "'{\"upsample\": \"transpose\", \"z_pool\": \"spacing\"}'")
    # data
    data: str = _f(str(paths.DATA_ROOT / "phantom" / paths.DATASET), "dataset.json (Decathlon style) listing the "
                                                                       f"cases; {paths.ANNOTATIONS} beside it")
    cache_dir: str | None = _f(None, f"HDF5 cache folder; default {paths.CACHE_ROOT}/<dataset folder name>")
    patch_size: list | None = _f(None, "patch D H W in voxels; default 3 128 128 for --stage 2d, "
                                       "32 128 128 for --stage 3d")
    pos_fraction: float = _f(0.5, "fraction of training patches centred on a nodule")
    pos_weighting: str = _f("case", "how a nodule patch picks its nodule: case = a case with nodules, then one "
                                    "of its nodules, uniformly; inverse-diameter = any nodule with probability "
                                    "proportional to 1 / its diameter (small nodules drawn more often); "
                                    "inverse-diameter-contrast = 1 / (diameter x sqrt(contrast against its "
                                    "surroundings, floored at 50 HU): faint nodules drawn more often too)",
                            POS_WEIGHTINGS)
    hard_fraction: float = _f(0.0, "fraction of the other (negative) patches centred on hard tissue: dense "
                                   "voxels (> -400 HU) within 3 in-plane voxels of aerated lung (< -600 HU) and "
                                   "away from nodules, i.e. vessels, airway walls, fissures and pleura "
                                   "(ahnet.data.sampling.hard_negative_index)")
    augment: str = _f("standard", "training augmentation (ahnet.data.augment): standard = in-plane flips, "
                                  "rot90, rotate/zoom, intensity, noise; standard-blur = the same plus, in 3 of 10 "
                                  "patches, an in-plane Gaussian blur of sigma up to 1 voxel (softer kernels); "
                                  "standard-coarsen = the standard plus, in 3 of 10 patches, pixels up to 1.4 x "
                                  "coarser and back (coarser scans); standard-zoom = the standard with the "
                                  "rotate/zoom in 5 of 10 patches and zooms of 0.7-1.3 instead of 0.85-1.15 (other "
                                  "pixel spacings); "
                                  "randaugment = N ops at magnitude M; none",
                      ["standard", "standard-blur", "standard-coarsen", "standard-zoom", "randaugment", "none"])
    randaugment: list = _f([2, 5], "--augment randaugment: N ops per patch and magnitude M (0..10)")
    batch_size: int = _f(2, "patches per optimiser step (under torchrun: over all ranks, each taking an equal "
                            "share)")
    num_workers: int = _f(0, "DataLoader worker processes (0 = load in the main process)")
    # optimisation
    epochs: int = _f(20, "number of epochs")
    steps_per_epoch: int = _f(100, "optimiser steps per epoch (patches per epoch = this x batch size)")
    max_steps: int | None = _f(None, "stop after this many optimiser steps in total (the run stays "
                                     "resumable); default: epochs x steps-per-epoch")
    lr: float = _f(3e-4, "Adam learning rate of the decoder and any new layer")
    lr_encoder: float | None = _f(None, "Adam learning rate of parameters named encoder.* (the transferred "
                                        "encoder); default: --lr")
    weight_decay: float = _f(0.0, "Adam weight decay (L2, coupled as in torch.optim.Adam)")
    schedule: str = _f("cosine", "learning-rate schedule per step after warm-up: cosine to "
                                 "lr x min-lr-ratio, poly (1 - t/T)^poly-power, or constant",
                       ["cosine", "poly", "constant"])
    warmup_steps: int = _f(0, "linear warm-up steps from lr/100 (0 = none)")
    min_lr_ratio: float = _f(0.01, "cosine: final learning rate as a fraction of the initial one")
    poly_power: float = _f(0.9, "poly: exponent of (1 - t/T)")
    grad_clip: float = _f(0.0, "clip the gradient norm to this value (0 = no clipping)")
    ema_decay: float = _f(0.0, "exponential moving average of the weights with this decay per step (e.g. 0.999); "
                               "the average is validated and saved as the run's model (0 = off)")
    loss: str = _f("dice_focal", "loss on the logits: focal (the paper's), dice, ce, dice_focal", tuple(LOSSES))
    focal_alpha: float = _f(0.25, "focal loss foreground weight alpha (background gets 1 - alpha)")
    focal_gamma: float = _f(2.0, "focal loss focusing exponent gamma")
    dice_smooth: float = _f(1e-5, "soft Dice smoothing added to numerator and denominator")
    dice_per_patch: bool = _f(False, "soft Dice per patch, averaged over the patches that hold foreground (each "
                                     "nodule patch weighs alike, whatever the nodule's size), instead of one Dice "
                                     "over the whole batch")
    dice_per_nodule: bool = _f(False, "soft Dice per nodule: each connected component of a patch's target against "
                                      "that patch's background, averaged over the batch's nodules (blob loss's "
                                      "instance term; training.md)")
    # numerics and device
    amp: str = _f("auto", "mixed precision: auto = fp16 + GradScaler on CUDA, off on CPU; bf16 = bfloat16 "
                          "autocast (CUDA or CPU; about 1.5x faster than float32 on a CPU with native bfloat16, "
                          "2x with --channels-last); fp16 = float16 + GradScaler (CUDA); off = float32",
                  AMP_MODES)
    channels_last: bool = _f(False, "keep the 3D network and its batches in channels-last 3D memory (same values; "
                                    "faster with --amp bf16 on a CPU with native bfloat16, and with AMP on CUDA)")
    max_bad_steps: int = _f(20, "stop the run after this many non-finite losses in a row (each one skips "
                                "its step)")
    device: str = _f("auto", "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    seed: int = _f(0, "seed of the sampler, the DataLoader order, the weights and the fold split")
    deterministic: bool = _f(False, "CUDA: deterministic kernels wherever they exist (no cuDNN autotuning, "
                                    "deterministic cuDNN / cuBLAS / max-pool backward; slower); AH-Net's trilinear "
                                    "upsampling backward has none (ahnet.precision)")
    # several processes (torchrun --nproc_per_node N -m ahnet.train ...; README "Scaling up")
    sync_bn: bool = _f(False, "under torchrun: BatchNorm statistics (and the batch Dice) over the global batch of "
                              "all ranks, as one process with the whole --batch-size computes them; advised when "
                              "each rank holds 1-2 patches")
    dist_backend: str = _f("auto", "under torchrun: process-group backend, auto = nccl on CUDA, gloo on CPUs",
                           ["auto", "nccl", "gloo"])
    dist_timeout: float = _f(1800.0, "under torchrun: seconds a rank may go without progress (a step, rank 0's "
                                     "validation, a checkpoint write, waiting for the others) before every rank "
                                     "stops with one error line")
    # validation, checkpoints, output
    validation: str = _f("auto", f"what chooses {paths.BEST} and judges --patience: cpm = detection CPM (LUNA16 "
                                 "FROC, candidates as evaluation makes them) of whole validation cases through "
                                 "the inference stage; dice = Dice of --val-patches patches; auto = cpm when the "
                                 "command line can build it (validation cases with nodules), else dice. "
                                 "config.json records the one used", ["auto", "cpm", "dice"])
    val_cases: int = _f(0, "--validation cpm: at most this many validation cases, the first in dataset order "
                           "(0 = all)")
    patience: int = _f(0, "stop early after this many epochs in a row without a validation score better than "
                          "the best by more than --min-delta (0 = train every epoch)")
    min_delta: float = _f(0.0, "the improvement --patience asks for (score units: CPM or Dice)")
    val_patches: int = _f(16, "--validation dice: validation patches per epoch (fixed set, half on nodules): "
                              "patch-level Dice, CPU-cheap")
    ckpt_every: int = _f(0, f"also write {paths.LAST} every N optimiser steps (0 = at the end of each epoch only)")
    out: str = _f(str(paths.RUNS_ROOT / "ahnet"), f"run folder: {paths.CONFIG}, {paths.LOG}, {paths.CHECKPOINTS}/"
                                                  f"{{{paths.LAST},{paths.BEST}}}, {paths.PROGRESS}")
    resume: bool = _f(False, f"continue the run in --out from {paths.CHECKPOINTS}/{paths.LAST} exactly where it "
                             f"stopped")
    folds: int = _f(0, "K-fold cross-validation by case over the train + validation cases (0 = use the "
                       "split column of dataset.json)")
    fold: int | None = _f(None, "which fold (0 .. K-1) is the validation set")
    all_folds: bool = _f(False, "train every fold 0 .. K-1 one after another into <out>-fold<F>")

    # ------------------------------------------------------------------------------------------- helpers
    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        """A config from defaults overlaid with ``d``; unknown keys raise ValueError naming them."""
        return cls().updated(d, source)

    def updated(self, d: dict, source: str = "config") -> "TrainConfig":
        """A copy with the entries of ``d`` applied (flag spellings with dashes are accepted)."""
        names = {f.name for f in fields(self)}
        d = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {unknown}; valid settings are the fields of "
                             f"TrainConfig (see python -m ahnet.train --help).")
        return dataclasses.replace(self, **d)

    def resolved(self) -> "TrainConfig":
        """Fill stage-dependent defaults and check the combination; ValueError names what is wrong."""
        check_kinds(self)
        c = dataclasses.replace(self, model_kwargs=dict(self.model_kwargs))
        for f in fields(c):
            ch = f.metadata.get("choices")
            v = getattr(c, f.name)
            if ch and v is not None and v not in ch:
                raise ValueError(f"{f.name} must be one of {list(ch)}, got {v!r}.")
        if c.model is None:
            c.model = DEFAULT_MODEL[c.stage]
        if MODELS[c.model].stage != c.stage:
            others = [m for m, s in MODELS.items() if s.stage == c.stage]
            raise ValueError(f"--model {c.model} is trained by --stage {MODELS[c.model].stage}, not --stage "
                             f"{c.stage} (which trains {', '.join(others)}); use --stage {MODELS[c.model].stage}.")
        if c.patch_size is None:
            c.patch_size = [3, 128, 128] if c.stage == "2d" else [32, 128, 128]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer()
                   for v in c.patch_size):
            raise ValueError(f"patch_size must be three positive ints D H W, got {c.patch_size}.")
        c.patch_size = [int(v) for v in c.patch_size]
        if len(c.patch_size) != 3 or min(c.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints D H W, got {c.patch_size}.")
        if c.stage == "2d" and c.patch_size[0] % 2 != 1:
            raise ValueError(f"--stage 2d needs an odd number of slices (3 = the paper), got patch "
                             f"D = {c.patch_size[0]}.")
        if c.init == "transfer":
            if c.stage != "3d" or c.model != "ahnet":
                raise ValueError("--init transfer makes an AH-Net from a 2D run; it needs --stage 3d "
                                 "--model ahnet.")
            if not c.init_from:
                raise ValueError("--init transfer needs --init-from RUN_OR_CKPT (the 2D run).")
        if c.imagenet_weights and c.stage != "2d":
            raise ValueError("--imagenet-weights loads the 2D stage's encoder; 3D gets its encoder by "
                             "--init transfer.")
        check_network_settings(c)
        check_limits(c)
        check_dice_unit(c)
        if c.batch_size * math.prod(c.patch_size) > MAX_PATCH_VOXELS:
            raise ValueError(f"--batch-size {c.batch_size} x --patch-size {' '.join(map(str, c.patch_size))} is "
                             f"{c.batch_size * math.prod(c.patch_size):.3g} voxels per step; at most "
                             f"{MAX_PATCH_VOXELS:.3g}.")
        ra = list(c.randaugment)
        if not (len(ra) == 2 and all(isinstance(v, (int, float)) for v in ra) and float(ra[0]).is_integer()
                and 0 <= ra[0] <= 100 and 0 <= ra[1] <= 10):
            raise ValueError(f"--randaugment N M: N ops (an integer 0 .. 100) at magnitude M (0 .. 10), got {ra}.")
        if c.folds < 0 or c.folds == 1:
            raise ValueError(f"folds must be 0 (use the dataset split) or >= 2, got {c.folds}.")
        if c.fold is not None:
            if c.folds < 2:
                raise ValueError("--fold F needs --folds K (K >= 2).")
            if not 0 <= c.fold < c.folds:
                raise ValueError(f"--fold must lie in 0 .. {c.folds - 1}, got {c.fold}.")
        if c.cache_dir is None:
            c.cache_dir = str(paths.cache_dir(c.data))
        return c

    def to_dict(self) -> dict:
        return asdict(self)


_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list, tuple),
          "dict": (dict,)}


def _check_kind(name: str, declared, v) -> None:
    """ValueError when ``v`` is not of the field's declared kind (a --config file or from_dict can put anything)."""
    kinds = [k.strip() for k in str(declared).split("|")]
    if v is None and "None" in kinds:
        return
    want = [_KINDS[k] for k in kinds if k in _KINDS]
    ok = any(isinstance(v, t) and not (isinstance(v, bool) and bool not in t) for t in want)
    if want and not ok:
        raise ValueError(f"setting {name} = {v!r}: expected {' or '.join(k for k in kinds if k != 'None')}"
                         f"{' or null' if 'None' in kinds else ''}.")


def check_network_settings(c: TrainConfig) -> None:
    """The network's part of a (model-resolved) config, in place: --pfn-depth belongs to the models that take it
    (AH-Net; unset, it takes the network's default, ahnet.nets.ahnet3d.PFN_DEPTH) and is refused for the others;
    --model-kwargs may not set a key that training sets itself (a flag's, the patch's slices, or a fixed one)."""
    spec = MODELS[c.model]
    if "pfn_depth" in spec.settings:
        c.pfn_depth = PFN_DEPTH if c.pfn_depth is None else c.pfn_depth
    elif c.pfn_depth is not None:
        raise ValueError(f"--pfn-depth sets AH-Net's pyramid pooling and --model {c.model} has none; drop it.")
    for key in spec.training_keys():
        if key in c.model_kwargs:
            raise ValueError(f"--model-kwargs sets {key}, which {_setter(spec, key)}.")


def _setter(spec, key: str) -> str:
    """What sets a keyword argument that training gives model ``spec`` itself (for check_network_settings)."""
    if key in spec.settings:
        return f"--{key.replace('_', '-')} sets; give it there"
    if key == spec.slices:
        return "the first --patch-size size sets (the slices of a 2D stack)"
    return f"training fixes at {dict(spec.fixed)[key]} (one CT channel in, one foreground logit out)"


def saved_settings(d: dict) -> dict:
    """A saved run's settings as this version reads them: earlier versions recorded pfn_depth (4) for every model,
    so for a model without a pyramid it becomes None, as this version records it."""
    spec = MODELS.get(d.get("model"))
    if spec is not None and "pfn_depth" not in spec.settings and d.get("pfn_depth") is not None:
        return dict(d, pfn_depth=None)
    return d


def check_dice_unit(c: TrainConfig) -> None:
    """--dice-per-patch / --dice-per-nodule choose what one soft Dice is computed over: one of them, with a loss
    that has a Dice term."""
    flags = [f for f, on in (("--dice-per-patch", c.dice_per_patch), ("--dice-per-nodule", c.dice_per_nodule)) if on]
    if len(flags) == 2:
        raise ValueError("--dice-per-patch and --dice-per-nodule are two units for one Dice term; choose one.")
    if flags and c.loss not in ("dice", "dice_focal"):
        raise ValueError(f"{flags[0]} shapes the Dice term, and --loss {c.loss} has none; use --loss dice or "
                         "dice_focal.")


def check_kinds(c: TrainConfig) -> None:
    """Every setting of its declared kind (int, float, str, bool, list, dict, or null where allowed)."""
    for f in fields(c):
        _check_kind(f.name, f.type, getattr(c, f.name))


def check_limits(c: TrainConfig) -> None:
    """Numeric settings finite (floats) and within LIMITS; ValueError naming the flag otherwise."""
    for f in fields(c):
        v = getattr(c, f.name)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{flag} {v} is not a finite number.")
        if f.name in LIMITS:
            lo, hi, lo_open, hi_open = LIMITS[f.name]
            ok = ((lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi)))
            if not ok:
                raise ValueError(f"{flag} must be {failures.describe_range(lo, hi, lo_open, hi_open)}, got {v:g}.")


# ------------------------------------------------------------------------------------------------- parser
def _opt(conv):
    def parse(s: str):
        return None if s.lower() in ("none", "null", "") else conv(s)
    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def _json_dict(s: str) -> dict:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r} ({e.msg})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return v


def build_parser(name: str = "ahnet.train", description: str | None = None) -> argparse.ArgumentParser:
    """The CLI: one flag per TrainConfig field (dashes for underscores) plus --config FILE.

    Flags not given are absent from the namespace (argparse.SUPPRESS), so they do not override the file.
    """
    p = failures.Parser(
        name, argument_default=argparse.SUPPRESS,
        description=description or (
            "Train one stage of AH-Net for lung nodules. Settings come from defaults, then --config FILE "
            "(JSON with TrainConfig field names), then these flags."))
    p.add_argument("--config", metavar="FILE", help="JSON file of settings (applied before the flags)")
    for f in fields(TrainConfig):
        add_setting_flag(p, f.name)
    return p


def add_setting_flag(parser, name: str, flag: str | None = None, **overrides) -> None:
    """Add the flag of TrainConfig field ``name`` (type, choices and help from the field) to ``parser`` (or an
    argument group); ``flag`` renames it (the pipeline's --lr-2d), ``overrides`` replace add_argument keywords."""
    f = next(x for x in fields(TrainConfig) if x.name == name)
    flag = flag or "--" + f.name.replace("_", "-")
    default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    kw: dict = {"help": f"{f.metadata['help']} (default: {f.metadata.get('shown') or json.dumps(default)})"}
    choices = f.metadata.get("choices")
    t = f.type if isinstance(f.type, str) else str(f.type)
    if t == "bool":
        kw["action"] = argparse.BooleanOptionalAction
    elif t.startswith("list") and f.name == "randaugment":
        kw.update(nargs=2, type=float, metavar=("N", "M"))
    elif t.startswith("list"):
        kw.update(nargs=3, type=int, metavar=("D", "H", "W"))
    elif t == "dict":
        kw.update(type=_json_dict, metavar="JSON")
    else:
        base = t.split("|")[0].strip()
        conv = {"int": int, "float": float, "str": str}[base]
        kw.update(type=_opt(conv) if "None" in t else conv, choices=choices,
                  metavar=None if choices else base.upper())
    kw.update(overrides)
    parser.add_argument(flag, **kw)


def step_cap(epochs: int, steps_per_epoch: int, max_steps: int | None) -> int:
    """The optimiser steps a run takes at most: epochs x steps_per_epoch, or --max-steps when that is smaller."""
    full = epochs * steps_per_epoch
    return full if max_steps is None else min(max_steps, full)


def patience_spent(epoch: int, best_epoch: int | None, patience: int) -> bool:
    """The early-stop rule: ``patience`` (> 0) epochs have passed since the best validation score's epoch."""
    return bool(patience) and best_epoch is not None and epoch - best_epoch >= patience


def read_json_config(path: str | os.PathLike) -> dict:
    """The settings of a JSON config file (a run's config.json works too: its "config" entry is used)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"config file {path} does not exist.")
    d = read_json(path, "config file")
    if not isinstance(d, dict):
        raise ValueError(f"config file {path} must hold a JSON object of settings.")
    if "config" in d and isinstance(d["config"], dict) and "versions" in d:
        d = saved_settings(d["config"])
    return d


def read_run_config(run_dir: str | os.PathLike) -> dict | None:
    """The saved settings of a run folder, or None when it has no config.json."""
    p = paths.run_paths(run_dir).config
    return read_json_config(p) if p.is_file() else None


def load_config(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None,
                base: TrainConfig | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Defaults (or ``base``) -> --config FILE -> flags. Returns (config, the namespace of given flags).

    With --resume and an existing <out>/config.json, the saved settings sit between the defaults and the
    file, so a resumed run trains what it trained before unless a flag says otherwise (e.g. more --epochs).
    """
    parser = parser or build_parser()
    ns = parser.parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if k != "config"}
    cfg = base or TrainConfig()
    file_d = read_json_config(ns.config) if getattr(ns, "config", None) else {}
    resume = given.get("resume", file_d.get("resume", cfg.resume))
    out = given.get("out", file_d.get("out", cfg.out))
    if resume:
        saved = read_run_config(out)
        if saved is not None:   # a stop by --max-steps is not inherited: a resumed run goes on to the end
            saved = {k: v for k, v in saved.items() if k not in ("max_steps", "resume", "all_folds")}
            cfg = cfg.updated(saved, str(paths.run_paths(out).config))
    if file_d:
        cfg = cfg.updated(file_d, f"config file {ns.config}")
    cfg = cfg.updated(given, "command line")
    return cfg, ns


# ----------------------------------------------------------------------------------------- environment
def environment_info() -> dict:
    """Versions of python, torch, CUDA, cuDNN, numpy and the package; the device; the git commit if any."""
    import numpy
    import torch

    import ahnet
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "numpy": numpy.__version__,
        "ahnet": getattr(ahnet, "__version__", None),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    c = ahnet.code_commit()
    info["git"] = None if c is None else {"commit": c["commit"], "dirty": c["dirty"]}
    return info


def save_run_config(cfg: TrainConfig, run_dir: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write <run_dir>/config.json: {"config": settings, "versions": environment_info(), "argv", "created"}."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    doc = {"config": cfg.to_dict(), "versions": environment_info(), "argv": list(sys.argv),
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if extra:
        doc.update(extra)
    return write_text_atomic(paths.run_paths(run_dir).config, json.dumps(doc, indent=2, sort_keys=False) + "\n")
