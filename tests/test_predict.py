"""python -m ahnet.predict with a tiny AH-Net saved in the contracts' checkpoint format.

Every probability map is compared with a direct ahnet.infer call; geometry is read back with SimpleITK.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from ahnet import paths
from ahnet.commands import predict as pr
from ahnet.data import io
from ahnet.data.preprocess import clip_and_scale
from ahnet.infer import load_member, slicewise_predict, sliding_window_predict
from ahnet.nets import build_model

sitk = pytest.importorskip("SimpleITK")

SP = (2.5, 0.7, 0.7)                                    # (sz, sy, sx) mm: thick slices
SHAPE = (16, 32, 64)                                    # the tiny net's input multiple is (16, 32, 32)
KW = dict(encoder="resnet18", growth=4, layers_per_block=1, z_pool="spacing", spacing=list(SP))
ROOT = Path(__file__).resolve().parents[1]


def _rotation(axis, deg):
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.deg2rad(deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


DIRECTION = _rotation((1, 2, 3), 25.0) @ np.diag([1.0, -1.0, 1.0])     # oblique and improper
ORIGIN = (-120.5, 33.25, 410.0)


def _save_run(folder, seed, name="ahnet", kw=KW, config=None):
    torch.manual_seed(seed)
    m = build_model(name, **kw)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({"model": m.state_dict(), "model_name": name, "model_kwargs": dict(kw),
                "config": config or {"patch_size": [16, 64, 64]}, "epoch": 1, "step": 2, "metrics": {}},
               folder / "checkpoints" / "best.pt")
    return folder


def _hu(seed):
    """A CT-like volume: air, a soft-tissue slab and a bright blob, plus noise, in HU."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(SHAPE)
    hu = np.full(SHAPE, -850.0) + rng.normal(0, 60, SHAPE)
    hu[:, 24:, :] = 30.0
    hu[((z - 8) * SP[0]) ** 2 + ((y - 14) * SP[1]) ** 2 + ((x - 30) * SP[2]) ** 2 <= 36] = 60.0
    return hu.astype(np.float32)


def _direct(run, image_path, **kw):
    """Probabilities (z, y, x) from a direct sliding_window_predict call on the read and scaled image."""
    model = load_member(paths.resolve_checkpoint(run)).model
    x = torch.from_numpy(clip_and_scale(io.read_image(image_path).array))[None, None]
    return sliding_window_predict(model, x, **kw)[0, 0].numpy()


def _sitk_world(img, zyx):
    """World (x, y, z) of continuous voxel (z, y, x) by SimpleITK."""
    return np.array(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in np.asarray(zyx)[::-1]]))


def _read_rows(path):
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    runs = {"a": _save_run(d / "runs" / "a", 1), "b": _save_run(d / "runs" / "b", 2)}
    for k, r in (("fold0", runs["a"]), ("fold1", runs["b"])):
        sib = d / "runs" / f"xv-{k}" / "checkpoints"                       # ahnet.train --all-folds layout
        sib.mkdir(parents=True)
        os.link(r / "checkpoints" / "best.pt", sib / "best.pt")
    img = io.write_image(d / "in" / "case1.nii.gz", io.Volume(_hu(0), SP, ORIGIN, DIRECTION))
    return {"d": d, "runs": runs, "img": img}


@pytest.fixture(scope="module")
def whole(world):
    """Direct whole-volume probabilities of runs a and b (the CLI's default window caps at the volume)."""
    return {k: _direct(world["runs"][k], world["img"], window=SHAPE) for k in ("a", "b")}


@pytest.fixture(scope="module")
def single(world):
    """One CLI run over one NIfTI with 3 sliding 16x32x32 windows; the threshold keeps ~2% of the voxels."""
    p_direct = _direct(world["runs"]["a"], world["img"], window=(16, 32, 32), overlap=0.5, batch_size=2)
    thr = float(np.quantile(p_direct, 0.98))
    out = world["d"] / "out_single"
    rc = pr.main(["--input", str(world["img"]), "--runs", str(world["runs"]["a"]), "--out", str(out),
                  "--window", "16", "32", "32", "--overlap", "0.5", "--sw-batch", "2", "--threshold", repr(thr),
                  "--candidates", "components", "--candidate-threshold", repr(thr)])
    assert rc == 0
    return {"out": out, "p_direct": p_direct, "thr": thr}


