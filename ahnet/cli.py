"""What every command line of the project shares: how it fails.

Bad input, a usage mistake included, ends as ONE line on stderr, ``<prog>: error: <one sentence>``, and exit
code 2, never a traceback. ``Parser`` is an ``argparse.ArgumentParser`` whose usage errors follow that rule (no
usage block first); ``run`` calls a CLI's body and turns the errors a person can act on (ValueError and its
subclasses, OSError) into that line::

    def main(argv=None) -> int:
        return cli.run("ahnet.predict", lambda: _main(argv))

Under torchrun (WORLD_SIZE > 1) every rank that fails prints its own line, ending ``(rank R of N)``; ranks
other than 0 draw no progress bars.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Mapping, NoReturn

__all__ = ["Parser", "run", "fail", "one_line", "quiet", "program"]

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


class Parser(argparse.ArgumentParser):
    """An ArgumentParser named ``name`` (``ahnet.predict``) whose usage shows ``python -m <name>`` and whose usage
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
    return 0 if rc is None else int(rc)
