"""AHNet3d computes what MONAI's AHNet computes: the same weights (mapped by ahnet.bench.monai_port) give the
same output on the same input, up to the layout change (N, C, D, H, W) <-> (N, C, X, Y, Z)."""
import math

import pytest
import torch

monai_nets = pytest.importorskip("monai.networks.nets")

from ahnet.nets import AHNet3d  # noqa: E402
from ahnet.bench.layout import from_monai_layout, to_monai_layout  # noqa: E402
from ahnet.bench.monai_port import (MonaiPortError, load_monai_ahnet_state, match_monai_ops,  # noqa: E402
                                   monai_key_to_ours, monai_pyramid_size)

pytestmark = pytest.mark.peer


def _randomise_bn(model, seed=0):
    """Non-trivial BN affine and running statistics, so eval mode exercises every BN tensor; conv weights
    with std 1 / sqrt(fan_in) so activations stay O(1) in eval mode (MONAI's init lets them grow to ~1e9)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            fan_in = m.weight[0].numel() if isinstance(m, torch.nn.Conv3d) else m.weight[:, 0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=g) / fan_in ** 0.5
        if isinstance(m, torch.nn.BatchNorm3d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = 0.1 * torch.randn(n, generator=g)
            m.running_mean.data = 0.1 * torch.randn(n, generator=g)
            m.running_var.data = 0.5 + torch.rand(n, generator=g)
    return model


@pytest.fixture(scope="module", params=["trilinear", "transpose"])
def pair(request):
    torch.manual_seed(0)
    peer = _randomise_bn(monai_nets.AHNet(spatial_dims=3, psp_block_num=0, upsample_mode=request.param)).eval()
    ours = AHNet3d("resnet50", pfn_depth=0, upsample=request.param).eval()
    dropped = load_monai_ahnet_state(ours, peer.state_dict())
    assert dropped == []
    return request.param, peer, ours


def test_same_output_as_monai(pair):
    mode, peer, ours = pair
    match_monai_ops(ours)
    x = torch.randn(1, 1, 32, 64, 64, generator=torch.Generator().manual_seed(1))  # MONAI: 64 x 64 x 32
    with torch.no_grad():
        want = from_monai_layout(peer(to_monai_layout(x).contiguous()))
        got = ours(x)
    assert got.shape == (1, 1, 32, 64, 64)
    scale = want.abs().max().item()
    assert scale > 1e-3
    print(mode, "max |ours - monai|", (got - want).abs().max().item(), "max |monai|", scale)
    assert torch.allclose(got, want, atol=1e-5 * max(1.0, scale), rtol=1e-5), (got - want).abs().max().item()


def test_parameters_and_buffers_all_carried(pair):
    _, peer, ours = pair
    ps = peer.state_dict()
    os_ = ours.state_dict()
    assert len(ps) == len(os_)
    w = ps["conv1.weight"]                      # (64, 1, 7, 7, 3) over (X, Y, Z)
    assert torch.equal(os_["encoder.conv1.weight"], w.permute(0, 1, 4, 3, 2))
    assert torch.equal(os_["encoder.layer2.0.downsample.1.running_var"], ps["layer2.0.downsample.2.running_var"])
    assert torch.equal(os_["dense1.2.through.2.weight"][..., 0, 0], ps["dense1.denselayer3.conv3.weight"][:, :, 0, 0])


def test_trilinear_differs_only_by_align_corners():
    # Without match_monai_ops the outputs differ (a real, documented difference), so the test above can fail.
    torch.manual_seed(0)
    peer = _randomise_bn(monai_nets.AHNet(spatial_dims=3, psp_block_num=0, upsample_mode="trilinear")).eval()
    ours = AHNet3d("resnet50", pfn_depth=0, upsample="trilinear").eval()
    load_monai_ahnet_state(ours, peer.state_dict())
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.no_grad():
        diff = (ours(x) - from_monai_layout(peer(to_monai_layout(x).contiguous()))).abs().max().item()
    assert diff > 1e-3


@pytest.mark.parametrize("mode, levels", [("trilinear", 4), ("trilinear", 3), ("nearest", 2)])
def test_same_output_as_monai_with_the_pyramid_on(mode, levels):
    """With K pyramid levels both compute the same function at an in-plane input of 2^(K+3) (128 for the
    paper's 4): MONAI's windows 8 .. 2^(K+2) then pool its half-resolution map to our grids 2^(K-1) .. 1. The
    port pairs the levels by window size (MONAI's level i is our level K-1-i, in the head's channels too)."""
    torch.manual_seed(0)
    peer = _randomise_bn(monai_nets.AHNet(spatial_dims=3, psp_block_num=levels, upsample_mode=mode)).eval()
    ours = AHNet3d("resnet50", pfn_depth=levels, upsample=mode).eval()
    assert load_monai_ahnet_state(ours, peer.state_dict()) == []
    match_monai_ops(ours)
    size = monai_pyramid_size(levels)
    x = torch.randn(1, 1, 32, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = from_monai_layout(peer(to_monai_layout(x).contiguous()))
        got = ours(x)
    scale = want.abs().max().item()
    print(mode, levels, size, "max |ours - monai|", (got - want).abs().max().item(), "max |monai|", scale)
    assert torch.allclose(got, want, atol=1e-5 * max(1.0, scale), rtol=1e-5), (got - want).abs().max().item()
    # the pyramid matters to the output: the same weights with the levels paired by index differ
    assert peer.psp.project_modules[0].weight.shape == (1, ours.dense4.out_channels, 1, 1, 1)
    swapped = dict(peer.state_dict())
    for i in range(levels):
        for t in ("weight", "bias"):
            swapped[f"psp.project_modules.{i}.{t}"] = peer.state_dict()[f"psp.project_modules.{levels - 1 - i}.{t}"]
    load_monai_ahnet_state(ours, swapped)
    with torch.no_grad():
        assert (ours(x) - want).abs().max().item() > 1e-3 * max(1.0, scale)


def test_key_map_and_errors():
    assert monai_key_to_ours("layer3.0.downsample.2.weight") == "encoder.layer3.0.downsample.1.weight"
    assert monai_key_to_ours("dense4.denselayer1.bn3.bias") == "dense4.0.through.0.bias"
    assert monai_key_to_ours("trans1.conv.weight") == "proj.0.2.weight"
    assert monai_key_to_ours("final.up.weight") == "head.1.weight"
    assert monai_key_to_ours("psp.up_modules.0.weight") is None
    # pyramid levels by window: MONAI's window 8 (level 0) is our finest grid, its window 64 our global level
    assert monai_key_to_ours("psp.project_modules.0.weight", 4) == "pyramid.project.3.weight"
    assert monai_key_to_ours("psp.project_modules.3.bias", 4) == "pyramid.project.0.bias"
    assert monai_key_to_ours("psp.project_modules.1.bias", 2) == "pyramid.project.0.bias"
    assert monai_pyramid_size(4) == 128 and monai_pyramid_size(2) == 32
    with pytest.raises(MonaiPortError, match="no such level"):
        monai_key_to_ours("psp.project_modules.2.weight", 2)
    with pytest.raises(MonaiPortError, match="not a MONAI AHNet key"):
        monai_key_to_ours("fc.weight")
    peer = monai_nets.AHNet(spatial_dims=3, psp_block_num=2, upsample_mode="transpose")
    ours = AHNet3d("resnet50", pfn_depth=2, upsample="transpose")
    with pytest.raises(MonaiPortError, match="allow_dropped=True"):
        load_monai_ahnet_state(ours, peer.state_dict())
    assert load_monai_ahnet_state(ours, peer.state_dict(), allow_dropped=True) == [
        f"psp.up_modules.{i}.{t}" for i in range(2) for t in ("weight", "bias")]
    with pytest.raises(MonaiPortError, match="does not fit"):
        load_monai_ahnet_state(AHNet3d("resnet50", pfn_depth=0, upsample="transpose"),
                               monai_nets.AHNet(psp_block_num=0, upsample_mode="trilinear").state_dict())
    with pytest.raises(MonaiPortError, match="does not fit"):
        load_monai_ahnet_state(AHNet3d("resnet50", pfn_depth=3, upsample="trilinear"),
                               monai_nets.AHNet(psp_block_num=2, upsample_mode="trilinear").state_dict())
    with pytest.raises(MonaiPortError, match="z_pool='paper'"):
        match_monai_ops(AHNet3d("resnet18", z_pool="none"))


@pytest.mark.parametrize("mode", ["trilinear", "transpose"])
def test_fresh_decoder_weights_have_monais_spread(mode):
    """Both initialise the decoder with normal(0, sqrt(2 / (in-plane taps x out))): every decoder weight that the
    port maps has MONAI's standard deviation, up to sampling noise (the encoders differ: ours is ResNet-initialised,
    and the transfer overwrites it). The output head is the one deviation (ours starts small, HEAD_INIT_STD)."""
    torch.manual_seed(0)
    peer = monai_nets.AHNet(spatial_dims=3, psp_block_num=4, upsample_mode=mode)
    ours = dict(AHNet3d("resnet50", pfn_depth=4, upsample=mode).named_parameters())
    checked, skipped_head = 0, False
    for key, w in peer.named_parameters():
        mine = monai_key_to_ours(key, 4)
        if mine is None or mine.startswith("encoder.") or not key.endswith("weight") or w.dim() != 5:
            continue
        if mine == "head.0.2.weight":
            skipped_head = True
            continue
        n = w.numel()
        ratio = ours[mine].std().item() / w.std().item()
        assert abs(ratio - 1) < 7 / math.sqrt(2 * n), (key, mine, ratio)
        checked += 1
    assert skipped_head and checked == 5 + 60 + 4 + (5 if mode == "transpose" else 0)
