"""The CPU bfloat16 convolution guard: exact weight gradients where PyTorch's CPU bf16 kernel is wrong."""
import pytest
import torch
import torch.nn as nn

from ahnet.nets import build_model
from ahnet.precision import DepthGuardedConv3d, bf16_depth_bug, guard_cpu_bf16_convs, to_channels_last

SPACING = dict(z_pool="spacing", spacing=(2.5, 0.7, 0.7))    # the cpu preset's: depth 2 at the deep levels


def _grads(conv, x, g, bf16):
    """(output, weight gradient, input gradient) of ``conv`` on x, the output weighted by g."""
    conv.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = conv(x)
    (y.float() * g).sum().backward()
    return y.detach().float(), conv.weight.grad.clone(), x.grad.clone()


def _rel(got, ref):
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("mode", ["pad", "float32"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel, depth", [((3, 1, 1), 2), ((3, 3, 3), 2), ((5, 1, 1), 3), ((5, 1, 1), 4),
                                           ((3, 3, 3), 4)])
def test_guarded_conv_gradients_under_cpu_bf16_match_float32(kernel, depth, mode, channels_last):
    """1 < depth < kernel depth is where the plain kernel returns 1e16..inf or NaN (torch 2.13 CPU); either guard
    gives float32's output, weight and input gradients within bf16 rounding (3 %), and elsewhere bf16's."""
    torch.manual_seed(0)
    conv = nn.Conv3d(16, 16, kernel, padding=tuple(k // 2 for k in kernel))
    x, g = torch.randn(2, 16, depth, 8, 8), torch.randn(2, 16, depth, 8, 8)
    ref = _grads(conv, x, g, bf16=False)
    assert guard_cpu_bf16_convs(conv, mode) == 1 and isinstance(conv, DepthGuardedConv3d)
    if channels_last:
        conv, x = to_channels_last(conv), to_channels_last(x)
    got = _grads(conv, x, g, bf16=True)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        assert _rel(a, b) < 0.03


def test_pad_guard_falls_back_to_float32_where_padding_cannot_move():
    """A depth stride other than 1 cannot take its padding first in this form: that call runs in float32."""
    torch.manual_seed(2)
    conv = nn.Conv3d(8, 8, 3, stride=(2, 1, 1), padding=1)
    x, g = torch.randn(2, 8, 2, 6, 6), torch.randn(2, 8, 1, 6, 6)
    ref = _grads(conv, x, g, bf16=False)
    guard_cpu_bf16_convs(conv)
    got = _grads(conv, x, g, bf16=True)
    assert got[0].dtype == torch.float32 and all(_rel(a, b) < 1e-5 for a, b in zip(got, ref))


def test_guard_modes_are_checked_and_can_be_switched():
    net = nn.Sequential(nn.Conv3d(2, 2, 3, padding=1), nn.Conv3d(2, 2, 3, padding=1))
    assert guard_cpu_bf16_convs(net, "float32") == 2 and {m.guard_mode for m in net} == {"float32"}
    assert guard_cpu_bf16_convs(net, "pad") == 0 and {m.guard_mode for m in net} == {"pad"}
    with pytest.raises(ValueError, match="guard mode must be one of"):
        guard_cpu_bf16_convs(net, "fast")


def _affected_calls(model):
    """Forward hooks that keep, for every guarded conv called where the kernel bug bites, its input and (once
    backward has run) the gradient of its output; returns the list of [conv, input, grad_output] and the hooks."""
    calls, hooks = [], []

    def keep(conv, inputs, out):
        if bf16_depth_bug(inputs[0], conv.kernel_size[0]):
            rec = [conv, inputs[0].detach(), None]
            out.register_hook(lambda g, rec=rec: rec.__setitem__(2, g.detach()))
            calls.append(rec)
    for m in model.modules():
        if isinstance(m, DepthGuardedConv3d):
            hooks.append(m.register_forward_hook(keep))
    return calls, hooks


@pytest.mark.parametrize("name, kwargs", [
    ("ahnet", dict(encoder="resnet18", pfn_depth=2, growth=8, layers_per_block=2, **SPACING)),
    ("unet3d", dict(base_channels=8, **SPACING))])
def test_guarded_model_bf16_weight_gradients_match_float32_at_depth_two(name, kwargs):
    """A network of the cpu preset's kind (its deepest levels at depth 2), guarded as training guards it, one
    training step under bf16 autocast in channels-last: every gradient is finite, and the weight gradient of each
    convolution where the kernel bug bites equals float32's weight gradient of the same call (its own input and
    output gradient, in float32) within 3 %, the tolerance of the single-conv test above. (The whole network's
    gradients against a float32 network differ by bf16 rounding everywhere, the old guard's as much as this one's,
    so the check is made where the guard acts.)"""
    torch.manual_seed(3)
    model = build_model(name, in_channels=1, out_channels=1, **kwargs).train()
    x, y = torch.randn(2, 1, 16, 64, 64), (torch.rand(2, 1, 16, 64, 64) > 0.97).float()
    assert guard_cpu_bf16_convs(model) > 0
    model, x = to_channels_last(model), to_channels_last(x)
    calls, hooks = _affected_calls(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    nn.functional.binary_cross_entropy_with_logits(out.float(), y).backward()
    for h in hooks:
        h.remove()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert len(calls) >= 2 and len({id(c[0]) for c in calls}) == len(calls)      # each affected conv called once
    for conv, inp, gout in calls:
        ref = torch.nn.grad.conv3d_weight(inp.float(), conv.weight.shape, gout.float(), conv.stride, conv.padding,
                                          conv.dilation, conv.groups)
        assert _rel(conv.weight.grad.float(), ref) < 0.03


def test_guard_keeps_parameters_keys_and_float32_values():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.Conv2d(4, 4, 1))
    keys, x = list(net.state_dict()), torch.randn(1, 2, 2, 6, 6)
    before = net[0](x)
    assert guard_cpu_bf16_convs(net) == 1              # the 3D conv only; a second call finds none left
    assert guard_cpu_bf16_convs(net) == 0
    assert list(net.state_dict()) == keys and torch.equal(net[0](x), before)
