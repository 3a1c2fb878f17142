"""Optimiser (Adam with an encoder group), learning-rate schedule, GradScaler, loss and weight average of a run."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from ahnet.train.config import TrainConfig
from ahnet.train.losses import build_loss, loss_kwargs
from ahnet.precision import AmpSettings


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
    """Per-step LambdaLR of lr_factor over epochs x steps-per-epoch."""
    total = cfg.epochs * cfg.steps_per_epoch

    def factor(t: int) -> float:   # a closure, so the scheduler's state dict stays plain values
        return lr_factor(t, total, cfg.schedule, cfg.warmup_steps, cfg.min_lr_ratio, cfg.poly_power)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def make_optimisation(model: nn.Module, cfg: TrainConfig, device: torch.device, amp: AmpSettings):
    """(optimizer, scheduler, GradScaler, loss) of a run; the loss from ahnet.train.losses by the run's settings."""
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp.scaler)
    loss_fn = build_loss(cfg.loss, **loss_kwargs(cfg.loss, cfg.focal_alpha, cfg.focal_gamma, cfg.dice_smooth,
                                                   cfg.dice_per_patch, cfg.dice_per_nodule))
    return opt, sched, scaler, loss_fn


def group_lrs(opt: torch.optim.Optimizer) -> tuple[float, float | None]:
    """(learning rate of the decoder group, of the encoder group or None) right now."""
    lrs = {g.get("name", "decoder"): g["lr"] for g in opt.param_groups}
    main = lrs.get("decoder", next(iter(lrs.values())))
    return float(main), (float(lrs["encoder"]) if "encoder" in lrs else None)


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (0-based): min(decay, (1 + n) / (10 + n)), so the first updates
    follow the weights closely and an early average is not dominated by the initial ones."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightAverage:
    """An exponential moving average of a model's weights (--ema-decay): ``module`` is a copy of the model whose
    floating-point parameters and buffers (BatchNorm statistics) follow avg <- avg + (1 - decay) (w - avg) after
    each optimiser step; integer buffers are copied. The average is what a run validates and saves as its model."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self._avg = [a for a, _ in pairs if a.is_floating_point()]
        self._cur = [w for a, w in pairs if a.is_floating_point()]
        self._others = [(a, w) for a, w in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self, updates: int) -> None:
        """Fold the model's current weights in, as update number ``updates`` (0-based; the run's step)."""
        if self._avg:
            torch._foreach_lerp_(self._avg, self._cur, 1.0 - ema_decay_at(self.decay, updates))
        for a, w in self._others:
            a.copy_(w)
