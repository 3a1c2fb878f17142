"""The training loop: ``train(cfg)`` in named steps, and ``train_all_folds``.

A run's state between steps is a ``Session``: the configuration, the device and precision, the model and its
optimiser, scheduler, scaler and loss, the position (epoch, step) and the counters (``Progress``) that every
checkpoint carries, so that ``--resume`` continues exactly where the run stopped.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ahnet import paths
from ahnet.cli import quiet
from ahnet.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from ahnet.config import TrainConfig, save_run_config
from ahnet.precision import AmpSettings, resolve_amp, resolve_device

from .data import make_datasets, prepare_batch
from .errors import TrainError, TrainingDiverged
from .guard import check_finite, check_resume, preflight, run_lock
from .model import Builder, build_network, place_model, restore_network
from .optim import group_lrs, make_optimisation
from .order import EpochSampler, mix_seed
from .outputs import plot_progress, write_log


@dataclass
class Progress:
    """The counters of a run, saved as the checkpoint's "metrics" (plain values)."""
    epoch_loss_sum: float = 0.0
    epoch_loss_n: int = 0
    skipped_epoch: int = 0
    skipped_total: int = 0
    bad_run: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    history: list = field(default_factory=list)
    epoch_seconds: float = 0.0

    def new_epoch(self) -> None:
        self.epoch_loss_sum, self.epoch_loss_n, self.skipped_epoch, self.epoch_seconds = 0.0, 0, 0, 0.0


@dataclass
class Session:
    """Everything one training run holds while it runs (see the module docstring)."""
    cfg: TrainConfig
    run: paths.RunPaths
    device: torch.device
    amp: AmpSettings
    model: nn.Module
    model_name: str
    model_kwargs: dict
    init_info: dict
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    progress: Progress = field(default_factory=Progress)
    epoch: int = 0
    step: int = 0

    @property
    def total_steps(self) -> int:
        full = self.cfg.epochs * self.cfg.steps_per_epoch
        return full if self.cfg.max_steps is None else min(self.cfg.max_steps, full)

    def save(self, path) -> None:
        """A checkpoint of the whole session (tensors and plain values only) at ``path``, atomically; never one
        with non-finite weights (TrainingDiverged)."""
        check_finite(self.model, self.step, self.run)
        save_checkpoint({
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "model_name": self.model_name, "model_kwargs": self.model_kwargs, "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(), "scheduler": self.sched.state_dict(), "epoch": self.epoch,
            "step": self.step, "rng": capture_rng_state(), "config": self.cfg.to_dict(),
            "metrics": dataclasses.asdict(self.progress), "init": self.init_info, "stage": self.cfg.stage,
            "amp": self.amp.name, "format": 1}, path)


# ------------------------------------------------------------------------------------------------- steps
def open_run(cfg: TrainConfig, run: paths.RunPaths) -> dict | None:
    """The checkpoint to resume from (None for a new run). An existing run needs --resume, and a resume the same
    settings but those of guard.RESUME_MAY_CHANGE; TrainError otherwise."""
    if not run.last.exists():
        if cfg.resume:
            print(f"[train] --resume: no {run.last} yet, starting a new run.")
        return None
    if not cfg.resume:
        raise TrainError(f"{run.root} already holds a run ({paths.CHECKPOINTS}/{paths.LAST}); pass --resume to "
                         f"continue it or choose another --out.")
    ck = load_checkpoint(run.last)
    check_resume(ck.get("config") or {}, cfg, run.last)
    return ck


def start_session(cfg: TrainConfig, run: paths.RunPaths, device: torch.device, amp: AmpSettings,
                  resume_ck: dict | None, builder: Builder | None) -> Session:
    """Build (or rebuild from the resume checkpoint) the model, place it, and make its optimisation."""
    if resume_ck is not None:
        model, kw, info = restore_network(resume_ck, cfg, run.last, builder)
        name = resume_ck["model_name"]
    else:
        model, kw, info = build_network(cfg, builder)
        name = cfg.model
    place_model(model, cfg, device)
    opt, sched, scaler, loss_fn = make_optimisation(model, cfg, device, amp)
    return Session(cfg, run, device, amp, model, name, kw, info, opt, sched, scaler, loss_fn)


