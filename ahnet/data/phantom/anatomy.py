"""The anatomy of one case on the fine grid: a tissue label map and its clean HU, built in named steps.

Steps, in order (each draws from the case's random generator, so the order is part of the output):
grid -> body wall (muscle, subcutaneous fat) -> lungs -> spine -> ribs -> fissures -> vessel tree -> airways
-> clean HU (tissue values, smooth lung variation). Arrays are (z, y, x); positions (z, y, x) mm from the top
corner voxel; the fine z step is thickness / ceil(thickness / spacing), never coarser than in-plane.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import numpy as np
from scipy import ndimage as ndi

from ahnet.data.phantom.constants import (AW_LUMEN, AW_WALL, CORTICAL, FAT, FISSURE, LUNG, MARROW, MUSCLE, TISSUE_HU,
                        VESSEL)
from ahnet.data.phantom.geometry import grow_tree, lut, paint_segments
from ahnet.data.phantom.options import PhantomOptions

# body ellipse semi-axes (x, y) as fractions of the field of view, with their per-case random factors;
# lung ellipse semi-axes (x, y) as fractions of the body's
BODY_AX, BODY_AX_JITTER, BODY_AY, BODY_AY_JITTER = 0.47, (0.95, 1.0), 0.37, (0.93, 1.0)
LUNG_AX, LUNG_AY, LUNG_JITTER = 0.32, 0.66, (0.95, 1.05)


def largest_nodule_mm(smallest_lung_semi_axis: float) -> float:
    """Largest volume-equivalent diameter (mm) drawn into lungs whose smallest semi-axis is given (mm)."""
    return max(6.5, 1.1 * smallest_lung_semi_axis)


def largest_nodule_bound_mm(opts: PhantomOptions) -> float:
    """A diameter (mm) that fits every case of these options: largest_nodule_mm of the smallest lungs the
    random factors can give."""
    fov = opts.size * opts.spacing
    a_min = BODY_AX * fov * BODY_AX_JITTER[0]
    b_min = BODY_AY * fov * BODY_AY_JITTER[0]
    return largest_nodule_mm(min(LUNG_AX * a_min, LUNG_AY * b_min) * LUNG_JITTER[0])


class Anatomy:
    """Fine-grid tissue map `lab` (uint8 (Z, y, x)) and clean HU `hu` (float32) of one case.

    Also kept: grid (dz, dy, dx) mm, k fine slices per output slice, lungs [(cy, cx, ay, ax) mm] per side,
    vessels and airways [(a_zyx, b_zyx, r0, r1) mm], fissure_planes, lungv (lung parenchyma mask).
    """

    def __init__(self, opts: PhantomOptions, rng: np.random.Generator):
        self._grid(opts)
        rho, depth = self._body_wall(rng)
        self._lungs(rng)
        self._spine(rng)
        self._ribs(rng, rho, depth)
        del rho, depth
        self.lung_mask0 = self.lab == LUNG              # lungs before fissures, vessels and airways
        self._fissures(rng)
        self._vessel_tree(rng)
        self._airways(rng)
        self._clean_hu(rng)
        self._cand = None

    # ------------------------------------------------------------------ steps
    def _grid(self, opts: PhantomOptions) -> None:
        """Fine grid: shape (slices * k, size, size), voxel-centre coordinates zc, yc, xc (mm)."""
        self.opts = opts
        n, sp = opts.size, opts.spacing
        self.k = max(1, int(math.ceil(opts.thickness / sp - 1e-9)))
        self.dz = opts.thickness / self.k
        nz = opts.slices * self.k
        self.grid = (self.dz, sp, sp)
        self.shape = (nz, n, n)
        self.fov = n * sp
        self.zc = (np.arange(nz) + 0.5) * self.dz                     # mm from the top of the slab
        self.yc = np.arange(n) * sp
        self.xc = np.arange(n) * sp
        self.center = (self.yc.mean(), self.xc.mean())
        self.Y = (self.yc - self.center[0])[:, None]
        self.X = (self.xc - self.center[1])[None, :]
        self.zrel = (self.zc - self.zc.mean()) / max(float(np.ptp(self.zc)), 1.0)      # -0.5 .. 0.5
        self.lab = np.zeros(self.shape, np.uint8)

    def _body_wall(self, rng) -> Tuple[np.ndarray, np.ndarray]:
        """Body: an ellipse slowly widening downwards, muscle under a fat layer 3-5 % of the field of view.

        Returns rho (elliptic radius, 1 at the skin) and depth (~ mm below the skin), (Z, y, x), for the ribs.
        """
        fov, X, Y = self.fov, self.X, self.Y
        a, b = BODY_AX * fov * rng.uniform(*BODY_AX_JITTER), BODY_AY * fov * rng.uniform(*BODY_AY_JITTER)
        scale_z = (1.0 + 0.06 * self.zrel)[:, None, None]
        rho = np.sqrt((X / a) ** 2 + (Y / b) ** 2)[None] / scale_z          # (nz, n, n)
        depth = (1.0 - rho) * math.sqrt(a * b)                                 # ~ mm below the skin
        self.fat_t = rng.uniform(0.03, 0.05) * fov
        self.body_ab = (a, b)
        self.lab[rho < 1.0] = MUSCLE
        self.lab[(rho < 1.0) & (depth < self.fat_t)] = FAT
        return rho, depth

    def _lungs(self, rng) -> None:
        """Two ellipses, smaller towards the apex (top), with a wobbly outline."""
        (a, b), (cy, cx) = self.body_ab, self.center
        yc, xc = self.yc, self.xc
        self.lungs: List[tuple] = []
        lung = np.zeros(self.shape, bool)
        for side in (-1, 1):
            lx = cx + side * 0.5 * a
            ly = cy - 0.02 * b
            ax_, ay_ = LUNG_AX * a * rng.uniform(*LUNG_JITTER), LUNG_AY * b * rng.uniform(*LUNG_JITTER)
            s = (0.88 + 0.12 * (self.zrel + 0.5))[:, None, None]                # apex narrower
            ang_l = np.arctan2((yc - ly)[:, None], (xc - lx)[None, :])
            wob = (1.0 + 0.04 * np.cos(3 * ang_l + rng.uniform(0, 6.3)))[None]
            lr = np.sqrt(((xc - lx)[None, :] / ax_) ** 2 + ((yc - ly)[:, None] / ay_) ** 2)[None] / s
            lung |= lr < wob
            self.lungs.append((ly, lx, ay_, ax_))
        self.lab[lung] = LUNG

    def _spine(self, rng) -> None:
        """Vertebral bodies (cortical shell 1.6 mm, marrow) with discs, posterior midline."""
        (a, b), (cy, cx), fov = self.body_ab, self.center, self.fov
        sr = 0.085 * fov
        sy_ = cy + 0.66 * b
        rs = np.sqrt((self.Y - (sy_ - cy)) ** 2 + self.X ** 2)
        disc_pitch, disc_w = rng.uniform(24, 30), rng.uniform(4, 6)
        disc = (((self.zc + rng.uniform(0, disc_pitch)) % disc_pitch) < disc_w)[:, None, None]
        vb = (rs < sr)[None] & ~disc
        self.lab[vb & (rs > sr - 1.6)[None]] = CORTICAL
        self.lab[vb & (rs <= sr - 1.6)[None]] = MARROW

    def _ribs(self, rng, rho: np.ndarray, depth: np.ndarray) -> None:
        """Periodic oblique bands in the chest wall, sloping down anteriorly, with a sternal gap."""
        (a, b), fov, lab = self.body_ab, self.fov, self.lab
        pitch = rng.uniform(0.16, 0.2) * fov
        rib_r = max(1.6, 0.024 * fov)
        rib_depth = self.fat_t + rib_r + 0.6
        slope = rng.uniform(0.25, 0.45) * b              # mm of z drop from back to front
        ang = np.arctan2(self.Y, self.X)
        post = (np.cos(ang - math.pi / 2) + 1) / 2       # 1 posterior (y+), 0 anterior
        zshift = (slope * (1 - post))[None]
        phase = rng.uniform(0, pitch)
        dzr = ((self.zc[:, None, None] - zshift + phase) % pitch) - pitch / 2
        dd = depth - rib_depth
        rib_d2 = (dd / 1.0) ** 2 + (dzr / 1.5) ** 2       # ribs flatter than tall: 3 x 4.5 r
        not_front = (np.abs(np.sin(ang)) < 0.97) | (self.Y > 0)                # leave a sternal gap
        ribs = (rib_d2 < rib_r ** 2) & not_front[None] & (lab != LUNG) & (rho < 1.0)
        lab[ribs] = CORTICAL
        lab[ribs & (rib_d2 < (rib_r - 1.0) ** 2)] = MARROW

    def _fissures(self, rng) -> None:
        """1 mm sheets at -700 HU: an oblique one per lung, a horizontal one on the right ending at the
        oblique one."""
        zc, yc, xc = self.zc, self.yc, self.xc
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
        self.lab[fis & (self.lab == LUNG)] = FISSURE

    def _inside_lung(self, q) -> bool:
        """True when the point q (z, y, x) mm lies in the lungs as first drawn (before vessels and airways)."""
        idx = np.round(np.asarray(q) / self.grid).astype(int)
        if np.any(idx < 0) or np.any(idx >= self.shape):
            return False
        return bool(self.lung_mask0[tuple(idx)])

    def _vessel_tree(self, rng) -> None:
        """Vessels (+40 HU) from a hilum per lung in five directions, all orientations, 5.6-8 mm to < 1 mm."""
        self.budget = int(round(700 * self.opts.vessel_density * (self.fov / 134.0) ** 1.5))
        roots = []
        for side, (ly, lx, ay_, ax_) in zip((-1, 1), self.lungs):
            hil = np.array([self.zc.mean() + rng.uniform(-8, 8), ly + rng.uniform(-0.1, 0.1) * ay_,
                            lx - side * 0.55 * ax_])
            for dzdir in (-1.0, -0.5, 0.0, 0.5, 1.0):
                d = np.array([dzdir, rng.uniform(-0.8, 0.8), side * rng.uniform(0.3, 1.0)])
                roots.append((hil.copy(), d / np.linalg.norm(d), rng.uniform(2.8, 4.0)))
        self.vessels = grow_tree(rng, roots, self._inside_lung, self.budget, r_min=0.35, length_factor=5.0)
        if self.opts.vessel_radius != 1.0:           # after growing: the same tree, thinner or thicker
            s = self.opts.vessel_radius
            self.vessels = [(a_, b_, r0 * s, r1 * s) for a_, b_, r0, r1 in self.vessels]
        paint_segments(self.lab, self.vessels, self.grid, VESSEL, allowed=lut(LUNG, FISSURE))

    def _airways(self, rng) -> None:
        """Trachea down the midline to a carina, main bronchi to each hilum, a few generations; 1-2 mm wall."""
        (a, b), (cy, cx), fov = self.body_ab, self.center, self.fov
        tr_r = max(3.0, 0.05 * fov)
        car = np.array([self.zc.mean() + rng.uniform(-6, 6), cy - 0.25 * b, cx])
        top = np.array([0.0, car[1], cx])
        aw = [(top, car, tr_r, tr_r * 0.95)]
        aroots = []
        for side, (ly, lx, ay_, ax_) in zip((-1, 1), self.lungs):
            tgt = np.array([car[0] + rng.uniform(2, 8), ly - 0.05 * ay_, lx - side * 0.45 * ax_])
            aw.append((car, tgt, tr_r * 0.7, tr_r * 0.6))
            for dzdir in (-1.0, 0.0, 1.0):
                d = np.array([dzdir, rng.uniform(-0.5, 0.5), side * rng.uniform(0.5, 1.0)])
                aroots.append((tgt, d / np.linalg.norm(d), tr_r * 0.45))
        aw += grow_tree(rng, aroots, self._inside_lung, self.budget // 6, r_min=0.6, length_factor=5.0)
        lumen_over = lut(LUNG, FISSURE, VESSEL, MUSCLE, FAT, AW_WALL)
        wall_over = lut(LUNG, FISSURE, VESSEL, MUSCLE, FAT)
        for a_, b_, r0, r1 in aw:
            w = float(np.clip(0.25 * r0 + 0.8, 1.0, 2.0))
            paint_segments(self.lab, [(a_, b_, r0, r1)], self.grid, AW_LUMEN, allowed=lumen_over,
                           wall=w, wall_value=AW_WALL, wall_allowed=wall_over)
        self.airways = aw

    def _clean_hu(self, rng) -> None:
        """HU per tissue (bone drawn per case), lung +-25 HU low-frequency variation and a posterior gradient."""
        nz, n, _ = self.shape
        table = np.zeros(256, np.float32)
        for t, v in TISSUE_HU.items():
            table[t] = rng.uniform(*v) if isinstance(v, tuple) else v
        table[FAT] += rng.uniform(-10, 10)
        table[MUSCLE] += rng.uniform(-5, 5)
        hu = np.empty(self.shape, np.float32)
        hu[:] = table[self.lab]
        coarse = rng.normal(0.0, 1.0, size=(max(2, nz // 24 + 2), n // 24 + 2, n // 24 + 2)).astype(np.float32)
        smooth = ndi.zoom(coarse, np.array(self.shape) / np.array(coarse.shape), order=1, prefilter=False)
        smooth = smooth[:nz, :n, :n]
        smooth *= 15.0 / max(float(smooth.std()), 1e-6)
        grad = (15.0 * (self.yc - self.center[0]) / (0.5 * self.fov)).astype(np.float32)[None, :, None]
        lungv = self.lab == LUNG
        hu[lungv] += np.clip(smooth + grad, -45, 45)[lungv]
        self.hu = hu
        self.lungv = lungv

    # ------------------------------------------------------------------ placement support
    def largest_nodule_mm(self) -> float:
        """Largest volume-equivalent diameter (mm) drawn into this case's lungs."""
        return largest_nodule_mm(min(min(l[2], l[3]) for l in self.lungs))

    def candidates(self) -> Dict[str, np.ndarray]:
        """Flat indices of placement seeds: lung, lung edge (within 3 voxels in-plane of non-lung), fissure.

        Computed on first use (before any nodule is painted) and kept.
        """
        if self._cand is None:
            lv = self.lungv
            edge = lv & ~(np.roll(lv, 3, 1) & np.roll(lv, -3, 1) & np.roll(lv, 3, 2) & np.roll(lv, -3, 2))
            self._cand = dict(lung=np.flatnonzero(lv), edge=np.flatnonzero(edge),
                              fissure=np.flatnonzero(self.lab == FISSURE))
        return self._cand

