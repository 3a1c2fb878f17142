"""python -m ahnet.export: what it writes, that it checks what it writes, and that bad input is one line.

TorchScript tests run without the serve extra; those that need onnx, onnxscript or onnxruntime skip with the
reason (and a test runs this file with those modules hidden to hold that).
"""
import copy
import os
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

from .conftest import FOLDS, PATCH, ROOT, needs_serving

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
        bad = copy.deepcopy(model).eval()               # as loaded for inference (BatchNorm folded), weights moved
        with torch.no_grad():
            for v in bad.parameters():
                v.add_(1e-3)
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



def _save_run(run, name, kw, patch, seed=0):
    """A run folder holding checkpoints/best.pt of an untrained ``name`` model with ``kw`` and patch_size ``patch``
    (the window it is exported and served at)."""
    from ahnet.checkpoint import save_checkpoint
    from ahnet.nets import build_model
    torch.manual_seed(seed)
    m = build_model(name, **kw)
    save_checkpoint({"model": m.state_dict(), "model_name": name, "model_kwargs": m.config,
                     "config": {"patch_size": list(patch)}}, run / "checkpoints" / "best.pt")
    return run


TINY_AHNET = dict(encoder="resnet18", growth=4, layers_per_block=1)
# Every volume model of the registry and every option a training accepts that shapes the exported graph: each
# pyramid depth 0-4 once, each z-pooling schedule (none: the issue's frozen depth; paper; spacing; 5 flags) and
# each upsampling mode at least once for AH-Net, the 3D U-Net without z pooling. Windows: the smallest the
# multiple allows (depth 2 slices without z pooling), so that each case is the ONNX export's own time.
EVERY_OPTION = [
    pytest.param("ahnet", dict(TINY_AHNET, pfn_depth=0, z_pool="none", upsample="transpose"), (2, 64, 64),
                 id="ahnet-pfn0-znone-transpose"),
    pytest.param("ahnet", dict(TINY_AHNET, pfn_depth=1, z_pool="paper", upsample="nearest"), (32, 32, 32),
                 id="ahnet-pfn1-zpaper-nearest"),
    pytest.param("ahnet", dict(TINY_AHNET, pfn_depth=2, z_pool=[True, False, True, False, False],
                               upsample="trilinear"), (4, 64, 64), id="ahnet-pfn2-zflags-trilinear"),
    pytest.param("ahnet", dict(TINY_AHNET, pfn_depth=3, z_pool="spacing", spacing=[2.5, 0.8, 0.8],
                               upsample="nearest"), (16, 64, 64), id="ahnet-pfn3-zspacing-nearest"),
    pytest.param("ahnet", dict(TINY_AHNET, pfn_depth=4, z_pool="none", upsample="trilinear"), (2, 64, 64),
                 id="ahnet-pfn4-znone-trilinear"),
    pytest.param("unet3d", dict(base_channels=4, max_channels=16, z_pool="none"), (2, 64, 64), id="unet3d-znone"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, kw, patch", EVERY_OPTION)
def test_every_model_and_option_exports_with_every_axis_free(name, kw, patch, tmp_path, capsys):
    """python -m ahnet.export in both formats ends well (exit 0, nothing on stderr); the ONNX graph keeps batch, D,
    H and W symbolic; and the file answers at a third window size, which the verification did not use, as
    PyTorch does."""
    needs_serving("onnx", "onnxscript", "onnxruntime")
    import onnx
    run = _save_run(tmp_path / "run", name, kw, patch)
    out = tmp_path / "m"
    assert export_cmd.main(["--runs", str(run), "--out", str(out)]) == 0
    err = capsys.readouterr()
    assert err.err == "" and "fold0 onnx: max |diff|" in err.out and "fold0 torchscript: max |diff|" in err.out
    meta = store.read_model_json(out)
    model = load_member(run / "checkpoints" / "best.pt").model
    assert meta["window"] == list(patch) and meta["input_multiple"] == list(model.input_multiple)
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(out / "fold0" / "model.onnx")).graph.input[0]
            .type.tensor_type.shape.dim]
    assert dims[1] == 1 and all(isinstance(d, str) for d in (dims[0], *dims[2:])), dims    # no axis frozen
    x = torch.rand((1, 1) + tuple(p + 2 * m for p, m in zip(patch, model.input_multiple)))
    with torch.no_grad():
        ref = torch.sigmoid(model(x)).numpy()
    for fmt, runner in (("onnx", store.onnx_runner), ("torchscript", store.torchscript_runner)):
        got = 1 / (1 + np.exp(-runner(out / meta["folds"][0]["files"][fmt])(x.numpy()).astype(np.float64)))
        assert np.abs(got - ref).max() <= 1e-4, fmt


