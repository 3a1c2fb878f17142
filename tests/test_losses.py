"""Losses against plain numpy formulas, at extreme logits, under fp16 inputs, and by gradient check."""
import numpy as np
import pytest
import torch

from ahnet.train.losses import (CrossEntropyLoss, DiceFocalLoss, DiceLoss, FocalLoss, build_loss, loss_kwargs)


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def binary():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 3, 4, 5, generator=g, dtype=torch.float64) * 3
    target = (torch.rand(2, 1, 3, 4, 5, generator=g) > 0.7).double()
    return logits, target


def test_bce_matches_numpy(binary):
    x, t = (a.numpy() for a in binary)
    p = _np_sigmoid(x)
    want = np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p)))
    got = CrossEntropyLoss()(*binary)
    assert got.dtype == torch.float32
    assert abs(got.item() - want) < 1e-5
    want_pw = np.mean(-(3.0 * t * np.log(p) + (1 - t) * np.log(1 - p)))
    assert abs(CrossEntropyLoss(pos_weight=3.0)(*binary).item() - want_pw) < 1e-5


def test_focal_matches_numpy(binary):
    x, t = (a.numpy() for a in binary)
    p = _np_sigmoid(x)
    pt = np.where(t == 1, p, 1 - p)
    at = np.where(t == 1, 0.25, 0.75)
    want = np.mean(-at * (1 - pt) ** 2 * np.log(pt))
    got = FocalLoss(alpha=0.25, gamma=2.0)(*binary)
    assert abs(got.item() - want) < 1e-6
    # gamma = 0, alpha = None is plain BCE
    assert abs(FocalLoss(alpha=None, gamma=0)(*binary).item() - CrossEntropyLoss()(*binary).item()) < 1e-6
    # gamma = 1.5 and target given without the channel axis
    want15 = np.mean(-at * (1 - pt) ** 1.5 * np.log(pt))
    assert abs(FocalLoss(gamma=1.5)(binary[0], binary[1][:, 0]).item() - want15) < 1e-6


def test_focal_reductions(binary):
    none = FocalLoss(reduction="none")(*binary)
    assert none.shape == binary[0].shape
    assert torch.allclose(FocalLoss(reduction="sum")(*binary), none.sum())


def test_multiclass_ce_and_focal_match_numpy():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 5, generator=g) * 2
    t = torch.randint(0, 3, (2, 4, 5), generator=g)
    p = _np_softmax(x.double().numpy())
    pt = np.take_along_axis(p, t.numpy()[:, None], axis=1)[:, 0]
    assert abs(CrossEntropyLoss()(x, t).item() - np.mean(-np.log(pt))) < 1e-5
    # torch's own CE is a second independent reference
    assert abs(CrossEntropyLoss()(x, t).item() - torch.nn.functional.cross_entropy(x, t).item()) < 1e-5
    w = np.array([0.75, 0.25, 0.25])[t.numpy()]
    want = np.mean(-w * (1 - pt) ** 2 * np.log(pt))
    assert abs(FocalLoss(alpha=0.25, gamma=2)(x, t).item() - want) < 1e-5
    # (N, 1, *S) indices and one-hot targets give the same value
    onehot = torch.nn.functional.one_hot(t, 3).movedim(-1, 1).float()
    assert abs(FocalLoss()(x, t[:, None]).item() - want) < 1e-5
    assert abs(FocalLoss()(x, onehot).item() - want) < 1e-5


def test_two_class_softmax_focal_equals_binary_sigmoid_focal(binary):
    x, t = binary
    x2 = torch.cat([torch.zeros_like(x), x], dim=1)      # softmax([0, x]) = [1 - s(x), s(x)]
    t2 = t[:, 0].long()
    a = FocalLoss(alpha=0.3, gamma=2)(x, t).item()
    b = FocalLoss(alpha=0.3, gamma=2)(x2, t2).item()
    assert abs(a - b) < 1e-6


