"""The serving section of python -m ahnet.bench: options checked before anything runs, one error line each."""
import pytest

from ahnet.commands import bench

from .conftest import needs_serving

needs_serving("pytriton", "tritonclient", "onnxruntime")    # the section's first check is for these
pytestmark = pytest.mark.serve


@pytest.fixture
def nothing_runs(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the benchmark ran although its options were bad")
    monkeypatch.setattr("ahnet.infer.load_ensemble", refuse)
    monkeypatch.setattr("ahnet.serve.process.ServerProcess", refuse)


@pytest.mark.parametrize("args, words", [
    (["--concurrency", "0"], "--concurrency [0] must list client counts >= 1"),
    (["--overlap", "1"], "argument --overlap: expected a finite number in [0, 1), got '1'"),
    (["--batch", "0"], "argument --batch: expected an integer in [1, 4096], got '0'"),
    (["--window", "16", "64", "48"], "--window (16, 64, 48) must be three positive sizes (D, H, W) divisible by"),
])
def test_serving_section_bad_options_are_one_line(exported, args, words, capsys, nothing_runs):
    try:
        rc = bench.main(["--serving", "--models", str(exported), *args])
    except SystemExit as e:                     # the window options are refused by the parser
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("ahnet.bench: error: ") and words in err and err.count("\n") == 1, err


def test_serving_section_usage_errors_and_a_missing_folder_are_one_line(tmp_path, capsys, nothing_runs):
    with pytest.raises(SystemExit) as e:
        bench.main(["--serving", "--models", str(tmp_path), "--no-such-flag"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "ahnet.bench: error: unrecognized arguments: --no-such-flag\n"
    assert bench.main(["--serving", "--models", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err == f"ahnet.bench: error: model folder {tmp_path / 'none'} not found; export " \
                                      f"one with python -m ahnet.export\n"
