"""``python -m ahnet.client`` (console script ``ahnet-client``): what ``python -m ahnet.predict`` writes, with the
windows answered by an ahnet Triton server (the client library: ahnet.serve.client).

    python -m ahnet.client --url localhost:8000 --input scans/ --out pred/ [--model NAME] [--protocol grpc]

Writes what ``python -m ahnet.predict`` writes, the overview pictures and, for DICOM series, the DICOM SEG and SR
included (the SEG and SR name the algorithm "ahnet <served model>"), with the same ``--dicom-out``,
``--no-dicom-out``, ``--sr-threshold`` and ``--no-preview``.

A refused connection is retried ``--retries`` times, ``--retry-wait`` seconds apart, with a message on stderr each
time; then the client exits with code 2. Bad input and a server's error reply print one line
``ahnet.client: error: ...`` and exit 2.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from ahnet import failures
from ahnet.data.budget import add_limit_argument, scan_limit
from ahnet.infer import WindowSettings, add_candidate_arguments, add_window_arguments, rule_from_arguments
from ahnet.infer.outputs import add_output_arguments, check_outputs, outputs_from_arguments
from ahnet.infer.scans import CheckedInput, check_scan_sizes, find_cases
from ahnet.infer.spacing import add_inplane_argument
from ahnet.serve.client import ClientError, Connection, model_info, run_cases, served_inplane

PROG = "ahnet.client"

def build_parser() -> failures.Parser:
    ap = failures.Parser(PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="HOST:PORT of the server's HTTP (or --protocol grpc) endpoint")
    ap.add_argument("--protocol", choices=("http", "grpc"), default="http")
    ap.add_argument("--input", required=True, help="image file, DICOM folder, folder of images, or dataset.json")
    ap.add_argument("--split", default=None, help="dataset.json split(s), comma-separated (default all)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--model", default=None, help="served model (default: the server's ensemble <name>; "
                                                  "<name>-fold<k> for one fold)")
    add_window_arguments(ap, batch_flag="--batch", batch_default=4, batch_help="windows per request",
                         window_help="3D window (default: the served model's window, as ahnet.commands.predict)")
    add_inplane_argument(ap)
    ap.add_argument("--tta", action="store_true", help="mean over the 4 in-plane flips")
    ap.add_argument("--threshold", type=float, default=0.5, help="mask threshold on probability, in [0, 1]")
    add_candidate_arguments(ap)
    add_output_arguments(ap)
    ap.add_argument("--retries", type=int, default=3, help="retries of a refused connection")
    ap.add_argument("--retry-wait", type=float, default=1.0, help="seconds between retries")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    add_limit_argument(ap)
    return ap


def _check(a) -> None:
    if ":" not in a.url or not a.url.rsplit(":", 1)[1].isdigit():
        raise ClientError(f"--url {a.url!r} must be HOST:PORT")
    if not 0 <= a.threshold <= 1:
        raise ClientError(f"--threshold {a.threshold} must be a probability in [0, 1]")
    if a.retries < 0 or a.retry_wait < 0 or a.timeout <= 0:
        raise ClientError("--retries and --retry-wait must be >= 0 and --timeout > 0")
    failures.check_output_dir(a.out, "--out")


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    return failures.run(PROG, lambda: _main(a))


def _main(a) -> int:
    _check(a)
    cases = find_cases(a.input, a.split)
    limit = scan_limit("client", a.max_scan_voxels)
    headers = check_scan_sizes(cases, limit)        # every header before the server is asked anything, read once
    outputs = check_outputs(cases, outputs_from_arguments(a, "ahnet"))              # before any connection
    conn = Connection(a.url, a.protocol, a.retries, a.retry_wait, a.timeout)
    conn.ready()
    meta = model_info(conn)
    model = a.model or meta["name"]
    conn.call(f"model {model}", lambda: conn.client.get_model_metadata(model))   # served? before the first scan
    outputs = replace(outputs, algorithm=replace(outputs.algorithm, name=f"ahnet {model}"))   # named in SEG/SR
    inplane = served_inplane(meta, a.inplane_spacing)
    if inplane is not None:                         # the grids the scans are predicted on, before the first
        headers = check_scan_sizes(cases, limit, inplane=inplane, known=headers)
    res = run_cases(conn, model, cases, a.out, WindowSettings.from_arguments(a), tta=a.tta, threshold=a.threshold,
                    candidates=rule_from_arguments(a), checked=CheckedInput(limit, headers, outputs, inplane))
    print(f"{len(res['cases'])} case(s) via {a.url} model {model} -> {Path(a.out)}; "
          f"{res['candidates']} candidates in {res['csv']}; {res['overviews']} overview picture(s)"
          + (f"; DICOM SEG and SR for {len(res['dicom'])} case(s)" if res["dicom"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
