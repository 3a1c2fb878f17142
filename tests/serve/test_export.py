"""python -m ahnet.export: what it writes, that it checks what it writes, and that bad input is one line."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from ahnet.commands import export as export_cmd
from ahnet.serve import export
from ahnet.data.preprocess import HU_MAX, HU_MIN
from ahnet.infer import load_ensemble, load_member
from ahnet.serve import store

from .conftest import FOLDS, PATCH, ROOT

pytestmark = pytest.mark.serve


def test_model_json_and_torchscript_files(exported, cv):
    meta = store.read_model_json(exported)
    assert meta["name"] == "cv" and len(meta["folds"]) == FOLDS
    model = load_member(cv.parent / "cv-fold3" / "checkpoints" / "best.pt").model
    assert meta["input_multiple"] == list(model.input_multiple) == [16, 32, 32]
    assert meta["window"] == PATCH and meta["window_source"] == "training patch_size"
    assert meta["intensity"]["clip_hu"] == [HU_MIN, HU_MAX] and meta["intensity"]["scale_to"] == [0.0, 1.0]
    ck = torch.load(cv.parent / "cv-fold3" / "checkpoints" / "best.pt", weights_only=True)
    assert meta["folds"][3]["config_hash"] == store.config_hash(ck["config"])
    assert meta["folds"][3]["checkpoint"].endswith("cv-fold3/checkpoints/best.pt")
    assert all(f["max_abs_diff"]["torchscript"] <= 1e-4 for f in meta["folds"])
    # the file runs at a size the verification did not use, and gives the fold's logits
    x = torch.rand(1, 1, 48, 32, 64)
    run = store.torchscript_runner(exported / meta["folds"][3]["files"]["torchscript"], "cpu")
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(run(x.numpy()) - ref).max() <= 1e-5


def test_a_wrong_export_fails_verification_and_leaves_nothing(cv, tmp_path, monkeypatch, capsys):
    real = export.export_torchscript

    def perturbed(model, example, path):                  # an export that does not reproduce the model
        bad = type(model)(**model.config).eval()
        bad.load_state_dict({k: v + 1e-3 if v.is_floating_point() else v for k, v in model.state_dict().items()})
        real(bad, example, path)
    monkeypatch.setattr(export, "export_torchscript", perturbed)
    out = tmp_path / "m"
    rc = export_cmd.main(["--runs", str(cv.parent / "cv-fold0"), "--out", str(out), "--formats", "torchscript"])
    err = capsys.readouterr()
    assert rc == 1
    assert "[export] fold0 torchscript: max |diff|" in err.out
    assert err.err.startswith("ahnet.export: error: fold0 torchscript: max |diff|") and "exceeds --tol" in err.err
    assert not out.exists() and not list(tmp_path.glob(".m.tmp-*"))


def test_verification_scales_the_logit_tolerance_with_the_logits():
    """Probabilities (what is served) within tol; logits within tol x max(1, max |logit|): float32 rounding."""
    export.check_verified("f", {"probability": 9e-6, "logits": 1.2e-4, "logit_scale": 68.3}, 1e-4)   # measured
    with pytest.raises(export.VerificationError, match=r"f: max \|diff\| 2.000e-04 in logits exceeds --tol 0.0001 x"):
        export.check_verified("f", {"probability": 1e-5, "logits": 2e-4, "logit_scale": 1.0}, 1e-4)
    with pytest.raises(export.VerificationError, match=r"f: max \|diff\| 2.000e-04 in probability exceeds"):
        export.check_verified("f", {"probability": 2e-4, "logits": 1e-3, "logit_scale": 68.3}, 1e-4)


@pytest.mark.parametrize("args, words", [
    (["--formats", "tensorrt"], "--formats tensorrt"),
    (["--opset", "3"], "--opset 3"),
    (["--tol", "0"], "--tol 0"),
])
def test_bad_options_are_one_line(cv, tmp_path, capsys, args, words):
    rc = export_cmd.main(["--runs", str(cv.parent / "cv-fold0"), "--out", str(tmp_path / "m"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("ahnet.export: error: ") and words in err and err.count("\n") == 1


def test_existing_out_2d_models_and_missing_runs_are_refused(cv, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    mc = tmp_path / "mc"
    torch.manual_seed(0)
    from ahnet.checkpoint import save_checkpoint
    from ahnet.nets import build_model
    m = build_model("mcgcn", encoder="resnet18")
    save_checkpoint({"model": m.state_dict(), "model_name": "mcgcn", "model_kwargs": m.config, "config": {}},
                    mc / "checkpoints" / "best.pt")
    cases = [(["--runs", str(cv.parent / "cv-fold0"), "--out", str(tmp_path / "taken")], "exists; pass --force"),
             (["--runs", str(mc), "--out", str(tmp_path / "x")], "export serves 3D models")]
    for args, words in cases:
        assert export_cmd.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("ahnet.export: error: ") and words in err and err.count("\n") == 1, err
    # and through the module entry point
    p = subprocess.run([sys.executable, "-m", "ahnet.export", "--runs", str(tmp_path / "nothing"), "--out",
                        str(tmp_path / "y")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("ahnet.export: error: ") and "not found" in p.stderr and p.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_pyramid_grid_that_windows_do_not_divide_is_refused(tmp_path):
    # pyramid depth 6 pools into a 32 x 32 grid; AH-Net's pyramid sees half the in-plane size, 16 at multiple 32
    run = tmp_path / "deep"
    from ahnet.checkpoint import save_checkpoint
    from ahnet.nets import build_model
    kw = dict(encoder="resnet18", growth=4, layers_per_block=1, pfn_depth=6, z_pool="none")
    m = build_model("ahnet", **kw)
    save_checkpoint({"model": m.state_dict(), "model_name": "ahnet", "model_kwargs": m.config, "config": {}},
                    run / "checkpoints" / "best.pt")
    with pytest.raises(export.ExportError, match="32 x 32 grid"):
        export.export_runs([str(run)], tmp_path / "m", formats=("torchscript",))


def test_save_fold_is_what_predict_loads(cv):
    # the fixture's fold folders resolve as ahnet.train --all-folds siblings, in fold order
    folds = load_ensemble([str(cv)]).members
    assert [f.path.parents[1].name for f in folds] == [f"cv-fold{k}" for k in range(FOLDS)]
    assert all(f.config["fold"] == k and f.config["patch_size"] == PATCH for k, f in enumerate(folds))

