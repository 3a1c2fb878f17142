"""The sliding-window settings as one object (ahnet.infer.WindowSettings): its range checks, the options that make
it (add_window_arguments), and every command that slides windows declaring them through it."""
import math

import numpy as np
import pytest

from ahnet import failures
from ahnet.infer import InferenceInputError, WindowSettings, add_window_arguments


def test_settings_keep_good_values_and_normalise_them():
    s = WindowSettings([8, np.int64(16), 16], np.float32(0.25), np.int64(3))
    assert s.window == (8, 16, 16) and all(type(v) is int for v in s.window)
    assert s.overlap == 0.25 and type(s.overlap) is float and s.sw_batch == 3 and type(s.sw_batch) is int
    assert s.kwargs() == {"window": (8, 16, 16), "overlap": 0.25, "sw_batch": 3}
    assert WindowSettings().kwargs() == {"window": None, "overlap": 0.5, "sw_batch": 8}
    assert WindowSettings(overlap=0).overlap == 0.0


@pytest.mark.parametrize("kw, words", [
    ({"overlap": 1}, "overlap 1 must be a fraction in [0, 1)"),
    ({"overlap": -0.1}, "in [0, 1)"),
    ({"overlap": math.nan}, "in [0, 1)"),
    ({"overlap": True}, "in [0, 1)"),
    ({"overlap": "0.5"}, "in [0, 1)"),
    ({"sw_batch": 0}, "windows per pass 0 must be an integer in [1, 4096]"),
    ({"sw_batch": 4097}, "in [1, 4096]"),
    ({"sw_batch": 1.5}, "in [1, 4096]"),
    ({"window": (0, 16, 16)}, "must be three sizes D H W in [1, 4096]"),
    ({"window": (16, 16)}, "three sizes"),
    ({"window": (16, 16, 16, 16)}, "three sizes"),
    ({"window": (16, 16, 4097)}, "three sizes"),
    ({"window": (16, 16.5, 16)}, "three sizes"),
])
def test_settings_refuse_out_of_range_values_in_one_sentence(kw, words):
    with pytest.raises(InferenceInputError) as e:
        WindowSettings(**kw)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_take_removes_the_window_settings_from_keyword_arguments():
    kw = {"window": [16, 32, 32], "tta": True, "amp": "off"}
    assert WindowSettings.take(kw) == WindowSettings((16, 32, 32)) and kw == {"tta": True, "amp": "off"}
    with pytest.raises(InferenceInputError):
        WindowSettings.take({"overlap": 1.0})


def _parser(**kw):
    ap = failures.Parser("ahnet.thing")
    add_window_arguments(ap, **kw)
    return ap


def test_arguments_parse_into_the_settings():
    assert WindowSettings.from_arguments(_parser().parse_args([])) == WindowSettings()
    a = _parser().parse_args(["--window", "8", "16", "16", "--overlap", "0.25", "--sw-batch", "3"])
    assert WindowSettings.from_arguments(a) == WindowSettings((8, 16, 16), 0.25, 3)
    a = _parser(batch_flag="--batch", batch_default=4).parse_args([])
    assert WindowSettings.from_arguments(a).sw_batch == 4
    assert WindowSettings.from_arguments(_parser(batch_flag="--batch").parse_args(["--batch", "5"])).sw_batch == 5
    a = _parser(window=False, batch_flag=None).parse_args(["--overlap", "0.75"])
    assert vars(a) == {"overlap": 0.75} and WindowSettings.from_arguments(a) == WindowSettings(overlap=0.75)


@pytest.mark.parametrize("argv, words", [
    (["--overlap", "1"], "argument --overlap: expected a finite number in [0, 1), got '1'"),
    (["--overlap", "nan"], "argument --overlap"),
    (["--sw-batch", "0"], "argument --sw-batch: expected an integer in [1, 4096], got '0'"),
    (["--window", "0", "8", "8"], "argument --window: expected an integer in [1, 4096], got '0'"),
    (["--window", "8", "8", "99999"], "argument --window"),
])
def test_bad_arguments_are_one_usage_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("ahnet.thing: error: ") and words in err


def _bench_serving_parser():
    from ahnet.bench.serving import add_options
    ap = failures.Parser("ahnet.bench")
    add_options(ap)
    return ap


def _parsers():
    """(name, parse(argv), the flags it needs, its window-batch flag or None, has --window) per command."""
    from ahnet.commands import bench, client, evaluate, predict, rescore
    return [("predict", predict.build_parser().parse_args, ["--input", "i", "--runs", "r", "--out", "o"],
             "--sw-batch", True),
            ("evaluate", evaluate.build_parser().parse_args, ["--runs", "r", "--data", "d"], "--sw-batch", True),
            ("client", client.build_parser().parse_args, ["--url", "h:1", "--input", "i", "--out", "o"], "--batch",
             True),
            ("bench", bench.parse_args, [], "--sw-batch", True),
            ("bench --serving", _bench_serving_parser().parse_args, ["--models", "m"], "--batch", True),
            ("rescore", rescore.build_parser().parse_args, ["--run", "r", "--data", "d"], None, False)]


@pytest.mark.parametrize("index", range(6))
def test_every_command_that_slides_windows_checks_them_at_parse_time(index, capsys):
    name, parse, needed, batch_flag, has_window = _parsers()[index]
    a = parse(needed)
    assert WindowSettings.from_arguments(a).overlap == 0.5, name
    bad = [["--overlap", "1"], ["--overlap", "-0.5"]]
    bad += [[batch_flag, "0"]] if batch_flag else []
    bad += [["--window", "0", "16", "16"]] if has_window else []
    for extra in bad:
        with pytest.raises(SystemExit) as e:
            parse(needed + extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and f"error: argument {extra[0]}" in err, (name, err)
