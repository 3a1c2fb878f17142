"""The second stage (ahnet.infer.second_stage, python -m ahnet.rescore, evaluate --rescore) against direct computations."""
import csv
import json

import numpy as np
import pytest
import torch

from ahnet.commands import rescore as rs
from ahnet.data.io import Volume, read_annotations_csv
from ahnet.commands import evaluate as ev_cli
from ahnet.infer.candidates import voxel_to_world
from ahnet.infer.second_stage import (RESCORER, Rescorer, candidate_crops, crop_at, load_rescorer, rescore_candidates,
                                 views)
from ahnet.nets.candidate_net import CandidateNet

from .data._pipeline_synth import make_evaluation_world

SP = (2.5, 0.7, 0.7)


def test_crop_equals_direct_slicing_and_pads_with_zeros():
    a = np.arange(6 * 10 * 12, dtype=np.float32).reshape(6, 10, 12) + 1
    np.testing.assert_array_equal(crop_at(a, (3, 5, 6), (2, 4, 4)), a[2:4, 3:7, 4:8])
    c = crop_at(a, (0, 0, 11), (4, 4, 4))                      # a corner: rows before 0 and after 11 are zero
    expect = np.zeros((4, 4, 4), np.float32)
    expect[2:, 2:, :3] = a[0:2, 0:2, 9:12]
    np.testing.assert_array_equal(c, expect)
    assert not crop_at(a, (40, 5, 5), (4, 4, 4)).any()          # wholly outside


def test_crops_are_centred_on_the_nearest_voxel_of_an_oblique_scan():
    th = np.deg2rad(20)
    direction = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1.0]])
    geo = Volume(np.zeros((9, 20, 20), np.float32), SP, (-30.0, 12.0, 400.0), direction)
    img = np.random.default_rng(0).random((9, 20, 20)).astype(np.float32)
    prob = np.random.default_rng(1).random((9, 20, 20)).astype(np.float32)
    voxels = [(4, 10, 10), (0, 19, 3), (8, 0, 0)]
    xyz = voxel_to_world(np.array(voxels) + [0.3, -0.4, 0.2], SP, geo.origin, direction)   # rounds back to them
    rows = [{"coordX": x, "coordY": y, "coordZ": z} for x, y, z in xyz]
    crops = candidate_crops(img, prob, geo, rows, (4, 6, 6))
    assert crops.shape == (3, 2, 4, 6, 6)
    for k, v in enumerate(voxels):
        assert crops[k, 0, 2, 3, 3] == img[v] and crops[k, 1, 2, 3, 3] == prob[v]


def _rescorer(seed=0, width=4):
    torch.manual_seed(seed)
    return Rescorer(CandidateNet(width=width).eval(), (4, 8, 8), {"width": width})


def test_the_second_stage_is_the_mean_over_the_eight_in_plane_views():
    r = _rescorer()
    x = np.random.default_rng(0).random((3, 2, 4, 8, 8)).astype(np.float32)
    got = r.probabilities(x, batch=2)
    direct = []
    for k in range(3):
        ps = []
        for mirror in (False, True):
            base = x[k, :, :, :, ::-1] if mirror else x[k]
            for turns in range(4):
                v = np.ascontiguousarray(np.rot90(base, turns, axes=(-2, -1)))
                with torch.no_grad():
                    ps.append(float(torch.sigmoid(r.net(torch.from_numpy(v)[None]))[0]))
        direct.append(np.mean(ps))
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-6)
    assert len({tuple(v.flatten()[:20].tolist()) for v in views(torch.from_numpy(x))}) == 8


def test_the_second_stage_in_threads_and_bf16_channels_last():
    """Workers share the 8 views and give the same probabilities; bf16 autocast in channels-last (what predict
    --amp bf16 --channels-last gives the second stage) stays within bf16 rounding of float32."""
    import dataclasses

    r = _rescorer()
    x = np.random.default_rng(1).random((5, 2, 4, 8, 8)).astype(np.float32)
    ref = r.probabilities(x, batch=3)
    assert np.array_equal(dataclasses.replace(r, workers=3).probabilities(x, batch=3), ref)
    fast = dataclasses.replace(r, amp="bf16", channels_last=True, workers=2).probabilities(x, batch=3)
    np.testing.assert_allclose(fast, ref, rtol=0, atol=2e-2)
    assert not np.array_equal(fast, ref)                       # it did run in bfloat16


