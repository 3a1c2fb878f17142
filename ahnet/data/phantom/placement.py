"""Placing a nodule mask in the lungs so that it meets a location class.

Classes: isolated (touches nothing), juxta-pleural (touches the chest wall), juxta-vascular (beside a vessel of
1.6-8 mm diameter), perifissural (on a fissure). Contact is read in a 2-voxel ring around the mask.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from scipy import ndimage as ndi

from .anatomy import Anatomy
from .constants import AIR, AW_WALL, CORTICAL, FAT, FISSURE, LOCATIONS, LUNG, MARROW, MUSCLE, VESSEL
from .geometry import lut, rand_unit

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
    pool = cand["edge"] if want == "juxta-pleural" else cand["fissure"] if want == "perifissural" else cand["lung"]
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


def place(rng, anat: Anatomy, lab: np.ndarray, inst: np.ndarray, m: np.ndarray, location: str,
          tries: int = 60) -> Optional[Tuple[Tuple[int, int, int], str]]:
    """Find a corner index for mask m (odd shape) so that it fits the location class. None on failure.

    The asked class is tried first (`tries` seeds), then the other classes in LOCATIONS order; returns
    (corner (z, y, x), class met). A mask must lie >= 97 % over lung tissue (75 % juxta-pleural), keep 2
    voxels from other nodules (inst > 0) and stay 2 output slices from the slab's ends.
    """
    shape = np.array(lab.shape)
    half = np.array(m.shape) // 2
    struct = ndi.generate_binary_structure(3, 1)
    ring = ndi.binary_dilation(np.pad(m, 2), struct, iterations=2) & ~np.pad(m, 2)
    order = [location] + [l for l in LOCATIONS if l != location]
    anat.candidates()
    vessels = [s for s in anat.vessels if 0.8 <= s[2] <= 4.0]
    for want in order:
        for _ in range(tries):
            c = _seed_point(rng, anat, m, want, vessels)
            if c is None:
                break
            c0 = c - half
            c1 = c0 + m.shape
            if np.any(c0 - 2 < 0) or np.any(c1 + 2 > shape) or c[0] < 2 * anat.k or c[0] >= shape[0] - 2 * anat.k:
                continue
            sub_l = lab[c0[0]:c1[0], c0[1]:c1[1], c0[2]:c1[2]]
            sub_i = inst[c0[0] - 2:c1[0] + 2, c0[1] - 2:c1[1] + 2, c0[2] - 2:c1[2] + 2]
            if np.any(sub_i[np.pad(m, 2) | ring] > 0):
                continue
            inl = LUNG_LIKE[sub_l[m]]
            if inl.mean() < (0.75 if want == "juxta-pleural" else 0.97):
                continue
            ring_l = lab[c0[0] - 2:c1[0] + 2, c0[1] - 2:c1[1] + 2, c0[2] - 2:c1[2] + 2][ring]
            if _meets(want, inl, ring_l):
                return tuple(int(v) for v in c0), want
    return None
