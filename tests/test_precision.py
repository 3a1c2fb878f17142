"""The CPU bfloat16 convolution guard: exact weight gradients where PyTorch's CPU bf16 kernel is wrong."""
import pytest
import torch
import torch.nn as nn

from ahnet.precision import DepthGuardedConv3d, guard_cpu_bf16_convs


def _weight_grad(conv, x, g, bf16):
    conv.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = conv(x)
    (y.float() * g).sum().backward()
    return conv.weight.grad.clone()


@pytest.mark.parametrize("kernel, depth", [((3, 1, 1), 2), ((3, 3, 3), 2), ((5, 1, 1), 3), ((3, 3, 3), 4)])
def test_guarded_conv_weight_gradient_under_cpu_bf16_matches_float32(kernel, depth):
    """1 < depth < kernel depth is where the plain kernel returns 1e16..inf (torch 2.13 CPU); the guard's
    gradient is float32's; elsewhere it is bf16's, within bf16 rounding."""
    torch.manual_seed(0)
    conv = nn.Conv3d(16, 16, kernel, padding=tuple(k // 2 for k in kernel))
    x, g = torch.randn(2, 16, depth, 8, 8), torch.randn(2, 16, depth, 8, 8)
    ref = _weight_grad(conv, x, g, bf16=False)
    assert guard_cpu_bf16_convs(conv) == 1 and isinstance(conv, DepthGuardedConv3d)
    got = _weight_grad(conv, x, g, bf16=True)
    assert torch.isfinite(got).all()
    assert float((got - ref).abs().max() / ref.abs().max()) < 0.03


def test_guard_keeps_parameters_keys_and_float32_values():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.Conv2d(4, 4, 1))
    keys, x = list(net.state_dict()), torch.randn(1, 2, 2, 6, 6)
    before = net[0](x)
    assert guard_cpu_bf16_convs(net) == 1              # the 3D conv only; a second call finds none left
    assert guard_cpu_bf16_convs(net) == 0
    assert list(net.state_dict()) == keys and torch.equal(net[0](x), before)
