"""Whether the data a user gives make sense, checked where they are read: the content of a dataset.json, the
rows of an annotations CSV, and a scan as a chest CT. Each problem raises :class:`DataError` (a ``ValueError``)
whose one sentence names the file and the problem; a doubt that still lets the run go on is a logged warning
that says what was assumed.

- dataset.json (Decathlon style): UTF-8 (a byte-order mark is accepted), a JSON object with a list of cases under
  "training" and / or "test" (the test list of the Medical Segmentation Decathlon holds plain paths or objects);
  each case an image path string or an object with "image" (a path string), optional "label" (a path string or
  null), "case_id" (string or integer) and "split" (string).
- Annotations (LUNA16 rows): finite world coordinates (x, y, z) mm, a diameter > 0 mm, a seriesuid that is a
  case of the dataset, a centre inside its scan, an instance ``label`` (when given) an integer >= 1.
- Scans: a voxel size between 0.05 and 20 mm per axis, at least 8 x 8 voxels in-plane, more than one value, and
  Hounsfield units (not intensities scaled to [0, 1]; a scan with no voxel below -500 HU gets a warning); DICOM
  slices evenly spaced (a gap means a missing slice).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

#: the lists of cases a dataset.json may hold, and the split of a case listed under each (when it names none)
SECTION_SPLIT = {"training": "train", "test": "test"}
SPACING_RANGE_MM = (0.05, 20.0)
MIN_INPLANE = 8
HU_AIR_DOUBT = -500.0
COORDS = ("coordX", "coordY", "coordZ")


class DataError(ValueError):
    """A data file is unusable; the message names the file and the problem."""


def _json_type(v) -> str:
    if isinstance(v, bool):
        return "boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            type(None): "null"}.get(type(v), type(v).__name__)


def _show(v) -> str:
    text = json.dumps(v) if isinstance(v, (dict, list, str, int, float, bool, type(None))) else repr(v)
    return f"{_json_type(v)} {text[:40]}"


# ------------------------------------------------------------------------------------------------ text, JSON
def decode_utf8(raw: bytes, path) -> str:
    """UTF-8 text (a leading byte-order mark dropped); DataError naming the file and the first bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}, as in a latin-1 "
                        f"file); save it as UTF-8") from None


