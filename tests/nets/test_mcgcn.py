import pytest
import torch

from ahnet.nets import MCGCN
from ahnet.nets.mcgcn import BoundaryRefine
from ahnet.nets.blocks import count_parameters


@pytest.mark.parametrize("upsample", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize("shape", [(64, 64), (32, 96)])
def test_shapes(upsample, shape):
    model = MCGCN("resnet18", upsample=upsample, out_channels=2).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, *shape)).shape == (2, 2) + shape


def test_paper_size():
    model = MCGCN("resnet50")
    # ResNet50 trunk + the GCN decoder ("about 23.6 M"): 5 GCN modules to 1 class, each 2 x (cin * 7 + 1) +
    # 2 x (7 + 1) weights and biases over cin = 2048, 1024, 512, 64, 64; 10 refinement blocks of 2 BN (2 each),
    # a bias-free 3x3 conv (9) and a 3x3 conv with bias (10). paper_notes/architecture.md compares the authors'.
    assert count_parameters(model.encoder) == 23_508_032
    gcn = sum(14 * cin + 18 for cin in (2048, 1024, 512, 64, 64))
    assert count_parameters(model.gcn) == gcn == 52_058
    assert count_parameters(model.refine_lateral) + count_parameters(model.refine_topdown) == 10 * 23
    assert count_parameters(model) == 23_508_032 + 52_058 + 230 == 23_560_320
    assert model.slice_projection is None


def test_refinement_eval_mode_computes_what_training_did():
    """Each use of BatchNorm in a refinement block has its own statistics (the authors share one BN between
    the two uses, whose running statistics then blend two distributions): once the running statistics have
    settled, eval mode gives the training-mode output."""
    torch.manual_seed(0)
    block = BoundaryRefine(8)

    def data():
        return 3.0 * torch.randn(16, 8, 32, 32) + 2.0     # like a GCN output: neither zero-mean nor unit-variance
    with torch.no_grad():
        for _ in range(100):
            block(data())
        x = data()
        train = block(x)
        block.eval()
        evaluated = block(x)
    assert (evaluated - train).abs().max() < 0.05 * (train - x).abs().max()


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
