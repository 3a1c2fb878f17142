"""python -m weights_transfer: the command over ahnet.nets.transfer (source choice, table, exit codes)."""
import pytest
import torch

from ahnet.nets import MCGCN, AHNet3d
from ahnet.nets.transfer import fresh_encoder
from weights_transfer.__main__ import main


def _trained_like_mcgcn(encoder="resnet18", seed=0):
    model = MCGCN(encoder)
    model.encoder.load_state_dict(fresh_encoder(int(encoder[6:]), seed).state_dict())
    return model


def _save_mcgcn(path, model):
    torch.save({"model": model.state_dict(), "model_name": "mcgcn", "model_kwargs": model.config, "epoch": 3}, path)


def test_cli_fresh_then_newest_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--check-size", "3", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "freshly initialised" in out and "layer4" in out and "FAIL" not in out
    ck = torch.load(tmp_path / "runs/transfer-fresh/ahnet3d_transferred.pt", weights_only=True)
    assert ck["model_name"] == "ahnet" and ck["transfer"]["ok"]
    model = AHNet3d(**ck["model_kwargs"])
    model.load_state_dict(ck["model"])

    run = tmp_path / "runs/exp-2d/checkpoints"
    run.mkdir(parents=True)
    _save_mcgcn(run / "best.pt", _trained_like_mcgcn("resnet18"))
    assert main(["--check-size", "3", "32", "32", "--pfn-depth", "0"]) == 0
    out = capsys.readouterr().out
    assert "newest 2D checkpoint" in out and "exp-2d" in out
    assert (run / "ahnet3d_transferred.pt").is_file()


def test_cli_mismatch_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _save_mcgcn(tmp_path / "r18.pt", MCGCN("resnet18"))
    assert main(["--source", str(tmp_path / "r18.pt"), "--encoder", "resnet50"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("weights_transfer: error: ") and "ResNet18" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:                      # a usage error now, before the source is read
        main(["--check-size", "0", "0", "0"])
    assert e.value.code == 2
    assert "argument --check-size: expected an integer in [1, 1024], got '0'" in capsys.readouterr().err
