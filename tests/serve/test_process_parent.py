"""A server started by ahnet.serve.process dies with the process that started it, even when that one is killed."""
import os
import signal
import subprocess
import sys
import time

import pytest

from ahnet.serve import process


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_started_like_the_server_dies_when_its_parent_is_killed(tmp_path):
    """A parent starts a long child exactly as ServerProcess starts the server (own session, die_with_parent),
    prints its pid and waits; SIGKILL of the parent ends the child within seconds."""
    code = ("import subprocess, sys, time\n"
            "from ahnet.serve.process import die_with_parent\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True,\n"
            "                     preexec_fn=die_with_parent)\n"
            "print(c.pid, flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/stat") as f:            # a zombie waiting for init counts as gone
            if f.read().split(") ")[1].startswith("Z"):
                return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    pytest.fail(f"child {child} outlived its killed parent")


def test_die_with_parent_is_what_the_server_process_is_started_with():
    import inspect
    assert "preexec_fn=die_with_parent" in inspect.getsource(process.ServerProcess.__init__)
