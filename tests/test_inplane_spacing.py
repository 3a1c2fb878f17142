"""Prediction at the training pixel spacing (ahnet.infer.spacing): a scan of coarser pixels is resampled in-plane to
the training spacing, predicted there, and its maps written back on its own grid; a scan at the training spacing
(within 1%) is predicted exactly as before; the setting reaches every command and the evaluation store."""
import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from ahnet.data import io
from ahnet.data.io import Volume
from ahnet.data.preprocess import resample_onto, scaled_from_hu
from ahnet.infer import InferenceInputError, load_ensemble
from ahnet.infer.scans import find_cases, write_predictions
from ahnet.infer.spacing import RTOL, PredictionGrid, grid_at, parse_inplane, resolve_inplane, training_inplane

ORIGIN = (-40.25, 12.5, -300.0)
C, S = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
DIRECTION = np.array([[C, -S, 0.0], [S, C, 0.0], [0.0, 0.0, 1.0]])      # rotated in-plane
CENTRE_MM = np.array([-18.0, 30.0, -290.0])                               # the nodule's centre, world (x, y, z)
RADIUS_MM = 4.0


def _scan(pixel_mm: float, field_mm: float = 44.8, depth: int = 8) -> Volume:
    """The same world at ``pixel_mm`` pixels: lung at -850 HU with a 4 mm sphere of 40 HU (no noise), 2.5 mm
    slices, the field of view the same in mm."""
    n = int(round(field_mm / pixel_mm))
    vol = Volume(np.zeros((depth, n, n), np.float32), (2.5, pixel_mm, pixel_mm), ORIGIN, DIRECTION)
    zyx = np.stack(np.indices(vol.shape), -1).reshape(-1, 3)
    d = np.linalg.norm(vol.voxel_to_world(zyx) - CENTRE_MM, axis=1).reshape(vol.shape)
    vol.array[:] = np.where(d <= RADIUS_MM, 40.0, -850.0)
    return vol


def _blob_detector(seen: list):
    """A stand-in network working in voxels, as a CNN does: a 1-voxel Gaussian of the bright voxels; records the
    arrays it was given."""
    def probability(image01):
        seen.append(image01.copy())
        return ndimage.gaussian_filter((image01 > scaled_from_hu(-400.0)).astype(np.float32), 1.0)
    return probability


def _write(tmp_path, name, vol):
    path = tmp_path / "in" / f"{name}.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    io.write_image(path, vol.array, like=vol)
    return find_cases(path)


def test_resample_onto_is_exact_for_a_linear_map_and_brings_it_back_to_the_scan_grid():
    vol = _scan(0.9)
    i = np.indices(vol.shape).astype(np.float32)
    vol.array = (0.3 * i[2] * 0.9 - 0.2 * i[1] * 0.9 + i[0]).astype(np.float32)     # linear in mm on each axis
    grid = PredictionGrid.for_scan(vol, (0.7, 0.7))
    assert grid.resamples and grid.shape == (8, 64, 64) and grid.spacing == (2.5, 0.7, 0.7)
    work = grid.working(vol.array)
    j = np.indices(work.shape).astype(np.float32)
    inside = (j[1] * 0.7 <= (vol.shape[1] - 1) * 0.9) & (j[2] * 0.7 <= (vol.shape[2] - 1) * 0.9)
    direct = 0.3 * j[2] * 0.7 - 0.2 * j[1] * 0.7 + j[0]                           # the same mm, computed
    np.testing.assert_allclose(work.array[inside], direct[inside], atol=1e-4)
    assert work.origin == vol.origin and np.array_equal(work.direction, vol.direction)
    back = grid.to_native(work.array)
    assert back.shape == vol.shape and back.dtype == np.float32
    np.testing.assert_allclose(back[:, :-1, :-1], vol.array[:, :-1, :-1], atol=1e-4)
    with pytest.raises(InferenceInputError, match="shape"):
        grid.to_native(work.array[:, 1:])


