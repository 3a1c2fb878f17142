"""An experiment's jobs (trainings and second stages in spawned processes, ahnet.commands.jobs) end with the
experiment: killed by SIGKILL, it leaves no job running on, holding its run folder's lock (issue 24's evidence run
found two such orphans, one locking a folder the resumed experiment needed)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:                  # a zombie waiting for init counts as gone
        return f.read().split(") ")[1].startswith("Z")


def _parent_with_a_sleeping_job() -> tuple:
    """(parent process, job pid): a parent that starts a real _Job (the second stage's child function, its work a
    10-minute sleep), prints the job's pid and waits."""
    code = ("import functools, time\n"
            "from ahnet.commands.jobs import _Job, _rescore_in_child\n"
            "j = _Job('sleeper', functools.partial(time.sleep, 600), 1, target=_rescore_in_child)\n"
            "print(j.proc.pid, flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    return parent, int(parent.stdout.readline())


def _kill_and_expect_the_job_gone(parent, child: int, what: str) -> None:
    """SIGKILL ``parent``; the job must be gone within 120 s (a loaded machine may still be importing it)."""
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if _gone(child):
            return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    pytest.fail(f"job {child} outlived {what}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_job_of_a_killed_experiment_ends_with_it():
    """SIGKILL of the parent once the job has started ends the job within seconds."""
    parent, child = _parent_with_a_sleeping_job()
    time.sleep(3)                                         # the child is past its start (imports, prctl)
    assert not _gone(child), "the job ended before its parent was killed"
    _kill_and_expect_the_job_gone(parent, child, "its killed experiment")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_job_whose_experiment_died_while_it_started_ends_too():
    """SIGKILL of the parent the moment the job is started, while the spawned child still imports (seconds, more
    on a loaded machine), before it could ask for the signal: it finds itself orphaned and ends."""
    parent, child = _parent_with_a_sleeping_job()
    _kill_and_expect_the_job_gone(parent, child, "the experiment that died while it started")


def test_every_job_child_asks_to_die_with_its_parent_first():
    import inspect

    from ahnet.commands import jobs
    for fn in (jobs._train_in_child, jobs._rescore_in_child):
        body = inspect.getsource(fn).split('\n', 1)[1].lstrip()
        assert body.startswith("failures.die_with_parent(_started_by())"), fn.__name__
