"""The training loop: ``train(cfg)`` in named steps, and ``train_all_folds``.

A run's state between steps is a ``Session``: the configuration, the device and precision, the model and its
optimiser, scheduler, scaler and loss, the position (epoch, step) and the counters (``Progress``) that every
checkpoint carries, so that ``--resume`` continues exactly where the run stopped.

Under torchrun the session also holds its rank's place (``dist``, ahnet.train.dist) and the module a step calls
(``net``: DistributedDataParallel around ``model``): every rank runs these same steps on its shard of each
batch, rank 0 alone validates (the score is broadcast) and writes.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ahnet import paths
from ahnet.failures import quiet
from ahnet.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from ahnet.train.config import TrainConfig, patience_spent, save_run_config, step_cap
from ahnet.precision import AmpSettings, configure_kernels, guard_training, resolve_amp, resolve_device

from ahnet.train import dist

from ahnet.train.batches import make_datasets, median_spacing, prepare_batch
from ahnet.train.errors import TrainError, TrainingDiverged
from ahnet.train.guard import check_finite, check_resume, preflight, run_lock
from ahnet.train.model import Builder, build_network, place_model, restore_network
from ahnet.train.optim import WeightAverage, group_lrs, make_optimisation
from ahnet.train.order import EpochSampler, mix_seed
from ahnet.train.outputs import plot_progress, write_log

class Validator(Protocol):
    """Scores a model on the validation cases (higher is better), in eval mode, restoring its mode after.
    ``name`` is the log column ("val_cpm"). The command line builds one (ahnet.evaluate.validation), since
    scoring whole cases by detection needs the inference and evaluation stages, which training must not import."""
    name: str

    def __call__(self, model: nn.Module) -> float | None: ...




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
    dist: dist.DistContext = field(default_factory=dist.DistContext)
    net: nn.Module | None = None          # what a step calls: DDP around model under torchrun, else model
    ema: WeightAverage | None = None      # --ema-decay: the weight average, validated and saved as the model
    data_spacing: tuple | None = None     # (sz, sy, sx) mm, the training scans' median: inference resamples to it

    @property
    def trainer(self) -> nn.Module:
        return self.model if self.net is None else self.net

    @property
    def scored(self) -> nn.Module:
        """The network a run validates and saves as its "model": the weight average when there is one."""
        return self.model if self.ema is None else self.ema.module

    @property
    def total_steps(self) -> int:
        return step_cap(self.cfg.epochs, self.cfg.steps_per_epoch, self.cfg.max_steps)

    def save(self, path) -> None:
        """A checkpoint of the whole session (tensors and plain values only) at ``path``, atomically; never one
        with non-finite weights (TrainingDiverged). Under torchrun every rank calls it (their RNG states are
        gathered) and rank 0 writes."""
        check_finite(self.model, self.step, self.run)
        rng = self.dist.gather(capture_rng_state())
        if not self.dist.is_main:
            return
        ck = {
            "model": _cpu_state(self.scored),
            "model_name": self.model_name, "model_kwargs": self.model_kwargs, "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(), "scheduler": self.sched.state_dict(), "epoch": self.epoch,
            "step": self.step, "rng": rng[0], "config": self.cfg.to_dict(),
            "metrics": dataclasses.asdict(self.progress), "init": self.init_info, "stage": self.cfg.stage,
            "amp": self.amp.name, "format": 1}
        if self.data_spacing is not None:            # what ahnet.infer.spacing resamples a scan to
            ck["data_spacing"] = [float(v) for v in self.data_spacing]
        if self.ema is not None:                     # the trained weights, which --resume continues from
            ck["train_model"] = _cpu_state(self.model)
        if self.dist.enabled:
            ck.update(world_size=self.dist.world_size, rng_ranks=rng)
        save_checkpoint(ck, path)


def _cpu_state(module: nn.Module) -> dict:
    """A module's state dict as detached CPU tensors (what a checkpoint stores)."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


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
                  resume_ck: dict | None, builder: Builder | None,
                  ctx: dist.DistContext | None = None) -> Session:
    """Build (or rebuild from the resume checkpoint) the model, place it, wrap it for the ranks of ``ctx``
    (DistributedDataParallel, --sync-bn), and make its optimisation."""
    ctx = ctx or dist.DistContext()
    if resume_ck is not None:
        model, kw, info = restore_network(resume_ck, cfg, run.last, builder)
        name = resume_ck["model_name"]
    else:
        model, kw, info = build_network(cfg, builder)
        name = cfg.model
    place_model(model, cfg, device)
    guard_training(model, amp, device)               # a CPU bf16 kernel bug (precision.DepthGuardedConv3d)
    net = dist.wrap_model(model, ctx, device, cfg.sync_bn)
    opt, sched, scaler, loss_fn = make_optimisation(model, cfg, device, amp)
    dist.global_batch_loss(loss_fn, ctx)
    ema = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None and resume_ck is not None:
        ema.module.load_state_dict(resume_ck["model"])
    return Session(cfg, run, device, amp, model, name, kw, info, opt, sched, scaler, loss_fn, dist=ctx, net=net,
                   ema=ema)


