"""Sliding-window inference against direct forward passes with tiny stand-in models."""
import numpy as np
import pytest
import torch
from torch import nn

from ahnet.infer import (InferenceInputError, gaussian_importance, input_multiple, slicewise_predict,
                         sliding_window_predict, window_starts)


class Net(nn.Module):
    """A small non-linear 3D conv net with a divisibility rule, like the project's models."""

    def __init__(self, mult=(2, 4, 4)):
        super().__init__()
        self.input_multiple = mult
        self.body = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 1, 3, padding=1))

    def forward(self, x):
        for s, m in zip(x.shape[2:], self.input_multiple):
            if s % m:
                raise ValueError(f"size {tuple(x.shape[2:])} must divide by {self.input_multiple}")
        return self.body(x)


class Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.inner(x)


def test_whole_window_equals_direct_forward():
    net = Net()
    x = torch.randn(1, 1, 6, 12, 16)
    got = sliding_window_predict(net, x, window=None)
    want = torch.sigmoid(net(x))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got.dtype == torch.float32 and not got.requires_grad
    got.mul_(1.0)                        # an ordinary tensor (not an inference-mode one): in-place ops work


def test_odd_size_is_padded_to_multiple_and_cropped():
    net = Net()
    x = torch.randn(1, 1, 5, 11, 13)
    got = sliding_window_predict(net, x, window=None)
    assert got.shape == (1, 1, 5, 11, 13)
    xp = torch.nn.functional.pad(x, [0, 3, 0, 1, 0, 1])           # to (6, 12, 16)
    torch.testing.assert_close(got, torch.sigmoid(net(xp))[..., :5, :11, :13], rtol=0, atol=1e-6)


@pytest.mark.parametrize("overlap,blend", [(0.5, "gaussian"), (0.25, "constant"), (0.0, "gaussian")])
def test_pointwise_model_same_with_windows_at_odd_sizes(overlap, blend):
    conv = nn.Conv3d(2, 3, 1)
    x = torch.randn(1, 2, 7, 23, 19)
    want = torch.sigmoid(conv(x))
    got = sliding_window_predict(conv, x, window=(4, 8, 8), overlap=overlap, batch_size=3, blend=blend)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # a window larger than the volume on one axis: padded, then cropped back
    got2 = sliding_window_predict(conv, x, window=(8, 8, 8), overlap=overlap)
    torch.testing.assert_close(got2, want, rtol=0, atol=1e-6)


def _reference_blend(model, x, window, overlap, blend):
    """Sliding windows the plain way: one full-size sum of weighted probabilities and one of weights."""
    imp = gaussian_importance(window) if blend == "gaussian" else torch.ones(window)
    acc, wsum = torch.zeros((1,) + x.shape[2:]), torch.zeros((1,) + x.shape[2:])
    for z in window_starts(x.shape[2], window[0], overlap):
        for y in window_starts(x.shape[3], window[1], overlap):
            for w in window_starts(x.shape[4], window[2], overlap):
                sl = (slice(z, z + window[0]), slice(y, y + window[1]), slice(w, w + window[2]))
                with torch.no_grad():
                    acc[(slice(None),) + sl] += torch.sigmoid(model(x[(slice(None), slice(None)) + sl]))[0] * imp
                wsum[(slice(None),) + sl] += imp
    return (acc / wsum).unsqueeze(0)


@pytest.mark.parametrize("overlap,blend,workers", [(0.5, "gaussian", 1), (0.3, "constant", 2), (0.5, "gaussian", 3)])
def test_slab_blending_and_workers_equal_full_size_blending(overlap, blend, workers):
    """The output divided slab by slab (weights kept for one window depth only) and the windows predicted by
    worker threads give what one full-size accumulator and weight map give, for a model whose output depends
    on the window (zero padding at its borders)."""
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(1, 1, 22, 20, 24)
    want = _reference_blend(net, x, (4, 8, 8), overlap, blend)
    got = sliding_window_predict(net, x, window=(4, 8, 8), overlap=overlap, batch_size=3, blend=blend,
                                 workers=workers)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    one = sliding_window_predict(net, x, window=(4, 8, 8), overlap=overlap, batch_size=3, blend=blend)
    assert torch.equal(got, one)


