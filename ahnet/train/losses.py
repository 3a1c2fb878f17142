"""Segmentation losses on logits: cross-entropy, alpha-balanced focal loss, soft Dice, Dice + focal.

Shapes: ``logits`` (N, C, *spatial) straight from a network (no sigmoid). With C == 1 the task is binary
(sigmoid); with C > 1 it is multi-class (softmax over the channel axis). ``target`` is
- binary: float (N, 1, *spatial) or (N, *spatial) with values in [0, 1] (soft labels allowed);
- multi-class: integer class indices (N, *spatial) or (N, 1, *spatial), or a one-hot / soft float tensor of
  the logits' shape.

Every loss is computed in float32 even inside an fp16 / bf16 ``torch.autocast`` region: the inputs are cast
up and autocast is switched off for the loss arithmetic, so an fp16 forward pass cannot overflow the loss.
Log-probabilities come from ``logsigmoid`` / ``log_softmax``, so logits of +-50 (or +-1e4) stay finite.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "CrossEntropyLoss", "FocalLoss", "DiceLoss", "DiceFocalLoss", "build_loss", "loss_kwargs", "LOSSES",
    "LOSS_ALIASES",
]

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
    return reduction


def _prepare(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (logits float32 (N, C, *S), target float32 of the same shape: probabilities per channel).

    Binary (C == 1): target (N, 1, *S) or (N, *S). Multi-class: indices (N, *S) / (N, 1, *S) -> one-hot, or a
    float tensor of the logits' shape taken as is.
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must be (N, C, *spatial), got shape {tuple(logits.shape)}.")
    n, c, spatial = logits.shape[0], logits.shape[1], tuple(logits.shape[2:])
    logits = logits.float()
    if c == 1:
        if tuple(target.shape) == (n, *spatial):
            target = target.unsqueeze(1)
        if tuple(target.shape) != tuple(logits.shape):
            raise ValueError(
                f"binary target must have shape {tuple(logits.shape)} or {(n, *spatial)} like the logits, "
                f"got {tuple(target.shape)}.")
        return logits, target.float()
    if tuple(target.shape) == tuple(logits.shape) and target.is_floating_point():
        return logits, target.float()
    if tuple(target.shape) == (n, 1, *spatial):
        target = target[:, 0]
    if tuple(target.shape) != (n, *spatial):
        raise ValueError(
            f"multi-class target must be class indices of shape {(n, *spatial)} (or {(n, 1, *spatial)}) or "
            f"one-hot of shape {tuple(logits.shape)}, got {tuple(target.shape)}.")
    idx = target.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= c):
        raise ValueError(f"class indices in target must lie in [0, {c - 1}], got range "
                         f"[{int(idx.min())}, {int(idx.max())}].")
    onehot = F.one_hot(idx, c).movedim(-1, 1).float()
    return logits, onehot


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _log_probs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p, log(1 - p)) for sigmoid (C == 1); (log softmax, None) for C > 1. float32 in, float32 out."""
    if logits.shape[1] == 1:
        return F.logsigmoid(logits), F.logsigmoid(-logits)
    return F.log_softmax(logits, dim=1), None


class CrossEntropyLoss(nn.Module):
    """Binary cross-entropy with logits (C == 1) or softmax cross-entropy (C > 1), in float32.

    Binary: l = -[pos_weight * t * log p + (1 - t) * log(1 - p)], mean over all N * C * |S| elements.
    Multi-class: l = -sum_c w_c t_c log p_c, mean over N * |S| positions. ``weight``: optional per-class
    weights (length C, multi-class only).
    """

    def __init__(self, pos_weight: float | None = None, weight: Sequence[float] | None = None,
                 reduction: str = "mean"):
        super().__init__()
        self.pos_weight = None if pos_weight is None else float(pos_weight)
        self.weight = None if weight is None else [float(w) for w in weight]
        self.reduction = _check_reduction(reduction)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x, t = _prepare(logits, target)
            logp, log1mp = _log_probs(x)
            if log1mp is not None:
                pw = 1.0 if self.pos_weight is None else self.pos_weight
                loss = -(pw * t * logp + (1.0 - t) * log1mp)
            else:
                per_class = -t * logp
                if self.weight is not None:
                    if len(self.weight) != x.shape[1]:
                        raise ValueError(f"weight has {len(self.weight)} entries, expected one per class "
                                         f"({x.shape[1]}).")
                    w = torch.tensor(self.weight, dtype=x.dtype, device=x.device)
                    per_class = per_class * w.view(1, -1, *([1] * (x.dim() - 2)))
                loss = per_class.sum(dim=1)
            return _reduce(loss, self.reduction)


