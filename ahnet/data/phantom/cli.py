"""CLI: python -m ahnet.data.phantom --out FOLDER [options]; bad options: one error line, exit 2."""
from __future__ import annotations

import argparse
import logging
import time
from typing import Tuple

from . import __doc__ as _package_doc
from .dataset import generate_dataset


PROG = "ahnet.data.phantom"


class _Parser(argparse.ArgumentParser):
    """Bad input: one line `ahnet.data.phantom: error: <problem>` on stderr, exit 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message}\n")


def _pair(s: str, cast=float) -> Tuple:
    """'N' -> (N, N); 'MIN,MAX' or 'MIN:MAX' -> (MIN, MAX)."""
    try:
        parts = [cast(v) for v in str(s).replace(":", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX ({cast.__name__} values), got {s!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX, got {s!r}")
    return tuple(parts)


def main(argv=None) -> int:
    ap = _Parser(prog="python -m ahnet.data.phantom", description=_package_doc.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (imagesTr, labelsTr, annotations.csv, dataset.json)")
    ap.add_argument("--cases", type=int, default=16, help="number of cases")
    ap.add_argument("--seed", type=int, default=0, help="random seed (output is a function of it)")
    ap.add_argument("--size", type=int, default=192, help="in-plane matrix size (voxels)")
    ap.add_argument("--slices", type=int, default=None, help="output slices (default: z-extent / thickness)")
    ap.add_argument("--z-extent", type=float, default=100.0, help="physical z extent in mm when --slices is not given")
    ap.add_argument("--thickness", type=float, default=2.5, help="slice thickness = spacing in mm")
    ap.add_argument("--spacing", type=float, default=0.7, help="in-plane spacing in mm")
    ap.add_argument("--nodules-per-case", type=lambda s: _pair(s, int), default=(1, 3), help="N or MIN,MAX")
    ap.add_argument("--negatives", type=float, default=0.15, help="fraction of cases without nodules")
    ap.add_argument("--shapes", choices=["lidc", "procedural"], default="lidc", help="nodule shape source")
    ap.add_argument("--noise", type=_pair, default=(10.0, 40.0), help="noise std in HU: N or MIN,MAX (0 = off)")
    ap.add_argument("--vessel-density", type=float, default=1.0, help="scales the number of vessel segments")
    ap.add_argument("--no-balance", action="store_true", help="draw types at random instead of balanced")
    ap.add_argument("--previews", type=int, default=3, help="cases with a preview PNG")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    slices = a.slices if a.slices else max(4, int(round(a.z_extent / a.thickness)))
    t = time.perf_counter()
    try:
        p = generate_dataset(a.out, a.cases, a.seed, previews=a.previews, size=a.size, slices=slices,
                             thickness=a.thickness, spacing=a.spacing, nodules_per_case=a.nodules_per_case,
                             negatives=a.negatives, shapes=a.shapes, noise=a.noise,
                             vessel_density=a.vessel_density, balance=not a.no_balance)
    except ValueError as e:
        ap.error(str(e))
    dt = time.perf_counter() - t
    print(f"wrote {p} ({a.cases} cases, {dt:.1f} s, {dt / a.cases:.2f} s/case)")
    return 0
