"""Query an ahnet Triton server: what ``python -m ahnet.predict`` writes, with the model behind ``--url``.

    python -m ahnet.client --url localhost:8000 --input scans/ --out pred/ [--model NAME] [--protocol grpc]

Inputs as ahnet.commands.predict (an image file, a DICOM series folder, a folder of images, or a dataset.json with
``--split``). Per case, through ahnet.commands.predict's own reading, scaling and writing (``write_predictions``): HU
clipped and scaled to [0, 1], then ahnet.infer's sliding windows (``sliding_window_predict``: the same windows,
padding and Gaussian blending; ``window_for`` with the served model's input multiple and default window) run on
this machine, ``--batch`` windows per request to the server, which answers their probabilities (the ensemble's
mean by default). Writes ``<out>/<case_id>_prob.nii.gz``, ``<out>/<case_id>_mask.nii.gz``, the overview picture,
for a DICOM series the DICOM SEG and SR, and ``<out>/candidates.csv`` exactly as ahnet.commands.predict does.

A refused connection is retried ``--retries`` times, ``--retry-wait`` seconds apart, with a message on stderr each
time; then the client exits with code 2. Bad input and a server's error reply print one line
``ahnet.serve.client: error: ...`` and exit 2.
"""
from __future__ import annotations

import json
import re
import sys
import time

import numpy as np
import torch
from torch import nn

from ahnet.data.budget import ScanLimit, scan_limit
from ahnet.infer.outputs import CaseOutputs
from ahnet.infer.scans import CheckedInput, write_predictions
from ahnet.infer import CandidateRule, WindowSettings, sliding_window_predict, window_for
from ahnet.infer.spacing import AUTO, inplane_from
from ahnet.serve import store

PROG = "ahnet.client"


class ClientError(ValueError):
    """An option, input or server reply the client cannot use (one sentence)."""


def _connection_refused(exc: BaseException) -> bool:
    """True for errors that mean nothing listens (or it went away): retried."""
    seen = exc
    for _ in range(6):
        if seen is None:
            break
        if isinstance(seen, (ConnectionError, TimeoutError)) or "connect" in str(seen).lower() or \
                "unavailable" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Connection:
    """A Triton client (HTTP or gRPC) that retries refused connections with a message, then raises ClientError."""

    def __init__(self, url: str, protocol: str = "http", retries: int = 3, wait_s: float = 1.0,
                 timeout_s: float = 600.0, log=None):
        if protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        self.tc, self.url, self.protocol = tc, url, protocol
        self.retries, self.wait_s = retries, wait_s
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        kw = {} if protocol == "grpc" else {"connection_timeout": timeout_s, "network_timeout": timeout_s}
        self.client = tc.InferenceServerClient(url=url, **kw)
        self.timeout_s = timeout_s

    def call(self, what: str, fn):
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as e:                        # tritonclient raises several kinds; sort them here
                if isinstance(e, ClientError):
                    raise
                if not _connection_refused(e):
                    raise ClientError(f"{what}: the server answered: {server_message(e)}") from None
                if attempt == self.retries:
                    raise ClientError(f"no server answers at {self.url} ({self.protocol}): connection refused "
                                      f"{self.retries + 1} times; start one with bash run.sh serve --models "
                                      f"models/<name>") from None
                self.log(f"{PROG}: {what}: connection to {self.url} refused; retry {attempt + 1}/{self.retries} "
                         f"in {self.wait_s:g} s")
                time.sleep(self.wait_s)

    def infer(self, model: str, inputs: dict, output: str) -> np.ndarray:
        tc = self.tc

        def once():
            ins = []
            for name, arr in inputs.items():
                dt = "BYTES" if arr.dtype == object else {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32",
                                                          np.dtype(np.float64): "FP64"}[arr.dtype]
                i = tc.InferInput(name, list(arr.shape), dt)
                i.set_data_from_numpy(arr)
                ins.append(i)
            kw = {} if self.protocol == "http" else {"client_timeout": self.timeout_s}
            res = self.client.infer(model, ins, outputs=[tc.InferRequestedOutput(output)], **kw)
            return res.as_numpy(output)
        return self.call(f"model {model}", once)

    def ready(self) -> None:
        """Wait until the server and its models are ready (refused connections and loading models are retried
        --retries times, --retry-wait apart)."""
        for attempt in range(self.retries + 1):
            if self.call("server ready?", self.client.is_server_ready) and \
                    self.call("models ready?", lambda: self.client.is_model_ready(store.INFO_MODEL)):
                return
            if attempt < self.retries:
                self.log(f"{PROG}: the server at {self.url} is up but its models are not ready; retry "
                         f"{attempt + 1}/{self.retries} in {self.wait_s:g} s")
                time.sleep(self.wait_s)
        raise ClientError(f"the server at {self.url} answers but its model {store.INFO_MODEL} is not ready; is it "
                          f"an ahnet server (bash run.sh serve)?")


