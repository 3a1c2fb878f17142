"""``python -m ahnet.commands.cache`` (console script ``ahnet-cache``; ``bash run.sh data`` runs it after the phantom):
the HDF5 training cache of a dataset (the cache itself: ahnet.data.cache).
"""
from __future__ import annotations

import logging
from pathlib import Path

from ahnet import failures, paths
from ahnet.data.budget import add_limit_argument, scan_limit
from ahnet.data.cache import cache_dataset
from ahnet.data.checks import SPACING_RANGE_MM

PROG = "ahnet.commands.cache"

def main(argv=None) -> int:
    """CLI: python -m ahnet.commands.cache --data data/phantom/dataset.json (one error line and exit 2 on bad input)."""
    ap = failures.Parser(PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help=f"Decathlon-style dataset.json; its annotations are the "
                                                 f"{paths.ANNOTATIONS} beside it when there is one")
    ap.add_argument("--out", default=None, help=f"cache folder, one <case_id>.h5 per case (default: "
                                                f"{paths.CACHE_ROOT}/<dataset folder name>, where training looks)")
    ap.add_argument("--spacing", type=failures.number(float, *SPACING_RANGE_MM), nargs=2, default=None,
                    metavar=("SY", "SX"), help="in-plane target spacing in mm (z is kept); %g to %g" % SPACING_RANGE_MM)
    ap.add_argument("--nan-policy", choices=["raise", "repair"], default="raise")
    ap.add_argument("--skip-bad", action="store_true", help="log bad cases and go on instead of stopping")
    add_limit_argument(ap)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    def body() -> int:
        out = failures.check_output_dir(paths.cache_dir(a.data) if a.out is None else Path(a.out))
        got = cache_dataset(a.data, out, progress=not failures.quiet(), target_spacing=a.spacing,
                            nan_policy=a.nan_policy, errors="skip" if a.skip_bad else "raise",
                            limit=scan_limit("cache", a.max_scan_voxels))
        print(f"{len(got)} cases cached in {out}")
        return 0

    return failures.run(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main())
