"""Nodule shapes and their HU: LIDC-IDRI reader annotations per split and type, a procedural fallback, and
the composition painted inside a shape (solid, ground-glass, part-solid core, calcified patterns).

Masks are bool (z, y, x) on the fine grid with odd sizes, centred on the shape.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import numpy as np
from scipy import ndimage as ndi

from ahnet.data.nodule_types import TYPE_CODES
from ahnet.data.phantom.constants import (CALC_PATTERN, CALC_TYPES, GGO_TYPES, PART_TYPES, PROC_D, SHAPE_POOLS,
                                          final_pool_scans, lidc_split_of_scan)
from ahnet.data.phantom.geometry import paint_segments, rand_unit

log = logging.getLogger(__name__)


class ShapePool:
    """LIDC annotations per pool and type (annotation-level type, sizes away from bin edges).

    by[pool][code]: sorted annotation ids of the pools train, validation, test (by scan id) and final (the sealed
    pool: reserved scans of patients with no other scan, constants.final_pool_scans); other reserved scans are
    never listed.
    """

    def __init__(self, grid_sp: float):
        from ahnet.data import lidc
        self.db = lidc.load_lidc()
        self.by = {s: {c: [] for c in TYPE_CODES} for s in SHAPE_POOLS}
        final = final_pool_scans({i: s.patient_id for i, s in self.db.scans.items()})
        for a in self.db.annotations.values():
            split = lidc_split_of_scan(a.scan_id) or ("final" if a.scan_id in final else None)
            if split is None:
                continue
            d = a.diameter_mm
            if d < 3.2 or d > 30 or any(abs(d - e) < 0.04 * e for e in (6.0, 8.0, 15.0)):
                continue
            self.by[split][a.type_code(self.db.scans[a.scan_id])].append(a.id)
        for s in SHAPE_POOLS:
            for c in TYPE_CODES:
                self.by[s][c].sort()

    def draw(self, rng, split: str, code: str, d_max: float, grid) -> Optional[Tuple[np.ndarray, dict, int, int]]:
        """A random annotation of this split and type no larger than d_max (mm) on the grid, mirrored in x with
        probability 1/2: (mask, ratings, LIDC scan id, annotation id); None when there is none."""
        from ahnet.data import lidc
        ids = [i for i in self.by[split][code] if self.db.annotations[i].diameter_mm <= d_max]
        if not ids:
            return None
        a = self.db.annotations[ids[int(rng.integers(len(ids)))]]
        m = lidc.shape_on_grid(a, self.db.scans[a.scan_id], grid)
        if rng.random() < 0.5:
            m = m[:, :, ::-1]
        return np.ascontiguousarray(m), dict(a.ratings), a.scan_id, a.id


    # ------------------------------------------------------------------ exact mode: named sources
    def eligible(self, split: str, code: str, d_max: float) -> list:
        """Annotation ids of this split and type no larger than d_max (mm), sorted."""
        return [i for i in self.by[split][code] if self.db.annotations[i].diameter_mm <= d_max]

    def lesion_of(self, ann_id: int) -> Tuple[int, int]:
        """(LIDC scan id, lesion index in that scan): the lesion (group of reader annotations) of an annotation.

        Grouping as lidc.group_annotations (pylidc's clustering), computed per scan on first use.
        """
        from ahnet.data import lidc
        if not hasattr(self, "_lesion"):
            self._lesion = {}
        if ann_id not in self._lesion:
            scan_id = self.db.annotations[ann_id].scan_id
            scan = self.db.scans[scan_id]
            groups = lidc.group_annotations(self.db.annotations_of(scan_id), scan.slice_thickness)
            for k, grp in enumerate(groups):
                for a in grp:
                    self._lesion[a.id] = (scan_id, k)
        return self._lesion[ann_id]

    def source(self, rng, ann_id: int, grid, augment: bool) -> Tuple[np.ndarray, dict, int]:
        """One named annotation on the grid: (mask, ratings, LIDC scan id). augment False: as drawn, mirrored
        in x with probability 1/2; True: a random rotation or rotation-reflection and a scale in 0.9..1.1 that
        keeps the annotation's type (see `augmented`)."""
        from ahnet.data import lidc
        from ahnet.data.nodule_types import is_calcified, nodule_type
        a = self.db.annotations[ann_id]
        m = lidc.shape_on_grid(a, self.db.scans[a.scan_id], grid)
        r = a.ratings
        if not augment:
            if rng.random() < 0.5:
                m = m[:, :, ::-1]
            return np.ascontiguousarray(m), dict(r), a.scan_id
        keeps = [s for s in rng.uniform(0.9, 1.1, size=8)
                 if nodule_type(a.diameter_mm * s, r["texture"], r["spiculation"], r["lobulation"],
                                is_calcified([r["calcification"]])) == a.type_code(self.db.scans[a.scan_id])
                 and a.diameter_mm * s >= 3.2]
        return augmented(m, grid, rng, keeps[0] if keeps else 1.0), dict(r), a.scan_id


def random_orthogonal(rng) -> np.ndarray:
    """A 3 x 3 orthogonal matrix uniform (Haar) over rotations and rotation-reflections (det +-1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))[None, :]


def augmented(m: np.ndarray, grid, rng, scale: float) -> np.ndarray:
    """Mask m (z, y, x) on grid (dz, dy, dx) mm, rotated or mirrored at random about its centre and scaled,
    resampled on the same grid (trilinear, threshold 0.5), cropped to odd sizes around its centre voxel."""
    g = np.asarray(grid, float)
    ctr = (np.array(m.shape) - 1) / 2.0
    q = random_orthogonal(rng)
    reach = float(np.sqrt((((np.argwhere(m) - ctr) * g) ** 2).sum(1)).max()) * scale + g.max()
    half = np.ceil(reach / g).astype(int)
    axes = [(np.arange(2 * h + 1) - h) * s for h, s in zip(half, g)]
    out_mm = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    src = (out_mm @ q) / scale / g + ctr                       # inverse map: out = scale * Q @ src
    vals = ndi.map_coordinates(m.astype(np.float32), src.T, order=1, cval=0.0)
    out = vals.reshape([2 * h + 1 for h in half]) >= 0.5
    if not out.any():
        return np.ascontiguousarray(m)
    nz = np.argwhere(out)
    ext = np.maximum(np.abs(nz - half).max(0) + 1, 1)            # symmetric crop keeps the centre voxel
    return np.ascontiguousarray(out[tuple(slice(h - e, h + e + 1) for h, e in zip(half, ext))])


_POOL = {}


def get_pool(spacing: float):
    """The LIDC shape pool (built once per process), or the string 'procedural' when the database is absent."""
    if "pool" not in _POOL:
        try:
            _POOL["pool"] = ShapePool(spacing)
        except FileNotFoundError as e:
            log.warning("LIDC database unavailable (%s): procedural nodule shapes", e)
            _POOL["pool"] = "procedural"
    return _POOL["pool"]


def _pseudo_ratings(rng, code: str, spic: bool) -> dict:
    """LIDC-style ratings that the 12-type rule maps to `code` (for a procedural shape)."""
    ratings = dict(subtlety=int(rng.integers(3, 6)), internalStructure=1, sphericity=int(rng.integers(3, 6)),
                   margin=int(rng.integers(2, 6)), malignancy=int(rng.integers(1, 6)))
    ratings["texture"] = int(rng.integers(1, 3)) if code in GGO_TYPES else 3 if code in PART_TYPES else \
        int(rng.integers(4, 6))
    ratings["spiculation"] = int(rng.integers(3, 6)) if spic else int(rng.integers(1, 3))
    ratings["lobulation"] = int(rng.integers(3, 6)) if code == "T05" else int(rng.integers(1, 6)) if spic \
        else int(rng.integers(1, 3))
    ratings["calcification"] = int(rng.choice([1, 2, 3, 5])) if code in CALC_TYPES else 6
    return ratings


def procedural_shape(rng, code: str, d_max: float, grid) -> Tuple[np.ndarray, dict]:
    """Ellipsoid + lobulation harmonics (+ spicules for T06) of a size inside the type's bin: (mask, ratings)."""
    lo, hi = PROC_D[code]
    hi = min(hi, d_max)
    lo = min(lo, hi)
    d = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    R = d / 2
    lob = code == "T05" or (code in ("T06",) and rng.random() < 0.5)
    spic = code == "T06"
    ext = R * (1.5 if spic else 1.35) + 1.5
    axes = [np.arange(-int(ext / s), int(ext / s) + 1) * s for s in grid]
    Z, Y, X = np.meshgrid(*axes, indexing="ij")
    Rm = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    P = np.stack([Z, Y, X], -1) @ Rm
    ax = rng.uniform(0.85, 1.15, 3)
    r = np.sqrt(((P / ax) ** 2).sum(-1)) + 1e-9
    u = P / r[..., None]
    mod = np.zeros_like(r)
    amp = rng.uniform(0.15, 0.25) if lob else rng.uniform(0.0, 0.06)
    for _ in range(3):
        w = rand_unit(rng) * rng.integers(2, 5)
        mod += amp / 3 * np.cos(np.pi * (u @ w) + rng.uniform(0, 6.3))
    m = r < R * (1 + mod)
    if spic:
        segs = []
        for _ in range(int(rng.integers(6, 14))):
            v = rand_unit(rng)
            c = np.array([-a[0] for a in axes])
            segs.append((c + v * R * 0.8, c + v * R * rng.uniform(1.25, 1.5), rng.uniform(0.5, 0.9), 0.25))
        lab = m.astype(np.uint8)
        paint_segments(lab, segs, grid, 1)
        m = lab > 0
    return m, _pseudo_ratings(rng, code, spic)


def _popcorn(rng, hu: np.ndarray, m: np.ndarray, inner: np.ndarray, dmax: float, calc: float, grid) -> None:
    """Popcorn calcification: 3-6 blobs of radius 0.2-0.35 x the largest inner distance, inside (in place)."""
    idx = np.argwhere(inner > 0.3 * dmax)
    if len(idx) == 0:
        idx = np.argwhere(m)
    zz, yy, xx = np.meshgrid(*[np.arange(s) * g for s, g in zip(m.shape, grid)], indexing="ij")
    for j in rng.integers(len(idx), size=int(rng.integers(3, 7))):
        c = idx[j] * np.asarray(grid)
        rb = max(0.6, rng.uniform(0.2, 0.35) * dmax)
        hu[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < rb * rb] = calc


def composition_hu(rng, m: np.ndarray, code: str, ratings: dict, grid) -> np.ndarray:
    """HU inside a nodule mask by composition: solid, ground-glass, part-solid core, calcified pattern."""
    hu = np.zeros(m.shape, np.float32)
    solid = rng.uniform(20, 60)
    inner = ndi.distance_transform_edt(np.pad(m, 1), sampling=grid)[1:-1, 1:-1, 1:-1]
    dmax = max(float(inner.max()), 1e-6)
    if code in GGO_TYPES:
        hu[:] = rng.uniform(-700, -400)
    elif code in PART_TYPES:
        hu[:] = rng.uniform(-700, -400)
        core = inner > rng.uniform(0.4, 0.65) * dmax
        hu[core] = solid
    elif code in CALC_TYPES:
        calc = rng.uniform(200, 1000)
        pattern = CALC_PATTERN.get(int(ratings.get("calcification", 3)), "whole")
        hu[:] = solid
        if pattern == "whole":
            hu[:] = calc
        elif pattern == "central":
            hu[inner > 0.45 * dmax] = calc
        elif pattern == "laminated":
            hu[(np.sin(2 * np.pi * inner / 1.6) > 0.2) | (inner > 0.7 * dmax)] = calc
        else:
            _popcorn(rng, hu, m, inner, dmax, calc, grid)
    else:
        hu[:] = solid
    hu += rng.normal(0, 4, size=hu.shape).astype(np.float32)
    return np.where(m, hu, 0).astype(np.float32)