def test_blend_keeps_weights_for_one_window_depth_only():
    """Working memory beyond the output is bounded by the window: the weight slab of a 40-slice volume is as deep
    as the window (4), and every slice is finished (divided) by the time the last window is added."""
    from ahnet.infer.windows import _Blend

    acc = _Blend(1, (40, 8, 8), (4, 8, 8), "cpu")
    depths = set()
    for z in window_starts(40, 4, 0.5):
        acc.add((slice(z, z + 4), slice(0, 8), slice(0, 8)), torch.full((1, 4, 8, 8), 0.25), torch.full((4, 8, 8), 2.))
        depths.add(acc.wsum.shape[1])
    assert depths == {4} and torch.allclose(acc.result(), torch.full((1, 40, 8, 8), 0.125))


def test_windows_are_streamed_in_batches():
    m = Counting(nn.Conv3d(1, 1, 1))
    x = torch.randn(1, 1, 9, 20, 20)
    sliding_window_predict(m, x, window=(4, 8, 8), overlap=0.5, batch_size=4)
    n = len(window_starts(9, 4, .5)) * len(window_starts(20, 8, .5)) ** 2
    assert sum(m.batches) == n and max(m.batches) <= 4 and len(m.batches) == -(-n // 4)


def test_window_starts_cover_and_end_flush():
    assert window_starts(8, 8, .5) == [0]
    s = window_starts(23, 8, .5)
    assert s[0] == 0 and s[-1] == 15 and all(b - a <= 4 for a, b in zip(s, s[1:]))


def test_gaussian_importance_shape_and_sigma():
    g = gaussian_importance((8, 16, 9)).numpy()
    assert g.shape == (8, 16, 9) and g.max() == pytest.approx(1.0) and g.min() > 0
    np.testing.assert_allclose(g, g[::-1, ::-1, ::-1], rtol=1e-6)                 # centred
    c = gaussian_importance((1, 1, 17)).numpy()[0, 0]                             # odd: centre at index 8
    assert c[8] == 1.0 and c[8 + 2] / c[8] == pytest.approx(np.exp(-0.5 * (2 / (17 / 8)) ** 2))


def test_flip_tta_with_symmetric_model_and_mean_of_flips():
    conv = nn.Conv3d(1, 1, 3, padding=1, bias=True)
    with torch.no_grad():                      # symmetric in H and W: w[..., i, j] = w[..., -i, -j] per axis
        w = conv.weight
        w.copy_((w + w.flip(-1)) / 2)
        w.copy_((w + w.flip(-2)) / 2)
    x = torch.randn(1, 1, 4, 10, 12)
    a = sliding_window_predict(conv, x, flip_tta=False)
    b = sliding_window_predict(conv, x, flip_tta=True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    asym = nn.Conv3d(1, 1, 3, padding=1)
    got = sliding_window_predict(asym, x, flip_tta=True)
    want = sum(torch.sigmoid(asym(x.flip(d)).flip(d)) if d else torch.sigmoid(asym(x))
               for d in [(), (3,), (4,), (3, 4)]) / 4
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, sliding_window_predict(asym, x), atol=1e-4)


def test_ensemble_is_mean_probability_and_lcm_of_multiples():
    m1, m2 = Net((2, 4, 4)), Net((1, 8, 2))
    assert input_multiple([m1, m2]) == (2, 8, 4)
    x = torch.randn(1, 1, 5, 9, 7)                 # padded to (6, 16, 8)
    got = sliding_window_predict([m1, m2], x)
    xp = torch.nn.functional.pad(x, [0, 1, 0, 7, 0, 1])
    want = (torch.sigmoid(m1(xp)) + torch.sigmoid(m2(xp)))[..., :5, :9, :7] / 2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_mode_restored_and_bad_inputs():
    net = Net()
    net.train()
    sliding_window_predict(net, torch.zeros(1, 1, 2, 4, 4))
    assert net.training
    with pytest.raises(InferenceInputError, match="input_multiple"):
        sliding_window_predict(net, torch.zeros(1, 1, 4, 8, 8), window=(3, 4, 4))
    with pytest.raises(InferenceInputError, match="N = 1"):
        sliding_window_predict(net, torch.zeros(2, 1, 4, 8, 8))
    with pytest.raises(InferenceInputError, match="overlap"):
        sliding_window_predict(net, torch.zeros(1, 1, 4, 8, 8), overlap=1.0)


def test_bf16_and_channels_last_levers_agree_with_float32():
    """The speed levers of paper_notes/performance.md: channels-last gives the float32 result to rounding,
    bfloat16 autocast to bfloat16's 3 significant digits; probabilities stay float32."""
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(1, 1, 8, 16, 20)
    ref = sliding_window_predict(net, x, window=(4, 8, 8), amp=False)
    cl = sliding_window_predict(net, x, window=(4, 8, 8), amp=False, channels_last=True)
    torch.testing.assert_close(cl, ref, rtol=0, atol=1e-6)
    assert net.body[0].weight.is_contiguous(memory_format=torch.channels_last_3d)   # converted in place
    bf = sliding_window_predict(net, x, window=(4, 8, 8), amp="bf16", channels_last=True)
    assert bf.dtype == torch.float32
    torch.testing.assert_close(bf, ref, rtol=0, atol=2e-2)
    assert not torch.equal(bf, ref)                                                   # bf16 really ran
    with pytest.raises(InferenceInputError, match="fp16 needs a CUDA device"):
        sliding_window_predict(net, x, amp="fp16", device="cpu")
    with pytest.raises(InferenceInputError, match="--amp must be"):
        sliding_window_predict(net, x, amp="half")


class Slice2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_multiple = (4, 4)
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        assert x.shape[-1] % 4 == 0 and x.shape[-2] % 4 == 0
        return self.conv(x)


def test_slicewise_uses_three_slice_stacks_with_repeated_ends():
    m = Slice2d()
    x = torch.randn(1, 1, 5, 10, 7)
    got = slicewise_predict(m, x, batch_size=2)
    assert got.shape == (1, 1, 5, 10, 7)
    v = torch.nn.functional.pad(x[0, 0], [0, 1, 0, 2])
    for z in range(5):
        idx = [max(z - 1, 0), z, min(z + 1, 4)]
        want = torch.sigmoid(m(v[idx][None]))[0, 0, :10, :7]
        torch.testing.assert_close(got[0, 0, z], want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- ensembles and the window rule
def test_window_rule_rounds_up_and_caps_at_the_volume():
    from ahnet.infer import DEFAULT_WINDOW, window_for
    m = (16, 32, 32)
    assert window_for((100, 300, 300), m, patch=(20, 40, 40)) == (32, 64, 64)      # patch rounded up
    assert window_for((16, 32, 64), m, patch=(20, 40, 40)) == (16, 32, 64)         # never beyond the padded volume
    assert window_for((17, 33, 20), m, window=(16, 64, 32)) == (16, 64, 32)
    assert window_for((300, 512, 512), m) == DEFAULT_WINDOW == (64, 192, 192)
    with pytest.raises(InferenceInputError, match=r"divisible by the models' input multiple \(16, 32, 32\)"):
        window_for((300, 512, 512), m, window=(8, 32, 32))


def test_predict_volume_runs_3d_by_windows_and_2d_slice_by_slice():
    from pathlib import Path

    from ahnet.infer import Ensemble, Member, predict_volume
    img = np.random.default_rng(0).random((5, 9, 11)).astype(np.float32)
    conv3 = nn.Conv3d(1, 1, 1)
    ens3 = Ensemble([Member(conv3, "unet3d", 3, {}, {"patch_size": [2, 4, 4]}, Path("a.pt"))])
    assert ens3.window(img.shape) == (2, 4, 4) and ens3.groups().keys() == {"3d"}
    want = torch.sigmoid(conv3(torch.from_numpy(img)[None, None]))[0, 0].detach().numpy()
    np.testing.assert_allclose(predict_volume(ens3, img), want, atol=1e-6)
    conv2 = nn.Conv2d(3, 1, 1)
    ens2 = Ensemble([Member(conv2, "mcgcn", 2, {"in_slices": 3}, {}, Path("b.pt"))])
    p2 = predict_volume(ens2, img)
    stack = torch.from_numpy(img[[0, 0, 1]])[None]                       # slice 0: its stack repeats the edge
    np.testing.assert_allclose(p2[0], torch.sigmoid(conv2(stack))[0, 0].detach().numpy(), atol=1e-6)
    mixed = Ensemble(ens3.members + ens2.members)
    np.testing.assert_allclose(predict_volume(mixed, img), (want + p2) / 2, atol=1e-6)
    with pytest.raises(InferenceInputError, match="--amp fp16 needs a CUDA device"):
        ens3.check(amp="fp16")