def test_rescored_score_is_the_geometric_mean_and_the_first_stage_is_kept():
    r = _rescorer(1)
    geo = Volume(np.zeros((8, 16, 16), np.float32), SP)
    img, prob = np.random.default_rng(2).random((2, 8, 16, 16)).astype(np.float32)
    rows = [{"seriesuid": "s", "coordX": 5.0, "coordY": 4.0, "coordZ": 10.0, "probability": 0.8},
            {"seriesuid": "s", "coordX": 1.0, "coordY": 9.0, "coordZ": 2.5, "probability": 0.25}]
    out = rescore_candidates(r, rows, img, prob, geo)
    p2 = r.probabilities(candidate_crops(img, prob, geo, rows, r.crop))
    assert [o["probability_stage1"] for o in out] == [0.8, 0.25]
    np.testing.assert_allclose([o["probability"] for o in out], np.sqrt([0.8, 0.25] * p2), rtol=1e-12)
    assert out[0]["coordX"] == 5.0 and rescore_candidates(r, [], img, prob, geo) == []


def test_candidates_are_labelled_by_the_nodule_radius():
    geo = Volume(np.zeros((8, 40, 40), np.float32), SP)
    nodules = [{"coordX": 14.0, "coordY": 14.0, "coordZ": 10.0, "diameter_mm": 8.0}]
    rows = [{"coordX": 14.0 + d, "coordY": 14.0, "coordZ": 10.0} for d in (0.0, 3.99, 4.01, 20.0)]
    img = np.zeros((8, 40, 40), np.float32)
    x, y = rs.labelled_crops(img, img, geo, nodules, rows, jitter=3, rng=np.random.default_rng(0), crop=(4, 8, 8))
    assert y.tolist() == [1, 1, 0, 0, 1, 1, 1] and x.shape == (7, 2, 4, 8, 8)
    _, y0 = rs.labelled_crops(img, img, geo, [], rows[:2], jitter=3, rng=np.random.default_rng(0), crop=(4, 8, 8))
    assert y0.tolist() == [0, 0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Four synthetic scans (validation, train, train, test) with nodules and an untrained 3D U-Net run."""
    root = tmp_path_factory.mktemp("rescore")
    js, _, run = make_evaluation_world(root, n_cases=4, test_case=3, empty_cases=())
    argv = ["--run", str(run), "--data", str(js), "--epochs", "2", "--width", "4", "--device", "cpu"]
    assert rs.main(argv) == 0
    return {"root": root, "ds": js, "run": run, "argv": argv}


def test_training_writes_a_safe_rescorer_with_its_counts(world):
    r = load_rescorer(world["run"])
    assert isinstance(r.net, CandidateNet) and r.settings["epochs"] == 2 and r.crop == (8, 32, 32)
    torch.load(world["run"] / RESCORER, weights_only=True)
    info = json.loads((world["run"] / "rescorer.json").read_text(encoding="utf-8"))
    ann = read_annotations_csv(world["ds"].parent / "annotations.csv")
    train_ids = {"case_001", "case_002"}
    n_nodules = sum(a["seriesuid"] in train_ids for a in ann)
    assert info["cases"] == 2 and info["crops"] == info["candidates"] + 2 * n_nodules
    assert info["positives"] >= 2 * n_nodules and len(info["loss_per_epoch"]) == 2
    assert not [p for p in world["run"].iterdir() if ".tmp" in p.name]


def test_same_settings_leave_it_and_force_repeats_it_exactly(world, capsys):
    before = (world["run"] / RESCORER).stat().st_mtime_ns
    assert rs.main(world["argv"]) == 0
    assert "already holds this second stage" in capsys.readouterr().out
    assert (world["run"] / RESCORER).stat().st_mtime_ns == before
    old = load_rescorer(world["run"]).net.state_dict()
    assert rs.main(world["argv"] + ["--force"]) == 0
    new = load_rescorer(world["run"]).net.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old)


def test_evaluate_rescore_writes_the_geometric_mean_of_both_stages(world, tmp_path):
    out = tmp_path / "rep"
    assert ev_cli.main(["--runs", str(world["run"]), "--data", str(world["ds"]), "--out", str(out), "--device", "cpu",
                        "--bootstrap", "10", "--rescore"]) == 0
    with open(out / "candidates" / "run.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(0 <= float(r["probability"]) <= float(r["probability_stage1"]) ** 0.5 + 1e-12 for r in rows)
    plain = tmp_path / "plain"
    assert ev_cli.main(["--runs", str(world["run"]), "--data", str(world["ds"]), "--out", str(plain), "--device",
                        "cpu", "--bootstrap", "10"]) == 0
    with open(plain / "candidates" / "run.csv", newline="", encoding="utf-8") as f:
        first = list(csv.DictReader(f))
    key = [(r["coordX"], r["coordY"], r["coordZ"]) for r in first]
    assert key == [(r["coordX"], r["coordY"], r["coordZ"]) for r in rows]
    assert [float(r["probability"]) for r in first] == [float(r["probability_stage1"]) for r in rows]
    assert "second stage" in (out / "report.md").read_text(encoding="utf-8")


def test_predict_rescore_equals_the_second_stage_applied_to_the_plain_prediction(world, tmp_path):
    from ahnet.commands import predict as pr
    from ahnet.data.io import read_candidates_csv, read_image, read_scan
    from ahnet.data.preprocess import clip_and_scale
    base = ["--input", str(world["ds"]), "--split", "test", "--runs", str(world["run"]), "--device", "cpu"]
    assert pr.main(base + ["--out", str(tmp_path / "plain")]) == 0
    assert pr.main(base + ["--out", str(tmp_path / "two"), "--rescore"]) == 0
    plain = read_candidates_csv(tmp_path / "plain" / "candidates.csv")
    two = read_candidates_csv(tmp_path / "two" / "candidates.csv")
    scan = read_scan(world["ds"].parent / "imagesTr" / "case_003.nii.gz")
    prob = read_image(tmp_path / "plain" / "case_003_prob.nii.gz").array
    direct = rescore_candidates(load_rescorer(world["run"]), plain, clip_and_scale(scan.array), prob, scan)
    assert plain and [r["probability_stage1"] for r in two] == [r["probability"] for r in plain]
    np.testing.assert_allclose([r["probability"] for r in two], [r["probability"] for r in direct], rtol=1e-12)
    assert pr.main(base[:5] + [str(world["run"]), str(world["run"]), "--device", "cpu", "--out",
                               str(tmp_path / "x"), "--rescore"]) == 2


def test_bf16_training_is_guarded_seeded_and_near_float32():
    """--fit-amp bf16 (the cpu preset's second stage): every Conv3d behind the depth guard (a 4-slice crop reaches
    the deepest block at 2 slices, where CPU bf16 weight gradients are wrong), the same weights for the same
    seed, and a classifier within bf16 rounding of the float32 one trained from the same start."""
    from ahnet.precision import DepthGuardedConv3d
    rng = np.random.default_rng(0)
    x = rng.random((96, 2, 4, 8, 8)).astype(np.float32)
    x[:48, 1] += 1.0                                           # nodules: a higher probability map
    y = np.r_[np.ones(48), np.zeros(48)].astype(np.float32)
    nets = [rs.fit(x, y, 3, 0, width=4, amp=amp)[0] for amp in ("bf16", "bf16", "off")]
    assert all(type(m) is DepthGuardedConv3d for m in nets[0].modules() if isinstance(m, torch.nn.Conv3d))
    assert not any(isinstance(m, DepthGuardedConv3d) for m in nets[2].modules())
    a, b, f32 = (n.state_dict() for n in nets)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], f32[k]) for k in a)       # it did train in bfloat16
    with torch.no_grad():
        p_bf16, p_f32 = (torch.sigmoid(n(torch.from_numpy(x))) for n in (nets[0], nets[2]))
    assert float((p_bf16 - p_f32).abs().max()) < 0.05
    assert float(p_bf16[:48].mean()) > float(p_bf16[48:].mean())


def test_a_changed_training_precision_trains_the_second_stage_again(world, capsys):
    assert rs.main(world["argv"] + ["--fit-amp", "bf16"]) == 0
    assert "already holds" not in capsys.readouterr().out
    r = load_rescorer(world["run"])
    assert r.settings["fit_amp"] == "bf16" and r.settings["fit_layout"] == "channels_last"
    saved = torch.load(world["run"] / RESCORER, weights_only=True)["state_dict"]
    assert all(t.is_contiguous() for t in saved.values())      # saved in the plain layout, whatever it trained in


class _Killed(Exception):
    pass


def test_a_fit_killed_after_an_epoch_resumes_to_the_same_bits():
    """fit's state after epoch 1, saved and loaded as a weights_only file, continued: the same weights and losses
    as three epochs without a stop (bf16, the cpu preset's precision, with its scaler and one-cycle schedule)."""
    from ahnet.checkpoint import load_checkpoint, save_checkpoint
    rng = np.random.default_rng(1)
    x = rng.random((70, 2, 4, 8, 8)).astype(np.float32)
    x[:30, 1] += 1.0
    y = np.r_[np.ones(30), np.zeros(40)].astype(np.float32)
    whole, losses = rs.fit(x, y, 3, 0, width=4, amp="bf16")
    states = []

    def stop_after_first(state):
        states.append(state)
        raise _Killed

    with pytest.raises(_Killed):
        rs.fit(x, y, 3, 0, width=4, amp="bf16", on_epoch=stop_after_first)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint({"key": "k", **states[0]}, f"{d}/fit.pt")
        state = load_checkpoint(f"{d}/fit.pt", required_keys=("key",))
    resumed, losses2 = rs.fit(x, y, 3, 0, width=4, amp="bf16", resume=state)
    assert state["epoch"] == 1 and losses2 == losses
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_second_stage_resumes_without_predicting_again(world, tmp_path, monkeypatch, capsys):
    """Killed in its second epoch: the crops and the first epoch are kept (RUN/rescorer-crops.pt, rescorer-fit.pt);
    the same command predicts nothing again, continues, writes the rescorer an uninterrupted call writes and
    removes the partial files. Other settings do not take them over."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(world["run"], run, ignore=shutil.ignore_patterns("rescorer*"))
    argv = ["--run", str(run), "--data", str(world["ds"]), "--epochs", "3", "--width", "4", "--device", "cpu"]
    real_fit = rs.fit

    def killed_fit(*a, on_epoch=None, **kw):
        def save_then_die(state):
            on_epoch(state)
            if state["epoch"] == 1:
                raise KeyboardInterrupt
        return real_fit(*a, on_epoch=save_then_die, **kw)

    monkeypatch.setattr(rs, "fit", killed_fit)
    assert rs.main(argv) == 130
    assert (run / "rescorer-crops.pt").is_file() and (run / "rescorer-fit.pt").is_file()
    assert not (run / RESCORER).exists()
    monkeypatch.setattr(rs, "fit", real_fit)
    monkeypatch.setattr(rs, "collect", lambda *a, **k: pytest.fail("the kept crops were predicted again"))
    capsys.readouterr()
    assert rs.main(argv) == 0
    err = capsys.readouterr().err
    assert "not predicting again" in err and "resuming the classifier's training after epoch 1" in err
    assert not (run / "rescorer-crops.pt").exists() and not (run / "rescorer-fit.pt").exists()
    monkeypatch.undo()
    whole = tmp_path / "whole"
    shutil.copytree(world["run"], whole, ignore=shutil.ignore_patterns("rescorer*"))
    assert rs.main(["--run", str(whole)] + argv[2:]) == 0
    a, b = load_rescorer(run).net.state_dict(), load_rescorer(whole).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    info = [json.loads((r / "rescorer.json").read_text()) for r in (run, whole)]
    assert info[0]["loss_per_epoch"] == info[1]["loss_per_epoch"] and info[0]["crops"] == info[1]["crops"]
    # work kept under other settings is not taken over; --force starts afresh
    monkeypatch.setattr(rs, "fit", killed_fit)
    assert rs.main(argv + ["--force"]) == 130
    monkeypatch.undo()
    (run / RESCORER).unlink()
    capsys.readouterr()
    assert rs.main(argv + ["--jitter", "1"]) == 0
    assert "it holds the work of other settings" in capsys.readouterr().err
    assert not (run / "rescorer-crops.pt").exists()
    monkeypatch.setattr(rs, "fit", killed_fit)
    assert rs.main(argv + ["--force"]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert rs.main(argv + ["--force"]) == 0
    assert "not predicting again" not in capsys.readouterr().err
