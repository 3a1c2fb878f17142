"""Train one stage of AH-Net: ``python -m ahnet.train --stage 2d|3d ...`` (``--help`` explains each flag).

- 2D stage: MC-GCN on (3, H, W) patches; the 3 slices are the channels, the label is the middle slice.
- 3D stage: AH-Net (from scratch, or ``--init transfer --init-from RUN`` via the 2D -> 3D weight transfer)
  or the 3D U-Net baseline on (D, H, W) patches.

Optimiser Adam (the paper's), learning rate per step: optional linear warm-up, then cosine (to
``min_lr_ratio`` x lr) or poly ((1 - t/T)^0.9), T = epochs x steps-per-epoch. Parameters named ``encoder.*``
may get their own learning rate (``--lr-encoder``). Mixed precision: fp16 autocast + GradScaler on CUDA by
default, bf16 as an option (CUDA or CPU), float32 on CPU by default; the loss is always float32.
``--channels-last`` keeps the 3D network in channels-last 3D memory. On a CPU with native bfloat16,
``--amp bf16 --channels-last`` is about 2x faster than float32 (paper_notes/performance.md).

Exact resume: patches are a pure function of (seed, epoch, index), the batch order of an epoch a pure
function of (seed, epoch), and a checkpoint holds model, optimiser, scaler, scheduler, RNG states and the
position inside the epoch; so a run stopped at any step and resumed with ``--resume`` ends with the same
weights as one never stopped.
"""
from __future__ import annotations

import csv
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler

from ahnet.atomic import atomic_path
from ahnet.checkpoint import (CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state,
                              save_checkpoint)
from ahnet.config import TrainConfig, build_parser, load_config, save_run_config
from ahnet.losses import build_loss
from ahnet.precision import AmpSettings, to_channels_last
from ahnet.precision import resolve_amp as _resolve_amp

__all__ = [
    "TrainError", "TrainingDiverged", "EpochSampler", "AmpSettings", "resolve_device", "resolve_amp",
    "lr_factor", "make_optimizer", "make_scheduler", "model_kwargs_for", "build_network", "split_batch_2d",
    "make_datasets", "resolve_init_checkpoint", "validate", "train", "train_all_folds", "main", "LOG_COLUMNS",
]

LOG_COLUMNS = ("epoch", "step", "loss", "lr", "lr_encoder", "skipped_steps", "skipped_total", "samples_per_s",
               "val_dice", "seconds")


class TrainError(RuntimeError):
    """A training run that cannot start or continue; the message says what to change."""


class TrainingDiverged(TrainError):
    """Too many non-finite losses in a row."""