def restore_or_seed(s: Session, resume_ck: dict | None) -> None:
    """A resumed session gets its optimiser, scheduler, scaler, counters, position and RNG states back; a new
    one seeds the global RNG from the run's seed (and its rank under torchrun)."""
    rank = s.dist.rank
    if resume_ck is None:
        torch.manual_seed(mix_seed(s.cfg.seed, 11) if rank == 0 else mix_seed(s.cfg.seed, 11, rank))
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
    state = dist.rank_rng_state(s.dist, resume_ck)
    if state is None:
        torch.manual_seed(mix_seed(s.cfg.seed, 11, s.step, rank))
        print(f"[train] {s.run.last} was written by {resume_ck.get('world_size', 1)} rank(s), this run has "
              f"{s.dist.world_size}: the random streams (dropout) start afresh, so the run continues with the same "
              f"data but is not bitwise the one never stopped.")
    else:
        restore_rng_state(state)
    print(f"[train] resuming {s.run.root} at epoch {s.epoch}, step {s.step}.")


def validation_loader(val_ds, cfg: TrainConfig, ctx: dist.DistContext | None = None) -> DataLoader | None:
    """The fixed validation patches (epoch 0 of the validation dataset), in order; under torchrun on rank 0
    only (None elsewhere), in batches of one rank's share."""
    ctx = ctx or dist.DistContext()
    if val_ds is None or not ctx.is_main:
        return None
    if hasattr(val_ds, "set_epoch"):
        val_ds.set_epoch(0)
    return DataLoader(val_ds, batch_size=cfg.batch_size // ctx.world_size, shuffle=False,
                      num_workers=cfg.num_workers)


def train_step(s: Session, batch: dict) -> torch.Tensor:
    """One optimiser step on a batch; a non-finite loss skips the step (TrainingDiverged after max_bad_steps
    in a row). The scheduler steps either way. Under torchrun a non-finite loss on any rank skips the step on
    every rank, and the loss counted is the global batch's."""
    x, y = prepare_batch(batch, s.cfg, s.device)
    s.opt.zero_grad(set_to_none=True)
    with s.amp.autocast(s.device):
        logits = s.trainer(x)
    loss = s.loss_fn(logits, y)
    p = s.progress
    finite, value = s.dist.agree_on_loss(loss)
    if finite:
        s.scaler.scale(loss).backward()
        finite = step_optimiser(s)
    if finite:
        if s.ema is not None:
            s.ema.update(s.step)
        p.epoch_loss_sum += value
        p.epoch_loss_n += 1
        p.bad_run = 0
    else:
        p.skipped_epoch += 1
        p.skipped_total += 1
        p.bad_run += 1
        if p.bad_run >= s.cfg.max_bad_steps:
            other = " / ".join(f"--amp {a}" for a in ("bf16", "off") if a != s.amp.name)
            raise TrainingDiverged(
                f"{p.bad_run} non-finite losses or gradients in a row at step {s.step + 1} (amp {s.amp.name}, lr "
                f"{group_lrs(s.opt)[0]:.3g}); the run stops. Try a lower --lr (and --lr-encoder), --warmup-steps, "
                f"--grad-clip 1.0, or {other}; resume from {s.run.last} with --resume.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "scheduler.step() before optimizer.step()" on skipped steps
        s.sched.step()
    s.step += 1
    return loss


def step_optimiser(s: Session) -> bool:
    """Clip (--grad-clip) and step after backward; False when the step was not taken because a gradient is
    non-finite. With a GradScaler (fp16) that is the scaler's own business (it skips and lowers the scale);
    without one (bf16, fp32) nothing else would stop one inf gradient from writing inf into Adam's moments and
    every weight after them, so the step is skipped and counted like a non-finite loss. Under torchrun the
    gradients are already averaged over ranks, so every rank decides the same."""
    if s.scaler.is_enabled():
        if s.cfg.grad_clip > 0:
            s.scaler.unscale_(s.opt)
            nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.grad_clip)
        s.scaler.step(s.opt)
        s.scaler.update()
        return True
    limit = s.cfg.grad_clip if s.cfg.grad_clip > 0 else float("inf")
    norm = nn.utils.clip_grad_norm_(s.model.parameters(), limit)
    if not torch.isfinite(norm):
        s.opt.zero_grad(set_to_none=True)
        return False
    s.opt.step()
    return True


