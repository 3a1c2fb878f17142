"""The fused BN -> ReLU -> conv of a training step (ahnet.nets.fused): the modules' outputs, gradients and
BatchNorm statistics, without the ReLU's output kept for backward."""
import copy

import pytest
import torch

from ahnet.nets import AHNet3d
from ahnet.nets.blocks import BNReLUConv
from ahnet.nets.fused import use_fused
from ahnet.precision import guard_cpu_bf16_convs, to_channels_last

SMALL = dict(encoder="resnet18", pfn_depth=2, growth=4, layers_per_block=2, z_pool="spacing", spacing=(2.5, .7, .7))


def _step(model, x, bf16=False, fused=True):
    """Output, parameter gradients and buffers after one training step of model on x."""
    before = use_fused(fused)
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = model(x)
        (y.float() ** 2).mean().backward()
    finally:
        use_fused(before)
    return (y.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


def _kept_bytes(model, x):
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


@pytest.mark.parametrize("kernel, momentum", [((1, 1, 1), 0.1), ((1, 3, 3), None), ((3, 1, 1), 0.3)])
def test_fused_unit_is_the_three_modules_in_float64(kernel, momentum):
    torch.manual_seed(0)
    unit = BNReLUConv(6, 5, kernel).double()
    unit[0].momentum = momentum
    with torch.no_grad():
        unit[0].weight.uniform_(0.5, 1.5)
        unit[0].bias.uniform_(-0.5, 0.5)
    plain = copy.deepcopy(unit)
    x = torch.randn(2, 6, 4, 7, 7, dtype=torch.float64)
    for _ in range(2):                                   # twice: the running statistics' update rule too
        y0, g0, b0 = _step(plain, x, fused=False)
        y1, g1, b1 = _step(unit, x, fused=True)
    assert torch.allclose(y0, y1, rtol=0, atol=1e-12)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-9, atol=1e-12), n
    for n in b0:
        assert torch.allclose(b0[n].double(), b1[n].double(), rtol=0, atol=1e-12), n


def test_fused_network_under_bf16_channels_last_is_the_plain_one():
    """A guarded AH-Net (a depth-2 level: the guard's calls keep the modules) in bf16 + channels-last, as the cpu
    preset trains: the same outputs and running statistics, gradients within bf16 rounding of the plain step's
    (the recomputed ReLU output is the forward's, so they agree to the last bit almost everywhere), and a third
    less kept for backward."""
    torch.manual_seed(1)
    base = AHNet3d(**SMALL)
    guard_cpu_bf16_convs(base)
    base = to_channels_last(base)
    fused = copy.deepcopy(base)
    x = to_channels_last(torch.randn(2, 1, 16, 64, 64))
    y0, g0, b0 = _step(base, x, bf16=True, fused=False)
    y1, g1, b1 = _step(fused, x, bf16=True, fused=True)
    assert torch.equal(y0, y1)
    for n in b0:
        assert torch.equal(b0[n], b1[n]), n
    for n in g0:
        rel = float((g0[n] - g1[n]).norm() / g0[n].norm().clamp_min(1e-12))
        assert rel < 1e-2, (n, rel)
    before = use_fused(False)
    try:
        plain_bytes = _kept_bytes(base, x)
    finally:
        use_fused(before)
    assert _kept_bytes(fused, x) < 0.8 * plain_bytes


def test_fused_path_is_training_only():
    """Inference (no grad, or eval mode) runs the modules themselves: nothing changes for predict or export."""
    torch.manual_seed(2)
    unit = BNReLUConv(4, 4, (1, 3, 3))
    x = torch.randn(1, 4, 2, 5, 5)
    with torch.no_grad():
        assert torch.equal(unit(x), torch.nn.Sequential.forward(unit, x))
    unit.eval()
    y = unit(x.requires_grad_())
    assert y.grad_fn is not None and "BNReLUConv" not in type(y.grad_fn).__name__