class FocalLoss(nn.Module):
    """Alpha-balanced focal loss (Lin et al., ICCV 2017): FL = -alpha_t (1 - p_t)^gamma log p_t, in float32.

    Binary (C == 1, sigmoid): alpha_t = alpha for the foreground, 1 - alpha for the background; with soft
    targets the loss is t * FL(positive) + (1 - t) * FL(negative). Mean over all N * C * |S| elements.
    Multi-class (C > 1, softmax): FL = -sum_c t_c alpha_c (1 - p_c)^gamma log p_c, mean over N * |S|
    positions; alpha a float gives 1 - alpha to class 0 (background) and alpha to the others (so C == 2
    equals the binary loss on the logit difference), a sequence gives one weight per class, None gives 1.
    gamma = 0 and alpha = None is cross-entropy.
    """

    def __init__(self, alpha: float | Sequence[float] | None = 0.25, gamma: float = 2.0,
                 reduction: str = "mean"):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}.")
        if isinstance(alpha, (int, float)) and not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1] (the foreground weight), got {alpha}.")
        self.alpha = alpha if alpha is None or isinstance(alpha, (int, float)) else [float(a) for a in alpha]
        self.gamma = float(gamma)
        self.reduction = _check_reduction(reduction)

    def _modulate(self, logp: torch.Tensor) -> torch.Tensor:
        """(1 - p)^gamma * log p, with (1 - p) = -expm1(log p) and 0^0 = 1."""
        if self.gamma == 0:
            return logp
        one_minus_p = (-torch.expm1(logp)).clamp_min(0.0)
        return one_minus_p.pow(self.gamma) * logp

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x, t = _prepare(logits, target)
            logp, log1mp = _log_probs(x)
            if log1mp is not None:
                if isinstance(self.alpha, list):
                    raise ValueError("binary focal loss takes alpha as one float, got a sequence.")
                a_pos, a_neg = (1.0, 1.0) if self.alpha is None else (float(self.alpha), 1.0 - float(self.alpha))
                pos = self._modulate(logp)      # (1 - p)^g log p
                neg = self._modulate(log1mp)    # p^g log(1 - p)
                loss = -(a_pos * t * pos + a_neg * (1.0 - t) * neg)
            else:
                c = x.shape[1]
                if self.alpha is None:
                    w = torch.ones(c)
                elif isinstance(self.alpha, list):
                    if len(self.alpha) != c:
                        raise ValueError(f"alpha has {len(self.alpha)} entries, expected one per class ({c}).")
                    w = torch.tensor(self.alpha)
                else:
                    w = torch.full((c,), float(self.alpha))
                    w[0] = 1.0 - float(self.alpha)
                w = w.to(device=x.device, dtype=x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
                loss = -(w * t * self._modulate(logp)).sum(dim=1)
            return _reduce(loss, self.reduction)


class DiceLoss(nn.Module):
    """Soft Dice loss: 1 - (2 sum(p t) + smooth_nr) / (sum p + sum t + smooth_dr), in float32.

    p = sigmoid(logits) (C == 1) or softmax (C > 1). ``batch=True`` sums over the batch and spatial axes
    (one Dice per channel: stable when many patches hold no foreground); ``batch=False`` computes one Dice per
    sample and channel, then reduces. ``smooth_nr`` / ``smooth_dr`` (default 1e-5 each) keep the ratio
    defined when a patch and its prediction are both empty (Dice -> 1, loss -> 0) and barely change it
    otherwise. ``include_background=False`` drops channel 0 (multi-class only). Reduction "none" returns
    (C,) with batch=True or (N, C) with batch=False. ``sum_reduce`` (attribute, default None): with batch=True,
    a function applied to the stacked (intersection, denominator) sums; data-parallel training sets an
    autograd-aware all-reduce, so that the Dice is the global batch's over all ranks (ahnet.train.dist).
    ``skip_empty`` (batch=False only): average the per-sample Dice over the (sample, channel) pairs whose target
    holds foreground (none: loss 0), so a patch with a 4 mm nodule weighs as much as one with a 30 mm nodule and
    empty patches are left to the voxel-wise loss; reduction "none" then gives NaN for the skipped pairs.
    ``per_instance`` (binary, batch=False only): one Dice per nodule instead of per patch. Each 26-connected
    component k of a patch's target is scored against that patch's background alone (the other components'
    voxels left out of both sums), so a 4 mm nodule next to a 20 mm one weighs as much as it does, and a false
    positive anywhere in the patch lowers every nodule's Dice (the instance term of Kofler et al.'s blob loss);
    the loss is the mean over every nodule of the batch (none: loss 0). Reduction "none" is not offered.
    """

    def __init__(self, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch: bool = True,
                 include_background: bool = True, reduction: str = "mean", skip_empty: bool = False,
                 per_instance: bool = False):
        super().__init__()
        if per_instance and (batch or reduction == "none"):
            raise ValueError("DiceLoss: per_instance needs batch=False and a mean or sum reduction.")
        self.per_instance = bool(per_instance)
        if skip_empty and batch:
            raise ValueError("DiceLoss: skip_empty applies to the per-sample Dice (batch=False).")
        self.skip_empty = bool(skip_empty)
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.batch = bool(batch)
        self.include_background = bool(include_background)
        self.reduction = _check_reduction(reduction)
        self.sum_reduce = None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x, t = _prepare(logits, target)
            p = torch.sigmoid(x) if x.shape[1] == 1 else torch.softmax(x, dim=1)
            if not self.include_background and x.shape[1] > 1:
                p, t = p[:, 1:], t[:, 1:]
            if self.per_instance:
                return self._per_instance(p, t)
            dims = ([0] if self.batch else []) + list(range(2, x.dim()))
            inter = (p * t).sum(dim=dims)
            denom = p.sum(dim=dims) + t.sum(dim=dims)
            if self.batch and self.sum_reduce is not None:
                inter, denom = self.sum_reduce(torch.stack([inter, denom])).unbind(0)
            dice = (2.0 * inter + self.smooth_nr) / (denom + self.smooth_dr)
            if not self.skip_empty:
                return _reduce(1.0 - dice, self.reduction)
            held = t.sum(dim=dims) > 0
            if self.reduction == "none":
                return torch.where(held, 1.0 - dice, torch.full_like(dice, float("nan")))
            loss = ((1.0 - dice) * held).sum()
            return loss / held.sum().clamp_min(1) if self.reduction == "mean" else loss

    def _per_instance(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean (or sum) over the batch's target components of 1 - Dice(component vs the patch's background)."""
        if p.shape[1] != 1:
            raise ValueError("DiceLoss: per_instance is for a binary (one-channel) output.")
        labels = [ndimage.label(m, structure=np.ones((3,) * (t.dim() - 2)))[0]
                  for m in (t[:, 0] > 0.5).cpu().numpy()]
        losses = []
        for n, lab in enumerate(labels):
            lab_t = torch.from_numpy(lab).to(p.device)
            pn, fg = p[n, 0], lab_t > 0
            for k in range(1, int(lab.max()) + 1):
                own = lab_t == k
                keep = ~fg | own                                  # background and this component only
                inter = (pn * own).sum()
                denom = (pn * keep).sum() + own.sum()
                losses.append(1.0 - (2.0 * inter + self.smooth_nr) / (denom + self.smooth_dr))
        if not losses:
            return p.sum() * 0.0
        stacked = torch.stack(losses)
        return stacked.mean() if self.reduction == "mean" else stacked.sum()


class DiceFocalLoss(nn.Module):
    """lambda_dice * DiceLoss + lambda_focal * FocalLoss (both means), in float32."""

    def __init__(self, alpha: float | Sequence[float] | None = 0.25, gamma: float = 2.0,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch: bool = True,
                 include_background: bool = True, lambda_dice: float = 1.0, lambda_focal: float = 1.0,
                 skip_empty: bool = False, per_instance: bool = False):
        super().__init__()
        self.dice = DiceLoss(smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch,
                             include_background=include_background, skip_empty=skip_empty,
                             per_instance=per_instance)
        self.focal = FocalLoss(alpha=alpha, gamma=gamma)
        self.lambda_dice = float(lambda_dice)
        self.lambda_focal = float(lambda_focal)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lambda_dice * self.dice(logits, target) + self.lambda_focal * self.focal(logits, target)


#: the losses by the name --loss takes
LOSSES = {
    "focal": FocalLoss,
    "dice": DiceLoss,
    "ce": CrossEntropyLoss,
    "dice_focal": DiceFocalLoss,
}
#: other spellings build_loss accepts
LOSS_ALIASES = {"bce": "ce", "cross_entropy": "ce", "dicefocal": "dice_focal"}


def _canonical(name: str) -> str:
    key = name.lower().replace("-", "_").replace("+", "_")
    key = LOSS_ALIASES.get(key, key)
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(set(LOSSES) | set(LOSS_ALIASES))}.")
    return key


def build_loss(name: str, **kw) -> nn.Module:
    """Build a loss by name: ce (= bce, cross_entropy), focal, dice, dice_focal (= dicefocal).

    Keyword arguments go to the class; unknown ones raise ValueError naming them.
    """
    cls = LOSSES[_canonical(name)]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    bad = sorted(set(kw) - allowed)
    if bad:
        raise ValueError(f"loss {name!r} does not take {bad}; it takes {sorted(allowed)}.")
    return cls(**kw)


def loss_kwargs(name: str, focal_alpha: float = 0.25, focal_gamma: float = 2.0, dice_smooth: float = 1e-5,
                dice_per_patch: bool = False, dice_per_nodule: bool = False) -> dict:
    """The keyword arguments of loss ``name`` from a run's settings (focal alpha and gamma, Dice smoothing, Dice
    over the batch, per patch holding foreground, or per nodule)."""
    focal = {"alpha": focal_alpha, "gamma": focal_gamma}
    dice = {"smooth_nr": dice_smooth, "smooth_dr": dice_smooth}
    if dice_per_patch or dice_per_nodule:
        dice.update(batch=False, skip_empty=True)
    if dice_per_nodule:
        dice.update(per_instance=True)
    return {"ce": {}, "focal": focal, "dice": dice, "dice_focal": {**focal, **dice}}[_canonical(name)]
