"""BatchNorm folded into the conv before it (ahnet.nets.fold): the same function in evaluation mode."""
import pytest
import torch

from ahnet.nets import AHNet3d, UNet3d
from ahnet.nets.candidate_net import CandidateNet
from ahnet.nets.fold import fold_batchnorm


def _randomise_bn(model):
    """Running statistics and affine parameters away from the identity (negative scales too)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("make, shape, folds", [
    (lambda: AHNet3d("resnet18", pfn_depth=2, growth=4, layers_per_block=1), (1, 1, 32, 64, 64), 13),
    (lambda: AHNet3d("resnet50", pfn_depth=0, growth=4, layers_per_block=1, z_pool="spacing",
                     spacing=(2.5, 0.7, 0.7)), (1, 1, 16, 64, 64), 47),
    (lambda: UNet3d(base_channels=4, z_pool="spacing", spacing=(2.5, 0.7, 0.7)), (1, 1, 16, 64, 64), 22),
    (lambda: CandidateNet(width=4), (3, 2, 8, 32, 32), 6)])
def test_folded_model_computes_the_same_function(make, shape, folds):
    """Every provable conv -> BN pair folded, counted by hand: ResNet18 with the paper's z-pooling 4 in layer1 and 3
    in each of layer2-4 (the stem, the BN after each z-pool and those shortcuts stay: a max-pool commutes with
    the affine map only for a positive scale, and these scales are partly negative); ResNet50 with the spacing
    schedule 47 (the stem, layer1's shortcut, all but the z-pooled pairs); the U-Net 2 per unit; the second
    stage's 6 blocks. The output equals the unfolded model's in float64, and in float32 it is as close to that
    as the unfolded float32 output is."""
    torch.manual_seed(0)
    model = _randomise_bn(make()).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref64, ref32 = model.double()(x.double()), model.float()(x)
        assert fold_batchnorm(model.double()) == folds
        got64, got32 = model(x.double()), model.float()(x)
    torch.testing.assert_close(got64, ref64, rtol=1e-10, atol=1e-10)
    plain_err, folded_err = ((r.double() - ref64).abs().max().item() for r in (ref32, got32))
    assert folded_err <= 2 * plain_err + 1e-7 * ref64.abs().max().item()      # as close to float64 as unfolded


def test_fold_is_for_eval_mode_only():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(CandidateNet(width=2).train())