def run_epoch(s: Session, train_ds, sampler: EpochSampler, on_step: Callable[[int], None] | None) -> str | None:
    """The steps of epoch s.epoch from where it stands (a resumed epoch skips its done samples); a checkpoint
    every --ckpt-every steps. Returns the stop reason when --max-steps ends the run inside the epoch."""
    cfg, spe = s.cfg, s.cfg.steps_per_epoch
    start = s.step - s.epoch * spe
    sampler.set_epoch(s.epoch, start * cfg.batch_size)
    if hasattr(train_ds, "set_epoch"):
        train_ds.set_epoch(s.epoch)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size // s.dist.world_size, sampler=sampler,
                        num_workers=cfg.num_workers,
                        drop_last=True, pin_memory=s.device.type == "cuda",
                        generator=torch.Generator().manual_seed(mix_seed(cfg.seed, s.epoch, 3)))
    if start == 0:
        s.progress.new_epoch()
    from tqdm.auto import tqdm
    bar = tqdm(total=spe, initial=start, desc=f"epoch {s.epoch + 1}/{cfg.epochs}", disable=quiet(), leave=False)
    t0 = time.perf_counter()
    try:
        for batch in loader:
            s.dist.progress(f"step {s.step + 1}")
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
    """Global Dice over all validation patches (sigmoid > 0.5); None when the patches hold no foreground at all
    (Dice is undefined there: an empty prediction of an empty label says nothing about a detector)."""
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
    return None if tsum == 0 else 2.0 * inter / (psum + tsum)


