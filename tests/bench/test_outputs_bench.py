"""python -m ahnet.bench --outputs: every step predict runs for a case beside the network is timed, every file it
writes is sized, and the rows are written as JSON."""
import json

import pytest

from ahnet.bench.outputs import STEPS
from ahnet.commands import bench


def test_the_outputs_section_times_each_step_and_sizes_each_file(tmp_path, capsys):
    pytest.importorskip("highdicom", reason="the dicom extra (highdicom) is not installed")
    out = tmp_path / "outputs.json"
    assert bench.main(["--outputs", "--volume", "8", "32", "40", "--nodules", "2", "--repeats", "2",
                       "--out", str(out)]) == 0
    res = json.loads(out.read_text(encoding="utf-8"))
    assert [r["step"] for r in res["rows"]] == list(STEPS)
    assert all(len(r["runs_s"]) == 2 and r["median_s"] > 0 for r in res["rows"])
    assert sorted(res["file_bytes"]) == ["<case>_mask.nii.gz", "<case>_overview.png", "<case>_prob.nii.gz",
                                         "<case>_seg.dcm", "<case>_sr.dcm"]
    assert "DICOM SEG" in capsys.readouterr().out


def test_the_outputs_section_refuses_a_bad_option_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:                      # a usage error: argparse exits
        bench.main(["--outputs", "--repeats", "0", "--out", str(tmp_path / "o.json")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "ahnet.bench: error: argument --repeats: expected an integer in [1, 50], got '0'"]
    assert list(tmp_path.iterdir()) == []
