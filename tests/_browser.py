"""Headless Chromium for the tests, driven over its DevTools protocol on a pipe (``--remote-debugging-pipe``: no
port, no websocket library): open a page, record what it logs and requests, evaluate JavaScript in it and take a
full-page screenshot. Debian's ``chromium`` package (never a downloaded browser); run as root, hence
``--no-sandbox``."""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--hide-scrollbars", "--mute-audio",
         "--remote-debugging-pipe")


def chromium() -> str | None:
    """The Chromium executable on PATH, or None."""
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


class BrowserError(RuntimeError):
    """The browser answered a command with an error, closed its pipe, or did not answer in time."""


class Browser:
    """One headless Chromium; ``with Browser(exe, profile) as b: page = b.open(url)``. Every protocol event
    received is kept in ``events`` (method, params)."""

    def __init__(self, exe: str, profile: Path, timeout_s: float = 60.0):
        self.timeout_s, self.events, self._buf, self._id = timeout_s, [], b"", 0
        profile.mkdir(parents=True, exist_ok=True)
        self.log_path = profile / "chromium.log"
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()
        # the protocol pipe is fds 3 (commands in) and 4 (replies out) of the browser process (bash: dash takes
        # single-digit file descriptors only)
        cmd = ["bash", "-c", f'exec "$0" "$@" 3<&{to_r} 4>&{from_w}', exe, *FLAGS, f"--user-data-dir={profile}",
               "about:blank"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, pass_fds=(to_r, from_w), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        os.close(to_r)
        os.close(from_w)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.send("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_w, self._from_r):
            try:
                os.close(fd)
            except OSError:
                pass

    def _next_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._from_r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise BrowserError(f"no answer from chromium in {self.timeout_s:g} s (log: {self.log_path})")
            chunk = os.read(self._from_r, 1 << 20)
            if not chunk:
                raise BrowserError(f"chromium closed its pipe (log: {self.log_path})")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def _wait(self, match) -> dict:
        """Read messages until ``match(message)``; the events met on the way are kept."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            m = self._next_message(deadline)
            if match(m):
                return m
            if "method" in m:
                self.events.append((m["method"], m.get("params", {})))

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """One protocol command; its result (BrowserError on an error reply)."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        reply = self._wait(lambda m, i=self._id: m.get("id") == i)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def open(self, url: str) -> str:
        """A new tab showing ``url``, loaded (its load event fired), with console, log and network events on;
        returns its session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send("Page.navigate", {"url": url}, session)
        self._wait(lambda m: m.get("method") == "Page.loadEventFired" and m.get("sessionId") == session)
        return session

    def evaluate(self, session: str, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        res = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                             "returnByValue": True}, session)
        if "exceptionDetails" in res:
            raise BrowserError(f"JavaScript failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def screenshot(self, session: str, width: int = 1280) -> bytes:
        """The whole page (not only the window) as PNG bytes, ``width`` CSS pixels wide."""
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1,
                                                         "mobile": False}, session)
        size = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                    "clip": {"x": 0, "y": 0, "width": width,
                                                             "height": int(size["height"]), "scale": 1}}, session)
        return base64.b64decode(shot["data"])

    def problems(self, since: int = 0) -> list:
        """Console errors and assertions, uncaught exceptions and error log entries among the events from index
        ``since`` on."""
        out = []
        for method, p in self.events[since:]:
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(("console", [a.get("value", a.get("description")) for a in p.get("args", [])]))
            elif method == "Runtime.exceptionThrown":
                out.append(("exception", p.get("exceptionDetails", {}).get("text")))
            elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(("log", p["entry"].get("text"), p["entry"].get("url")))
        return out

    def requests(self, since: int = 0) -> list:
        """The URLs requested, among the events from index ``since`` on."""
        return [p["request"]["url"] for method, p in self.events[since:] if method == "Network.requestWillBeSent"]
