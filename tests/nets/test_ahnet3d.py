import pytest
import torch

from ahnet.nets import AHNet3d
from ahnet.nets.blocks import count_parameters


def test_paper_configuration_has_the_authors_parameter_count():
    # Authors' original (ResNet50, trilinear, 4 pyramid levels, 1 output): 27,085,500 (paper_notes/architecture.md).
    model = AHNet3d("resnet50", pfn_depth=4, upsample="trilinear")
    assert model.parameter_counts() == {"encoder": 23_508_032, "decoder": 3_577_468, "total": 27_085_500}
    assert count_parameters(AHNet3d("resnet50", pfn_depth=0)) == 27_084_956
    # MONAI's transpose default is 38,133,768; our adaptive pyramid interpolates instead of its 4 transposed
    # convs with window-sized kernels (8^2 + 16^2 + 32^2 + 64^2 weights + 4 biases = 5,444).
    assert count_parameters(AHNet3d("resnet50", pfn_depth=4, upsample="transpose")) == 38_133_768 - 5_444


@pytest.mark.parametrize("encoder", ["resnet18", "resnet34"])
@pytest.mark.parametrize("pfn_depth", [0, 1, 4])
@pytest.mark.parametrize("upsample", ["trilinear", "transpose", "nearest"])
def test_shapes_many_configurations(encoder, pfn_depth, upsample):
    model = AHNet3d(encoder, pfn_depth=pfn_depth, upsample=upsample, z_pool="spacing", spacing=(2.5, 0.7, 0.7),
                    growth=4, layers_per_block=1).eval()
    assert model.input_multiple == (16, 32, 32)
    with torch.no_grad():
        y = model(torch.randn(1, 1, 16, 64, 32))
    assert y.shape == (1, 1, 16, 64, 32)


@pytest.mark.parametrize("z_pool, shape", [("paper", (32, 32, 64)), ("none", (3, 32, 32)),
                                           ((False, False, True, True, False), (4, 64, 32))])
def test_z_pool_schedules(z_pool, shape):
    model = AHNet3d("resnet18", z_pool=z_pool, growth=4, layers_per_block=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, *shape)).shape == (1, 1) + shape


def test_resnet50_paper_forward_and_channels():
    model = AHNet3d("resnet50", in_channels=2, out_channels=3).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 2, 32, 32, 32))
    assert y.shape == (1, 3, 32, 32, 32)


def test_wrong_size_is_a_clear_value_error():
    model = AHNet3d("resnet18")
    with pytest.raises(ValueError, match=r"AHNet3d needs spatial sizes divisible by \(32, 32, 32\).*\(1, 1, 16, 64, 64\)"):
        model(torch.randn(1, 1, 16, 64, 64))
    with pytest.raises(ValueError, match="1 input channel"):
        model(torch.randn(1, 3, 32, 64, 64))
    with pytest.raises(ValueError, match="5D tensor"):
        model(torch.randn(1, 32, 64, 64))


@pytest.mark.parametrize("kwargs, match", [({"encoder": "resnet101"}, "encoder"), ({"upsample": "cubic"}, "upsample"),
                                           ({"pfn_depth": -1}, "pfn_depth"), ({"z_pool": "spacing"}, "spacing")])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AHNet3d(**kwargs)


def test_pyramid_depth_adds_one_projection_per_level():
    base = AHNet3d("resnet18", pfn_depth=0)
    c_top = base.dense4.out_channels
    for k in (1, 2, 4):
        model = AHNet3d("resnet18", pfn_depth=k)
        # k projections (c_top weights + bias) + k more head input channels (BN 2 + conv 9 per channel)
        assert count_parameters(model) - count_parameters(base) == k * (c_top + 1) + k * (2 + 9)


def test_eval_uses_running_statistics():
    model = AHNet3d("resnet18", growth=4, layers_per_block=1, z_pool="spacing", spacing=(2.5, .7, .7)).eval()
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        both = model(x)
        first = model(x[:1])
    # no batch statistics in eval mode: equal up to float rounding (fresh BN statistics do not normalise, and
    # the authors' decoder initialisation lets eval-mode outputs of a fresh net reach ~1e3)
    scale = both.abs().max().item()
    assert torch.allclose(both[:1], first, rtol=0, atol=1e-5 * max(1.0, scale))


def test_torch_export_in_eval_mode():
    model = AHNet3d("resnet18", pfn_depth=4, growth=4, layers_per_block=1, z_pool="spacing",
                    spacing=(2.5, .7, .7)).eval()
    x = torch.randn(1, 1, 16, 64, 64)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), model(x), atol=1e-5)
