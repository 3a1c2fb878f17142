"""What every command line of the project shares: how it fails.

Bad input, a usage mistake included, ends as ONE line on stderr, ``<prog>: error: <one sentence>``, and exit
code 2, never a traceback. ``Parser`` is an ``argparse.ArgumentParser`` whose usage errors follow that rule (no
usage block first); ``run`` calls a CLI's body and turns the errors a person can act on (ValueError and its
subclasses, OSError) into that line::

    def main(argv=None) -> int:
        return cli.run("ahnet.commands.predict", lambda: _main(argv))

Under torchrun (WORLD_SIZE > 1) every rank that fails prints its own line, ending ``(rank R of N)``; ranks
other than 0 draw no progress bars.

Every option is checked before expensive work: ``number`` makes argparse types that refuse NaN, infinities and
values out of range (``--lr inf`` is a usage error, exit 2), and ``check_output_dir`` / ``check_output_file``
check an output place (not a file where a folder is meant, writable, or creatable under a writable folder)
before anything is read or written.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Mapping, NoReturn

__all__ = ["Parser", "run", "fail", "one_line", "quiet", "program", "warn", "number", "check_output_dir",
           "check_output_file", "die_with_parent"]

_program: str | None = None     # the command run() is running (the watchdog of a distributed run fails in its name)


def _rank_suffix() -> str:
    """" (rank R of N)" under torchrun (WORLD_SIZE > 1), else ""."""
    world, rank = os.environ.get("WORLD_SIZE", ""), os.environ.get("RANK", "")
    return f" (rank {rank} of {world})" if world.isdigit() and int(world) > 1 and rank.isdigit() else ""


def program() -> str:
    """The name of the command running (set by run()), for errors raised outside its body."""
    return _program or "ahnet"


def quiet() -> bool:
    """No progress bars: under CI, when stderr is not a terminal (so an error line stays the only line), or on a
    torchrun rank other than 0."""
    return (os.environ.get("CI", "").lower() in ("1", "true", "yes") or not sys.stderr.isatty()
            or os.environ.get("RANK", "0") not in ("", "0"))


def one_line(message: object) -> str:
    """The first non-empty line of a message (an error line never spans lines)."""
    lines = [s.strip() for s in str(message).splitlines() if s.strip()]
    return lines[0] if lines else type(message).__name__


def fail(prog: str, message: object, code: int = 2) -> int:
    """Print ``<prog>: error: <message>`` on stderr; returns ``code`` (2) for ``return fail(...)``."""
    print(f"{prog}: error: {one_line(message)}{_rank_suffix()}", file=sys.stderr, flush=True)
    return code


def warn(prog: str, message: object) -> None:
    """Print ``<prog>: warning: <message>`` on stderr (the run goes on)."""
    print(f"{prog}: warning: {one_line(message)}", file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser named ``name`` (``ahnet.commands.predict``) whose usage shows ``python -m <name>`` and whose usage
    errors are one line ``<name>: error: ...`` with exit code 2."""

    def __init__(self, name: str, **kw):
        kw.setdefault("prog", f"python -m {name}")
        super().__init__(**kw)
        self.name = name

    def error(self, message: str) -> NoReturn:
        fail(self.name, message)
        sys.exit(2)


def run(prog: str, body: Callable[[], int | None], codes: Mapping[type, int] | None = None) -> int:
    """Call ``body()``; its return value (None = 0) is the exit code. A ValueError or OSError becomes one error
    line and exit code 2 (or ``codes[type]`` for the first matching exception type)."""
    global _program
    _program = prog
    try:
        rc = body()
    except (ValueError, OSError) as e:
        code = next((c for t, c in (codes or {}).items() if isinstance(e, t)), 2)
        return fail(prog, e, code)
    except MemoryError as e:
        return fail(prog, f"out of memory ({one_line(e) if str(e) else 'MemoryError'}); use smaller sizes", 2)
    except KeyboardInterrupt:
        return fail(prog, "interrupted", 130)
    return 0 if rc is None else int(rc)


# ------------------------------------------------------------------------------------------ option checks
def _bound(v, lo, hi, lo_open, hi_open) -> bool:
    return ((lo is None or (v > lo if lo_open else v >= lo)) and
            (hi is None or (v < hi if hi_open else v <= hi)))


def describe_range(lo=None, hi=None, lo_open=False, hi_open=False) -> str:
    """'> 0', '>= 0', 'in [0, 1]', 'in [0, 1)', ... for the messages."""
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "finite"


def number(kind: type = float, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
           none: bool = False, what: str | None = None) -> Callable[[str], float]:
    """An argparse ``type``: a finite ``kind`` (int or float) in the given range (open ends with ``*_open``);
    ``none``: also 'none' -> None; ``what``: the value's name in the message (default "an integer" / "a finite
    number"). ``--lr inf`` -> ``error: argument --lr: expected a finite number > 0, got 'inf'``."""
    what = what or ("an integer" if kind is int else "a finite number")
    want = f"{what} {describe_range(lo, hi, lo_open, hi_open)}"

    def parse(s: str):
        if none and str(s).strip().lower() in ("none", "null", ""):
            return None
        try:
            v = kind(s)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {want}, got {s!r}") from None
        if (kind is float and not math.isfinite(v)) or not _bound(v, lo, hi, lo_open, hi_open):
            raise argparse.ArgumentTypeError(f"expected {want}, got {s!r}")
        return v

    parse.__name__ = kind.__name__
    return parse


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path, flag: str = "--out", access: Callable[[str, int], bool] | None = None) -> Path:
    """Check before any work that ``path`` can be an output folder: an existing folder we may write into, or a
    missing one whose nearest existing parent is such a folder. ValueError (one sentence naming ``flag``)
    otherwise. ``access``: os.access when None (tests inject another). Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; expected a folder (created if missing)")
    base = _nearest_existing(path.absolute())
    if not base.is_dir():
        raise ValueError(f"{flag} {path}: {base} is a file, so the folder cannot be created there")
    if not (access or os.access)(str(base), os.W_OK | os.X_OK):
        what = "folder" if base == path.absolute() else f"folder cannot be created: {base}"
        raise ValueError(f"{flag} {path}: permission denied (the {what} is not writable for this user)")
    return path


def check_output_file(path, flag: str = "--out", access: Callable[[str, int], bool] | None = None) -> Path:
    """Check before any work that a file can be written at ``path`` (not a folder; its folder writable or
    creatable, as check_output_dir; an existing file replaced only when its folder is writable)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; expected a file name")
    check_output_dir(path.parent if str(path.parent) else Path("."), flag, access)
    return path


def die_with_parent(parent_pid: int | None = None) -> None:
    """In a child before it runs (Linux): SIGTERM it when the process that started it dies, even by SIGKILL, so a
    killed command leaves nothing running behind it (a Triton server, an experiment's trainings holding their run
    folders' locks). ``parent_pid``: that process's pid, when the child knows it (an experiment's spawned jobs,
    which import for seconds first): a child orphaned before this call ends at once. Elsewhere: nothing."""
    import signal
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:   # orphaned before the prctl: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)