def server_message(exc: BaseException) -> str:
    """The sentence of a Triton error reply (the model's own, or Triton's) without Triton's status and request-id
    prefixes and its NOTE; the first line of anything longer."""
    msg = getattr(exc, "message", None)
    text = str((msg() if callable(msg) else msg) or exc).replace("\\n", "\n")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    first = re.sub(r"^(\[\d+\]\s*)?(\[request id: [^\]]*\]\s*)?", "", first)
    return first.split(" NOTE:")[0][:400]


def model_info(conn: Connection) -> dict:
    """model.json of the served ensemble (from the server's ``ahnet-info`` model)."""
    raw = conn.infer(store.INFO_MODEL, {"query": np.zeros(1, np.int32)}, "model_json")
    try:
        return json.loads(raw.reshape(-1)[0])
    except (ValueError, TypeError) as e:
        raise ClientError(f"model {store.INFO_MODEL} answered something that is not model.json ({e})") from None


class RemoteWindows(nn.Module):
    """Windows (B, 1, D, H, W) -> the served model's probabilities, one request per call (for ahnet.infer)."""

    def __init__(self, conn: Connection, model: str, multiple):
        super().__init__()
        self.conn, self.model = conn, model
        self.input_multiple = tuple(int(m) for m in multiple)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), np.float32)
        p = self.conn.infer(self.model, {store.INPUT: arr}, store.OUTPUT)
        if p.shape != arr.shape:
            raise ClientError(f"model {self.model} answered shape {p.shape} for windows {arr.shape}")
        return torch.from_numpy(np.array(p, np.float32))


def remote_probability(remote: RemoteWindows, default_window, windows: WindowSettings, tta: bool = False):
    """image01 (z, y, x) -> (z, y, x) float32 probabilities through the server: ahnet.infer's sliding windows with
    ``remote`` as the model (it answers probabilities, so no activation on top), the window by window_for,
    ``windows.sw_batch`` windows per request."""
    def probability(image01: np.ndarray) -> np.ndarray:
        win = window_for(image01.shape, remote.input_multiple, default_window, windows.window)
        x = torch.from_numpy(np.ascontiguousarray(image01, np.float32))[None, None]
        p = sliding_window_predict(remote, x, window=win, overlap=windows.overlap, batch_size=windows.sw_batch,
                                   flip_tta=tta, amp=False, activation=None)
        return p[0, 0].numpy()
    return probability


def served_inplane(meta: dict, setting="auto") -> tuple | None:
    """The (sy, sx) mm the client predicts scans at under ``setting`` (auto, native or mm: ahnet.infer.spacing's
    inplane_from), auto taking the served model.json's ``spacing.training_inplane_mm`` (null or absent: each scan's
    own grid)."""
    got = (meta.get("spacing") or {}).get("training_inplane_mm") if setting == AUTO else None
    if got is not None and (len(got) != 2 or not all(isinstance(v, (int, float)) and v > 0 for v in got)):
        raise ClientError(f"the served model.json has spacing.training_inplane_mm {got!r}; expected 2 values > 0")
    return inplane_from(setting, tuple(float(v) for v in got) if got is not None else None)


def run_cases(conn: Connection, model: str, cases, out, windows: WindowSettings, tta: bool = False,
              threshold: float = 0.5, candidates: CandidateRule | None = None, limit: ScanLimit | None = None,
              outputs: CaseOutputs | None = None, checked: CheckedInput | None = None, inplane="auto") -> dict:
    """Predict every case through the server and write ahnet.commands.predict's files (candidates by the rule
    ``candidates``, default ahnet.infer.DEFAULT_RULE, and the overview and DICOM files by ``outputs``, as
    ahnet.commands.predict; scans up to ``limit``, default ahnet.data.budget's "client" limit; or ``checked``,
    the up-front checks' CheckedInput, instead of ``limit``, ``outputs`` and ``inplane``: not checked again), each
    scan at in-plane spacing ``inplane`` (served_inplane); returns write_predictions' dict."""
    meta = model_info(conn)
    multiple = tuple(int(m) for m in meta["input_multiple"])
    if windows.window is not None:
        window_for((1, 1, 1), multiple, meta["window"], windows.window)   # checked before the first case
    remote = RemoteWindows(conn, model, multiple)
    probability = remote_probability(remote, meta["window"], windows, tta)
    if checked is None:
        limit = limit or scan_limit("client")
        return write_predictions(cases, out, probability, threshold, candidates, limit=limit, outputs=outputs,
                                 inplane=served_inplane(meta, inplane))
    return write_predictions(cases, out, probability, threshold, candidates, checked=checked)
