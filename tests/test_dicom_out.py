"""DICOM out for DICOM in: the SEG and SR that predict writes beside its NIfTI files and candidates.csv, validated by
dciodvfy (Debian's dicom3tools) and read back with highdicom: the SEG mask equals the NIfTI mask voxel for voxel,
the SR's findings equal the CSV's rows at or above the operating point."""
import csv
import math
import shutil
import subprocess

import numpy as np
import pytest

from ahnet import paths
from ahnet.data import io
from ahnet.infer.outputs import CaseOutputs
from ahnet.data.dicom_out import Algorithm
from ahnet.infer.scans import find_cases, write_predictions
from ahnet.data.dicom_source import write_ct_series

hd = pytest.importorskip("highdicom", reason="the dicom extra (highdicom) is not installed: pip install -e '.[dicom]'")

SP = (2.5, 0.7, 0.8)                                   # (sz, sy, sx) mm
SHAPE = (12, 40, 56)                                   # rows != columns: a transposed frame would show
ORIGIN = (-101.5, -62.25, 17.0)
BLOBS = [((5.3, 14.2, 20.6), 6.0, 0.92), ((8.0, 28.0, 40.0), 4.5, 0.71), ((3.0, 30.0, 12.0), 3.0, 0.3)]
SR_THRESHOLD = 0.6                                     # the first two blobs are findings, the third is not
ALGORITHM = Algorithm("ahnet test-run", "0.1.0")