def test_outputs_have_the_input_geometry(world, single):
    src = sitk.ReadImage(str(world["img"]))
    for kind, dtype in (("prob", sitk.sitkFloat32), ("mask", sitk.sitkUInt8)):
        img = sitk.ReadImage(str(single["out"] / f"case1_{kind}.nii.gz"))
        assert img.GetPixelID() == dtype and img.GetSize() == src.GetSize() == SHAPE[::-1]
        np.testing.assert_allclose(img.GetSpacing(), SP[::-1], atol=1e-5)
        np.testing.assert_allclose(img.GetOrigin(), ORIGIN, atol=1e-4)
        np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), DIRECTION, atol=1e-5)
        for zyx in [(0, 0, 0), (15, 31, 63), (3, 20, 7), (10.5, 2.25, 40.0)]:
            np.testing.assert_allclose(_sitk_world(img, zyx), _sitk_world(src, zyx), atol=1e-3)
            np.testing.assert_allclose(_sitk_world(img, zyx),
                                       io.voxel_to_world(zyx, SP, ORIGIN, DIRECTION), atol=1e-3)


def test_probability_equals_direct_sliding_window_and_mask_thresholds_it(single):
    prob = io.read_image(single["out"] / "case1_prob.nii.gz").array
    mask = io.read_image(single["out"] / "case1_mask.nii.gz", dtype=None).array
    assert prob.shape == SHAPE and prob.dtype == np.float32 and mask.dtype == np.uint8
    np.testing.assert_allclose(prob, single["p_direct"], rtol=0, atol=1e-6)
    assert prob.std() > 1e-4                                          # a map, not a constant
    np.testing.assert_array_equal(mask, (prob >= single["thr"]).astype(np.uint8))
    assert 0 < mask.sum() < mask.size


def test_candidates_are_component_centres_in_world_mm(world, single):
    prob = io.read_image(single["out"] / "case1_prob.nii.gz").array
    rows = _read_rows(single["out"] / "candidates.csv")
    assert list(rows[0]) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    lab, n = ndimage.label(prob >= single["thr"], structure=np.ones((3, 3, 3)))
    assert n >= 1 and len(rows) == n
    src = sitk.ReadImage(str(world["img"]))
    want = []
    g = np.indices(SHAPE).reshape(3, -1).astype(np.float64)
    for k in range(1, n + 1):
        sel = lab.reshape(-1) == k
        w = prob.reshape(-1)[sel].astype(np.float64)
        centre = (g[:, sel] * w).sum(1) / w.sum()                  # probability-weighted (z, y, x)
        xyz = io.voxel_to_world(centre, SP, ORIGIN, DIRECTION)
        np.testing.assert_allclose(xyz, _sitk_world(src, centre), atol=1e-3)
        want.append((*xyz, float(prob.reshape(-1)[sel].max())))
    got = [(float(r["coordX"]), float(r["coordY"]), float(r["coordZ"]), float(r["probability"])) for r in rows]
    assert {r["seriesuid"] for r in rows} == {"case1"}
    np.testing.assert_allclose(sorted(got), sorted(want), atol=1e-4)


def test_ensemble_of_two_runs_and_a_fold_folder_are_the_mean(world, whole):
    pa, pb = whole["a"], whole["b"]
    assert np.abs(pa - pb).max() > 1e-3                               # two different models
    for name, runs in (("two", [str(world["runs"]["a"]), str(world["runs"]["b"] / "checkpoints" / "best.pt")]),
                       ("siblings", [str(world["d"] / "runs" / "xv")])):     # xv-fold<k> siblings
        out = world["d"] / f"out_{name}"
        assert pr.main(["--input", str(world["img"]), "--runs", *runs, "--out", str(out)]) == 0
        prob = io.read_image(out / "case1_prob.nii.gz").array
        np.testing.assert_allclose(prob, (pa + pb) / 2, rtol=0, atol=1e-6)


def test_tta_is_the_flip_mean(world, whole):
    out = world["d"] / "out_tta"
    assert pr.main(["--input", str(world["img"]), "--runs", str(world["runs"]["a"]), "--out", str(out),
                    "--tta", "--amp", "off", "--device", "cpu"]) == 0
    want = _direct(world["runs"]["a"], world["img"], window=SHAPE, flip_tta=True)
    plain = whole["a"]
    prob = io.read_image(out / "case1_prob.nii.gz").array
    np.testing.assert_allclose(prob, want, rtol=0, atol=1e-6)
    assert np.abs(prob - plain).max() > 1e-4                         # the flips changed something


