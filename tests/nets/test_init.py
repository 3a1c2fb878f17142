"""Weight initialisation of the decoders: AH-Net's 3D decoder follows the authors' (and MONAI's) rule, the
encoder is left alone, the 3D U-Net and the MC-GCN decoder start from He normal. The expected standard
deviations are computed here from the weight shapes, not from the package's helpers."""
import math

import pytest
import torch

from ahnet.nets import MCGCN, AHNet3d, ResNet2d, UNet3d
from ahnet.nets.blocks import HEAD_INIT_STD, init_ahnet_decoder
from ahnet.nets.resnet3d import ResNet3dEncoder


def _authors_std(weight: torch.Tensor, transposed: bool) -> float:
    """sqrt(2 / (k0 * k1 * out)) with the authors' (X, Y, Z) kernel: k0 * k1 = our kh * kw (the last two axes).
    Conv3d weights are (out, in, kd, kh, kw); ConvTranspose3d weights (in, out, kd, kh, kw)."""
    out = weight.shape[1] if transposed else weight.shape[0]
    return math.sqrt(2.0 / (weight.shape[-1] * weight.shape[-2] * out))


def _close(std: float, want: float, n: int) -> bool:
    # a sample std of n normal draws is within ~1/sqrt(2n) of the true one (relative); 5 of those
    return abs(std / want - 1) < 5 / math.sqrt(2 * n)


@pytest.fixture(scope="module")
def paper_net():
    torch.manual_seed(0)
    return AHNet3d("resnet50", pfn_depth=4, upsample="trilinear")


@pytest.mark.parametrize("name, want", [
    ("dense0.0.reduce.2", math.sqrt(2 / 80)),       # 1x1x1 to 4 g = 80: 0.158 (PyTorch's default gave 0.018)
    ("up0.0.2", math.sqrt(2 / 1024)),               # 1x1x1 to 1024: 0.044 (default 0.013)
    ("dense0.0.inplane.2", math.sqrt(2 / (9 * 20))),
    ("dense2.1.through.2", math.sqrt(2 / 20)),      # (3, 1, 1): one in-plane tap, so not sqrt(2 / 60)
    ("dense4.2.fuse.2", math.sqrt(2 / 20)),
    ("pyramid.project.3", math.sqrt(2.0)),          # 1x1x1 to one channel
])
def test_decoder_convs_follow_the_authors_rule(paper_net, name, want):
    w = dict(paper_net.named_modules())[name].weight.detach()
    assert _authors_std(w, transposed=False) == pytest.approx(want)
    assert _close(w.std().item(), want, w.numel()), (name, w.std().item(), want)
    assert abs(w.mean().item()) < 5 * want / math.sqrt(w.numel())


def test_every_decoder_conv_and_bn_of_a_transpose_net():
    torch.manual_seed(1)
    model = AHNet3d("resnet18", pfn_depth=2, upsample="transpose", z_pool=(True, False, True, False, True))
    convs = 0
    for name, m in model.named_modules():
        if name.startswith("encoder"):
            continue
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            want = _authors_std(m.weight, isinstance(m, torch.nn.ConvTranspose3d))
            if name == "head.0.2":                     # the one deviation: logits start near 0
                want = HEAD_INIT_STD
            assert _close(m.weight.std().item(), want, m.weight.numel()), (name, m.weight.std().item(), want)
            convs += 1
        if isinstance(m, torch.nn.BatchNorm3d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
    # 5 projections + 5 dense blocks x 3 AC layers x 4 convs + 2 pyramid + head conv + 5 transposed x2 (proj has none)
    assert convs == 5 + 60 + 2 + 1 + 5
    # a (1, 2, 2) transposed conv (a level without z pooling) counts 4 in-plane taps, as a (2, 2, 2) one does
    assert model.up1[1].kernel_size == (1, 2, 2) and model.up2[1].kernel_size == (2, 2, 2)


def test_encoder_untouched_and_deterministic():
    torch.manual_seed(3)
    model = AHNet3d("resnet18", pfn_depth=1)
    torch.manual_seed(3)
    alone = ResNet3dEncoder(18, 1)          # the encoder is built first, before any decoder draw
    for (k, a), (_, b) in zip(model.encoder.state_dict().items(), alone.state_dict().items()):
        assert torch.equal(a, b), k
    built = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    again = AHNet3d("resnet18", pfn_depth=1)                   # same seed, same weights
    assert all(torch.equal(v, built[k]) for k, v in again.state_dict().items())
    init_ahnet_decoder(model.decoder_modules())                # new draws: the decoder changes, the encoder not
    after = model.state_dict()
    assert all(torch.equal(built[k], v) for k, v in after.items() if k.startswith("encoder."))
    assert not torch.equal(built["head.0.2.weight"], after["head.0.2.weight"])


def _he_std(fan_in: int, relu_input: bool = True) -> float:
    return (math.sqrt(2.0) if relu_input else 1.0) / math.sqrt(fan_in)


def test_unet_he_normal():
    torch.manual_seed(0)
    model = UNet3d(base_channels=16, max_channels=64)
    conv = model.down[2][3]                          # 3x3x3, 64 -> 64
    assert _close(conv.weight.std().item(), _he_std(64 * 27), conv.weight.numel())
    up = model.ups[1]                                # transposed (2, 2, 2) stride 2, 64 -> 32: reads 64 inputs
    assert up.weight.shape[:2] == (64, 32)
    assert _close(up.weight.std().item(), _he_std(64), up.weight.numel())
    assert _close(model.out.weight.std().item(), _he_std(16), 16 * 4) and not model.out.bias.any()


def test_mcgcn_decoder_he_normal_and_encoder_untouched():
    torch.manual_seed(0)
    model = MCGCN("resnet18", out_channels=8)
    left = model.gcn[0].left                         # layer4 (512) -> 8 with (7, 1), then 8 -> 8 with (1, 7)
    assert _close(left[0].weight.std().item(), _he_std(512 * 7), left[0].weight.numel())
    assert _close(left[1].weight.std().item(), _he_std(8 * 7, relu_input=False), left[1].weight.numel())
    body = model.refine_topdown[2].body
    for conv in (body[2], body[5]):
        assert _close(conv.weight.std().item(), _he_std(8 * 9), conv.weight.numel())
    assert not any(m.bias.any() for m in model.gcn.modules() if isinstance(m, torch.nn.Conv2d))
    torch.manual_seed(0)
    alone = ResNet2d(18, 3)
    assert all(torch.equal(v, alone.state_dict()[k]) for k, v in model.encoder.state_dict().items())


def test_head_starts_small_so_logits_start_near_zero(paper_net):
    """The head deviates from the authors' fan-out rule (0.47 for a one-channel (1, 3, 3) conv): its std is
    HEAD_INIT_STD, so a fresh network's logits are small instead of reaching tens."""
    w = paper_net.head[0][2].weight.detach()
    assert _close(w.std().item(), HEAD_INIT_STD, w.numel())
    torch.manual_seed(0)
    net = AHNet3d("resnet18", pfn_depth=2, z_pool="none").train()
    with torch.no_grad():
        logits = net(torch.rand(2, 1, 2, 64, 64))
    assert logits.abs().max() < 2.0