def _rot_z(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def _dist_mm(centre):
    z, y, x = np.indices(SHAPE, dtype=float)
    return np.sqrt(((z - centre[0]) * SP[0]) ** 2 + ((y - centre[1]) * SP[1]) ** 2 + ((x - centre[2]) * SP[2]) ** 2)


def _scan_and_probability():
    """HU with three bright spheres and the probability map a model would give them (each sphere at its p)."""
    hu = np.full(SHAPE, -850.0, np.float32)
    prob = np.zeros(SHAPE, np.float32)
    for c, r, p in BLOBS:
        hu[_dist_mm(c) <= r] = 40.0
        prob[_dist_mm(c) <= r] = p
    return hu, prob


def dciodvfy_errors(path) -> list:
    """The error lines dciodvfy (dicom3tools) reports for a file; the test is skipped where it is not installed."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian's dicom3tools) is not installed; bash run.sh test installs it where apt is "
                    "available")
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """Two DICOM series through write_predictions: 'lung' with three blobs, 'clear' where the model sees none."""
    d = tmp_path_factory.mktemp("dicom_out")
    hu, prob = _scan_and_probability()
    uids = {"lung": write_ct_series(d / "in" / "lung", hu, SP, ORIGIN, _rot_z(25), tag=11),
            "clear": write_ct_series(d / "in" / "clear", np.random.default_rng(0).normal(-850, 40, SHAPE), SP, ORIGIN,
                                     np.eye(3), tag=12)}
    (d / "in" / "dataset.json").write_text('{"test": [{"image": "lung", "case_id": "lung"}, '
                                           '{"image": "clear", "case_id": "clear"}]}')
    answers = iter([prob, np.zeros(SHAPE, np.float32)])

    def probability(image01):
        assert image01.shape == SHAPE
        return next(answers)
    out = d / "out"
    res = write_predictions(find_cases(d / "in" / "dataset.json"), out, probability, threshold=0.5,
                            outputs=CaseOutputs(dicom="on", sr_threshold=SR_THRESHOLD, algorithm=ALGORITHM))
    with open(out / paths.CANDIDATES_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    return {"out": out, "uids": uids, "res": res, "rows": rows}


@pytest.mark.parametrize("case", ["lung", "clear"])
def test_dciodvfy_finds_no_error_in_the_seg_or_the_sr(predicted, case):
    files = paths.case_paths(predicted["out"], case)
    assert dciodvfy_errors(files.seg) == [] and dciodvfy_errors(files.sr) == []


@pytest.mark.parametrize("case", ["lung", "clear"])
def test_the_seg_is_the_nifti_mask_on_the_source_frames(predicted, case):
    files, uids = paths.case_paths(predicted["out"], case), predicted["uids"][case]
    seg = hd.seg.segread(files.seg)
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids["sop"], segment_numbers=[1],
                                               assert_missing_frames_are_empty=True)[..., 0]
    mask = io.read_image(files.mask, dtype=None).array
    assert frames.shape == mask.shape == SHAPE
    np.testing.assert_array_equal(frames.astype(np.uint8), mask)
    assert (mask.sum() > 0) == (case == "lung")
    assert seg.StudyInstanceUID == uids["study"] and seg.FrameOfReferenceUID == uids["frame"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["series"]
    segment = seg.SegmentSequence[0]
    assert (segment.SegmentAlgorithmType, segment.SegmentAlgorithmName) == ("AUTOMATIC", ALGORITHM.name)
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == ALGORITHM.version
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Nodule"


def _measurement(group, meaning):
    return next(m for m in group.get_measurements() if m.name.meaning == meaning)


def test_the_sr_findings_are_the_csv_rows_above_the_operating_point(predicted):
    uids = predicted["uids"]["lung"]
    sr = hd.sr.srread(paths.case_paths(predicted["out"], "lung").sr)
    want = sorted((r for r in predicted["rows"] if r["seriesuid"] == "lung"
                   and float(r["probability"]) >= SR_THRESHOLD), key=lambda r: -float(r["probability"]))
    assert len(want) == 2 and len(predicted["rows"]) == 3        # the 0.3 blob is a candidate, not a finding
    groups = sr.content.get_planar_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in groups] == ["candidate 1", "candidate 2"]
    for g, row, (centre, radius, _) in zip(groups, want, BLOBS):
        point = np.asarray(g.roi.value, float).reshape(-1, 3)
        csv_xyz = np.float32([float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])])
        np.testing.assert_array_equal(point[0].astype(np.float32), csv_xyz)          # SCOORD3D is float32
        assert g.roi.GraphicType == "POINT" and g.roi.ReferencedFrameOfReferenceUID == uids["frame"]
        assert _measurement(g, "Certainty of Finding").value == pytest.approx(float(row["probability"]), rel=1e-12)
        n = int(np.count_nonzero(_dist_mm(centre) <= radius))                        # the blob's voxels
        sphere = (6.0 * n * SP[0] * SP[1] * SP[2] / math.pi) ** (1 / 3)
        assert _measurement(g, "Diameter").value == pytest.approx(sphere, rel=1e-9)
        assert _measurement(g, "Diameter").unit.value == "mm"
    assert [m.value for m in _all_measurements(sr) if m.name.meaning.startswith("Number of lesions")] == [2]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == uids["series"]
    assert sorted(i.ReferencedSOPInstanceUID for i in evidence.ReferencedSOPSequence) == sorted(uids["sop"])


def _all_measurements(sr):
    """The measurements of the SR's TID 1501 groups (no image region: the count of findings)."""
    out = []
    for g in sr.content.get_image_measurement_groups():
        out += list(g.get_measurements())
    return out


def test_a_scan_without_findings_gets_an_sr_that_says_none(predicted):
    sr = hd.sr.srread(paths.case_paths(predicted["out"], "clear").sr)
    assert sr.content.get_planar_roi_measurement_groups() == []
    assert [m.value for m in _all_measurements(sr) if m.name.meaning.startswith("Number of lesions")] == [0]
    assert predicted["res"]["dicom"] == ["lung", "clear"] and predicted["res"]["overviews"] == 2


# ------------------------------------------------------------------------------------------ the command lines
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tests.test_predict import KW, _save_run
    kw = dict(KW, spacing=list(SP))
    return _save_run(tmp_path_factory.mktemp("run") / "run_a", 1, kw=kw, config={"patch_size": [16, 32, 32]})


def _predict(*argv):
    """python -m ahnet.predict with one window over the whole tiny scan."""
    from ahnet.commands import predict
    return predict.main([str(a) for a in argv] + ["--window", "16", "64", "64"])


def test_predict_writes_the_seg_and_sr_for_a_dicom_series_by_default(tmp_path, tiny_run, capsys):
    hu, _ = _scan_and_probability()
    uids = write_ct_series(tmp_path / "patient9", hu, SP, ORIGIN, _rot_z(-15), tag=31)
    out = tmp_path / "out"
    assert _predict("--input", tmp_path / "patient9", "--runs", tiny_run, "--out", out, "--threshold", "0",
                    "--candidates", "components", "--candidate-threshold", "0", "--sr-threshold", "0") == 0
    said = capsys.readouterr()
    assert said.err == "" and "1 overview picture(s); DICOM SEG and SR for 1 case(s)" in said.out
    files = paths.case_paths(out, "patient9")
    seg = hd.seg.segread(files.seg)
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "ahnet run_a"
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids["sop"], segment_numbers=[1])[..., 0]
    np.testing.assert_array_equal(frames, io.read_image(files.mask, dtype=None).array)       # threshold 0: all 1
    groups = hd.sr.srread(files.sr).content.get_planar_roi_measurement_groups()
    assert len(groups) == 1 and files.overview.is_file()                   # one component, p >= 0: reported

    out2 = tmp_path / "out2"
    assert _predict("--input", tmp_path / "patient9", "--runs", tiny_run, "--out", out2, "--no-dicom-out",
                    "--no-preview") == 0
    assert sorted(p.name for p in out2.iterdir()) == ["candidates.csv", "patient9_mask.nii.gz",
                                                      "patient9_prob.nii.gz"]


