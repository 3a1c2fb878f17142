"""The output options of predict and the client (ahnet.infer.outputs.check_outputs), checked before anything is
written, including on a machine without the dicom extra (simulated: highdicom reported missing)."""
import pytest

from ahnet.data import dicom_out
from ahnet.infer.outputs import CaseOutputs, OutputOptionError, check_outputs
from ahnet.infer.scans import Case

MISSING = "DICOM SEG/SR need highdicom, which is not installed: pip install 'ahnet[dicom]'"


@pytest.fixture
def cases(tmp_path):
    (tmp_path / "series").mkdir()
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    return {"series": Case("series", tmp_path / "series"), "nifti": Case("scan", tmp_path / "scan.nii.gz")}


def test_without_highdicom_auto_warns_once_and_turns_dicom_out_off(cases, monkeypatch, capsys):
    monkeypatch.setattr(dicom_out, "highdicom_missing", lambda: MISSING)
    got = check_outputs([cases["series"], cases["nifti"]], CaseOutputs())
    assert got.dicom == "off"
    err = capsys.readouterr().err.strip().splitlines()                 # prefixed by the command running
    assert len(err) == 1 and err[0].endswith(
        f": warning: no DICOM SEG/SR for the DICOM series: {MISSING} (--no-dicom-out silences this)")
    assert check_outputs([cases["series"]], got) == got and capsys.readouterr().err == ""   # checked again: quiet
    assert check_outputs([cases["nifti"]], CaseOutputs()).dicom == "auto"                   # no series: no word
    with pytest.raises(OutputOptionError, match=r"^--dicom-out: DICOM SEG/SR need highdicom"):
        check_outputs([cases["series"]], CaseOutputs(dicom="on"))


def test_dicom_out_on_refuses_a_non_dicom_input_and_bad_options(cases):
    with pytest.raises(OutputOptionError, match=r"--dicom-out needs DICOM series inputs; case scan is "):
        check_outputs([cases["series"], cases["nifti"]], CaseOutputs(dicom="on"))
    with pytest.raises(OutputOptionError, match=r"--sr-threshold 1.5 must be a probability"):
        check_outputs([cases["series"]], CaseOutputs(sr_threshold=1.5))
    with pytest.raises(OutputOptionError, match="not one of auto, on, off"):
        check_outputs([cases["series"]], CaseOutputs(dicom="yes"))
