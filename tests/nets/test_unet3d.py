import pytest
import torch

from ahnet.nets import UNet3d, build_model


def test_comparable_size_to_paper_ahnet():
    # 30-32 M with the defaults, against AH-Net's 27 M: the baseline is not handicapped by size.
    assert 29_000_000 < UNet3d().parameter_counts()["total"] < 33_000_000


@pytest.mark.parametrize("z_pool, shape", [("paper", (32, 32, 32)), ("spacing", (16, 64, 32))])
def test_shapes(z_pool, shape):
    model = UNet3d(base_channels=4, max_channels=32, z_pool=z_pool, spacing=(2.5, 0.7, 0.7), out_channels=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, *shape)).shape == (1, 2) + shape


def test_errors_and_build():
    model = build_model("unet3d", base_channels=4, max_channels=16)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 1, 16, 32, 32))
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vnet")
