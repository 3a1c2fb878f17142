"""The experiment's phantoms: the training phantom, the development set ("dev": every choice is made on it), the
sealed final test set (evaluated only by a preset's final models, every look logged) and the final set's shifted
renderings; each at a slice spacing (thickness = spacing, the same 100 mm of z, in-plane unchanged).

The folders are ahnet.paths.ExperimentPaths'. A folder that holds another phantom than the one asked for is refused
(ValueError naming it) before any training; a missing one is generated (and the training phantom cached).
"""
from __future__ import annotations

import csv
import datetime
import json
from pathlib import Path
from typing import Dict, List, Optional

from ahnet import commit_label, failures, paths
from ahnet.atomic import write_text_atomic
from ahnet.data.cache import cache_dataset
from ahnet.data.io import load_dataset_json, read_scan

PROG = "ahnet.experiment"
Z_EXTENT_MM = 100.0                  # every phantom's z extent: slices = Z_EXTENT_MM / slice spacing
SLICE_SPACINGS = (1.25, 2.5, 5.0)    # the slice-thickness study's spacings (mm); 2.5 is every preset's own
# One change at a time to the final set (the same seed: the same cases, schedule and shapes), for the shift study.
SHIFTS: Dict[str, dict] = {
    "noise2x": dict(noise=(20.0, 80.0)),                 # twice the noise (10-40 HU -> 20-80 HU)
    "sharp": dict(psf_sigma=0.25),                       # a sharper reconstruction kernel (PSF 0.5 -> 0.25 px)
    "smooth": dict(psf_sigma=1.0),                       # a smoother one (1.0 px)
    "inplane0.6": dict(spacing=0.6, size=224),           # finer in-plane pixels, the same 134 mm field of view
    "inplane0.9": dict(spacing=0.9, size=149),           # coarser ones
    "vessels-dense": dict(vessel_density=2.0),           # twice the vessel segments
    "vessels-fine": dict(vessel_radius=0.6),             # the same vessel tree, 0.6 x the radii
    "hu+30": dict(hu_offset=30.0),                       # a calibration offset of +30 HU
    "hu-30": dict(hu_offset=-30.0),
}


def slice_options(spacing: float) -> dict:
    """Phantom options of a slice spacing: thickness = spacing, slices covering Z_EXTENT_MM."""
    slices = int(round(Z_EXTENT_MM / spacing))
    if abs(slices * spacing - Z_EXTENT_MM) > 1e-6 or not 0.5 <= spacing <= 10.0:
        raise ValueError(f"--slice-spacing {spacing:g} mm must lie in 0.5 .. 10 mm and divide {Z_EXTENT_MM:g} mm "
                         f"(e.g. {', '.join(f'{s:g}' for s in SLICE_SPACINGS)})")
    return {"thickness": float(spacing), "slices": slices}


def stored_phantom(dataset_json: Path) -> dict:
    """What a generated phantom's dataset.json says it is: its PhantomOptions, n_cases and seed."""
    meta = json.loads(Path(dataset_json).read_text(encoding="utf-8"))
    return dict(meta.get("options") or {}, n_cases=meta.get("numTraining"), seed=meta.get("seed"))


def data_spacing(dataset_json: Path) -> List[float]:
    """(sz, sy, sx) of the first case: the z-pooling schedule is chosen for it."""
    cases = load_dataset_json(dataset_json)
    if not cases:
        raise ValueError(f"{dataset_json} lists no cases under 'training'")
    return [round(float(s), 4) for s in read_scan(cases[0]["image"]).spacing]


def _differences(have: dict, want: dict) -> dict:
    """{option: (stored, wanted)} where a stored phantom's options differ from the wanted ones."""
    def norm(v):
        return list(v) if isinstance(v, tuple) else v
    out = {}
    for k, v in want.items():
        if k == "nodules_per_case" and not isinstance(v, (list, tuple)):
            v = [v, v]
        if norm(have.get(k)) != norm(v):
            out[k] = (have.get(k), norm(v))
    return out


def prepare_training(folder: Path, cases: int, size: int, options: dict, seed: int) -> Path:
    """The training phantom in ``folder`` (generated unless its dataset.json exists) and its cache; returns the
    dataset.json. A folder holding another phantom is used as it is, with a warning."""
    from ahnet.data.phantom import generate_dataset
    dataset_json = folder / paths.DATASET
    if not dataset_json.is_file():
        print(f"[experiment] generating {cases} phantom cases in {folder}", flush=True)
        generate_dataset(folder, cases, seed=seed, size=size, **options)
    differ = _differences(stored_phantom(dataset_json), dict(options, size=size, n_cases=cases, seed=seed))
    if differ:
        found = ", ".join(f"{k} {a} instead of {b}" for k, (a, b) in differ.items())
        failures.warn(PROG, f"{folder} holds another phantom than this preset's ({found}); using it as it is (move "
                            f"it away to generate the preset's phantom there)")
    cache_dataset(dataset_json)
    return dataset_json


