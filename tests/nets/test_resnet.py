import pytest
import torch

from ahnet.nets.blocks import count_parameters
from ahnet.nets.resnet import ResNet2d, load_torchvision_weights, parse_encoder


@pytest.mark.parametrize("depth, params", [(18, 11_176_512), (34, 21_284_672), (50, 23_508_032)])
def test_trunk_parameters_match_torchvision(depth, params):
    # torchvision resnet18/34/50 totals 11,689,512 / 21,797,672 / 25,557,032 minus the 1000-class fc layer.
    assert count_parameters(ResNet2d(depth)) == params


def test_torchvision_key_layout():
    keys = set(ResNet2d(50).state_dict())
    for k in ["conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight",
              "layer4.2.conv3.weight", "layer4.2.bn3.num_batches_tracked"]:
        assert k in keys
    # 318 entries = torchvision's 320 less fc.weight and fc.bias
    assert len(keys) == 318
    assert "layer1.0.downsample.0.weight" not in set(ResNet2d(18).state_dict())


def test_stage_shapes():
    feats = ResNet2d(18).eval()(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 32, 48), (2, 64, 16, 24), (2, 64, 16, 24), (2, 128, 8, 12),
                                               (2, 256, 4, 6), (2, 512, 2, 3)]


def test_parse_encoder():
    assert parse_encoder("resnet34") == 34 and parse_encoder(50) == 50
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50"):
        parse_encoder("resnet101")


def test_load_torchvision_file(tmp_path):
    src = ResNet2d(18)
    state = dict(src.state_dict())
    state["fc.weight"] = torch.zeros(1000, 512)
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    dst = ResNet2d(18)
    load_torchvision_weights(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_wrong_file_lists_keys(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(ResNet2d(34).state_dict(), path)
    with pytest.raises(ValueError, match=r"ResNet50.*missing keys: .*conv3.*unexpected keys"):
        load_torchvision_weights(ResNet2d(50), path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable"):
        load_torchvision_weights(ResNet2d(18), garbage)
    with pytest.raises(FileNotFoundError):
        load_torchvision_weights(ResNet2d(18), tmp_path / "absent.pth")
