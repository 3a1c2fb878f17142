"""CLI: python -m ahnet.data.phantom --out FOLDER [options]; bad options: one error line, exit 2.

    python -m ahnet.data.phantom --out data/phantom                        # a training phantom (16 cases)
    python -m ahnet.data.phantom --out data/phantom-cpu-dev --test-phantom cpu    # 40 scans x 6 nodules
"""
from __future__ import annotations

import argparse
import logging
import time
from typing import Tuple

from ahnet import failures
from ahnet.failures import number
from ahnet.data.phantom import __doc__ as _package_doc
from ahnet.data.phantom.dataset import generate_dataset
from ahnet.data.phantom.heldout import TEST_PHANTOMS, generate_test_phantom, held_out_seed

PROG = "ahnet.data.phantom"
DEFAULTS = dict(cases=16, seed=0, size=192, slices=None, z_extent=100.0, thickness=2.5, spacing=0.7,
                nodules_per_case=(1, 3), negatives=0.15, shapes="lidc", noise=(10.0, 40.0), vessel_density=1.0,
                psf_sigma=(0.5, 0.5), no_balance=False, previews=3, split=(0.7, 0.15, 0.15), exact=False)
MAX_CASES = 100_000
# CLI destinations that a --test-phantom fixes (the options of heldout.HELD_OUT)
FIXED_BY_TEST_PHANTOM = {"split": "--split", "negatives": "--negatives", "no_balance": "--no-balance",
                         "exact": "--exact"}