# ------------------------------------------------------------------------------------------ data order
def _mix(*vals: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64 steps), independent of PYTHONHASHSEED."""
    x = 0x9E3779B97F4A7C15
    for v in vals:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler[int]):
    """``num_samples`` indices into a dataset of ``n`` items, in an order that is a pure function of
    (seed, epoch): concatenated seeded permutations of 0..n-1, cut to ``num_samples``.

    ``set_epoch(epoch, start)`` picks the epoch and skips the first ``start`` samples (a resumed epoch).
    """

    def __init__(self, n: int, num_samples: int | None = None, seed: int = 0, shuffle: bool = True):
        if n < 1:
            raise ValueError(f"EpochSampler needs a non-empty dataset, got n = {n}.")
        self.n, self.seed, self.shuffle = int(n), int(seed), shuffle
        self.num_samples = int(n if num_samples is None else num_samples)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def order(self) -> list[int]:
        out: list[int] = []
        r = 0
        while len(out) < self.num_samples:
            if self.shuffle:
                g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, r, 1))
                out.extend(torch.randperm(self.n, generator=g).tolist())
            else:
                out.extend(range(self.n))
            r += 1
        return out[: self.num_samples]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


# ------------------------------------------------------------------------------------- device and AMP
def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; a CUDA device without CUDA raises TrainError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device {name!r} is not a torch device (try cpu, cuda, cuda:0).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name} asked for CUDA but this torch ({torch.__version__}) sees no GPU; "
                         f"use --device cpu.")
    return dev


def resolve_amp(amp: str, device: torch.device) -> AmpSettings:
    """ahnet.precision.resolve_amp, its errors as TrainError."""
    try:
        return _resolve_amp(amp, device)
    except ValueError as e:
        raise TrainError(str(e)) from None


# ---------------------------------------------------------------------------------- optimiser, schedule
def lr_factor(t: int, total: int, schedule: str = "cosine", warmup: int = 0, min_ratio: float = 0.01,
              power: float = 0.9) -> float:
    """Multiplier of the base learning rate at optimiser step t (0-based) of ``total``."""
    if warmup > 0 and t < warmup:
        return 0.01 + 0.99 * t / warmup
    if schedule == "constant":
        return 1.0
    u = min(max((t - warmup) / max(1, total - warmup), 0.0), 1.0)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * u))
    if schedule == "poly":
        return (1.0 - u) ** power
    raise ValueError(f"schedule must be cosine, poly or constant, got {schedule!r}.")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with two parameter groups: ``encoder.*`` at lr_encoder (default lr) and the rest at lr."""
    enc, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (enc if name.startswith("encoder.") else rest).append(p)
    lr_enc = cfg.lr if cfg.lr_encoder is None else cfg.lr_encoder
    groups = []
    if enc:
        groups.append({"params": enc, "lr": lr_enc, "name": "encoder"})
    if rest:
        groups.append({"params": rest, "lr": cfg.lr, "name": "decoder"})
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    total = cfg.epochs * cfg.steps_per_epoch

    def factor(t: int) -> float:   # a closure, so the scheduler's state dict stays plain values
        return lr_factor(t, total, cfg.schedule, cfg.warmup_steps, cfg.min_lr_ratio, cfg.poly_power)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# -------------------------------------------------------------------------------------------- models
def model_kwargs_for(cfg: TrainConfig) -> dict:
    """Keyword arguments of build_model(cfg.model, ...) for this configuration (plain values)."""
    if cfg.model == "mcgcn":
        kw = {"encoder": cfg.encoder, "in_slices": cfg.patch_size[0], "out_channels": 1}
    elif cfg.model == "ahnet":
        kw = {"encoder": cfg.encoder, "in_channels": 1, "out_channels": 1, "pfn_depth": cfg.pfn_depth}
    else:
        kw = {"in_channels": 1, "out_channels": 1}
    kw.update(cfg.model_kwargs)
    return kw


def _default_builder() -> Callable[..., nn.Module]:
    try:
        from ahnet.nets import build_model
    except ImportError as e:
        raise TrainError(f"the networks (ahnet.nets.build_model) are not available in this checkout ({e}).") \
            from None
    return build_model


def resolve_init_checkpoint(init_from: str) -> Path:
    """A 2D run folder -> <folder>/checkpoints/best.pt (else last.pt); a file -> itself."""
    p = Path(init_from)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / "checkpoints" / name).is_file():
                return p / "checkpoints" / name
        raise TrainError(f"--init-from {p} is a folder without checkpoints/best.pt or last.pt (expected a 2D run "
                         f"folder written by python -m ahnet.train --stage 2d).")
    if not p.is_file():
        raise TrainError(f"--init-from {p} does not exist (expected a 2D run folder or its .pt checkpoint).")
    return p