def test_a_file_that_fails_to_run_is_a_failed_verification(cv, tmp_path, monkeypatch, capsys):
    """The issue's ending (ONNX Runtime refusing a verification size) is one line and exit 1, whatever raises."""
    real = store.torchscript_runner

    def frozen(path, device=None):
        run = real(path, device)

        def refuse(x):
            if x.shape[0] == 1:                           # the second verification size
                raise RuntimeError("Got invalid dimensions for input: image for the following indices\n index: 2")
            return run(x)
        return refuse
    monkeypatch.setattr(store, "torchscript_runner", frozen)
    out = tmp_path / "m"
    rc = export_cmd.main(["--runs", str(cv.parent / "cv-fold0"), "--out", str(out), "--formats", "torchscript"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert err.startswith("ahnet.export: error: fold0 torchscript: the exported file fails on an input of shape "
                          "(1, 1, 32, 96, 96) that PyTorch runs (RuntimeError: Got invalid dimensions"), err
    assert not out.exists() and not list(tmp_path.glob(".m.tmp-*"))


def test_an_onnx_export_failure_is_one_line_naming_the_options(tmp_path, monkeypatch, capsys):
    def fails(*a, **k):
        raise RuntimeError("Constraints violated (d)!\n  - You marked d as dynamic")
    monkeypatch.setattr(export, "export_onnx", fails)
    monkeypatch.setattr(export, "ONNX_MODULES", ())      # runs without the serve extra too
    run = _save_run(tmp_path / "run", "ahnet", dict(TINY_AHNET, pfn_depth=1, z_pool="none"), (2, 64, 64))
    out = tmp_path / "m"
    assert export_cmd.main(["--runs", str(run), "--out", str(out), "--formats", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err == ("ahnet.export: error: fold0 onnx: torch.onnx.export cannot carry ahnet with pfn_depth 1, upsample "
                   "trilinear, z_pool [False, False, False, False, False] (RuntimeError: Constraints violated (d)!); "
                   "export --formats torchscript\n"), err
    assert not out.exists() and not list(tmp_path.glob(".m.tmp-*"))


@pytest.mark.parametrize("hidden", ["onnx", "onnxscript", "onnxruntime"])
def test_onnx_without_the_serve_extra_is_one_line(cv, tmp_path, monkeypatch, capsys, hidden):
    monkeypatch.setitem(sys.modules, hidden, None)        # what importlib finds when the module is not installed
    out = tmp_path / "m"
    assert export_cmd.main(["--runs", str(cv.parent / "cv-fold0"), "--out", str(out), "--formats", "onnx"]) == 2
    assert capsys.readouterr().err == (f"ahnet.export: error: --formats onnx needs the serve extra ({hidden} "
                                       f"missing): pip install -e '.[serve]', or export --formats torchscript\n")
    assert not out.exists()


HIDE_SERVING = ("import sys, pytest\n"
                "for m in ('pytriton', 'tritonclient', 'onnx', 'onnxscript', 'onnxruntime'):\n"
                "    sys.modules[m] = None\n"
                "sys.exit(pytest.main(sys.argv[1:]))\n")


def test_this_file_without_the_serve_extra_skips_what_needs_it(tmp_path):
    """pytest on this file with the serving modules hidden: the ONNX cases skip with their reason, TorchScript
    and option tests pass, no error (a selection that needs no 5-fold export, to stay short)."""
    p = subprocess.run([sys.executable, "-c", HIDE_SERVING, "-q", "-p", "no:cacheprovider", "-rs",
                        "tests/serve/test_export.py", "-k", "every_model or fails_to_run or bad_options or "
                        "onnx_export_failure"], capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr
    tail = p.stdout.strip().splitlines()[-1]
    assert f"{len(EVERY_OPTION)} skipped" in tail and "5 passed" in tail and "error" not in tail, tail
    assert "needs onnx, from the serve extra" in p.stdout
