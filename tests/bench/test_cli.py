"""python -m ahnet.bench as a command: bad options are one error line and exit 2 before any measurement, the
module entry point still answers, and a missing MONAI is an error line, not a traceback."""
import subprocess
import sys

import pytest

from ahnet.commands import bench


@pytest.mark.parametrize("argv, words", [
    (["--levers", "fast"], "unknown lever 'fast'"),
    (["--infer-levers", "dtype=bf16+fast"], "unknown inference lever 'fast'"),
    (["--overlap", "1.5"], "argument --overlap: expected a finite number in [0, 1), got '1.5'"),
    (["--sw-batch", "0"], "argument --sw-batch: expected an integer in [1, 4096], got '0'"),
    (["--window", "32", "0", "128"], "argument --window: expected an integer in [1, 4096], got '0'"),
    (["--pfn", "5"], "--pfn must be between 0 and 4"),
    (["--patch", "32", "0", "128"], "--patch needs positive sizes"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--device", "gpu7"], "--device 'gpu7' is not a torch device"),
])
def test_bad_options_are_one_error_line(argv, words, capsys, no_measurement):
    try:
        rc = bench.main(["--device", "cpu", *argv] if argv[0] != "--device" else argv)
    except SystemExit as e:                     # the window options are refused by the parser
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ahnet.bench: error: ") and words in err[0], err


def test_upsample_modes_are_checked_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--modes", "cubic"])
    assert exc.value.code == 2 and "invalid choice: 'cubic'" in capsys.readouterr().err


def test_missing_monai_is_an_error_line(monkeypatch, capsys, no_measurement):
    monkeypatch.setitem(sys.modules, "monai", None)          # import monai now raises ImportError
    assert bench.main(["--device", "cpu", "--skip-model", "--skip-infer", "--skip-2d", "--skip-data"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ahnet.bench: error: ") and "peer" in err[0]


def test_module_entry_point():
    p = subprocess.run([sys.executable, "-m", "ahnet.bench", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Benchmarks of this project's AHNet3d against MONAI's AHNet" in p.stdout and "--full-volume" in p.stdout


def test_an_empty_plan_writes_its_results(tmp_path, capsys):
    pytest.importorskip("monai")
    argv = ["--device", "cpu", "--skip-model", "--skip-infer", "--skip-2d", "--skip-data", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    written = list(tmp_path.iterdir())
    assert len(written) == 1 and written[0].name.startswith("bench-") and written[0].suffix == ".json"


def test_serving_section_without_the_serve_extra_is_an_error_line(monkeypatch, capsys, tmp_path):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytriton" else real(name, *a))
    assert bench.main(["--serving", "--models", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ahnet.bench: error: the serving benchmark needs the serve extra")
