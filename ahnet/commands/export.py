"""``python -m ahnet.export`` (console script ``ahnet-export``): every fold of trained runs as TorchScript and ONNX,
verified against PyTorch, with model.json (the library and what is verified: ahnet.serve.export).

    python -m ahnet.export --runs runs/ahnet_cv --out models/ahnet_cv [--formats torchscript onnx] [--opset 18]
"""
from __future__ import annotations

import sys

from ahnet import failures
from ahnet.serve import store
from ahnet.serve.export import DEFAULT_OPSET, DEFAULT_TOL, VerificationError, export_runs

PROG = "ahnet.export"

def build_parser() -> failures.Parser:
    ap = failures.Parser(PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True,
                    help="run folders, checkpoint files, a folder of fold<k> runs, or X of X-fold<k> folders")
    ap.add_argument("--out", required=True, help="output folder, e.g. models/<name> (the name served)")
    ap.add_argument("--formats", nargs="+", default=list(store.FORMATS), help="torchscript and/or onnx")
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    ap.add_argument("--tol", type=float, default=DEFAULT_TOL,
                    help="max |diff| allowed in probability, and x max |logit| in logits (default %(default)g)")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument("--seed", type=int, default=0, help="seed of the verification volumes")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)

    def body() -> None:
        export_runs(a.runs, a.out, a.formats, a.opset, a.tol, a.force, a.seed)
    return failures.run(PROG, body, codes={VerificationError: 1})


if __name__ == "__main__":
    sys.exit(main())
