"""ahnet.failures: one error line on stderr and exit code 2, for usage errors and input errors alike."""

import pytest
import torch

from ahnet import failures
from ahnet.precision import resolve_device


def test_parser_usage_error_is_one_line(capsys):
    p = failures.Parser("ahnet.thing")
    p.add_argument("--n", type=int, required=True)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ahnet.thing: error: argument --n: invalid int value") and err.count("\n") == 1
    assert "python -m ahnet.thing" in p.format_usage()


def test_run_turns_value_and_os_errors_into_one_line(capsys):
    def bad():
        raise ValueError("first line\nsecond line")

    assert failures.run("ahnet.x", bad) == 2
    assert capsys.readouterr().err == "ahnet.x: error: first line\n"
    assert failures.run("ahnet.x", lambda: open("/nonexistent/dir/f")) == 2
    assert "No such file or directory" in capsys.readouterr().err
    assert failures.run("ahnet.x", lambda: None) == 0 and failures.run("ahnet.x", lambda: 3) == 3

    class Diverged(ValueError):
        pass

    def diverge():
        raise Diverged("stopped")

    assert failures.run("ahnet.x", diverge, codes={Diverged: 3}) == 3
    with pytest.raises(KeyError):                 # a bug stays a traceback
        failures.run("ahnet.x", lambda: {}["k"])


@pytest.mark.parametrize("name, match", [("bogus", "'bogus' is not a torch device"),
                                         ("cuda", "asked for a GPU but this torch"),
                                         ("meta", "only cpu, cuda and mps")])
def test_device_errors_are_one_sentence(name, match):
    if name == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=match) as e:
        resolve_device(name)
    assert "\n" not in str(e.value)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_every_user_facing_command_has_a_console_script():
    import configparser
    import importlib
    from pathlib import Path

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    lines = [ln.strip() for ln in cfg["options.entry_points"]["console_scripts"].splitlines() if ln.strip()]
    scripts = dict(ln.split(" = ") for ln in lines)
    assert set(scripts) == {"ahnet-train", "ahnet-pipeline", "ahnet-experiment", "ahnet-evaluate", "ahnet-predict",
                            "ahnet-cache", "ahnet-phantom", "ahnet-transfer", "ahnet-bench", "ahnet-export",
                            "ahnet-serve", "ahnet-client", "ahnet-rescore", "ahnet-thickness", "ahnet-lever"}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


# every user-facing command: (the module whose main(argv) runs it, the program name its messages carry)
COMMANDS = [
    ("ahnet.commands.train", "ahnet.train"), ("ahnet.commands.pipeline", "ahnet.pipeline"),
    ("ahnet.commands.experiment", "ahnet.experiment"), ("ahnet.commands.evaluate", "ahnet.evaluate"),
    ("ahnet.commands.predict", "ahnet.predict"), ("ahnet.commands.cache", "ahnet.commands.cache"),
    ("weights_transfer.__main__", "weights_transfer"), ("ahnet.commands.bench", "ahnet.bench"),
    ("ahnet.commands.export", "ahnet.export"), ("ahnet.commands.client", "ahnet.client"),
    ("ahnet.commands.serve", "ahnet.serve"), ("ahnet.commands.phantom", "ahnet.data.phantom"),
    ("ahnet.commands.rescore", "ahnet.rescore"), ("ahnet.commands.thickness", "ahnet.thickness"),
    ("ahnet.commands.lever", "ahnet.lever")]


@pytest.mark.parametrize("module, prog", COMMANDS)
def test_help_exits_zero_and_usage_errors_are_one_line_with_the_program_name(module, prog, capsys):
    """--help renders every option's help (argparse %-formats help text: a bare % in one crashed --help); an
    unknown flag is one line naming the program, exit 2."""
    import importlib
    main = importlib.import_module(module).main
    for argv, code in ((["--help"], 0), (["--no-such-flag"], 2)):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == code
    out, err = capsys.readouterr()
    assert out.startswith("usage: ") and prog in out.splitlines()[0]
    assert err.count("\n") == 1 and ("unrecognized arguments: --no-such-flag" in err or "are required" in err)
    assert err.startswith(prog + ": error:")