class _Parser(argparse.ArgumentParser):
    """Bad input: one line `ahnet.data.phantom: error: <problem>` on stderr, exit 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message}\n")


def _numbers(s: str, cast, n: int, what: str) -> Tuple:
    try:
        parts = tuple(cast(v) for v in str(s).replace(":", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what} ({cast.__name__} values), got {s!r}") from None
    if len(parts) != n:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
    return parts


def _pair(s: str, cast=float) -> Tuple:
    """'N' -> (N, N); 'MIN,MAX' or 'MIN:MAX' -> (MIN, MAX)."""
    if "," not in str(s) and ":" not in str(s):
        return _numbers(s, cast, 1, "N or MIN,MAX") * 2
    return _numbers(s, cast, 2, "N or MIN,MAX")


def _split(s: str) -> Tuple:
    return _numbers(s, float, 3, "three fractions TRAIN,VALIDATION,TEST")


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    ap = _Parser(prog="python -m ahnet.data.phantom", description=_package_doc.split("\n\n")[0])
    add = ap.add_argument
    add("--out", required=True, help="output folder (imagesTr, labelsTr, the annotations CSV, dataset.json)")
    add("--test-phantom", choices=sorted(TEST_PHANTOMS), default=None,
        help="a held-out test phantom: " + "; ".join(
            f"{k}: {v['n_cases']} scans x {v['nodules_per_case']} nodules" for k, v in TEST_PHANTOMS.items())
        + "; all test split, no negatives, exact schedule; development sets (cpu, demo): LIDC test scans, cases "
          "seeded with --seed + 1000003; the sealed final set (cpu-final): the final pool's patients only, --seed + "
          "7000001 (apart from a training phantom of the same --seed); size options may be overridden")
    add("--cases", type=int, help=f"number of cases (default {d['cases']})")
    add("--seed", type=number(int, 0, 2 ** 32 - 1),
        help=f"random seed; the output is a function of it (default {d['seed']})")
    add("--size", type=number(int, 48, 1024), help=f"in-plane matrix size, voxels (default {d['size']})")
    add("--slices", type=number(int, 4, 2048), help="output slices (default: --z-extent / --thickness)")
    add("--z-extent", type=number(float, 0, 5000, lo_open=True),
        help=f"z extent in mm when --slices is not given (default {d['z_extent']})")
    add("--thickness", type=number(float, 0.5, 10), help=f"slice thickness = spacing, mm (default {d['thickness']})")
    add("--spacing", type=number(float, 0.2, 3), help=f"in-plane spacing, mm (default {d['spacing']})")
    add("--nodules-per-case", type=lambda s: _pair(s, int), metavar="N|MIN,MAX",
        help="nodules per case with nodules: N, or MIN,MAX at random (default 1,3)")
    add("--negatives", type=number(float, 0, 1), help=f"fraction of cases without nodules (default {d['negatives']})")
    add("--shapes", choices=["lidc", "procedural"], help="nodule shape source (default lidc)")
    add("--noise", type=_pair, metavar="N|MIN,MAX", help="noise std in HU, 0 = off (default 10,40)")
    add("--vessel-density", type=number(float, 0, 10), help="scales the number of vessel segments (default 1)")
    add("--psf-sigma", type=_pair, metavar="S|MIN,MAX",
        help="in-plane reconstruction kernel (Gaussian PSF) sigma in pixels, or a range drawn per scan (randomised "
             "kernels; each scan's sigma recorded in dataset.json) (default 0.5)")
    add("--no-balance", action="store_const", const=True, help="draw types at random instead of balanced")
    add("--split", type=_split, metavar="TRAIN,VAL,TEST",
        help="fractions of cases per split, e.g. 0,0,1 for a test-only phantom (default 0.7,0.15,0.15)")
    add("--exact", action="store_const", const=True,
        help="every nodule exactly its scheduled type and location class, locations balanced per type, LIDC "
             "shapes without replacement (distinct lesions first, then rotated / mirrored / rescaled reuses)")
    add("--previews", type=int, help=f"cases with a preview PNG (default {d['previews']})")
    return ap


def _options(a, ap) -> Tuple[dict, dict]:
    """(generate_dataset keywords with n_cases and seed, defaults filled in; the flags given), errors through
    ap.error."""
    given = {k: v for k, v in vars(a).items() if v is not None and k not in ("out", "test_phantom")}
    if a.test_phantom:
        fixed = [flag for k, flag in FIXED_BY_TEST_PHANTOM.items() if k in given]
        if fixed:
            ap.error(f"{', '.join(fixed)} cannot be combined with --test-phantom (a test phantom is all test "
                     f"split, without negatives, with the exact schedule)")
    v = {**DEFAULTS, **given}
    for name in ("cases", "previews"):
        if v[name] < (1 if name == "cases" else 0):
            ap.error(f"--{name} must be >= {1 if name == 'cases' else 0}, got {v[name]}")
        if v[name] > MAX_CASES:
            ap.error(f"--{name} must be <= {MAX_CASES}, got {v[name]}")
    slices = v["slices"] if v["slices"] else max(4, int(round(v["z_extent"] / v["thickness"])))
    psf = v["psf_sigma"][0] if v["psf_sigma"][0] == v["psf_sigma"][1] else v["psf_sigma"]
    return dict(n_cases=v["cases"], seed=v["seed"], previews=v["previews"], size=v["size"], slices=slices,
                thickness=v["thickness"], spacing=v["spacing"], nodules_per_case=v["nodules_per_case"],
                negatives=v["negatives"], shapes=v["shapes"], noise=v["noise"],
                vessel_density=v["vessel_density"], psf_sigma=psf, balance=not v["no_balance"], split=v["split"],
                exact=v["exact"]), given


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    kw, given = _options(a, ap)
    try:
        failures.check_output_dir(a.out, "--out")
    except ValueError as e:
        ap.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t = time.perf_counter()
    try:
        if a.test_phantom:
            keep = {"cases": "n_cases", "size": "size", "slices": "slices", "z_extent": "slices",
                    "thickness": "thickness", "spacing": "spacing", "nodules_per_case": "nodules_per_case",
                    "shapes": "shapes", "noise": "noise", "vessel_density": "vessel_density",
                    "psf_sigma": "psf_sigma"}
            overrides = {keep[k]: kw[keep[k]] for k in given if k in keep}
            p = generate_test_phantom(a.out, a.test_phantom, seed=kw["seed"], previews=kw["previews"],
                                      **overrides)
            n = overrides.get("n_cases", TEST_PHANTOMS[a.test_phantom]["n_cases"])
            seed = held_out_seed(kw["seed"], a.test_phantom)
        else:
            n, seed = kw.pop("n_cases"), kw.pop("seed")
            p = generate_dataset(a.out, n, seed, **kw)
    except (ValueError, OSError) as e:                 # FolderBusy too: another generator writes into --out
        ap.error(failures.one_line(e))
    dt = time.perf_counter() - t
    print(f"wrote {p} ({n} cases, seed {seed}, {dt:.1f} s, {dt / n:.2f} s/case)")
    return 0