def read_json(path, what: str = "dataset.json"):
    """The JSON value of a UTF-8 file; DataError when it is missing, not UTF-8 or not JSON."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found.") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; expected the {what} file.") from None
    try:
        return json.loads(decode_utf8(raw, path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None


# ------------------------------------------------------------------------------------------------ dataset.json
def _entry(e, where: str) -> dict:
    if isinstance(e, str):
        e = {"image": e}
    if not isinstance(e, dict):
        raise DataError(f"{where} is {_show(e)}; expected an image path or an object with \"image\"")
    img = e.get("image")
    if not isinstance(img, str) or not img.strip():
        raise DataError(f"{where}: \"image\" is {_show(img)}; expected the image's path as a string")
    checks = (("label", lambda v: v is None or isinstance(v, str), "a path string or null"),
              ("case_id", lambda v: isinstance(v, str) and v.strip() or isinstance(v, int) and not isinstance(v, bool),
               "a non-empty string"),
              ("split", lambda v: isinstance(v, str) and v.strip(), "a split name such as train, validation, test"))
    for key, ok, want in checks:
        if key in e and not (e[key] is None and key == "label") and not ok(e[key]):
            raise DataError(f"{where}: \"{key}\" is {_show(e[key])}; expected {want}")
    return e


def dataset_entries(meta, path, sections: Sequence[str] = ("training",)) -> list:
    """[(section, index, entry dict with a string "image")] of the lists ``sections`` of a dataset.json's content
    (a plain path entry becomes {"image": path}); DataError naming the file, the entry and what is wrong."""
    names = " or ".join(repr(s) for s in sections)
    if not isinstance(meta, dict):
        raise DataError(f"{path}: holds {_json_type(meta)}; expected a JSON object with a list of cases under {names}.")
    found = [s for s in sections if s in meta]
    if not found:
        raise DataError(f"{path}: expected a JSON object with a list of cases under {names}; it has keys "
                        f"{sorted(meta)[:6]}.")
    out = []
    for s in found:
        if not isinstance(meta[s], list):
            raise DataError(f"{path}: '{s}' holds {_json_type(meta[s])}; expected a list of cases.")
        out += [(s, i, _entry(e, f"{path}: entry {i} of '{s}'")) for i, e in enumerate(meta[s])]
    return out


# ------------------------------------------------------------------------------------------------ annotations
def check_annotation_rows(rows: Sequence[dict], path, case_ids: Iterable[str] | None = None,
                          dataset=None) -> list:
    """LUNA16 annotation rows (as io reads them; line k+2 = row k): finite coordinates, diameter_mm > 0, and
    (with ``case_ids``) a seriesuid that is a case of ``dataset``. Returns ``rows``; DataError otherwise."""
    for lineno, r in enumerate(rows, start=2):
        for c in COORDS:
            v = r.get(c)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise DataError(f"{path}: line {lineno}: {c} = {v!r} is not a finite world coordinate in mm.")
        d = r.get("diameter_mm")
        if not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0:
            raise DataError(f"{path}: line {lineno}: diameter_mm = {d!r}; expected a diameter in mm > 0.")
        lab = r.get("label")
        if lab not in (None, "") and not (isinstance(lab, int) and not isinstance(lab, bool) and lab >= 1):
            raise DataError(f"{path}: line {lineno}: label = {lab!r}; expected the nodule's instance label in its "
                            f"mask, an integer >= 1 (or an empty cell).")
    if case_ids is not None:
        known = {str(c) for c in case_ids}
        unknown = sorted({str(r["seriesuid"]) for r in rows} - known)
        if unknown:
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            raise DataError(f"{path}: seriesuid {', '.join(unknown[:3])}{more} is not a case of "
                            f"{dataset or 'the dataset'}; every annotation must name one of its cases.")
    return list(rows)


def check_inside(rows: Sequence[dict], vol, case_id: str, path) -> np.ndarray:
    """(n, 3) voxel (z, y, x) centres of a case's annotation rows; DataError when one lies outside ``vol``
    (an ahnet.data.io.Volume)."""
    if not rows:
        return np.zeros((0, 3))
    xyz = np.array([[float(r[c]) for c in COORDS] for r in rows])
    zyx = np.atleast_2d(vol.world_to_voxel(xyz))
    inside = vol.contains_voxel(zyx)
    if not inside.all():
        k = int(np.argmin(inside))
        w = ", ".join(f"{v:.1f}" for v in xyz[k])
        v = ", ".join(f"{c:.1f}" for c in zyx[k])
        raise DataError(f"{path}: the nodule of {case_id} at world (x, y, z) = ({w}) mm lies outside its scan "
                        f"(voxel (z, y, x) = ({v}), scan shape {tuple(vol.shape)}).")
    return zyx


# ------------------------------------------------------------------------------------------------ scans
def check_scan(vol, path) -> None:
    """A scan (z, y, x) that makes sense as CT in Hounsfield units, or DataError; a warning (logged) when no
    voxel is darker than -500 HU (no air or lung: the values may lack their rescale)."""
    lo_mm, hi_mm = SPACING_RANGE_MM
    sp = tuple(float(s) for s in vol.spacing)
    if not all(lo_mm <= s <= hi_mm for s in sp):
        raise DataError(f"{path}: spacing (sz, sy, sx) = ({', '.join(f'{s:g}' for s in sp)}) mm is not a CT voxel "
                        f"size ({lo_mm:g} to {hi_mm:g} mm per axis); the file's header is wrong.")
    shape = tuple(int(n) for n in vol.array.shape)
    if min(shape[1:]) < MIN_INPLANE:
        raise DataError(f"{path}: shape (z, y, x) = {shape} is too small for a CT scan (at least {MIN_INPLANE} x "
                        f"{MIN_INPLANE} voxels in-plane).")
    a = vol.array
    lo, hi = float(np.min(a)), float(np.max(a))
    if lo == hi:
        raise DataError(f"{path}: every voxel is {lo:g}; a constant volume holds no scan.")
    if lo >= -1.0 and hi <= 1.0:
        raise DataError(f"{path}: intensities span [{lo:g}, {hi:g}], not Hounsfield units (air is about -1000 HU); "
                        f"give the scan in HU, not normalised.")
    if lo > HU_AIR_DOUBT:
        log.warning("%s: no voxel below %g HU (no air or lung); assuming Hounsfield units anyway (a scan without "
                    "its rescale intercept would look like this).", path, lo)


def check_slice_positions(positions: Sequence[float], path, series: str) -> None:
    """DICOM slice positions (mm along the slice normal) must be evenly spaced: DataError naming the gap (a
    missing slice) or the repeated position (a duplicate) otherwise."""
    pos = np.sort(np.asarray(positions, dtype=float))
    if pos.size < 3:
        return
    d = np.diff(pos)
    step = float(np.median(d))
    if step <= 1e-6 or np.any(d <= 1e-6):
        k = int(np.argmin(d))
        raise DataError(f"{path}: DICOM series {series} has two slices at {pos[k]:.3f} mm; expected one slice per "
                        f"position (a duplicated file?).")
    bad = np.flatnonzero(np.abs(d - step) > max(0.01, 0.05 * step))
    if bad.size:
        k = int(bad[0])
        raise DataError(f"{path}: DICOM series {series}: slices {k} and {k + 1} are {d[k]:.3g} mm apart where the "
                        f"others are {step:.3g} mm (a missing slice?); give the complete series.")