def test_coarser_pixels_are_predicted_at_the_training_spacing_and_written_on_their_own_grid(tmp_path):
    fine, coarse = _scan(0.7), _scan(0.9)
    seen_fine, seen_native, seen_resampled = [], [], []
    write_predictions(_write(tmp_path, "fine", fine), tmp_path / "fine", _blob_detector(seen_fine))
    native = write_predictions(_write(tmp_path, "coarse", coarse), tmp_path / "native", _blob_detector(seen_native))
    resampled = write_predictions(_write(tmp_path, "coarse", coarse), tmp_path / "resampled",
                                  _blob_detector(seen_resampled), inplane=(0.7, 0.7))
    assert seen_native[0].shape == coarse.shape and seen_resampled[0].shape == (8, 64, 64)
    bright = scaled_from_hu(-400.0)
    # the network sees the nodule at the size in pixels it learnt: as many voxels as at 0.7 mm (2% of them)
    n_fine, n_native, n_resampled = ((a > bright).sum() for a in (seen_fine[0], seen_native[0], seen_resampled[0]))
    assert abs(n_resampled - n_fine) <= 0.02 * n_fine and n_native < 0.7 * n_fine
    prob = io.read_image(tmp_path / "resampled" / "coarse_prob.nii.gz")
    mask = io.read_image(tmp_path / "resampled" / "coarse_mask.nii.gz")
    for v in (prob, mask):                               # written on the scan's own grid
        assert v.shape == coarse.shape and np.allclose(v.spacing, coarse.spacing)
        assert np.allclose(v.origin, coarse.origin) and np.allclose(v.direction, coarse.direction, atol=1e-6)
    truth, native_mask = coarse.array > 0, io.read_image(tmp_path / "native" / "coarse_mask.nii.gz").array > 0
    dice = [2 * (m & truth).sum() / (m.sum() + truth.sum()) for m in (mask.array > 0, native_mask)]
    assert dice[0] >= 0.8 and dice[0] >= dice[1] - 0.05
    for res in (native, resampled):                      # candidates in world mm: on the nodule's centre
        rows = io.read_candidates_csv(res["csv"])
        best = max(rows, key=lambda r: float(r["probability"]))
        xyz = np.array([float(best[k]) for k in ("coordX", "coordY", "coordZ")])
        assert np.linalg.norm(xyz - CENTRE_MM) < 0.5, xyz


def test_a_scan_within_tolerance_of_the_training_spacing_is_predicted_as_it_is(tmp_path):
    vol = _scan(0.7 * (1 + RTOL / 2))
    assert not PredictionGrid.for_scan(vol, (0.7, 0.7)).resamples
    assert grid_at((8, 64, 64), (2.5, 0.7 * (1 + 2 * RTOL), 0.7), (0.7, 0.7))[0] == (8, 65, 64)
    seen_a, seen_b = [], []
    a = write_predictions(_write(tmp_path, "s", vol), tmp_path / "a", _blob_detector(seen_a), inplane=(0.7, 0.7))
    b = write_predictions(_write(tmp_path, "s", vol), tmp_path / "b", _blob_detector(seen_b))
    assert np.array_equal(seen_a[0], seen_b[0])
    assert a["csv"].read_bytes() == b["csv"].read_bytes()
    assert np.array_equal(io.read_image(tmp_path / "a" / "s_prob.nii.gz").array,
                          io.read_image(tmp_path / "b" / "s_prob.nii.gz").array)


def _member_file(tmp_path, name, spacing):
    from ahnet.nets import build_model
    from .data._pipeline_synth import TINY_UNET
    m = build_model("unet3d", **TINY_UNET)
    ck = {"model": m.state_dict(), "model_name": "unet3d", "model_kwargs": m.config, "config": {}}
    if spacing is not None:
        ck["data_spacing"] = spacing
    torch.save(ck, tmp_path / f"{name}.pt")
    return tmp_path / f"{name}.pt"


def test_auto_reads_the_training_spacing_the_checkpoints_record(tmp_path):
    a, b = _member_file(tmp_path, "a", [2.5, 0.7, 0.7]), _member_file(tmp_path, "b", [2.5, 0.7, 0.7])
    ens = load_ensemble([a, b])
    assert training_inplane(ens) == (0.7, 0.7) and resolve_inplane("auto", ens) == (0.7, 0.7)
    assert resolve_inplane("native", ens) is None and resolve_inplane(0.8, ens) == (0.8, 0.8)
    old = load_ensemble([_member_file(tmp_path, "old", None)])
    assert resolve_inplane("auto", old) is None                          # trained before it was recorded
    mixed = load_ensemble([a, _member_file(tmp_path, "c", [2.5, 0.6, 0.6])])
    with pytest.raises(InferenceInputError, match="different training spacings"):
        resolve_inplane("auto", mixed)
    assert resolve_inplane("native", mixed) is None
    with pytest.raises(InferenceInputError, match="data_spacing"):
        load_ensemble([_member_file(tmp_path, "bad", [2.5, 0.0, 0.7])])