def test_bf16_channels_last_levers_close_to_float32(world, whole):
    out = world["d"] / "out_bf16"
    assert pr.main(["--input", str(world["img"]), "--runs", str(world["runs"]["a"]), "--out", str(out),
                    "--amp", "bf16", "--channels-last", "--device", "cpu"]) == 0
    prob = io.read_image(out / "case1_prob.nii.gz").array
    np.testing.assert_allclose(prob, whole["a"], rtol=0, atol=3e-2)


def test_folder_and_dataset_json_inputs(world, capsys, monkeypatch):
    d = world["d"] / "folder"
    geo2 = io.Volume(_hu(1), SP, (10.0, -20.0, 5.0), _rotation((0, 0, 1), 90.0))
    io.write_image(d / "c1.nii.gz", io.Volume(_hu(0), SP, ORIGIN, DIRECTION))
    io.write_image(d / "c2.mha", geo2)
    (d / "notes.txt").write_text("not an image")
    out = world["d"] / "out_folder"
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)     # a person at a terminal
    assert pr.main(["--input", str(d), "--runs", str(world["runs"]["a"]), "--out", str(out),
                    "--threshold", "0.0", "--candidates", "components", "--candidate-threshold", "0"]) == 0
    assert "predict" in capsys.readouterr().err                       # the tqdm bar over cases
    assert sorted(p.name for p in out.iterdir()) == ["c1_mask.nii.gz", "c1_overview.png", "c1_prob.nii.gz",
                                                     "c2_mask.nii.gz", "c2_overview.png", "c2_prob.nii.gz",
                                                     "candidates.csv"]          # NIfTI in: no DICOM out
    img2 = sitk.ReadImage(str(out / "c2_prob.nii.gz"))
    src2 = sitk.ReadImage(str(d / "c2.mha"))
    for zyx in [(0, 0, 0), (15, 31, 0), (7, 20, 45)]:
        np.testing.assert_allclose(_sitk_world(img2, zyx), _sitk_world(src2, zyx), atol=1e-3)
    np.testing.assert_allclose(io.read_image(out / "c2_prob.nii.gz").array,
                               _direct(world["runs"]["a"], d / "c2.mha", window=SHAPE), atol=1e-6)
    # threshold 0: every voxel is foreground, one component per case
    assert sorted(r["seriesuid"] for r in _read_rows(out / "candidates.csv")) == ["c1", "c2"]

    (d / "dataset.json").write_text(json.dumps({"training": [
        {"image": "./c1.nii.gz", "case_id": "first", "split": "train"},
        {"image": "./c2.mha", "case_id": "second", "split": "test"}]}))
    out2 = world["d"] / "out_json"
    monkeypatch.setenv("CI", "true")
    assert pr.main(["--input", str(d / "dataset.json"), "--split", "test", "--runs", str(world["runs"]["a"]),
                    "--out", str(out2), "--no-preview"]) == 0
    assert "predict" not in capsys.readouterr().err                   # quiet under CI
    assert sorted(p.name for p in out2.iterdir()) == ["candidates.csv", "second_mask.nii.gz",
                                                      "second_prob.nii.gz"]
    np.testing.assert_array_equal(io.read_image(out2 / "second_prob.nii.gz").array,
                                  io.read_image(out / "c2_prob.nii.gz").array)
    assert [c.case_id for c in pr.find_cases(d / "dataset.json")] == ["first", "second"]


def test_mixed_2d_and_3d_runs(world, whole, capsys):
    kw2 = dict(encoder="resnet18", in_slices=3)
    run2 = _save_run(world["d"] / "runs" / "mc", 3, name="mcgcn", kw=kw2, config={"patch_size": [3, 64, 64]})
    args = ["--input", str(world["img"]), "--runs", str(world["runs"]["a"]), str(run2)]
    assert pr.main(args + ["--out", str(world["d"] / "out_mix0")]) == 2
    err = capsys.readouterr().err
    assert "mix 2D (mcgcn) and 3D (ahnet)" in err and "--allow-mixed" in err
    out = world["d"] / "out_mix"
    assert pr.main(args + ["--out", str(out), "--allow-mixed"]) == 0
    p3 = whole["a"]
    x = torch.from_numpy(clip_and_scale(io.read_image(world["img"]).array))[None, None]
    p2 = slicewise_predict(load_member(run2 / "checkpoints" / "best.pt").model, x, in_slices=3,
                           batch_size=8)[0, 0].numpy()
    np.testing.assert_allclose(io.read_image(out / "case1_prob.nii.gz").array, (p3 + p2) / 2, atol=1e-6)


@pytest.mark.parametrize("case", ["missing_input", "empty_folder", "not_an_image", "not_a_checkpoint",
                                  "foreign_dict", "no_best", "missing_run", "window", "split", "split_no_json",
                                  "twice", "fp16_on_cpu", "candidate_threshold", "max_candidates"])
