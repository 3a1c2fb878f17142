"""Query an ahnet Triton server: what ``python -m ahnet.predict`` writes, with the model behind ``--url``.

    python -m ahnet.client --url localhost:8000 --input scans/ --out pred/ [--model NAME] [--protocol grpc]

Inputs as ahnet.predict (an image file, a DICOM series folder, a folder of images, or a dataset.json with
``--split``). Per case, through ahnet.predict's own reading, scaling and writing (``write_predictions``): HU
clipped and scaled to [0, 1], then ahnet.infer's sliding windows (``sliding_window_predict``: the same windows,
padding and Gaussian blending; ``window_for`` with the served model's input multiple and default window) run on
this machine, ``--batch`` windows per request to the server, which answers their probabilities (the ensemble's
mean by default). Writes ``<out>/<case_id>_prob.nii.gz``, ``<out>/<case_id>_mask.nii.gz`` and
``<out>/candidates.csv`` exactly as ahnet.predict does.

A refused connection is retried ``--retries`` times, ``--retry-wait`` seconds apart, with a message on stderr each
time; then the client exits with code 2. Bad input and a server's error reply print one line
``ahnet.client: error: ...`` and exit 2.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ahnet import cli, predict
from ahnet.infer import CandidateRule, add_candidate_arguments, rule_from_arguments, sliding_window_predict, window_for
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
    """The sentence of a Triton error reply: the model's RequestError sentence (PyTriton sends it inside a
    traceback), else Triton's own message without its status and request-id prefixes and its NOTE."""
    msg = getattr(exc, "message", None)
    text = str((msg() if callable(msg) else msg) or exc).replace("\\n", "\n")
    found = re.search(r"RequestError: ([^\n]+)", text)
    if found:
        return found.group(1).strip()[:400]
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


def remote_probability(remote: RemoteWindows, default_window, window=None, overlap: float = 0.5, batch: int = 4,
                       tta: bool = False):
    """image01 (z, y, x) -> (z, y, x) float32 probabilities through the server: ahnet.infer's sliding windows with
    ``remote`` as the model (it answers probabilities, so no activation on top), the window by window_for."""
    def probability(image01: np.ndarray) -> np.ndarray:
        win = window_for(image01.shape, remote.input_multiple, default_window, window)
        x = torch.from_numpy(np.ascontiguousarray(image01, np.float32))[None, None]
        p = sliding_window_predict(remote, x, window=win, overlap=overlap, batch_size=batch, flip_tta=tta,
                                   amp=False, activation=None)
        return p[0, 0].numpy()
    return probability


def run_cases(conn: Connection, model: str, cases, out, window=None, overlap: float = 0.5, batch: int = 4,
              tta: bool = False, threshold: float = 0.5, candidates: CandidateRule | None = None) -> dict:
    """Predict every case through the server and write ahnet.predict's files (candidates by the rule
    ``candidates``, default ahnet.infer.DEFAULT_RULE, as ahnet.predict); returns {"cases", "failed",
    "candidates", "csv"}."""
    meta = model_info(conn)
    multiple = tuple(int(m) for m in meta["input_multiple"])
    if window is not None:
        window_for((1, 1, 1), multiple, meta["window"], window)          # checked before the first case
    remote = RemoteWindows(conn, model, multiple)
    probability = remote_probability(remote, meta["window"], window, overlap, batch, tta)
    return predict.write_predictions(cases, out, probability, threshold, candidates)


def build_parser() -> cli.Parser:
    ap = cli.Parser(PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="HOST:PORT of the server's HTTP (or --protocol grpc) endpoint")
    ap.add_argument("--protocol", choices=("http", "grpc"), default="http")
    ap.add_argument("--input", required=True, help="image file, DICOM folder, folder of images, or dataset.json")
    ap.add_argument("--split", default=None, help="dataset.json split(s), comma-separated (default all)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--model", default=None, help="served model (default: the server's ensemble <name>; "
                                                  "<name>-fold<k> for one fold)")
    ap.add_argument("--window", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                    help="3D window (default: the served model's window, as ahnet.predict)")
    ap.add_argument("--overlap", type=float, default=0.5, help="window overlap fraction in [0, 1)")
    ap.add_argument("--batch", type=int, default=4, help="windows per request")
    ap.add_argument("--tta", action="store_true", help="mean over the 4 in-plane flips")
    ap.add_argument("--threshold", type=float, default=0.5, help="mask threshold on probability, in [0, 1]")
    add_candidate_arguments(ap)
    ap.add_argument("--retries", type=int, default=3, help="retries of a refused connection")
    ap.add_argument("--retry-wait", type=float, default=1.0, help="seconds between retries")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    return ap


def _check(a) -> None:
    if ":" not in a.url or not a.url.rsplit(":", 1)[1].isdigit():
        raise ClientError(f"--url {a.url!r} must be HOST:PORT")
    if not 0 <= a.overlap < 1:
        raise ClientError(f"--overlap {a.overlap} must lie in [0, 1)")
    if a.batch < 1:
        raise ClientError(f"--batch {a.batch} must be >= 1")
    if not 0 <= a.threshold <= 1:
        raise ClientError(f"--threshold {a.threshold} must be a probability in [0, 1]")
    if a.retries < 0 or a.retry_wait < 0 or a.timeout <= 0:
        raise ClientError("--retries and --retry-wait must be >= 0 and --timeout > 0")
    cli.check_output_dir(a.out, "--out")


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    return cli.run(PROG, lambda: _main(a))


def _main(a) -> int:
    _check(a)
    cases = predict.find_cases(a.input, a.split)
    conn = Connection(a.url, a.protocol, a.retries, a.retry_wait, a.timeout)
    conn.ready()
    model = a.model or model_info(conn)["name"]
    conn.call(f"model {model}", lambda: conn.client.get_model_metadata(model))   # served? before the first scan
    res = run_cases(conn, model, cases, a.out, window=a.window, overlap=a.overlap, batch=a.batch, tta=a.tta,
                    threshold=a.threshold, candidates=rule_from_arguments(a))
    print(f"{len(res['cases'])} case(s) via {a.url} model {model} -> {Path(a.out)}; "
          f"{res['candidates']} candidates in {res['csv']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