def test_dice_matches_numpy(binary):
    x, t = (a.numpy() for a in binary)
    p = _np_sigmoid(x)
    s = 1e-5
    want_batch = 1 - (2 * (p * t).sum() + s) / (p.sum() + t.sum() + s)
    assert abs(DiceLoss(batch=True)(*binary).item() - want_batch) < 1e-6
    per = [1 - (2 * (p[i] * t[i]).sum() + s) / (p[i].sum() + t[i].sum() + s) for i in range(2)]
    assert abs(DiceLoss(batch=False)(*binary).item() - np.mean(per)) < 1e-6
    assert DiceLoss(batch=False, reduction="none")(*binary).shape == (2, 1)


def test_dice_per_patch_averages_the_patches_holding_foreground():
    torch.manual_seed(1)
    x = torch.randn(3, 1, 4, 6, 6)
    t = torch.zeros(3, 1, 4, 6, 6)
    t[0, 0, 1:3, 2:4, 2:4] = 1          # a small nodule
    t[2, 0, :, 1:6, 0:5] = 1            # a large one; patch 1 is empty
    p, tn, s = torch.sigmoid(x).numpy(), t.numpy(), 1e-5
    per = [1 - (2 * (p[i] * tn[i]).sum() + s) / (p[i].sum() + tn[i].sum() + s) for i in (0, 2)]
    loss = DiceLoss(batch=False, skip_empty=True)
    assert abs(loss(x, t).item() - np.mean(per)) < 1e-6
    none = DiceLoss(batch=False, skip_empty=True, reduction="none")(x, t)
    assert torch.isnan(none[1, 0]) and abs(none[0, 0].item() - per[0]) < 1e-6
    assert loss(x, torch.zeros_like(t)).item() == 0.0          # no foreground at all: the Dice term is silent
    assert build_loss("dice_focal", **loss_kwargs("dice_focal", dice_per_patch=True)).dice.skip_empty
    with pytest.raises(ValueError, match="skip_empty"):
        DiceLoss(batch=True, skip_empty=True)


def test_dice_per_nodule_scores_each_component_against_its_patch_background():
    torch.manual_seed(2)
    x = torch.randn(2, 1, 6, 12, 12, requires_grad=True)
    t = torch.zeros(2, 1, 6, 12, 12)
    t[0, 0, 1:3, 1:3, 1:3] = 1          # a small nodule and, apart from it, a large one in patch 0
    t[0, 0, 2:6, 5:11, 5:11] = 1
    t[1, 0, 0:2, 0:2, 0:2] = 1          # one nodule touching a corner in patch 1 (diagonal voxels join it)
    t[1, 0, 2, 2, 2] = 1
    p, tn, s = torch.sigmoid(x).detach().numpy(), t.numpy(), 1e-5
    small, large = np.zeros_like(tn[0, 0], bool), np.zeros_like(tn[0, 0], bool)
    small[1:3, 1:3, 1:3], large[2:6, 5:11, 5:11] = True, True

    def dice(pi, own, other):
        return 1 - (2 * (pi * own).sum() + s) / ((pi * ~other).sum() + own.sum() + s)
    want = [dice(p[0, 0], small, large), dice(p[0, 0], large, small),
            dice(p[1, 0], tn[1, 0] > 0, np.zeros_like(small))]
    loss = DiceLoss(batch=False, skip_empty=True, per_instance=True)
    got = loss(x, t)
    assert abs(got.item() - np.mean(want)) < 1e-5      # three nodules, each weighing a third
    got.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert loss(x, torch.zeros_like(t)).item() == 0.0
    assert build_loss("dice_focal", **loss_kwargs("dice_focal", dice_per_nodule=True)).dice.per_instance
    with pytest.raises(ValueError, match="per_instance"):
        DiceLoss(batch=True, per_instance=True)


def test_dice_empty_patch_is_zero_loss_and_smooth_documented():
    x = torch.full((1, 1, 4, 4), -50.0)
    t = torch.zeros(1, 1, 4, 4)
    assert DiceLoss()(x, t).item() < 1e-3   # both empty: Dice -> 1