def test_dicom_out_for_an_input_that_is_not_dicom_is_refused_before_anything_is_written(tmp_path, tiny_run, capsys):
    from ahnet.commands import client
    hu, _ = _scan_and_probability()
    scan = io.write_image(tmp_path / "scan.nii.gz", io.Volume(hu, SP, ORIGIN))
    assert _predict("--input", scan, "--runs", tiny_run, "--out", tmp_path / "o", "--dicom-out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ahnet.predict: error: --dicom-out needs DICOM series inputs; case scan is {scan} (pass "
                   f"--no-dicom-out, or leave both out: DICOM series only)"]
    # the client refuses it before it connects (nothing listens on port 9: no retry message)
    assert client.main(["--url", "127.0.0.1:9", "--input", str(scan), "--out", str(tmp_path / "o"), "--dicom-out",
                        "--retries", "0"]) == 2
    assert capsys.readouterr().err.startswith("ahnet.client: error: --dicom-out needs DICOM series inputs")
    assert not (tmp_path / "o").exists()


def test_a_series_without_a_frame_of_reference_is_an_error_under_dicom_out_and_a_warning_otherwise(
        tmp_path, tiny_run, capsys):
    hu, _ = _scan_and_probability()
    write_ct_series(tmp_path / "nofor", hu, SP, ORIGIN, np.eye(3), tag=41, frame_of_reference=False)
    out = tmp_path / "out"
    assert _predict("--input", tmp_path / "nofor", "--runs", tiny_run, "--out", out, "--dicom-out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ahnet.predict: error: case nofor: series ") and \
        "lacks FrameOfReferenceUID" in err[0]
    assert not out.exists()                                  # nothing of the case was written
    assert _predict("--input", tmp_path / "nofor", "--runs", tiny_run, "--out", out) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ahnet.predict: warning: case nofor: no DICOM SEG/SR: series ")
    assert sorted(p.name for p in out.iterdir()) == ["candidates.csv", "nofor_mask.nii.gz", "nofor_overview.png",
                                                     "nofor_prob.nii.gz"]