def end_epoch(s: Session, val_loader, validator: Validator | None = None) -> None:
    """Validate (the validator's score, else patch Dice), add the epoch's log row, keep the best score, write
    best.pt (when improved), log.csv and progress.png, then last.pt (a kill before last.pt leaves it older, so
    --resume redoes this epoch's end and rewrites the others), print one line. An epoch whose every step was
    skipped stops the run (TrainingDiverged). Under torchrun rank 0 validates and its score is broadcast, so
    every rank keeps the same counters and decisions; rank 0 writes."""
    cfg, p = s.cfg, s.progress
    if p.epoch_loss_n == 0 and p.skipped_epoch > 0:
        raise TrainingDiverged(f"every step of epoch {s.epoch + 1} ({p.skipped_epoch}) had a non-finite loss or "
                               f"gradient and was skipped; the run stops without saving it. Check --focal-gamma, "
                               f"--dice-smooth and --lr, or try --amp off.")
    s.dist.progress(f"validating after epoch {s.epoch + 1}")
    t0 = time.perf_counter()
    wait = f"waiting for rank 0's validation after epoch {s.epoch + 1}"
    if validator is not None:
        val_cpm, val_dice = s.dist.from_main(lambda: validator(s.scored), wait), None
    else:
        val_cpm, val_dice = None, s.dist.from_main(lambda: validate(s.scored, val_loader, cfg, s.device, s.amp), wait)
    val_seconds = time.perf_counter() - t0
    mean_loss = p.epoch_loss_sum / p.epoch_loss_n if p.epoch_loss_n else None
    lr_main, lr_enc = group_lrs(s.opt)
    row = {"epoch": s.epoch + 1, "step": s.step, "loss": mean_loss, "lr": lr_main, "lr_encoder": lr_enc,
           "skipped_steps": p.skipped_epoch, "skipped_total": p.skipped_total,
           "samples_per_s": round(cfg.steps_per_epoch * cfg.batch_size / max(p.epoch_seconds, 1e-9), 3),
           "val_dice": val_dice, "val_cpm": val_cpm, "seconds": round(p.epoch_seconds, 3),
           "val_seconds": round(val_seconds, 3)}
    p.history = list(p.history) + [row]
    score = val_cpm if val_cpm is not None else val_dice
    score = score if score is not None else (-mean_loss if mean_loss is not None else None)
    improved = score is not None and (p.best_score is None or score > p.best_score + cfg.min_delta)
    if improved:
        p.best_score, p.best_epoch = score, s.epoch + 1
    s.epoch += 1
    p.new_epoch()
    if improved:
        s.save(s.run.best)                           # every rank calls save (RNG states gathered); rank 0 writes
    if s.dist.is_main:
        write_log(p.history, s.run.log)
        plot_progress(p.history, s.run.progress, title=f"{s.run.root.name}: {s.model_name} ({cfg.stage})")
    s.save(s.run.last)
    if not s.dist.is_main:
        return
    name, val = ("val_cpm", val_cpm) if validator is not None else ("val_dice", val_dice)
    vd = "n/a" if val is None else f"{val:.4f}"
    ml = "n/a" if mean_loss is None else f"{mean_loss:.4f}"
    print(f"[train] epoch {s.epoch}/{cfg.epochs} step {s.step} loss {ml} {name} {vd} "
          f"skipped {row['skipped_steps']} {row['samples_per_s']:.1f} samples/s", flush=True)


def finished(s: Session) -> bool:
    """True when the run has nothing left to train: its epochs, its step cap, or its patience spent."""
    return s.epoch >= s.cfg.epochs or s.step >= s.total_steps or early_stop(s) is not None


def early_stop(s: Session) -> str | None:
    """The stop reason when --patience epochs in a row have not beaten the best score (a pure function of the
    saved counters, so a resumed run decides as the uninterrupted one did), else None."""
    p, k = s.progress, s.cfg.patience
    if not patience_spent(s.epoch, p.best_epoch, k):
        return None
    return (f"early stop at epoch {s.epoch}: no better validation score for {k} epochs (best epoch "
            f"{p.best_epoch}, score {p.best_score:.4f})")


def resolve_validation(cfg: TrainConfig, validator: Validator | None) -> TrainConfig:
    """cfg with ``validation`` resolved to what this run uses ("cpm" with a validator, "dice" without), so
    config.json records what happens; TrainError when cpm is asked for without a validator."""
    if cfg.validation == "cpm" and validator is None:
        raise TrainError("--validation cpm needs a validator of whole validation cases (the command line builds it "
                         "with ahnet.evaluate.validation.make_validator); pass validator_for to train(), or use "
                         "--validation dice.")
    return dataclasses.replace(cfg, validation="cpm" if validator is not None else "dice")


def summary(s: Session, stopped: str | None) -> dict:
    """What train() returns: run folder, position, best epoch and score, history, checkpoint paths."""
    p = s.progress
    return {"run": str(s.run.root), "epoch": s.epoch, "step": s.step, "best_epoch": p.best_epoch,
            "best_score": p.best_score, "skipped_total": p.skipped_total, "history": p.history,
            "stopped": stopped, "last": str(s.run.last), "best": str(s.run.best) if s.run.best.exists() else None}


