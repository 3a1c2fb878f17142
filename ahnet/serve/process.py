"""``python -m ahnet.serve`` as a child process on free local ports: started with a bounded wait, always stopped.

    with ServerProcess("models/X", log="serve.log", args=["--backend", "onnx"]) as srv:
        ...  # srv.url (HTTP HOST:PORT), srv.grpc_url, srv.metrics_url, srv.proc, srv.peak_rss_mb()

The server runs in its own session (process group), so ``stop()`` reaches everything it started: SIGTERM (the
server's clean shutdown, which stops tritonserver and its model stubs), then SIGKILL of the whole group for
anything left. Used by the serving benchmark and the serving tests; needs no serving dependency itself.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ahnet.failures import die_with_parent

READY_LINE = "[serve] ready"       # what python -m ahnet.serve prints once Triton answers
STOPPED_LINE = "[serve] stopped in"


class ServerStartError(RuntimeError):
    """The server exited or did not become ready in time; the message ends with its log's tail."""


def free_ports(n: int = 3, address: str = "127.0.0.1") -> list:
    """``n`` distinct TCP ports that were free on ``address`` a moment ago (the OS picked them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((address, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def process_tree(pid: int) -> set:
    """Every live process below ``pid`` (read from /proc)."""
    children: dict = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def tree_rss_mb(pid: int) -> float:
    """Resident memory (MB) of ``pid`` and every process below it."""
    total = 0.0
    for p in [pid, *process_tree(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


class ServerProcess:
    """A running ``python -m ahnet.serve --models MODELS`` on free local ports (see the module docstring).

    args: further server options (--backend, --max-batch, ...); env: the child's environment (default: this
    one); log: where its stdout and stderr go; sample_rss: sample the process tree's memory every 0.2 s.
    """

    def __init__(self, models, log, args=(), env=None, cwd=None, start_timeout_s: float = 240.0,
                 sample_rss: bool = False):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log = Path(log)
        cmd = [sys.executable, "-m", "ahnet.serve", "--models", str(models), "--http-port", str(self.http),
               "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), *args]
        self._fh = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     start_new_session=True, preexec_fn=die_with_parent)
        self._peak, self._done = 0.0, threading.Event()
        try:
            self._wait_ready(start_timeout_s)
        except BaseException:
            self.stop()
            raise
        if sample_rss:
            threading.Thread(target=self._sample, daemon=True).start()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while READY_LINE not in self.log_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else \
                    f"was not ready after {timeout_s:g} s"
                raise ServerStartError(f"python -m ahnet.serve {why}:\n{self.log_text()[-3000:]}")
            time.sleep(0.25)

    def _sample(self) -> None:
        while not self._done.wait(0.2):
            self._peak = max(self._peak, tree_rss_mb(self.proc.pid))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics}/metrics"

    def peak_rss_mb(self) -> float:
        """The largest memory of the server's process tree seen so far (sample_rss=True), MB."""
        return self._peak

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL whatever is left of the group; idempotent. Returns the
        server's exit code."""
        self._done.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        rc = self.proc.wait(timeout=timeout_s)
        if not self._fh.closed:
            self._fh.close()
        return rc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