def restore_or_seed(s: Session, resume_ck: dict | None) -> None:
    """A resumed session gets its optimiser, scheduler, scaler, counters, position and RNG states back; a new
    one seeds the global RNG from the run's seed."""
    if resume_ck is None:
        torch.manual_seed(mix_seed(s.cfg.seed, 11))
        return
    s.opt.load_state_dict(resume_ck["optimizer"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.sched.load_state_dict(resume_ck["scheduler"])
    if resume_ck.get("scaler"):
        s.scaler.load_state_dict(resume_ck["scaler"])
    known = {f.name for f in dataclasses.fields(Progress)}
    s.progress = Progress(**{k: v for k, v in resume_ck["metrics"].items() if k in known})
    s.epoch, s.step = int(resume_ck["epoch"]), int(resume_ck["step"])
    restore_rng_state(resume_ck["rng"])
    print(f"[train] resuming {s.run.root} at epoch {s.epoch}, step {s.step}.")


def validation_loader(val_ds, cfg: TrainConfig) -> DataLoader | None:
    """The fixed validation patches (epoch 0 of the validation dataset), in order."""
    if val_ds is None:
        return None
    if hasattr(val_ds, "set_epoch"):
        val_ds.set_epoch(0)
    return DataLoader(val_ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)


def train_step(s: Session, batch: dict) -> torch.Tensor:
    """One optimiser step on a batch; a non-finite loss skips the step (TrainingDiverged after max_bad_steps
    in a row). The scheduler steps either way."""
    x, y = prepare_batch(batch, s.cfg, s.device)
    s.opt.zero_grad(set_to_none=True)
    with s.amp.autocast(s.device):
        logits = s.model(x)
    loss = s.loss_fn(logits, y)
    p = s.progress
    if torch.isfinite(loss):
        s.scaler.scale(loss).backward()
        if s.cfg.grad_clip > 0:
            s.scaler.unscale_(s.opt)
            nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.grad_clip)
        s.scaler.step(s.opt)
        s.scaler.update()
        p.epoch_loss_sum += float(loss.detach())
        p.epoch_loss_n += 1
        p.bad_run = 0
    else:
        p.skipped_epoch += 1
        p.skipped_total += 1
        p.bad_run += 1
        if p.bad_run >= s.cfg.max_bad_steps:
            raise TrainingDiverged(
                f"{p.bad_run} non-finite losses in a row at step {s.step + 1} (amp {s.amp.name}, lr "
                f"{group_lrs(s.opt)[0]:.3g}); the run stops. Try a lower --lr (and --lr-encoder), --warmup-steps, "
                f"--grad-clip 1.0, or --amp bf16 / --amp off; resume from {s.run.last} with --resume.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "scheduler.step() before optimizer.step()" on skipped steps
        s.sched.step()
    s.step += 1
    return loss


def run_epoch(s: Session, train_ds, sampler: EpochSampler, on_step: Callable[[int], None] | None) -> str | None:
    """The steps of epoch s.epoch from where it stands (a resumed epoch skips its done samples); a checkpoint
    every --ckpt-every steps. Returns the stop reason when --max-steps ends the run inside the epoch."""
    cfg, spe = s.cfg, s.cfg.steps_per_epoch
    start = s.step - s.epoch * spe
    sampler.set_epoch(s.epoch, start * cfg.batch_size)
    if hasattr(train_ds, "set_epoch"):
        train_ds.set_epoch(s.epoch)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        drop_last=True, pin_memory=s.device.type == "cuda",
                        generator=torch.Generator().manual_seed(mix_seed(cfg.seed, s.epoch, 3)))
    if start == 0:
        s.progress.new_epoch()
    from tqdm.auto import tqdm
    bar = tqdm(total=spe, initial=start, desc=f"epoch {s.epoch + 1}/{cfg.epochs}", disable=quiet(), leave=False)
    t0 = time.perf_counter()
    try:
        for batch in loader:
            loss = train_step(s, batch)
            bar.update(1)
            if not bar.disable:
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", skipped=s.progress.skipped_total)
            inside = s.step - s.epoch * spe < spe          # the epoch's last step is saved by end_epoch
            if cfg.ckpt_every and s.step % cfg.ckpt_every == 0 and inside:
                s.progress.epoch_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                s.save(s.run.last)
            if on_step is not None:
                on_step(s.step)
            if s.step >= s.total_steps and inside:
                s.progress.epoch_seconds += time.perf_counter() - t0
                s.save(s.run.last)
                return f"stopped at --max-steps {cfg.max_steps} (resume with --resume --max-steps none)"
    finally:
        bar.close()
    s.progress.epoch_seconds += time.perf_counter() - t0
    return None


@torch.no_grad()
def validate(model: nn.Module, loader, cfg: TrainConfig, device: torch.device, amp: AmpSettings) -> float | None:
    """Global Dice over all validation patches (sigmoid > 0.5); 1.0 when prediction and label are empty."""
    if loader is None:
        return None
    was_training = model.training
    model.eval()
    inter = psum = tsum = 0.0
    for batch in loader:
        x, y = prepare_batch(batch, cfg, device)
        with amp.autocast(device):
            logits = model(x)
        pred = (logits.float() > 0).float()
        t = (y > 0.5).float()
        inter += float((pred * t).sum())
        psum += float(pred.sum())
        tsum += float(t.sum())
    model.train(was_training)
    return 1.0 if psum + tsum == 0 else 2.0 * inter / (psum + tsum)


def end_epoch(s: Session, val_loader) -> None:
    """Validate, add the epoch's log row, keep the best score, write best.pt (when improved), log.csv and
    progress.png, then last.pt (a kill before last.pt leaves it older, so --resume redoes this epoch's end and
    rewrites the others), print one line. An epoch whose every step was skipped stops the run (TrainingDiverged)."""
    cfg, p = s.cfg, s.progress
    if p.epoch_loss_n == 0 and p.skipped_epoch > 0:
        raise TrainingDiverged(f"every step of epoch {s.epoch + 1} ({p.skipped_epoch}) had a non-finite loss and was "
                               f"skipped; the run stops without saving it. Check --focal-gamma, --dice-smooth and "
                               f"--lr, or try --amp off.")
    val_dice = validate(s.model, val_loader, cfg, s.device, s.amp)
    mean_loss = p.epoch_loss_sum / p.epoch_loss_n if p.epoch_loss_n else None
    lr_main, lr_enc = group_lrs(s.opt)
    row = {"epoch": s.epoch + 1, "step": s.step, "loss": mean_loss, "lr": lr_main, "lr_encoder": lr_enc,
           "skipped_steps": p.skipped_epoch, "skipped_total": p.skipped_total,
           "samples_per_s": round(cfg.steps_per_epoch * cfg.batch_size / max(p.epoch_seconds, 1e-9), 3),
           "val_dice": val_dice, "seconds": round(p.epoch_seconds, 3)}
    p.history = list(p.history) + [row]
    score = val_dice if val_dice is not None else (-mean_loss if mean_loss is not None else None)
    improved = score is not None and (p.best_score is None or score > p.best_score)
    if improved:
        p.best_score, p.best_epoch = score, s.epoch + 1
    s.epoch += 1
    p.new_epoch()
    if improved:
        s.save(s.run.best)
    write_log(p.history, s.run.log)
    plot_progress(p.history, s.run.progress, title=f"{s.run.root.name}: {s.model_name} ({cfg.stage})")
    s.save(s.run.last)
    vd = "n/a" if val_dice is None else f"{val_dice:.4f}"
    ml = "n/a" if mean_loss is None else f"{mean_loss:.4f}"
    print(f"[train] epoch {s.epoch}/{cfg.epochs} step {s.step} loss {ml} val_dice {vd} "
          f"skipped {row['skipped_steps']} {row['samples_per_s']:.1f} samples/s", flush=True)


def summary(s: Session, stopped: str | None) -> dict:
    """What train() returns: run folder, position, best epoch and score, history, checkpoint paths."""
    p = s.progress
    return {"run": str(s.run.root), "epoch": s.epoch, "step": s.step, "best_epoch": p.best_epoch,
            "best_score": p.best_score, "skipped_total": p.skipped_total, "history": p.history,
            "stopped": stopped, "last": str(s.run.last), "best": str(s.run.best) if s.run.best.exists() else None}


# ------------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, datasets=None, builder: Builder | None = None,
          on_step: Callable[[int], None] | None = None) -> dict:
    """Run (or resume) one training stage; returns summary() (run folder, best Dice, steps, ...).

    ``datasets``: optional (train_ds, val_ds) in place of make_datasets(cfg) (each ds[i] a dict with
    "image" / "label" (1, D, H, W) tensors, and ``set_epoch``). ``builder``: optional stand-in for
    ahnet.nets.build_model. ``on_step(global_step)`` is called after each step (tests use it to interrupt).
    Settings, output places and the network are checked first (guard.preflight); the run folder is locked.
    """
    cfg = cfg.resolved()
    preflight(cfg, builder)                                                    # 0. checks before any work
    with run_lock(cfg.out):
        return _train(cfg, datasets, builder, on_step)


