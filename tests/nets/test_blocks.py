import pytest
import torch
import torch.nn.functional as F

from ahnet.nets.blocks import PyramidPooling
from ahnet.nets.pooling import grid_max_pool


def _per_level_adaptive(x, depth):
    d = x.shape[2]
    return [F.adaptive_max_pool3d(x, (d, 2 ** i, 2 ** i)) for i in range(depth)]


@pytest.mark.parametrize("hw", [(64, 64), (48, 32), (16, 8)])
def test_nested_pyramid_pooling_equals_pooling_each_level_from_the_full_map(hw):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, *hw, dtype=torch.float64, requires_grad=True)
    pyramid = PyramidPooling(5, depth=4)
    nested = pyramid.pooled_maps(x)
    direct = _per_level_adaptive(x, 4)
    assert [m.shape[-1] for m in nested] == [1, 2, 4, 8]
    for a, b in zip(nested, direct):
        assert torch.equal(a, b)
    weights = [torch.randn_like(m) for m in direct]
    g_nested, = torch.autograd.grad(sum((m * w).sum() for m, w in zip(nested, weights)), x)
    g_direct, = torch.autograd.grad(sum((m * w).sum() for m, w in zip(direct, weights)), x)
    assert torch.allclose(g_nested, g_direct, rtol=0, atol=1e-12)


def test_pyramid_pooling_at_sizes_the_grid_does_not_divide_uses_adaptive_windows():
    x = torch.randn(1, 2, 2, 20, 12)          # 20 and 12 are not multiples of 8
    pyramid = PyramidPooling(2, depth=4)
    for a, b in zip(pyramid.pooled_maps(x), _per_level_adaptive(x, 4)):
        assert torch.equal(a, b)
    assert pyramid(x).shape == (1, 4 + 2, 2, 20, 12)


def test_pyramid_at_64_matches_the_papers_fixed_windows():
    # the authors' PSP: max-pool windows 64, 32, 16, 8 (stride = window) on a 64 x 64 map
    x = torch.randn(1, 3, 2, 64, 64)
    maps = PyramidPooling(3, depth=4).pooled_maps(x)
    for m, window in zip(maps, (64, 32, 16, 8)):
        assert torch.equal(m, F.max_pool3d(x, (1, window, window)))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grid_max_pool_equals_max_pool3d(dtype, channels_last):
    torch.manual_seed(0)
    for x in (torch.randn(2, 3, 4, 32, 48), torch.randint(0, 3, (2, 3, 4, 32, 48)).float()):   # ties too
        x = x.to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        for g in (1, 2, 8, 16):
            got = grid_max_pool(x, g)
            assert got.dtype == dtype and torch.equal(got, F.max_pool3d(x, (1, 32 // g, 48 // g)))


def test_exported_pyramid_pools_by_blocks_and_keeps_every_size():
    """torch.export (the way to ONNX) gets the reshape-and-max pooling: one graph, right at every size; eager runs
    keep max_pool3d."""
    torch.manual_seed(0)
    pyramid = PyramidPooling(3, depth=3).eval()
    n, d, h, w = (torch.export.Dim(k, min=1, max=64) for k in "ndhw")
    ep = torch.export.export(pyramid, (torch.randn(2, 3, 2, 16, 32),),
                             dynamic_shapes={"x": {0: n, 2: d, 3: 8 * h, 4: 8 * w}})
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("amax" in o for o in ops) and not any("max_pool3d" in o for o in ops), ops
    for shape in [(2, 3, 2, 16, 32), (1, 3, 3, 40, 24), (3, 3, 1, 64, 8)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.allclose(ep.module()(x), pyramid(x), rtol=0, atol=1e-6), shape


def test_pyramid_depth_zero_is_identity_concat():
    x = torch.randn(1, 3, 2, 8, 8)
    assert torch.equal(PyramidPooling(3, depth=0)(x), x)


@pytest.mark.parametrize("mode", ["trilinear", "nearest"])
def test_one_cell_level_is_broadcast_exactly_as_interpolation_would(mode):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    pyramid = PyramidPooling(3, depth=2, mode=mode).double()
    got = pyramid(x)
    maps = []
    for pooled, project in zip(pyramid.pooled_maps(x), pyramid.project):
        kw = {"align_corners": False} if mode == "trilinear" else {}
        maps.append(F.interpolate(project(pooled), size=x.shape[2:], mode=mode, **kw))
    want = torch.cat(maps + [x], 1)
    assert torch.allclose(got, want, rtol=0, atol=1e-14)
    w = torch.randn_like(want)
    g1, = torch.autograd.grad((got * w).sum(), x)
    g2, = torch.autograd.grad((want * w).sum(), x)
    assert torch.allclose(g1, g2, rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch.jit deprecations raised inside torch.compile
def test_pyramid_compiles_forward_and_backward():
    """torch.compile (a bench lever) failed on the CPU backend's backward of resizing a 1 x 1 map."""
    import shutil
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile's CPU backend needs a C++ compiler")
    torch._dynamo.reset()
    pyramid = PyramidPooling(6, depth=2)
    x = torch.randn(1, 6, 4, 16, 16, requires_grad=True)
    y = torch.compile(pyramid)(x)
    y.sum().backward()
    assert torch.allclose(y, pyramid(x), atol=1e-6)