def check_held_out(folder: Path, name: str, seed: int, overrides: Optional[dict] = None) -> None:
    """ValueError (before any training) when ``folder`` holds another phantom than the named test phantom of this
    seed with these overrides (e.g. one an earlier version generated with other sizes or seed)."""
    from ahnet.data.phantom import held_out_seed
    from ahnet.data.phantom.heldout import test_phantom_options
    dataset_json = folder / paths.DATASET
    if not dataset_json.is_file():
        return
    want = dict(test_phantom_options(name, **(overrides or {})), seed=held_out_seed(seed, name))
    want.pop("split", None)
    differ = _differences(stored_phantom(dataset_json), want)
    if differ:
        what = ", ".join(f"{k} {a} instead of {b}" for k, (a, b) in differ.items())
        raise ValueError(f"{folder} holds another phantom than the {name!r} test phantom of seed {seed} ({what}); "
                         f"move it away and run again to generate it there")


def ensure_held_out(folder: Path, name: str, seed: int, overrides: Optional[dict] = None) -> Path:
    """The named test phantom (with overrides) in ``folder``, generated when missing; returns its dataset.json."""
    from ahnet.data.phantom import generate_test_phantom
    check_held_out(folder, name, seed, overrides)
    dataset_json = folder / paths.DATASET
    if not dataset_json.is_file():
        print(f"[experiment] generating the {name!r} test phantom in {folder}", flush=True)
        generate_test_phantom(folder, name, seed=seed, **(overrides or {}))
    return dataset_json


def ensure_generated_dev(folder: Path, n_cases: int, size: int, options: dict, seed: int) -> Path:
    """A development set of ``n_cases`` test-split cases like the training phantom (the paper preset's: not the
    exact schedule), seeded apart from it; generated when missing; returns its dataset.json."""
    from ahnet.data.phantom import generate_dataset, held_out_seed
    dataset_json = folder / paths.DATASET
    if not dataset_json.is_file():
        print(f"[experiment] generating {n_cases} test-only phantom cases in {folder}", flush=True)
        kw = {k: options[k] for k in ("thickness", "slices") if k in options}
        generate_dataset(folder, n_cases, seed=held_out_seed(seed), size=size, split=(0, 0, 1), **kw)
    return dataset_json


def lidc_patients(dataset_json: Path) -> set:
    """The LIDC-IDRI patients whose nodule shapes a phantom holds (its annotations' lidc_scan_id)."""
    from ahnet.data import lidc
    db = lidc.load_lidc()
    with open(paths.annotations_csv(dataset_json), newline="", encoding="utf-8") as f:
        scans = {int(r["lidc_scan_id"]) for r in csv.DictReader(f) if r.get("lidc_scan_id")}
    return {db.scans[s].patient_id for s in scans}


def check_sealed(final_json: Path, others: List[Path]) -> int:
    """ValueError unless the final set shares no LIDC patient with the other phantoms (training, dev); returns
    how many patients the final set holds."""
    final = lidc_patients(final_json)
    for other in others:
        shared = final & lidc_patients(other)
        if shared:
            raise ValueError(f"the final set {final_json.parent} shares LIDC patients with {other.parent} "
                             f"({', '.join(sorted(shared)[:3])}); it is not sealed")
    return len(final)


def log_look(looks: Path, preset: str, name: str, runs: List[Path], shift: Optional[str] = None,
             pixels="auto") -> int:
    """Append one row to the final set's looks.csv (date, commit, preset, experiment, shift, runs, pixels: the
    prediction's --inplane-spacing); returns how many looks it has had, this one included. The file is rewritten
    atomically."""
    rows = []
    if looks.is_file():
        with open(looks, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    rows.append({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "commit": commit_label(with_changes=False), "preset": preset, "experiment": name,
                 "shift": shift or "", "runs": " ".join(r.name for r in runs), "pixels": str(pixels)})
    cols = list(rows[-1])
    text = ",".join(cols) + "\n" + "".join(",".join(str(r.get(c, "")).replace(",", ";") for c in cols) + "\n"
                                           for r in rows)
    write_text_atomic(looks, text)
    return len(rows)