def _train(cfg: TrainConfig, datasets, builder: Builder | None, on_step: Callable[[int], None] | None) -> dict:
    """train() of a checked configuration, with the run folder locked."""
    run = paths.run_paths(cfg.out)
    resume_ck = open_run(cfg, run)                                             # 1. new run or resume
    device = resolve_device(cfg.device)                                        # 2. device and precision
    amp = resolve_amp(cfg.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_ds, val_ds = datasets if datasets is not None else make_datasets(cfg)   # 3. data
    s = start_session(cfg, run, device, amp, resume_ck, builder)               # 4. model, optimiser, loss
    restore_or_seed(s, resume_ck)                                              # 5. state of a resumed run
    run.root.mkdir(parents=True, exist_ok=True)                                # 6. the run folder
    save_run_config(cfg, run.root)
    sampler = EpochSampler(len(train_ds), num_samples=cfg.steps_per_epoch * cfg.batch_size, seed=cfg.seed)
    val_loader = validation_loader(val_ds, cfg)
    stopped = None
    while s.epoch < cfg.epochs and s.step < s.total_steps:                    # 7. the epochs
        stopped = run_epoch(s, train_ds, sampler, on_step)                     # 8. steps
        if stopped:
            break
        end_epoch(s, val_loader)                                               # 9. validate, log, checkpoint
    return summary(s, stopped)                                                 # 10. what happened


def train_all_folds(cfg: TrainConfig, **kw) -> list[dict]:
    """Train folds 0 .. K-1 one after another, fold k into paths.fold_run(cfg.out, k)."""
    if cfg.folds < 2:
        raise TrainError("--all-folds needs --folds K with K >= 2.")
    out = []
    for f in range(cfg.folds):
        c = TrainConfig.from_dict({**cfg.to_dict(), "fold": f, "all_folds": False,
                                   "out": str(paths.fold_run(cfg.out, f))})
        print(f"[train] fold {f + 1}/{cfg.folds} -> {c.out}")
        out.append(train(c, **kw))
    return out