def test_multiclass_dice_background_flag():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 6, generator=g)
    t = torch.randint(0, 3, (2, 6, 6), generator=g)
    p = _np_softmax(x.double().numpy())
    oh = np.eye(3)[t.numpy()].transpose(0, 3, 1, 2)
    inter = (p * oh).sum(axis=(0, 2, 3))
    den = p.sum(axis=(0, 2, 3)) + oh.sum(axis=(0, 2, 3))
    d = 1 - (2 * inter + 1e-5) / (den + 1e-5)
    assert abs(DiceLoss()(x, t).item() - d.mean()) < 1e-5
    assert abs(DiceLoss(include_background=False)(x, t).item() - d[1:].mean()) < 1e-5


def test_dice_focal_is_the_weighted_sum(binary):
    want = 0.5 * DiceLoss()(*binary) + 2.0 * FocalLoss(alpha=0.4)(*binary)
    got = DiceFocalLoss(alpha=0.4, lambda_dice=0.5, lambda_focal=2.0)(*binary)
    assert torch.allclose(got, want)


@pytest.mark.parametrize("name", ["ce", "focal", "dice", "dice_focal"])
def test_extreme_logits_are_finite_with_finite_grads(name):
    x = torch.tensor([[[50.0, -50.0, 50.0, -50.0, 1e4, -1e4]]], requires_grad=True)
    t = torch.tensor([[[1.0, 0.0, 0.0, 1.0, 0.0, 1.0]]])
    loss = build_loss(name)(x, t)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    # confidently wrong at +-50 costs ~50 nats in CE
    if name == "ce":
        assert loss.item() > 40 / 6 * 2


@pytest.mark.parametrize("name", ["ce", "focal", "dice", "dice_focal"])
def test_fp16_inputs_give_fp32_finite_loss(name):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 1, 8, 8, generator=g) * 20).half()
    t = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).half()
    loss = build_loss(name)(x, t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = build_loss(name)(x.float(), t.float())
    assert torch.allclose(loss, ref)


def test_loss_in_fp32_inside_cpu_bf16_autocast():
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    x = torch.randn(2, 1, 8, 8)
    t = (torch.rand(2, 1, 8, 8) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16
        loss = build_loss("dice_focal")(logits, t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(conv.weight.grad).all()


@pytest.mark.parametrize("name", ["ce", "focal", "dice", "dice_focal"])
def test_gradcheck(name):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.rand(2, 1, 3, 3, generator=g, dtype=torch.float64)
    loss_fn = build_loss(name)
    # the loss runs in float32, so check the analytic gradient against float32 finite differences loosely
    assert torch.autograd.gradcheck(lambda a: loss_fn(a, t).double(), (x,), eps=1e-3, atol=2e-3, rtol=1e-2)


def test_focal_grad_matches_closed_form():
    # d/dx of -alpha (1-p)^g log p for t = 1 at one logit, against the analytic derivative
    x = torch.tensor([[0.7]], requires_grad=True)
    FocalLoss(alpha=0.25, gamma=2)(x, torch.ones(1, 1)).backward()
    p = float(_np_sigmoid(0.7))
    want = 0.25 * (2 * p * (1 - p) ** 2 * np.log(p) - (1 - p) ** 3)
    assert abs(x.grad.item() - want) < 1e-6


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="binary target must have shape"):
        FocalLoss()(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="class indices"):
        FocalLoss()(torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 3))
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("hinge")
    with pytest.raises(ValueError, match="does not take"):
        build_loss("dice", gamma=2)
    with pytest.raises(ValueError, match="alpha"):
        FocalLoss(alpha=1.5)


def test_against_monai():
    monai_losses = pytest.importorskip("monai.losses")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 1, 4, 6, 6, generator=g) * 3
    t = (torch.rand(2, 1, 4, 6, 6, generator=g) > 0.8).float()
    ref_f = monai_losses.FocalLoss(gamma=2.0, alpha=0.25, use_softmax=False)(x, t)
    assert abs(FocalLoss(alpha=0.25, gamma=2)(x, t).item() - ref_f.item()) < 1e-5
    for batch in (True, False):
        ref_d = monai_losses.DiceLoss(sigmoid=True, batch=batch, smooth_nr=1e-5, smooth_dr=1e-5)(x, t)
        assert abs(DiceLoss(batch=batch)(x, t).item() - ref_d.item()) < 1e-5
