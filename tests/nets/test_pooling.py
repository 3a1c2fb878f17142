import pytest
import torch
import torch.nn.functional as F

from ahnet.nets import AHNet3d
from ahnet.nets.pooling import DepthMaxPool, MaxPool2d, MaxPool3d, adaptive_max_pool3d, max_pool3d


def test_pools_keep_bfloat16_under_cpu_autocast_with_float32_values_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 8, 8).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.max_pool3d(x, 2).dtype == torch.float32          # what autocast does to nn.MaxPool3d
        ours = MaxPool3d(3, 2, 1)(x)
    assert ours.dtype == torch.bfloat16
    ref = F.max_pool3d(x.detach().float().requires_grad_(), 3, 2, 1)
    assert torch.equal(ours.float(), ref)                          # the max of bf16 values is a bf16 value
    # gradients: windows that do not overlap, upstream values that bf16 holds exactly -> equal
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = MaxPool3d(2, 2)(x)
    w = torch.randn(ours.shape).bfloat16().float()
    g_ours, = torch.autograd.grad((ours.float() * w).sum(), x)
    xf = x.detach().float().requires_grad_()
    g_ref, = torch.autograd.grad((F.max_pool3d(xf, 2, 2) * w).sum(), xf)
    assert torch.equal(g_ours.float(), g_ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert max_pool3d(x, (1, 2, 2)).dtype == torch.bfloat16
        assert adaptive_max_pool3d(x, (4, 2, 2)).dtype == torch.bfloat16
        assert MaxPool2d(3, 2, 1)(x[:, :, 0]).dtype == torch.bfloat16


def test_pools_are_plain_max_pools_in_float32():
    x = torch.randn(1, 2, 4, 9, 9)
    assert torch.equal(MaxPool3d(3, 2, 1)(x), F.max_pool3d(x, 3, 2, 1))
    assert torch.equal(adaptive_max_pool3d(x, (4, 2, 2)), F.adaptive_max_pool3d(x, (4, 2, 2)))


@pytest.mark.parametrize("z_pool", ["paper", "none"])
def test_ahnet_decoder_stays_in_the_autocast_dtype(z_pool):
    """With float32 pools, a bf16 run's skips (pooled stem, z-pooled stages) came out float32 and turned every
    decoder level float32; now every level is bf16."""
    m = AHNet3d("resnet18", pfn_depth=2, growth=4, layers_per_block=1, z_pool=z_pool)
    seen = {}
    names = ["encoder.layer1", "encoder.layer4", "dense0", "dense3", "dense4", "pyramid"]
    for n in names:
        m.get_submodule(n).register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o.dtype))
    x = torch.randn(1, 1, 32 if z_pool == "paper" else 2, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x)
    assert seen == {n: torch.bfloat16 for n in names}


@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("depth", [4, 5])
def test_depth_max_pool_is_max_pool_2_1_1_with_its_gradients(dtype, channels_last, depth):
    """Values and gradients of nn.MaxPool3d((2, 1, 1)), ties (one value in three repeated, so many) and NaN
    included, an odd last slice dropped; the dtype kept; far less kept for backward than max-pooling keeps."""
    torch.manual_seed(0)
    x = torch.randint(0, 3, (2, 3, depth, 5, 6)).to(dtype)
    x[0, 0, 0, 0, 0] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    g = torch.randn(2, 3, depth // 2, 5, 6).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = DepthMaxPool()(xa), F.max_pool3d(xb, (2, 1, 1))
    assert ours.dtype == dtype and ours.shape == ref.shape and torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(ours.nan_to_num(), ref.nan_to_num())
    with torch.no_grad():                                      # inference: max_pool3d itself
        assert torch.equal(DepthMaxPool()(x).nan_to_num(), ref.nan_to_num())
    (ours * g).nansum().backward()
    (ref * g).nansum().backward()
    assert torch.equal(xa.grad, xb.grad)

    def kept_bytes(fn):
        seen = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t,
                lambda t: t):
            fn(torch.randn(1, 8, 8, 16, 16).to(dtype).requires_grad_() * 1)
        return sum(seen.values())
    assert kept_bytes(DepthMaxPool()) * 4 < kept_bytes(lambda t: F.max_pool3d(t, (2, 1, 1)))