# ------------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, datasets=None, builder: Builder | None = None,
          on_step: Callable[[int], None] | None = None,
          validator_for: Callable[[TrainConfig], Validator | None] | None = None) -> dict:
    """Run (or resume) one training stage; returns summary() (run folder, best score, steps, ...).

    ``datasets``: optional (train_ds, val_ds) in place of make_datasets(cfg) (each ds[i] a dict with
    "image" / "label" (1, D, H, W) tensors, and ``set_epoch``). ``builder``: optional stand-in for
    ahnet.nets.build_model. ``on_step(global_step)`` is called after each step (tests use it to interrupt).
    ``validator_for(cfg)``: gives the validator that scores the model at each epoch's end, called once the run's
    settings and data are checked (ahnet.evaluate.validation.make_validator gives the CPM of whole validation
    cases); without one (or when it gives None), patch Dice.
    Settings, output places and the network are checked first (guard.preflight); the run folder is locked.
    """
    cfg = cfg.resolved()
    preflight(cfg, builder)                                                    # 0. checks before any work
    with run_lock(cfg.out):
        return _train(cfg, datasets, builder, on_step, validator_for)


def _train(cfg: TrainConfig, datasets, builder: Builder | None, on_step: Callable[[int], None] | None,
           validator_for: Callable[[TrainConfig], Validator | None] | None) -> dict:
    """train() of a checked configuration, with the run folder locked."""
    run = paths.run_paths(cfg.out)
    dist.check_batch(cfg.batch_size)                                           # 1. ranks, device, precision
    ctx, device = dist.plan(cfg.device, resolve_device(cfg.device), cfg.dist_backend, cfg.dist_timeout)
    amp = resolve_amp(cfg.amp, device)
    resume_ck = open_run(cfg, run)                                             # 2. new run or resume
    configure_kernels(device, cfg.deterministic)
    dist.start(ctx, device)
    dist.check_same_start(ctx, resume_ck, run.last)
    train_ds, val_ds = datasets if datasets is not None else ctx.main_first(lambda: make_datasets(cfg))  # 3. data
    validator = validator_for(cfg) if validator_for is not None else None
    cfg = resolve_validation(cfg, validator)
    s = start_session(cfg, run, device, amp, resume_ck, builder, ctx)          # 4. model, optimiser, loss
    s.data_spacing = median_spacing(train_ds)
    restore_or_seed(s, resume_ck)                                              # 5. state of a resumed run
    if ctx.is_main:                                                            # 6. the run folder
        run.root.mkdir(parents=True, exist_ok=True)
        if resume_ck is None or not finished(s):     # a finished run entered again keeps its trainer's record
            save_run_config(cfg, run.root)
    sampler = EpochSampler(len(train_ds), num_samples=cfg.steps_per_epoch * cfg.batch_size, seed=cfg.seed,
                           rank=ctx.rank, world_size=ctx.world_size, batch_size=cfg.batch_size)
    val_loader = validation_loader(val_ds, cfg, ctx) if validator is None else None
    stopped = early_stop(s)
    with ctx.watched(f"starting epoch {s.epoch + 1}"):
        while not stopped and s.epoch < cfg.epochs and s.step < s.total_steps:   # 7. the epochs
            stopped = run_epoch(s, train_ds, sampler, on_step)                 # 8. steps
            if stopped:
                break
            end_epoch(s, val_loader, validator)                                # 9. validate, log, checkpoint
            stopped = early_stop(s)                                            #    (same counters on every rank)
        ctx.barrier("waiting for rank 0 to finish writing the run")           # (a next stage reads it)
    return summary(s, stopped)                                                 # 10. what happened


def train_all_folds(cfg: TrainConfig, validator_for: Callable[[TrainConfig], Validator | None] | None = None,
                    **kw) -> list[dict]:
    """Train folds 0 .. K-1 one after another, fold k into paths.fold_run(cfg.out, k); ``validator_for(fold
    config)`` gives each fold its validator (its own validation cases)."""
    if cfg.folds < 2:
        raise TrainError("--all-folds needs --folds K with K >= 2.")
    out = []
    for f in range(cfg.folds):
        c = TrainConfig.from_dict({**cfg.to_dict(), "fold": f, "all_folds": False,
                                   "out": str(paths.fold_run(cfg.out, f))})
        print(f"[train] fold {f + 1}/{cfg.folds} -> {c.out}")
        out.append(train(c, validator_for=validator_for, **kw))
    return out