def test_bad_inputs_exit_2_with_one_sentence(world, tmp_path, capsys, case):
    img, run = str(world["img"]), str(world["runs"]["a"])
    args = {"input": img, "runs": [run]}
    extra, want = [], None
    if case == "missing_input":
        args["input"], want = str(tmp_path / "nope.nii.gz"), "not found"
    elif case == "empty_folder":
        (tmp_path / "e").mkdir()
        (tmp_path / "e" / "readme.txt").write_text("x")
        args["input"], want = str(tmp_path / "e"), "holds no images"
    elif case == "not_an_image":
        (tmp_path / "scan.png").write_bytes(b"x")
        args["input"], want = str(tmp_path / "scan.png"), "is not an image file"
    elif case == "not_a_checkpoint":
        (tmp_path / "model.pt").write_bytes(b"these are not weights")
        args["runs"], want = [str(tmp_path / "model.pt")], "model.pt is not a"
    elif case == "foreign_dict":
        torch.save({"weights": torch.zeros(2)}, tmp_path / "model.pt")
        args["runs"], want = [str(tmp_path / "model.pt")], "lacks the keys ['model', 'model_name'"
    elif case == "no_best":
        (tmp_path / "run" / "checkpoints").mkdir(parents=True)
        args["runs"], want = [str(tmp_path / "run")], "has neither checkpoints/best.pt nor checkpoints/last.pt"
    elif case == "missing_run":
        args["runs"], want = [str(tmp_path / "nowhere")], "not found"
    elif case == "window":
        extra, want = ["--window", "16", "48", "64"], "divisible by the models' input multiple (16, 32, 32)"
    elif case == "split":
        (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": img, "split": "train"}]}))
        args["input"], extra, want = str(tmp_path / "dataset.json"), ["--split", "test"], "no case with split"
    elif case == "split_no_json":
        extra, want = ["--split", "test"], "applies to a dataset.json input only"
    elif case == "twice":
        args["runs"], want = [run, str(world["runs"]["a"] / "checkpoints" / "best.pt")], "is given twice"
    elif case == "fp16_on_cpu":
        extra, want = ["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"
    elif case == "candidate_threshold":
        extra, want = ["--candidate-threshold", "1.5"], "(--candidate-threshold) must be a probability"
    elif case == "max_candidates":
        extra, want = ["--max-candidates", "-3"], "max_candidates -3 must be >= 1"
    rc = pr.main(["--input", args["input"], "--runs", *args["runs"], "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert want in err and err.startswith("ahnet.predict: error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_module_entry_point_exits_2(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CI="true")
    r = subprocess.run([sys.executable, "-m", "ahnet.predict", "--input", str(tmp_path / "missing.mha"),
                        "--runs", str(tmp_path), "--out", str(tmp_path / "o")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"ahnet.predict: error: input {tmp_path / 'missing.mha'} not found; "
                                             f"expected an image file, a folder or a dataset.json"]


def test_predict_never_imports_the_evaluation_modules():
    """Predicting a scan loads the inference stage only: not FROC, the report or the segmentation metrics."""
    code = ("import sys, ahnet.commands.predict; bad = [m for m in ('ahnet.evaluate.froc', 'ahnet.report', 'ahnet.evaluate.segmetrics', "
            "'ahnet.evaluate') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dicom_series_folder(world):
    from .data.test_io import write_dicom_series
    d = world["d"] / "dcm_in" / "patient7"
    d.parent.mkdir()
    direction = _rotation((0, 0, 1), 20.0)                              # axial, rotated in-plane
    write_dicom_series(d, np.rint(_hu(2)), SP, (-100.0, -50.0, 20.0), direction)
    out = world["d"] / "out_dcm"
    assert [c.case_id for c in pr.find_cases(d)] == ["patient7"]
    assert pr.main(["--input", str(d), "--runs", str(world["runs"]["a"]), "--out", str(out)]) == 0
    prob = sitk.ReadImage(str(out / "patient7_prob.nii.gz"))
    src = io.read_image(d)
    for zyx in [(0, 0, 0), (15, 31, 63), (4, 9, 50)]:
        np.testing.assert_allclose(_sitk_world(prob, zyx), src.voxel_to_world(zyx), atol=1e-3)
    np.testing.assert_allclose(io.read_image(out / "patient7_prob.nii.gz").array,
                               _direct(world["runs"]["a"], d, window=SHAPE), atol=1e-6)
