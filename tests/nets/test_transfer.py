"""The 2D -> 3D transfer rule (ahnet.nets.transfer): the stem mapping, exactness at every stage, refusals."""
import pytest
import torch

from ahnet.nets import MCGCN, AHNet3d
from ahnet.nets.resnet import ResNet2d
from ahnet.nets.transfer import (TransferError, convert_state, fresh_encoder, load_source, slice_stacks,
                                 source_from_model, transfer_2d_to_3d, transfer_and_verify, verify_transfer)


def _trained_like_mcgcn(encoder="resnet18", in_slices=3, seed=0):
    """An MC-GCN whose encoder BN layers carry non-trivial statistics and affine weights."""
    model = MCGCN(encoder, in_slices=in_slices)
    enc = fresh_encoder(int(encoder[6:]), seed)
    model.encoder.load_state_dict(enc.state_dict())
    return model


def _save_mcgcn(path, model):
    torch.save({"model": model.state_dict(), "model_name": "mcgcn", "model_kwargs": model.config, "epoch": 3}, path)


def test_stem_mapping_by_hand():
    w2 = torch.arange(2 * 3 * 7 * 7, dtype=torch.float32).reshape(2, 3, 7, 7)
    w3 = convert_state({"conv1.weight": w2, "layer1.0.conv1.weight": w2})
    assert w3["conv1.weight"].shape == (2, 1, 3, 7, 7)
    for dz in range(3):   # tap dz along z reads slice z - 1 + dz, the 2D stem's input channel dz
        assert torch.equal(w3["conv1.weight"][:, 0, dz], w2[:, dz])
    assert w3["layer1.0.conv1.weight"].shape == (2, 3, 1, 7, 7)


def test_slice_stacks():
    vol = torch.arange(4.0)[:, None, None].expand(4, 2, 2)
    st = slice_stacks(vol)
    assert st.shape == (4, 3, 2, 2)
    assert st[0, :, 0, 0].tolist() == [0, 0, 1] and st[2, :, 0, 0].tolist() == [1, 2, 3]
    assert st[3, :, 0, 0].tolist() == [2, 3, 0]


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_transferred_encoder_is_exact_at_every_stage(depth):
    source = source_from_model(fresh_encoder(depth, seed=1))
    rows = verify_transfer(source, size=(4, 64, 64))
    assert len(rows) == 7 and all(r.ok for r in rows), rows
    assert max(r.err_float32 for r in rows) < 1e-4
    assert max(r.err_float64 for r in rows) < 1e-9
    assert min(r.max_abs_value for r in rows) > 0.5     # the features are not trivially zero


def test_verification_can_fail():
    source = source_from_model(fresh_encoder(18, seed=1))
    state3d = convert_state(source.state)
    state3d["layer3.1.bn2.running_mean"] += 0.5        # what dropping or corrupting BN statistics does
    rows = verify_transfer(source, state3d, size=(3, 64, 64))
    assert [r.stage for r in rows if not r.ok] == ["layer3", "layer4"]


def test_transfer_from_mcgcn_copies_bn_statistics():
    model2d = _trained_like_mcgcn("resnet18")
    model3d = transfer_2d_to_3d(model2d, pfn_depth=2)
    assert isinstance(model3d, AHNet3d) and model3d.config["encoder"] == "resnet18"
    s2, s3 = model2d.encoder.state_dict(), model3d.encoder.state_dict()
    for key in ["bn1.running_mean", "bn1.running_var", "layer2.0.downsample.1.running_var", "layer4.1.bn2.weight"]:
        assert torch.equal(s2[key], s3[key])
    assert not torch.equal(s3["bn1.running_var"], torch.ones_like(s3["bn1.running_var"]))


def test_transferred_ahnet_without_z_pooling_matches_2d_per_slice():
    """End to end: the AHNet3d encoder itself (z_pool='none') reproduces the 2D features slice by slice."""
    model2d = _trained_like_mcgcn("resnet18").eval()
    model3d = transfer_2d_to_3d(model2d, z_pool="none").eval()
    vol = torch.randn(3, 64, 64)
    with torch.no_grad():
        f2 = model2d.encoder(slice_stacks(vol))[-1]
        f3 = model3d.encoder(vol[None, None])[-1][0].transpose(0, 1)
    assert (f2 - f3).abs().max() < 1e-4


def test_checkpoint_and_torchvision_sources(tmp_path):
    model2d = _trained_like_mcgcn("resnet18")
    _save_mcgcn(tmp_path / "best.pt", model2d)
    src = load_source(tmp_path / "best.pt")
    assert src.depth == 18 and src.in_slices == 3 and src.meta["epoch"] == 3
    tv = dict(model2d.encoder.state_dict())
    tv["fc.weight"], tv["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(tv, tmp_path / "resnet18.pth")
    src_tv = load_source(tmp_path / "resnet18.pth")
    assert src_tv.depth == 18 and set(src_tv.state) == set(src.state)


def test_mismatches_fail_with_one_sentence(tmp_path):
    _save_mcgcn(tmp_path / "r34.pt", MCGCN("resnet34"))
    with pytest.raises(TransferError, match="ResNet34 encoder but the 3D network asks for ResNet50"):
        transfer_2d_to_3d(tmp_path / "r34.pt", encoder="resnet50")
    _save_mcgcn(tmp_path / "n5.pt", MCGCN("resnet18", in_slices=5))
    with pytest.raises(TransferError, match="5 input slices"):
        transfer_2d_to_3d(tmp_path / "n5.pt")
    with pytest.raises(TransferError, match="1 input channel"):
        transfer_2d_to_3d(ResNet2d(18), in_channels=2)
    torch.save({"model": AHNet3d("resnet18").state_dict(), "model_name": "ahnet"}, tmp_path / "a3d.pt")
    with pytest.raises(TransferError, match="'ahnet' model"):
        load_source(tmp_path / "a3d.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "r34.pt").read_bytes()[:1000])
    with pytest.raises(TransferError, match="not a readable checkpoint"):
        load_source(tmp_path / "trunc.pt")


def test_transfer_and_verify_checks_its_size():
    model, rows = transfer_and_verify(fresh_encoder(18, seed=2), (3, 32, 32), pfn_depth=0)
    assert isinstance(model, AHNet3d) and len(rows) == 7 and all(r.ok for r in rows)
    with pytest.raises(TransferError, match="three positive sizes"):
        transfer_and_verify(fresh_encoder(18, seed=2), (0, 0, 0))