@pytest.mark.parametrize("text", ["0", "-1", "abc", "nan", "inf", "101"])
def test_a_bad_spacing_is_one_line_and_exit_2(tmp_path, capsys, text):
    from ahnet.commands import evaluate as ev
    from ahnet.commands import predict as pr
    for main, extra in ((pr.main, ["--input", "x.nii.gz", "--runs", "r"]), (ev.main, ["--runs", "r", "--data", "d"])):
        with pytest.raises(SystemExit) as e:
            main(extra + ["--out", str(tmp_path / "o"), "--inplane-spacing", text])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--inplane-spacing" in err[0] and "Traceback" not in err[0]
    assert parse_inplane(" Auto ") == "auto" and parse_inplane("0.7") == 0.7


def test_evaluation_predicts_at_the_setting_and_keys_its_store_by_it(tmp_path, monkeypatch):
    import ahnet.evaluate as evaluate
    from ahnet.commands.evaluate import evaluate_and_report
    from .data._pipeline_synth import SPACING, make_evaluation_world
    js, _, run = make_evaluation_world(tmp_path, n_cases=3, test_case=1)
    shapes = []
    real = evaluate.predict_volume
    monkeypatch.setattr(evaluate, "predict_volume", lambda ens, img, **k: shapes.append(img.shape) or real(ens, img, **k))
    out = tmp_path / "out"
    native = evaluate_and_report([run], js, out, device="cpu", n_bootstrap=20)
    finer = SPACING[1] * 0.75
    resampled = evaluate_and_report([run], js, out, device="cpu", n_bootstrap=20, inplane_spacing=finer)
    assert shapes == [(12, 48, 48), (12, 64, 64)]                   # a new setting predicted again, on its grid
    again = evaluate_and_report([run], js, out, device="cpu", n_bootstrap=20, inplane_spacing=finer)
    assert len(shapes) == 2                                         # the store keyed by it: reused
    same = evaluate_and_report([run], js, out, device="cpu", n_bootstrap=20, inplane_spacing=SPACING[1])
    assert len(shapes) == 3 and shapes[-1] == (12, 48, 48)          # the scans' own spacing: native's numbers
    assert json.dumps(same["models"], sort_keys=True) == json.dumps(native["models"], sort_keys=True)
    assert json.dumps(again["models"], sort_keys=True) == json.dumps(resampled["models"], sort_keys=True)
    seg = [resampled["models"]["run"]["dice"], native["models"]["run"]["dice"]]
    assert all(s is not None for s in seg)                          # Dice on the scan's own label grid


def test_the_experiment_reports_another_spacing_apart_and_logs_it(tmp_path):
    import csv
    from ahnet import paths
    from ahnet.commands import experiment, phantoms
    ep = paths.ExperimentPaths("x")
    for flag, label in (("0.7", "0.7mm"), ("native", "native"), ("auto", None)):
        args = experiment.build_parser().parse_args(["--preset", "cpu", "--inplane-spacing", flag])
        assert experiment.pixels_label(args) == label
    assert ep.report(True, "inplane0.9", "0.7mm").name == "report-final-inplane0.9-at0.7mm"
    assert ep.report(True).name == "report-final" and ep.shift_report(True, "native").name == "report-final-shifts-atnative"
    looks = tmp_path / "looks.csv"
    looks.write_text("date,commit,preset,experiment,shift,runs\n2026-01-01,abc,cpu,x,,a b\n")   # an older log
    assert phantoms.log_look(looks, "cpu", "x", [tmp_path / "a"], "inplane0.9", 0.7) == 2
    rows = list(csv.DictReader(open(looks)))
    assert [r["pixels"] for r in rows] == ["", "0.7"] and rows[1]["shift"] == "inplane0.9"


def test_the_client_takes_the_spacing_the_served_model_records():
    from ahnet.serve.client import ClientError, served_inplane
    meta = {"spacing": {"training_inplane_mm": [0.7, 0.7]}}
    assert served_inplane(meta) == (0.7, 0.7) and served_inplane(meta, "native") is None
    assert served_inplane(meta, 0.8) == (0.8, 0.8) and served_inplane({"spacing": {}}) is None
    with pytest.raises(ClientError, match="training_inplane_mm"):
        served_inplane({"spacing": {"training_inplane_mm": [0.7]}})
