import pytest
import torch

from ahnet.nets import MCGCN
from ahnet.nets.blocks import count_parameters


@pytest.mark.parametrize("upsample", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize("shape", [(64, 64), (32, 96)])
def test_shapes(upsample, shape):
    model = MCGCN("resnet18", upsample=upsample, out_channels=2).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, *shape)).shape == (2, 2) + shape


def test_paper_size():
    model = MCGCN("resnet50")
    # ResNet50 trunk + the GCN decoder: "about 23.6 M" (reference.md)
    assert count_parameters(model.encoder) == 23_508_032
    assert 23_500_000 < count_parameters(model) < 23_700_000
    assert model.slice_projection is None


def test_n_slice_variant_projects_to_three():
    model = MCGCN("resnet18", in_slices=5).eval()
    assert model.slice_projection is not None
    with torch.no_grad():
        assert model(torch.randn(1, 5, 64, 64)).shape == (1, 1, 64, 64)


def test_errors():
    model = MCGCN("resnet18")
    with pytest.raises(ValueError, match=r"divisible by \(32, 32\)"):
        model(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="3 input channel"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="odd"):
        MCGCN("resnet18", gcn_kernel=4)
    with pytest.raises(ValueError, match="upsample"):
        MCGCN("resnet18", upsample="trilinear")