def build_network(cfg: TrainConfig, builder: Callable[..., nn.Module] | None = None
                  ) -> tuple[nn.Module, dict, dict]:
    """(model, model_kwargs, init_info) for the configuration; seeds the weights with cfg.seed.

    --init transfer calls weights_transfer.transfer.transfer_2d_to_3d(ckpt_2d, **ahnet_kwargs), with the
    encoder taken from the 2D checkpoint. --imagenet-weights calls
    ahnet.nets.resnet.load_torchvision_weights(model.encoder, path).
    """
    torch.manual_seed(_mix(cfg.seed, 7))
    kw = model_kwargs_for(cfg)
    info: dict = {"init": cfg.init}
    if cfg.init == "transfer":
        ck_path = resolve_init_checkpoint(cfg.init_from)
        ck = load_checkpoint(ck_path)
        if ck["model_name"] != "mcgcn":
            raise TrainError(f"--init-from {ck_path} holds a {ck['model_name']!r} model; the transfer needs a 2D "
                             f"stage (mcgcn) checkpoint.")
        enc2d = ck["model_kwargs"].get("encoder")
        if enc2d and enc2d != kw.get("encoder"):
            warnings.warn(f"--encoder {kw.get('encoder')} differs from the 2D run's {enc2d}; using {enc2d}.")
            kw["encoder"] = enc2d
        try:
            from weights_transfer.transfer import transfer_2d_to_3d
        except ImportError as e:
            raise TrainError(f"--init transfer needs weights_transfer.transfer.transfer_2d_to_3d, which this "
                             f"checkout does not have yet ({e}); train with --init scratch meanwhile.") from None
        model = transfer_2d_to_3d(str(ck_path), **kw)
        info.update({"from": str(ck_path), "from_step": int(ck.get("step", -1))})
        return model, _rebuild_kwargs(model, kw), info
    model = (builder or _default_builder())(cfg.model, **kw)
    if cfg.imagenet_weights:
        try:
            from ahnet.nets.resnet import load_torchvision_weights
        except ImportError as e:
            raise TrainError(f"--imagenet-weights needs ahnet.nets.resnet.load_torchvision_weights ({e}).") \
                from None
        if not hasattr(model, "encoder"):
            raise TrainError(f"--imagenet-weights: model {cfg.model} has no .encoder to load into.")
        load_torchvision_weights(model.encoder, cfg.imagenet_weights)
        info["imagenet_weights"] = str(cfg.imagenet_weights)
    return model, _rebuild_kwargs(model, kw), info


def _rebuild_kwargs(model: nn.Module, kw: dict) -> dict:
    """The model's own ``config`` (every kwarg that rebuilds it, plain values) when it has one, else kw."""
    conf = getattr(model, "config", None)
    return dict(conf) if isinstance(conf, dict) else dict(kw)


