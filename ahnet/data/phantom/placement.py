"""Placing a nodule mask in the lungs so that it meets a location class.

Classes: isolated (touches nothing), juxta-pleural (touches the chest wall), juxta-vascular (beside a vessel of
1.6-8 mm diameter), perifissural (on a fissure). Contact is read in a 2-voxel ring around the mask.
Nodules keep a gap between them (min_gap_mm) so that each stays a separate instance and a separate hit target.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from scipy import ndimage as ndi

from ahnet.data.nodule_types import volume_equivalent_diameter
from ahnet.data.phantom.anatomy import Anatomy
from ahnet.data.phantom.constants import AIR, AW_WALL, CORTICAL, FAT, FISSURE, LOCATIONS, LUNG, MARROW, MUSCLE, VESSEL
from ahnet.data.phantom.geometry import lut, rand_unit

LUNG_LIKE = lut(LUNG, VESSEL, FISSURE)          # what a nodule may be painted over
WALL_LIKE = lut(FAT, MUSCLE, CORTICAL, MARROW, AIR)


def _seed_point(rng, anat: Anatomy, m: np.ndarray, want: str, vessels) -> Optional[np.ndarray]:
    """A candidate centre voxel (z, y, x) for the location class `want`; None when the class has no seeds."""
    grid = np.asarray(anat.grid)
    if want == "juxta-vascular" and vessels:
        a, b, r0, r1 = vessels[int(rng.integers(len(vessels)))]
        t = rng.uniform(0.2, 0.8)
        p = a + t * (b - a)
        v = (b - a) / (np.linalg.norm(b - a) + 1e-9)
        off = np.cross(v, rand_unit(rng))
        off /= np.linalg.norm(off) + 1e-9
        rn = 0.5 * np.mean(np.array(m.shape) * grid) / 1.35
        return np.round((p + off * (r0 + 0.6 * rn)) / grid).astype(int)
    cand = anat.candidates()
    pool = {"juxta-pleural": cand["edge"], "perifissural": cand["fissure"]}.get(want, cand["lung"])
    if len(pool) == 0:
        return None
    c = np.array(np.unravel_index(pool[int(rng.integers(len(pool)))], anat.lab.shape))
    if want in ("juxta-pleural", "perifissural"):
        c = c + rng.integers(-2, 3, 3)
    return c


def _meets(want: str, inl: np.ndarray, ring_l: np.ndarray) -> bool:
    """Whether the tissue under the mask (inl: lung-like per mask voxel) and in its ring meets the class."""
    touch_wall = bool(WALL_LIKE[ring_l].any() or (~inl).any())
    touch_vessel = int((ring_l == VESSEL).sum()) >= 3
    touch_fis = int((ring_l == FISSURE).sum()) >= 3
    return {"juxta-pleural": touch_wall, "juxta-vascular": touch_vessel and not touch_wall,
            "perifissural": touch_fis and not touch_wall,
            "isolated": not (touch_wall or touch_vessel or touch_fis or (ring_l == AW_WALL).any())}[want]


def min_gap_mm(thickness: float, dz: float) -> float:
    """Smallest distance (mm) kept between two nodules' fine masks: max(3 mm, one slice thickness + two fine
    z steps), so that their output-grid masks stay apart (separate instances) even where both fill half of
    neighbouring thick slices."""
    return max(3.0, thickness + 2.0 * dz)


def keep_out(m: np.ndarray, grid, gap: float) -> Tuple[np.ndarray, np.ndarray]:
    """Voxels within `gap` mm of mask m (m padded by p voxels per axis): (keep-out mask, p (3,))."""
    p = np.ceil(gap / np.asarray(grid, float)).astype(int)
    padded = np.pad(m, [(v, v) for v in p])
    return ndi.distance_transform_edt(~padded, sampling=grid) <= gap, p


def footprint(m: np.ndarray, grid) -> Tuple[np.ndarray, float]:
    """Centre (z, y, x) mm from the mask's corner voxel, and volume-equivalent radius (mm), of mask m."""
    g = np.asarray(grid, float)
    return np.argwhere(m).mean(0) * g, 0.5 * volume_equivalent_diameter(float(m.sum()) * float(np.prod(g)))


def _too_close(inst: np.ndarray, c0: np.ndarray, ko: np.ndarray, p: np.ndarray) -> bool:
    """Whether another nodule (inst > 0) lies in the keep-out zone of a mask placed at corner c0."""
    lo = c0 - p
    a = np.maximum(lo, 0)
    b = np.minimum(lo + ko.shape, inst.shape)
    sub_k = ko[tuple(slice(u - l, v - l) for u, v, l in zip(a, b, lo))]
    return bool(np.any(inst[tuple(slice(u, v) for u, v in zip(a, b))][sub_k] > 0))


def place(rng, anat: Anatomy, lab: np.ndarray, inst: np.ndarray, m: np.ndarray, location: str,
          tries: int = 60, fallback: bool = True, others=()) -> Optional[Tuple[Tuple[int, int, int], str]]:
    """Find a corner index for mask m (odd shape) so that it fits the location class. None on failure.

    The asked class is tried first (`tries` seeds), then (fallback) the other classes in LOCATIONS order;
    returns (corner (z, y, x), class met). A mask must lie >= 97 % over lung tissue (75 % juxta-pleural),
    stay 2 output slices from the slab's ends and keep min_gap_mm from other nodules: from their masks
    (inst > 0) and, between centres, the sum of the two volume-equivalent radii plus the gap (others: the
    placed nodules' (centre (z, y, x) mm, radius mm)), so that no point lies within the hit radius of two.
    """
    shape = np.array(lab.shape)
    half = np.array(m.shape) // 2
    struct = ndi.generate_binary_structure(3, 1)
    ring = ndi.binary_dilation(np.pad(m, 2), struct, iterations=2) & ~np.pad(m, 2)
    grid = np.asarray(anat.grid)
    gap = min_gap_mm(anat.opts.thickness, anat.dz)
    ko, p = keep_out(m, grid, gap)
    centre, radius = footprint(m, grid)
    order = [location] + ([l for l in LOCATIONS if l != location] if fallback else [])
    anat.candidates()
    vessels = [s for s in anat.vessels if 0.8 <= s[2] <= 4.0]
    for want in order:
        for _ in range(tries):
            c = _seed_point(rng, anat, m, want, vessels)
            if c is None:
                break
            c0 = c - half
            c1 = c0 + m.shape
            if np.any(c0 - 2 < 0) or np.any(c1 + 2 > shape) or not 2 * anat.k <= c[0] < shape[0] - 2 * anat.k:
                continue
            sub_l = lab[c0[0]:c1[0], c0[1]:c1[1], c0[2]:c1[2]]
            sub_i = inst[c0[0] - 2:c1[0] + 2, c0[1] - 2:c1[1] + 2, c0[2] - 2:c1[2] + 2]
            if np.any(sub_i[np.pad(m, 2) | ring] > 0) or _too_close(inst, c0, ko, p):
                continue
            if any(np.linalg.norm(c0 * grid + centre - oc) < radius + orad + gap for oc, orad in others):
                continue
            inl = LUNG_LIKE[sub_l[m]]
            if inl.mean() < (0.75 if want == "juxta-pleural" else 0.97):
                continue
            ring_l = lab[c0[0] - 2:c1[0] + 2, c0[1] - 2:c1[1] + 2, c0[2] - 2:c1[2] + 2][ring]
            if _meets(want, inl, ring_l):
                return tuple(int(v) for v in c0), want
    return None