def check_patch_size(model: nn.Module, cfg: TrainConfig) -> None:
    """Every spatial size of the network input must divide by model.input_multiple; else TrainError."""
    mult = getattr(model, "input_multiple", None)
    if mult is None:
        return
    sizes = tuple(cfg.patch_size[1:]) if cfg.stage == "2d" else tuple(cfg.patch_size)
    mult = tuple(int(m) for m in mult)
    if len(mult) != len(sizes):
        return
    if all(s % m == 0 for s, m in zip(sizes, mult)):
        return
    good = tuple(-(-s // m) * m for s, m in zip(sizes, mult))
    lead = (cfg.patch_size[0],) if cfg.stage == "2d" else ()
    raise TrainError(f"--patch-size {' '.join(map(str, cfg.patch_size))} does not fit {cfg.model}: the network "
                     f"input {sizes} must divide by {mult}; try --patch-size {' '.join(map(str, lead + good))}.")


# ---------------------------------------------------------------------------------------------- data
def split_batch_2d(image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2D stage: image (N, 1, S, H, W) -> (N, S, H, W) slices as channels; label -> middle slice (N, 1, H, W)."""
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"2D stage expects patches (N, 1, S, H, W), got image {tuple(image.shape)}.")
    mid = image.shape[2] // 2
    return image[:, 0], label[:, :, mid]


def _cache_paths_by_case(paths: Sequence[Path]) -> dict[str, Path]:
    out = {}
    for p in paths:
        cid = None
        try:
            import h5py
            with h5py.File(p, "r") as f:
                cid = f.attrs.get("case_id")
                if isinstance(cid, bytes):
                    cid = cid.decode()
        except Exception:  # noqa: BLE001 - fall back to the file name
            cid = None
        out[str(cid) if cid else Path(p).stem] = Path(p)
    return out


def split_cases(cfg: TrainConfig, cases: list[dict]) -> tuple[list[str], list[str]]:
    """(train case ids, validation case ids): the dataset.json split, or fold cfg.fold of cfg.folds."""
    from ahnet.folds import groups_from_annotations, make_folds
    if cfg.folds >= 2:
        pool = [c["case_id"] for c in cases if c.get("split", "train") != "test"]
        shared = groups_from_annotations(Path(cfg.data).parent / "annotations.csv")
        folds = make_folds(pool, cfg.folds, seed=cfg.seed, shared=shared)
        return folds[cfg.fold or 0]
    train = [c["case_id"] for c in cases if c.get("split", "train") == "train"]
    val = [c["case_id"] for c in cases if c.get("split") == "validation"]
    return train, val


def make_augment(cfg: TrainConfig):
    """The training augmentation callable (image, label, rng) -> (image, label), or None."""
    if cfg.augment == "none":
        return None
    from ahnet.data.augment import Augment
    if cfg.augment == "randaugment":
        n, m = cfg.randaugment
        return Augment(randaugment=(int(n), float(m)))
    return Augment()


def make_datasets(cfg: TrainConfig):
    """(train PatchDataset, validation PatchDataset or None) from dataset.json via the HDF5 cache."""
    try:
        from ahnet.data.cache import build_cache
        from ahnet.data.io import load_dataset_json
        from ahnet.data.sampling import PatchDataset
    except ImportError as e:
        raise TrainError(f"the data pipeline (ahnet.data.io / cache / sampling) is not available in this "
                         f"checkout ({e}).") from None
    if not Path(cfg.data).is_file():
        raise TrainError(f"--data {cfg.data} does not exist (expected a dataset.json; make one with "
                         f"python -m ahnet.data.phantom --out data/phantom).")
    cases = load_dataset_json(cfg.data)
    train_ids, val_ids = split_cases(cfg, cases)
    by_case = _cache_paths_by_case(build_cache(cfg.data, cfg.cache_dir, progress=not _quiet()))
    missing = [c for c in train_ids + val_ids if c not in by_case]
    if missing:
        raise TrainError(f"the cache {cfg.cache_dir} lacks cases {missing[:5]} listed in {cfg.data}.")
    if not train_ids:
        raise TrainError(f"{cfg.data} has no training cases (split 'train').")
    train_ds = PatchDataset([by_case[c] for c in train_ids], patch_size=tuple(cfg.patch_size),
                            samples_per_epoch=cfg.steps_per_epoch * cfg.batch_size,
                            pos_fraction=cfg.pos_fraction, augment=make_augment(cfg), seed=cfg.seed)
    val_ds = None
    if val_ids and cfg.val_patches > 0:
        val_ds = PatchDataset([by_case[c] for c in val_ids], patch_size=tuple(cfg.patch_size),
                              samples_per_epoch=cfg.val_patches, pos_fraction=0.5, augment=None,
                              seed=_mix(cfg.seed, 99) % (2 ** 31))
    return train_ds, val_ds


# ---------------------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(model: nn.Module, loader, cfg: TrainConfig, device: torch.device, amp: AmpSettings) -> float | None:
    """Global Dice over all validation patches (sigmoid > 0.5); 1.0 when prediction and label are empty."""
    if loader is None:
        return None
    was_training = model.training
    model.eval()
    inter = psum = tsum = 0.0
    for batch in loader:
        x, y = batch["image"].to(device), batch["label"].to(device)
        if cfg.stage == "2d":
            x, y = split_batch_2d(x, y)
        elif cfg.channels_last:
            x = to_channels_last(x)
        with amp.autocast(device):
            logits = model(x)
        pred = (logits.float() > 0).float()
        t = (y > 0.5).float()
        inter += float((pred * t).sum())
        psum += float(pred.sum())
        tsum += float(t.sum())
    model.train(was_training)
    return 1.0 if psum + tsum == 0 else 2.0 * inter / (psum + tsum)


# --------------------------------------------------------------------------------------------- output
def _quiet() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") or not sys.stderr.isatty()


def write_log(history: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in LOG_COLUMNS})


def plot_progress(history: list[dict], path: Path, title: str = "") -> None:
    """progress.png: training loss, validation Dice and learning rate per epoch."""
    if not history:
        return
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    ep = [r["epoch"] for r in history]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    ax[0].plot(ep, [r["loss"] if r["loss"] is not None else np.nan for r in history], "o-")
    ax[0].set(xlabel="epoch", ylabel="training loss", yscale="log" if all(
        (r["loss"] or 0) > 0 for r in history) else "linear")
    vd = [r["val_dice"] if r["val_dice"] is not None else np.nan for r in history]
    ax[1].plot(ep, vd, "o-", color="C2")
    ax[1].set(xlabel="epoch", ylabel="validation Dice", ylim=(0, 1))
    ax[2].plot(ep, [r["lr"] for r in history], "o-", color="C1", label="lr")
    if any(r.get("lr_encoder") not in (None, r["lr"]) for r in history):
        ax[2].plot(ep, [r["lr_encoder"] for r in history], "s--", color="C3", label="lr encoder")
        ax[2].legend()
    ax[2].set(xlabel="epoch", ylabel="learning rate (end of epoch)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def _group_lrs(opt: torch.optim.Optimizer) -> tuple[float, float | None]:
    lrs = {g.get("name", "decoder"): g["lr"] for g in opt.param_groups}
    main = lrs.get("decoder", next(iter(lrs.values())))
    return float(main), (float(lrs["encoder"]) if "encoder" in lrs else None)


# ----------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig, datasets=None, builder: Callable[..., nn.Module] | None = None,
          on_step: Callable[[int], None] | None = None) -> dict:
    """Run (or resume) one training stage; returns a summary dict (run folder, best Dice, steps, ...).

    ``datasets``: optional (train_ds, val_ds) in place of make_datasets(cfg) (each ds[i] a dict with
    "image" / "label" (1, D, H, W) tensors, and ``set_epoch``). ``builder``: optional stand-in for
    ahnet.nets.build_model. ``on_step(global_step)`` is called after each step (tests use it to interrupt).
    """
    cfg = cfg.resolved()
    run = Path(cfg.out)
    ck_dir = run / "checkpoints"
    last_path, best_path = ck_dir / "last.pt", ck_dir / "best.pt"
    resume_ck = None
    if last_path.exists():
        if not cfg.resume:
            raise TrainError(f"{run} already holds a run (checkpoints/last.pt); pass --resume to continue it or "
                             f"choose another --out.")
        resume_ck = load_checkpoint(last_path)
        saved = resume_ck.get("config") or {}
        for key in ("seed", "batch_size", "steps_per_epoch", "patch_size", "stage", "model"):
            if key in saved and saved[key] != getattr(cfg, key):
                raise TrainError(f"--resume: {key} was {saved[key]!r} in {last_path} but is now "
                                 f"{getattr(cfg, key)!r}; an exact resume needs the same value.")
    elif cfg.resume:
        print(f"[train] --resume: no {last_path} yet, starting a new run.")

    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    train_ds, val_ds = datasets if datasets is not None else make_datasets(cfg)

    if resume_ck is not None:
        builder_fn = builder or _default_builder()
        torch.manual_seed(_mix(cfg.seed, 7))
        model = builder_fn(resume_ck["model_name"], **resume_ck["model_kwargs"])
        model_kw, init_info = dict(resume_ck["model_kwargs"]), dict(resume_ck.get("init") or {})
        try:
            model.load_state_dict(resume_ck["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{last_path} does not match {resume_ck['model_name']} built from its "
                                  f"model_kwargs ({str(e).splitlines()[0]}).") from None
    else:
        model, model_kw, init_info = build_network(cfg, builder)
    check_patch_size(model, cfg)
    model.to(device)
    if cfg.channels_last:
        if cfg.stage != "3d":
            raise TrainError("--channels-last is a lever of the 3D stage (channels-last 3D memory); drop it for "
                             "--stage 2d.")
        to_channels_last(model)
    model.train()

    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp.scaler)
    loss_kw = {"focal": {"alpha": cfg.focal_alpha, "gamma": cfg.focal_gamma},
               "dice": {"smooth_nr": cfg.dice_smooth, "smooth_dr": cfg.dice_smooth},
               "ce": {},
               "dice_focal": {"alpha": cfg.focal_alpha, "gamma": cfg.focal_gamma, "smooth_nr": cfg.dice_smooth,
                              "smooth_dr": cfg.dice_smooth}}[cfg.loss]
    loss_fn = build_loss(cfg.loss, **loss_kw)

    spe = cfg.steps_per_epoch
    total_steps = cfg.epochs * spe if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * spe)
    state = {"epoch_loss_sum": 0.0, "epoch_loss_n": 0, "skipped_epoch": 0, "skipped_total": 0, "bad_run": 0,
             "best_score": None, "best_epoch": None, "history": [], "epoch_seconds": 0.0}
    epoch, step = 0, 0
    if resume_ck is not None:
        opt.load_state_dict(resume_ck["optimizer"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched.load_state_dict(resume_ck["scheduler"])
        if resume_ck.get("scaler"):
            scaler.load_state_dict(resume_ck["scaler"])
        state.update(resume_ck["metrics"])
        epoch, step = int(resume_ck["epoch"]), int(resume_ck["step"])
        restore_rng_state(resume_ck["rng"])
        print(f"[train] resuming {run} at epoch {epoch}, step {step}.")
    else:
        torch.manual_seed(_mix(cfg.seed, 11))
    run.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, run)

    sampler = EpochSampler(len(train_ds), num_samples=spe * cfg.batch_size, seed=cfg.seed)
    val_loader = None
    if val_ds is not None:
        if hasattr(val_ds, "set_epoch"):
            val_ds.set_epoch(0)
        val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)

    def checkpoint(path: Path, metrics: dict) -> None:
        save_checkpoint({
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "model_name": cfg.model if resume_ck is None else resume_ck["model_name"],
            "model_kwargs": model_kw, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "scheduler": sched.state_dict(), "epoch": epoch, "step": step, "rng": capture_rng_state(),
            "config": cfg.to_dict(), "metrics": metrics, "init": init_info, "stage": cfg.stage,
            "amp": amp.name, "format": 1}, path)

    from tqdm.auto import tqdm
    quiet = _quiet()
    stop_reason = None
    bar = None
    while epoch < cfg.epochs and step < total_steps:
        start = step - epoch * spe
        sampler.set_epoch(epoch, start * cfg.batch_size)
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                            drop_last=True, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(_mix(cfg.seed, epoch, 3)))
        if start == 0:
            state.update(epoch_loss_sum=0.0, epoch_loss_n=0, skipped_epoch=0, epoch_seconds=0.0)
        bar = tqdm(total=spe, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=quiet, leave=False)
        t0 = time.perf_counter()
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            if cfg.stage == "2d":
                x, y = split_batch_2d(x, y)
            elif cfg.channels_last:
                x = to_channels_last(x)
            opt.zero_grad(set_to_none=True)
            with amp.autocast(device):
                logits = model(x)
            loss = loss_fn(logits, y)
            if torch.isfinite(loss):
                scaler.scale(loss).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                state["epoch_loss_sum"] += float(loss.detach())
                state["epoch_loss_n"] += 1
                state["bad_run"] = 0
            else:
                state["skipped_epoch"] += 1
                state["skipped_total"] += 1
                state["bad_run"] += 1
                if state["bad_run"] >= cfg.max_bad_steps:
                    bar.close()
                    raise TrainingDiverged(
                        f"{state['bad_run']} non-finite losses in a row at step {step + 1} (amp {amp.name}, lr "
                        f"{_group_lrs(opt)[0]:.3g}); the run stops. Try a lower --lr (and --lr-encoder), "
                        f"--warmup-steps, --grad-clip 1.0, or --amp bf16 / --amp off; resume from "
                        f"{last_path} with --resume.")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # "scheduler.step() before optimizer.step()" on skipped steps
                sched.step()
            step += 1
            if bar is not None:
                bar.update(1)
                if not quiet:
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}", skipped=state["skipped_total"])
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step - epoch * spe < spe:
                state["epoch_seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                checkpoint(last_path, dict(state))
            if on_step is not None:
                on_step(step)
            if step >= total_steps and step - epoch * spe < spe:
                state["epoch_seconds"] += time.perf_counter() - t0
                checkpoint(last_path, dict(state))
                stop_reason = f"stopped at --max-steps {cfg.max_steps} (resume with --resume --max-steps none)"
                break
        bar.close()
        if stop_reason:
            break
        # ---- end of epoch: validate, log, checkpoint
        state["epoch_seconds"] += time.perf_counter() - t0
        val_dice = validate(model, val_loader, cfg, device, amp)
        mean_loss = state["epoch_loss_sum"] / state["epoch_loss_n"] if state["epoch_loss_n"] else None
        lr_main, lr_enc = _group_lrs(opt)
        row = {"epoch": epoch + 1, "step": step, "loss": mean_loss, "lr": lr_main, "lr_encoder": lr_enc,
               "skipped_steps": state["skipped_epoch"], "skipped_total": state["skipped_total"],
               "samples_per_s": round(spe * cfg.batch_size / max(state["epoch_seconds"], 1e-9), 3),
               "val_dice": val_dice, "seconds": round(state["epoch_seconds"], 3)}
        state["history"] = list(state["history"]) + [row]
        score = val_dice if val_dice is not None else (-mean_loss if mean_loss is not None else None)
        improved = score is not None and (state["best_score"] is None or score > state["best_score"])
        if improved:
            state["best_score"], state["best_epoch"] = score, epoch + 1
        epoch += 1
        state.update(epoch_loss_sum=0.0, epoch_loss_n=0, skipped_epoch=0, epoch_seconds=0.0)
        checkpoint(last_path, dict(state))
        if improved:
            checkpoint(best_path, dict(state))
        write_log(state["history"], run / "log.csv")
        plot_progress(state["history"], run / "progress.png", title=f"{run.name}: {cfg.model} ({cfg.stage})")
        vd = "n/a" if val_dice is None else f"{val_dice:.4f}"
        ml = "n/a" if mean_loss is None else f"{mean_loss:.4f}"
        print(f"[train] epoch {epoch}/{cfg.epochs} step {step} loss {ml} val_dice {vd} "
              f"skipped {row['skipped_steps']} {row['samples_per_s']:.1f} samples/s", flush=True)
    return {"run": str(run), "epoch": epoch, "step": step, "best_epoch": state["best_epoch"],
            "best_score": state["best_score"], "skipped_total": state["skipped_total"],
            "history": state["history"], "stopped": stop_reason, "last": str(last_path),
            "best": str(best_path) if best_path.exists() else None}


def train_all_folds(cfg: TrainConfig, **kw) -> list[dict]:
    """Train folds 0 .. K-1 one after another into <out>-fold<F>."""
    if cfg.folds < 2:
        raise TrainError("--all-folds needs --folds K with K >= 2.")
    out = []
    for f in range(cfg.folds):
        c = TrainConfig.from_dict({**cfg.to_dict(), "fold": f, "all_folds": False, "out": f"{cfg.out}-fold{f}"})
        print(f"[train] fold {f + 1}/{cfg.folds} -> {c.out}")
        out.append(train(c, **kw))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        cfg, _ = load_config(argv, parser)
        if cfg.all_folds:
            train_all_folds(cfg)
        else:
            res = train(cfg)
            print(f"[train] done: {res['run']} (best epoch {res['best_epoch']}, "
                  f"checkpoints in {Path(res['run']) / 'checkpoints'})" + (f"; {res['stopped']}" if res['stopped'] else ""))
    except (TrainError, ValueError) as e:   # CheckpointError is a ValueError
        print(f"ahnet.train: error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, TrainingDiverged) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
